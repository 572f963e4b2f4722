# Copyright: fem-ansible developers
# SPDX-License-Identifier: Apache-2.0
"""Mitogen's linear strategy, without the per-run work of Mitogen's module server that gives
the same answer every run.

Why: every playbook run starts a new Mitogen multiplexer, and before it sends a module to a
host it compiles that module's source to find what it imports (``find_related_imports``,
``ansible_mitogen.module_finder``) and minifies Mitogen's own modules; a fresh process has
no cache, so each run paid ~1 CPU-s for it, on the critical path of the first module call
(bench/RESULTS.md).

- Import scans: the code objects compiled only to read their imports are kept between runs
  by fem.core's ``plugin_utils.derived_cache`` (in ``FEM_IMPORT_SCAN_CACHE``, the listener's
  ``<work_dir>/import-scan-cache``, used only if private), named by a hash of the
  interpreter's bytecode magic and optimisation level, the file name and the source.  They
  are never executed: what a host runs is still the source Mitogen sends, so an entry cannot
  change what runs, only which related modules Mitogen offers ahead of time.
- Minifying: off.  Mitogen then sends its own modules as they are installed, comments and
  all (about 65 kB more per run and host, compressed: 120 kB instead of 55); caching
  minified source instead would keep code that hosts execute in a cache.
- Collections: Mitogen lists the installed collections (for the hosts' import path) with
  ``ansible.collections.list``, which imports ansible-galaxy's CLI and builds its artifact
  manager; they are listed from the collections path instead, and that module is only
  executed if something else uses it.
- The listener's own host: a host the local method reaches with the controller's own
  interpreter (fem-ansible's default inventory: ``localhost``, ``ansible_connection: local``,
  ``ansible_playbook_python``) inherits the multiplexer's environment.  Once it has checked
  that Ansible and ``ansible_mitogen`` resolve there to the controller's files
  (fem.core's ``plugin_utils.mitogen_host``; its import path starts with its working directory),
  it imports them from those files, with their bytecode, instead of receiving ~60 modules'
  source and compiling it on every run's first module call, and is not sent them ahead of
  time.  Mitogen's own modules, collections and modules' code still come from the
  multiplexer.  Any other host, interpreter or connection (SSH), and any context such a
  host starts itself (``become``, ``mitogen_via``), is as with Mitogen.
- A host forked ready: in a run of a resident Ansible (``FEMCORE_RESIDENT_HOST`` set), the
  listener's own host (the test above) is asked of the resident host, fem.core's
  ``plugin_utils.resident_host``: a fork of a process that has imported what modules
  import there, which joins the run's cgroup and takes the multiplexer's state before it
  boots as Mitogen's interpreter would (docs/decisions.md, "A host interpreter per run,
  forked ready").  Refused or absent: Mitogen starts it, as before.
- CPU placement: none.  Mitogen pins its processes as if its ``ansible-playbook`` had the
  machine to itself: the multiplexer to CPU 0, the top-level process to CPU 1 (on fewer than
  4 CPUs also the workers and every process Mitogen starts, the host's interpreter and its
  children included; on more, those avoid CPUs 0 and 1).  Every run of the listener does
  the same, so runs side by side (``max_parallel``) shared one CPU while another held only
  multiplexers; the kernel now places them (docs/decisions.md).
- Frozen heap: when the play starts, everything the run has built (playbook, inventory,
  loaders, plugins) is moved out of the garbage collector's reach (``gc.freeze()``), before
  the multiplexer and the workers are forked from it.  A full collection then no longer
  walks that heap in this process or in a worker (about four a task, tens of ms each),
  and a worker's collections no longer write to its copy of those pages.  The run
  is one process that ends with its playbook: what becomes garbage among those objects
  later is freed at its exit, not before.
- Stage markers: the result of each of the task playbook's ``set_stats`` markers, which
  follows from its literal arguments, is written in this process instead of by a forked
  worker (fem.core's ``plugin_utils.stage_markers``; docs/decisions.md, "Markers fork no
  worker").

Each group is applied only if every name it touches has the shape it was written for
(fem.core's ``plugin_utils.fastpath``; pyproject.toml pins the versions): if one does not,
none is, one warning says what is missing, and runs are as with Mitogen's own
``mitogen_linear``: slower, not different.  The listener checks the same at start and then
gives its runs Mitogen's own plugin instead of this one.
"""

