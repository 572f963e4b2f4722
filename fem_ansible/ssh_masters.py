"""SSH master connections kept between runs: a host's next run reuses the connection its
last run opened instead of paying a handshake (docs/hosts.md, "Connections kept between
runs").

Every run still has its own ControlPath dir (fem_ansible.targets.control_dir) and the
master it opens lives in the run's cgroup.  When the run has ended on its own (not stopped),
its masters are moved out: into the listener's own cgroup and into this listener's pool,
one per inventory host and ssh destination (``%C``).  A later run on the same inventory host
is lent them: a hard link in its own ControlPath dir, under the name its ``ssh`` looks for,
so it connects as a client of the kept master, while the run's own processes (that client
included) stay in the run's cgroup.  A cancel kills the run's client, never the master.

Why per inventory host and not by ``%C`` alone: ``%C`` is a hash of the local host, the
destination address, port and user (OpenSSH 9.2), not of the route; two inventory hosts
with the same private address behind two jump hosts would share one connection.

Bounds: ``ControlPersist`` (``execution.ssh.control_persist_s``) ends an idle master; one
that is near it is not lent (it may exit under its borrower).  At most
:data:`MAX_BORROWERS` runs share one master (sshd's ``MaxSessions`` defaults to 10).  A
SIGHUP retires every kept master (the inventory may have changed): each ends when its
last borrower is done; the listener's end ends them all.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import cgroups
from .config import Config
from .targets import control_dir

log = logging.getLogger(__name__)

#: Runs lent one master at once.
MAX_BORROWERS = 8
#: A master idle for longer than its ``ControlPersist`` less this is not lent any more.
LEND_MARGIN_S = 10
# What ssh names a socket with ``ControlPath=<dir>/%C`` (fem_ansible.targets.ssh_env).
_NAME = re.compile(r"[0-9a-f]{40}")
_MASTER_PID = re.compile(r"\(pid=(\d+)\)")
_SSH_TIMEOUT_S = 10


@dataclass
class _Kept:
    """One master of the pool: its link there, its process, who uses it."""

    path: Path
    pid: int
    #: The socket ssh bound, which its process title names.
    origin: Path
    borrowers: int = 0
    idle_since: float = field(default_factory=time.monotonic)
    retired: bool = False


@dataclass
class Loan:
    """What one run was lent (see :meth:`KeptMasters.lend`)."""

    host: str
    run_dir: Path
    lent: dict[str, _Kept] = field(default_factory=dict)


class KeptMasters:
    """The listener's kept SSH masters.  Thread-safe: runs start and end in many threads."""

    def __init__(self, pool: Path, persist_s: int):
        """:param pool: this listener's dir of kept masters (its sockets' hard links).
        :param persist_s: the masters' ``ControlPersist``."""
        self.pool, self.persist_s = pool, persist_s
        #: Nothing is kept where runs get no cgroup (the master could not leave the run's
        #: processes) or once a master could not be moved out of its run's.
        self.off = cgroups.own_group() is None
        self._lock = threading.Lock()
        self._kept: dict[tuple[str, str], _Kept] = {}
        self._serial = 0
        # A listener killed before its end left its pool: its masters are ended now.
        stop_masters(self.pool)
        shutil.rmtree(self.pool, ignore_errors=True)
        self.pool.mkdir(mode=0o700, parents=True)

    @classmethod
    def of(cls, config: Config) -> KeptMasters:
        """The listener's, beside its runs' ControlPath dirs (a hard link cannot cross file
        systems); "kept" is no run's ident ("fem-..." with a ".")."""
        return cls(control_dir(config, "kept"), config.execution.ssh.control_persist_s)

    def lend(self, run_dir: Path, host: str) -> Loan:
        """Before a run on inventory host ``host``: link the host's kept masters that may be
        lent into the run's ControlPath dir ``run_dir``."""
        loan = Loan(host, run_dir)
        now = time.monotonic()
        with self._lock:
            for (kept_host, name), kept in list(self._kept.items()):
                if kept_host != host or kept.borrowers >= MAX_BORROWERS:
                    continue
                if not kept.borrowers and now - kept.idle_since > self.persist_s - LEND_MARGIN_S:
                    self._forget(kept_host, name)  # it is ending, or has ended, on its own
                    continue
                try:
                    os.link(kept.path, run_dir / name)
                except OSError as e:
                    log.warning("a kept SSH master could not be lent to a run on %s: %s",
                                host, e)
                    continue
                kept.borrowers += 1
                loan.lent[name] = kept
        return loan

    def keep(self, loan: Loan, group: Path | None) -> set[int]:
        """After a run that ended on its own, before its processes are killed: move the
        masters it opened into the pool (and out of the run's cgroup ``group``), one per
        destination of the host; the others end with the run.

        :returns: the processes moved out, which the run's end must spare (a
            ``ProxyCommand`` carries the run's ``FEM_JOB_ID`` marker).
        """
        moved: set[int] = set()
        if self.off or group is None:
            return moved
        for path in _sockets(loan.run_dir):
            lent = loan.lent.get(path.name)
            if lent is not None and _same_file(path, lent.path):
                continue  # not the run's own: a lent master's link
            pid = _master_pid(path)
            # The run's own master: in its group, and the ssh that bound this socket.
            if pid is None or pid not in cgroups.pids(group) or not _is_master(pid, path):
                continue
            with self._lock:
                old = self._kept.get((loan.host, path.name))
                if old is not None and _alive(old.path):
                    continue
                if old is not None:  # ended under the run, which made this one instead
                    self._forget(loan.host, path.name)
                pids = self._move_out(pid, group)
                if not pids:
                    _ssh_control(path, "exit")  # if the master did leave the run's group
                    continue
                self._serial += 1
                kept = _Kept(self.pool / str(self._serial), pid, path)
                try:
                    os.link(path, kept.path)
                except OSError as e:
                    log.warning("an SSH master to %s is not kept: %s", loan.host, e)
                    _ssh_control(path, "exit")
                    continue
                path.unlink()  # the run's dir goes with the masters left in it
                self._kept[(loan.host, path.name)] = kept
                moved.update(pids)
                log.debug("SSH master %d to %s kept", pid, loan.host)
        return moved

    def _move_out(self, pid: int, group: Path) -> list[int]:
        """Move the master ``pid`` and what carries its connection (a ``ProxyCommand``: the
        processes of the run's ``group`` holding a pipe the master holds) into the
        listener's own group.  Where that cannot be done, nothing is kept any more (one
        warning): it would fail alike for every run."""
        target = cgroups.own_group()
        assert target is not None  # not off
        pipes = _pipes(pid)
        pids = [pid, *(p for p in cgroups.pids(group) if p != pid and pipes & _pipes(p))]
        try:
            for moved in pids:
                cgroups.join(target, moved)
        except OSError as e:
            log.warning("SSH connections are not kept between runs: a master could not be "
                        "moved out of its run's cgroup (%s)", e)
            self.off = True
            return []
        return pids

    def give_back(self, loan: Loan) -> None:
        """After a run, its processes killed: its lent masters are idle from now unless
        another run uses them; a retired one with no borrower left ends.  The run's
        ControlPath dir goes, with any master of the run that was not kept."""
        now = time.monotonic()
        with self._lock:
            for name, kept in loan.lent.items():
                (loan.run_dir / name).unlink(missing_ok=True)
                kept.borrowers -= 1
                kept.idle_since = now
                if kept.retired and not kept.borrowers:
                    _end(kept)
        release(loan.run_dir)

    def retire(self) -> None:
        """SIGHUP: no kept master is lent again; each ends now, or when its last borrower is
        done (a running task is not disturbed)."""
        with self._lock:
            for host, name in list(self._kept):
                self._forget(host, name)

    def close(self) -> None:
        """The listener's end: every kept master ends, borrowed or not."""
        with self._lock:
            for kept in self._kept.values():
                _end(kept)
            self._kept.clear()
        shutil.rmtree(self.pool, ignore_errors=True)

    def _forget(self, host: str, name: str) -> None:
        """Take a master out of the pool: ended now if nobody uses it, else retired."""
        kept = self._kept.pop((host, name))
        kept.retired = True
        if not kept.borrowers:
            _end(kept)


