"""The one place a legacy task enters the node's intake.

The ``fem.task/v1`` task a ``submit_run`` was translated into goes through the node's one
intake (fem_ansible/intake.py) as any task message after its JSON parse: schema,
addressing, policy (with the adapter's own datasets), the inventory target and the executor
role, every violation in one rejection.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..intake import Task
from ..lifecycle import Node
from ..signatures import HEADER


def read_task(node: Node, task: dict[str, Any], run_datasets: Mapping[str, str]) -> Task:
    """The accepted task of a legacy ``submit_run``.

    :raises RejectedError: with the contract's code and the task id.
    """
    return node.intake.read_value(task, run_datasets=run_datasets)


def check_signature(node: Node, body: bytes, headers: Any) -> None:
    """The body's ``x-fem-signature``, checked with the node's keys as a task's is
    (nothing to check when signatures are off).

    :raises RejectedError: ``signature_invalid``.
    """
    header = headers.get(HEADER) if isinstance(headers, Mapping) else None
    node.intake.verifier.verify(body, header)