from __future__ import annotations

import builtins
import contextlib
import gc
import importlib.util
import logging
import os
import resource
import select
import signal
import socket
import sys
import threading
import types
from collections.abc import Callable
from pathlib import Path
from types import CodeType
from typing import Any

from ansible_collections.fem.core.plugins.plugin_utils import (
    derived_cache,
    fastpath,
    mitogen_host,
    resident_host,
)


class _OnFirstUse(types.ModuleType):
    """A module that is imported only when one of its attributes is first used (by then
    in place of this stand-in in ``sys.modules`` and in its package).

    Why: ``ansible_mitogen.planner`` imports ``ansible.collections.list`` at import, which
    imports all of ansible-galaxy's CLI (about a tenth of a run's controller CPU), for one
    function replaced below.  ``importlib.util.LazyLoader`` does not serve: an ``import``
    statement reads ``__spec__``, which loads it.  Who bound the stand-in itself (``import
    ansible.collections.list as m`` before first use) keeps reading through it; setting an
    attribute on it does not reach the real module."""

    def __getattr__(self, attr: str):
        with _first_use:
            if sys.modules.get(self.__name__) is self:
                sys.modules.pop(self.__name__, None)
            module = importlib.import_module(self.__name__)
        return getattr(module, attr)


_first_use = threading.Lock()


def _lazy(name: str) -> None:
    spec = None if name in sys.modules else importlib.util.find_spec(name)
    if spec is not None:
        module = _OnFirstUse(name)
        # What an import sets, so that what looks at every module's file (inspect.stack(),
        # which each Ansible deprecation warning calls) does not import it.
        module.__spec__, module.__loader__, module.__package__ = spec, spec.loader, spec.parent
        module.__file__, module.__cached__ = spec.origin, spec.cached
        sys.modules[name] = module
        package, _, child = name.rpartition(".")
        setattr(sys.modules[package], child, module)


_off = fastpath.off()
if "collections" not in _off:
    _lazy("ansible.collections.list")

# The imports below must come after _lazy(): ansible_mitogen.strategy imports the planner.
import ansible_mitogen._modifiers  # noqa: E402
import ansible_mitogen.affinity  # noqa: E402
import ansible_mitogen.loaders  # noqa: E402
import ansible_mitogen.module_finder  # noqa: E402
import ansible_mitogen.planner  # noqa: E402
import ansible_mitogen.services  # noqa: E402
import ansible_mitogen.strategy  # noqa: E402
import mitogen.core  # noqa: E402
import mitogen.master  # noqa: E402
import mitogen.minify  # noqa: E402
import mitogen.parent  # noqa: E402
from ansible.utils.collection_loader import AnsibleCollectionConfig  # noqa: E402
from ansible.utils.display import Display  # noqa: E402

DOCUMENTATION = r"""
name: mitogen_linear
short_description: Mitogen's linear strategy, with its import scans cached between runs
description:
  - C(mitogen_linear) of the installed Mitogen; the code objects its module server compiles
    to find a module's imports are kept in E(FEM_IMPORT_SCAN_CACHE) between runs,
    Mitogen's own modules are sent unminified, installed collections are listed without
    ansible-galaxy, a host reached by the local method with the controller's own
    interpreter imports Ansible from its installed files (and is forked by the resident
    host when the run has one), Mitogen's processes are not pinned to CPUs, a literal
    set_stats is answered without a worker, and the heap built before the play is frozen
    before workers are forked from it.
author: fem-ansible developers
"""

_compile = builtins.compile
_scans: dict[str, CodeType] = {}


def cached_compile(source, filename, mode, *args, **kwargs):
    """``compile`` for the callers below, which compile a module's whole source only to read
    its imports; anything else goes to the built-in ``compile`` unchanged."""
    if args or kwargs or mode != "exec" or not isinstance(source, (bytes, str)):
        return _compile(source, filename, mode, *args, **kwargs)
    data = source.encode("utf-8") if isinstance(source, str) else source
    key = derived_cache.entry_name(b"import-scan", b"s" if isinstance(source, str) else b"b",
                                   os.fsencode(str(filename)), data)
    code = _scans.get(key)
    if code is None:
        # dont_inherit: as the callers' own compile(), not under this file's __future__
        code = derived_cache.cached(key, lambda: _compile(source, filename, mode, 0, True),
                                    lambda value: isinstance(value, CodeType))
        code = _scans.setdefault(key, code)
    return code


