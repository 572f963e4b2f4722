"""A real federated-learning session through the legacy protocol (issue 29): a Flower server
(flwr 1.13.1, classic ``start_server``, FedAvg, 3 rounds) on one node and a client on each of
two hospital nodes, each node its own ``fem-ansible listen`` whose catalogue runs the tools
on the real engine (``network: host``, allowed by each site's policy), started by the
orchestrator's ``submit_run`` with per-node ``parametric_args``.  The image is Debian's
python3.11 and flwr from PyPI, built once by ``scripts/services.sh flower-image``."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.harness import NOTHING_LEFT, Listener, leftovers, new_node_id, site_config
from tests.support.legacy_orchestrator import LegacyOrchestrator, legacy_body

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 3
EXAMPLES = {"h1": 40, "h2": 25}


@pytest.fixture(scope="module")
def flower_image() -> str:
    pip = str(Path(sys.executable).parent / "pip")  # this venv's, for flwr from PyPI
    done = subprocess.run([str(ROOT / "scripts" / "services.sh"), "flower-image"],
                          capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "PIP": pip})
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


def _all_replies(orchs, sent, timeout: float):
    """Every node's reply, each orchestrator connection served in turn (an idle one would
    miss its heartbeats while another waits)."""
    replies: dict[str, Any] = {}
    deadline = time.monotonic() + timeout
    while len(replies) < len(sent):
        assert time.monotonic() < deadline, f"replies within {timeout}s: {sorted(replies)}"
        for role, corr in sent.items():
            if role not in replies:
                with contextlib.suppress(AssertionError):
                    replies[role] = orchs[role].result(corr, timeout=0.5)
    return replies


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVER_INFO = {"_id": "flower-server", "command": {
    "base": "python3 /opt/fem-flower/server.py", "args": [
        {"id": "rounds", "type": "int", "prefix": "--rounds", "position": 1,
         "default_value": 1},
        {"id": "min_clients", "type": "int", "prefix": "--min-clients", "position": 2,
         "default_value": 2},
        {"id": "address", "type": "string", "prefix": "--address", "position": 3,
         "required": True}]}}
CLIENT_INFO = {"_id": "flower-client", "command": {
    "base": "python3 /opt/fem-flower/client.py", "args": [
        {"id": "server_address", "type": "string", "prefix": "--server", "position": 1,
         "required": True},
        {"id": "client_id", "type": "string", "prefix": "--client-id", "position": 2}]}}


def test_a_flower_session_on_three_nodes_through_their_catalogues(tmp_path, fem_env,
                                                                  flower_image):
    registry = fem_env["FEM_TEST_REGISTRY"]
    entry = {"image": flower_image, "command": ["%%TASK_COMMAND%%"], "network": "host",
             "memory": "1Gi", "timeout_s": 300}
    tools = {
        "server": {"flower-server": {**entry, "params": ["server"],
                                     "mounts": [{"source": "sandbox", "mount": "/sandbox"}]}},
        "h1": {"flower-client": {**entry, "mounts": [{"source": "data", "mount": "/data"}]}},
        "h2": {"flower-client": {**entry, "mounts": [{"source": "data", "mount": "/data"}]}},
    }
    nodes, listeners, orchs = {}, [], {}
    try:
        for role in ("server", "h1", "h2"):
            base = tmp_path / role
            (base / "sandbox").mkdir(parents=True)
            data = base / "fl-data"
            data.mkdir()
            if role in EXAMPLES:  # y = 2x + 1: this hospital's share of the examples
                rows = "".join(f"{i / 10},{2 * i / 10 + 1}\n" for i in range(EXAMPLES[role]))
                (data / "cohort.csv").write_text("x,y\n" + rows)
            node = new_node_id()
            config = site_config(
                base, fem_env, node,
                policy={"images": {"allow": [f"{registry}/**"]},
                        "networks": {"allow": ["host"]},
                        "limits": {"memory": "1Gi", "timeout_s": 600}},
                legacy={"enabled": True, "sandbox_path": str(base / "sandbox"),
                        "data_path": str(data), "tools": tools[role]})
            listeners.append(Listener(config, base / "listener.log").start())
            nodes[role] = (node, base)
            orchs[role] = LegacyOrchestrator(node)

        address = f"127.0.0.1:{_free_port()}"
        params = {"rounds": ROUNDS, "server": {"min_clients": 2, "address": address},
                  nodes["h1"][0]: {"server_address": address, "client_id": "h1"},
                  nodes["h2"][0]: {"server_address": address, "client_id": "h2"}}
        sent = {"server": orchs["server"].send(legacy_body(
            "submit_run", tool_id="flower-server", task_info=SERVER_INFO,
            execution_id="fl-session", params=params))}
        for role in ("h1", "h2"):
            sent[role] = orchs[role].send(legacy_body(
                "submit_run", tool_id="flower-client", task_info=CLIENT_INFO,
                execution_id="fl-session", params=params))
        replies = _all_replies(orchs, sent, timeout=600)

        history = replies["server"]
        assert history["rounds"] == ROUNDS, history
        # Both clients counted in every round, with all their examples.
        assert history["metrics_distributed_fit"]["clients"] == [
            [r, 2] for r in range(1, ROUNDS + 1)], history
        assert history["metrics_distributed_fit"]["examples"] == [
            [r, sum(EXAMPLES.values())] for r in range(1, ROUNDS + 1)], history
        assert len(history["losses_distributed"]) == ROUNDS
        for role in ("h1", "h2"):
            assert replies[role] == {"client": role, "examples": EXAMPLES[role],
                                     "fits": ROUNDS}, replies[role]
        saved = nodes["server"][1] / "sandbox" / "alice" / "fl-session" / "history.json"
        assert saved.is_file()
        for node, base in nodes.values():
            assert leftovers(node, base / "work") == NOTHING_LEFT
    finally:
        for orch in orchs.values():
            orch.close()
        for listener in listeners:
            listener.stop()
