"""One playbook run through ansible-runner: the only module that imports ``ansible_runner``.

A run is first laid out as a :class:`RunSpec` in its own private data dir (extra-vars as
``!unsafe`` YAML, secrets in a vault file), then executed by :func:`run_playbook`, which
hands ansible-runner's events to a :class:`~fem_ansible.verdict.PlayWatcher` (the stage the
play is in, what roles reported with ``set_stats``) and ends with Ansible's own verdict on
the run (docs/roles.md).

ansible-runner's own cancel and timeout leave orphans (ansible-core's workers call
``setsid()``), so every process of a run is in the run's own cgroup (fem_ansible.cgroups)
and carries ``FEM_JOB_ID`` in its environment, and is killed with its group (or, where
there are no cgroups, found by that marker) when a run is stopped.  Where a resident
Ansible serves the run's environment (fem_ansible.resident), the run is forked from it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import logging
import os
import shlex
import shutil
import signal
import stat
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ansible_runner
import pexpect

from . import cgroups, diskspace, fastpath, ssh_masters, unsafe, vault
from .errors import ConfigError
from .fastpath import data_dir, derived_cache
from .resident import Servers, client_command
from .resident_client import LOST_RC
from .ssh_masters import KeptMasters, Loan
from .stages import Stage
from .verdict import Failure, PlayWatcher

log = logging.getLogger(__name__)


# Collections the built-in roles call, besides ansible.builtin and fem.core (in collections/).
ROLE_COLLECTIONS = ("community.docker", "containers.podman")


class RunnerSpawn(pexpect.spawn):
    """pexpect's child without pexpect's two fixed delays, where nothing is waited for.

    Why: every run answers the vault prompt and is closed through this, on the task's path
    from its message to its terminal event (bench/RESULTS.md, bench/runner_close.py):

    - ``send()`` sleeps ``delaybeforesend`` (0.05 s) first, so that a password does not
      arrive before the program has turned its terminal's echo off and flushed its input.
      ansible-runner answers only a prompt it has read, and Python's ``getpass`` (what
      Ansible's vault prompt is) flushes and turns echo off before it writes the prompt:
      the answer cannot come too early, so it is sent at once.
    - ansible-runner closes its child only once ``isalive()`` has seen it end and reaped
      it, yet ptyprocess's ``close()`` still sleeps ``delayafterclose`` (0.1 s) "to give
      the kernel time to update process status" before asking again.  A child not yet
      reaped is closed as pexpect closes it, wait and signals included.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.delaybeforesend = None

    def close(self, force: bool = True) -> None:
        if self.terminated and hasattr(self.ptyproc, "delayafterclose"):
            self.ptyproc.delayafterclose = 0
        super().close(force=force)


# ansible-runner spawns its child as ``pexpect.spawn(...)``, looked up when a run starts.
pexpect.spawn = RunnerSpawn  # type: ignore[misc]


def collection_dirs(extra: tuple[str, ...] = ()) -> dict[str, Path]:
    """Where each collection runs may use is installed, by ``namespace.name``: fem.core in
    this package's data, the others among the Python packages (the ``ansible`` package
    ships ~90); one that is not installed is a :class:`ConfigError`."""
    dirs = {"fem.core": data_dir() / "collections" / "ansible_collections" / "fem" / "core"}
    for name in sorted({*ROLE_COLLECTIONS, *extra} - set(dirs)):
        try:
            spec = importlib.util.find_spec(f"ansible_collections.{name}")
        except ModuleNotFoundError:  # its namespace is not installed either
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(f"execution.collections: collection {name} is not installed "
                              f"beside {sys.executable}")
        dirs[name] = Path(next(iter(spec.submodule_search_locations)))
    return dirs


