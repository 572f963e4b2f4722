"""Log lines about a task carry its task_id, in both formats, whoever logs them."""

from __future__ import annotations

import json
import logging
import threading

from fem_ansible.logs import setup_logging, task_context


def test_lines_about_a_task_carry_its_id(capsys):
    setup_logging("json")
    log = logging.getLogger("fem_ansible.transfer")  # a module that knows nothing of tasks
    with task_context("t-42"):
        log.warning("upload failed, retrying")
        log.info("explicit", extra={"task_id": "other"})  # an explicit id wins
    log.info("no task here")

    def elsewhere():  # another thread does not inherit the task
        log.info("other thread")

    with task_context("t-42"):
        worker = threading.Thread(target=elsewhere)
        worker.start()
        worker.join()
    lines = [json.loads(x) for x in capsys.readouterr().err.splitlines()]
    assert [(x["message"], x.get("task_id")) for x in lines] == [
        ("upload failed, retrying", "t-42"), ("explicit", "other"), ("no task here", None),
        ("other thread", None)]

    setup_logging("text")
    with task_context("t-43"):
        log.warning("in text")
    assert capsys.readouterr().err.rstrip().endswith("in text [task_id=t-43]")
