"""Run every benchmark script at one size and print one JSON object keyed by benchmark.

``python benchmarks/run_all.py --size full --out results.json`` (each script runs as its
own process, one after the other, so they do not compete for the two cores).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = (
    "bench_stage",
    "bench_send",
    "bench_status",
    "bench_memory",
    "bench_report",
    "bench_backfill",
)


def main() -> None:
    """Run the scripts in turn; stop at the first failure."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=("smoke", "full"), default="smoke")
    p.add_argument("--only", default=",".join(SCRIPTS), help="comma-separated script names")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args()
    results: dict[str, object] = {}
    for name in (n.strip() for n in args.only.split(",") if n.strip()):
        started = time.perf_counter()
        print(f"== {name} --size {args.size}", file=sys.stderr, flush=True)
        done = subprocess.run(
            [sys.executable, str(HERE / f"{name}.py"), "--size", args.size],
            stdout=subprocess.PIPE,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            sys.exit(f"{name} failed with exit code {done.returncode}")
        results[name] = json.loads(done.stdout)
        print(f"== {name} done in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    text = json.dumps(results, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
