"""The resident Ansible: a process that has imported Ansible, Mitogen and what a run
imports, and forks one ``ansible-playbook`` per run (docs/decisions.md, "A resident
Ansible"; fem_ansible.resident starts and replaces it).

Why: a cold ``ansible-playbook`` spends a third of a trivial task's controller CPU on
importing and setting up Ansible before any work (bench/RESULTS.md).  A fork starts from a
process that did all that once.

What keeps runs apart, by construction:

- The server never runs a playbook, a strategy or a plugin: what it holds is imported code
  and the parse of role files its runs parsed (fem_ansible.parsed_roles), nothing of a run
  (no inventory, vault secret, host connection or module state).  Each run is a fresh fork
  that ends with its run.
- Each run is in its own cgroup (fem_ansible.cgroups), joined right after the fork, before
  anything of the run happens: the run's workers, Mitogen's interpreters and what modules
  start are in it, and stopping the run kills it.
- A run gets the client's stdio (the pty ansible-runner reads), working dir, argv and
  environment; Ansible's settings are read again from that environment.  The server serves
  only runs whose environment equals its own outside the per-run variables
  (fem_ansible.resident_client.PER_RUN): what Ansible fixes at import is the same.
- The host interpreters of the listener's own host that its runs' multiplexers ask for
  are forks of the resident host this server starts (fem.core's
  ``plugin_utils/resident_host.py``), each in its run's cgroup, never shared.
- When the client's connection closes before the run ends (ansible-runner's cancel or
  timeout killed it), the run's cgroup is killed.
- The server stops taking runs (and exits once its runs have ended) when any file it
  imported changes (an upgrade, a changed plugin), on SIGTERM, after :data:`MAX_RUNS` runs
  or above :data:`MAX_RSS` of memory; the listener then starts a new one.

Standard library, this package and Ansible only; started by fem_ansible.resident as
``python -P -m fem_ansible.resident_server <socket> <listener pid>`` with the runs'
environment.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import inspect
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fem_ansible import cgroups, parsed_roles, playbook_cli
from fem_ansible.fastpath import FEM_STRATEGY, patches, plugin_utils
from fem_ansible.resident_client import LOST_RC, PER_RUN, PROTOCOL, server_key

#: fem.core's resident host (its protocol, and the script the server starts).
resident_host = plugin_utils("resident_host")

#: Runs after which a server hands over to a new one (a bound on what a long life could
#: gather, though a server keeps nothing of its runs).
MAX_RUNS = 500
#: Resident memory above which a server hands over to a new one.
MAX_RSS = 1024 * 1024**2
#: A resident host that ended after this long is started again (one that ends sooner is
#: not, until the server is replaced: no restart loop).
HOST_RESTART_S = 30.0
#: How long the server parses role files (fem_ansible.parsed_roles) before it looks for a
#: run again, when it has nothing else to do.
PARSE_SLICE_S = 0.05

# What a run imports besides ansible.cli.playbook, taken in once (a missing one is skipped:
# it only costs its import in each run).
PRELOAD = (
    "ansible.cli.playbook", "ansible.executor.playbook_executor",
    "ansible.executor.task_queue_manager", "ansible.executor.task_executor",
    "ansible.executor.process.worker", "ansible.executor.module_common",
    "ansible.playbook", "ansible.playbook.play", "ansible.playbook.role",
    "ansible.playbook.role.include", "ansible.playbook.task_include",
    "ansible.playbook.included_file", "ansible.playbook.role_include",
    "ansible.vars.manager", "ansible.inventory.manager", "ansible.parsing.dataloader",
    "ansible.parsing.vault", "ansible.template", "ansible.plugins.strategy",
    "ansible.plugins.strategy.linear", "ansible.plugins.callback",
    "ansible.plugins.action", "ansible.plugins.connection.local",
    "ansible.plugins.connection.ssh", "ansible.plugins.inventory.yaml",
    "ansible.plugins.inventory.ini", "ansible.plugins.vars.host_group_vars",
    "ansible.plugins.cache.jsonfile", "ansible.plugins.filter.core",
    "ansible.plugins.test.core", "ansible.modules",
    # loaded by every run to list the plugins it may use (callbacks, connections, become,
    # inventory, shells), whether it uses them or not
    "ansible.plugins.action.normal", "ansible.plugins.action.set_stats",
    "ansible.plugins.become.su", "ansible.plugins.become.sudo",
    "ansible.plugins.callback.default", "ansible.plugins.callback.junit",
    "ansible.plugins.callback.minimal", "ansible.plugins.callback.oneline",
    "ansible.plugins.callback.tree", "ansible.plugins.connection.paramiko_ssh",
    "ansible.plugins.connection.psrp", "ansible.plugins.connection.winrm",
    "ansible.plugins.inventory.auto", "ansible.plugins.inventory.host_list",
    "ansible.plugins.inventory.script", "ansible.plugins.inventory.toml",
    "ansible.plugins.shell.cmd", "ansible.playbook.handler_task_include",
    "ansible._internal._json._profiles._inventory_legacy",
    "multiprocessing.popen_fork", "multiprocessing.synchronize",
    "mitogen.core", "mitogen.parent", "mitogen.service", "mitogen.unix", "mitogen.utils",
    "mitogen.fork", "mitogen.select", "ansible_mitogen.strategy", "ansible_mitogen.process",
    "ansible_mitogen.connection", "ansible_mitogen.mixins", "ansible_mitogen.planner",
    "ansible_mitogen.services", "ansible_mitogen.loaders", "ansible_mitogen.utils",
)

_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD)


@dataclass
class _Run:
    pid: int
    pidfd: int
    conn: socket.socket
    group: Path | None


@dataclass
class _Request:
    """What a run's child takes from its client."""

    args: list[str]
    env: dict[str, str]
    cwd: str
    fds: list[int]
    host: str | None  # the resident host's socket, if there is one


