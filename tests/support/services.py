"""Helpers for tests that use the local services of ``scripts/services.sh``.

Typical use in a conftest::

    @pytest.fixture(scope="session")
    def fem_env():
        return ensure_services()   # dict of FEM_TEST_* values, see .fem-dev/env

``ensure_services()`` starts (or checks) dockerd, the registry, the git daemon, the upload
endpoint and RabbitMQ, and seeds the sample image and repository; it takes well under a second
when everything already runs.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
STATE_DIR = REPO_ROOT / ".fem-dev"
ENV_FILE = STATE_DIR / "env"
SERVICES_SH = REPO_ROOT / "scripts" / "services.sh"
AMQP_HOST = "127.0.0.1"
AMQP_PORT = 5672

_started: dict[str, str] | None = None


class ServicesError(RuntimeError):
    """A service could not be started or reached."""


def load_env(path: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """The variables of ``.fem-dev/env`` (``export NAME='value'`` lines) as a dict."""
    env_path = Path(path) if path is not None else ENV_FILE
    values: dict[str, str] = {}
    for line in env_path.read_text(encoding="utf-8").splitlines():
        words = shlex.split(line, comments=True)
        if not words:
            continue
        if words[0] == "export":
            words = words[1:]
        for word in words:
            name, sep, value = word.partition("=")
            if sep:
                values[name] = value
    return values


def ensure_services(*, force: bool = False, timeout: float = 600) -> dict[str, str]:
    """Run ``scripts/services.sh start`` (once per process) and return ``load_env()``.

    Raises ServicesError with the script's output when it fails.
    """
    global _started
    if _started is not None and not force:
        return dict(_started)
    try:
        proc = subprocess.run(
            ["bash", str(SERVICES_SH), "start"],
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ServicesError(f"scripts/services.sh start took more than {timeout}s") from exc
    if proc.returncode != 0:
        raise ServicesError(
            f"scripts/services.sh start failed (exit {proc.returncode}):\n"
            f"{proc.stdout}{proc.stderr}"
        )
    _started = load_env()
    return dict(_started)


def _docker_lines(*args: str) -> list[str]:
    proc = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=60, check=False
    )
    if proc.returncode != 0:
        raise ServicesError(f"docker {' '.join(args)} failed: {proc.stderr.strip()}")
    return [line for line in proc.stdout.splitlines() if line.strip()]


def docker_objects(label_filter: str | list[str]) -> dict[str, list[str]]:
    """Containers (any state) and volumes carrying the label(s).

    ``label_filter`` is what ``docker --filter label=…`` takes: ``"fem.task_id"`` (the label
    is set) or ``"fem.task_id=t1"``; a list means all of them. Returns
    ``{"containers": [names], "volumes": [names]}``, each sorted.
    """
    filters = [label_filter] if isinstance(label_filter, str) else list(label_filter)
    args: list[str] = []
    for flt in filters:
        args += ["--filter", f"label={flt}"]
    containers = _docker_lines("ps", "-a", *args, "--format", "{{.Names}}")
    volumes = _docker_lines("volume", "ls", "-q", *args)
    return {"containers": sorted(containers), "volumes": sorted(volumes)}


def remove_docker_objects(label_filter: str | list[str]) -> None:
    """Force-remove what ``docker_objects(label_filter)`` lists (test clean-up)."""
    objs = docker_objects(label_filter)
    if objs["containers"]:
        _docker_lines("rm", "-f", "-v", *objs["containers"])
    if objs["volumes"]:
        _docker_lines("volume", "rm", "-f", *objs["volumes"])


def rabbitmq_running(host: str = AMQP_HOST, port: int = AMQP_PORT, timeout: float = 3) -> bool:
    """True when the broker answers the AMQP 0-9-1 protocol header (not just a TCP accept)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(b"AMQP\x00\x00\x09\x01")
            first = sock.recv(1)
    except OSError:
        return False
    return first == b"\x01"  # frame type METHOD: Connection.Start


def wait_rabbitmq(up: bool = True, timeout: float = 90) -> None:
    """Wait until the broker answers (``up``) or stops answering (``up=False``)."""
    deadline = time.monotonic() + timeout
    while rabbitmq_running() != up:
        if time.monotonic() > deadline:
            state = "answer" if up else "stop"
            raise ServicesError(f"RabbitMQ did not {state} within {timeout}s")
        time.sleep(0.3)


def _run(cmd: list[str], timeout: float) -> None:
    proc = subprocess.run(
        cmd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise ServicesError(f"{' '.join(cmd)} failed: {proc.stdout}{proc.stderr}")


def stop_rabbitmq(timeout: float = 90) -> None:
    """Stop the broker (the whole node) and wait until it no longer answers."""
    if rabbitmq_running():
        _run(["rabbitmqctl", "-q", "shutdown"], timeout)
    wait_rabbitmq(up=False, timeout=timeout)


def start_rabbitmq(timeout: float = 90) -> None:
    """Start the broker with ``rabbitmq-server -detached`` unless it answers; wait for it."""
    if not rabbitmq_running():
        _run(["rabbitmq-server", "-detached"], timeout)
    wait_rabbitmq(up=True, timeout=timeout)


def restart_rabbitmq(timeout: float = 90) -> None:
    """Stop and start the broker (the machine's own node), waiting for both."""
    stop_rabbitmq(timeout)
    start_rabbitmq(timeout)


def upload_requests(env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The requests the shared upload endpoint recorded (``requests.jsonl``)."""
    env = env if env is not None else load_env()
    path = Path(env["FEM_TEST_UPLOAD_DIR"]) / "requests.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
