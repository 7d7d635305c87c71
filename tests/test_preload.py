"""outbox.preload: numpy and pandas imported on a thread while the process waits, and never
half imported across a fork (each case in a fresh interpreter: this one has them already)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from outbox.readahead import can_fork


def _python(code: str, timeout: float = 60) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no thread's traceback, no warning
    return done.stdout.strip()


def test_preload_imports_on_a_thread_and_the_caller_goes_on() -> None:
    out = _python(
        """
        import sys, threading
        from outbox import preload
        assert "pandas" not in sys.modules  # nothing imports it before its use
        preload.preload()
        names = [t.name for t in threading.enumerate()]
        preload.settle()
        print("outbox-preload" in names, "pandas" in sys.modules, "numpy" in sys.modules)
        preload.preload()  # once: done, no second thread
        print(len(threading.enumerate()))
        """
    )
    assert out.splitlines() == ["True True True", "1"]


def test_a_failed_preload_leaves_the_import_to_the_first_use(tmp_path: Path) -> None:
    """The thread's import fails (here once, as a flaky disk might): it ends quietly and
    the first real use imports again, for itself."""
    (tmp_path / "pandas.py").write_text(
        textwrap.dedent(
            """
            import pathlib
            tried = pathlib.Path(__file__).with_name("tried")
            if not tried.exists():
                tried.touch()
                raise ImportError("the first import fails")
            VALUE = 42
            """
        )
    )
    out = _python(
        f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        from outbox import preload
        preload.preload()
        preload.settle()  # the thread ends quietly (nothing on stderr)
        print("pandas" in sys.modules, (preload._thread is not None))
        import pandas
        print(pandas.VALUE)
        """
    )
    assert out.splitlines() == ["False True", "42"]
    assert (tmp_path / "tried").exists()  # the thread did try first


@pytest.mark.skipif(not can_fork(), reason="the forked read-ahead is Linux only")
def test_a_fork_waits_for_an_import_in_progress() -> None:
    """Without settle, the child inherits pandas' module lock held by a thread it does not
    have, and its own import of pandas waits for ever (the timeout fails the test)."""
    out = _python(
        """
        from outbox.preload import preload
        from outbox.readahead import forked_read_ahead

        def prepare(n):
            import pandas  # what normalize does in the read-ahead child
            return n + len(pandas.__name__)

        preload()  # still importing when the fork comes
        print(list(forked_read_ahead(iter(range(3)), prepare, 2)))
        """,
        timeout=60,
    )
    assert out == "[6, 7, 8]"


@pytest.mark.skipif(not can_fork(), reason="the forked read-ahead is Linux only")
def test_meanwhile_runs_here_after_the_fork_and_before_the_first_item() -> None:
    out = _python(
        """
        import multiprocessing, os
        from outbox.readahead import forked_read_ahead

        seen = []
        def meanwhile():
            seen.append((os.getpid(), len(multiprocessing.active_children())))

        got = list(forked_read_ahead(iter(range(3)), lambda n: (n, os.getpid()), 2,
                                     meanwhile=meanwhile))
        (pid, children), = seen
        print(pid == os.getpid(), children, [n for n, _ in got],
              all(child != os.getpid() for _, child in got))
        """
    )
    assert out == "True 1 [0, 1, 2] True"


@pytest.mark.skipif(not can_fork(), reason="the forked read-ahead is Linux only")
def test_meanwhile_failing_stops_the_child() -> None:
    out = _python(
        """
        import multiprocessing
        from outbox.readahead import forked_read_ahead

        def meanwhile():
            raise RuntimeError("meanwhile failed")

        try:
            next(forked_read_ahead(iter(range(10**9)), lambda n: n, 2, meanwhile=meanwhile))
        except RuntimeError as exc:
            print(exc, len(multiprocessing.active_children()))
        """
    )
    assert out == "meanwhile failed 0"
