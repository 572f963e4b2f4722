"""fem-ansible's ``ansible-playbook``: Ansible's own command, with the collections' routing
metadata read from the cache a previous run left."""

from __future__ import annotations

import marshal
import os
import subprocess
import sys
from pathlib import Path

import ansible
from ansible.utils.collection_loader import _collection_meta

from fem_ansible import playbook_cli, runner
from fem_ansible.fastpath import derived_cache

BUILTIN_RUNTIME = Path(ansible.__file__).parent / "config/ansible_builtin_runtime.yml"


def _entry(data: bytes) -> str:
    return derived_cache.entry_name(b"routing", playbook_cli._PARSER, data)


def test_the_entry_is_named_by_the_text_and_what_parses_it():
    assert playbook_cli._PARSER.startswith(f"ansible {ansible.__version__} PyYAML ".encode())


def test_routing_is_what_ansible_parses_and_is_read_back(derived_cache_dir: Path):
    cache = derived_cache_dir
    parse = _collection_meta._meta_yml_to_dict
    routing = playbook_cli.cached_routing(parse)
    data = BUILTIN_RUNTIME.read_bytes()
    assert routing(data, ("ansible.builtin", "runtime.yml")) == parse(data, None)
    assert marshal.loads((cache / _entry(data)).read_bytes()) == parse(data, None)
    (cache / _entry(data)).write_bytes(marshal.dumps({"planted": "1"}))
    assert routing(data, None) == {"planted": "1"}
    # Other YAML (as text, as a collection's may come) is another entry.
    assert routing("plugin_routing: {}\n", None) == {"plugin_routing": {}}
    assert (cache / _entry(b"plugin_routing: {}\n")).is_file()


def _ansible_playbook(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(runner.playbook_command(*args),
                          env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_a_real_run_reads_the_routing_a_previous_run_kept(tmp_path: Path):
    """A playbook calling a module that only a planted routing entry knows runs: Ansible
    used the cache.  Without the planted entry the same playbook fails, and the entry the
    first run kept is Ansible's own parse."""
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    playbook = tmp_path / "play.yml"
    playbook.write_text(
        "- hosts: localhost\n  gather_facts: false\n  tasks:\n"
        "    - fem_planted_debug: {msg: routed-through-the-cache}\n")
    env = {**os.environ, derived_cache.CACHE_ENV: str(cache), "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_LOCALHOST_WARNING": "False", "ANSIBLE_INVENTORY_UNPARSED_WARNING": "False"}
    first = _ansible_playbook(str(playbook), env=env, cwd=tmp_path)
    assert first.returncode != 0 and "fem_planted_debug" in first.stdout + first.stderr
    entry = cache / _entry(BUILTIN_RUNTIME.read_bytes())
    routing = marshal.loads(entry.read_bytes())
    assert routing == _collection_meta._meta_yml_to_dict(BUILTIN_RUNTIME.read_bytes(), None)

    for kind in ("modules", "action"):  # debug is an action with a module stub
        routing["plugin_routing"][kind]["fem_planted_debug"] = {
            "redirect": "ansible.builtin.debug"}
    entry.write_bytes(marshal.dumps(routing))
    second = _ansible_playbook(str(playbook), env=env, cwd=tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "routed-through-the-cache" in second.stdout


def test_it_is_ansible_playbook_with_its_own_name_and_exit_code(tmp_path: Path):
    out = _ansible_playbook("--version", env=dict(os.environ), cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.startswith("ansible-playbook [core ")
    assert f"executable location = {Path(sys.executable).parent / 'ansible-playbook'}" in out.stdout
    assert _ansible_playbook(str(tmp_path / "missing.yml"), env=dict(os.environ),
                             cwd=tmp_path).returncode != 0


def test_the_heap_is_frozen_at_exit_and_atexit_cleanup_still_runs(tmp_path: Path):
    """Finalization's garbage collections skip Ansible's heap (gc.freeze), and what Ansible
    does at exit still happens: its local temporary directory is removed."""
    playbook = tmp_path / "play.yml"
    playbook.write_text("- hosts: localhost\n  gather_facts: false\n  tasks:\n"
                        "    - ansible.builtin.debug: {msg: hello}\n")
    local_tmp = tmp_path / "local-tmp"
    probe = ("import atexit, gc, sys\n"
             "atexit.register(lambda: print('frozen', gc.get_freeze_count(), file=sys.stderr))\n"
             "from fem_ansible.playbook_cli import main\n"
             f"sys.argv[1:] = [{str(playbook)!r}]\n"
             "main()\n")
    env = {**os.environ, "ANSIBLE_LOCAL_TEMP": str(local_tmp),
           "ANSIBLE_LOCALHOST_WARNING": "False", "ANSIBLE_INVENTORY_UNPARSED_WARNING": "False"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    frozen = int(out.stderr.split("frozen ")[1].split()[0])
    assert frozen > 10_000, out.stderr
    assert local_tmp.is_dir() and list(local_tmp.iterdir()) == []
