"""``python -m outbox.receiver``: serve the reference GridPulse receiver."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from outbox.receiver.db import seed_catalog, to_url
from outbox.receiver.faults import Faults
from outbox.receiver.pg import ReceiverDatabaseError
from outbox.receiver.server import DEFAULT_PORT, ReceiverStartError, serve


def build_parser() -> argparse.ArgumentParser:
    """The receiver's command line."""
    parser = argparse.ArgumentParser(
        prog="python -m outbox.receiver",
        description="Reference GridPulse ingest API v1 receiver (a test peer).",
    )
    parser.add_argument(
        "--db", required=True, help="SQLite file path or postgresql://user@host/dbname"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("GRIDPULSE_API_KEY", ""),
        help="bearer key to accept (default: $GRIDPULSE_API_KEY)",
    )
    parser.add_argument("--catalog", choices=("auto", "fixed"), default="auto")
    parser.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="SPEC",
        help="inject a fault, repeatable (e.g. 503:0.2, latency:50ms, 413:>1000)",
    )
    parser.add_argument(
        "--seed-series",
        action="append",
        default=[],
        metavar="IDS",
        help="series ids (comma-separated, repeatable) to add to the catalogue first",
    )
    parser.add_argument(
        "--log-level", default="info", choices=("debug", "info", "warning", "error")
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, seed the catalogue if asked, and serve until interrupted."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.api_key:
        parser.error("--api-key (or GRIDPULSE_API_KEY) is required")
    try:
        Faults.parse(args.fault)
        seeds = [sid.strip() for item in args.seed_series for sid in item.split(",") if sid.strip()]
        if seeds:
            seed_catalog(to_url(args.db), seeds)
        serve(
            args.db,
            host=args.host,
            port=args.port,
            api_key=args.api_key,
            catalog=args.catalog,
            faults=args.fault,
            log_level=args.log_level,
        )
    except ReceiverDatabaseError as exc:  # one line, password masked; 2 as a config error
        print(f"receiver: {exc}", file=sys.stderr)
        return 2
    except ReceiverStartError as exc:  # the address is taken: one line, exit 1
        print(f"receiver: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        parser.error(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
