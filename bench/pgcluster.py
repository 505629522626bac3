"""Throwaway PostgreSQL clusters for tests and benchmarks.

Uses Debian's server binaries (``/usr/lib/postgresql/*/bin``): ``initdb`` a
cluster in a temporary directory, start it on a free loopback port with its unix
socket inside that directory (trust auth, fsync off), and remove it afterwards.
PostgreSQL refuses to run as root, so as root the server runs as a dedicated
system user (``chatkit-pg``, created when missing; ``nobody`` as a fallback).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path

__all__ = ["ClusterUnavailable", "PostgresCluster", "find_pg_bindir"]

SUPERUSER = "chatkit"
SERVICE_USER = "chatkit-pg"


class ClusterUnavailable(RuntimeError):
    """PostgreSQL cannot be started here (binaries missing, no usable user, …)."""


def find_pg_bindir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<v>/bin`` with initdb and pg_ctl (or PATH's)."""
    found = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    found.sort(key=lambda p: int(v) if (v := Path(p).parent.parent.name).isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(initdb).parent
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _service_user() -> str | None:
    """The user to run the server as (None: the current, non-root user)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(SERVICE_USER)
        return SERVICE_USER
    except KeyError:
        pass
    if shutil.which("useradd"):
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
             SERVICE_USER],
            capture_output=True,
            check=False,
        )
        try:
            pwd.getpwnam(SERVICE_USER)
            return SERVICE_USER
        except KeyError:
            pass
    try:
        pwd.getpwnam("nobody")
        return "nobody"
    except KeyError as exc:
        raise ClusterUnavailable("running as root with no unprivileged user for postgres") from exc


class PostgresCluster:
    """One throwaway cluster. ``url`` is a ``postgresql+psycopg://`` URL of database ``dbname``."""

    def __init__(self, bindir: Path, root: Path, port: int, run_as: str | None) -> None:
        self.bindir = bindir
        self.root = root
        self.datadir = root / "data"
        self.logfile = root / "postgres.log"
        self.port = port
        self.run_as = run_as
        self.dbname = "chatkit"
        self.running = False

    # -- lifecycle ------------------------------------------------------
    @classmethod
    def create(cls, dbname: str = "chatkit") -> PostgresCluster:
        """initdb + start + create ``dbname``; raises ClusterUnavailable when impossible."""
        bindir = find_pg_bindir()
        if bindir is None:
            raise ClusterUnavailable(
                "PostgreSQL server binaries not found (no /usr/lib/postgresql/*/bin/initdb); "
                "run `make system-deps` (apt-get install postgresql)"
            )
        run_as = _service_user()
        root = Path(tempfile.mkdtemp(prefix="chatkit-pg-"))
        if run_as is not None:
            info = pwd.getpwnam(run_as)
            os.chown(root, info.pw_uid, info.pw_gid)
        cluster = cls(bindir, root, _free_port(), run_as)
        cluster.dbname = dbname
        try:
            cluster._run(
                [str(bindir / "initdb"), "-D", str(cluster.datadir), "-U", SUPERUSER,
                 "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync"]
            )
            cluster.start()
            cluster.create_database(dbname)
        except Exception as exc:
            log = cluster.read_log()
            cluster.destroy()
            raise ClusterUnavailable(f"could not start PostgreSQL: {exc}\n{log}") from exc
        return cluster

    def _run(self, argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        if self.run_as is not None:
            argv = ["runuser", "-u", self.run_as, "--", *argv]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        if check and proc.returncode != 0:
            command = " ".join(argv)
            raise RuntimeError(f"{command} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def start(self) -> None:
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
            "-c max_connections=200"
        )
        self._run(
            [str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-l", str(self.logfile),
             "-o", options, "-w", "-t", "60", "start"]
        )
        self.running = True

    def stop(self) -> None:
        """Stop the server (fast shutdown); clients see connection errors until start()."""
        if self.datadir.exists():
            self._run(
                [str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "fast", "-w",
                 "stop"],
                check=False,
            )
        self.running = False

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def read_log(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    # -- databases ------------------------------------------------------
    def url_for(self, dbname: str) -> str:
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    @property
    def url(self) -> str:
        return self.url_for(self.dbname)

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(
            host="127.0.0.1", port=self.port, user=SUPERUSER, dbname="postgres",
            autocommit=True, connect_timeout=10,
        ) as conn:
            conn.execute(sql)  # type: ignore[arg-type]

    def create_database(self, dbname: str | None = None) -> str:
        """Create a database (a fresh unique one when ``dbname`` is None); return its URL."""
        name = dbname or f"t_{uuid.uuid4().hex[:12]}"
        self._admin(f'CREATE DATABASE "{name}"')
        return self.url_for(name)

    def drop_database(self, dbname: str) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')

    def __enter__(self) -> PostgresCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()
