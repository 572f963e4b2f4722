"""Role files parsed once in the resident Ansible (fem_ansible.parsed_roles, fast path group
``parsed_roles``): what a run parsed and reported, the server parses ahead; a later run's
load answered from it gives what Ansible's own load gives (data, types, origins, trust; the
loader's cache as Ansible leaves it); a changed file is parsed by the run; what said
something, holds vault data, cost too much or is no regular file is left to the runs; only
role loads are answered; nothing a report holds can stop the server."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from ansible.module_utils._internal._datatag import AnsibleTagHelper
from ansible.parsing.dataloader import DataLoader
from ansible.utils.display import Display

from fem_ansible import parsed_roles

REPO = Path(__file__).resolve().parent.parent

TASKS = """\
---
- name: Say {{ greeting }}
  ansible.builtin.debug:
    msg: !unsafe "{{ not a template }}"
  tags: [a, b]
- name: Numbers and nulls
  ansible.builtin.set_fact:
    n: 1
    f: 1.5
    none: ~
    flag: yes
"""
DEFAULTS = "---\ngreeting: hello\nnested: {list: [1, two, {three: 3}]}\n"
DUPLICATE = "---\nkey: 1\nkey: 2\n"
INLINE_VAULT = """\
---
secret: !vault |
  $ANSIBLE_VAULT;1.1;AES256
  3132
"""

#: Ansible's own load, taken before any test installs the group (each puts it back).
STOCK = DataLoader.load_from_file


def stock_load(path: str, **flags: Any) -> Any:
    """What Ansible's own loader gives."""
    return STOCK(DataLoader(), path, **flags)


def tagged(value: Any) -> Any:
    """``value`` with its types and every tag (origin, trust) spelled out, for comparing."""
    tags = sorted(repr(t) for t in AnsibleTagHelper.tags(value))
    if isinstance(value, dict):
        inner: Any = {k: tagged(v) for k, v in value.items()}
        return (type(value).__name__, tags, sorted(inner.items(), key=repr),
                [tagged(k) for k in value])
    if isinstance(value, list):
        return (type(value).__name__, tags, [tagged(v) for v in value])
    return (type(value).__name__, tags, value)


def role_load(path: Path | str) -> Any:
    """A run's load of a role file (the flags roles load with), by a new loader."""
    return DataLoader().load_from_file(str(path), trusted_as_template=True)


def run_ends(tmp_path: Path) -> None:
    """What a run's end and the idle server do: the run reports what it parsed, the server
    learns it and parses it all."""
    report = tmp_path / "run.parsed"
    parsed_roles.report(str(report))
    parsed_roles._used.clear()
    parsed_roles.learn(str(report))
    assert not report.exists()
    while parsed_roles.pending():
        assert parsed_roles.work(10.0, lambda: False) is None


