"""A throwaway PostgreSQL cluster for tests and benchmarks: initdb in a temporary
directory, a free port on 127.0.0.1, stopped and removed at the end. No test assumes a
server is running.

The binaries come from PATH or Debian's ``/usr/lib/postgresql/<version>/bin``. PostgreSQL
refuses to run as root, so under root (CI's containers) the cluster runs as the
``postgres`` system user that Debian's package creates.

Without the binaries (or the driver) the tests marked ``postgres`` are skipped on a
developer's machine; under CI (``CI`` set) they fail instead, so CI always runs them.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

USER = "outbox_test"


class Unavailable(RuntimeError):
    """No PostgreSQL server binaries or driver on this machine."""


def find_bindir() -> Path:
    """The directory holding initdb and pg_ctl (the newest Debian version first)."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(os.path.realpath(found)).parent
    versions = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: (
            int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0
        ),
        reverse=True,
    )
    if versions:
        return Path(versions[0]).parent
    raise Unavailable("PostgreSQL server binaries (initdb, pg_ctl) not found")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    """One running cluster; :meth:`database` makes a fresh empty database per test."""

    def __init__(self, bindir: Path, root: Path, port: int, runas: str | None) -> None:
        self.bindir = bindir
        self.root = root
        self.data = root / "data"
        self.port = port
        self.runas = runas

    # -- lifecycle --------------------------------------------------------------------

    @classmethod
    def start(cls) -> Cluster:
        try:
            import psycopg  # noqa: F401
        except ImportError as exc:
            raise Unavailable("the psycopg driver is not installed ([postgres] extra)") from exc
        bindir = find_bindir()
        runas = None
        root = Path(tempfile.mkdtemp(prefix="outbox-pg-"))
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError as exc:
                raise Unavailable("running as root and no 'postgres' user to run as") from exc
            os.chown(root, pw.pw_uid, pw.pw_gid)
            runas = "postgres"
        cluster = cls(bindir, root, free_port(), runas)
        try:
            cluster._initdb()
            cluster._pg_ctl(
                "start",
                "-w",
                "-t",
                "60",
                "-l",
                str(root / "server.log"),
                "-o",
                f"-p {cluster.port} -c listen_addresses=127.0.0.1"
                f" -c unix_socket_directories={root}"
                " -c fsync=off -c synchronous_commit=off -c full_page_writes=off",
            )
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _run(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        cmd = list(argv)
        if self.runas:
            cmd = ["runuser", "-u", self.runas, "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)

    def _initdb(self) -> None:
        done = self._run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                USER,
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ]
        )
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {done.stderr.strip() or done.stdout.strip()}")

    def _pg_ctl(self, *args: str) -> None:
        done = self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data), *args])
        if done.returncode != 0:
            log = self.root / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"pg_ctl {args[0]} failed: {done.stderr.strip()} {tail}")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(
                [str(self.bindir / "pg_ctl"), "-D", str(self.data), "stop", "-m", "immediate", "-w"]
            )
        shutil.rmtree(self.root, ignore_errors=True)

    # -- databases --------------------------------------------------------------------

    def url(self, dbname: str = "postgres") -> str:
        """A SQLAlchemy URL for ``dbname`` (psycopg 3 driver)."""
        return f"postgresql+psycopg://{USER}@127.0.0.1:{self.port}/{dbname}"

    def dsn(self, dbname: str = "postgres") -> str:
        """A libpq URL for ``dbname`` (what a user writes: ``postgresql://...``)."""
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{dbname}"

    def database(self) -> str:
        """Create a fresh empty database; return its name."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name


def wait_gone(cluster: Cluster, timeout: float = 10.0) -> None:
    """Wait until the cluster's server process has exited (after :meth:`Cluster.stop`)."""
    deadline = time.monotonic() + timeout
    while (cluster.data / "postmaster.pid").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
