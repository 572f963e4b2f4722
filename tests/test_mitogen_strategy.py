"""fem.core's ``mitogen_linear`` strategy plugin: Mitogen's import scans kept between runs
(tests/test_derived_cache.py: only where nobody else can reach them), the same code objects
``compile`` gives; installed collections listed as Ansible lists them, without
ansible-galaxy; the listener's own host importing Ansible from its installed files, and
only that host."""

from __future__ import annotations

import builtins
import importlib.util
import json
import marshal
import os
import subprocess
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import ansible_mitogen._modifiers
import ansible_mitogen.affinity
import ansible_mitogen.module_finder
import ansible_mitogen.planner
import ansible_mitogen.process
import ansible_mitogen.services
import mitogen.core
import mitogen.master
import mitogen.minify
import mitogen.parent
import mitogen.ssh
import pytest
from ansible.plugins.loader import init_plugin_loader
from ansible.utils.collection_loader import AnsibleCollectionConfig

from fem_ansible.runner import collections_env, collections_view, data_dir
from tests.support.plugin_import import forget_plain_imports

PLUGIN = (data_dir() / "collections/ansible_collections/fem/core/plugins/strategy/"
          "mitogen_linear.py")
PLUGIN_NAME = "ansible_collections.fem.core.plugins.strategy.mitogen_linear"
SOURCE = "import json\nfrom os import path\n"
# Valid Python that this test file (and the plugin: `from __future__ import annotations`)
# could not compile if its own future flags leaked into the compile.
WALRUS = "import json\ndef f(x: (y := 1)): pass\n"


def _compile(source: str | bytes, filename: str) -> types.CodeType:
    """What Mitogen's own ``compile(source, filename, "exec")`` gives (no future flags)."""
    return compile(source, filename, "exec", 0, True)


@pytest.fixture
def plugin(monkeypatch: pytest.MonkeyPatch, derived_cache_dir: Path) -> types.ModuleType:
    """The plugin, loaded afresh (no scans in memory), with a private cache dir; what it
    replaces in Mitogen is put back afterwards."""
    monkeypatch.setattr(mitogen.master, "compile", builtins.compile, raising=False)
    monkeypatch.setattr(ansible_mitogen.module_finder, "compile", builtins.compile,
                        raising=False)
    monkeypatch.setattr(mitogen.minify, "minimize_source", mitogen.minify.minimize_source)
    monkeypatch.setattr(ansible_mitogen.planner, "_load_collections",
                        ansible_mitogen.planner._load_collections)
    monkeypatch.setattr(mitogen.parent.Connection, "get_econtext_config",
                        mitogen.parent.Connection.get_econtext_config)
    monkeypatch.setattr(ansible_mitogen.services.ContextService, "_send_module_forwards",
                        ansible_mitogen.services.ContextService._send_module_forwards)
    monkeypatch.setattr(ansible_mitogen.affinity, "policy", ansible_mitogen.affinity.policy)
    monkeypatch.setattr(mitogen.parent.Connection, "start_child",
                        mitogen.parent.Connection.start_child)
    # As Ansible loads it: through its collection loader, which finds the plugin's
    # plugin_utils (the plugin imports nothing of fem_ansible's).
    forget_plain_imports(monkeypatch)
    if AnsibleCollectionConfig.collection_finder is None:
        init_plugin_loader([str(data_dir() / "collections")])
    monkeypatch.delitem(sys.modules, PLUGIN_NAME, raising=False)
    return importlib.import_module(PLUGIN_NAME)


def _reload(plugin: types.ModuleType, new_run) -> None:
    """As a new run: nothing in memory, the directory opened again."""
    plugin._scans.clear()
    new_run()


def _entries(cache: Path) -> list[Path]:
    return sorted(cache.iterdir())


