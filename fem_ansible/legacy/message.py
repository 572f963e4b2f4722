"""Reading a legacy message: the 9 ``|``-separated fields, each as data only.

``task_info`` and ``parametric_args`` are Python literals read with ``ast.literal_eval``
(never ``eval``, which the original uses), ``execution`` is JSON (docs/legacy.md, "Wire
protocol").
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from typing import Any

from .. import schema
from ..errors import RejectedError

FIELDS = ("action", "tool_id", "task_info", "execution", "parametric_args", "user_id",
          "public_ip", "json_action", "token")
SUBMIT = "submit_run"
HEALTH = ("health-check", "pre_checks")
ACTIONS = (SUBMIT, *HEALTH, "send_files", "receive_files", "cancel_run")
TASK_PREFIX = "legacy-"
# execution_id must make a valid task id (DESIGN.md §3) once prefixed: ids that do not are
# refused rather than rewritten, because the same id also names the run's sandbox dir.
EXECUTION_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,120}$"
# user_id names a directory: no separators, no leading dot; e-mail-like names are fine.
USER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,127}$"
MAX_LITERAL_DEPTH = 16


@dataclass(frozen=True)
class LegacyMessage:
    """The 9 fields, parsed.  ``token`` is kept out of ``repr`` and is only ever handed
    to a launch as a secret (docs/legacy.md)."""

    action: str
    tool_id: str
    task_info: dict[str, Any] | None
    execution: dict[str, Any] | None
    parametric_args: dict[str, Any]
    user_id: str | None
    public_ip: str | None
    json_action: str
    token: str | None = field(default=None, repr=False, compare=False)

    @property
    def execution_id(self) -> str | None:
        value = (self.execution or {}).get("execution_id")
        return value if isinstance(value, str) else None

    @property
    def task_id(self) -> str | None:
        eid = self.execution_id
        return TASK_PREFIX + eid if eid and re.fullmatch(EXECUTION_ID_PATTERN, eid) else None


def _none(text: str) -> bool:
    return text.strip() in ("", "None", "null")


def _check_data(value: Any, where: str, depth: int = 0) -> Any:
    """Plain data only (what JSON could say), tuples as lists, bounded nesting."""
    if depth > MAX_LITERAL_DEPTH:
        raise RejectedError(f"{where}: nested deeper than {MAX_LITERAL_DEPTH} levels")
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_check_data(v, where, depth + 1) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise RejectedError(f"{where}: keys must be strings")
        return {k: _check_data(v, where, depth + 1) for k, v in value.items()}
    raise RejectedError(f"{where}: {type(value).__name__} values are not allowed")


def literal_dict(text: str, where: str) -> dict[str, Any] | None:
    """A Python-literal dict (``ast.literal_eval``: constants and containers, no names, no
    calls), or None for an empty/``None`` field."""
    if _none(text):
        return None
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
        raise RejectedError(f"{where}: not a Python literal ({type(e).__name__})") from None
    if not isinstance(value, dict):
        raise RejectedError(f"{where}: expected a dict, got {type(value).__name__}")
    return _check_data(value, where)


def parse_message(body: bytes, max_bytes: int) -> LegacyMessage:
    """Split and parse a legacy body; each field as data only.

    :raises RejectedError: ``invalid_message`` naming the field.
    """
    parts = schema.decode_body(body, max_bytes).split("|")
    if len(parts) != len(FIELDS):
        raise RejectedError(f"expected {len(FIELDS)} '|'-separated fields, got {len(parts)}")
    f = dict(zip(FIELDS, parts, strict=True))
    action = f["action"].strip()
    if action not in ACTIONS:
        raise RejectedError(f"action: unknown action {action[:64]!r}")
    execution = None
    if not _none(f["execution"]):
        try:
            execution = schema.parse_json(f["execution"].encode(), max_bytes)
        except RejectedError as e:
            raise RejectedError(f"execution: {e.message}") from None
        if not isinstance(execution, dict):
            raise RejectedError("execution: expected a JSON object")
    return LegacyMessage(
        action=action,
        tool_id=f["tool_id"].strip(),
        task_info=literal_dict(f["task_info"], "task_info"),
        execution=execution,
        parametric_args=literal_dict(f["parametric_args"], "parametric_args") or {},
        user_id=None if _none(f["user_id"]) else f["user_id"].strip(),
        public_ip=None if _none(f["public_ip"]) else f["public_ip"].strip(),
        json_action=f["json_action"].strip(),
        token=None if _none(f["token"]) else f["token"].strip(),
    )


def run_ids(msg: LegacyMessage, *, user: bool = True) -> tuple[str, str | None]:
    """``(execution_id, user_id)``, checked as safe path components."""
    eid = msg.execution_id
    if eid is None:
        raise RejectedError("execution: execution_id is missing or not a string")
    if not re.fullmatch(EXECUTION_ID_PATTERN, eid):
        raise RejectedError(f"execution: execution_id {eid[:64]!r} does not match "
                            f"{EXECUTION_ID_PATTERN}")
    if not user:
        return eid, msg.user_id
    if msg.user_id is None or not re.fullmatch(USER_ID_PATTERN, msg.user_id):
        raise RejectedError(f"user_id: {str(msg.user_id)[:64]!r} does not match "
                            f"{USER_ID_PATTERN}", task_id=TASK_PREFIX + eid)
    return eid, msg.user_id


def action_of(body: bytes) -> str | None:
    """The action of a body that could not be parsed, when it names a known one."""
    head = body.split(b"|", 1)[0].decode("utf-8", errors="replace").strip()
    return head if head in ACTIONS else None
