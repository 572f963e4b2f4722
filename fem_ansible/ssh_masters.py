"""SSH master connections kept between runs: a host's next run reuses the connection its
last run opened instead of paying a handshake (docs/hosts.md, "Connections kept between
runs").

Every run still has its own ControlPath dir (fem_ansible.targets.control_dir) and the
master it opens lives in the run's cgroup.  When the run has ended on its own (not stopped),
its masters are moved out, each into a cgroup of its own beside the runs'
(``fem-ssh/<pool>.<n>``, with what carries its connection), and into this listener's pool,
one per inventory host and ssh destination (``%C``).  A later run on the same inventory host
is lent them: a hard link in its own ControlPath dir, under the name its ``ssh`` looks for,
so it connects as a client of the kept master, while the run's own processes (that client
included) stay in the run's cgroup.  A cancel kills the run's client, never the master; a
master ends with its whole group.

Why per inventory host and not by ``%C`` alone: ``%C`` is a hash of the local host, the
destination address, port and user (OpenSSH 9.2), not of the route; two inventory hosts
with the same private address behind two jump hosts would share one connection.

Bounds: ``ControlPersist`` (``execution.ssh.control_persist_s``) ends an idle master; one
that is near it is not lent (it may exit under its borrower).  At most
:data:`MAX_BORROWERS` runs share one master (sshd's ``MaxSessions`` defaults to 10).  A
SIGHUP retires every kept master (the inventory may have changed): each ends when its
last borrower is done, and runs that started before it keep nothing.  A run that failed
retires what it was lent.  The listener's end ends them all.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from . import cgroups
from .config import Config
from .sockdir import temp_root
from .targets import CONTROL_DIR_MAX, control_dir

log = logging.getLogger(__name__)

#: Runs lent one master at once.
MAX_BORROWERS = 8
#: A master idle for longer than its ``ControlPersist`` less this is not lent any more.
LEND_MARGIN_S = 10
#: A kept master is lent once a session through it ran ``true`` on the host within this...
PROBE_S = 5
#: ...unless it carried a run or a try this recently (a run lent it just after its keep or a
#: good try skips the try; runs that start while a try is under way try it too).
ANSWERED_S = 2
_MASTER_PID = re.compile(r"\(pid=(\d+)\)")
_SSH_TIMEOUT_S = 10


@dataclass
class _Kept:
    """One master of the pool: its link there, its cgroup, who uses it."""

    path: Path
    pid: int
    #: The master and what carries its connection, nothing else.
    group: Path
    borrowers: int = 0
    idle_since: float = field(default_factory=time.monotonic)
    #: When it last carried a session the listener opened to try it.
    answered_at: float = float("-inf")
    retired: bool = False


@dataclass
class Loan:
    """What one run was lent (see :meth:`KeptMasters.lend`)."""

    host: str
    run_dir: Path
    #: The pool's generation when the run started: a run that started before a SIGHUP
    #: may have read the inventory before it, and keeps nothing.
    generation: int
    lent: dict[str, _Kept] = field(default_factory=dict)


class KeptMasters:
    """The listener's kept SSH masters.  Thread-safe: runs start and end in many threads."""

    def __init__(self, pool: Path, persist_s: int):
        """:param pool: this listener's dir of kept masters (its sockets' hard links); its
            name also names the masters' cgroups, ``fem-ssh/<name>.<n>``.
        :param persist_s: the masters' ``ControlPersist``."""
        self.pool, self.persist_s = pool, persist_s
        #: Where the masters' groups go; None: nothing is kept (runs get no cgroup, so a
        #: master could not be told from the run's processes).
        self.groups = cgroups.kept_base()
        self._lock = threading.Lock()
        self._kept: dict[tuple[str, str], _Kept] = {}
        self._serial = 0
        self._generation = 0
        # A listener killed before its end left its pool: its masters are ended now.
        stop_masters(self.pool)
        for group in self._own_groups():
            cgroups.remove(group)
        shutil.rmtree(self.pool, ignore_errors=True)
        self.pool.mkdir(mode=0o700, parents=True)

    @classmethod
    def of(cls, config: Config) -> KeptMasters:
        """The listener's, beside its runs' ControlPath dirs (a hard link cannot cross file
        systems); "kept" is no run's ident ("fem-..." with a ".")."""
        return cls(control_dir(config, "kept"), config.execution.ssh.control_persist_s)

    def lend(self, run_dir: Path, host: str) -> Loan:
        """Before a run on inventory host ``host``: link the host's kept masters into the
        run's ControlPath dir ``run_dir``, each once it has carried a session just now (a
        connection that stalled would fail every run lent it; it is ended instead).  Any
        host's master near its idle bound is ended."""
        now = time.monotonic()
        wanted = []
        with self._lock:
            loan = Loan(host, run_dir, self._generation)
            for (kept_host, name), kept in list(self._kept.items()):
                if not kept.borrowers and now - kept.idle_since > self.persist_s - LEND_MARGIN_S:
                    self._forget(kept_host, name)  # it is ending, or has ended, on its own
                elif kept_host == host and kept.borrowers < MAX_BORROWERS:
                    kept.borrowers += 1  # not ended while it is tried
                    wanted.append((name, kept))
        for name, kept in wanted:
            answers = now - kept.answered_at < ANSWERED_S or _answers(kept.path)
            with self._lock:
                if answers and not kept.retired:
                    kept.answered_at = max(kept.answered_at, now)
                    try:
                        os.link(kept.path, run_dir / name)
                    except OSError as e:
                        log.warning("a kept SSH master could not be lent to a run on %s: %s",
                                    host, e)
                    else:
                        loan.lent[name] = kept
                        continue
                kept.borrowers -= 1
                if not answers and self._kept.get((host, name)) is kept:
                    log.warning("a kept SSH master to %s carried no session within %ds: "
                                "ended, the run connects anew", host, PROBE_S)
                    self._forget(host, name)
                elif kept.retired and not kept.borrowers:
                    _end(kept)
        return loan

    def keep(self, loan: Loan, group: Path | None) -> None:
        """After a run that ended on its own, before its processes are killed: move the
        masters it opened into the pool (each with what carries its connection into a
        cgroup of its own, out of the run's ``group``), one per destination of the host;
        the others end with the run."""
        if self.groups is None or group is None:
            return
        for path in _sockets(loan.run_dir):
            lent = loan.lent.get(path.name)
            if lent is not None and _same_file(path, lent.path):
                continue  # not the run's own: a lent master's link
            pid = _master_pid(path)
            # The run's own master: in its group, and the ssh that bound this socket.
            if pid is None or pid not in cgroups.pids(group) or not _is_master(pid, path):
                continue
            with self._lock:
                if loan.generation != self._generation:
                    return
                old = self._kept.get((loan.host, path.name))
                if old is not None and _alive(old.path):
                    continue
                if old is not None:  # ended under the run, which made this one instead
                    self._forget(loan.host, path.name)
                self._serial += 1
                kept = _Kept(self.pool / str(self._serial), pid,
                             self.groups / f"{self.pool.name}.{self._serial}",
                             answered_at=time.monotonic())  # it carried the run just now
                try:
                    kept.group.mkdir()
                    _move(pid, group, kept.group)
                    os.link(path, kept.path)
                except OSError as e:
                    log.warning("an SSH master to %s is not kept: %s", loan.host, e)
                    _ssh_control(path, "exit")
                    with contextlib.suppress(OSError):
                        cgroups.remove(kept.group)
                    continue
                with contextlib.suppress(OSError):
                    path.unlink()  # the run's dir goes with the masters left in it
                self._kept[(loan.host, path.name)] = kept
                log.debug("SSH master %d to %s kept", pid, loan.host)

    def give_back(self, loan: Loan, failed: bool) -> None:
        """After a run, its processes killed: its lent masters are idle from now unless
        another run uses them; a retired one with no borrower left ends.  A run that
        ``failed`` retires what it was lent: a connection that stalled (a firewall that
        drops idle flows) fails every run lent it, where a new one may well work.  The
        run's ControlPath dir goes, with any master of the run that was not kept."""
        now = time.monotonic()
        with self._lock:
            for name, kept in loan.lent.items():
                with contextlib.suppress(OSError):
                    (loan.run_dir / name).unlink(missing_ok=True)
                kept.borrowers -= 1
                kept.idle_since = now
                if failed and self._kept.get((loan.host, name)) is kept:
                    self._forget(loan.host, name)
                elif kept.retired and not kept.borrowers:
                    _end(kept)
        release(loan.run_dir)

    def processes(self) -> set[int]:
        """The kept masters' processes (retired ones still in use included): a sweep by
        the ``FEM_JOB_ID`` marker must spare them (a ``ProxyCommand`` carries the marker of
        the run that started it, and a later run may have the same ident)."""
        return {pid for group in self._own_groups() for pid in cgroups.pids(group)}

    def retire(self) -> None:
        """SIGHUP: no kept master is lent again, and none opened by a run that started
        before is kept; each ends now, or when its last borrower is done (a running task is
        not disturbed)."""
        with self._lock:
            self._generation += 1
            for host, name in list(self._kept):
                self._forget(host, name)

    def close(self) -> None:
        """The listener's end: every kept master ends, borrowed or not."""
        with self._lock:
            self._generation += 1
            for kept in self._kept.values():
                _end(kept)
            self._kept.clear()
            for group in self._own_groups():  # retired ones still lent
                cgroups.remove(group)
        shutil.rmtree(self.pool, ignore_errors=True)

    def _forget(self, host: str, name: str) -> None:
        """Take a master out of the pool: ended now if nobody uses it, else retired."""
        kept = self._kept.pop((host, name))
        kept.retired = True
        if not kept.borrowers:
            _end(kept)

    def _own_groups(self) -> list[Path]:
        if self.groups is None:
            return []
        prefix = f"{self.pool.name}."
        try:
            return [g for g in self.groups.iterdir() if g.name.startswith(prefix)]
        except OSError:
            return []


