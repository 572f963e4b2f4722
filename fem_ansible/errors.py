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
    """

    code = "invalid_message"

    def __init__(
        self, message: str, *, code: str = "invalid_message", task_id: str | None = None
    ):
        super().__init__(message, code=code, stage="intake")
        self.task_id = task_id


class PolicyViolation(RejectedError):
    """The task asks for something the site policy does not allow; ``rule`` names the rule."""

    def __init__(self, rule: str, message: str, *, task_id: str | None = None):
        super().__init__(f"{rule}: {message}", code="policy_violation", task_id=task_id)
        self.rule = rule


class TaskFailed(FemError):
    """A stage of an accepted task failed; ``code``/``stage`` say which (DESIGN.md §4)."""

    code = "execution_failed"
    stage = "run"