@pytest.fixture
def installed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The group installed, as in a server and its runs, until the test ends, with
    ``tmp_path/roles`` the roles path; returns a role dir in it."""
    from ansible import constants

    monkeypatch.setattr(DataLoader, "load_from_file", DataLoader.load_from_file)
    for name, value in (("_entries", {}), ("_wanted", {}), ("_used", {}), ("_refused", {}),
                        ("_state", {"on": False})):
        monkeypatch.setattr(parsed_roles, name, value)
    monkeypatch.setattr(constants, "DEFAULT_ROLES_PATH", [str(tmp_path / "roles")])
    parsed_roles.install()
    (tmp_path / "roles" / "site_role" / "vars").mkdir(parents=True)
    return tmp_path / "roles" / "site_role"


@pytest.fixture
def role(tmp_path: Path, installed) -> Path:
    """A role whose files a first run loaded, and its server parsed."""
    role = installed
    for sub, text in (("tasks/main.yml", TASKS), ("defaults/main.yml", DEFAULTS),
                      ("vars/dup.yml", DUPLICATE), ("vars/vaulted.yml", INLINE_VAULT)):
        (role / sub).parent.mkdir(parents=True, exist_ok=True)
        (role / sub).write_text(text)
    for path in sorted(role.rglob("*.yml")):
        role_load(path)
    run_ends(tmp_path)
    return role


def kept(role: Path) -> list[str]:
    return sorted(Path(p).relative_to(role).as_posix() for p in parsed_roles._entries)


def test_what_a_run_parsed_is_parsed_ahead_but_what_said_something_or_holds_a_vault(role):
    assert kept(role) == ["defaults/main.yml", "tasks/main.yml"]


def test_a_kept_file_loads_as_ansible_loads_it(role: Path):
    path = str(role / "tasks" / "main.yml")
    loader = DataLoader()
    first = loader.load_from_file(path, trusted_as_template=True)
    assert path not in parsed_roles._entries  # taken out by its first load
    assert tagged(first) == tagged(stock_load(path, trusted_as_template=True))
    # The loader's cache holds its own copy, as Ansible's load leaves it: a caller changing
    # what it got changes nothing of the next load's, and this loader reads the file once.
    expected = tagged(stock_load(path, trusted_as_template=True))
    first[0]["name"] = "changed"
    Path(path).write_text(TASKS.replace("Numbers", "Figures"))
    second = loader.load_from_file(path, trusted_as_template=True)
    assert second[0]["name"] == "Say {{ greeting }}"
    assert tagged(second) == expected
    defaults = role / "defaults" / "main.yml"
    assert tagged(role_load(defaults)) == tagged(stock_load(str(defaults),
                                                            trusted_as_template=True))


def test_a_changed_file_is_parsed_by_the_run_and_then_ahead_again(role: Path, tmp_path):
    path = role / "defaults" / "main.yml"
    st = path.stat()
    path.write_text(DEFAULTS.replace("hello", "howdy"))  # same size, timestamps put back
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert role_load(path)["greeting"] == "howdy"
    run_ends(tmp_path)
    assert str(path) in parsed_roles._entries
    assert role_load(path)["greeting"] == "howdy"
    assert str(path) not in parsed_roles._entries


def test_a_file_changed_after_the_run_parsed_it_is_left_to_the_next_run(installed, tmp_path):
    path = installed / "vars" / "defaults.yml"
    path.write_text(DEFAULTS)
    role_load(path)
    path.write_text(DEFAULTS + "more: 1\n")
    run_ends(tmp_path)
    assert parsed_roles._entries == {}
    assert role_load(path)["more"] == 1


def test_what_said_something_still_says_it_in_the_run(role: Path, monkeypatch):
    said: list[str] = []
    monkeypatch.setattr(Display, "warning", lambda _self, msg, *a, **k: said.append(msg))
    assert role_load(role / "vars" / "dup.yml") == {"key": 2}
    assert any("key" in message for message in said), said


def test_only_loads_with_the_flags_roles_load_with_are_answered(role: Path):
    path = str(role / "defaults" / "main.yml")
    for flags in ({"cache": "none", "trusted_as_template": True},
                  {"unsafe": True, "trusted_as_template": True},
                  {"cache": "vaulted", "trusted_as_template": True}, {}):
        DataLoader().load_from_file(path, **flags)
        assert path in parsed_roles._entries, flags
    assert tagged(DataLoader().load_from_file(path)) == tagged(stock_load(path))


def test_a_loader_that_read_the_file_already_keeps_its_own(role: Path):
    path = str(role / "defaults" / "main.yml")
    loader = DataLoader()
    untrusted = loader.load_from_file(path)  # cached untrusted, as Ansible caches it
    assert tagged(loader.load_from_file(path, trusted_as_template=True)) == tagged(untrusted)


def test_costly_files_are_left_to_the_runs(installed, tmp_path, monkeypatch):
    """A file a run took long to parse is not parsed by the server (a run waiting for it
    would wait that long), nor beyond the cost of all files kept."""
    files = []
    for i in range(4):
        files.append(installed / "vars" / f"v{i}.yml")
        files[-1].write_text(f"k{i}: {i}\n")
    report = tmp_path / "report"
    report.write_text(json.dumps([[str(files[0]), _digest(files[0]).hex(),
                                   parsed_roles.MAX_COST_S * 2]]))
    parsed_roles.learn(str(report))
    assert not parsed_roles.pending()
    monkeypatch.setattr(parsed_roles, "MAX_TOTAL_S", 0.25)
    parsed_roles._wanted.update({str(f): (_digest(f), 0.1) for f in files})
    while parsed_roles.pending():
        parsed_roles.work(10.0, lambda: False)
    assert len(parsed_roles._entries) == 2


def _digest(path: Path) -> bytes:
    return hashlib.sha256(path.read_bytes()).digest()


def test_no_regular_file_is_ever_read_ahead(installed, tmp_path):
    """A FIFO or device where a run found a role file before is never read by the server
    (it would block it)."""
    fifo, device = installed / "vars" / "fifo.yml", installed / "vars" / "device.yml"
    os.mkfifo(fifo)
    device.symlink_to("/dev/null")
    empty = hashlib.sha256(b"").digest()  # what both would read as
    parsed_roles._wanted.update({str(fifo): (empty, 0.0), str(device): (empty, 0.0)})
    done = threading.Thread(target=parsed_roles.work, args=(10.0, lambda: False), daemon=True)
    done.start()
    done.join(timeout=30)
    assert not done.is_alive(), "the server blocked"
    assert parsed_roles._entries == {}


def test_what_cannot_be_copied_is_left_to_the_runs(installed, tmp_path):
    deep = installed / "vars" / "deep.yml"
    deep.write_text("x: " + "[" * 600 + "1" + "]" * 600 + "\n")
    parsed_roles._wanted[str(deep)] = (_digest(deep), 0.01)
    assert parsed_roles.work(10.0, lambda: False) is None
    assert parsed_roles._entries == {}


@pytest.mark.parametrize("content", [b"not json", b'{"a": 1}', b'[["p", "00", 0.1]]',
                                     b'[["p", "' + b"0" * 64 + b'", "0.1"]]',
                                     b'[["p", "' + b"z" * 64 + b'", 0.1]]',
                                     b'[["p", "' + b"0" * 64 + b'", -1]]', b"[" * 100000])
def test_a_report_that_is_not_one_teaches_nothing(installed, tmp_path, content):
    report = tmp_path / "report"
    report.write_bytes(content)
    parsed_roles.learn(str(report))
    assert not parsed_roles.pending()
    parsed_roles.learn(str(tmp_path / "no such report"))
    assert not parsed_roles.pending()


def test_a_run_waiting_stops_the_parsing_between_files(role: Path, tmp_path):
    for path in sorted(role.rglob("*.yml")):
        parsed_roles._wanted[str(path)] = (_digest(path), 0.01)
    parsed_roles._entries.clear()
    parsed_roles.work(10.0, lambda: True)
    assert parsed_roles.pending() and len(parsed_roles._wanted) == 3


def test_a_failing_pass_stops_parsing_and_says_why(role: Path, monkeypatch, tmp_path):
    def broken(*_args: Any) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(parsed_roles, "_entries", type("Broken", (dict,), {"get": broken})())
    parsed_roles._wanted["x"] = (b"\0" * 32, 0.01)
    assert "disk on fire" in parsed_roles.work(1.0, lambda: False)
    assert not parsed_roles.pending()
    parsed_roles.learn(str(tmp_path / "report"))
    assert role_load(role / "defaults" / "main.yml")["greeting"] == "hello"


#: Two runs of one server, in a fresh interpreter (Ansible's collection loader is set up once
#: per process, and the built-in roles need fem.core): each loads the task playbook as
#: ansible-playbook does; between them, the first one's report is taken in and parsed.
TWO_RUNS = """
import json, sys
from ansible.parsing.dataloader import DataLoader
from ansible.playbook import Playbook
from ansible.plugins.loader import init_plugin_loader
from ansible.vars.manager import VariableManager
from fem_ansible import parsed_roles

