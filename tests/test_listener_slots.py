"""A listener holds at most ``execution.max_parallel`` tasks (DESIGN.md §5), whichever of its
consumers (tasks, an adapter's) is delivered the message for the last slot."""

from __future__ import annotations

import json
from types import SimpleNamespace

from fem_ansible.listener import Listener
from tests.support.harness import sample_task
from tests.test_hardening import ENV


class Channel:
    is_open = True

    def __init__(self):
        self.calls = []

    def basic_nack(self, tag, requeue):
        self.calls.append(("nack", tag, requeue))

    def basic_ack(self, tag):
        self.calls.append(("ack", tag))

    def basic_cancel(self, tag):
        self.calls.append(("cancel", tag))


def test_a_task_delivered_with_no_free_slot_goes_back_to_the_queue(make_config):
    config = make_config()
    listener = Listener(config)
    try:
        # The one slot is held (by a legacy run, say) when the task consumer's delivery runs.
        listener.running["held"] = (None, None)
        ch = Channel()
        listener._tasks_ch, listener._consumer_tag, listener._names = ch, "ctag", object()
        body = json.dumps(sample_task(ENV, "late")).encode()
        listener._on_task(ch, SimpleNamespace(delivery_tag=5), SimpleNamespace(headers={}),
                          body)
        assert ch.calls == [("nack", 5, True), ("cancel", "ctag")]
        assert listener.journal.get("late") is None  # not read, not journaled, not run
        assert list(listener.running) == ["held"]
    finally:
        listener.journal.close()
