"""Role files parsed once in the resident Ansible (fem_ansible.parsed_roles, fast path group
``parsed_roles``): a load answered from an entry gives what Ansible's own load gives (data,
types, origins, trust; the loader's cache as Ansible leaves it), a changed file is parsed
again, what said something or holds vault data is not kept, and only role loads are
answered."""

from __future__ import annotations

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


@pytest.fixture
def roles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A roles dir with one role; the group installed on it until the test ends."""
    role = tmp_path / "roles" / "site_role"
    for sub, text in (("tasks/main.yml", TASKS), ("defaults/main.yml", DEFAULTS),
                      ("vars/dup.yml", DUPLICATE), ("vars/vaulted.yml", INLINE_VAULT),
                      ("tasks/nested/more.yaml", TASKS), ("files/not_a_role_file.yml", TASKS)):
        (role / sub).parent.mkdir(parents=True, exist_ok=True)
        (role / sub).write_text(text)
    monkeypatch.setattr(DataLoader, "load_from_file", DataLoader.load_from_file)
    monkeypatch.setattr(parsed_roles, "_entries", {})
    monkeypatch.setattr(parsed_roles, "_roles_path", [])
    parsed_roles.install([str(tmp_path / "roles")])
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
    parsed_roles.refresh()
    assert str(path) in parsed_roles._entries
    assert DataLoader().load_from_file(str(path), trusted_as_template=True)["greeting"] == "howdy"


def test_refresh_parses_new_files_and_forgets_gone_ones(roles: Path):
    (roles / "tasks" / "nested" / "more.yaml").unlink()
    (roles / "handlers").mkdir()
    (roles / "handlers" / "main.yml").write_text(TASKS)
    parsed_roles.refresh()
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


def test_the_task_playbook_loads_its_roles_from_entries(tmp_path, monkeypatch):
    """Ansible's own playbook loading, on the built-in roles: each role file it reads is
    answered from an entry, and what it loads is what it loads stock."""
    init_plugin_loader()
    monkeypatch.setattr(DataLoader, "load_from_file", DataLoader.load_from_file)
    monkeypatch.setattr(parsed_roles, "_entries", {})
    monkeypatch.setattr(parsed_roles, "_roles_path", [])
    monkeypatch.setenv("ANSIBLE_ROLES_PATH", str(REPO / "roles"))
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
    kept = parsed_roles.install([str(REPO / "roles")])
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

