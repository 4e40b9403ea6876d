"""A PostgreSQL cluster of a test's own (initdb into a temp folder, a free
port), which the test may stop, start and restart without touching the shared
server. PostgreSQL refuses to run as root: as root, its commands run as the
``postgres`` OS user."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


def find_bindir() -> Path | None:
    """The folder of initdb and pg_ctl, or None."""
    for candidate in [shutil.which("pg_ctl"), *sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), reverse=True)]:
        if candidate and Path(candidate).with_name("initdb").exists():
            return Path(candidate).parent
    return None


def why_not() -> str | None:
    """Why a cluster cannot be made here (a reason to skip), or None."""
    if find_bindir() is None:
        return "the PostgreSQL server binaries (initdb, pg_ctl) are not installed"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root, and there is no `postgres` user to run PostgreSQL as"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """``url(db)``: a database's URL; ``stop()``, ``start()``, ``restart()``;
    ``remove()`` stops it and deletes its folder."""

    def __init__(self):
        self.bindir = find_bindir()
        self.folder = Path(tempfile.mkdtemp(prefix="metabatch-pg-"))
        self.port = _free_port()
        self.as_user = None
        if os.geteuid() == 0:
            self.as_user = "postgres"
            user = pwd.getpwnam("postgres")
            os.chown(self.folder, user.pw_uid, user.pw_gid)
        self.data = self.folder / "data"
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "root", "--no-sync", "-E", "UTF8")
        with open(self.data / "postgresql.conf", "a") as conf:
            # every start uses these (pg_ctl is never run without them, so it cannot take the shared port)
            conf.write(
                f"port = {self.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{self.folder}'\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
            )
        self.start()

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self.bindir / tool), *args]
        if self.as_user:
            command = ["runuser", "-u", self.as_user, "--", *command]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=self.folder)

    def _ctl(self, *args: str) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.folder / "log"), "-w", *args)

    def url(self, database: str = "postgres", password: str | None = None) -> str:
        user = f"root:{password}" if password else "root"
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        self._ctl("start")

    def stop(self) -> None:
        self._ctl("stop", "-m", "fast")  # fast: connections are cut, as in a failover

    def restart(self) -> None:
        self._ctl("restart", "-m", "fast")

    def remove(self) -> None:
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass  # already stopped
        shutil.rmtree(self.folder, ignore_errors=True)
