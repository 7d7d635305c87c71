"""One status model behind the table, ``--json``, ``--check``, ``--metrics`` and ``--remote``.

``model`` holds the values, ``read`` builds them from the outbox (read-only), ``check``
gives the monitoring verdict, ``remote`` compares with GridPulse, ``metrics`` and
``table`` render. The JSON shape is documented field by field in ``docs/status.md``.
"""

from outbox.status.check import evaluate, problems
from outbox.status.metrics import render_metrics, write_metrics, write_run_metrics
from outbox.status.model import (
    CRITICAL,
    LABELS,
    OK,
    SCHEMA_VERSION,
    UNKNOWN,
    WARNING,
    Check,
    Group,
    SeriesStatus,
    Status,
    run_dict,
    run_seconds,
)
from outbox.status.read import collect, open_store, read
from outbox.status.remote import LatestSource, compare_remote
from outbox.status.table import (
    age_text,
    compact_ts,
    counts_text,
    duration_text,
    quality_line,
    render_runs,
    render_table,
    size_text,
)

__all__ = [
    "CRITICAL",
    "LABELS",
    "OK",
    "SCHEMA_VERSION",
    "UNKNOWN",
    "WARNING",
    "Check",
    "Group",
    "LatestSource",
    "SeriesStatus",
    "Status",
    "age_text",
    "collect",
    "compact_ts",
    "compare_remote",
    "counts_text",
    "duration_text",
    "evaluate",
    "open_store",
    "problems",
    "quality_line",
    "read",
    "render_metrics",
    "render_runs",
    "render_table",
    "run_dict",
    "run_seconds",
    "size_text",
    "write_metrics",
    "write_run_metrics",
]
