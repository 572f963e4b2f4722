"""The original FEM-client protocol (DESIGN.md §9), served beside the node's own.

Sites that run the original FEM-client against the existing FEM-orchestrator can swap in
fem-ansible with ``legacy.enabled: true``: the listener then also consumes the node's legacy
queue, reads its 9-field pipe-delimited messages and answers each on its ``reply_to`` with
the chunked reply the orchestrator reassembles.  Only reception and reply are legacy: a
``submit_run`` becomes a ``fem.task/v1`` task that goes through the same schema, policy,
journal, playbook and roles as any other (docs/legacy.md).

The package is an adapter on the listener's public surface (fem_ansible/adapters.py):
``message`` reads the fields, ``taskinfo`` maps a message's own task definition,
``intake`` hands the task to the node's intake, ``replies`` encodes the answer; each action
is a module (``submit``, ``cancel``, ``files``, ``health``) over ``sandbox`` (the files),
``held`` (a ``submit_run`` waiting for a slot) and ``records`` (what its reply needs);
``adapter`` is the consumer that dispatches them.
"""

from __future__ import annotations

from ..adapters import AdapterFactory
from ..config import Config
from .adapter import LegacyAdapter


def adapters(config: Config) -> list[AdapterFactory]:
    """The protocol adapters ``fem-ansible listen`` serves for this config."""
    return [LegacyAdapter] if config.legacy.enabled else []