def _preload() -> list[str]:
    playbook_cli.prepare()
    skipped = []
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # a module that fails here is imported per run
            skipped.append(name)
    if "parsed_roles" not in patches.off() and not patches.missing(["parsed_roles"]):
        parsed_roles.install()
    # Every run with fem.core's strategy gets Ansible's deprecation of strategies outside
    # ansible.builtin, and Ansible finds who deprecates with inspect.stack(), which the
    # first time in a process maps every imported module to its file: 30 ms a run for a
    # warning fem-ansible's runs never show.  Mapped here, once, a run maps only what it
    # imported since.
    inspect.stack()
    return skipped


def _rss() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _say(line: str) -> None:
    """A line for the listener's log; none once the listener is gone (its pipe closed)."""
    with contextlib.suppress(OSError, ValueError):
        print(line, file=sys.stderr, flush=True)


class Server:
    """One resident Ansible serving the runs whose environment key is its own."""

    def __init__(self, path: str, listener: int) -> None:
        self.path = path
        self.listener = listener
        self.key = server_key(dict(os.environ))
        self.pid = os.getpid()
        self.runs: dict[int, _Run] = {}
        self.count = 0
        self.retiring: str | None = None
        self.files = resident_host.fingerprint()
        self.group_base = cgroups.base()
        self.selector = selectors.DefaultSelector()
        # A client connects to a listening server or to none (and goes cold).
        self.listening = resident_host.Listening(path)
        self.sock = self.listening.sock
        self.selector.register(self.sock, selectors.EVENT_READ, "accept")
        self.host: subprocess.Popen[bytes] | None = None
        self.host_pidfd = -1
        self.host_started = 0.0
        self.host_path = f"{path}.host"

    def start_host(self) -> None:
        """Start the resident host (fem.core's ``plugin_utils.resident_host``) beside this
        server, for its runs' multiplexers: only where runs have cgroups and their strategy
        will ask it (groups ``own_host`` and ``resident_host``)."""
        groups = ["own_host", "resident_host"]
        if (self.group_base is None or os.environ.get("ANSIBLE_STRATEGY") != FEM_STRATEGY
                or set(groups) & patches.off() or patches.missing(groups)):
            return
        try:
            self.host = subprocess.Popen(
                [sys.executable, str(resident_host.__file__), self.host_path, str(self.pid),
                 str(cgroups.mount()), str(self.group_base), json.dumps(sorted(PER_RUN))],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        except OSError as e:
            _say(f"the resident host could not start ({e}); runs start their own hosts")
            return
        self.host_started = time.monotonic()
        self.host_pidfd = os.pidfd_open(self.host.pid)
        self.selector.register(self.host_pidfd, selectors.EVENT_READ, "host")

    def _host_ended(self) -> None:
        assert self.host is not None
        rc = self.host.wait()
        self.selector.unregister(self.host_pidfd)
        os.close(self.host_pidfd)
        self.host = None
        if rc == resident_host.CHANGED_RC:
            self.retire("code the resident host imported changed")
        elif not self.retiring:
            if time.monotonic() - self.host_started >= HOST_RESTART_S:
                _say(f"the resident host ended (exit {rc}); a new one starts")
                self.start_host()
            else:  # it does not stay up: runs go on without it until this server goes
                _say(f"the resident host ended (exit {rc}) within {HOST_RESTART_S:.0f}s of "
                     "its start; runs start their own hosts")

    def stop_host(self) -> None:
        """The resident host ends once the hosts it forked have (they are runs')."""
        if self.host is not None:
            with contextlib.suppress(ProcessLookupError):
                self.host.terminate()

    def retire(self, why: str) -> None:
        """Take no more runs; the process exits once its runs have ended."""
        if self.retiring:
            return
        self.retiring = why
        self.selector.unregister(self.sock)
        self.listening.close()
        _say(f"retiring: {why}")

    def serve(self) -> _Request | None:
        """Serve until retired and idle (returns None), or, in a forked child, return its
        run's request."""
        said = parsed_roles.kept()
        stop = resident_host.stop_flag(_SIGNALS[:2])
        while not (self.retiring and not self.runs):
            if stop["why"]:
                self.retire(stop["why"])
            if os.getppid() != self.listener:
                self.retire("the listener is gone")
            parsing = not self.retiring and parsed_roles.pending()
            ready = self.selector.select(timeout=0 if parsing else 1.0)
            for key, _mask in ready:
                if key.data == "accept":
                    request = self._accept()
                    if request is not None:
                        return request
                elif key.data == "host":
                    self._host_ended()
                elif isinstance(key.data, tuple):
                    self._ended(*key.data)
            if parsing and not ready:  # nothing else to do: a slice, given up for a run
                why = parsed_roles.work(PARSE_SLICE_S, lambda: bool(self.selector.select(0)))
                if why:
                    _say(why)
                elif not parsed_roles.pending() and parsed_roles.kept() != said:
                    said = parsed_roles.kept()
                    _say(f"role files parsed ahead: {said[0]} ({said[1]:.2f} CPU-s of "
                         "the runs' parsing)")
        return None

    def _accept(self) -> _Request | None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return None
        try:
            if resident_host.peer(conn)[1] != os.getuid():
                raise ValueError("another user")
            message, fds = resident_host.receive(conn, 3, 2.0)
        except (OSError, ValueError) as e:
            _say(f"a request refused: {e}")
            conn.close()
            return None
        why = self._refusal(message, fds)
        if why:
            for fd in fds:
                os.close(fd)
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps({"cold": why}).encode() + b"\n")
            conn.close()
            return None
        group = message["env"].get(cgroups.ENV)
        gc.collect()
        gc.freeze()  # the child's copy of the heap stays shared: collections skip it
        pid = os.fork()
        if pid == 0:
            self._become_child(conn)
            return _Request(message["command"][4:], message["env"], message["cwd"], fds,
                            self.host_path if self.host is not None else None)
        for fd in fds:
            os.close(fd)
        self.count += 1
        pidfd = os.pidfd_open(pid)
        run = _Run(pid, pidfd, conn, Path(group) if group else None)
        self.runs[pid] = run
        self.selector.register(pidfd, selectors.EVENT_READ, (pid, False))
        self.selector.register(conn, selectors.EVENT_READ, (pid, True))
        if self.count >= MAX_RUNS:
            self.retire(f"{self.count} runs served")
        return None

    def _refusal(self, message: dict[str, Any], fds: list[int]) -> str | None:
        """Why this server does not run the request (the client then runs it cold)."""
        if self.retiring:
            return f"the resident Ansible is being replaced ({self.retiring})"
        changed = resident_host.changed(self.files)
        if changed:
            self.retire(f"{changed} changed")
            return "installed Ansible code changed; a new resident Ansible starts"
        if message.get("protocol") != PROTOCOL:
            return f"its client speaks {message.get('protocol')!r}, this server {PROTOCOL!r}"
        if len(fds) != 3:
            return "no stdio received"
        command = message.get("command") or []
        if command[:4] != [sys.executable, "-P", "-m", playbook_cli.MODULE]:
            return "not fem-ansible's ansible-playbook"
        env = message.get("env") or {}
        if server_key(env) != self.key:
            return "its Ansible environment is not the resident one's"
        group = env.get(cgroups.ENV) or ""
        name = os.path.basename(group)
        if (self.group_base is None or os.path.normpath(group) != group
                or Path(group).parent != self.group_base or name.startswith(".")):
            return "it has no cgroup of its own"
        return None

    def _become_child(self, conn: socket.socket) -> None:
        """In the child: nothing of the server stays open or in charge."""
        for signum in _SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        self.selector.close()
        self.sock.close()
        conn.close()
        if self.host is not None:
            os.close(self.host_pidfd)
        for run in self.runs.values():
            os.close(run.pidfd)
            run.conn.close()

    def _ended(self, pid: int, client_gone: bool) -> None:
        run = self.runs.get(pid)
        if run is None:
            return
        if client_gone:
            # The client ended first (ansible-runner's cancel or timeout): so does the run.
            if run.group is not None:
                cgroups.kill(run.group)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        rc = os.waitstatus_to_exitcode(status)
        with contextlib.suppress(OSError):
            run.conn.sendall(json.dumps({"rc": rc if rc >= 0 else 128 - rc}).encode() + b"\n")
        parsed_roles.learn(_report_path(self.path, pid))  # after: the task waits for its rc
        self.selector.unregister(run.pidfd)
        self.selector.unregister(run.conn)
        os.close(run.pidfd)
        run.conn.close()
        del self.runs[pid]
        if _rss() > MAX_RSS:
            self.retire(f"{_rss() // 1024**2} MiB resident")


