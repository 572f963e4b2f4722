"""Role files parsed once in the resident Ansible (fem_ansible.parsed_roles, fast path group
``parsed_roles``): a load answered from an entry gives what Ansible's own load gives (data,
types, origins, trust; the loader's cache as Ansible leaves it), a changed file is parsed
again, what said something or holds vault data is not kept, and only role loads are
answered."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from ansible.module_utils._internal._datatag import AnsibleTagHelper
from ansible.parsing.dataloader import DataLoader
from ansible.playbook import Playbook
from ansible.plugins.loader import init_plugin_loader
from ansible.utils.display import Display
from ansible.vars.manager import VariableManager

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


def parse_all() -> None:
    """A whole pass of the server's parsing, now."""
    parsed_roles._parser.next_pass = 0.0
    while parsed_roles.pending():
        assert parsed_roles.work(10.0, lambda: False) is None


@pytest.fixture
def installed(monkeypatch: pytest.MonkeyPatch) -> Callable[[Path], None]:
    """Installs the group on a roles dir until the test ends, files settled at once."""
    monkeypatch.setattr(DataLoader, "load_from_file", DataLoader.load_from_file)
    monkeypatch.setattr(parsed_roles, "_entries", {})
    monkeypatch.setattr(parsed_roles, "_parser", None)
    monkeypatch.setattr(parsed_roles, "SETTLE_S", 0.0)
    return lambda roles: parsed_roles.install([str(roles)])


@pytest.fixture
def roles(tmp_path: Path, installed) -> Path:
    """A roles dir with one role, parsed."""
    role = tmp_path / "roles" / "site_role"
    for sub, text in (("tasks/main.yml", TASKS), ("defaults/main.yml", DEFAULTS),
                      ("vars/dup.yml", DUPLICATE), ("vars/vaulted.yml", INLINE_VAULT),
                      ("tasks/nested/more.yaml", TASKS), ("files/not_a_role_file.yml", TASKS)):
        (role / sub).parent.mkdir(parents=True, exist_ok=True)
        (role / sub).write_text(text)
    installed(tmp_path / "roles")
    parse_all()
    return role


def test_what_is_kept(roles: Path):
    assert sorted(Path(p).relative_to(roles).as_posix() for p in parsed_roles._entries) == \
        ["defaults/main.yml", "tasks/main.yml", "tasks/nested/more.yaml"]


def test_a_kept_file_loads_as_ansible_loads_it(roles: Path):
    path = str(roles / "tasks" / "main.yml")
    loader = DataLoader()
    first = loader.load_from_file(path, trusted_as_template=True)
    assert path not in parsed_roles._entries  # taken out by its first load
    assert tagged(first) == tagged(stock_load(path, trusted_as_template=True))
    # The loader's cache holds its own copy, as Ansible's load leaves it: a caller changing
    # what it got changes nothing of the next load's.
    first[0]["name"] = "changed"
    second = loader.load_from_file(path, trusted_as_template=True)
    assert second[0]["name"] == "Say {{ greeting }}"
    assert tagged(second) == tagged(stock_load(path, trusted_as_template=True))
    defaults = str(roles / "defaults" / "main.yml")
    assert tagged(DataLoader().load_from_file(defaults, trusted_as_template=True)) == \
        tagged(stock_load(defaults, trusted_as_template=True))


def test_a_file_changed_since_it_was_parsed_is_parsed_again(roles: Path):
    path = roles / "defaults" / "main.yml"
    path.write_text(DEFAULTS.replace("hello", "howdy"))  # same size, same second
    assert DataLoader().load_from_file(str(path), trusted_as_template=True)["greeting"] == "howdy"
    parse_all()
    assert str(path) in parsed_roles._entries
    assert DataLoader().load_from_file(str(path), trusted_as_template=True)["greeting"] == "howdy"


def test_a_later_pass_parses_new_files_and_forgets_gone_ones(roles: Path):
    (roles / "tasks" / "nested" / "more.yaml").unlink()
    (roles / "handlers").mkdir()
    (roles / "handlers" / "main.yml").write_text(TASKS)
    parse_all()
    assert sorted(Path(p).relative_to(roles).as_posix() for p in parsed_roles._entries) == \
        ["defaults/main.yml", "handlers/main.yml", "tasks/main.yml"]


def test_what_said_something_is_not_kept_and_says_it_in_the_run(roles: Path, monkeypatch):
    said: list[str] = []
    monkeypatch.setattr(Display, "warning", lambda _self, msg, *a, **k: said.append(msg))
    data = DataLoader().load_from_file(str(roles / "vars" / "dup.yml"), trusted_as_template=True)
    assert data == {"key": 2}
    assert any("key" in message for message in said), said


def test_only_loads_with_the_flags_roles_load_with_are_answered(roles: Path):
    path = str(roles / "defaults" / "main.yml")
    for flags in ({"cache": "none", "trusted_as_template": True},
                  {"unsafe": True, "trusted_as_template": True},
                  {"cache": "vaulted", "trusted_as_template": True}, {}):
        DataLoader().load_from_file(path, **flags)
        assert path in parsed_roles._entries, flags
    untrusted = DataLoader().load_from_file(path)
    assert tagged(untrusted) == tagged(stock_load(path))