@functools.lru_cache(maxsize=8)
def collections_view(work_dir: Path, extra: tuple[str, ...] = ()) -> Path:
    """A directory under ``work_dir`` whose ``ansible_collections`` holds only the collections
    runs may use (fem.core, :data:`ROLE_COLLECTIONS` and ``execution.collections``), as
    symlinks; runs get it as their only collection path.

    Why: with every installed collection on the path, Ansible and Mitogen list all of them
    (~90 from the ``ansible`` package) again in every worker, which cost ~0.15 s per
    collection module call, a second per task (bench/RESULTS.md).  Built once per process;
    the name is a hash of what it links to, so an upgrade or a config change makes a new one
    and a directory another process is using is never changed.  The temp dir of a process
    killed while making one is removed.
    """
    links = collection_dirs(extra)
    digest = hashlib.sha256(repr(sorted(links.items())).encode()).hexdigest()[:12]
    work_dir = work_dir.resolve()  # runs start in the playbook's dir: never a relative path
    view = work_dir / f"collections-{digest}"
    remove_stale(work_dir, ".collections-*")
    if not view.is_dir():
        work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = Path(tempfile.mkdtemp(prefix=".collections-", dir=work_dir))
        try:
            for name, target in links.items():
                namespace, collection = name.split(".")
                (tmp / "ansible_collections" / namespace).mkdir(parents=True, exist_ok=True)
                (tmp / "ansible_collections" / namespace / collection).symlink_to(target)
            tmp.chmod(0o755)  # links to installed code only, readable whoever made it
            tmp.rename(view)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not view.is_dir():  # not "another process made it first"
                raise
    if not os.access(view / "ansible_collections", os.R_OK | os.X_OK):
        raise ConfigError(f"execution.work_dir: {view} is not readable by this user; "
                          "remove it, the listener makes it again")
    return view


@dataclass(frozen=True)
class RunSpec:
    """Everything one ansible-runner invocation needs, decided before it starts.

    Attributes:
        private_data_dir: this task's run dir on the listener's host (mode 0700).
        ident: the run's name inside ``artifacts/``; also the process marker.
        playbook: absolute path of the playbook.
        inventory: absolute path of the inventory file or directory.
        limit: the one inventory host the run may touch.
        roles_path: site roles first, then the built-in ones.
        extravars: the contract's variables (docs/roles.md), written ``!unsafe``.
        secrets: ``fem_secrets``, written to a vault file.
        tags / skip_tags: which stages to run (recovery, cleanup-only runs).
        timeout_s: hard limit for the whole playbook; a safety net above the executor's own.
        env: more environment for Ansible (the SSH settings, fem_ansible.targets.ssh_env).
        strategy: ``execution.strategy``: ``mitogen`` or ``linear``.
        collections: the run's only collection path (:func:`collections_view`).
        scan_cache: where what Ansible and Mitogen derive from installed files is kept
            between runs (:func:`scan_cache_dir`).
        ssh_masters: the listener's kept SSH masters (lent to the run, and keeping the
            ones it opens); None: the run's masters end with it.
        ssh_control_dir: the run's own SSH ControlPath dir, removed after the run, with the
            masters the run opened that were not kept (docs/hosts.md).
        resident: the listener's resident Ansible servers; None: every run starts cold.
        rerun_if_lost: the run may be run again whole if its resident Ansible dies during
            it (the stop and cleanup runs: they only stop and remove).
    """

    private_data_dir: Path
    ident: str
    playbook: Path
    inventory: Path
    limit: str
    roles_path: list[str]
    collections: Path
    scan_cache: Path
    extravars: dict[str, Any]
    secrets: dict[str, Any]
    tags: list[str] = field(default_factory=list)
    skip_tags: list[str] = field(default_factory=list)
    timeout_s: int | None = None
    env: dict[str, str] = field(default_factory=dict)
    strategy: str = "linear"
    ssh_control_dir: Path | None = None
    ssh_masters: KeptMasters | None = None
    resident: Servers | None = None
    rerun_if_lost: bool = False


class ServerLost(Exception):
    """The resident Ansible serving a run died during it: the run was killed with its
    cgroup, and its task is left to recovery as after a ``kill -9`` of the listener."""