def test_the_code_is_what_compile_gives_and_is_read_back_by_the_next_run(
        plugin, derived_cache_dir, new_run):
    cache = derived_cache_dir
    for source in (SOURCE, WALRUS, WALRUS.encode()):
        assert plugin.cached_compile(source, "m.py", "exec") == _compile(source, "m.py")
    # str and bytes of one text are two entries, as another file name would be
    assert len(_entries(cache)) == 3
    entry = next(p for p in _entries(cache)
                 if marshal.loads(p.read_bytes()) == _compile(SOURCE, "m.py"))
    assert entry.stat().st_mode & 0o777 == 0o600
    # The next run reads the entry instead of compiling.
    _reload(plugin, new_run)
    entry.write_bytes(marshal.dumps(_compile("import marker_only_in_the_cache\n", "m.py")))
    assert "marker_only_in_the_cache" in plugin.cached_compile(SOURCE, "m.py", "exec").co_names
    assert not [p for p in _entries(cache) if p.name.endswith(".tmp")]


def test_an_entry_that_is_not_code_is_compiled_again_and_replaced(plugin, derived_cache_dir,
                                                                  new_run):
    plugin.cached_compile(SOURCE, "m.py", "exec")
    [entry] = _entries(derived_cache_dir)
    entry.write_bytes(marshal.dumps({"not": "code"}))
    _reload(plugin, new_run)
    assert plugin.cached_compile(SOURCE, "m.py", "exec") == _compile(SOURCE, "m.py")
    assert marshal.loads(entry.read_bytes()) == _compile(SOURCE, "m.py")


def test_other_compiles_pass_through_untouched(plugin, derived_cache_dir):
    assert plugin.cached_compile("1 + 1", "e", "eval").co_filename == "e"
    plugin.cached_compile(SOURCE, "m.py", "exec", 0, True)
    assert not _entries(derived_cache_dir)


def test_mitogen_uses_the_cached_scans_and_sends_modules_unminified(plugin):
    assert mitogen.master.compile is plugin.cached_compile
    assert ansible_mitogen.module_finder.compile is plugin.cached_compile
    assert mitogen.minify.minimize_source(b"x = 1  # kept\n") == "x = 1  # kept\n"
    assert ansible_mitogen.planner._load_collections is plugin._load_collections


def _collection(root: Path, namespace: str, name: str) -> Path:
    path = root / namespace / name
    path.mkdir(parents=True)
    (path / "galaxy.yml").write_text(f"namespace: {namespace}\nname: {name}\nversion: 1.0.0\n"
                                     "authors: [fem]\nreadme: README.md\n")
    return path


def test_collections_are_listed_as_ansible_lists_them_without_galaxy(tmp_path: Path):
    """In a fresh ``ansible-playbook``-like process: the plugin's import leaves
    ``ansible.collections.list`` (and with it ansible-galaxy's CLI) unexecuted, its listing
    is Ansible's own (a second path, given as its ``ansible_collections`` dir, with a
    collection the view has too, which the view's shadows, one of its own, a hidden dir and
    a stray file), and the module works as Ansible's once something uses it."""
    view = collections_view(tmp_path / "work")
    extra = tmp_path / "extra" / "ansible_collections"
    shadowed = _collection(extra, "community", "docker")
    _collection(extra, "acme", "tools")
    (extra / ".cache" / "junk").mkdir(parents=True)
    (extra / "acme" / "README").write_text("not a collection")
    script = f"""
import importlib.util, json, sys
from ansible.plugins.loader import init_plugin_loader
from ansible.utils.collection_loader import AnsibleCollectionConfig
init_plugin_loader()
spec = importlib.util.spec_from_file_location("plugin", {str(PLUGIN)!r})
plugin = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plugin)
import inspect
inspect.stack()  # as every Ansible deprecation warning does
galaxy_after_import = "ansible.cli.galaxy" in sys.modules
class Invocation:
    _extra_sys_paths = set()
plugin._load_collections(Invocation)
galaxy_after_listing = "ansible.cli.galaxy" in sys.modules
import ansible.collections.list
ansible_listing = sorted(p.decode() for p in ansible.collections.list.list_collection_dirs())
from ansible.collections.list import list_collections
real = sys.modules["ansible.collections.list"]
print(json.dumps([galaxy_after_import, galaxy_after_listing, sorted(Invocation._extra_sys_paths),
                  ansible_listing, type(real).__name__, ansible.collections.list is real,
                  list_collections is real.list_collections]))
"""
    env = {"ANSIBLE_COLLECTIONS_PATH": f"{view}:{extra}",
           **{k: v for k, v in collections_env(view).items() if k != "ANSIBLE_COLLECTIONS_PATH"}}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    galaxy_after_import, galaxy_after_listing, ours, ansibles, *real = json.loads(
        proc.stdout.splitlines()[-1])
    assert not galaxy_after_import and not galaxy_after_listing
    assert ours == ansibles
    assert str(view / "ansible_collections/community/docker") in ours
    assert str(extra / "acme/tools") in ours and str(shadowed) not in ours
    assert real == ["module", True, True]