def test_a_loader_that_read_the_file_already_keeps_its_own(roles: Path):
    path = str(roles / "defaults" / "main.yml")
    loader = DataLoader()
    untrusted = loader.load_from_file(path)  # cached untrusted, as Ansible caches it
    again = loader.load_from_file(path, trusted_as_template=True)
    assert tagged(again) == tagged(untrusted)


def test_the_task_playbook_loads_its_roles_from_entries(installed, monkeypatch):
    """Ansible's own playbook loading, on the built-in roles: each role file it reads is
    answered from an entry, and what it loads is what it loads stock."""
    init_plugin_loader()
    from ansible import constants

    monkeypatch.setattr(constants, "DEFAULT_ROLES_PATH", [str(REPO / "roles")])

    def tasks() -> list[tuple[str, str]]:
        loader = DataLoader()
        plays = Playbook.load(str(REPO / "playbooks" / "task.yml"),
                              variable_manager=VariableManager(loader=loader), loader=loader)
        out = []
        for block in plays.get_plays()[0].compile():
            for task in _flatten(block.block + block.always):
                out.append((task.get_name(), repr(task.args)))
        return out

    stock = tasks()
    installed(REPO / "roles")
    parse_all()
    kept = len(parsed_roles._entries)
    answered = tasks()
    assert answered == stock
    assert kept - len(parsed_roles._entries) >= 20, (kept, len(parsed_roles._entries))


def _flatten(items: list[Any]) -> list[Any]:
    out = []
    for item in items:
        if hasattr(item, "block"):
            out += _flatten(item.block + item.rescue + item.always)
        else:
            out.append(item)
    return out



def test_a_file_changed_just_now_is_left_for_a_later_pass(roles: Path, monkeypatch):
    """A same-size change within the file system's timestamp granularity would look like
    no change: a file is parsed only once it has settled, in a pass soon after."""
    monkeypatch.setattr(parsed_roles, "SETTLE_S", 3.0)
    path = roles / "defaults" / "main.yml"
    path.write_text(DEFAULTS.replace("hello", "howdy"))
    parse_all()
    assert str(path) not in parsed_roles._entries
    assert parsed_roles._parser.next_pass <= __import__("time").monotonic() + 3.0
    assert DataLoader().load_from_file(str(path), trusted_as_template=True)["greeting"] == "howdy"


def test_what_is_no_regular_file_or_too_deep_never_stops_a_pass(tmp_path: Path, installed):
    """Hostile names on the roles path, in a role no run uses: a FIFO and a device where a
    vars file would be (never opened for reading), YAML nested too deep to copy, a tree of
    dirs deeper than the walk goes: the pass ends, what is sound is kept."""
    role = tmp_path / "roles" / "odd"
    for sub in ("vars", "defaults", "tasks", "meta"):
        (role / sub).mkdir(parents=True)
    os.mkfifo(role / "vars" / "main.yml")
    (role / "meta" / "main.yml").symlink_to("/dev/zero")
    (role / "defaults" / "main.yml").write_text("x: " + "[" * 600 + "1" + "]" * 600 + "\n")
    deep = role / "tasks" / "/".join(["d"] * (parsed_roles.MAX_DEPTH + 5))
    deep.mkdir(parents=True)
    (deep / "main.yml").write_text(TASKS)
    (role / "tasks" / "main.yml").write_text(TASKS)
    installed(tmp_path / "roles")
    done = threading.Thread(target=parse_all, daemon=True)
    done.start()
    done.join(timeout=60)
    assert not done.is_alive(), "a pass blocked"
    assert sorted(Path(p).relative_to(role).as_posix() for p in parsed_roles._entries) == \
        ["tasks/main.yml"]


def test_what_is_not_kept_is_not_parsed_again_until_it_changes(roles: Path, monkeypatch):
    parses: list[str] = []
    real = parsed_roles._parse
    monkeypatch.setattr(parsed_roles, "_parse", lambda path: parses.append(path) or real(path))
    parse_all()
    assert parses == []
    (roles / "vars" / "dup.yml").write_text(DUPLICATE + "other: 1\n")
    parse_all()
    assert [Path(p).name for p in parses] == ["dup.yml"]


def test_bytes_kept_are_bounded(tmp_path: Path, installed, monkeypatch):
    role = tmp_path / "roles" / "big" / "vars"
    role.mkdir(parents=True)
    for i in range(6):
        (role / f"v{i}.yml").write_text(f"k{i}: {'x' * 1000}\n")
    monkeypatch.setattr(parsed_roles, "MAX_BYTES", 3500)
    installed(tmp_path / "roles")
    parse_all()
    assert len(parsed_roles._entries) == 3
    assert parsed_roles._parser.kept == sum(e[0][2] for e in parsed_roles._entries.values())


def test_a_run_waiting_stops_the_parsing_between_files(roles: Path):
    parsed_roles._parser.next_pass = 0.0
    parsed_roles.work(10.0, lambda: True)
    assert parsed_roles.pending() and parsed_roles._parser.todo is not None
    assert len(parsed_roles._parser.seen) == 1


def test_a_failing_pass_stops_parsing_and_says_why(roles: Path, monkeypatch):
    def broken(_path):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(parsed_roles, "_names", broken)
    parsed_roles._parser.next_pass = 0.0
    assert "disk on fire" in parsed_roles.work(1.0, lambda: False)
    assert not parsed_roles.pending()
    path = str(roles / "defaults" / "main.yml")
    assert DataLoader().load_from_file(path, trusted_as_template=True)["greeting"] == "hello"
