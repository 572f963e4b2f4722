"""The one place a legacy task enters the node's intake.

The mapped ``fem.task/v1`` task goes through what any task message goes through after its
JSON parse: schema, addressing, policy (with the adapter's own datasets), the inventory
target and the executor role.  Kept to one narrow function so that the node's single intake
(issue 17 item 2) can replace its body without touching the adapter.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .. import policy, schema
from ..lifecycle import Node
from ..site_roles import check_executor


def read_task(node: Node, task: dict[str, Any], run_datasets: Mapping[str, str]
              ) -> dict[str, Any]:
    """The normalised, policy-checked task of a legacy ``submit_run``.

    :raises RejectedError: with the contract's code and the task id.
    """
    config = node.config
    ex = config.execution
    normal = schema.read_task(task, default_executor=ex.default_executor,
                              default_target=ex.target,
                              resource_defaults=config.resource_defaults())
    policy.check_addressing(normal, config)
    policy.decide(normal, config, run_datasets)
    node.targets.check(normal)
    check_executor(normal, config)
    return normal
