# Copyright: fem-ansible developers
# SPDX-License-Identifier: Apache-2.0
"""Stage markers run in the controller, without a worker process.

Why: fem-ansible's task playbook enters each stage with a marker, ``ansible.builtin.set_stats``
of literal data (docs/roles.md, "Stages"), seven a task.  Ansible forks a worker process for
every task and host; for a marker the fork and the worker's start are nearly all it costs,
15-29 ms each, which made a task 0.15-0.2 s slower under the fast path than before the
markers (bench/RESULTS.md, issue 17).  A marker needs no connection and computes nothing, so
the controller runs Ansible's own ``TaskExecutor`` on it itself, on a copy of the task as a
worker runs on its forked copy, and hands the result over by the queue workers use: the same
result, callbacks and events, in the same order.

Which tasks: ``ansible.builtin.set_stats`` (as resolved) with no template in its arguments
and no condition, loop, retry, timeout, delegation or asynchronous run: nothing that could
wait, look anything up or run a site's code in the controller.  Every other task goes to a worker as
always.

The names of Ansible's this relies on are fem.core's ``plugin_utils.fastpath`` group
``markers``, checked like every patch's.
"""

from __future__ import annotations

import re
from typing import Any

from ansible.executor.task_executor import TaskExecutor
from ansible.executor.task_result import _RawTaskResult
from ansible.plugins import loader as plugin_loader

ACTION = "ansible.builtin.set_stats"
# Where Jinja could start: a marker's arguments are literal.
_TEMPLATE = re.compile(r"{{|{%|{#")


def is_marker(task: Any) -> bool:
    """Whether ``task`` is a marker: runs nothing a worker is needed for."""
    return (task.resolved_action == ACTION and not task.when and not task.changed_when
            and not task.failed_when and not task.loop and not task.loop_with
            and not task.until and not task.timeout and not task.async_val
            and task.delegate_to is None and _literal(task.args))


def _literal(value: Any) -> bool:
    if isinstance(value, str):
        return not _TEMPLATE.search(value)
    if isinstance(value, dict):
        return all(_literal(k) and _literal(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_literal(v) for v in value)
    return value is None or isinstance(value, (bool, int, float))


def run(strategy: Any, host: Any, task: Any, task_vars: dict[str, Any],
        play_context: Any) -> None:
    """What ``StrategyBase._queue_task`` and its worker do for ``task``, in this process."""
    strategy._queued_task_cache[(host.name, task._uuid)] = {
        "host": host, "task": task, "task_vars": task_vars, "play_context": play_context}
    strategy._tqm.send_callback("v2_runner_on_start", host, task)
    # A worker squashes and finalises its forked copy of the task and its blocks, and adds
    # to the variables it was given; so does this, on copies.
    own = task.copy(exclude_tasks=True)
    result = TaskExecutor(host, own, dict(task_vars), play_context, strategy._loader,
                          plugin_loader.get_plugin_loader_namespace(), strategy._final_q,
                          strategy._variable_manager).run()
    strategy._pending_results += 1
    strategy._final_q.send_task_result(_RawTaskResult(
        host=host, task=own, return_data=result, task_fields=own.dump_attrs()))
