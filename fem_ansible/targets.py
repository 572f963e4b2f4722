"""Where a task runs: the inventory's hosts and groups, one host picked per task.

A task names a host or a group of ``execution.inventory`` (``target``, default
``execution.target``).  The inventory is read once, with ``ansible-inventory --list`` (so
every inventory source Ansible knows works: YAML, INI, directories, plugins), and kept until
SIGHUP makes the listener read it again (:meth:`Targets.reload_inventory`).

For a group the listener picks one host per task: the one running the fewest of *this
listener's* tasks, ties going to the host picked least recently (so a batch spreads over the
group whatever the timing).  A host that turns out unreachable is skipped for the next
:data:`SKIP_UNREACHABLE_S` seconds, and the task that found it so is retried on another host
of the group before it fails (:meth:`Targets.retry_host`).

:func:`check_host` is the host check ``fem-ansible doctor`` runs on every inventory host.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from .config import Config
from .errors import ConfigError, PolicyViolation
from .sockdir import socket_dir

log = logging.getLogger(__name__)

# How long a host found unreachable is passed over when picking hosts for new tasks.
SKIP_UNREACHABLE_S = 60.0
# ansible-inventory on a large dynamic inventory may take a while; it runs once.
INVENTORY_TIMEOUT_S = 120


def inventory_path(config: Config) -> Path:
    """``execution.inventory`` (a relative path is the listener's: Ansible runs elsewhere,
    runner.run_playbook), else the built-in ``inventory/localhost.yml``."""
    from .runner import data_dir

    if config.execution.inventory:
        return Path(config.execution.inventory).absolute()
    return data_dir() / "inventory" / "localhost.yml"


def ansible_bin(name: str) -> str:
    """A tool of the Ansible installed beside this Python (the venv's ``bin``)."""
    return str(Path(sys.executable).parent / name)


@dataclass(frozen=True)
class Inventory:
    """The inventory as ``ansible-inventory --list`` sees it.

    Attributes:
        groups: every group name to the hosts in it (through child groups too), sorted.
        hostvars: each host's variables, group variables merged in, not templated.
    """

    groups: dict[str, list[str]]
    hostvars: dict[str, dict[str, Any]]

    @classmethod
    def load(cls, path: Path, collections: Path) -> Inventory:
        """Read the inventory at ``path`` with the collections runs see (``collections``, a
        :func:`fem_ansible.runner.collections_view`): an inventory plugin of another
        collection fails here, at start, not in every run.

        :raises ConfigError: when ansible-inventory cannot read it.
        """
        from .runner import ansible_env, passed_env

        env = {**passed_env(), **ansible_env("fem-inventory", "linear", collections),
               "ANSIBLE_INVENTORY_UNPARSED_FAILED": "True"}
        try:
            done = subprocess.run(
                [ansible_bin("ansible-inventory"), "-i", str(path), "--list"],
                capture_output=True, text=True, timeout=INVENTORY_TIMEOUT_S, env=env,
                check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise ConfigError(f"execution.inventory: cannot run ansible-inventory: {e}") from None
        if done.returncode != 0:
            raise ConfigError(f"execution.inventory: ansible-inventory cannot read {path}: "
                              f"{done.stderr.strip()[-500:]}")
        return cls.from_list(json.loads(done.stdout))

    @classmethod
    def from_list(cls, data: dict[str, Any]) -> Inventory:
        """Build from the JSON of ``ansible-inventory --list``."""
        hostvars = dict((data.get("_meta") or {}).get("hostvars") or {})
        direct = {name: (body or {}) for name, body in data.items() if name != "_meta"}

        def members(group: str, seen: frozenset[str] = frozenset()) -> set[str]:
            body = direct.get(group) or {}
            hosts = set(body.get("hosts") or [])
            for child in body.get("children") or []:
                if child not in seen:
                    hosts |= members(child, seen | {group})
            return hosts

        groups = {name: sorted(members(name)) for name in direct}
        for hosts in groups.values():
            for host in hosts:
                hostvars.setdefault(host, {})
        return cls(groups=groups, hostvars=hostvars)

    def hosts_of(self, name: str) -> list[str]:
        """The hosts a target name stands for: a host itself, or the hosts of a group.

        A name that is both (Ansible forbids it in most sources) is taken as the host.
        """
        if name in self.hostvars:
            return [name]
        return list(self.groups.get(name, []))

    def work_dir(self, host: str, default: str) -> str:
        """The fem work dir on ``host``: its ``fem_work_dir`` variable (host or group var,
        an absolute path, never templated), else ``default`` (``execution.work_dir``)."""
        value = self.hostvars.get(host, {}).get("fem_work_dir")
        if value is None:
            return default
        if not isinstance(value, str) or not value.startswith("/") or "{" in value:
            raise ConfigError(f"inventory host {host}: fem_work_dir must be an absolute path "
                              f"without templates, got {value!r}")
        return str(PurePosixPath(value))


@dataclass
class _HostState:
    running: int = 0
    last_pick: float = 0.0
    unreachable_at: float | None = None


@dataclass
class Targets:
    """This listener's view of where tasks run; thread-safe (tasks run in a pool).

    :param config: the site config (inventory path, work dir).
    :param collections: the collections runs see (inventory plugins among them).
    """

    config: Config
    collections: Path
    _inventory: Inventory | None = None
    _hosts: dict[str, _HostState] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _load_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def inventory(self) -> Inventory:
        """The inventory, read on first use (intake of the first task, or doctor)."""
        with self._load_lock:
            if self._inventory is None:
                self._inventory = Inventory.load(inventory_path(self.config), self.collections)
            return self._inventory

    def reload_inventory(self) -> Inventory:
        """Read the inventory again (SIGHUP: a host added without a restart).  Tasks that
        already have a host keep it; a broken inventory leaves the one in use in place.

        :raises ConfigError: when ansible-inventory cannot read it.
        """
        fresh = Inventory.load(inventory_path(self.config), self.collections)
        with self._load_lock:
            self._inventory = fresh
        return fresh

    def check(self, task: dict[str, Any]) -> None:
        """At intake: the task's target must name hosts of the inventory.

        :raises PolicyViolation: rule ``execution.inventory``.
        """
        target = task["target"]
        if not self.inventory.hosts_of(target):
            raise PolicyViolation(
                "execution.inventory",
                f"target {target!r} is allowed but is neither a host nor a non-empty group "
                f"of the inventory", task_id=task["task_id"])

    def work_dir(self, host: str) -> str:
        return self.inventory.work_dir(host, self.config.execution.work_dir)

    def is_local(self, host: str) -> bool:
        """Whether ``host`` is reached over a local connection: the listener's own host."""
        return self.inventory.hostvars.get(host, {}).get("ansible_connection") == "local"

    def acquire(self, target: str, host: str | None = None,
                exclude: Iterable[str] = ()) -> str | None:
        """Take a slot on a host for one task and return the host.

        :param target: the task's host or group.
        :param host: the host the task already has (recovery): taken as it is.
        :param exclude: hosts this task already found unreachable.
        :returns: None when no host of the target is left to try.
        """
        with self._lock:
            if host is None:
                host = self._pick(target, set(exclude))
                if host is None:
                    return None
            state = self._hosts.setdefault(host, _HostState())
            state.running += 1
            state.last_pick = time.monotonic()
            return host

    def release(self, host: str, *, unreachable: bool = False) -> None:
        """A task let go of ``host``; ``unreachable`` says it could not reach the host (a
        task that reached it clears that)."""
        with self._lock:
            state = self._hosts.setdefault(host, _HostState())
            state.running = max(state.running - 1, 0)
            state.unreachable_at = time.monotonic() if unreachable else None

    def _pick(self, target: str, exclude: set[str]) -> str | None:
        candidates = [h for h in self.inventory.hosts_of(target) if h not in exclude]
        if not candidates:
            return None
        now = time.monotonic()

        def skipped(h: str) -> bool:
            at = self._hosts.get(h, _HostState()).unreachable_at
            return at is not None and now - at < SKIP_UNREACHABLE_S

        # Hosts lately unreachable come last, but are still tried when nothing else is left.
        reachable = [h for h in candidates if not skipped(h)] or candidates

        def load(h: str) -> tuple[int, float, str]:
            state = self._hosts.get(h, _HostState())
            return state.running, state.last_pick, h

        return min(reachable, key=load)

    def retry_host(self, task: dict[str, Any], host: str, unreachable: bool,
                   stages_done: list[str], tried: list[str]) -> str | None:
        """After a run on ``host``: the host to run the task on next, or None to finish.

        A task moves to another host of its target only when ``host`` was unreachable
        before any stage was done there (so nothing of the task is on it).  ``tried``
        collects the hosts found unreachable.  On a move the slot on ``host`` is released
        and one on the new host taken; otherwise the caller keeps (and releases) its slot.
        """
        if not unreachable or stages_done:
            return None
        tried.append(host)
        nxt = self.acquire(task["target"], exclude=tried)
        if nxt is not None:
            self.release(host, unreachable=True)
        return nxt


def ssh_env(config: Config, control_dir: Path | None = None) -> dict[str, str]:
    """Ansible's SSH settings for the listener's runs (docs/hosts.md).

    Multiplexed connections (``ControlPersist``) and pipelining, host key checking on unless
    the site turns it off, the key from ``execution.ssh.private_key_file`` (else the agent
    and ``~/.ssh``).  A host's own ``ansible_*`` variables in the inventory win over all of
    these, as with any Ansible run.

    :param control_dir: the run's own ControlPath dir (see :func:`control_dir`): every
        connection of the run, Mitogen's too, is multiplexed there under ssh's own name for
        it, ``%C`` (fem_ansible.ssh_masters lends kept masters under that name).  The path
        reaches ssh as ``${ANSIBLE_SSH_CONTROL_PATH_DIR}``, which ssh expands, so that
        ``ANSIBLE_SSH_ARGS`` is the same for every run (a resident Ansible serves runs whose
        environment is its own but for per-run variables, fem_ansible.resident_client).
    """
    ssh = config.execution.ssh
    # Keepalives bound how long a master whose host vanished without a reset lives (and
    # may be lent, fem_ansible.ssh_masters); Mitogen's own, given before these, win there.
    args = (f"-C -o ControlMaster=auto -o ControlPersist={ssh.control_persist_s}s"
            " -o ServerAliveInterval=15 -o ServerAliveCountMax=3")
    if control_dir is not None:
        args += " -o ControlPath=${ANSIBLE_SSH_CONTROL_PATH_DIR}/%C"
    if ssh.known_hosts_file:
        args += f" -o UserKnownHostsFile={ssh.known_hosts_file}"
    env = {
        "ANSIBLE_SSH_ARGS": args,
        "ANSIBLE_HOST_KEY_CHECKING": str(ssh.host_key_checking),
        "ANSIBLE_PIPELINING": "True",
    }
    if ssh.private_key_file:
        env["ANSIBLE_PRIVATE_KEY_FILE"] = ssh.private_key_file
    if control_dir is not None:
        env["ANSIBLE_SSH_CONTROL_PATH_DIR"] = str(control_dir)
    return env


#: The longest ControlPath dir: ssh appends "/" and 40 bytes of hash (%C), and a temporary
#: suffix of 17 while it makes the socket; a unix socket path has at most 107 bytes.
CONTROL_DIR_MAX = 49


def control_dir(config: Config, ident: str) -> Path:
    """A run's own SSH ControlPath dir, which the run's end removes with its masters:
    ``<work_dir>/ssh/<hash>`` or, when the work dir's path is too long for a socket path,
    ``<tmp>/fem-ssh-<uid>/<hash>`` (fem_ansible.sockdir)."""
    return socket_dir(config.work_dir, "ssh", ident, CONTROL_DIR_MAX)


# Run on the host by its own Python: what a task needs there, as one JSON line.
_HOST_PROBE = """\
import json, os, shutil, sys
p = {work_dir!r}
tasks = os.path.join(p, "tasks")
left = sorted(n for n in os.listdir(tasks) if n.startswith({prefix!r})) \
    if os.path.isdir(tasks) else []
while not os.path.exists(p):
    p = os.path.dirname(p)
print("FEM-HOST " + json.dumps({{
    "python": sys.version.split()[0], "free": shutil.disk_usage(p).free,
    "docker": os.path.exists("/var/run/docker.sock") or bool(shutil.which("docker")),
    "podman": bool(shutil.which("podman")), "left": left}}))
"""


def check_host(config: Config, host: str, inventory: Inventory, collections: Path,
               timeout_s: int = 60, control_dir: Path | None = None) -> dict[str, Any]:
    """Check one inventory host the way tasks reach it, for ``fem-ansible doctor``.

    One ad-hoc ``raw`` call over the host's own connection settings (the listener's SSH
    settings and the host's ``ansible_*`` variables, a connection plugin from
    ``collections`` too), running the host's ``ansible_python_interpreter`` (default
    ``/usr/bin/python3``).  ``inventory`` is the one read with ``collections`` (read once
    for all hosts: each read is a second of ``ansible-inventory``).  ``control_dir``: the SSH
    ControlPath dir, made here (the caller ends its masters, fem_ansible.ssh_masters); None:
    one of the check's own, its masters ended after it.

    :returns: ``{host, reachable, python, engines{docker, podman}, work_dir, free_bytes,
        left, message}``: ``reachable`` False (and the rest None) when Ansible could not
        connect; ``python`` None when the interpreter did not run; ``free_bytes`` is the
        free space of the host's fem work dir, or of its nearest existing parent; ``left``
        the run dirs of this node's tasks there (``tasks/fem-<node_id>-<task_id>``): a
        task's, or what a task that ended while the host was away left (issue 28).
    """
    import base64

    from .runner import ansible_env, passed_env

    if control_dir is None:
        # Never Ansible's default, ~/.ansible/cp, where a master outlives the check
        # (docs/decisions.md, "Doctor's SSH masters are its own").
        from .ssh_masters import scratch_control_dir

        with scratch_control_dir("fem-check-") as own:
            return check_host(config, host, inventory, collections, timeout_s, own)
    work_dir = inventory.work_dir(host, config.execution.work_dir)
    probe = base64.b64encode(_HOST_PROBE.format(
        work_dir=work_dir, prefix=f"fem-{config.node_id}-").encode()).decode()
    result: dict[str, Any] = {"host": host, "reachable": False, "python": None,
                              "engines": None, "work_dir": work_dir, "free_bytes": None,
                              "left": None, "message": ""}
    if control_dir is not None:
        control_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    # The probe is one `raw` call: Ansible's own strategy. Under fem.core.mitogen_linear an
    # ad-hoc `raw` to a host with `ansible_connection: local` went over SSH instead (as the
    # service user, whose shell is nologin, doctor then failed on a healthy host: issue 20).
    env = {**passed_env(), **ansible_env("fem-doctor", "linear", collections),
           **ssh_env(config, control_dir)}
    command = ("{{ ansible_python_interpreter | default('/usr/bin/python3') }} -c "
               f"'import base64; exec(base64.b64decode(\"{probe}\"))'")
    try:
        done = subprocess.run(
            [ansible_bin("ansible"), host, "-i", str(inventory_path(config)), "-o",
             "-m", "ansible.builtin.raw", "-a", command],
            capture_output=True, text=True, timeout=timeout_s, env=env, check=False)
    except subprocess.TimeoutExpired:
        result["message"] = f"no answer within {timeout_s}s"
        return result
    out = done.stdout.strip() or done.stderr.strip()
    if "UNREACHABLE" in out:
        result["message"] = out[-500:]
        return result
    result["reachable"] = True
    at = out.find("FEM-HOST ")
    if at < 0:
        result["message"] = f"python did not run: {out[-500:]}"
        return result
    facts, _ = json.JSONDecoder().raw_decode(out[at + len("FEM-HOST "):])
    result.update(python=facts["python"], free_bytes=facts["free"], left=facts["left"],
                  engines={"docker": facts["docker"], "podman": facts["podman"]},
                  message="ok")
    return result