@pytest.fixture
def router(plugin) -> Iterator[mitogen.master.Router]:
    """A Mitogen master configured as ansible_mitogen's multiplexer: Ansible's packages are
    served to hosts in place of their own."""
    broker = mitogen.master.Broker()
    router = mitogen.master.Router(broker)
    ansible_mitogen.process._setup_responder(router.responder)
    yield router
    broker.shutdown()
    broker.join()


@pytest.fixture
def connect(router) -> Callable[..., mitogen.core.Context]:
    """A new context, as ansible_mitogen's ContextService makes one: connected, then sent
    its modules ahead of time, before anything runs there."""
    service = ansible_mitogen.services.ContextService(router)

    def connect(**kwargs) -> mitogen.core.Context:
        context = router.local(**kwargs)
        service._send_module_forwards(context)
        return context

    return connect


_FILE_OF = "__import__('importlib').import_module({!r}).__file__"
# A module of Ansible's that imports no __main__ (a bare Mitogen context has none).
CONVERTERS = "ansible.module_utils.common.text.converters"
OTHER_INTERPRETER = [sys.executable, "-X", "utf8"]


def _file_of(context: mitogen.core.Context, name: str) -> str:
    return context.call(eval, _FILE_OF.format(name))


def test_the_listeners_own_host_imports_ansible_from_its_installed_files(plugin, connect):
    own = connect(python_path=[sys.executable])
    for name in (CONVERTERS, "ansible_mitogen.target"):
        assert _file_of(own, name) == importlib.util.find_spec(name).origin
    # Mitogen's own modules still come from the multiplexer.
    assert _file_of(own, "mitogen.fork").startswith("master:")


def test_any_other_interpreter_or_connection_is_sent_ansible(plugin, connect):
    assert _file_of(connect(python_path=OTHER_INTERPRETER), CONVERTERS).startswith("master:")
    ssh = mitogen.parent.Connection.__new__(mitogen.ssh.Connection)
    ssh.options = types.SimpleNamespace(python_path=[sys.executable])
    assert not plugin.runs_controller_files(ssh)


def test_a_context_started_by_the_listeners_own_host_is_sent_ansible(plugin, connect):
    """As for ``become`` on localhost or a host with ``mitogen_via: localhost``: another
    user, environment or interpreter, so Mitogen's policy."""
    own = connect(python_path=[sys.executable])
    through = connect(via=own, python_path=[sys.executable])
    assert _file_of(through, CONVERTERS).startswith("master:")
    assert _file_of(own, CONVERTERS) == importlib.util.find_spec(CONVERTERS).origin


def _shadow(directory: Path, package: str) -> None:
    (directory / package).mkdir()
    (directory / package / "__init__.py").write_text("raise ImportError('shadow')\n")