def _load_collections(invocation) -> None:
    """``ansible_mitogen.planner._load_collections``: the directory of every installed
    collection (``<path>/ansible_collections/<namespace>/<name>``, the first of a name on
    the collections path), as ``ansible.collections.list.list_collection_dirs`` gives them,
    from the collections path alone, without ansible-galaxy's artifact manager."""
    seen = set()
    for path in AnsibleCollectionConfig.collection_paths:
        root = path if os.path.basename(path) == "ansible_collections" else os.path.join(
            path, "ansible_collections")
        for namespace in sorted(_subdirs(root)):
            for name in sorted(_subdirs(os.path.join(root, namespace))):
                if (namespace, name) not in seen:
                    seen.add((namespace, name))
                    invocation._extra_sys_paths.add(os.path.join(root, namespace, name))


def _subdirs(path: str) -> list[str]:
    try:
        return [e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith(".")]
    except OSError:
        return []


def _unminified(source):
    """Mitogen's ``minimize_source`` (source in, text out), without the minifying."""
    return source.decode("utf-8") if isinstance(source, bytes) else source


#: What a host running the controller's own interpreter imports from its installed files.
FROM_DISK = ("ansible", "ansible_mitogen")
#: Source modifiers Mitogen's module server applies under FROM_DISK that such a host may do
#: without: setup's is for Python 3.5, dnf's adds ``import dnf.cli`` to quiet a plugin's
#: warning.  Any other one (a new Mitogen's) keeps those hosts on Mitogen's import path.
HARMLESS_MODIFIERS = frozenset({"ansible.modules.setup", "ansible.modules.dnf"})
#: Whether a module is under FROM_DISK, by the rule a host's import policy applies.
_FROM_DISK: mitogen.core.ImportPolicy
_candidates: set[int] = set()
LOG = logging.getLogger(__name__)
#: Whether the play's start freezes the heap (group ``frozen_heap``).
_freeze = False
#: fem.core's ``plugin_utils.stage_markers`` once ``markers`` is applied.
_stage_markers: types.ModuleType | None = None
# Mitogen's own, kept by _own_host() as it replaces them (only once the check passed).
_econtext_config: Callable[[mitogen.parent.Connection], dict]
_send_module_forwards: Callable[[Any, mitogen.core.Context], None]
# Mitogen's own, kept by _resident_host() as it replaces it.
_start_child: Callable[[mitogen.parent.Connection], mitogen.parent.Process]


def runs_controller_files(connection: mitogen.parent.Connection) -> bool:
    """True for a connection of the local method (not a subclass: SSH, sudo...) made by
    this process and starting the controller's own interpreter, while no source modifier
    of its module server matters under FROM_DISK."""
    if (type(connection) is not mitogen.parent.Connection
            or connection.options.python_path not in (sys.executable, [sys.executable])):
        return False
    finder = getattr(getattr(connection._router, "responder", None), "_finder", None)
    modified = getattr(finder, "_modifier_callables", None)
    return modified is not None and all(
        name in HARMLESS_MODIFIERS for name in modified if _FROM_DISK.overriden(name))


def get_econtext_config(self: mitogen.parent.Connection) -> dict:
    """``Connection.get_econtext_config``, unchanged; notes the contexts that
    :func:`runs_controller_files` for :func:`send_module_forwards`."""
    if runs_controller_files(self):
        _candidates.add(self.context.context_id)
    return _econtext_config(self)


def send_module_forwards(self, context) -> None:
    """``ContextService._send_module_forwards``, called for each new context before
    anything runs there.  A candidate runs
    :func:`mitogen_host.import_from_disk` first: only if FROM_DISK resolves
    there to this process's files does it import them from disk, and it is then sent ahead
    of time only what it does not.  Whatever else happens there, it keeps Mitogen's policy
    (a host that cannot run the check is logged and served as any other)."""
    if context.context_id in _candidates:
        origins = {name: importlib.util.find_spec(name).origin for name in FROM_DISK}
        try:
            from_disk = context.call(mitogen_host.import_from_disk, origins)
        except mitogen.core.CallError as exc:
            LOG.warning("%r imports Ansible through Mitogen: %s", context, exc)
            from_disk = False
        if from_disk:
            self.router.responder.forward_modules(
                context, [n for n in self.ALWAYS_PRELOAD if not _FROM_DISK.overriden(n)])
            return
    _send_module_forwards(self, context)