@dataclass(frozen=True)
class RunResult:
    """What a playbook run came to.

    Attributes:
        status: ansible-runner's (``successful``, ``failed``, ``timeout``, ``canceled``).
        rc: ansible-playbook's exit code.
        failure: None when Ansible says the run succeeded, else why it failed
            (:mod:`fem_ansible.verdict`).
    """

    status: str
    rc: int
    failure: Failure | None


class RunHooks:
    """Callbacks a run calls from ansible-runner's thread; all optional."""

    def on_stage(self, stage: Stage) -> None:
        """The play entered a stage: a marker (docs/roles.md, "Stages") named it."""

    def on_report(self, data: dict[str, Any]) -> None:
        """A role reported with ``set_stats``."""


def collections_env(collections: Path) -> dict[str, str]:
    """Ansible's environment for seeing only the collections of ``collections`` (a
    :func:`collections_view`): every Ansible process the listener starts, runs and the
    inventory read alike."""
    return {"ANSIBLE_COLLECTIONS_PATH": str(collections),
            "ANSIBLE_COLLECTIONS_SCAN_SYS_PATH": "False"}


def scan_cache_dir(work_dir: Path) -> Path:
    """``<work_dir>/import-scan-cache``, made (or set back to) mode 0700: where runs keep
    what Ansible and Mitogen derive from installed files to find imports and plugins (the
    collections' routing metadata; Mitogen's import scans), between runs
    (fem.core's ``plugin_utils.derived_cache`` says why, and uses the directory only if it
    is private).  Temp files of runs killed while writing one are removed."""
    path = work_dir.resolve() / "import-scan-cache"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        # A symbolic link, or another user's: never changed, and runs do not use it.
        log.warning("%s is not a directory of this user's: runs will not keep Ansible's "
                    "routing metadata and Mitogen's import scans (slower, not different); "
                    "remove it and the listener makes it again", path)
        return path
    path.chmod(0o700)  # ours, whatever its mode was
    remove_stale(path, ".*.tmp")
    return path


def remove_stale(directory: Path, pattern: str) -> None:
    """Remove the temp files or dirs matching ``pattern`` in ``directory`` that a process
    killed while making one left: those older than ten minutes (making one takes
    milliseconds, so a process still at it is never disturbed)."""
    stale = time.time() - 600
    for tmp in directory.glob(pattern):
        with contextlib.suppress(OSError):
            st = tmp.lstat()
            if st.st_mtime >= stale:
                continue
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(tmp)
            else:
                tmp.unlink()


def playbook_command(*args: str) -> list[str]:
    """The command line of fem-ansible's ``ansible-playbook`` with ``args``
    (fem_ansible.playbook_cli says why not the installed one); ``-P`` keeps its working
    directory off its import path."""
    return [sys.executable, "-P", "-m", "fem_ansible.playbook_cli", *args]


def ansible_env(ident: str, strategy: str, collections: Path,
                scan_cache: Path | None = None) -> dict[str, str]:
    """The environment of every Ansible process the listener starts; ``strategy``
    ``mitogen`` is fem.core's ``mitogen_linear`` over the installed Mitogen, or Mitogen's
    own ``mitogen_linear`` or ``linear`` if fem-ansible's start-up check found what it
    patches changed (:func:`fem_ansible.fastpath.mitogen_env`); runs keep what
    they derive from installed files in ``scan_cache`` (a :func:`scan_cache_dir`; None: for
    the run only); ``collections`` (a :func:`collections_view`) is the only collection
    path."""
    venv_bin = str(Path(sys.executable).parent)
    env = {
        "PATH": f"{venv_bin}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        "FEM_JOB_ID": ident,
        **collections_env(collections),
        "ANSIBLE_RETRY_FILES_ENABLED": "False",
        "ANSIBLE_LOCALHOST_WARNING": "False",
        "ANSIBLE_INVENTORY_UNPARSED_WARNING": "False",
        "ANSIBLE_DEPRECATION_WARNINGS": "False",
        "ANSIBLE_NOCOLOR": "True",
        "ANSIBLE_PIPELINING": "True",
        "ANSIBLE_GATHERING": "explicit",
        "ANSIBLE_FORCE_VALID_GROUP_NAMES": "ignore",
    }
    if python_path := _python_path():
        env["PYTHONPATH"] = python_path
    if strategy == "mitogen":
        env.update(fastpath.mitogen_env())
    if scan_cache is not None:
        env[derived_cache.CACHE_ENV] = str(scan_cache)
    return env


