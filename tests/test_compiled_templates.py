"""Templates and conditionals compiled once and kept between runs
(fem_ansible.compiled_templates, fast path group ``compiled_templates``): the same results as
stock Ansible's, nothing compiled again when kept, compiled again when a filter or test it
names is no longer what it was, errors never kept."""

from __future__ import annotations

import marshal
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jinja2
import pytest
from ansible._internal._templating._jinja_bits import AnsibleEnvironment
from ansible.errors import AnsibleError
from ansible.parsing.dataloader import DataLoader
from ansible.template import Templar, trust_as_template
from jinja2 import pass_context

from fem_ansible import compiled_templates
from fem_ansible.fastpath import derived_cache
from tests.support.local_play import run_local_play

VARIABLES = {"items": [3, 1, 2], "name": "fem", "path": "a\\b", "conf": {"k": "v"}}
TEMPLATES = [
    "{{ items | sort | map('string') | join(',') }}",
    "{{ name | upper }}-{{ items | length }}",
    "{% for i in items %}{{ i }}{% if not loop.last %};{% endif %}{% endfor %}",
    "{{ conf | dict2items | map(attribute='key') | list }}",
    "{{ path }} {{ 'c:\\new' }}",
    "{{ items | select('gt', 1) | list }}",
    "{{ (name is defined) and (conf.k is string) }}",
    "#jinja2:variable_start_string:'[%', variable_end_string:'%]'\n[% name %] {{ name }}",
    "  {%- if items -%} trimmed {%- endif %}  \n",
]
CONDITIONALS = ["items | length > 2", "name == 'fem' and conf.k is defined",
                "'b' in path", "missing is not defined"]


def _render(variables: dict[str, Any] = VARIABLES) -> list[Any]:
    templar = Templar(loader=DataLoader(), variables=variables)
    out: list[Any] = [templar.template(trust_as_template(t)) for t in TEMPLATES]
    out += [templar.template(trust_as_template(TEMPLATES[4]), escape_backslashes=False)]
    out += [templar.evaluate_conditional(trust_as_template(c)) for c in CONDITIONALS]
    return out


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private cache dir for this process, and the group installed until the test ends."""
    directory = tmp_path / "cache"
    directory.mkdir(mode=0o700)
    monkeypatch.setenv(derived_cache.CACHE_ENV, str(directory))
    monkeypatch.setattr(derived_cache, "_dir_fd", derived_cache._UNOPENED)
    for name in ("compile", "compile_expression"):  # put back when the test ends
        monkeypatch.setattr(AnsibleEnvironment, name, getattr(AnsibleEnvironment, name))
    return directory


@pytest.fixture
def generated(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many times Jinja generated code from a tree (the work a kept entry saves)."""
    count = [0]
    stock = jinja2.Environment._generate

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        return stock(self, *args, **kwargs)

    monkeypatch.setattr(jinja2.Environment, "_generate", counted)
    return count


def _entries(directory: Path) -> list[Any]:
    return [marshal.loads(p.read_bytes()) for p in directory.iterdir()]


def test_kept_templates_render_as_stock_ansible_and_are_not_compiled_again(
        cache: Path, generated: list[int]) -> None:
    stock = _render()
    stock_compiles = generated[0]
    compiled_templates.install()
    first = _render()
    assert first == stock
    assert generated[0] - stock_compiles == stock_compiles  # each compiled once more...
    kept = _entries(cache)
    assert kept and all(isinstance(e[1], types.CodeType) for e in kept)
    before = generated[0]
    assert _render() == stock  # ...and, kept, not again (a new Templar: a new environment)
    assert generated[0] == before
    assert len(_entries(cache)) == len(kept)


def test_backslash_escaping_is_part_of_what_is_kept(cache: Path) -> None:
    compiled_templates.install()
    templar = Templar(loader=DataLoader(), variables={})
    escaped, plain = (templar.template(trust_as_template("{{ 'x\\1' }}"), escape_backslashes=e)
                      for e in (True, False))
    again = Templar(loader=DataLoader(), variables={})
    assert again.template(trust_as_template("{{ 'x\\1' }}"), escape_backslashes=False) == plain
    assert again.template(trust_as_template("{{ 'x\\1' }}")) == escaped
    assert escaped != plain


def _templar_with(probe: Callable[..., Any]) -> Templar:
    templar = Templar(loader=DataLoader(), variables={"v": "a"})
    templar._engine.environment.filters["fem_probe"] = probe
    return templar


def test_a_filter_that_now_takes_the_context_is_compiled_again(cache: Path) -> None:
    compiled_templates.install()
    assert _templar_with(lambda x: f"plain {x}").template(
        trust_as_template("{{ v | fem_probe }}")) == "plain a"

    @pass_context
    def with_context(context: Any, x: str) -> str:
        return f"context {x} {context.get('v')}"

    assert _templar_with(with_context).template(
        trust_as_template("{{ v | fem_probe }}")) == "context a a"


