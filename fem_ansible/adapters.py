"""The seam between the listener and a protocol adapter (the legacy FEM-client protocol).

An adapter serves another wire protocol on the listener's broker connection and runs its
tasks through the same journal and worker slots.  It sees the listener only through
:class:`ListenerSurface`, a small public surface, and the listener sees it only through
:class:`Adapter`; neither module imports the other (``fem-ansible listen`` composes them).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import pika

    from .config import Config
    from .journal import Journal
    from .lifecycle import Node


class ListenerSurface(Protocol):
    """What the listener offers an adapter: the listener itself, not an inventory host.
    Every method but :meth:`call_on_connection` and :meth:`running_count` must be called on
    the connection thread."""

    config: Config
    node: Node
    journal: Journal

    def call_on_connection(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the connection thread soon (dropped while disconnected)."""

    def publish_pending(self) -> None:
        """Publish the journaled events not published yet."""

    def has_free_slot(self) -> bool:
        """Whether a task launched now would run at once (``execution.max_parallel``)."""

    def launch(self, task_id: str) -> None:
        """Run a task just journaled in a worker slot."""

    def cancel(self, task_id: str, by: str = "orchestrator") -> bool:
        """Record a cancel (``by`` whom) and stop the task if it runs here; whether it ran."""

    def running_count(self) -> int:
        """Tasks this listener holds now."""


class Adapter(Protocol):
    """What the listener asks of an adapter."""

    def attach(self, conn: pika.BlockingConnection) -> None:
        """A new broker connection: open channels, send what is pending."""

    def detach(self) -> None:
        """The connection is gone."""

    def slots_changed(self, free: bool) -> None:
        """On the connection thread: whether a worker slot is free (launch waiting work)."""

    def run_datasets(self, task: Mapping[str, Any]) -> dict[str, str]:
        """Datasets this adapter resolves for one of its tasks (name -> host path)."""

    def run_secret_env(self, task: Mapping[str, Any]) -> dict[str, str]:
        """Container env vars passed to one of its tasks as secrets (``fem_secrets.env``)."""

    def finished(self, task_id: str, event: dict[str, Any]) -> None:
        """On the worker: a task ended with ``event`` (``{}`` when left to recovery)."""

    def close(self) -> None:
        """The listener is shutting down."""


AdapterFactory = Callable[[ListenerSurface], Adapter]