# What a run takes from the listener's environment besides its own variables (ansible_env):
# locale and time zone, who and where it is, and how to reach the engines, the agent and
# Slurm. Anything else there (a service manager's or an operator's secrets) stays out of
# the run, whose processes would see it and whose artifacts (artifacts/<ident>/command)
# would keep it.
PASSED_ENV = frozenset({
    "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "LC_MESSAGES", "TZ",
    "TMPDIR", "DOCKER_HOST", "DOCKER_TLS_VERIFY", "DOCKER_CERT_PATH", "DOCKER_CONFIG",
    "CONTAINER_HOST", "CONTAINER_CONNECTION", "XDG_RUNTIME_DIR", "SSH_AUTH_SOCK",
    "SLURM_CONF", "KRB5CCNAME",
    # bench/profile.py's --without: a patch group of the fast path left out, to measure it
    fastpath.patches.OFF_ENV,
})


def _python_path() -> str:
    """The listener's ``PYTHONPATH``, absolute entries only, for the Ansible processes it
    starts: a run's ``ansible-playbook`` is ``python -m fem_ansible.playbook_cli`` and must
    import the listener's own fem_ansible.  An empty or relative entry would put a process's
    working directory (a task's checkout, say) on its import path, ahead of the standard
    library."""
    entries = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    return os.pathsep.join(e for e in entries if os.path.isabs(e))


def passed_env() -> dict[str, str]:
    """What of the listener's environment any Ansible process it starts sees (PASSED_ENV):
    runs, the inventory read and doctor's probe alike."""
    return {key: value for key, value in os.environ.items() if key in PASSED_ENV}


def confine_env(env: dict[str, str], own: dict[str, str]) -> dict[str, str]:
    """``env`` (ansible-runner's: the listener's whole environment, the run's ``own``
    variables and ansible-runner's) without the listener's variables not in PASSED_ENV."""
    return {key: value for key, value in env.items()
            if key in own or key in PASSED_ENV or os.environ.get(key) != value}


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


def _init_runner(spec: RunSpec, group: Path | None, command: list[str],
                 **kwargs: Any) -> ansible_runner.Runner:
    """ansible-runner's runner for ``spec`` with ``command``, not started, its environment
    confined (PASSED_ENV): ansible_runner.run is init_runner + run(), and the environment,
    which ansible-runner starts from the listener's, is confined between the two."""
    settings: dict[str, Any] = {"pexpect_timeout": 1, "suppress_ansible_output": True}
    if spec.timeout_s:
        settings["job_timeout"] = spec.timeout_s
    envvars = {**ansible_env(spec.ident, spec.strategy, spec.collections, spec.scan_cache),
               **spec.env}
    if group is not None:
        envvars[cgroups.ENV] = str(group)
    workdir = spec.private_data_dir / "project"
    runner = ansible_runner.interface.init_runner(
        private_data_dir=str(spec.private_data_dir),
        ident=spec.ident,
        project_dir=str(workdir),
        # fem-ansible's ansible-playbook; the playbook is then an argument like the others.
        binary=command[0],
        inventory=str(spec.inventory),
        limit=spec.limit,
        roles_path=spec.roles_path,
        envvars=envvars,
        cmdline=shlex.join(command[1:]),
        settings=settings,
        quiet=True,
        suppress_env_files=True,
        rotate_artifacts=0,
        **kwargs,
    )
    runner.config.env = confine_env(runner.config.env, envvars)
    return runner


