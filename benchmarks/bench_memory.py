"""Memory benchmark: peak RSS of ``outbox fetch --replay`` and ``outbox send`` at two sizes.

Each command runs as its own process (the real CLI); its peak resident set comes from
the kernel's accounting of that child (``os.wait4`` -> ``ru_maxrss``), and the peak
proportional set size of it and its children (a replay's read-ahead process) is sampled
from ``/proc``. The send goes to
the reference receiver subprocess on 127.0.0.1 (a separate process, not counted). Peak
RSS must not grow with the number of rows: ``growth_mb`` is the difference between the
two sizes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import _common as c

from outbox.sample.receiver import running_receiver

SETTINGS = {
    "smoke": {"sizes": (5_000, 20_000)},
    "full": {"sizes": (1_000_000, 4_000_000)},
}
KEY = "bench-key"


def run_measured(args: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run ``python -m outbox ARGS``; its seconds, peak RSS in MB (kernel accounting) and
    peak PSS of its process tree (sampled).

    ``peak_rss_mb`` is the kernel's ``ru_maxrss``: the largest of the process and its
    children (a replay's read-ahead process), each counting the pages they share.
    ``peak_tree_pss_mb`` adds up the proportional set size of the process and its
    children, sampled every 20 ms: what they hold together, shared pages counted once.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "outbox", *args], env=env, stdout=out, stderr=err
        )
        sampler = TreeSampler(proc.pid)
        _, status, usage = os.wait4(proc.pid, 0)  # reaps it with its own resource usage
        seconds = time.perf_counter() - started
        sampler.stop()
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        if code != 0:
            err.seek(0)
            raise RuntimeError(f"outbox {' '.join(args)} exited {code}:\n{err.read().decode()}")
    return {
        "seconds": round(seconds, 3),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "peak_tree_pss_mb": round(sampler.peak_kb / 1024, 1),
        "max_processes": sampler.max_processes,
    }


class TreeSampler:
    """Samples the summed PSS of a process and its descendants until stopped."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_kb = 0
        self.max_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling (the figures are final after this)."""
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = _tree(self.pid)
            total = sum(_pss_kb(p) for p in pids)
            self.peak_kb = max(self.peak_kb, total)
            self.max_processes = max(self.max_processes, len(pids))
            self._stop.wait(self.interval)


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                children = Path(f"/proc/{p}/task/{task}/children").read_text().split()
                todo.extend(int(c) for c in children)
        except OSError:
            continue
    return pids


def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def clean_env(database: Path) -> dict[str, str]:
    """The environment of a CLI run on ``database`` (no stray OUTBOX/EIA/GRIDPULSE vars)."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("OUTBOX", "EIA_", "GRIDPULSE_"))
    }
    env["OUTBOX_DB"] = str(database)
    return env


def measure(work: Path, cache: Path, rows: int) -> dict[str, Any]:
    """Fetch ``rows`` by replay into a fresh outbox, then send them all."""
    info = c.replay_pages(cache, rows)
    database = work / f"memory-{info['rows']}.db"
    c.remove_db(database)
    env = {**clean_env(database), **c.replay_env(Path(info["dir"]))}
    c.log(f"fetch --replay of {info['rows']} rows")
    fetch = run_measured(["fetch", "--replay", info["dir"]], env)
    c.log(f"send of {info['rows']} rows")
    with running_receiver(work, api_key=KEY) as receiver:
        env.update({"GRIDPULSE_BASE_URL": receiver.base_url, "GRIDPULSE_API_KEY": KEY})
        send = run_measured(["send"], env)
    c.remove_db(database)
    return {"rows": info["rows"], "fetch": fetch, "send": send}


def main() -> None:
    """Measure both sizes; report peak RSS and its growth."""
    args = c.parser(__doc__.splitlines()[0]).parse_args()
    small, large = SETTINGS[args.size]["sizes"]
    with c.workdir(args.workdir) as work:
        first = measure(work, args.cache, small)
        second = measure(work, args.cache, large)
    result = {
        "benchmark": "memory",
        "size": args.size,
        "small": first,
        "large": second,
        "growth_mb": {
            stage: round(second[stage]["peak_rss_mb"] - first[stage]["peak_rss_mb"], 1)
            for stage in ("fetch", "send")
        },
        "tree_pss_growth_mb": {
            stage: round(second[stage]["peak_tree_pss_mb"] - first[stage]["peak_tree_pss_mb"], 1)
            for stage in ("fetch", "send")
        },
        "growth_ratio": {
            stage: c.ratio(second[stage]["peak_rss_mb"], first[stage]["peak_rss_mb"])
            for stage in ("fetch", "send")
        },
        "rows_ratio": c.ratio(second["rows"], first["rows"]),
    }
    c.emit(result)


if __name__ == "__main__":
    main()