@pytest.mark.parametrize("package", ["ansible", "ansible_mitogen"])
def test_a_package_shadowed_on_the_hosts_import_path_leaves_it_on_mitogens_policy(
        plugin, connect, tmp_path, monkeypatch, package):
    """A host's import path starts with its working directory (a run's ``project/``, or
    wherever else ``ansible-playbook`` was started): a package of that name there is not the
    controller's."""
    _shadow(tmp_path, package)
    monkeypatch.chdir(tmp_path)
    host = connect(python_path=[sys.executable])
    for name in (CONVERTERS, "ansible_mitogen.target"):
        assert _file_of(host, name).startswith("master:")


@pytest.mark.parametrize("package", ["ansible_collections", "fem_ansible"])
def test_the_hosts_check_comes_from_the_multiplexer(plugin, connect, tmp_path, monkeypatch,
                                                    package):
    """The check the host runs is fem.core's, which Mitogen always serves from the
    multiplexer: nothing in the host's working directory stands in for it (before, a
    ``fem_ansible`` there kept the check from running)."""
    _shadow(tmp_path, package)
    monkeypatch.chdir(tmp_path)
    host = connect(python_path=[sys.executable])
    assert _file_of(host, CONVERTERS) == importlib.util.find_spec(CONVERTERS).origin


def test_a_source_modifier_for_what_the_host_would_import_keeps_it_on_mitogens_path(
        plugin, router):
    local = mitogen.parent.Connection.__new__(mitogen.parent.Connection)
    local.options = types.SimpleNamespace(python_path=[sys.executable])
    local._router = router
    assert plugin.runs_controller_files(local)
    router.responder.add_source_modifier("ansible.module_utils._embed.dnf",
                                         lambda *module: module)
    assert not plugin.runs_controller_files(local)


def test_the_listeners_own_host_is_sent_only_mitogens_modules_ahead_of_time(
        plugin, router, connect, monkeypatch):
    sent = {}
    monkeypatch.setattr(router.responder, "forward_modules",
                        lambda context, names: sent.setdefault(context, list(names)))
    own = connect(python_path=[sys.executable])
    other = connect(python_path=OTHER_INTERPRETER)
    assert sent[own] == ["mitogen.fork", "mitogen.service"]
    assert sent[other] == list(ansible_mitogen.services.ContextService.ALWAYS_PRELOAD)


def _cpus(status_line: str) -> set[int]:
    """The CPUs of a ``Cpus_allowed_list:`` line of /proc/<pid>/status."""
    cpus: set[int] = set()
    for part in status_line.split(":", 1)[1].strip().split(","):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def test_a_runs_processes_may_use_every_cpu(tmp_path: Path):
    """A real ``ansible-playbook`` under the plugin: a worker and the host's interpreter's
    children are allowed the CPUs this test is allowed.  Mitogen pins them (on 2 CPUs all
    on CPU 1, the multiplexer on CPU 0), and every run of the listener pinned the same
    way, so runs side by side shared one CPU (bench/RESULTS.md)."""
    from fem_ansible.runner import ansible_env, playbook_command, scan_cache_dir

    playbook = tmp_path / "play.yml"
    playbook.write_text(f"""
- hosts: localhost
  gather_facts: false
  tasks:
    - name: A child of the host's interpreter
      ansible.builtin.shell: grep Cpus_allowed_list /proc/self/status > {tmp_path}/host
      changed_when: true
    - name: The worker (the parent of the lookup's shell)
      ansible.builtin.copy:
        content: "{{{{ lookup('ansible.builtin.pipe', parents_cpus) }}}}"
        dest: {tmp_path}/worker
        mode: "0600"
      vars:
        parents_cpus: grep Cpus_allowed_list /proc/$PPID/status
""")
    work = tmp_path / "work"
    env = {**os.environ, **ansible_env("fem-test", "mitogen", collections_view(work),
                                       scan_cache_dir(work))}
    done = subprocess.run(
        playbook_command("-i", "localhost,", "-c", "local",
                         "-e", f"ansible_python_interpreter={sys.executable}", str(playbook)),
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    allowed = os.sched_getaffinity(0)
    for name in ("host", "worker"):
        assert _cpus((tmp_path / name).read_text()) == allowed, name