def prestart(spec: RunSpec) -> None:
    """Start the resident Ansible that runs like ``spec`` will use, now (at the listener's
    start: its first task is then forked too); nothing is run."""
    if spec.resident is None or cgroups.base() is None:
        return
    spec.private_data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        runner = _init_runner(spec, cgroups.base() / spec.ident,
                              playbook_command(str(spec.playbook)))
        spec.resident.command(runner.config.env, [])
    finally:
        shutil.rmtree(spec.private_data_dir, ignore_errors=True)


def run_playbook(spec: RunSpec, hooks: RunHooks, should_stop: Callable[[], bool]) -> RunResult:
    """Run ``spec`` to the end; once ``should_stop()`` is true the run is stopped, with every
    process it started.  A run that may simply be run again (``spec.rerun_if_lost``: stop,
    cleanup) is, once, if the resident Ansible serving it died during it; any other such run
    raises :class:`ServerLost` (its task is recovered).
    """
    try:
        return _run_once(spec, hooks, should_stop)
    except ServerLost as e:
        if not spec.rerun_if_lost:
            raise
        log.warning("%s; run again", e)
        return _run_once(spec, hooks, should_stop)


def _run_once(spec: RunSpec, hooks: RunHooks, should_stop: Callable[[], bool]) -> RunResult:
    """One try of :func:`run_playbook`.

    A fresh ``env/`` is written for every run: ansible-runner never overwrites files already
    in ``env/`` and would reuse stale values.
    """
    pdd = spec.private_data_dir
    env_dir = pdd / "env"
    env_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    for stale in env_dir.iterdir():
        stale.unlink()
    _write_private(env_dir / "extravars", unsafe.dump(spec.extravars))
    # Ansible starts in an empty dir of the run's, not in the playbook's: Mitogen's
    # interpreter on the listener's host imports from its working dir first (before the
    # stdlib), so a site playbook's dir holding e.g. profile.py would stop every task
    # (docs/decisions.md, "Ansible's working directory").
    workdir = pdd / "project"
    workdir.mkdir(exist_ok=True, mode=0o700)
    password = vault.new_password()
    secrets_file = env_dir / "secrets.yml"
    vault.write_vars_file(secrets_file, {"fem_secrets": spec.secrets}, password)

    watcher = PlayWatcher(hooks)

    def on_event(event: dict[str, Any]) -> bool:
        watcher.event(event)
        return True

    def kept() -> set[int]:
        return spec.ssh_masters.processes() if spec.ssh_masters is not None else set()

    def on_cancel() -> bool:
        if should_stop():
            terminate_processes(spec.ident, spare=kept())
            return True
        return False

    command = playbook_command("--vault-id", f"{vault.VAULT_ID}@prompt",
                               "-e", f"@{secrets_file}", str(spec.playbook))
    started = time.monotonic()
    group = cgroups.create(spec.ident)
    full: OSError | None = None
    loan: Loan | None = None
    ended = False
    try:
        if spec.ssh_control_dir is not None:
            spec.ssh_control_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            if spec.ssh_masters is not None:
                loan = spec.ssh_masters.lend(spec.ssh_control_dir, spec.limit)
        runner = _init_runner(
            spec, group, command,
            passwords={vault.PROMPT: password},
            tags=",".join(spec.tags) or None,
            skip_tags=",".join(spec.skip_tags) or None,
            event_handler=on_event,
            cancel_callback=on_cancel,
        )
        server = None
        if group is not None:
            # The run's first process is the client (resident_client.py), now that the
            # run's environment is final: it joins the group, then is forked from a resident
            # Ansible or becomes the cold command.
            cold = runner.config.command
            if spec.resident is not None:
                runner.config.command, server = spec.resident.command(runner.config.env, cold)
            else:
                runner.config.command = [*client_command(None), *cold]
        runner.run()
        ended = True
    except OSError as e:
        # ansible-runner could not write the run's output to its artifacts: the file
        # system is full (a task filled it, or something else did).  The run is over.
        if not diskspace.is_full(e):
            raise
        full = e
    finally:
        # Whatever ended the run, nothing of it may outlive it, but the SSH masters a run
        # that ended on its own opened: they are kept for the host's next run.
        # A run that failed or timed out may have met a stalled connection.
        healthy = ended and runner.status not in ("failed", "timeout")
        if loan is not None and healthy and not should_stop():
            spec.ssh_masters.keep(loan, group)
        kill_processes(spec.ident, spare=kept())
        if group is not None:
            cgroups.remove(group)
        if loan is not None:
            spec.ssh_masters.give_back(loan, failed=not healthy)
        elif spec.ssh_control_dir is not None:
            ssh_masters.release(spec.ssh_control_dir)
    log.debug("playbook %s %s rc=%s in %.1fs", spec.ident, runner.status, runner.rc,
              time.monotonic() - started)
    rc = runner.rc or 0
    if rc == LOST_RC and server is not None and server.died():
        raise ServerLost(f"the resident Ansible serving run {spec.ident} died during it")
    if full is not None:
        return RunResult("failed", rc, watcher.node_fault(
            "disk_full", f"the run's output could not be written ({full.strerror}): "
            f"{diskspace.describe(pdd)}"))
    return RunResult(runner.status, rc, watcher.verdict(runner.status, rc))