def test_what_the_compiler_evaluates_is_never_kept(cache: Path) -> None:
    # {% autoescape %} is evaluated while compiling: here by a filter that two runs define
    # alike (plain) but that answers differently.
    text = "{% autoescape 1 | fem_probe %}{{ '<' ~ ('b' | e) }}{% endautoescape %}"
    compiled_templates.install()
    assert _templar_with(lambda x: True).template(trust_as_template(text)) == "&lt;b"
    assert _templar_with(lambda x: False).template(trust_as_template(text)) == "<b"
    assert _entries(cache) == []


def test_an_attribute_named_like_jinjas_is_not_taken_for_it(cache: Path) -> None:
    @pass_context
    def with_context(context: Any, x: str) -> str:
        return f"context {x}"

    def plain(*args: Any) -> str:
        return f"plain {len(args)}"

    plain.jinja_pass_arg = "context"  # type: ignore[attr-defined]  # not Jinja's: ignored

    def unhashable(*args: Any) -> str:
        return "never called: Jinja cannot look its marker up"

    unhashable.jinja_pass_arg = ["context"]  # type: ignore[attr-defined]
    text = trust_as_template("{{ v | fem_probe }}")
    with pytest.raises(AnsibleError, match="unhashable") as stock:
        _templar_with(unhashable).template(text)
    compiled_templates.install()
    assert _templar_with(with_context).template(text) == "context a"
    assert _templar_with(plain).template(text) == "plain 1"
    with pytest.raises(AnsibleError, match="unhashable") as kept:
        _templar_with(unhashable).template(text)
    assert str(kept.value) == str(stock.value)


class _Nesting(dict):
    """Filters whose lookup compiles other expressions first, as a plugin that templates
    when it is imported would while the code generator looks it up."""

    def __init__(self, env: Any, inner: list[str], filters: dict[str, Any]) -> None:
        super().__init__(filters)
        self.env = env
        self.inner = inner

    def get(self, name: str, default: Any = None) -> Any:
        for text in self.inner:
            assert self.env.compile_expression(text)() is True
        return super().get(name, default)


def test_expressions_compiled_inside_another_compile_do_not_mix(cache: Path) -> None:
    inner = ["1 == 1", "'" + "x" * compiled_templates.MAX_SOURCE + "' != ''"]  # kept; not
    compiled_templates.install()
    for _process in range(2):  # compiled and kept, then loaded
        templar = Templar(loader=DataLoader(), variables={})
        env = templar._engine.environment
        env.filters = _Nesting(env, inner, {"fem_nest": lambda x: f"N{x}"})
        assert templar.evaluate_conditional(trust_as_template("(1 | fem_nest) == 'N1'"))
        assert templar.template(trust_as_template("{{ 2 | fem_nest }}")) == "N2"


def test_errors_are_raised_as_stock_and_never_kept(cache: Path) -> None:
    broken = ["{{ name | no_such_filter_here }}", "{{ unclosed ", "{% if %}"]

    def errors() -> list[str]:
        templar = Templar(loader=DataLoader(), variables=VARIABLES)
        said = []
        for text in broken:
            with pytest.raises(AnsibleError) as raised:
                templar.template(trust_as_template(text))
            said.append(str(raised.value))
        return said

    stock = errors()
    compiled_templates.install()
    assert errors() == stock
    assert errors() == stock
    assert _entries(cache) == []


# -- through ansible-runner and fem-ansible's ansible-playbook ---------------------------------

PLAIN = """\
class FilterModule:
    def filters(self):
        return {"fem_probe": lambda value: "plain " + value}
"""
WITH_CONTEXT = """\
from jinja2 import pass_context

@pass_context
def fem_probe(context, value):
    return "context " + value

class FilterModule:
    def filters(self):
        return {"fem_probe": fem_probe}
"""
PLAYBOOK = """\
- name: Probe
  hosts: all
  gather_facts: false
  tasks:
    - name: Report what the filter gave
      ansible.builtin.set_stats:
        data: {probe: "{{ 'x' | fem_probe }}"}
"""


def _probe(tmp_path: Path, filter_source: str, off: str = "") -> str:
    reports = run_local_play(tmp_path, PLAYBOOK, {"filter_plugins/probe.py": filter_source}, off)
    return str(reports["probe"])


def _kept_templates(tmp_path: Path) -> list[Any]:
    return [e for e in _entries(tmp_path / "work" / "import-scan-cache")
            if isinstance(e, list) and len(e) == 2 and isinstance(e[1], types.CodeType)]


@pytest.mark.e2e
def test_a_site_filter_changed_between_runs_is_compiled_again(tmp_path: Path) -> None:
    assert _probe(tmp_path, PLAIN) == "plain x"
    assert [["filter", "fem_probe", "plain"]] in [e[0] for e in _kept_templates(tmp_path)]
    assert _probe(tmp_path, WITH_CONTEXT) == "context x"
    assert [["filter", "fem_probe", "context"]] in [e[0] for e in _kept_templates(tmp_path)]


@pytest.mark.e2e
def test_without_the_group_nothing_is_kept(tmp_path: Path) -> None:
    assert _probe(tmp_path, PLAIN, off="compiled_templates") == "plain x"
    assert _kept_templates(tmp_path) == []
