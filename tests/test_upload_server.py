"""The test upload endpoint (tests/support/upload_server.py) itself."""

from __future__ import annotations

import hashlib
import http.client
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.support.upload_server import UploadServer, read_requests

SERVER_PY = Path(__file__).parent / "support" / "upload_server.py"


@pytest.fixture
def srv(tmp_path):
    with UploadServer(tmp_path / "up") as server:
        yield server


def _chunks(data: bytes, size: int):
    for i in range(0, len(data), size):
        yield data[i : i + size]


def test_put_stores_body_and_records_it(srv):
    body = os.urandom(300_000)
    resp = requests.put(
        f"{srv.url}/runs/t1/outputs.tar.gz?X-Sig=abc",
        data=body,
        headers={"Authorization": "Bearer s3cret", "X-Fem-Task": "t1"},
        timeout=10,
    )
    assert resp.status_code == 201
    sha = hashlib.sha256(body).hexdigest()
    assert resp.json() == {"path": "/runs/t1/outputs.tar.gz", "size": len(body), "sha256": sha}
    assert (srv.directory / "runs/t1/outputs.tar.gz").read_bytes() == body

    [rec] = srv.requests()
    assert rec["method"] == "PUT"
    assert rec["path"] == "/runs/t1/outputs.tar.gz"
    assert rec["query"] == "X-Sig=abc"
    assert rec["size"] == len(body)
    assert rec["sha256"] == sha
    assert rec["status"] == 201
    assert rec["stored"] is True
    assert rec["injected"] is False
    assert rec["headers"]["X-Fem-Task"] == "t1"
    assert all(k.lower() != "authorization" for k in rec["headers"])
    assert rec["authorization_sha256"] == hashlib.sha256(b"Bearer s3cret").hexdigest()
    assert "s3cret" not in (srv.directory / "requests.jsonl").read_text()

    # the same path again replaces the file and answers 200
    resp = requests.put(f"{srv.url}/runs/t1/outputs.tar.gz", data=b"v2", timeout=10)
    assert resp.status_code == 200
    assert (srv.directory / "runs/t1/outputs.tar.gz").read_bytes() == b"v2"
    assert len(srv.requests()) == 2


def test_post_chunked_transfer_encoding(srv):
    body = os.urandom(1_000_000) + b"tail"
    # a generator body makes requests send Transfer-Encoding: chunked, in uneven chunks
    resp = requests.post(f"{srv.url}/logs/t2.tar.gz", data=_chunks(body, 77_777), timeout=10)
    assert resp.status_code == 201
    assert (srv.directory / "logs/t2.tar.gz").read_bytes() == body
    [rec] = srv.requests()
    assert rec["method"] == "POST"
    assert rec["headers"].get("Transfer-Encoding") == "chunked"
    assert "Content-Length" not in rec["headers"]
    assert rec["sha256"] == hashlib.sha256(body).hexdigest()
    assert rec["size"] == len(body)


def test_raw_chunked_with_extensions_and_trailer(srv):
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=10)
    conn.putrequest("PUT", "/raw/x.bin")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    conn.send(b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: yes\r\n\r\n")
    resp = conn.getresponse()
    assert resp.status == 201
    resp.read()
    # keep-alive: the same connection takes a second request
    conn.request("GET", "/raw/x.bin")
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.read() == b"hello world"
    conn.close()


def test_get_serves_files_and_is_recorded(srv):
    requests.put(f"{srv.url}/in/data.csv", data=b"a,b\n1,2\n", timeout=10)
    resp = requests.get(f"{srv.url}/in/data.csv", timeout=10)
    assert resp.status_code == 200
    assert resp.content == b"a,b\n1,2\n"
    assert requests.get(f"{srv.url}/in/missing", timeout=10).status_code == 404
    gets = [r for r in srv.requests() if r["method"] == "GET"]
    assert [(r["path"], r["status"]) for r in gets] == [("/in/data.csv", 200), ("/in/missing", 404)]
    assert gets[0]["sha256"] == hashlib.sha256(b"a,b\n1,2\n").hexdigest()


def test_paths_cannot_escape_or_clobber_the_log(srv):
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=10)
    conn.request("PUT", "/../../etc/evil", body=b"x")
    resp = conn.getresponse()
    resp.read()
    # normalised inside the directory, never outside it
    assert not (srv.directory.parent.parent / "etc/evil").exists()
    conn.close()
    resp = requests.put(f"{srv.url}/requests.jsonl", data=b"x", timeout=10)
    assert resp.status_code == 403
    assert requests.put(f"{srv.url}/", data=b"x", timeout=10).status_code == 400