#: How long the first look at a forked host's end waits for the resident host's report.
#: Mitogen first looks as the host's stdio closes, a few ms before the host has exited, and
#: next only 50 ms later (then 86 ms later, after a SIGTERM): the report comes about 3 ms
#: after the close, and the run's end waits for it (bench/RESULTS.md).
END_WAIT_S = 0.05


class ForkedHost(mitogen.parent.Process):
    """A host interpreter the resident host (fem.core's ``plugin_utils.resident_host``)
    forked for this multiplexer.  Not this process's child: its exit status comes from the
    resident host over ``conn``, and signals go through its pidfd, which cannot reach
    another process that took its pid."""

    def __init__(self, pid: int, pidfd: int, conn: socket.socket, stdin, stdout) -> None:
        super().__init__(pid, stdin, stdout)
        self.pidfd, self.conn = pidfd, conn
        self.returncode: int | None = None
        self._exit = resident_host.Incoming(conn, 0)
        self._waited = False
        conn.setblocking(False)

    def poll(self) -> int | None:
        """The host's exit status once the resident host has reported it, else None.
        Mitogen's reaper calls this once the host's stdio has closed (at the end, or when
        the connection failed); the first call waits up to :data:`END_WAIT_S` for the
        report, whatever the host's state (the broker thread waits with it, once a host),
        later calls do not wait."""
        if self.returncode is None:
            if not self._waited:
                self._waited = True
                _readable(self.conn.fileno(), END_WAIT_S)
            try:
                message = None
                while message is None:  # Incoming reads the size, then the rest
                    message = self._exit.read()
            except BlockingIOError:
                return None
            except (OSError, ValueError):  # the resident host is gone
                if not _readable(self.pidfd, 0):
                    return None  # and the host lives on
                message = {}  # both gone: how it ended is not known
            rc = message.get("rc")
            self.returncode = rc if isinstance(rc, int) else -signal.SIGKILL
            self.conn.close()
            os.close(self.pidfd)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, sig)