init_plugin_loader()
parsed_roles.install()


def flatten(items):
    out = []
    for item in items:
        out += flatten(item.block + item.rescue + item.always) if hasattr(item, "block") \\
            else [item]
    return out


def tasks():
    loader = DataLoader()
    plays = Playbook.load(sys.argv[1], variable_manager=VariableManager(loader=loader),
                          loader=loader)
    return [(t.get_name(), repr(t.args)) for b in plays.get_plays()[0].compile()
            for t in flatten(b.block + b.always)]


first = tasks()
parsed_first = len(parsed_roles._used)
parsed_roles.report(sys.argv[2])
parsed_roles._used.clear()
parsed_roles.learn(sys.argv[2])
while parsed_roles.pending():
    assert parsed_roles.work(10.0, lambda: False) is None
kept = len(parsed_roles._entries)
second = tasks()
print(json.dumps({"same": first == second, "tasks": len(first), "parsed_first": parsed_first,
                  "kept": kept, "left": len(parsed_roles._entries),
                  "parsed_second": len(parsed_roles._used)}))
"""


def test_the_task_playbook_loads_its_roles_from_entries(tmp_path):
    """Ansible's own playbook loading, on the built-in roles, twice, as two runs of one
    server: the second's role files are answered from the entries the first one's report
    made, and what it loads is what the first one loaded."""
    env = {**os.environ, "ANSIBLE_ROLES_PATH": str(REPO / "roles"),
           "ANSIBLE_COLLECTIONS_PATH": str(REPO / "collections"), "ANSIBLE_CONFIG": ""}
    done = subprocess.run([sys.executable, "-c", TWO_RUNS, str(REPO / "playbooks" / "task.yml"),
                           str(tmp_path / "run.parsed")], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.splitlines()[-1])
    assert seen["same"] and seen["tasks"] > 20, seen
    assert seen["parsed_first"] >= 20 and seen["kept"] == seen["parsed_first"], seen
    assert seen["parsed_second"] == 0 and seen["left"] <= seen["kept"] - 20, seen


def test_only_role_files_are_noted_and_learnt(installed, tmp_path):
    """A task's own files (ansible-runner's extra vars, the run's private data) and
    playbooks match the flags roles load with, but are no role's: the server never parses
    or holds them."""
    extravars = tmp_path / "pdd" / "env" / "extravars"
    extravars.parent.mkdir(parents=True)
    extravars.write_text("fem_task: {task_id: t1}\n")
    role_file = installed / "vars" / "main.yml"
    role_file.write_text(DEFAULTS)
    role_load(extravars)
    role_load(role_file)
    assert list(parsed_roles._used) == [str(role_file)]
    report = tmp_path / "report"
    report.write_text(json.dumps([[str(extravars), _digest(extravars).hex(), 0.001],
                                  [str(role_file), _digest(role_file).hex(), 0.001]]))
    parsed_roles.learn(str(report))
    assert list(parsed_roles._wanted) == [str(role_file)]


def test_what_is_not_kept_is_not_parsed_again_for_the_same_bytes(role: Path, tmp_path,
                                                                  monkeypatch):
    parses: list[str] = []
    real = parsed_roles._parse
    monkeypatch.setattr(parsed_roles, "_parse",
                        lambda path, digest: parses.append(path) or real(path, digest))
    for _ in range(3):
        role_load(role / "vars" / "dup.yml")
        run_ends(tmp_path)
    assert parses == []
    (role / "vars" / "dup.yml").write_text(DUPLICATE + "other: 1\n")
    role_load(role / "vars" / "dup.yml")
    run_ends(tmp_path)
    assert [Path(p).name for p in parses] == ["dup.yml"]


@pytest.mark.parametrize("content", [b"---\nx: !!omap [{a: 1}]\n", b"---\nx: caf\xe9\n"])
def test_what_a_run_is_warned_of_is_left_to_it(installed, tmp_path, content):
    """A deprecated YAML type, a file not in UTF-8: the run parses it, with its message."""
    path = installed / "vars" / "odd.yml"
    path.write_bytes(content)
    parsed_roles._wanted[str(path)] = (_digest(path), 0.01)
    assert parsed_roles.work(10.0, lambda: False) is None
    assert parsed_roles._entries == {}


def test_json_only_loads_are_not_answered(role: Path):
    path = str(role / "defaults" / "main.yml")
    with pytest.raises(Exception, match="JSON"):
        DataLoader().load_from_file(path, trusted_as_template=True, json_only=True)
    assert path in parsed_roles._entries


def test_entries_of_files_gone_or_changed_make_room(installed, tmp_path, monkeypatch):
    monkeypatch.setattr(parsed_roles, "MAX_TOTAL_S", 0.15)
    old, new = installed / "vars" / "old.yml", installed / "vars" / "new.yml"
    old.write_text("a: 1\n")
    new.write_text("b: 2\n")
    parsed_roles._wanted[str(old)] = (_digest(old), 0.1)
    parsed_roles.work(10.0, lambda: False)
    old.unlink()
    parsed_roles._wanted[str(new)] = (_digest(new), 0.1)
    parsed_roles.work(10.0, lambda: False)
    assert list(parsed_roles._entries) == [str(new)]


def test_a_report_is_removed_even_when_parsing_stopped(installed, tmp_path):
    report, tmp = tmp_path / "run.parsed", tmp_path / "run.parsed.tmp"
    report.write_text("[]")
    tmp.write_text("[")
    parsed_roles._state["on"] = False
    parsed_roles.learn(str(report))
    assert not report.exists() and not tmp.exists()



def test_the_budget_holds_when_a_changed_files_old_entry_is_evicted(installed, monkeypatch):
    monkeypatch.setattr(parsed_roles, "MAX_TOTAL_S", 0.25)
    a, b = installed / "vars" / "a.yml", installed / "vars" / "b.yml"
    a.write_text("a: 1\n")
    b.write_text("b: 1\n")
    parsed_roles._wanted.update({str(a): (_digest(a), 0.1), str(b): (_digest(b), 0.1)})
    parsed_roles.work(10.0, lambda: False)
    a.write_text("a: 2\n")
    parsed_roles._wanted[str(a)] = (_digest(a), 0.2)
    parsed_roles.work(10.0, lambda: False)
    assert parsed_roles.kept()[1] <= 0.25
