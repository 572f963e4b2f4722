"""The listener's side of the resident Ansible (fem_ansible.resident_server): which servers
run, for which environment, and when they are replaced.

A server is started the first time a run's environment needs one (that run waits for it
to listen, at most :data:`START_WAIT_S`, else starts cold), or at the listener's start for
the task playbook's and the short runs' environments (fem_ansible.runner.prestart), with that
environment less its per-run variables; there is one per distinct environment (the task
playbook's, the short stop and cleanup runs' with stock ``linear``, a remote host's SSH
settings), at most :data:`MAX_SERVERS`.  A server is replaced when it retires itself (its
imported code changed, its run count or memory), on SIGHUP (:meth:`Servers.replace`), and
when it dies; a run it was serving then ends with ``LOST_RC`` and the task is recovered
(fem_ansible.runner.ServerLost).  Without cgroups (fem_ansible.cgroups.base) there are no
servers.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from . import cgroups
from .resident_client import PER_RUN, PROTOCOL, server_key
from .sockdir import socket_dir

log = logging.getLogger(__name__)

#: Distinct Ansible environments served at once; a run of another goes cold.
MAX_SERVERS = 4

#: The client, started by path with ``python -I -S``: not imported as part of this package.
CLIENT = Path(__file__).with_name("resident_client.py")

#: How long a run waits for a server that is starting (its imports: about a second here)
#: before it starts cold; a cold start would spend that CPU too.
START_WAIT_S = 5.0

# A socket path has at most 107 bytes: <dir>/<24 hex>.sock and the server's temp suffix.
_DIR_MAX = 60


@dataclass
class _Server:
    key: str
    process: subprocess.Popen[bytes]
    retired: bool = False

    def died(self) -> bool:
        """Whether the server ended other than by retiring (which waits for its runs)."""
        return self.process.poll() not in (None, 0)


class Servers:
    """The resident Ansible servers of one listener."""

    def __init__(self, work_dir: Path) -> None:
        self.dir = servers_dir(work_dir)
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.dir.chmod(0o700)
        self._cwd = self.dir / "cwd"  # an empty working dir, as runs have (runner.py says why)
        self._cwd.mkdir(exist_ok=True, mode=0o700)
        self._lock = threading.Lock()
        self._servers: dict[str, _Server] = {}
        self._closed = False
        for stale in self.dir.glob("*.sock*"):  # an earlier listener's
            stale.unlink(missing_ok=True)

    def command(self, env: dict[str, str], cold: list[str]) -> tuple[list[str], _Server | None]:
        """The command that runs ``cold`` for a run with ``env``: through the client, so that
        the run is in its cgroup, and forked from a server where one serves ``env`` (one is
        started for the next run if none does); and that server, which the run may have
        used (:meth:`_Server.died` then tells a lost run from a failed one)."""
        server = self._ensure(env)
        if server is None:
            return [*client_command(None), *cold], None
        path = self._socket(server.key)
        return [*client_command(path, 0 if path.exists() else START_WAIT_S), *cold], server

    def replace(self) -> None:
        """Retire every server (SIGHUP): each finishes the runs it has and exits; the next
        run of each environment starts a new one."""
        with self._lock:
            for server in self._servers.values():
                self._retire(server)
            self._servers.clear()

    def close(self) -> None:
        """The listener stops: servers take no more runs and exit with their last run; their
        directory goes (a server still finishing a run has already removed its socket)."""
        self._closed = True
        self.replace()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _retire(self, server: _Server) -> None:
        """Stop ``server`` taking runs: its socket goes now, not when it has seen the signal
        (until then the next run of its environment would connect to it, be refused and
        go cold, where it should wait for the new one)."""
        server.retired = True
        self._socket(server.key).unlink(missing_ok=True)
        if server.process.poll() is None:
            server.process.terminate()

    def _ensure(self, env: dict[str, str]) -> _Server | None:
        """The live server for ``env`` (started now if there was none); None where none may
        be started."""
        key = server_key(env)
        with self._lock:
            server = self._servers.get(key)
            if server is not None and server.process.poll() is None:
                return server
            if self._closed:
                return None
            if server is not None:
                if not server.retired:
                    log.warning("the resident Ansible %s ended (exit %s); a new one starts",
                                key[:8], server.process.returncode)
                    self._socket(key).unlink(missing_ok=True)  # a killed one leaves it
                del self._servers[key]
            if len(self._servers) >= MAX_SERVERS:
                self._reap()
                if len(self._servers) >= MAX_SERVERS:
                    return None
            try:
                server = self._servers[key] = self._start(key, env)
            except OSError as e:  # the run goes cold, as it would without servers
                log.warning("the resident Ansible %s could not start (%s); runs like this "
                            "one start cold until it can", key[:8], e)
                return None
            return server

    def _reap(self) -> None:
        for key in [k for k, s in self._servers.items() if s.process.poll() is not None]:
            del self._servers[key]

    def _socket(self, key: str) -> Path:
        return self.dir / f"{key}.sock"

    def _start(self, key: str, env: dict[str, str]) -> _Server:
        self._cwd.mkdir(parents=True, exist_ok=True, mode=0o700)  # a temp cleaner's victim
        own = {k: v for k, v in env.items() if k not in PER_RUN}
        process = subprocess.Popen(
            [sys.executable, "-P", "-m", "fem_ansible.resident_server",
             str(self._socket(key)), str(os.getpid())],
            env=own, cwd=self._cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, start_new_session=True)
        threading.Thread(target=_relay, args=(key, process), name=f"resident-{key[:8]}",
                         daemon=True).start()
        log.info("starting a resident Ansible (%s) for runs like this one", key[:8])
        return _Server(key, process)


def _relay(key: str, process: subprocess.Popen[bytes]) -> None:
    """The server's own lines into the listener's log."""
    assert process.stderr is not None
    for line in process.stderr:
        log.info("resident Ansible %s: %s", key[:8], line.decode(errors="replace").rstrip())
    process.wait()


def servers_dir(work_dir: Path) -> Path:
    """Where the listener of ``work_dir`` keeps its servers' sockets (fem_ansible.sockdir)."""
    return socket_dir(work_dir.resolve(), "resident", "servers", _DIR_MAX)


def client_command(server: Path | None, wait_s: float = 0) -> list[str]:
    """The client (resident_client.py) as a run's first process: it joins the run's cgroup,
    then asks ``server`` (waiting up to ``wait_s`` for it to listen) or, without one, runs
    the cold command that follows."""
    return [sys.executable, "-I", "-S", str(CLIENT), PROTOCOL, str(server or "-"), str(wait_s),
            "--"]


def available() -> bool:
    """Whether runs can have servers: only where they have cgroups."""
    return cgroups.base() is not None
