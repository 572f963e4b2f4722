"""End-to-end harness: a site config, a real listener process, and a test orchestrator.

The orchestrator speaks to the real broker exactly as DESIGN.md §2 says: it publishes tasks
to ``fem.tasks`` with the node id as routing key and reads events from its own queue bound
to ``fem.events``.  Every test uses its own node id, so tests never see each other's queues.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import yaml

from fem_ansible import cgroups, naming
from fem_ansible.schema import TERMINAL_STATES

REPO = Path(__file__).resolve().parents[2]
FEM = str(Path(sys.executable).parent / "fem-ansible")
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
RESIDENT_OFF_ENV = "FEMDEV_RESIDENT_ANSIBLE"


def new_node_id() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


def task_name(node_id: str, task_id: str) -> str:
    """The name of a task's container, Slurm job and run dir (fem_ansible.naming)."""
    return naming.object_name(node_id, task_id, naming.TASK)


def site_config(tmp_path: Path, env: dict[str, str], node_id: str, **overrides: Any) -> Path:
    """Write a config allowing the test services; ``overrides`` are merged per section."""
    data_dir = tmp_path / "data" / "cohort"
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "patients.csv").write_text("id,age\n1,54\n2,61\n")
    upload = env["FEM_TEST_UPLOAD_URL"]
    config: dict[str, Any] = {
        "node_id": node_id,
        "listener_id": "l1",
        "broker": {"url": AMQP_URL, "heartbeat_s": 5},
        "execution": {"work_dir": str(tmp_path / "work"), "shutdown_grace_s": 30},
        "policy": {
            "images": {"allow": [f"{env['FEM_TEST_REGISTRY']}/**"]},
            "sources": {"allow": [f"{env['FEM_TEST_GIT_BASE_URL']}/**"]},
            "downloads": {"allow": [f"{upload}/**"]},
            "uploads": {"allow": [f"{upload}/**"]},
            "datasets": {"cohort": {"path": str(data_dir)}},
            "limits": {"memory": "512Mi", "timeout_s": 600},
        },
    }
    for section, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(section), dict):
            config[section] = {**config[section], **value}
        else:
            config[section] = value
    path = tmp_path / f"config-{node_id}-{uuid.uuid4().hex[:6]}.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def sample_task(env: dict[str, str], task_id: str, prefix: str = "", **overrides: Any
                ) -> dict[str, Any]:
    """A task reading a dataset file, a downloaded input and a file of the checkout; its
    archives go to ``<upload endpoint>/<prefix>/<task_id>/``."""
    upload = env["FEM_TEST_UPLOAD_URL"] + (f"/{prefix}" if prefix else "")
    task: dict[str, Any] = {
        "schema": "fem.task/v1",
        "task_id": task_id,
        "image": {"ref": env["FEM_TEST_IMAGE"]},
        "source": {"repo": env["FEM_TEST_GIT_URL"]},
        "command": ["sh", "-c",
                    "cat /fem/data/patients.csv /fem/src/hello.txt > /fem/output/result.txt"
                    " && if [ -e /fem/input/params.json ]; then"
                    " cat /fem/input/params.json >> /fem/output/result.txt; fi"
                    " && echo task-done"],
        "datasets": [{"name": "cohort", "mount": "/fem/data"}],
        "outputs": {"upload": {"url": f"{upload}/{task_id}/outputs.tar.gz?X-Sig=secret1"}},
        "logs": {"upload": {"url": f"{upload}/{task_id}/logs.tar.gz?X-Sig=secret2",
                            "method": "POST"}},
        "resources": {"memory": "128Mi", "timeout_s": 120},
    }
    for key, value in overrides.items():  # None removes a field
        if value is None:
            task.pop(key, None)
        else:
            task[key] = value
    return task


