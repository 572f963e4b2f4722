"""The one error hierarchy of fem-ansible.

Every error that ends a task carries the contract's error ``code`` and ``stage``
(DESIGN.md §4), so the code that turns it into an event never has to guess.  The CLI alone
maps these classes to exit codes.
"""

from __future__ import annotations


class FemError(Exception):
    """Base of every fem-ansible error."""

    code = "internal_error"
    stage = "intake"

    def __init__(self, message: str, *, code: str | None = None, stage: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code
        if stage is not None:
            self.stage = stage

    @property
    def message(self) -> str:
        return str(self)


class ConfigError(FemError):
    """The config file or an ``FEM_*`` override is missing, malformed or names an unknown key."""

    code = "config_error"


class RejectedError(FemError):
    """A message is refused at intake: nothing runs.

    ``code`` is one of ``invalid_message``, ``signature_invalid``, ``expired``,
    ``wrong_node``, ``policy_violation``; ``task_id`` is the message's id once it could be read.
    ``reasons`` lists every problem found at the step that refused the message (all the
    schema errors, every policy rule broken), so a sender fixes them in one go; the message
    is ``reasons`` joined.
    """

    code = "invalid_message"

    def __init__(
        self, message: str, *, code: str = "invalid_message", task_id: str | None = None,
        reasons: list[str] | tuple[str, ...] | None = None,
    ):
        super().__init__(message, code=code, stage="intake")
        self.task_id = task_id
        self.reasons: tuple[str, ...] = tuple(reasons) if reasons else (message,)

    @classmethod
    def of(cls, reasons: list[str], *, code: str = "invalid_message",
           task_id: str | None = None) -> RejectedError:
        """One rejection for several problems: ``3 problems: a; b; c``."""
        return cls(_joined(reasons), code=code, task_id=task_id, reasons=reasons)


class PolicyViolation(RejectedError):
    """The task asks for something the site policy does not allow.

    ``violations`` are ``(rule, message)`` pairs, one per rule broken; ``rule`` is the first
    one's rule (``policy.images``, ``policy.limits.memory``…).
    """

    def __init__(self, rule: str, message: str, *, task_id: str | None = None,
                 more: list[tuple[str, str]] | None = None):
        self.violations: tuple[tuple[str, str], ...] = ((rule, message), *(more or ()))
        reasons = [f"{r}: {m}" for r, m in self.violations]
        super().__init__(_joined(reasons), code="policy_violation", task_id=task_id,
                         reasons=reasons)
        self.rule = rule

    @classmethod
    def of_all(cls, violations: list[tuple[str, str]], *,
               task_id: str | None = None) -> PolicyViolation:
        """One rejection listing every ``(rule, message)`` pair (at least one)."""
        (rule, message), *more = violations
        return cls(rule, message, task_id=task_id, more=more)


def _joined(reasons: list[str]) -> str:
    if len(reasons) == 1:
        return reasons[0]
    return f"{len(reasons)} problems: " + "; ".join(reasons)


class TaskFailed(FemError):
    """A stage of an accepted task failed; ``code``/``stage`` say which (DESIGN.md §4)."""

    code = "execution_failed"
    stage = "run"
