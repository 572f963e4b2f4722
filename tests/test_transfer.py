"""transfer.upload's bounds (issue 26): an overall deadline a trickling server cannot hold,
a cancel that stops the try in flight, and a response cut inside its head or body is a
failed upload, never a success.  Real sockets on 127.0.0.1 (tests/support/slow_server.py,
tests/support/upload_server.py)."""

from __future__ import annotations

import ssl
import threading
import time
from pathlib import Path

import pytest

from fem_ansible.config import HttpConfig
from fem_ansible.errors import TaskFailed
from fem_ansible.transfer import Archive, upload
from tests.support.secure_services import _certificates
from tests.support.slow_server import SlowServer
from tests.support.upload_server import UploadServer


@pytest.fixture
def archive(tmp_path: Path) -> Archive:
    path = tmp_path / "outputs.tar.gz"
    path.write_bytes(b"x" * 300_000)
    return Archive.of(path)


@pytest.mark.parametrize("way", ["direct", "http-proxy", "https"])
def test_deadline_ends_an_upload_a_trickling_server_keeps_alive(archive: Archive, way: str,
                                                                tmp_path: Path) -> None:
    tls, ca = None, None
    if way == "https":
        certs = _certificates(tmp_path)
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(certs["server"], certs["server_key"])
        ca = str(certs["ca"])
    # One byte a second: no socket read ever waits longer than a second.
    with SlowServer("trickle", interval_s=1, tls=tls) as srv:
        # Through a proxy, the trickler is the proxy (the URL's own host is never reached).
        url = "http://127.0.0.1:9/o.tar.gz?X-Sig=secret" if way == "http-proxy" else \
            srv.url + "/o.tar.gz?X-Sig=secret"
        http = HttpConfig(transfer_timeout_s=3, upload_tries=5, retry_backoff_s=0.1,
                          proxy=srv.url if way == "http-proxy" else None, ca_file=ca)
        start = time.monotonic()
        with pytest.raises(TaskFailed) as e:
            upload(archive, {"url": url}, http)
        took = time.monotonic() - start
    assert e.value.code == "stage_out_failed"
    assert "not done within 3s (http.transfer_timeout_s)" in e.value.message
    assert "secret" not in e.value.message
    # Its 39 bytes would take 39 s; the deadline, checked every half second, ends it.
    assert took < 15, took
    assert srv.bodies == 1


def test_a_callers_budget_ends_an_upload_sooner(archive: Archive) -> None:
    """The budget lifecycle gives the uploads of a run a cancel stopped (STOPPED_UPLOAD_S)."""
    with SlowServer("trickle", interval_s=1) as srv, pytest.raises(TaskFailed) as e:
        upload(archive, {"url": srv.url + "/o.tar.gz"}, HttpConfig(), timeout_s=2)
    assert e.value.code == "stage_out_failed"
    assert e.value.message.endswith("failed: not done within 2s")


def test_cancel_stops_the_try_in_flight(archive: Archive) -> None:
    http = HttpConfig(upload_tries=5, retry_backoff_s=0.1)  # the default deadline: an hour
    cancel = threading.Event()
    with SlowServer("trickle", interval_s=5) as srv:
        done: dict[str, BaseException] = {}

        def run() -> None:
            try:
                upload(archive, {"url": srv.url + "/o.tar.gz"}, http, cancel=cancel)
            except BaseException as exc:
                done["error"] = exc

        thread = threading.Thread(target=run)
        thread.start()
        srv.wait_open(1, timeout=30)
        cancel.set()
        thread.join(10)
        assert not thread.is_alive(), "the cancel did not stop the upload"
        error = done["error"]
        assert isinstance(error, TaskFailed) and error.code == "cancelled"
        assert error.message.endswith(": cancelled")
        # The client's socket is gone: the server's answering thread saw it go.
        end = time.monotonic() + 15
        while srv.open and time.monotonic() < end:
            time.sleep(0.1)
        assert srv.open == 0 and srv.bodies == 1


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\n",                                   # headers never ended
    b"HTTP/1.1 200",                                          # status line cut
    b"HTTP/1.1 200 OK\r\nContent-Le",                         # a header cut
    b"HTTP/1.1 2",                                            # malformed status line
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab",       # body shorter than said
    b"",                                                      # closed without a byte
], ids=["no-blank-line", "status-cut", "header-cut", "bad-status", "short-body", "nothing"])
def test_a_response_cut_short_is_a_failed_upload(archive: Archive, answer: bytes) -> None:
    http = HttpConfig(upload_tries=2, retry_backoff_s=0.1)
    with SlowServer("cut", answer=answer) as srv, pytest.raises(TaskFailed) as e:
        upload(archive, {"url": srv.url + "/o.tar.gz"}, http)
    assert e.value.code == "stage_out_failed"
    assert srv.bodies == 2, "each try is made"


def test_a_whole_answer_still_uploads(archive: Archive, tmp_path: Path) -> None:
    sent: list[int] = []
    with UploadServer(tmp_path / "srv") as srv:
        upload(archive, {"url": srv.url + "/a/o.tar.gz"}, HttpConfig(), progress=sent.append)
        (record,) = srv.requests()
    assert record["status"] == 201 and record["sha256"] == archive.sha256
    assert sent[-1] == archive.size
