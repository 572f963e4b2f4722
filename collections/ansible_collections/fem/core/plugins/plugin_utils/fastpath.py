# Copyright: fem-ansible developers
# SPDX-License-Identifier: Apache-2.0
"""The private names of Mitogen and Ansible that fem-ansible's fast path replaces or relies
on, each with the shape it was written for, and the check that they still have it.

Why: fem.core's ``mitogen_linear`` and fem-ansible's ``ansible-playbook``
(``fem_ansible.playbook_cli``) replace functions that are no API of Mitogen's or Ansible's.
pyproject.toml pins the versions they were written for; a site that upgrades anyway, or
installs other versions beside fem-ansible, must get runs as with Mitogen's own strategy
(slower, not different), never failing tasks.  So every patch is applied only if
:func:`missing` finds each name it touches, in the shape it expects; otherwise none of its
group is, and whoever checked says once what is missing (docs/decisions.md).

Who checks: the listener at start (``python -P <this file>`` in a subprocess, which prints
the answer as JSON: the listener itself does not import Ansible or Mitogen) picks the
strategy of its runs; the plugin checks again when it loads, in case the installation
changed under a running listener; ``fem_ansible.playbook_cli`` checks the routing hook.

The shape is read from the installed code: a callable's parameter names, a module-level
name the replaced function's callers look up (``compile``: a module attribute of that name
shadows the built-in there), an attribute the code assigns.  It cannot prove the code still
means the same, which is what the exact pins are for.

This module is loaded by path before Ansible's collection loader exists: standard library
only at import; what it checks is imported when checked.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

#: ``FEMCORE_FASTPATH_OFF``: patch groups (comma-separated) to leave out, for bench/profile.py's
#: ``--without`` to measure each one's gain; not a setting (docs/decisions.md).  Not
#: ``FEM_``: the listener reads those as its configuration.
OFF_ENV = "FEMCORE_FASTPATH_OFF"


def _params(*names: str) -> Callable[[Any], bool]:
    """A callable whose parameters are ``names``, in order."""
    def check(value: Any) -> bool:
        try:
            return callable(value) and tuple(inspect.signature(value).parameters) == names
        except (TypeError, ValueError):
            return False
    return check


def _uses(*names: str) -> Callable[[Any], bool]:
    """A function whose code looks up or assigns each of ``names`` (a global, an
    attribute)."""
    def check(value: Any) -> bool:
        code = getattr(value, "__code__", None)
        return code is not None and set(names) <= _names(code)
    return check


def _names(code: Any) -> set[str]:
    found = set(code.co_names)
    for const in code.co_consts:
        if inspect.iscode(const):
            found |= _names(const)
    return found


def _all(*checks: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: all(check(value) for check in checks)


def _strings(value: Any) -> bool:
    return isinstance(value, (tuple, list)) and all(isinstance(v, str) for v in value)


def _present(value: Any) -> bool:
    return value is not None


#: The task keywords fem.core's plugin_utils.stage_markers reads.
MARKER_KEYWORDS = ("args", "no_log", "module_defaults", "when", "changed_when", "failed_when",
                   "loop", "loop_with", "until", "retries", "timeout", "async_val",
                   "delegate_to", "run_once", "debugger", "throttle")
#: The ansible-core release whose task executor stage_markers' results were compared with
#: (pyproject.toml's pin).
MARKERS_RELEASE = "2.19.14"


#: Jinja's settings that its lexer, parser and code generator read: part of the name of a
#: compiled template kept by fem_ansible.compiled_templates (group ``compiled_templates``).
JINJA_SETTINGS = ("block_start_string", "block_end_string", "variable_start_string",
                  "variable_end_string", "comment_start_string", "comment_end_string",
                  "line_statement_prefix", "line_comment_prefix", "trim_blocks",
                  "lstrip_blocks", "newline_sequence", "keep_trailing_newline",
                  "optimized", "autoescape", "is_async", "sandboxed")
_JINJA_BITS = "ansible._internal._templating._jinja_bits"


#: Per patch group, each name it replaces or relies on (``module:attribute.path``) and its
#: expected shape.  The groups are the patches of bench/RESULTS.md's lines.
PATCHES: dict[str, tuple[tuple[str, Callable[[Any], bool]], ...]] = {
    # Mitogen's module server compiles a module's source to read its imports: the built-in
    # compile, looked up as a global by these functions.
    "import_scans": (
        ("mitogen.master:ModuleFinder.find_related_imports", _uses("compile")),
        ("ansible_mitogen.module_finder:_scan_importlib_find_spec", _uses("compile")),
        ("ansible_mitogen.module_finder:get_code", _uses("compile")),
    ),
    "unminified": (
        ("mitogen.minify:minimize_source", _params("source")),
        ("mitogen.master:ModuleResponder._build_tuple", _uses("minify", "minimize_source")),
    ),
    "collections": (
        ("ansible_mitogen.planner:_load_collections", _params("invocation")),
        ("ansible_mitogen.planner:Invocation.__init__", _uses("_extra_sys_paths")),
    ),
    "own_host": (
        ("mitogen.parent:Connection.get_econtext_config", _params("self")),
        ("mitogen.parent:Connection.__init__", _uses("options", "_router")),
        ("ansible_mitogen.services:ContextService._send_module_forwards",
         _params("self", "context")),
        ("ansible_mitogen.services:ContextService.ALWAYS_PRELOAD", _strings),
        ("mitogen.core:ImportPolicy.overriden", _params("self", "fullname")),
        ("mitogen.core:ImportPolicy.__init__", _uses("overrides")),
        ("mitogen.core:Importer.__init__", _uses("policy")),
        ("mitogen.master:ModuleResponder.__init__", _uses("_finder")),
        ("mitogen.master:ModuleResponder.forward_modules",
         _params("self", "context", "fullnames")),
        ("mitogen.master:ModuleFinder.__init__", _uses("_modifier_callables")),
    ),
    # Hosts forked by the resident host (plugin_utils/resident_host.py): how a connection
    # starts its child and what it makes of it, the stdio Mitogen gives a child, and the
    # first stage and core start the resident host's forks do as Mitogen's boot would.
    "resident_host": (
        ("mitogen.parent:Connection.start_child",
         _all(_params("self"), _uses("get_boot_command", "create_child"))),
        ("mitogen.parent:Connection.get_boot_command", _uses("get_preamble")),
        ("mitogen.parent:Connection.get_preamble", _params("self")),
        ("mitogen.parent:Connection._first_stage",
         _uses("fork", "dup2", "execl", "decompress", "write")),
        ("mitogen.parent:create_best_pipe", _params("escalates_privilege", "blocking")),
        ("mitogen.parent:Process.__init__", _params("self", "pid", "stdin", "stdout", "stderr")),
        ("mitogen.parent:Process.poll", _params("self")),
        ("mitogen.parent:Process.send_signal", _params("self", "sig")),
        ("mitogen.parent:_preexec_hook", lambda value: value is None or callable(value)),
        ("mitogen.core:ExternalContext.main",
         _uses("_setup_master", "_setup_importer", "_reap_first_stage", "_setup_package")),
    ),
    "cpu_placement": (
        ("ansible_mitogen.affinity:policy", _present),
        ("ansible_mitogen.affinity:Policy", _params()),
    ),
    # Stage markers answered in the controller (plugin_utils/stage_markers.py): how the
    # strategy queues a task for a worker and takes its result back, what set_stats takes
    # and returns, and what a marker reads of a task.
    "markers": (
        # Their equivalence was read against this release's TaskExecutor, not just names.
        ("ansible.release:__version__", lambda value: value == MARKERS_RELEASE),
        ("ansible.plugins.strategy:StrategyBase._queue_task",
         _all(_params("self", "host", "task", "task_vars", "play_context"),
              _uses("_queued_task_cache", "send_callback", "_pending_results"))),
        ("ansible.plugins.strategy:StrategyBase.__init__",
         _uses("_queued_task_cache", "_final_q", "_pending_results", "_tqm")),
        ("ansible.plugins.strategy:StrategyBase._convert_wire_task_result_to_raw",
         _uses("_queued_task_cache", "from_attrs")),
        ("ansible.executor.task_result:_RawTaskResult.__init__",
         _params("self", "host", "task", "return_data", "task_fields")),
        ("ansible.executor.task_queue_manager:FinalQueue.send_task_result",
         _params("self", "task_result")),
        ("ansible.executor.process.worker:WorkerProcess._run",
         _uses("TaskExecutor", "send_task_result", "_RawTaskResult", "dump_attrs")),
        ("ansible.plugins.action.set_stats:ActionModule._VALID_ARGS",
         lambda value: value == frozenset({"aggregate", "data", "per_host"})),
        ("ansible.plugins.action.set_stats:ActionModule.run",
         _uses("validate_variable_name", "boolean", "template")),
        ("ansible.template:Templar.is_possibly_template", _params("self", "data", "overrides")),
        ("ansible.utils.vars:validate_variable_name", _present),
        ("ansible.playbook.task:Task.fattributes",
         lambda value: set(MARKER_KEYWORDS) <= set(value)),
        ("ansible.playbook.task:Task.copy", _uses("_resolved_action")),
        ("ansible.playbook.task:Task.dump_attrs", _params("self")),
    ),
    # The heap frozen when the play starts: the strategy's run, which fem.core's overrides
    # and calls on (gc.freeze is the standard library's).
    "frozen_heap": (
        ("ansible_mitogen.strategy:StrategyMixin.run",
         _params("self", "iterator", "play_context", "result")),
    ),
    # Compiled templates kept between runs (fem_ansible.compiled_templates): the two methods
    # it puts on Ansible's environment class and what they call, and what it reads of
    # Ansible's templating to name an entry (what else the compiler reads besides the text).
    "compiled_templates": (
        ("jinja2.environment:Environment.compile",
         _params("self", "source", "name", "filename", "raw", "defer_init")),
        ("jinja2.environment:Environment.compile_expression",
         _all(_params("self", "source", "undefined_to_none"),
              _uses("parse_expression", "from_string", "TemplateExpression"))),
        ("jinja2.environment:Environment.from_string",
         _uses("make_globals", "from_code", "compile")),
        ("jinja2.environment:TemplateExpression.__init__",
         _params("self", "template", "undefined_to_none")),
        ("jinja2.compiler:CodeGenerator._filter_test_common.__wrapped__",
         _uses("filters", "tests", "from_obj")),
        (f"{_JINJA_BITS}:AnsibleEnvironment.compile_expression",
         _params("self", "source", "args", "kwargs")),
        (f"{_JINJA_BITS}:AnsibleEnvironment._debuggable_template_source",
         lambda value: isinstance(value, bool)),
        (f"{_JINJA_BITS}:AnsibleEnvironment.lexer", lambda value: isinstance(value, property)),
        (f"{_JINJA_BITS}:AnsibleLexer.tokeniter",
         _uses("_TemplateCompileContext", "escape_backslashes")),
        (f"{_JINJA_BITS}:_TemplateCompileContext.current", _present),
        (f"{_JINJA_BITS}:_TemplateConfig.allow_embedded_templates",
         lambda value: isinstance(value, bool)),
        (f"{_JINJA_BITS}:AnsibleCodeGenerator.visit_Const",
         _uses("allow_embedded_templates")),
        (f"{_JINJA_BITS}:_TEMPLATE_OVERRIDE_FIELD_NAMES",
         lambda value: _strings(value) and set(value) <= set(JINJA_SETTINGS)),
    ),
    # Role files parsed once in the resident Ansible (fem_ansible.parsed_roles): the loader
    # method it answers, what that method reads and fills and how it spells a path, the
    # parse it makes of a file's text, and the display methods it listens to while parsing.
    "parsed_roles": (
        ("ansible.parsing.dataloader:DataLoader.load_from_file",
         _all(_params("self", "file_name", "cache", "unsafe", "json_only", "trusted_as_template"),
              _uses("_FILE_CACHE", "path_dwim", "get_text_file_contents", "load",
                    "TrustedAsTemplate", "deepcopy"))),
        ("ansible.parsing.dataloader:DataLoader.__init__", _uses("_FILE_CACHE")),
        ("ansible.parsing.dataloader:DataLoader.path_dwim", _params("self", "given")),
        ("ansible.parsing.dataloader:DataLoader.load",
         _params("self", "data", "file_name", "show_content", "json_only")),
        ("ansible.template:trust_as_template", _params("value")),
        ("ansible.utils.display:Display.warning", callable),
        ("ansible.utils.display:Display.deprecated", callable),
        ("ansible.utils.display:Display.error_as_warning", callable),
    ),
    "routing": (
        ("ansible.utils.collection_loader._collection_finder:_meta_yml_to_dict",
         _params("yaml_string_data", "content_id")),
        ("ansible.utils.collection_loader._collection_finder:"
         "_AnsibleCollectionPkgLoader._load_module", _uses("_meta_yml_to_dict")),
    ),
}
#: The groups fem.core's ``mitogen_linear`` applies.
STRATEGY = ("import_scans", "unminified", "collections", "own_host", "resident_host",
            "cpu_placement", "markers", "frozen_heap")


def _resolve(target: str) -> Any:
    module, _, path = target.partition(":")
    value: Any = importlib.import_module(module)
    for attr in path.split("."):
        value = getattr(value, attr)
    return value


def missing(groups: Iterable[str]) -> list[str]:
    """What of ``groups`` is not there in the shape it was written for, as
    ``module:attribute.path (absent|changed)``; empty if all is."""
    return [name for group in groups for name in _missing(group)]


def _missing(group: str) -> list[str]:
    found = []
    for target, shape in PATCHES[group]:
        try:
            value = _resolve(target)
        except (ImportError, AttributeError):
            found.append(f"{target} (absent)")
            continue
        if not shape(value):
            found.append(f"{target} (changed)")
    return found


def off() -> set[str]:
    """The groups ``FEMCORE_FASTPATH_OFF`` leaves out."""
    return {g.strip() for g in os.environ.get(OFF_ENV, "").split(",") if g.strip()}


def warning(names: list[str]) -> str:
    """The one warning for ``names`` missing."""
    return ("fast path off: the installed Mitogen or Ansible is not the one fem-ansible's "
            f"patches were written for (pyproject.toml pins it); missing: {', '.join(names)}")


def _report() -> dict[str, Any]:
    """What the listener needs to pick its runs' strategy: what is missing, and in which
    groups; where Mitogen's own strategy plugins are, or why Mitogen cannot run at all."""
    try:
        # ansible_mitogen.loaders raises on an Ansible it does not support
        import ansible_mitogen.loaders
        import ansible_mitogen.strategy
    except Exception as exc:  # whatever a dependency raises: Mitogen cannot run here
        plugins, error, groups = None, f"{type(exc).__name__}: {exc}", ["routing"]
    else:
        plugins = os.path.join(os.path.dirname(ansible_mitogen.__file__), "plugins",
                               "strategy")
        error, groups = None, list(PATCHES)
    found = {group: _missing(group) for group in groups}
    return {"mitogen": plugins, "error": error,
            "missing": [name for names in found.values() for name in names],
            "groups": [group for group, names in found.items() if names]}


if __name__ == "__main__":
    json.dump(_report(), sys.stdout)
