"""Faults of the node itself (issue 28), without the services: a journal that refuses writes
makes the listener give the message back and stop taking tasks, not die; it heals by
itself.  The real thing (a full file system) is in tests/test_e2e_node_faults.py."""

from __future__ import annotations

import json
import sqlite3
import threading
from types import SimpleNamespace

import pytest

from fem_ansible import schema
from fem_ansible.doctor import check_floor
from fem_ansible.events import node_heartbeat, task_event
from fem_ansible.journal import Journal, JournalUnwritable
from fem_ansible.lifecycle import CancelRequest
from fem_ansible.listener import Listener
from tests.support.harness import sample_task
from tests.test_hardening import ENV
from tests.test_listener_slots import Channel


class Consuming(Channel):
    def basic_consume(self, queue, callback):
        self.calls.append(("consume", queue))
        return "ctag2"


class Refusing:
    """Makes a journal's writes fail as SQLite does on a full disk while ``on`` is set."""

    def __init__(self, journal: Journal, monkeypatch: pytest.MonkeyPatch):
        self.on = True
        tx = journal._tx

        def refusing_tx():
            if self.on:
                raise sqlite3.OperationalError("database or disk is full")
            return tx()

        monkeypatch.setattr(journal, "_tx", refusing_tx)


def ev(state, tid="t1"):
    return task_event("n", {"task_id": tid}, state, state.lower())


def test_a_refused_write_is_a_fault_that_heals(tmp_path, monkeypatch):
    j = Journal(tmp_path / "j.sqlite")
    seen = []
    j.on_fault = seen.append
    refusing = Refusing(j, monkeypatch)
    with pytest.raises(JournalUnwritable) as e:
        j.add_task("t1", {"task_id": "t1"}, ev("RECEIVED"))
    assert isinstance(e.value, OSError) and e.value.filename == str(tmp_path / "j.sqlite")
    assert "database or disk is full" in j.fault
    refusing.on = False
    j.probe()
    assert j.fault is None and seen == [seen[0], None]
    assert j.get("t1") is None  # nothing half-written


def test_a_patient_writer_waits_for_the_journal(tmp_path, monkeypatch):
    j = Journal(tmp_path / "j.sqlite")
    j.add_task("t1", {"task_id": "t1"}, ev("RECEIVED"))
    refusing = Refusing(j, monkeypatch)
    monkeypatch.setattr("fem_ansible.journal.RETRY_MIN_S", 0.05)
    stop = threading.Event()
    threading.Timer(0.3, lambda: setattr(refusing, "on", False)).start()
    with j.patient(stop):
        stored = j.append_event("t1", ev("COMPLETED"))
    assert stored["seq"] == 2 and j.fault is None
    refusing.on = True
    stop.set()
    with j.patient(stop), pytest.raises(JournalUnwritable):  # given up once stop is set
        j.append_event("t1", ev("FAILED"))


def test_a_commit_the_disk_refuses_leaves_no_open_transaction(tmp_path):
    j = Journal(tmp_path / "j.sqlite")
    with pytest.raises(sqlite3.OperationalError), j._tx() as db:
        db.execute("INSERT INTO cancels (task_id, at) VALUES ('x', 1)")
        raise sqlite3.OperationalError("database or disk is full")
    assert not j._db.in_transaction
    j.record_cancel("y")
    assert j.is_cancelled("y") and not j.is_cancelled("x")


def test_a_message_the_journal_cannot_take_goes_back_and_the_node_says_why(
        make_config, monkeypatch):
    listener = Listener(make_config())
    beats = []
    monkeypatch.setattr(listener, "_heartbeat", lambda: beats.append(
        (listener.accepting, listener.reason)))
    monkeypatch.setattr(listener, "call_on_connection", lambda fn: fn())
    try:
        ch = Consuming()
        listener._tasks_ch, listener._consumer_tag = ch, "ctag"
        listener._names = SimpleNamespace(tasks="q")
        refusing = Refusing(listener.journal, monkeypatch)
        body = json.dumps(sample_task(ENV, "full")).encode()
        listener._on_task(ch, SimpleNamespace(delivery_tag=7), SimpleNamespace(headers={}),
                          body)
        assert sorted(ch.calls) == [("cancel", "ctag"), ("nack", 7, True)]
        assert listener.journal.get("full") is None
        assert not listener.accepting and not listener.has_free_slot()
        assert "database or disk is full" in listener.reason
        assert beats and beats[-1][0] is False  # said at once
        assert listener.running == {}
        # Healed: the probe write succeeds after the backoff; consuming starts again.
        refusing.on = False
        listener._check_health(listener._retry_at)
        assert listener.accepting and listener.faults() == {}
        assert beats[-1] == (True, None) and ch.calls[-1] == ("consume", "q")
    finally:
        listener.journal.close()


def test_the_work_dir_below_its_floor_stops_intake(make_config, monkeypatch):
    listener = Listener(make_config(execution={"min_free_bytes": "1024Ti"}))
    monkeypatch.setattr(listener, "call_on_connection", lambda fn: None)
    try:
        listener._check_health(0.0)
        assert not listener.accepting
        reason = listener.reason
        assert "free of" in reason and "below execution.min_free_bytes (1024.0 TiB)" in reason
    finally:
        listener.journal.close()


def test_doctor_says_the_work_dir_is_below_its_floor(make_config):
    config = make_config(execution={"min_free_bytes": "1024Ti"})
    (check,) = check_floor(config)
    assert check.status == "fail" and "below execution.min_free_bytes" in check.detail
    (check,) = check_floor(make_config(execution={"min_free_bytes": "1Mi"}))
    assert check.status == "ok"


def test_the_node_status_says_why_it_is_not_accepting():
    beat = node_heartbeat("n", "l1", 2, 0, False, "the journal cannot be written (full)")
    assert beat["reason"] == "the journal cannot be written (full)"
    assert schema.schema_errors(schema.NODE_SCHEMA_ID, beat) == []
    assert "reason" not in node_heartbeat("n", "l1", 2, 0, True, "ignored")


def test_a_cancel_the_journal_cannot_record_still_stops_the_task_here(make_config,
                                                                      monkeypatch):
    listener = Listener(make_config())
    try:
        stop = CancelRequest()
        listener.running["here"] = (None, stop)
        Refusing(listener.journal, monkeypatch)
        ch = Channel()
        body = json.dumps({"schema": "fem.control/v1", "action": "cancel",
                           "task_id": "here"}).encode()
        listener._on_control(ch, SimpleNamespace(delivery_tag=3), SimpleNamespace(headers={}),
                             body)
        assert stop.is_set() and stop.by == "orchestrator" and ch.calls == [("ack", 3)]
    finally:
        listener.journal.close()
