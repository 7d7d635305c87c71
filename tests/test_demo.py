"""`outbox demo`: the README's first command, offline, ends with every row acknowledged."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
from pathlib import Path


def test_demo_keeps_files_and_every_sample_row_is_acknowledged(tmp_path: Path) -> None:
    exe = shutil.which("outbox")
    assert exe
    keep = tmp_path / "demo"
    done = subprocess.run(
        [exe, "demo", "--keep", str(keep)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "ok: the receiver holds all 2376 observations; 2376 acknowledged" in done.stdout
    assert "check: OK - 99 series, 0 pending, 0 dead" in done.stdout
    outbox = sqlite3.connect(keep / "outbox.db")
    assert outbox.execute("SELECT state, count(*) FROM observations GROUP BY state").fetchall() == [
        ("acked", 2376)
    ]
    receiver = sqlite3.connect(keep / "receiver.db")
    assert receiver.execute("SELECT count(*) FROM observations").fetchone() == (2376,)
    assert f"sqlite3 {keep / 'outbox.db'} 'select count(*) from pending'" in done.stdout