def _report_path(server: str, pid: int) -> str:
    """Where run ``pid`` leaves, as it ends, the role files it parsed (fem_ansible.parsed_roles),
    beside its server's socket: a dir of the listener's user alone."""
    return f"{server}.{pid}.parsed"


def _run_child(request: _Request, server: str) -> int:
    """In the forked child: become the run (its cgroup first, then its stdio, directory,
    environment and Ansible's settings from it), run the playbook, and tell ``server`` what
    it parsed."""
    group = Path(request.env[cgroups.ENV])
    try:
        cgroups.join(group)
    except OSError as e:
        os.write(request.fds[2], f"fem-ansible: cannot join {group}: {e}\n".encode())
        return LOST_RC
    os.setsid()
    for target, fd in enumerate(request.fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request.cwd)
    os.environ.clear()
    os.environ.update(request.env)
    if request.host:
        os.environ[resident_host.ENV] = request.host
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=True)
    _refresh_settings()
    run = os.getpid()
    rc = playbook_cli.run(request.args)
    if os.getpid() == run:  # not a child of the run's (Mitogen's) ending through here
        parsed_roles.report(_report_path(server, run))
    return rc


def _refresh_settings() -> None:
    """Ansible's settings (``ansible.constants``) read again, from the run's environment:
    the server read them from its own at import; the per-run variables differ."""
    from ansible import constants

    for setting in constants.config.get_configuration_definitions():
        constants.set_constant(setting, constants.config.get_config_value(
            setting, variables=vars(constants)))


def main(argv: list[str]) -> int:
    path, listener = argv[1], int(argv[2])
    skipped = _preload()
    if skipped:
        _say(f"not preloaded (imported per run): {', '.join(skipped)}")
    server = Server(path, listener)
    server.start_host()
    _say(f"ready: {len(server.files)} files imported, key {server.key}")
    started = time.monotonic()
    request = server.serve()
    if request is None:
        server.stop_host()
        _say(f"exiting after {server.count} runs in {time.monotonic() - started:.0f}s")
        return 0
    return _run_child(request, server.path)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
