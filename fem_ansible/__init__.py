"""fem-ansible: the client of a Federated Execution Manager, running orchestrator tasks next
to a site's private data through Ansible roles.

The public API is what this module re-exports; everything else is internal.  The exports
are imported on first use: fem-ansible's ``ansible-playbook`` (:mod:`.playbook_cli`) and
fem.core's strategy plugin import small modules of this package into every Ansible run,
which should not pay for the configuration's imports.
"""

from __future__ import annotations

import importlib
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

DISTRIBUTION = "fem-ansible"

_EXPORTS = {
    "Config": "config", "load_config": "config",
    "ConfigError": "errors", "FemError": "errors", "PolicyViolation": "errors",
    "RejectedError": "errors", "TaskFailed": "errors",
}

if TYPE_CHECKING:
    __version__: str
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


@cache
def _version() -> str:
    """The installed distribution's version, so that after an upgrade ``--version``, the
    ``fem_info`` metric and the heartbeat say what ``pip show`` says.  A source tree run
    without an install has no metadata: its ``pyproject.toml`` says the version then.
    Read on first use, not at import: Ansible runs import this package."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        pass
    try:
        import tomllib

        project = Path(__file__).resolve().parent.parent / "pyproject.toml"
        return str(tomllib.loads(project.read_text(encoding="utf-8"))["project"]["version"])
    except (OSError, KeyError, ValueError):
        return "0+unknown"


def __getattr__(name: str) -> Any:
    if name == "__version__":
        return _version()
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