def release(run_dir: Path) -> None:
    """End the masters a run opened whose sockets are still in its ControlPath dir
    ``run_dir`` (a lent one is unlinked before), and remove the dir."""
    stop_masters(run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)


def stop_masters(directory: Path) -> None:
    """End the SSH masters whose sockets are in ``directory`` (``ssh -O exit``).

    A master outlives the run that started it for ``ControlPersist``, and the ``FEM_JOB_ID``
    marker does not find it: ssh writes its process title over its environment.
    """
    for path in _sockets(directory):
        _ssh_control(path, "exit")


def _sockets(directory: Path) -> list[Path]:
    """The sockets ssh made in ``directory`` (none if it is gone)."""
    try:
        entries = list(directory.iterdir())
    except OSError:
        return []
    found = []
    for path in entries:
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(path.lstat().st_mode):
                found.append(path)
    return found


def _ssh_control(path: Path, command: str) -> str:
    """``ssh -O <command>`` to the master at ``path``: what it said on stderr."""
    try:
        done = subprocess.run(["ssh", "-o", f"ControlPath={path}", "-O", command, "master"],
                              capture_output=True, text=True, timeout=_SSH_TIMEOUT_S,
                              check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stderr


def _master_pid(path: Path) -> int | None:
    """The process of the master listening at ``path``, as it says itself (None if it does
    not answer).  Not the socket's peer credentials: ssh binds the socket before it forks
    the master off."""
    found = _MASTER_PID.search(_ssh_control(path, "check"))
    return int(found.group(1)) if found else None


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _alive(path: Path) -> bool:
    """Whether a master accepts connections at ``path``."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(1)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def _pipes(pid: int) -> set[str]:
    """The pipes process ``pid`` holds (``pipe:[inode]``)."""
    found = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("pipe:"):
                    found.add(link)
    return found


def _end(kept: _Kept) -> None:
    """End a kept master and unlink it: asked through its socket; by signal if it does not
    answer and its process is still that master (its title names the socket it bound)."""
    if "Exit request sent" not in _ssh_control(kept.path, "exit") and _is_master(
            kept.pid, kept.origin):
        with contextlib.suppress(OSError):
            os.kill(kept.pid, signal.SIGTERM)
    kept.path.unlink(missing_ok=True)


def _is_master(pid: int, origin: Path) -> bool:
    """Whether ``pid`` is the SSH master that bound the socket ``origin``: ssh's title for
    it is ``ssh: <ControlPath> [mux]``."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().rstrip(b"\0") == f"ssh: {origin} [mux]".encode()
    except OSError:
        return False
