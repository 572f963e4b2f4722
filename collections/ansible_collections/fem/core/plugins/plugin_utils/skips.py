# Copyright: fem-ansible developers
# SPDX-License-Identifier: Apache-2.0
"""Tasks whose condition is false, skipped in the controller, without a worker process.

Why: a trivial task's playbook skips nine tasks (no credentials, no inputs, the other
engines' steps, the remote host's fetch).  Ansible forks a worker process for each only to
evaluate its ``when`` and return the skip: 20-30 ms each, about a tenth of a forked run
(bench/RESULTS.md, issue 30).  The strategy evaluates such a condition itself, as the
worker would, and where it is false hands the worker's result over by the queue workers use
(fem.core's ``plugin_utils.stage_markers.hand_over``): callbacks, events, registered
results and stats go on as with a worker's.

What a worker does first, in this release (ansible-core 2.19.14, ``TaskExecutor``): for a
task without a loop or delegation, it adds the play context's connection variables that the
host's variables lack and ``ansible_search_path`` to a copy of the variables, then
evaluates ``when``; a false condition skips the task before anything else can fail it (an
error of the play context is raised only after a true condition).  So, here:

- **Only the condition is evaluated,** with a copy of the variables the strategy computed
  for the worker, by the task's own ``_resolve_conditional``.  No connection, become or
  action plugin, keyword, loop or delegation is looked at.
- **Only where the worker's copy could not differ:** a condition naming one of the
  variables a worker adds that the host's variables lack, or ``vars`` (through which any
  variable can be named), goes to a worker.
- **Only a clean false:** a condition that is true, raises, warns, or calls a lookup (whose
  side effects would then happen twice) goes to a worker, which evaluates it again.
- **Only tasks with no loop, no delegation and a literal** ``no_log`` (the result's
  ``_ansible_no_log``, as the worker sets it).  An include is one: a worker evaluates its
  condition before anything of the include, and the strategy ignores a skipped include's
  result as it does a worker's (``IncludedFile.process_include_results``).

The names of Ansible's this relies on are fem.core's ``plugin_utils.fastpath`` group
``skips``, checked like every patch's.
"""

from __future__ import annotations

import re
from typing import Any

from ansible import constants
from ansible._internal import _display_utils

#: What a worker's copy of the variables gains before the condition, besides what
#: ``vars`` (all of them) names.
_ADDED = {name for prop, names in constants.MAGIC_VARIABLE_MAPPING.items()
          if "become" not in prop for name in names} | {"ansible_search_path"}
_WORDS = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LOOKUP = frozenset({"lookup", "query", "q"})
SKIPPED = {"changed": False, "skipped": True, "skip_reason": "Conditional result was False"}


def result(task: Any, task_vars: dict[str, Any]) -> dict[str, Any] | None:
    """The worker's result for ``task`` if its condition is cleanly false with
    ``task_vars`` (what the strategy would give the worker), else None."""
    when = task.when
    if not (when and _plain(task) and all(_names_only_given(c, task_vars) for c in when)):
        return None
    variables = dict(task_vars)
    found: dict[str, Any] = {}
    try:
        with _display_utils.DeferredWarningContext(variables=variables) as warned:
            if task._resolve_conditional(when, variables, result_context=found):
                return None
    except Exception:  # the worker evaluates it again and fails the task as it does
        return None
    if warned.get_warnings() or warned.get_deprecation_warnings():
        return None
    return {**SKIPPED, **found, "_ansible_no_log": bool(task.no_log)}


def _plain(task: Any) -> bool:
    return (task.loop is None and task.loop_with is None and task.delegate_to is None
            and task.no_log in (None, False, True))


def _names_only_given(condition: Any, task_vars: dict[str, Any]) -> bool:
    """A literal condition, or one whose words name no variable a worker would add, no
    ``vars`` and no lookup."""
    if isinstance(condition, bool):
        return True
    if not isinstance(condition, str):
        return False
    words = set(_WORDS.findall(condition))
    return not (words & _LOOKUP or "vars" in words
                or any(w in _ADDED and w not in task_vars for w in words))
