"""``fem-ansible doctor``: is this node ready to take tasks?  One line per check.

Each check says ✓ (fine), ! (works, but the sysadmin should know) or ✗ (tasks will fail) and,
for ✗ and !, what to do about it.  The checks look where a task will look, with the
listener's own settings: the broker through ``broker.url`` and its TLS material, the
container engine through the same environment the roles get (``DOCKER_HOST`` chooses the
Docker engine, as it does for the ``community.docker`` modules), inventory hosts through
Ansible itself (:func:`fem_ansible.targets.check_host`).  Nothing is created: the topology is
checked passively (the listener declares what is missing when ``broker.declare`` is true).

The clock is compared with the ``Date`` header of the registries and upload endpoints the
policy names literally: a task's ``not_after`` is judged by this clock, so a node whose clock
runs late accepts expired tasks, and one that runs early rejects good ones.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import pika
import pika.exceptions
import requests

from . import broker
from .config import Config
from .diskspace import below_floor
from .errors import ConfigError
from .policy import allowed
from .sizes import format_bytes

# A clock further off than this is an error: not_after is usually minutes, not seconds.
MAX_SKEW_S = 30.0
NET_TIMEOUT_S = 5.0
GLOB = set("*?[")
DEFAULT_PORTS = {"git": 9418, "ssh": 22, "https": 443, "http": 80}


@dataclass(frozen=True)
class Check:
    """One line of the report.

    Attributes:
        status: ``ok``, ``warn`` or ``fail``.
        name: what was checked (``broker``, ``engine docker``, ``host node7``…).
        detail: what was found.
        fix: what to do, for ``warn`` and ``fail``.
    """

    status: Literal["ok", "warn", "fail"]
    name: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        mark = {"ok": "✓", "warn": "!", "fail": "✗"}[self.status]
        tail = f" — {self.fix}" if self.fix and self.status != "ok" else ""
        return f"{mark} {self.name}: {self.detail}{tail}"


def ok(name: str, detail: str) -> Check:
    return Check("ok", name, detail)


def warn(name: str, detail: str, fix: str) -> Check:
    return Check("warn", name, detail, fix)


def fail(name: str, detail: str, fix: str) -> Check:
    return Check("fail", name, detail, fix)


class _Clock:
    """``Date`` headers met on the way, to compare the local clock with."""

    def __init__(self) -> None:
        self.references: list[tuple[str, float]] = []

    def saw(self, source: str, resp: requests.Response, sent_at: float) -> None:
        date = resp.headers.get("Date")
        if not date:
            return
        try:
            remote = parsedate_to_datetime(date).timestamp()
        except (TypeError, ValueError):
            return
        # The header is whole seconds, taken while the request was in flight.
        local = (sent_at + time.time()) / 2
        self.references.append((source, local - remote))


# -- the checks ----------------------------------------------------------------------------


def check_paths(config: Config) -> Iterator[Check]:
    work = config.work_dir
    parent = work
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        yield fail("work dir", f"{work} is not writable by this user",
                   f"create it for the service user: install -d -m 0700 -o fem {work}")
    else:
        yield ok("work dir", f"{work}" + ("" if work.exists() else " (created on first run)"))
    files = {
        "execution.inventory": config.execution.inventory,
        "execution.playbook": config.execution.playbook,
        "security.signature.key_file": config.security.signature.key_file,
        "broker.tls.ca_file": config.broker.tls.ca_file,
        "broker.tls.cert_file": config.broker.tls.cert_file,
        "broker.tls.key_file": config.broker.tls.key_file,
        "http.ca_file": config.http.ca_file,
    }
    for i, path in enumerate(config.security.signature.key_files):
        files[f"security.signature.key_files[{i}]"] = path
    for host, reg in config.registries.items():
        files[f"registries.{host}.password_file"] = reg.password_file
    for host, src in config.sources.items():
        files[f"sources.{host}.token_file"] = src.token_file
    for key, path in files.items():
        if path and not os.access(path, os.R_OK):
            yield fail("file", f"{key}: {path} is missing or not readable",
                       f"create it, readable by the service user, or correct {key}")
    for i, path in enumerate(config.execution.roles_path):
        if not Path(path).is_dir():
            yield fail("roles", f"execution.roles_path[{i}]: {path} is not a directory",
                       "create it or remove it from execution.roles_path")
    for name, ds in config.policy.datasets.items():
        if not Path(ds.path).is_dir():
            yield fail(f"dataset {name}", f"{ds.path} is not a directory",
                       f"mount the data there or correct policy.datasets.{name}.path")
        else:
            yield ok(f"dataset {name}", ds.path)


def check_ansible(config: Config) -> Iterator[Check]:
    from .runner import collection_dirs, data_dir

    data = data_dir()
    missing = [p for p in ("playbooks/task.yml", "roles/fem_execute", "inventory/localhost.yml",
                           "collections/ansible_collections/fem/core") if not (data / p).exists()]
    if missing:
        yield fail("ansible", f"built-in files missing under {data}: {', '.join(missing)}",
                   "reinstall fem-ansible (pip install --force-reinstall fem-ansible)")
        return
    bin_dir = Path(sys.executable).parent
    if not shutil.which("ansible-playbook", path=str(bin_dir)):
        yield fail("ansible", f"ansible-playbook not installed beside {sys.executable}",
                   "reinstall fem-ansible with its dependencies (pip install fem-ansible)")
        return
    try:
        collections = collection_dirs(tuple(config.execution.collections))
    except ConfigError as e:
        yield fail("ansible", f"collections: {e}", "install the collection (pip install "
                   "fem-ansible brings community.docker and containers.podman) or remove it "
                   "from execution.collections")
        return
    from ansible.release import __version__ as ansible_core

    yield ok("ansible", f"ansible-core {ansible_core}, built-in roles in {data}, "
             f"collections {', '.join(collections)}")


def check_runs(config: Config) -> Iterator[Check]:
    """Whether runs can have cgroups of their own (and so the resident Ansible).  Checked
    without making one: doctor runs in a shell's cgroup, not the service's; the listener
    says at start whether its own is writable."""
    from . import cgroups

    mount = cgroups.mount()
    release = tuple(int(p) for p in re.findall(r"\d+", os.uname().release)[:2])
    if mount is None or release < (5, 14):
        yield warn("runs", "no cgroup v2 with cgroup.kill here (kernel "
                   f"{os.uname().release}{'' if mount else ', no cgroup2 mount'}): a run is "
                   "found by its environment marker only, and every run starts Ansible cold",
                   "a kernel of 5.14 or later with the unified cgroup hierarchy")
        return
    resident = ("forked from a resident Ansible" if config.execution.resident_ansible
                else "started cold (execution.resident_ansible: false)")
    yield ok("runs", f"cgroup v2 at {mount}: each run in a cgroup of its own, {resident}; "
             "the service needs Delegate=yes (the listener warns at start if its cgroup is "
             "not writable)")


# The allow-lists a task's fields are checked against; `init` leaves them all empty.
_ALLOW_LISTS = {"images": "image", "sources": "source", "downloads": "inputs",
                "uploads": "outputs or logs upload"}


def check_policy(config: Config) -> Iterator[Check]:
    """A fresh config allows nothing: say so before the first task is REJECTED."""
    empty = [name for name in _ALLOW_LISTS
             if not getattr(config.policy, name).allow]
    if "images" in empty:
        yield warn("policy", "policy.images.allow is empty: every task will be REJECTED"
                   + (f" (also empty: {', '.join(f'policy.{n}.allow' for n in empty[1:])})"
                      if empty[1:] else ""),
                   "list what tasks may use in the config's policy section "
                   "(docs/configuration.md)")
    elif empty:
        what = ", ".join(f"a task with {_ALLOW_LISTS[n]} (policy.{n}.allow is empty)"
                         for n in empty)
        yield warn("policy", f"REJECTED: {what}",
                   "list what tasks may use there, if they should")
    else:
        yield ok("policy", ", ".join(f"{len(getattr(config.policy, n).allow)} {n}"
                                     for n in _ALLOW_LISTS) + " allowed")


def check_roles(config: Config) -> Iterator[Check]:
    """The site's roles path, and the role each executor the policy allows runs with: a
    missing one would reject each of its tasks (issue 31)."""
    from .errors import PolicyViolation
    from .runner import data_dir
    from .site_roles import check_executor, find_role, roles_path

    builtin = data_dir() / "roles"
    site = [Path(p) for p in roles_path(config) if Path(p) != builtin]
    site_roles = sorted({r.name for p in site if p.is_dir() for r in p.iterdir()
                         if (r / "tasks").is_dir()})
    replaced = [r for r in site_roles if (builtin / r).is_dir()]
    if site:
        yield ok("roles", f"execution.roles_path {', '.join(map(str, site))}: "
                 f"{len(site_roles)} role(s)"
                 + (f", replacing built-in {', '.join(replaced)}" if replaced else "")
                 + "; then the built-in roles")
    else:
        yield ok("roles", "the built-in roles only (execution.roles_path is empty)")
    # Every executor a task may name: the allow-list's names, and those its globs match
    # among the executor roles there are.
    allow = config.policy.executors.allow
    there = {r.name.removeprefix("fem_executor_") for p in [*site, builtin] if p.is_dir()
             for r in p.glob("fem_executor_*")}
    names = {n for n in allow if not GLOB & set(n)} | {n for n in there if allowed(n, allow)}
    for name in sorted(names | {config.execution.default_executor}):
        try:
            check_executor({"executor": name, "task_id": None}, config)
        except PolicyViolation as e:
            yield fail(f"executor {name}", e.violations[0][1],
                       f"put a role fem_executor_{name} on execution.roles_path, or remove "
                       f"{name} from policy.executors.allow")
            continue
        role = find_role(f"fem_executor_{name}", config)
        yield ok(f"executor {name}", f"role {role}"
                 + (" (built-in)" if role and role.parent == builtin else " (the site's)"))


def check_signatures(config: Config) -> Iterator[Check]:
    mode = config.security.signature.mode
    if mode == "none":
        yield warn("signatures", "security.signature.mode is none: any message on this node's "
                   "queue is run", "ask the orchestrator for a key and set mode hmac or ed25519")
    else:
        yield ok("signatures", f"mode {mode}")


def check_broker(config: Config) -> Iterator[Check]:
    params = broker.connection_parameters(config)
    params.connection_attempts = 1
    params.retry_delay = 0
    params.socket_timeout = NET_TIMEOUT_S
    params.stack_timeout = NET_TIMEOUT_S * 2
    try:
        conn = pika.BlockingConnection(params)
    except (pika.exceptions.AMQPError, OSError) as e:
        yield fail("broker", *broker.connect_failure(config, e))
        return
    try:
        yield ok("broker", f"logged in as {broker.where(config)}")
        yield from _check_topology(conn, config)
    finally:
        if conn.is_open:
            conn.close()


def _check_topology(conn: pika.BlockingConnection, config: Config) -> Iterator[Check]:
    names = broker.Names.of(config)
    objects: list[tuple[str, str]] = [
        ("exchange", broker.TASKS_EXCHANGE), ("exchange", broker.DLX_EXCHANGE),
        ("exchange", broker.CONTROL_EXCHANGE), ("exchange", broker.EVENTS_EXCHANGE),
        ("queue", names.tasks), ("queue", names.dead), ("queue", names.control)]
    missing, refused = [], []
    for kind, name in objects:
        ch = conn.channel()
        try:
            with broker.expecting_not_found():
                if kind == "exchange":
                    ch.exchange_declare(name, passive=True)
                else:
                    ch.queue_declare(name, passive=True)
        except pika.exceptions.ChannelClosedByBroker as e:
            (refused if e.reply_code == 403 else missing).append(name)
            continue
        ch.close()
    if refused:
        yield fail("topology", f"access refused to {', '.join(refused)}",
                   "grant the node's account configure, write and read on ^fem\\..* "
                   "(rabbitmqctl set_permissions)")
    elif missing and config.broker.declare:
        yield ok("topology", f"{len(missing)} of {len(objects)} objects not there yet; "
                 "`listen` declares them (broker.declare: true)")
    elif missing:
        yield fail("topology", f"missing: {', '.join(missing)} (broker.declare is false)",
                   "ask the broker's admin to declare them (DESIGN.md §2) or set "
                   "broker.declare: true")
    else:
        yield ok("topology", f"exchanges and queues of node {config.node_id} are there")


def check_engines(config: Config) -> Iterator[Check]:
    executors = set(config.policy.executors.allow) | {config.execution.default_executor}
    if "docker" in executors:
        import docker
        import docker.errors

        where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        try:
            client = docker.DockerClient.from_env(timeout=int(NET_TIMEOUT_S))
            version = client.version()
            client.close()
        except docker.errors.DockerException as e:
            reason = str(e).split("\n")[0][:200]
            yield fail("engine docker", f"no Docker engine at {where}: {reason}",
                       "start it (systemctl start docker), give the service user the "
                       "socket (group docker), or set DOCKER_HOST in the service's environment")
        else:
            yield ok("engine docker", f"Docker {version.get('Version')} at {where}")
    if "podman" in executors:
        podman = shutil.which("podman")
        if podman is None:
            yield fail("engine podman", "podman is not installed but executor podman is allowed",
                       "install podman or remove podman from policy.executors.allow")
        else:
            yield ok("engine podman", podman)


def _literal_host(pattern: str, *, with_scheme: bool) -> tuple[str, str, int | None] | None:
    """``(scheme, host, port)`` of an allow-list pattern whose host part has no glob."""
    if with_scheme:
        scheme, sep, rest = pattern.partition("://")
        netloc = rest.split("/", 1)[0].rsplit("@", 1)[-1]
        if not sep or not netloc or GLOB & set(scheme + netloc):
            return None
        try:
            url = urlsplit(f"{scheme}://{netloc}")
            return url.scheme, url.hostname or "", url.port
        except ValueError:
            return None
    host = pattern.split("/", 1)[0]
    if GLOB & set(host) or ("." not in host and ":" not in host and host != "localhost"):
        return None
    if host == "docker.io":
        host = "registry-1.docker.io"
    name, _, port = host.partition(":")
    return "https", name, int(port) if port.isdigit() else None


def check_registries(config: Config, clock: _Clock) -> Iterator[Check]:
    seen = set()
    for pattern in config.policy.images.allow:
        lit = _literal_host(pattern, with_scheme=False)
        if lit is None:
            continue
        _scheme, host, port = lit
        netloc = f"{host}:{port}" if port else host
        if netloc in seen:
            continue
        seen.add(netloc)
        errors = []
        for scheme in ("https", "http"):
            sent = time.time()
            try:
                resp = requests.get(f"{scheme}://{netloc}/v2/", timeout=NET_TIMEOUT_S,
                                    allow_redirects=False, verify=config.http.ca_file or True)
            except requests.RequestException as e:
                errors.append(f"{scheme}: {type(e).__name__}")
                continue
            clock.saw(f"registry {netloc}", resp, sent)
            plain = " (plain HTTP)" if scheme == "http" else ""
            yield ok(f"registry {netloc}", f"answers{plain} (HTTP {resp.status_code})")
            break
        else:
            yield fail(f"registry {netloc}", f"unreachable ({'; '.join(errors)})",
                       "check the network path and proxy to the registry, or correct "
                       "policy.images.allow")


def check_git(config: Config) -> Iterator[Check]:
    seen = set()
    for pattern in config.policy.sources.allow:
        lit = _literal_host(pattern, with_scheme=True)
        if lit is None:
            continue
        scheme, host, port = lit
        port = port or DEFAULT_PORTS.get(scheme, 443)
        if (host, port) in seen:
            continue
        seen.add((host, port))
        try:
            with socket.create_connection((host, port), timeout=NET_TIMEOUT_S):
                pass
        except OSError as e:
            yield fail(f"git {host}:{port}", f"unreachable ({e.strerror or e})",
                       "check the network path to the git server, or correct "
                       "policy.sources.allow")
        else:
            yield ok(f"git {host}:{port}", f"reachable ({scheme})")


def check_hosts(config: Config) -> Iterator[Check]:
    import tempfile

    from .runner import collections_view
    from .ssh_masters import scratch_control_dir
    from .targets import Inventory, check_host, inventory_path

    path = inventory_path(config)
    # The collections runs see (inventory and connection plugins among them), in a view of
    # doctor's own that goes with it: doctor creates nothing in the work dir.  Its SSH
    # masters have their sockets in a temp dir of its own too and end with it: one left in
    # ~/.ansible/cp answered the next doctor without the host key being checked again
    # (issue 31).
    with tempfile.TemporaryDirectory(prefix="fem-doctor-") as tmp:
        try:
            collections = collections_view(Path(tmp), tuple(config.execution.collections))
            inventory = Inventory.load(path, collections)
        except ConfigError as e:
            yield fail("inventory", str(e), f"correct the inventory {path}, or name the "
                       "collections of its plugins in execution.collections")
            return
        # policy.targets.allow holds globs: each stands for the hosts and groups it matches
        # (and is reported itself when it matches none).
        known = [*inventory.hostvars, *inventory.groups]
        names = [config.execution.target]
        for pattern in config.policy.targets.allow:
            names += [n for n in known if allowed(n, [pattern])] or [pattern]
        hosts = sorted({h for n in names for h in inventory.hosts_of(n)})
        unknown = [n for n in dict.fromkeys(names) if not inventory.hosts_of(n)]
        for name in unknown:
            yield fail(f"target {name}", f"not a host or group of {path}",
                       "add it to the inventory or remove it from policy.targets.allow / "
                       "execution.target")
        with scratch_control_dir("fem-doctor-") as control_dir:
            for host in hosts:
                yield _host_line(host, check_host(config, host, inventory, collections,
                                                  timeout_s=30, control_dir=control_dir))


def _host_line(host: str, result: dict[str, Any]) -> Check:
    if not result["reachable"]:
        reason = " ".join(str(result.get("message") or "unreachable").split())[:300]
        return fail(f"host {host}", f"unreachable: {reason}",
                    "check ansible_host/ansible_port/ansible_user in the inventory, the SSH "
                    "key (execution.ssh) and that sshd runs there")
    engines = [e for e, there in (result.get("engines") or {}).items() if there]
    free = result.get("free_bytes")
    detail = (f"python {result.get('python')}, engines {', '.join(engines) or 'none'}, "
              f"{format_bytes(free) if free is not None else '?'} free in {result['work_dir']}")
    if result.get("python") is None:
        return fail(f"host {host}", "reachable, but its Python did not run",
                    "install python3 there or set ansible_python_interpreter")
    if not engines:
        return fail(f"host {host}", detail, "install Docker or podman on the host")
    if result.get("left"):
        # A task that ended while its host was away could not clean up there.
        return warn(f"host {host}", f"{detail}; task dirs there: {', '.join(result['left'])}",
                    f"those of no running task (fem-ansible tasks) were left by a task that "
                    f"ended while the host was away: remove them from {result['work_dir']}"
                    "/tasks and their containers (named alike) from its engine")
    return ok(f"host {host}", detail)


def disk_need(config: Config) -> int:
    """The work dir's space that ``max_parallel`` tasks at the policy's limits may take (the
    metrics' ``fem_disk_need_bytes`` too)."""
    limits = config.policy.limits
    return config.execution.max_parallel * (
        limits.input_bytes + limits.source_bytes + limits.output_bytes + 2 * limits.log_bytes)


def check_disk(config: Config) -> Iterator[Check]:
    path = config.work_dir
    while not path.exists() and path != path.parent:
        path = path.parent
    free = shutil.disk_usage(path).free
    need = disk_need(config)
    detail = (f"{format_bytes(free)} free in {path}; {config.execution.max_parallel} task(s) "
              f"at the policy's limits need {format_bytes(need)}")
    if free < need:
        yield fail("disk", detail, "free space, move execution.work_dir, or lower "
                   "policy.limits.{input,source,output,log}_bytes or execution.max_parallel")
    else:
        yield ok("disk", detail)


def check_floor(config: Config) -> Iterator[Check]:
    """The work dir's free space against ``execution.min_free_bytes``: below it a running
    listener takes no task (docs/operating.md, "When the node is unhealthy")."""
    floor = config.execution.min_free_bytes
    path = config.work_dir
    while not path.exists() and path != path.parent:
        path = path.parent
    reason = below_floor(path, floor) if floor else None
    if reason:
        yield fail("disk floor", f"{reason}: the listener takes no task",
                   "free space there (a listener resumes by itself), or lower "
                   "execution.min_free_bytes")
    else:
        yield ok("disk floor", f"at least {format_bytes(floor)} free under the work dir "
                 "(execution.min_free_bytes)")


def check_journal(config: Config) -> Iterator[Check]:
    """Whether the journal takes a write now; while it does not, a running listener takes
    no task (and resumes by itself once it does)."""
    from .journal import Journal

    path = config.work_dir / "journal.sqlite"
    if not path.is_file():
        yield ok("journal", f"{path} (created on first run)")
        return
    try:
        journal = Journal(path)
        try:
            journal.probe()
        finally:
            journal.close()
    except OSError as e:
        yield fail("journal", f"{path}: {e.strerror}",
                   "free space on its file system, or make it writable by the service user; "
                   "a running listener takes no task meanwhile and resumes by itself")
    else:
        yield ok("journal", f"{path} can be written")


def check_clock(config: Config, clock: _Clock) -> Iterator[Check]:
    seen = set()
    for pattern in config.policy.uploads.allow:
        lit = _literal_host(pattern, with_scheme=True)
        if lit is None or lit[0] not in ("http", "https"):
            continue
        scheme, host, port = lit
        base = f"{scheme}://{host}" + (f":{port}" if port else "")
        if base in seen:
            continue
        seen.add(base)
        sent = time.time()
        try:
            resp = requests.head(base + "/", timeout=NET_TIMEOUT_S, allow_redirects=False,
                                 verify=config.http.ca_file or True)
        except requests.RequestException:
            continue
        clock.saw(f"upload endpoint {host}", resp, sent)
    if not clock.references:
        yield warn("clock", "no registry or upload endpoint answered with a Date header",
                   "make sure NTP runs (timedatectl): not_after is judged by this clock")
        return
    source, skew = max(clock.references, key=lambda r: abs(r[1]))
    detail = f"{skew:+.0f}s from {source}"
    if abs(skew) > MAX_SKEW_S:
        yield fail("clock", detail + f" (more than {MAX_SKEW_S:.0f}s)",
                   "synchronise the clock (chrony or systemd-timesyncd): tasks' not_after "
                   "is judged by it")
    else:
        yield ok("clock", detail)


def diagnose(config: Config) -> list[Check]:
    """Run every check, in the order a sysadmin fixes things."""
    clock = _Clock()
    steps: list[Callable[[], Iterator[Check]]] = [
        lambda: check_paths(config), lambda: check_ansible(config),
        lambda: check_runs(config),
        lambda: check_policy(config), lambda: check_roles(config),
        lambda: check_signatures(config),
        lambda: check_broker(config),
        lambda: check_engines(config), lambda: check_registries(config, clock),
        lambda: check_git(config), lambda: check_hosts(config),
        lambda: check_disk(config), lambda: check_floor(config),
        lambda: check_journal(config), lambda: check_clock(config, clock)]
    if config.legacy.enabled:
        from .legacy.preflight import check_legacy  # the legacy package imports this one

        steps.insert(4, lambda: check_legacy(config))
    results: list[Check] = []
    for step in steps:
        results.extend(step())
    return results
