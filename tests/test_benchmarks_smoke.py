"""The benchmark scripts run at smoke size and print their JSON figures (no thresholds)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
EXPECTED = {
    "bench_stage": {
        "rows",
        "floor",
        "ours",
        "restage",
        "ours_cli",
        "old_design",
        "persist_queue",
        "ratios",
        "disk",
    },
    "bench_send": {"rows", "floor", "ours", "receiver_alone", "ratios", "hourly"},
    "bench_status": {"rows", "status_cli", "status_inprocess", "check_all_pending", "claim"},
    "bench_memory": {"small", "large", "growth_mb", "tree_pss_growth_mb"},
    "bench_report": {"5_bas"},
    "bench_backfill": {"backfill", "hourly", "ratios", "targets"},
}


@pytest.mark.timeout(600)
def test_every_benchmark_runs_at_smoke_size(tmp_path: Path) -> None:
    for name, keys in EXPECTED.items():
        done = subprocess.run(
            [
                sys.executable,
                str(BENCHMARKS / f"{name}.py"),
                "--size",
                "smoke",
                "--cache",
                str(tmp_path / "cache"),
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, f"{name}:\n{done.stderr}"
        result = json.loads(done.stdout)
        assert result["size"] == "smoke"
        assert keys <= result.keys(), f"{name} lacks {keys - result.keys()}"
        if name == "bench_memory":
            assert result["small"]["fetch"]["peak_tree_pss_mb"] > 0
        if name == "bench_report":
            assert result["5_bas"]["bytes"] > 50_000 and result["5_bas"]["seconds"] > 0
        if name == "bench_backfill":
            assert result["hourly"]["in_flight"]["requests"] == 3
            assert result["backfill"]["in_flight"]["requests"] > 3
