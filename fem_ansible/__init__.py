"""fem-ansible: the client of a Federated Execution Manager, running orchestrator tasks next
to a site's private data through Ansible roles.

The public API is what this module re-exports; everything else is internal.
"""

__version__ = "0.1.0"

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