def _readable(fd: int, timeout_s: float) -> bool:
    """Whether ``fd`` is readable within ``timeout_s``: poll(2), which, unlike select(2),
    takes descriptors above 1023 (Mitogen raises a multiplexer's limit of open files)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(timeout_s * 1000))


#: Resident hosts that did not answer in time: this run's later hosts start as Mitogen's.
_silent: set[str] = set()


def _status(path: str) -> dict[str, str]:
    """The fields of ``/proc/<...>/status``: the umask is read there without setting it
    (other threads create files), the signal masks as an exec would keep them."""
    with open(path, encoding="ascii") as f:
        return {key: value.strip() for key, _, value in (line.partition(":") for line in f)}


def ask_resident_host(connection: mitogen.parent.Connection, path: str) -> ForkedHost | None:
    """A host for ``connection`` forked by the resident host at ``path``, or None (it is
    not there, not this user's, or refuses: see its log line)."""
    parent_rfp, child_wfp, child_rfp, parent_wfp = mitogen.parent.create_best_pipe(
        escalates_privilege=False)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    reply, fds = {}, []
    status = _status("/proc/self/status")
    try:
        conn.settimeout(resident_host.ANSWER_S)
        conn.connect(path)
        if resident_host.peer(conn)[1] != os.getuid():
            raise ValueError(f"{path} is another user's")
        resident_host.send(conn, {
            "protocol": resident_host.PROTOCOL,
            "env": {k: v for k, v in os.environ.items() if k != resident_host.ENV},
            "cwd": os.getcwd(), "size": len(connection.get_preamble()),
            "umask": int(status["Umask"], 8), "sigign": int(status["SigIgn"], 16),
            "sigblk": int(_status("/proc/thread-self/status")["SigBlk"], 16),
            "rlimits": {name: resource.getrlimit(getattr(resource, name))
                        for name in resident_host.RLIMITS if hasattr(resource, name)},
            "nice": os.getpriority(os.PRIO_PROCESS, 0),
            "oom": int(Path("/proc/self/oom_score_adj").read_text()),
            "cpus": sorted(os.sched_getaffinity(0)),
        }, [child_rfp.fileno(), child_wfp.fileno()] + ([2] if os.get_inheritable(2) else []))
        reply, fds = resident_host.receive(conn, 1, resident_host.ANSWER_S)
    except TimeoutError as exc:  # silent: asked no more in this run
        _silent.add(path)
        LOG.debug("%r: no host from the resident host: %s", connection, exc)
    except (OSError, ValueError) as exc:
        LOG.debug("%r: no host from the resident host: %s", connection, exc)
    finally:
        child_rfp.close()
        child_wfp.close()
    if isinstance(reply.get("pid"), int) and len(fds) == 1:
        return ForkedHost(reply["pid"], fds[0], conn, parent_wfp, parent_rfp)
    for fd in fds:
        os.close(fd)
    for f in (conn, parent_rfp, parent_wfp):
        f.close()
    return None


def start_child(self: mitogen.parent.Connection) -> mitogen.parent.Process:
    """``Connection.start_child``: a host this multiplexer would start with the controller's
    own interpreter (:func:`runs_controller_files`) is asked of the resident host first,
    when the run has one; any other, or when it gives none, as Mitogen starts it."""
    path = os.environ.get(resident_host.ENV)
    if (path and path not in _silent and mitogen.parent._preexec_hook is None
            and runs_controller_files(self)):
        host = ask_resident_host(self, path)
        if host is not None:
            return host
    return _start_child(self)


def _import_scans() -> None:
    # Module attributes shadow the built-in ``compile`` for these two modules only.
    mitogen.master.compile = cached_compile
    ansible_mitogen.module_finder.compile = cached_compile


def _unminified_modules() -> None:
    mitogen.minify.minimize_source = _unminified


def _collections() -> None:
    ansible_mitogen.planner._load_collections = _load_collections


def _own_host() -> None:
    global _FROM_DISK, _econtext_config, _send_module_forwards
    _FROM_DISK = mitogen.core.ImportPolicy(FROM_DISK)
    _econtext_config = mitogen.parent.Connection.get_econtext_config
    _send_module_forwards = ansible_mitogen.services.ContextService._send_module_forwards
    mitogen.parent.Connection.get_econtext_config = get_econtext_config
    ansible_mitogen.services.ContextService._send_module_forwards = send_module_forwards


def _resident_host() -> None:
    global _start_child
    if "own_host" in _off:  # a host importing Ansible from the multiplexer is not one
        return
    _start_child = mitogen.parent.Connection.start_child
    mitogen.parent.Connection.start_child = start_child


def _markers() -> None:
    global _stage_markers
    # Imported only once the check passed: it imports what the group relies on.
    from ansible_collections.fem.core.plugins.plugin_utils import stage_markers
    _stage_markers = stage_markers


def _frozen_heap() -> None:
    global _freeze
    _freeze = True


def _cpu_placement() -> None:
    # Mitogen's CPU placement assumes one ansible-playbook per machine; the listener runs
    # several, and on 2 CPUs it put every run's processes but the multiplexer on CPU 1.
    ansible_mitogen.affinity.policy = ansible_mitogen.affinity.Policy()


#: What each group of fem.core.plugin_utils.fastpath.STRATEGY changes in Mitogen.
APPLY = {"import_scans": _import_scans, "unminified": _unminified_modules,
         "collections": _collections, "own_host": _own_host, "cpu_placement": _cpu_placement,
         "markers": _markers, "frozen_heap": _frozen_heap, "resident_host": _resident_host}
_missing = fastpath.missing(fastpath.STRATEGY)
if _missing:
    Display().warning(fastpath.warning(_missing) + "; running Mitogen's own mitogen_linear")
else:
    for _group in fastpath.STRATEGY:
        if _group not in _off:
            APPLY[_group]()

_Base = ansible_mitogen.loaders.strategy_loader.get("linear", class_only=True)


class StrategyModule(ansible_mitogen.strategy.StrategyMixin, _Base):
    """Mitogen's ``mitogen_linear``; a stage marker runs in this process."""

    def run(self, iterator, play_context, result=0):
        if _freeze:
            gc.freeze()
        return super().run(iterator, play_context, result)

    def _queue_task(self, host, task, task_vars, play_context):
        returned = _stage_markers.result(task) if _stage_markers is not None else None
        if returned is None:
            super()._queue_task(host, task, task_vars, play_context)
        else:
            _stage_markers.hand_over(self, host, task, task_vars, play_context, returned)
