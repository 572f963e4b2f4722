"""fem.core's ``download`` and ``git_checkout`` modules, run as Ansible runs a module,
against real loopback servers: a server that answers a byte at a time, each read in time,
is ended by the module's overall deadline (issue 26); a whole answer still downloads."""

from __future__ import annotations

import time
from pathlib import Path

from tests.support.slow_server import SlowServer
from tests.support.upload_server import UploadServer
from tests.test_executor_modules import run_module


def test_deadline_ends_a_download_a_trickling_server_keeps_alive(tmp_path: Path) -> None:
    with SlowServer("trickle", interval_s=1) as srv:
        start = time.monotonic()
        rc, result = run_module("download", tmp_path, url=srv.url + "/in.csv",
                                dest=str(tmp_path / "in.csv"), max_bytes=1 << 20,
                                timeout=30, deadline=3)
        took = time.monotonic() - start
    assert rc == 1 and result["msg"] == "input in.csv: not downloaded within 3s", result
    assert took < 20, took  # the answer alone would take 39 s
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".download")) == []
    assert not (tmp_path / "in.csv").exists()


def test_a_whole_answer_downloads_within_the_deadline(tmp_path: Path) -> None:
    with UploadServer(tmp_path / "srv") as srv:
        (tmp_path / "srv" / "in.csv").write_bytes(b"a,b\n1,2\n")
        rc, result = run_module("download", tmp_path, url=srv.url + "/in.csv",
                                dest=str(tmp_path / "in.csv"), max_bytes=1 << 20, deadline=30)
    assert rc == 0, result
    assert (tmp_path / "in.csv").read_bytes() == b"a,b\n1,2\n"


def test_timeout_ends_a_checkout_a_trickling_server_keeps_alive(tmp_path: Path) -> None:
    with SlowServer("trickle", interval_s=1) as srv:
        start = time.monotonic()
        rc, result = run_module("git_checkout", tmp_path, repo=srv.url + "/sample.git",
                                dest=str(tmp_path / "src"), timeout=3)
        took = time.monotonic() - start
        assert srv.bodies >= 1, "git asked the server"
        end = time.monotonic() + 10
        while srv.open and time.monotonic() < end:  # git's connection is gone
            time.sleep(0.1)
        assert srv.open == 0
    assert rc == 1 and "did not end within the 3s" in result["msg"], result
    assert took < 20, took
