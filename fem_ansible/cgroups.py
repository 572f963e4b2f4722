"""A cgroup (v2) per playbook run: every process of the run is in it, and stopping the run
kills the group, whatever those processes did to their environment, session or parent.

Why: the environment marker (``FEM_JOB_ID``, fem_ansible.runner) finds only processes
that were exec'd with the run's environment; a run forked from the resident Ansible
(fem_ansible.resident) keeps the server's environment in ``/proc/<pid>/environ``, and a
process may clear its own.  A cgroup is inherited by every fork and exec and cannot be left
without write access to another group.

The groups are ``<the listener's own cgroup>/fem-runs/<ident>``: under systemd that is the
unit's delegated subtree (``Delegate=yes``, contrib/fem-ansible.service); run as root
elsewhere, the listener's own group.  No controller is enabled: a group only holds and kills.
Where no cgroup v2 is writable (cgroup v1 only, a unit without delegation), :func:`base`
says why once, and runs are found by their marker alone, as before.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import signal
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

#: The environment variable through which a run's first process learns its group
#: (fem_ansible.resident_client joins it before anything else runs).
ENV = "FEM_RUN_CGROUP"
_SUBTREE = "fem-runs"
_KEPT = "fem-ssh"
# base() is first called by whichever thread needs a group first: at a restart, the
# recoveries of several tasks at once.  Two probes of one process at the same time removed
# each other's directory, and the loser's "File exists" turned groups (and the resident
# Ansible) off for the listener's life.
_probing = threading.Lock()


def mount() -> Path | None:
    """Where the cgroup v2 hierarchy is mounted (``/sys/fs/cgroup``, or ``.../unified`` on
    a hybrid layout)."""
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            before, _, after = line.partition(" - ")
            if after.split(" ", 1)[0] == "cgroup2":
                return Path(before.split(" ")[4])
    return None


def _own() -> str | None:
    """This process's cgroup v2 path (the ``0::`` line of /proc/self/cgroup)."""
    with open("/proc/self/cgroup", encoding="utf-8") as f:
        for line in f:
            if line.startswith("0::"):
                return line[3:].strip()
    return None


def base() -> Path | None:
    """The directory under which runs get their groups, made if needed; None (with one
    warning, the first time) where this process cannot make and fill groups there."""
    with _probing:
        return _base()


@functools.cache
def _base() -> Path | None:
    try:
        mount_point, own = mount(), _own()
        if mount_point is None or own is None:
            raise OSError(errno.ENOENT, "no cgroup v2 hierarchy is mounted")
        path = mount_point / own.lstrip("/") / _SUBTREE
        path.mkdir(exist_ok=True)
        _probe(path)
    except OSError as e:
        log.warning("runs get no cgroup of their own (%s): they are found by their "
                    "environment marker only, and the resident Ansible is off; under "
                    "systemd, give the unit Delegate=yes (contrib/fem-ansible.service)",
                    e.strerror or e)
        return None
    return path


def _probe(path: Path) -> None:
    """Raise if this process cannot make, fill and kill groups under ``path``."""
    probe = path / f".probe-{os.getpid()}"
    probe.mkdir(exist_ok=True)
    try:
        if not (probe / "cgroup.kill").exists():
            raise OSError(errno.ENOTSUP, "the kernel has no cgroup.kill (before 5.14)")
        if not os.access(probe / "cgroup.procs", os.W_OK):
            raise OSError(errno.EACCES, f"{probe}/cgroup.procs is not writable")
    finally:
        probe.rmdir()


def kept_base() -> Path | None:
    """``<the listener's own group>/fem-ssh``, beside ``fem-runs``, made if needed: where
    what outlives a run on purpose gets its groups (an SSH master kept for a host's next
    run, fem_ansible.ssh_masters); None where runs get no group."""
    root = base()
    if root is None:
        return None
    path = root.parent / _KEPT
    path.mkdir(exist_ok=True)
    return path


def create(ident: str) -> Path | None:
    """A new, empty group for the run ``ident`` (None where groups cannot be had)."""
    root = base()
    if root is None:
        return None
    path = root / ident
    with contextlib.suppress(FileExistsError):  # a recovered run's, emptied below
        path.mkdir()
        return path
    kill(path)
    return path


def join(path: Path, pid: int = 0) -> None:
    """Move ``pid`` (0: the calling process) into the group ``path``."""
    with open(path / "cgroup.procs", "w", encoding="ascii") as f:
        f.write(f"{pid}\n")


def pids(path: Path) -> list[int]:
    """The processes in the group (none if it is gone)."""
    try:
        with open(path / "cgroup.procs", encoding="ascii") as f:
            return [int(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def terminate(path: Path, grace_s: float) -> None:
    """SIGTERM every process of the group (Ansible stops its workers on SIGTERM), then
    :func:`kill` what is left after ``grace_s``."""
    for pid in pids(path):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while pids(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    kill(path)


def populated(path: Path) -> bool:
    """Whether a process of the group has not ended yet (one still exiting included: it is
    no longer in ``cgroup.procs``)."""
    try:
        with open(path / "cgroup.events", encoding="ascii") as f:
            return "populated 1" in f.read()
    except FileNotFoundError:
        return False


def kill(path: Path, deadline_s: float = 10.0) -> None:
    """SIGKILL every process of the group, those forked meanwhile included
    (``cgroup.kill``), and wait until every one has ended."""
    try:
        with open(path / "cgroup.kill", "w", encoding="ascii") as f:
            f.write("1\n")
    except FileNotFoundError:
        return
    deadline = time.monotonic() + deadline_s
    while populated(path) and time.monotonic() < deadline:
        time.sleep(0.01)


def remove(path: Path, attempts: int = 3) -> None:
    """Kill what is left in the group, and remove it.  A process that joined after a kill
    (a host the resident host forked for the run just then) is killed by the next one."""
    for attempt in range(attempts):
        kill(path)
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
            if attempt + 1 == attempts:
                log.warning("cgroup %s is not empty after %d kills; left in place: %s",
                            path, attempts, ", ".join(_describe(pid) for pid in pids(path))
                            or "its processes are still exiting")


def _describe(pid: int) -> str:
    """``<pid> <command> (<state>)``, for an operator to find what outlived a kill."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            before, _, after = f.read().rpartition(")")
        return f"{pid} {before.partition('(')[2]} ({after.split()[0]})"
    except OSError:
        return str(pid)


def of_task(name: str) -> list[Path]:
    """The groups of every run of the task whose object name is ``name`` (``<name>.<...>``,
    fem_ansible.naming: a name has no "."), a recovered listener's included."""
    root = base()
    if root is None:
        return []
    return [p for p in root.iterdir() if p.name.partition(".")[0] == name and p.is_dir()]
