"""Services a security test starts for itself, beside the shared ones, and stops after:
a password-protected registry, a TLS-only RabbitMQ node; and a sampler of every process's
argv and environment (where a leaked secret would be seen by any local user).

Each listens on 127.0.0.1 only, on ports picked free, with its state in the test's tmp dir.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=120, **kw)


@dataclass(frozen=True)
class AuthRegistry:
    host: str
    username: str
    password: str
    image: str


@contextlib.contextmanager
def auth_registry(tmp: Path, source_image: str, password: str) -> Iterator[AuthRegistry]:
    """A ``docker-registry`` with htpasswd auth holding ``source_image`` as
    ``<host>/fem/busybox:secret``; the engine forgets the image afterwards."""
    port = free_port()
    host = f"127.0.0.1:{port}"
    root = tmp / "auth-registry"
    (root / "data").mkdir(parents=True)
    # The password goes through stdin, never an argv.
    _run(["htpasswd", "-B", "-i", "-c", str(root / "htpasswd"), "fem"], input=password)
    (root / "config.yml").write_text(f"""version: 0.1
log: {{level: warn, accesslog: {{disabled: true}}}}
storage: {{filesystem: {{rootdirectory: {root / 'data'}}}}}
http: {{addr: "{host}"}}
auth: {{htpasswd: {{realm: fem-test, path: {root / 'htpasswd'}}}}}
""")
    log = (root / "registry.log").open("wb")
    proc = subprocess.Popen(["docker-registry", "serve", str(root / "config.yml")],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    image = f"{host}/fem/busybox:secret"
    docker_config = root / "docker"
    docker_config.mkdir(mode=0o700)
    env = {**os.environ, "DOCKER_CONFIG": str(docker_config)}
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(f"http://{host}/v2/", timeout=2).status_code == 401:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"the auth registry did not start: "
                                   f"{(root / 'registry.log').read_text()}")
            time.sleep(0.2)
        _run(["docker", "login", "-u", "fem", "--password-stdin", host], input=password, env=env)
        _run(["docker", "tag", source_image, image])
        _run(["docker", "push", image], env=env)
        _run(["docker", "logout", host], env=env)
        # The task must pull it with the site's credentials, not find it cached.
        _run(["docker", "rmi", image])
        yield AuthRegistry(host, "fem", password, image)
    finally:
        subprocess.run(["docker", "rmi", "-f", image], capture_output=True, check=False)
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


class ProcessSampler:
    """Reads ``/proc/*/cmdline`` and ``/proc/*/environ`` of every process, over and over,
    in a thread, and keeps whatever holds one of ``secrets``."""

    def __init__(self, secrets: list[str], interval_s: float = 0.1):
        self.secrets = [s.encode() for s in secrets]
        self.interval_s = interval_s
        self.hits: list[tuple[int, str, str]] = []
        self.samples = 0
        self.processes_seen: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> ProcessSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            for entry in os.scandir("/proc"):
                if not entry.name.isdigit():
                    continue
                for what in ("cmdline", "environ"):
                    try:
                        with open(f"/proc/{entry.name}/{what}", "rb") as f:
                            data = f.read()
                    except OSError:
                        continue
                    self.processes_seen.add(int(entry.name))
                    for secret in self.secrets:
                        if secret in data:
                            self.hits.append((int(entry.name), what,
                                              data.replace(b"\0", b" ")[:300].decode(
                                                  "utf-8", "replace")))
            self.samples += 1
            self._stop.wait(self.interval_s)