class Listener:
    """``fem-ansible listen`` in a subprocess, its log in a file."""

    def __init__(self, config: Path, log: Path, env: dict[str, str] | None = None,
                 args: list[str] | None = None):
        self.config, self.log = config, log
        self._env = env
        self._args = args or []
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_connected: bool = True) -> Listener:
        offset = self.log.stat().st_size if self.log.exists() else 0
        env = {k: v for k, v in os.environ.items() if not k.startswith("FEM_")}
        # The whole suite runs once with the resident Ansible off too (issue 30):
        # FEMDEV_RESIDENT_ANSIBLE=false scripts/test.sh.
        if os.environ.get(RESIDENT_OFF_ENV) == "false":
            env["FEM_ANSIBLE_EXECUTION__RESIDENT_ANSIBLE"] = "false"
        env.update(self._env or {})
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([FEM, "listen", "--config", str(self.config), *self._args],
                                         stdout=out, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        if wait_connected:
            self.wait_for_log("connected to the broker", offset=offset)
        return self

    def wait_for_log(self, text: str, timeout: float = 60, offset: int = 0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log.exists() and text in self.log.read_text(errors="replace")[offset:]:
                return
            if self.proc and self.proc.poll() is not None:
                raise AssertionError(f"listener exited ({self.proc.returncode}):\n{self.tail()}")
            time.sleep(0.1)
        raise AssertionError(f"{text!r} not in the listener log:\n{self.tail()}")

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self, timeout: float = 60) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Orchestrator:
    """The other end of the wire, on its own connection."""

    def __init__(self, node_id: str, params: pika.ConnectionParameters | None = None):
        """:param params: another broker than the shared one (e.g. a TLS node)."""
        self.node_id = node_id
        self.params = params or pika.URLParameters(AMQP_URL)
        self.received: list[dict[str, Any]] = []
        self.reconnect()

    def reconnect(self) -> None:
        """(Re)open the connection; the durable events queue kept what came meanwhile."""
        node_id = self.node_id
        self.conn = pika.BlockingConnection(self.params)
        self.ch = self.conn.channel()
        self.ch.exchange_declare("fem.events", "topic", durable=True)
        self.ch.exchange_declare("fem.tasks", "direct", durable=True)
        self.ch.exchange_declare("fem.control", "direct", durable=True)
        self.queue = f"orchestrator.{node_id}"
        self.ch.queue_declare(self.queue, durable=True)
        self.ch.queue_bind(self.queue, "fem.events", routing_key=f"{node_id}.#")
        self.ch.confirm_delivery()

    def publish(self, task: dict[str, Any] | bytes, headers: dict[str, str] | None = None
                ) -> None:
        body = task if isinstance(task, bytes) else json.dumps(task).encode()
        self.ch.basic_publish("fem.tasks", self.node_id, body,
                              pika.BasicProperties(content_type="application/json",
                                                   delivery_mode=2, headers=headers),
                              mandatory=True)

    def cancel(self, task_id: str) -> None:
        body = json.dumps({"schema": "fem.control/v1", "action": "cancel",
                           "task_id": task_id}).encode()
        self.ch.basic_publish("fem.control", self.node_id, body,
                              pika.BasicProperties(content_type="application/json",
                                                   delivery_mode=2))

    def drain(self, timeout: float = 0.2) -> None:
        """Move what the queue holds into ``received`` (heartbeats left out)."""
        deadline = time.monotonic() + timeout
        while True:
            method, _props, body = self.ch.basic_get(self.queue, auto_ack=True)
            if method is None:
                if time.monotonic() >= deadline:
                    return
                self.conn.sleep(0.05)
                continue
            event = json.loads(body)
            if event.get("schema") == "fem.event/v1":
                event["_routing_key"] = method.routing_key
                self.received.append(event)

    def events(self, task_id: str | None) -> list[dict[str, Any]]:
        return [e for e in self.received if e["task_id"] == task_id]

    def distinct_events(self, task_id: str | None) -> list[dict[str, Any]]:
        """The task's events as the orchestrator keeps them: one per ``seq``.

        Delivery is at least once: an event published just before a kill -9 or a broker
        loss, but not yet marked published in the journal, goes out again.  DESIGN.md §4
        lets that happen only with the same ``seq`` *and content*, which is asserted here.
        """
        kept: dict[int, dict[str, Any]] = {}
        for event in self.events(task_id):
            first = kept.setdefault(event["seq"], event)
            assert first == event, f"seq {event['seq']} sent with two contents: {first} {event}"
        return [kept[seq] for seq in sorted(kept)]

    def wait_state(self, task_id: str | None, states: set[str] | str, timeout: float = 180
                   ) -> dict[str, Any]:
        states = {states} if isinstance(states, str) else states
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # What is queued now, then a short wait: bench/ times tasks with this, and a
            # longer drain window was counted as the task's time (up to 0.2 s of it).
            self.drain(0)
            for event in self.events(task_id):
                if event["state"] in states:
                    return event
            self.conn.sleep(0.02)
        raise AssertionError(f"no {states} event for {task_id} within {timeout}s; "
                             f"got {[e['state'] for e in self.events(task_id)]}")

    def wait_terminal(self, task_id: str | None, timeout: float = 180) -> dict[str, Any]:
        return self.wait_state(task_id, set(TERMINAL_STATES), timeout)

    def dead_letters(self) -> list[tuple[dict[str, Any], bytes]]:
        out = []
        while True:
            method, props, body = self.ch.basic_get(f"fem.tasks.{self.node_id}.dead",
                                                    auto_ack=True)
            if method is None:
                return out
            out.append((props.headers or {}, body))

    def close(self) -> None:
        """Delete this node's queues, so tests leave the broker as they found it."""
        if not self.conn.is_open:
            self.reconnect()
        try:
            for queue in (self.queue, f"fem.tasks.{self.node_id}",
                          f"fem.tasks.{self.node_id}.dead"):
                self.ch.queue_delete(queue)
            for listener in ("l1", "l2"):
                self.ch.queue_delete(f"fem.control.{self.node_id}.{listener}")
        finally:
            if self.conn.is_open:
                self.conn.close()


def leftovers(node_id: str, work_dir: Path) -> dict[str, list[str]]:
    """Everything a node's tasks may have left: containers and volumes (docker, podman),
    target dirs, processes, the runs' cgroups."""
    label = f"label=fem.node_id={node_id}"
    containers = subprocess.run(["docker", "ps", "-aq", "--filter", label],
                                capture_output=True, text=True, check=True).stdout.split()
    volumes = subprocess.run(["docker", "volume", "ls", "-q", "--filter", label],
                             capture_output=True, text=True, check=True).stdout.split()
    named = subprocess.run(["docker", "ps", "-a", "--format", "{{.Names}}", "--filter",
                            f"name=fem-{node_id}-"], capture_output=True, text=True,
                           check=True).stdout.split()
    if shutil.which("podman"):  # the podman executor's containers and volumes
        for args in (["ps", "-aq", "--filter", label],
                     ["ps", "-a", "--format", "{{.Names}}", "--filter", f"name=fem-{node_id}-"]):
            containers += subprocess.run(["podman", *args], capture_output=True, text=True,
                                         check=True).stdout.split()
        volumes += subprocess.run(["podman", "volume", "ls", "-q", "--filter", label],
                                  capture_output=True, text=True, check=True).stdout.split()
    tasks_dir = work_dir / "tasks"
    dirs = sorted(p.name for p in tasks_dir.iterdir()) if tasks_dir.is_dir() else []
    procs = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(e.startswith(f"FEM_JOB_ID=fem-{node_id}-".encode()) for e in environ):
            procs.append(entry.name)
    root = cgroups.base()
    groups = sorted(g.name for g in root.iterdir()
                    if g.name.startswith(f"fem-{node_id}-")) if root else []
    return {"containers": sorted(set(containers) | set(named)), "volumes": volumes,
            "dirs": dirs, "processes": procs, "cgroups": groups}


NOTHING_LEFT = {"containers": [], "volumes": [], "dirs": [], "processes": [], "cgroups": []}
