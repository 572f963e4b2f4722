"""Where a legacy ``submit_run`` waits for a worker slot (docs/legacy.md, docs/decisions.md).

The legacy queue is consumed always, so control actions are answered whatever the slots
hold; only a run waits.  It waits here, unacked and not journaled (a crash gives it back to
the broker), until the listener's one slot rule, ``ListenerSurface.has_free_slot``, says
yes; the adapter decides no slot of its own.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Any

import pika

from .message import LegacyMessage

log = logging.getLogger(__name__)

# A held submit_run is given back to the queue (and so redelivered) this often: RabbitMQ
# closes a channel holding an unacked delivery past its consumer_timeout (30 min default).
HELD_REFRESH_S = 600.0

# A delivery as the consumer got it: channel, method, properties, and the message read.
Delivery = tuple[Any, Any, Any, LegacyMessage]


class HeldRuns:
    """The ``submit_run``s delivered while every slot was busy, oldest first, unacked.

    :param has_free_slot: the listener's slot rule.
    :param launch: called (on the connection thread) with a held delivery once a slot is free.
    :param prefetch: ``legacy.prefetch``: with this many held, control actions wait too.
    """

    def __init__(self, has_free_slot: Callable[[], bool], launch: Callable[..., None],
                 prefetch: int):
        self.has_free_slot = has_free_slot
        self.launch = launch
        self.prefetch = prefetch
        self._held: deque[Delivery] = deque()
        self._draining = False
        self._conn: pika.BlockingConnection | None = None

    def attach(self, conn: pika.BlockingConnection) -> None:
        """A new connection: nothing is held yet; refresh the held ones on its clock."""
        self._conn = conn
        self._held.clear()
        conn.call_later(HELD_REFRESH_S, self.refresh)

    def detach(self) -> None:
        # The broker gives the held submit_runs back to the queue with the connection.
        self._conn = None
        self._held.clear()

    def hold(self, ch: Any, method: Any, props: Any, msg: LegacyMessage) -> None:
        """A ``submit_run`` waits behind the ones held before it; launched now if a slot is
        free."""
        self._held.append((ch, method, props, msg))
        self.drain()
        if self._held and len(self._held) >= self.prefetch:
            log.warning("%d submit_run(s) wait for a slot: legacy.prefetch is reached, "
                        "control actions wait behind them", len(self._held))

    def drain(self) -> None:
        """Launch held ``submit_run``s, oldest first, while a slot is free."""
        if self._draining:
            return  # listener.launch calls back here: the loop below goes on
        self._draining = True
        try:
            while self._held and self.has_free_slot():
                ch, method, props, msg = self._held.popleft()
                if ch.is_open:
                    self.launch(ch, method, props, msg)
        finally:
            self._draining = False

    def refresh(self) -> None:
        """Give every held ``submit_run`` back to the queue, in order, before RabbitMQ's
        consumer timeout closes the channel; it is redelivered at once and held again."""
        conn = self._conn
        if conn is None or not conn.is_open:
            return
        held, self._held = self._held, deque()
        for ch, method, _props, _msg in held:
            if ch.is_open:
                ch.basic_nack(method.delivery_tag, requeue=True)
        conn.call_later(HELD_REFRESH_S, self.refresh)