# How a run's processes are marked (ansible_env).
_MARKER = b"FEM_JOB_ID="


def _marked_pids(matches: Callable[[str], bool],
                 spare: set[int] | frozenset[int] = frozenset()) -> list[int]:
    """Processes whose ``FEM_JOB_ID`` ``matches``, but those in ``spare``."""
    pids = []
    skip = {os.getpid(), *spare}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) in skip:
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        if any(v.startswith(_MARKER) and matches(v[len(_MARKER):].decode(errors="replace"))
               for v in environ):
            pids.append(int(entry.name))
    return pids


def terminate_processes(ident: str, grace_s: float = 3.0,
                        spare: set[int] | frozenset[int] = frozenset()) -> None:
    """SIGTERM every process of the run ``ident`` (ansible cleans up its workers on
    SIGTERM), then SIGKILL what is left after ``grace_s``; never those in ``spare``
    (:func:`kill_processes`)."""
    root = cgroups.base()
    if root is not None and (root / ident).is_dir():
        cgroups.terminate(root / ident, grace_s)
    for pid in _marked_pids(ident.__eq__, spare):
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while _marked_pids(ident.__eq__, spare) and time.monotonic() < deadline:
        time.sleep(0.1)
    kill_processes(ident, spare)


def kill_processes(ident: str, spare: set[int] | frozenset[int] = frozenset()) -> None:
    """SIGKILL every process of the run ``ident`` (its cgroup, and exactly that marker) but
    those in ``spare``: the kept SSH masters' (fem_ansible.ssh_masters), moved out of a
    run's cgroup on purpose, whose ``ProxyCommand`` carries that run's marker."""
    root = cgroups.base()
    if root is not None:
        cgroups.kill(root / ident)
    for pid in _marked_pids(ident.__eq__, spare):
        _signal(pid, signal.SIGKILL)


def kill_task_processes(name: str, spare: set[int] | frozenset[int] = frozenset()) -> None:
    """SIGKILL every process of every run of the task whose object name is ``name``: those
    whose marker is ``<name>.<anything>`` (a name has no ".", naming.NAME_PATTERN), never
    another task's whose name merely starts like it, nor one in ``spare``
    (:func:`kill_processes`); and their cgroups."""
    for group in cgroups.of_task(name):
        cgroups.remove(group)
    for pid in _marked_pids(lambda marker: marker.partition(".")[0] == name, spare):
        _signal(pid, signal.SIGKILL)


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)