@contextlib.contextmanager
def scratch_control_dir(prefix: str) -> Iterator[Path]:
    """A ControlPath dir of one command's own (doctor's host checks), in a temp dir short
    enough for ssh's socket names; its masters are ended and it is removed at the end."""
    root = temp_root(len(f"/{prefix}12345678/ssh"), CONTROL_DIR_MAX)
    with tempfile.TemporaryDirectory(prefix=prefix, dir=root) as tmp:
        path = Path(tmp) / "ssh"
        try:
            yield path
        finally:
            release(path)


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


def _answers(path: Path) -> bool:
    """Whether a session through the master at ``path`` runs ``true`` on the host within
    :data:`PROBE_S` (never another connection: without the master, the proxy is ``false``)."""
    try:
        done = subprocess.run(
            ["ssh", "-o", f"ControlPath={path}", "-o", "ControlMaster=no", "-o",
             "ProxyCommand=false", "-o", "BatchMode=yes", "-T", "master", "true"],
            capture_output=True, timeout=PROBE_S, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


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


def _move(pid: int, run_group: Path, group: Path) -> None:
    """Move the master ``pid`` into ``group`` with what carries its connection (a
    ``ProxyCommand``: the processes of the run's group holding a pipe the master holds, and
    whatever they start later, in ``group`` too)."""
    pipes = _pipes(pid)
    cgroups.join(group, pid)
    for other in cgroups.pids(run_group):
        if pipes & _pipes(other):
            with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
                cgroups.join(group, other)


def _end(kept: _Kept) -> None:
    """End a kept master (asked through its socket, so that the host sees a clean end),
    then what is left in its group, and unlink it."""
    _ssh_control(kept.path, "exit")
    with contextlib.suppress(OSError):
        cgroups.remove(kept.group)
    with contextlib.suppress(OSError):
        kept.path.unlink(missing_ok=True)


def _is_master(pid: int, origin: Path) -> bool:
    """Whether ``pid`` is the SSH master that bound the socket ``origin``: ssh's title for
    it is ``ssh: <ControlPath> [mux]``."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().rstrip(b"\0") == f"ssh: {origin} [mux]".encode()
    except OSError:
        return False
