"""The one intake of the node: a message becomes an accepted :class:`Task` or one rejection.

Every way a task arrives goes through :class:`Intake`: ``listen`` (a broker message),
``run``, ``validate`` and ``submit`` (a file), and the legacy protocol (a task it translated,
through :meth:`Intake.read_value`).  So ``validate`` says exactly what ``listen`` would, and
the site policy is decided once per task, here, and travels with it.

The order of the checks is the contract's (DESIGN.md §3): size → signature → JSON → schema
→ ``node_id`` and ``not_after`` → policy (with the inventory's targets and the executor's
role).  The first step that refuses the message ends intake with one :class:`RejectedError`
carrying that step's code and *every* problem the step found: the schema errors (up to
:data:`~fem_ansible.schema.MAX_SCHEMA_ERRORS`), every policy rule broken.  Nothing else is
raised for anything a message holds; the listener's consumers still reject whatever else
escapes (a bug), so a message never stops a listener.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from . import policy, schema
from .config import Config
from .errors import PolicyViolation, RejectedError
from .signatures import HEADER, Verifier
from .site_roles import check_executor
from .targets import Targets


@dataclass(frozen=True)
class Task:
    """An accepted task: its normal form, frozen, and the site's decision about it.

    Attributes:
        task_id, experiment_id, executor, target, image: the fields code outside the roles
            reads; everything else is in :meth:`to_dict`.
        decision: ``fem_policy`` and ``fem_datasets`` of its runs (DESIGN.md §6).
        key_id: the key that signed it; None when unsigned or not checked (a local file).
        normal: the normalised task as JSON text: immutable, and what the journal keeps.
    """

    task_id: str
    experiment_id: str | None
    executor: str
    target: str
    image: str
    decision: policy.Decision
    key_id: str | None
    normal: str

    @classmethod
    def of(cls, task: dict[str, Any], decision: policy.Decision,
           key_id: str | None = None) -> Task:
        return cls(task["task_id"], task["experiment_id"], task["executor"], task["target"],
                   task["image"]["ref"], decision, key_id, json.dumps(task, sort_keys=True))

    def to_dict(self) -> dict[str, Any]:
        """The normalised task (a fresh copy): what the journal stores and events echo."""
        result: dict[str, Any] = json.loads(self.normal)
        return result

    def public(self) -> dict[str, Any]:
        """``fem_task`` as roles see it (no header values, URLs without secrets)."""
        return schema.public_task(self.to_dict())

    def decision_dict(self) -> dict[str, Any]:
        return asdict(self.decision)


class Intake:
    """The node's intake: the config's signature keys, and the inventory for targets.

    :param config: the site config.
    :param targets: the listener's targets (the inventory is read on first use, again on SIGHUP).
    :param verifier: default the config's signature keys.
    """

    def __init__(self, config: Config, targets: Targets, verifier: Verifier | None = None):
        self.config = config
        self.targets = targets
        self.verifier = verifier or Verifier.from_config(config.security.signature)

    def read(self, body: bytes, headers: Mapping[str, Any] | None, *, signed: bool = True,
             on_signed: Callable[[str | None], None] = lambda key_id: None) -> Task:
        """A raw task message, checked in the contract's order.

        :param signed: check ``x-fem-signature`` (messages from the broker); ``run`` and
            ``validate`` read the sysadmin's own file without one.
        :param on_signed: told the signing key's id once the signature passed (the audit).
        :raises RejectedError: the contract's code, every reason of the refusing step.
        """
        key_id, value = self._open(body, headers, signed, on_signed)
        return self.read_value(value, key_id=key_id)

    def _open(self, body: bytes, headers: Mapping[str, Any] | None, signed: bool,
              on_signed: Callable[[str | None], None]) -> tuple[str | None, Any]:
        """The steps every message takes first, tasks and cancels alike: size → signature →
        JSON.  :returns: the signing key's id and the parsed body."""
        limit = self.config.security.max_message_bytes
        schema.check_size(body, limit)
        key_id = self.verifier.verify(body, _header(headers)) if signed else None
        on_signed(key_id)
        return key_id, schema.parse_json(body, limit)

    def read_value(self, value: Any, *, key_id: str | None = None,
                   run_datasets: Mapping[str, str] | None = None) -> Task:
        """A task already parsed from its wire format (the legacy protocol's translation,
        or :meth:`read` after the JSON step): schema → addressing → policy.

        :param run_datasets: datasets the listener resolved for this one task
            (:func:`fem_ansible.policy.decide`), never from a message.
        :raises RejectedError: as :meth:`read`.
        """
        task = self._read_schema(value)
        policy.check_addressing(task, self.config)
        return Task.of(task, self.decide(task, run_datasets), key_id)

    def _read_schema(self, value: Any) -> dict[str, Any]:
        ex = self.config.execution
        return schema.read_task(value, default_executor=ex.default_executor,
                                default_target=ex.target,
                                resource_defaults=self.config.resource_defaults())

    def problems(self, body: bytes) -> list[RejectedError]:
        """The sysadmin's own file (``validate``, ``submit``; no signature), checked as
        :meth:`read` does, but past a wrong ``node_id`` or an expired ``not_after`` on to the
        policy, so that one try lists every problem (issue 31).  Empty: :meth:`read` accepts
        it.  A message refused before its schema was read has one problem: its step's."""
        try:
            task = self._read_schema(self._open(body, None, False, lambda key_id: None)[1])
        except RejectedError as e:
            return [e]
        found = []
        for step in (lambda: policy.check_addressing(task, self.config),
                     lambda: self.decide(task)):
            try:
                step()
            except RejectedError as e:
                found.append(e)
        return found

    def decide(self, task: dict[str, Any], run_datasets: Mapping[str, str] | None = None
               ) -> policy.Decision:
        """The policy, then what only this node knows: the target's hosts in the inventory
        and the executor's role.  All violations together, in one rejection."""
        found: list[tuple[str, str]] = []
        decision = None
        try:
            decision = policy.decide(task, self.config, run_datasets)
        except PolicyViolation as e:
            found.extend(e.violations)
        refused = {rule for rule, _ in found}
        # "allowed but not there" is only news for a target or executor the policy allows.
        if "policy.targets" not in refused:
            policy.collect(found, self.targets.check, task)
        if "policy.executors" not in refused:
            policy.collect(found, check_executor, task, self.config)
        if found or decision is None:
            raise PolicyViolation.of_all(found, task_id=task["task_id"])
        return decision

    def read_control(self, body: bytes, headers: Mapping[str, Any] | None,
                     now: datetime | None = None) -> dict[str, Any]:
        """A control message (``fem.control/v1``), checked as a task is: size, signature,
        JSON, schema (every error), ``node_id`` and ``not_after``.

        :raises RejectedError: as :meth:`read`.
        """
        _key_id, msg = self._open(body, headers, True, lambda key_id: None)
        tid = schema.task_id_of(msg)
        errors = schema.schema_errors(schema.CONTROL_SCHEMA_ID, msg)
        if errors:
            raise RejectedError.of(errors, task_id=tid)
        # A signed cancel names its node (no replay at another node sharing the key) and
        # expires with its not_after.
        policy.check_addressing(msg, self.config, now)
        result: dict[str, Any] = msg
        return result


def _header(headers: Mapping[str, Any] | None) -> Any:
    """The signature header; headers that are not a mapping (a broken message) have none."""
    return headers.get(HEADER) if isinstance(headers, Mapping) else None

