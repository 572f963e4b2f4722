"""Jinja templates and expressions compiled once, kept between runs (fast path group
``compiled_templates``; docs/decisions.md, "Templates are compiled once").

Why: Ansible compiles every template and conditional it meets, from its text, in the worker
that meets it; a worker ends with its task, and with it what it compiled, so a trivial task
compiled about a hundred templates, the same ones in every task, 0.2-0.3 CPU-s of its
workers' 1.0 (bench/RESULTS.md).  Compiling is a function of the text and of what the
compiler reads besides it, so the code it makes is kept in fem.core's
``plugin_utils.derived_cache``, named by a hash of all of that:

- the text, and whether it is a template or an expression;
- the environment's class and code generator, every setting that lexes, parses or generates
  (delimiters, whitespace control, newlines, sandboxing, the intercepted operators, async,
  autoescape), its extensions, Ansible's backslash escaping in force and its
  embedded-templates setting, and the versions of Jinja and Ansible (the entry's name also
  holds the interpreter's bytecode magic).

The generated code also depends on each filter and test a text names (whether it exists,
which arguments Jinja passes it), which come from plugins a run may have and another not:
an entry records them as compiled and is used only if the run's environment gives the same
now (the lookup loads the plugin, as compiling would).  What the compiler would evaluate
while compiling is never kept, since its value may differ next time: a text with
``{% autoescape %}`` or another eval-context modifier, and any text where the optimizer or
a ``finalize`` without context would fold constants.  Neither is anything else where the
compiler reads what the name does not hold: a name or file (``{% include %}``, loaders), raw
or deferred output, Ansible's template debugging, extensions other than Jinja's plain
statement ones.  Errors are never kept: a text that fails compiles again, failing as
Jinja makes it fail.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Iterator
from types import CodeType
from typing import Any

import jinja2
import jinja2.compiler
import jinja2.lexer
import jinja2.parser
from jinja2 import nodes
from jinja2.environment import TemplateExpression

from fem_ansible.fastpath import derived_cache, patches

#: Texts longer than this are compiled as always (a bound on an entry's size).
MAX_SOURCE = 64 * 1024
#: Extensions that only add statements, reading nothing of the environment when they parse.
PLAIN_EXTENSIONS = frozenset({"jinja2.ext.ExprStmtExtension", "jinja2.ext.LoopControlExtension",
                              "jinja2.ext.DebugExtension"})
#: What ``jinja2.pass_context`` and its kin set as ``jinja_pass_arg``, by name: the code
#: generator looks the attribute up in a dict of these members, as this does (an attribute
#: that is no key of it is passed nothing; one that cannot be a key fails, as it fails there).
_PASS_ARGS = {member: member.name
              for member in type(jinja2.pass_context(lambda: None).jinja_pass_arg)}

_capture = threading.local()


@contextlib.contextmanager
def _capturing(slot: list[Any] | None) -> Iterator[None]:
    """``slot`` receives the tree and code of the next expression compiled in this thread,
    and no compile nested in it (a plugin imported while compiling may compile too)."""
    outer = getattr(_capture, "slot", None)
    _capture.slot = slot
    try:
        yield
    finally:
        _capture.slot = outer


def _pass_arg(func: Any) -> str:
    """What Jinja's code generator reads of a filter, test or finalize: absent, or what it
    passes (``plain``: nothing)."""
    if func is None:
        return "absent"
    return _PASS_ARGS.get(getattr(func, "jinja_pass_arg", None), "plain")


def dependencies(env: jinja2.Environment, tree: nodes.Node) -> list[list[str]] | None:
    """The filters and tests ``tree`` names, each with what ``env`` gives for it now, in the
    order the code generator meets them; None if compiling ``tree`` evaluates something."""
    if any(True for _ in tree.find_all(nodes.EvalContextModifier)):
        return None
    named = {(("filter" if isinstance(node, nodes.Filter) else "test"), node.name): None
             for node in tree.find_all((nodes.Filter, nodes.Test))}
    return [[kind, name, _pass_arg(_lookup(env, kind, name))] for kind, name in named]


def _lookup(env: jinja2.Environment, kind: str, name: str) -> Any:
    return (env.filters if kind == "filter" else env.tests).get(name)


def _valid(env: jinja2.Environment, value: Any) -> bool:
    if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], list)
            and isinstance(value[1], CodeType)):
        return False
    for dep in value[0]:
        if not (isinstance(dep, list) and len(dep) == 3 and dep[0] in ("filter", "test")):
            return False
        kind, name, seen = dep
        if _pass_arg(_lookup(env, kind, name)) != seen:
            return False
    return True


def _kept(value: Any) -> bool:
    return value is not None and value[0] is not None


class Compiler:
    """What a compiled text's entry is named by, besides the text: read from Ansible's
    templating at install (its class, its escaping context, its config)."""

    def __init__(self, env_class: type, escaping: Callable[[], Any], config: Any,
                 versions: bytes) -> None:
        self.env_class = env_class
        self.escaping = escaping
        self.config = config
        self.versions = versions

    def _name(self, env: Any, kind: bytes, source: str) -> str | None:
        """The entry's name, or None where this text is compiled as always."""
        if (len(source) > MAX_SOURCE or env._debuggable_template_source or env.optimized
                or not isinstance(env.autoescape, bool)
                or _pass_arg(env.finalize) not in ("context", "eval_context")
                or not set(env.extensions) <= PLAIN_EXTENSIONS):
            return None
        context = self.escaping()
        settings = (
            type(env).__module__, type(env).__qualname__,
            env.code_generator_class.__module__, env.code_generator_class.__qualname__,
            *(getattr(env, name) for name in patches.JINJA_SETTINGS),
            sorted(getattr(env, "intercepted_binops", ())),
            sorted(getattr(env, "intercepted_unops", ())),
            _pass_arg(env.finalize), sorted(env.extensions),
            None if context is None else bool(context.escape_backslashes),
            bool(self.config.allow_embedded_templates),
        )
        return derived_cache.entry_name(b"jinja " + kind, self.versions,
                                        repr(settings).encode(),
                                        source.encode("utf-8", "surrogatepass"))

    def install(self) -> None:
        """Put the cached compile and compile_expression on Ansible's environment class."""
        stock_compile = self.env_class.compile
        stock_expression = self.env_class.compile_expression
        name_of = self._name

        def compile(self: Any, source: Any, name: str | None = None,
                    filename: str | None = None, raw: bool = False,
                    defer_init: bool = False) -> Any:
            plain = isinstance(source, str) and not (name or filename or raw or defer_init)
            entry = name_of(self, b"template", source) if plain else None
            if entry is None:
                slot = getattr(_capture, "slot", None)
                with _capturing(None):
                    code = stock_compile(self, source, name, filename, raw, defer_init)
                if slot is not None and not slot and isinstance(source, nodes.Template):
                    slot.extend((source, code))  # the tree compile_expression built
                return code

            def derive() -> list[Any]:
                with _capturing(None):
                    code = stock_compile(self, source)
                    return [dependencies(self, self.parse(source)), code]

            return derived_cache.cached(entry, derive, lambda v: _valid(self, v), _kept)[1]

        def compile_expression(self: Any, source: str,
                               undefined_to_none: bool = True) -> TemplateExpression:
            entry = name_of(self, b"expression", source) if isinstance(source, str) else None
            if entry is None:
                with _capturing(None):
                    return stock_expression(self, source, undefined_to_none)
            made: list[TemplateExpression] = []

            def derive() -> list[Any] | None:
                slot: list[Any] = []
                with _capturing(slot):
                    made.append(stock_expression(self, source, undefined_to_none))
                if len(slot) != 2:
                    return None
                with _capturing(None):
                    return [dependencies(self, slot[0]), slot[1]]

            value = derived_cache.cached(entry, derive, lambda v: _valid(self, v), _kept)
            if made:  # compiled here: Jinja's own expression
                return made[0]
            template = self.template_class.from_code(self, value[1], self.make_globals(None),
                                                     None)
            return TemplateExpression(template, undefined_to_none)

        self.env_class.compile = compile
        self.env_class.compile_expression = compile_expression


def install() -> None:
    """Keep the templates this process and its forks compile (Ansible's names, imported
    here: fem_ansible.playbook_cli calls this only once fem.core's check found them)."""
    from ansible._internal._templating import _jinja_bits
    from ansible.release import __version__ as ansible_version

    # Versions name releases; the files, an installation changed in place (or this module).
    files = [module.__file__ for module in (jinja2.compiler, jinja2.lexer, jinja2.parser,
                                            jinja2.nodes, _jinja_bits, sys.modules[__name__])]
    stats = [(st.st_mtime_ns, st.st_size) for st in map(os.stat, filter(None, files))]
    versions = f"jinja2 {jinja2.__version__} ansible {ansible_version} {stats}".encode()
    Compiler(_jinja_bits.AnsibleEnvironment,
             lambda: _jinja_bits._TemplateCompileContext.current(optional=True),
             _jinja_bits._TemplateConfig, versions).install()
