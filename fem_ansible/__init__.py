"""fem-ansible: the client of a Federated Execution Manager, running orchestrator tasks next
to a site's private data through Ansible roles.

The public API is what this module re-exports; everything else is internal.  The exports
are imported on first use: fem-ansible's ``ansible-playbook`` (:mod:`.playbook_cli`) and
fem.core's strategy plugin import small modules of this package into every Ansible run,
which should not pay for the configuration's imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Config": "config", "load_config": "config",
    "ConfigError": "errors", "FemError": "errors", "PolicyViolation": "errors",
    "RejectedError": "errors", "TaskFailed": "errors",
}

if TYPE_CHECKING:
    from .config import Config, load_config
    from .errors import ConfigError, FemError, PolicyViolation, RejectedError, TaskFailed

__all__ = [
    "Config",
    "ConfigError",
    "FemError",
    "PolicyViolation",
    "RejectedError",
    "TaskFailed",
    "__version__",
    "load_config",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
