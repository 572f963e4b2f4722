"""A real one-node Slurm cluster for the tests (Debian ``slurm-wlm`` and ``munge``).

The cluster is this machine: ``munged`` as the munge user, then ``slurmctld`` and ``slurmd``
as root, configured by ``/etc/slurm/slurm.conf`` (the path every Slurm client reads, as on a
real login node; the fem modules get no ``SLURM_CONF``).  :func:`start` writes that file only
when it is absent or one of ours (its first line is :data:`MARKER`), and reuses a cluster
that already answers; :func:`stop` stops only the daemons :func:`start` started.

Tests use :func:`acquire` and :func:`release`: several pytest processes (xdist workers) may
share the cluster, and the last one to release it stops it.

``python -m tests.support.slurm start|stop|status`` does the same from a shell.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STATE = REPO / ".fem-dev" / "slurm"
CONF = Path("/etc/slurm/slurm.conf")
MARKER = "# fem-ansible test cluster (tests/support/slurm.py)"
DAEMONS = ("slurmd", "slurmctld", "munged")  # stop order


class SlurmUnavailable(RuntimeError):
    """The machine lacks Slurm or munge (scripts/bootstrap.sh installs them)."""


def _run(*argv: str, timeout: float = 30, check: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=check)


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def config_text(host: str | None = None) -> str:
    """``slurm.conf`` for one node: this machine's CPUs, and its memory less 1 GiB for the
    system (``--mem`` is then checked against what the node really has)."""
    host = host or socket.gethostname()
    cpus = os.cpu_count() or 1
    memory = max(_memory_mb() - 1024, 512)
    return "\n".join([
        MARKER,
        "ClusterName=fem-test",
        f"SlurmctldHost={host}(127.0.0.1)",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"StateSaveLocation={STATE}/ctld",
        f"SlurmdSpoolDir={STATE}/d",
        f"SlurmctldPidFile={STATE}/slurmctld.pid",
        f"SlurmdPidFile={STATE}/slurmd.pid",
        f"SlurmctldLogFile={STATE}/slurmctld.log",
        f"SlurmdLogFile={STATE}/slurmd.log",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core_Memory",
        "SchedulerType=sched/backfill",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "MpiDefault=none",
        "ReturnToService=2",
        "SlurmctldTimeout=30",
        "SlurmdTimeout=30",
        "KillWait=30",
        "MinJobAge=300",
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} State=UNKNOWN",
        f"PartitionName=fem Nodes={host} Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


def available() -> bool:
    return all(shutil.which(b) for b in ("sbatch", "slurmctld", "slurmd", "munged", "mungekey"))


def responding() -> bool:
    """The controller answers and the node takes jobs."""
    if not shutil.which("sinfo"):
        return False
    try:
        out = _run("sinfo", "-h", "-N", "-o", "%T", timeout=10)
    except subprocess.TimeoutExpired:
        return False
    states = out.stdout.split()
    return out.returncode == 0 and any(s.rstrip("*") in ("idle", "mixed", "allocated")
                                       for s in states)


def _pid(name: str) -> int | None:
    path = Path("/run/munge/munged.pid") if name == "munged" else STATE / f"{name}.pid"
    with contextlib.suppress(OSError, ValueError):
        pid = int(path.read_text().split()[0])
        os.kill(pid, 0)
        return pid
    return None


def start(timeout: float = 60) -> bool:
    """Start the cluster unless one answers already.

    :returns: whether this call started it (and :func:`stop` should stop it).
    :raises SlurmUnavailable: when the packages are missing.
    """
    if not available():
        raise SlurmUnavailable("slurm-wlm and munge are not installed (scripts/bootstrap.sh)")
    if responding():
        return False
    if CONF.exists() and CONF.read_text().splitlines()[:1] != [MARKER]:
        raise SlurmUnavailable(f"{CONF} is not the test cluster's: not touching it")
    for sub in ("ctld", "d"):
        (STATE / sub).mkdir(parents=True, exist_ok=True)
    CONF.parent.mkdir(parents=True, exist_ok=True)
    CONF.write_text(config_text())
    # munge: key (made by the Debian package, else here) and a run dir of its own user.
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        _run("mungekey", "-c", "-k", str(key), check=True)
        shutil.chown(key, "munge", "munge")
    run_dir = Path("/run/munge")
    run_dir.mkdir(mode=0o755, exist_ok=True)
    shutil.chown(run_dir, "munge", "munge")
    started = []
    if _run("munge", "-n").returncode != 0:
        _run("runuser", "-u", "munge", "--", "munged", check=True)
        started.append("munged")
    if _pid("slurmctld") is None:
        _run("slurmctld", "-i", check=True)  # -i: ignore state left by an earlier cluster
        started.append("slurmctld")
    if _pid("slurmd") is None:
        _run("slurmd", check=True)
        started.append("slurmd")
    (STATE / "started").write_text("\n".join(started) + "\n")
    deadline = time.monotonic() + timeout
    while not responding():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the Slurm cluster did not come up:\n{status()}")
        time.sleep(0.5)
    return True


def stop() -> None:
    """Stop the daemons :func:`start` started (by their pid files); jobs go with slurmd."""
    mine = set((STATE / "started").read_text().split()) if (STATE / "started").exists() else set()
    for name in DAEMONS:
        pid = _pid(name) if name in mine else None
        if pid is None:
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.1)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    (STATE / "started").unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError):
        return stat.read_text().split(") ", 1)[1][0] != "Z"
    return False


def status() -> str:
    lines = [f"{name}: pid {_pid(name)}" for name in DAEMONS]
    with contextlib.suppress(Exception):
        lines.append(_run("sinfo", "-N", timeout=10).stdout + _run("squeue", timeout=10).stdout)
    for log in ("slurmctld.log", "slurmd.log"):
        path = STATE / log
        if path.exists():
            lines.append(f"--- {log}\n" + "\n".join(path.read_text().splitlines()[-15:]))
    return "\n".join(lines)


@contextlib.contextmanager
def _locked():
    STATE.mkdir(parents=True, exist_ok=True)
    with open(STATE / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _users() -> Path:
    users = STATE / "users"
    users.mkdir(parents=True, exist_ok=True)
    for entry in users.iterdir():  # users that died without releasing
        if not entry.name.isdigit() or not _alive(int(entry.name)):
            entry.unlink(missing_ok=True)
    return users


def acquire() -> None:
    """Start the cluster if needed and count this process as one of its users."""
    with _locked():
        start()
        (_users() / str(os.getpid())).touch()


def release() -> None:
    """This process is done with the cluster; the last user stops what :func:`start` started."""
    with _locked():
        users = _users()
        (users / str(os.getpid())).unlink(missing_ok=True)
        if not any(users.iterdir()):
            stop()


if __name__ == "__main__":
    action = sys.argv[1] if len(sys.argv) > 1 else "status"
    if action == "start":
        print("started" if start() else "already running")
    elif action == "stop":
        stop()
    else:
        print(status())
