"""A multi-line git or engine error keeps one line per event and per log record (issue 20
item 9): the event lines of `run`/`tasks` and the text log are read by grep and pipelines."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess

import pytest

from fem_ansible.display import format_event
from fem_ansible.logs import JsonFormatter, TextFormatter, one_line
from tests.support.harness import FEM

GIT_ERROR = ("source checkout failed: fatal: remote error: \n"
             "  access denied or repository not exported: /nope.git\r\n\n"
             "fatal: Could not read from remote repository.\u2028done")


def test_one_line_joins_every_kind_of_line_break():
    assert one_line(GIT_ERROR) == (
        "source checkout failed: fatal: remote error: | access denied or repository not "
        "exported: /nope.git | fatal: Could not read from remote repository. | done")
    assert one_line("plain") == "plain"


def test_an_event_with_a_multi_line_message_is_one_line():
    event = {"seq": 4, "state": "FAILED", "message": GIT_ERROR,
             "error": {"code": "source_checkout_failed", "message": GIT_ERROR}}
    line = format_event(event)
    assert "\n" not in line and "\r" not in line and "\u2028" not in line
    assert line.startswith("  4 FAILED") and line.endswith("[error=source_checkout_failed]")


def test_a_multi_line_log_message_is_one_text_line_and_one_json_line():
    for formatter in (TextFormatter(), JsonFormatter()):
        out = io.StringIO()
        handler = logging.StreamHandler(out)
        handler.setFormatter(formatter)
        logger = logging.getLogger(f"test-one-line-{type(formatter).__name__}")
        logger.addHandler(handler)
        logger.propagate = False
        logger.warning("engine said: %s", "Error response from daemon:\nno such image",
                       extra={"task_id": "t1"})
        (line,) = out.getvalue().splitlines()
        if isinstance(formatter, JsonFormatter):
            assert json.loads(line)["message"].endswith("daemon:\nno such image")
        else:
            assert line.endswith("engine said: Error response from daemon: | no such image "
                                 "[task_id=t1]")


@pytest.mark.e2e
def test_a_real_git_error_is_one_event_line(site, tmp_path):
    """git's clone error is "Cloning into …" and "fatal: …" on two lines."""
    task = site.task("multi-line", source={"repo": site.env["FEM_TEST_GIT_BASE_URL"]
                                           + "/no-such-repo.git"})
    task_file = tmp_path / "task.json"
    task_file.write_text(json.dumps(task))
    done = subprocess.run([FEM, "run", "--config", str(site.config()), str(task_file)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert all(re.match(r"^ {0,2}\d+ [A-Z_]+ ", line) for line in lines), lines
    (failed,) = [line for line in lines if " FAILED " in line]
    assert "fatal:" in failed and "error=source_checkout_failed" in failed
