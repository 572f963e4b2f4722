# Copyright: fem-ansible developers
# SPDX-License-Identifier: Apache-2.0
"""Stage markers answered in the controller, without a worker process.

Why: fem-ansible's task playbook enters each stage with a marker, ``ansible.builtin.set_stats``
of literal data (docs/roles.md, "Stages"), seven a task.  Ansible forks a worker process for
every task and host; for a marker the fork and the worker's start are nearly all it costs,
15-29 ms each, which made a task 0.15-0.2 s slower under the fast path than before the
markers (bench/RESULTS.md, issue 17).  A marker's result follows from its literal arguments
alone, so the strategy writes that result itself and hands it over by the queue workers use:
callbacks, events, registered results, stats and rescue go on as with a worker's.

Nothing is templated, looked up or loaded for it in the controller: no connection, become or
action plugin, no variable.  So only a task whose result cannot depend on any of those is a
marker: ``ansible.builtin.set_stats`` (as resolved) with only its own arguments, ``data`` a
mapping of valid variable names, nothing in it Ansible could take for a template, booleans
for ``per_host`` and ``aggregate``, a boolean ``no_log``, no module defaults, no
condition, loop, retry, timeout, delegation or asynchronous run, and literal ``run_once``,
``debugger`` and ``throttle`` (the strategy reads those back from a worker's finalised
task).  Any other task, a templated ``set_stats`` or one written as ``action:`` included,
goes to a worker as always.  Keywords a worker would template and set_stats does not use
(``become``, ``environment``, ``vars``…) are not evaluated for a marker, so a template there
that cannot be evaluated does not fail it, and warnings a worker would raise while
evaluating them are not in its result.

The names of Ansible's this relies on are fem.core's ``plugin_utils.fastpath`` group
``markers``, checked like every patch's.
"""

from __future__ import annotations

import copy
from typing import Any

from ansible.errors import AnsibleError
from ansible.executor.task_result import _RawTaskResult
from ansible.template import Templar
from ansible.utils.vars import validate_variable_name

ACTION = "ansible.builtin.set_stats"
#: set_stats' arguments (its action plugin's ``_VALID_ARGS``).
ARGS = frozenset({"aggregate", "data", "per_host"})
#: The literal values of ``debugger``.
DEBUGGER = (None, "always", "never", "on_failed", "on_unreachable", "on_skipped")
_templar = Templar(loader=None)


def result(task: Any) -> dict[str, Any] | None:
    """What set_stats returns for ``task`` if it is a marker (its worker's result, as the
    strategy receives it), else None."""
    args = task.args
    # As the parser resolved it, under the task's collections (``resolved_action`` is not that
    # for an ``action:`` form, which is left to a worker).
    if not (task._resolved_action == ACTION and set(args) <= ARGS and _plain(task)):
        return None
    data = args.get("data", {})
    if not (isinstance(data, dict) and _literal(data)):
        return None
    stats: dict[str, Any] = {"data": copy.deepcopy(data), "per_host": False,
                             "aggregate": True}
    for option in ("per_host", "aggregate"):
        value = args.get(option)
        if value is not None:
            if not isinstance(value, bool):
                return None
            stats[option] = value
    try:
        for key in data:
            validate_variable_name(key)
    except AnsibleError:
        return None
    return {"changed": False, "ansible_stats": stats, "failed": False,
            "_ansible_no_log": task.no_log}


def _plain(task: Any) -> bool:
    """No keyword that makes set_stats' result depend on more than its arguments, and the
    ones the strategy reads back from a worker's finalised task literal."""
    return (isinstance(task.no_log, bool) and not task.module_defaults and not task.when
            and not task.changed_when and not task.failed_when and task.loop is None
            and task.loop_with is None and not task.until and task.retries is None
            and not task.timeout and not task.async_val and task.delegate_to is None
            and task.run_once in (None, False, True) and task.debugger in DEBUGGER
            and type(task.throttle) is int)


def _literal(value: Any) -> bool:
    if isinstance(value, str):
        return not _templar.is_possibly_template(value)
    if isinstance(value, dict):
        return all(_literal(k) and _literal(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_literal(v) for v in value)
    return value is None or isinstance(value, (bool, int, float))


def hand_over(strategy: Any, host: Any, task: Any, task_vars: dict[str, Any],
              play_context: Any, returned: dict[str, Any]) -> None:
    """What ``StrategyBase._queue_task`` and its worker do for ``task``, the worker's
    result being ``returned``."""
    strategy._queued_task_cache[(host.name, task._uuid)] = {
        "host": host, "task": task, "task_vars": task_vars, "play_context": play_context}
    strategy._tqm.send_callback("v2_runner_on_start", host, task)
    strategy._final_q.send_task_result(_RawTaskResult(
        host=host, task=task, return_data=returned, task_fields=task.dump_attrs()))
    strategy._pending_results += 1
