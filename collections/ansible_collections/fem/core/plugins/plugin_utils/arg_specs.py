# Copyright: fem-ansible developers
# SPDX-License-Identifier: Apache-2.0
"""A role's argument validation that passes, answered in the controller, without a worker.

Why: Ansible puts a ``validate_argument_spec`` task before the tasks of every role entry
point that has an argument spec (``meta/argument_specs.yml``), and each forks a worker
process: a trivial task's playbook validates eight entry points, 20-70 ms each
(bench/RESULTS.md, issue 30).  What the validation reads is the spec, the role's parameters and the
variables the spec names, all of which the strategy has; so it validates here and, where the
arguments pass, hands the worker's result over as a stage marker's is
(fem.core's ``plugin_utils.stage_markers.hand_over``).

What is done here is what ``validate_argument_spec``'s action plugin does (ansible-core
2.19.14): the variables the spec names, templated with the task's variables, combined with
the role's parameters and validated by ``ArgumentSpecValidator``.  So, only:

- **the task Ansible creates:** ``ansible.builtin.validate_argument_spec`` with only its
  own arguments, all of them literal (a spec whose text Ansible could take for a template
  goes to a worker), and none of the keywords a stage marker may not have (a ``when``
  inherited from an include, a loop, a delegation...);
- **a clean pass:** arguments that fail, a template that raises, or a warning (a
  deprecated alias) go to a worker, which validates again and fails or warns as always.

What a worker would also do and this does not: template the play context and the
connection's options (what the markers' review kept out of the controller) and add the
connection's variables that the host's lack.  A role variable whose template reads one of
those (``ansible_host``...) is templated here without it: undefined, it raises and goes to
a worker; with a ``default``, it may validate another value than the worker would, which
can only turn a worker's pass into a failure here, and a failure goes to a worker.

The names of Ansible's this relies on are fem.core's ``plugin_utils.fastpath`` group
``arg_specs``, checked like every patch's.
"""

from __future__ import annotations

from typing import Any

from ansible._internal import _display_utils
from ansible.module_utils.common.arg_spec import ArgumentSpecValidator
from ansible.template import Templar
from ansible.utils.vars import combine_vars
from ansible_collections.fem.core.plugins.plugin_utils import stage_markers

ACTION = "ansible.builtin.validate_argument_spec"
#: What Ansible's validation task is given (Role._create_validation_task).
ARGS = frozenset({"argument_spec", "provided_arguments", "validate_args_context"})
PASSED = "The arg spec validation passed"


def result(task: Any, task_vars: dict[str, Any]) -> dict[str, Any] | None:
    """The worker's result for ``task`` if it is a role's validation that passes with
    ``task_vars``, else None."""
    args = task.args
    if not (task.action == ACTION and "argument_spec" in args and set(args) <= ARGS
            and stage_markers.plain(task) and stage_markers.literal(args)):
        return None
    spec = args["argument_spec"]
    given = args.get("provided_arguments", {})
    if not (isinstance(spec, dict) and isinstance(given, dict)):
        return None
    named = {name: task_vars[name] for name in spec if name in task_vars}
    try:
        with _display_utils.DeferredWarningContext(variables=task_vars) as warned:
            values = Templar(loader=task._loader, variables=task_vars).template(named)
            checked = ArgumentSpecValidator(spec).validate(
                combine_vars(values, given), validate_role_argument_spec=True)
    except Exception:  # a worker templates and validates again, and fails as it does
        return None
    if checked.error_messages or warned.get_warnings() or warned.get_deprecation_warnings():
        return None
    return {"validate_args_context": args.get("validate_args_context", {}),
            "changed": False, "msg": PASSED, "_ansible_no_log": task.no_log}