def test_fail_next_n_then_succeed(srv):
    resp = requests.post(f"{srv.url}/_control/fail?count=2&status=503", timeout=10)
    assert resp.status_code == 200
    statuses = [
        requests.put(f"{srv.url}/r/out.tar.gz", data=b"payload", timeout=10).status_code
        for _ in range(3)
    ]
    assert statuses == [503, 503, 201]
    recs = srv.requests()
    assert [(r["status"], r["injected"], r["stored"]) for r in recs] == [
        (503, True, False),
        (503, True, False),
        (201, False, True),
    ]
    # a failed upload's body was still read and hashed
    assert recs[0]["sha256"] == hashlib.sha256(b"payload").hexdigest()


def test_fail_rule_filters_and_drop(srv):
    srv.fail_next(1, status=500, path_prefix="/only/here")
    assert requests.put(f"{srv.url}/elsewhere/a", data=b"1", timeout=10).status_code == 201
    assert requests.put(f"{srv.url}/only/here/a", data=b"1", timeout=10).status_code == 500
    assert requests.put(f"{srv.url}/only/here/a", data=b"1", timeout=10).status_code == 201

    # GET is not failed unless asked for
    srv.fail_next(1, status=502, methods="GET")
    assert requests.put(f"{srv.url}/g", data=b"1", timeout=10).status_code == 201
    assert requests.get(f"{srv.url}/g", timeout=10).status_code == 502
    assert requests.get(f"{srv.url}/g", timeout=10).status_code == 200

    # drop: the connection closes without an answer, part-way through the body
    requests.post(f"{srv.url}/_control/fail?status=drop&after_bytes=1000", timeout=10)
    with pytest.raises(requests.ConnectionError):
        requests.put(f"{srv.url}/d", data=os.urandom(2_000_000), timeout=10)
    assert not (srv.directory / "d").exists()
    assert srv.requests()[-1]["status"] == "drop"
    assert requests.put(f"{srv.url}/d", data=b"ok", timeout=10).status_code == 201

    # reset forgets pending rules
    srv.fail_next(5)
    requests.post(f"{srv.url}/_control/reset", timeout=10)
    assert requests.put(f"{srv.url}/e", data=b"1", timeout=10).status_code == 201


def test_redirect_is_answered_not_followed_by_the_server(srv):
    resp = requests.put(f"{srv.url}/_redirect/x/y", data=b"1", allow_redirects=False, timeout=10)
    assert resp.status_code == 302
    assert resp.headers["Location"] == "/x/y"
    assert not (srv.directory / "x/y").exists()


def _start_process(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    port_file = tmp_path / "port"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(SERVER_PY),
            "--port",
            "0",
            "--dir",
            str(tmp_path / "up"),
            "--port-file",
            str(port_file),
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 20
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"upload server did not start: {proc.stderr.read()!r}")
        time.sleep(0.05)
    return proc, f"http://127.0.0.1:{port_file.read_text().strip()}"


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_subprocess_streams_large_bodies_without_holding_them(tmp_path):
    proc, url = _start_process(tmp_path)
    try:
        size = 96 * 1024 * 1024
        digest = hashlib.sha256()

        def body():
            block = os.urandom(1024 * 1024)
            for _ in range(size // len(block)):
                digest.update(block)
                yield block

        resp = requests.put(f"{url}/big/archive.tar.gz", data=body(), timeout=60)
        assert resp.status_code == 201
        assert resp.json()["sha256"] == digest.hexdigest()
        assert (tmp_path / "up/big/archive.tar.gz").stat().st_size == size
        # the whole body never sat in the server's memory
        assert _peak_rss_kib(proc.pid) < 64 * 1024
        health = requests.get(f"{url}/_control/health", timeout=10).json()
        assert health["service"] == "fem-upload-server"
        assert health["dir"] == str((tmp_path / "up").resolve())
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert proc.returncode == 0
    [rec] = read_requests(tmp_path / "up")
    assert rec["size"] == size


def test_subprocess_fail_path_prefix(tmp_path):
    proc, url = _start_process(tmp_path, "--fail-path-prefix", "/broken", "--fail-status", "507")
    try:
        for _ in range(3):
            assert requests.put(f"{url}/broken/x", data=b"1", timeout=10).status_code == 507
        assert requests.put(f"{url}/fine/x", data=b"1", timeout=10).status_code == 201
        recs = requests.get(f"{url}/_control/requests", timeout=10).json()
        assert [r["status"] for r in recs] == [507, 507, 507, 201]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
