import os
import stat
import threading

from fem_ansible.events import task_event
from fem_ansible.journal import Journal


def ev(state, tid="t1"):
    return task_event("n", {"task_id": tid}, state, state.lower())


def test_seq_order_and_publication(tmp_path):
    j = Journal(tmp_path / "j.sqlite")
    assert stat.S_IMODE(os.stat(tmp_path / "j.sqlite").st_mode) == 0o600
    existing, first = j.add_task("t1", {"task_id": "t1"}, ev("RECEIVED"))
    assert existing is None and first["seq"] == 1
    assert j.append_event("t1", ev("STAGING_IN"))["seq"] == 2
    assert j.append_event(None, ev("REJECTED", tid=None))["seq"] == 1
    assert [e["state"] for _, e in j.unpublished()] == ["RECEIVED", "STAGING_IN", "REJECTED"]
    for event_id, _ in j.unpublished():
        j.mark_published(event_id)
    assert j.unpublished() == []
    j.append_event("t1", ev("COMPLETED"))
    rec = j.get("t1", with_events=True)
    assert rec.terminal and rec.finished_at and [e["seq"] for e in rec.events] == [1, 2, 3]
    j.republish("t1", 3)
    assert [(e["seq"], e["state"]) for _, e in j.unpublished()] == [(3, "COMPLETED")]


def test_known_task_is_not_added_twice(tmp_path):
    j = Journal(tmp_path / "j.sqlite")
    j.add_task("t1", {"task_id": "t1"}, ev("RECEIVED"))
    existing, event = j.add_task("t1", {"task_id": "t1"}, ev("RECEIVED"))
    assert event is None and existing.state == "RECEIVED"


def test_survives_reopen_and_keeps_stages(tmp_path):
    j = Journal(tmp_path / "j.sqlite")
    j.add_task("t1", {"task_id": "t1", "x": [1]}, ev("RECEIVED"))
    j.update("t1", stages_done=["stage_in"], result={"exit_code": 0}, attempt=2, host="h")
    j.close()
    rec = Journal(tmp_path / "j.sqlite").unfinished()[0]
    assert (rec.task, rec.stages_done, rec.result, rec.attempt, rec.host) == (
        {"task_id": "t1", "x": [1]}, ["stage_in"], {"exit_code": 0}, 2, "h")


def test_concurrent_writers_get_distinct_seqs(tmp_path):
    j = Journal(tmp_path / "j.sqlite")
    j.add_task("t1", {"task_id": "t1"}, ev("RECEIVED"))

    def write():
        for _ in range(50):
            j.append_event("t1", ev("RUNNING"))

    threads = [threading.Thread(target=write) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seqs = [e["seq"] for e in j.get("t1", with_events=True).events]
    assert seqs == list(range(1, 202))


def test_cancels_and_pruning(tmp_path):
    j = Journal(tmp_path / "j.sqlite")
    j.record_cancel("later")
    assert j.is_cancelled("later") and not j.is_cancelled("other")
    for i in range(4):
        j.add_task(f"t{i}", {}, ev("RECEIVED", f"t{i}"))
        j.append_event(f"t{i}", ev("COMPLETED", f"t{i}"))
    assert sorted(j.finished_beyond(2)) == ["t0", "t1"]


def test_a_journal_of_an_earlier_version_gains_the_decision_column(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript("""CREATE TABLE tasks (task_id TEXT PRIMARY KEY, task TEXT NOT NULL,
        state TEXT NOT NULL, attempt INTEGER NOT NULL DEFAULT 1,
        stages_done TEXT NOT NULL DEFAULT '[]', result TEXT NOT NULL DEFAULT '{}', host TEXT,
        received_at REAL NOT NULL, updated_at REAL NOT NULL, finished_at REAL);
        INSERT INTO tasks (task_id, task, state, received_at, updated_at)
        VALUES ('old', '{"task_id": "old"}', 'RUNNING', 1, 1);""")
    db.close()
    j = Journal(path)
    assert j.get("old").decision is None  # decided again when it runs
    j.add_task("new", {"task_id": "new"}, ev("RECEIVED", "new"), {"policy": {}, "datasets": []})
    assert j.get("new").decision == {"policy": {}, "datasets": []}


def test_rejections_are_kept_bounded(tmp_path, monkeypatch):
    from fem_ansible import journal

    monkeypatch.setattr(journal, "KEEP_REJECTIONS", 2)
    j = Journal(tmp_path / "j.sqlite")
    for i in range(4):
        j.add_rejection(f"r{i}", "invalid_message", [f"reason {i}"], None)
    assert [r.task_id for r in j.recent()] == ["r3", "r2"]
    assert j.rejections("r3")[0].rejection == {"code": "invalid_message",
                                               "reasons": ["reason 3"]}
