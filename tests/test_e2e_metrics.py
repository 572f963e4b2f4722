"""``listen --metrics-port``: the endpoint scraped while a real listener runs real tasks, and
its counters checked against the events the orchestrator received (issue 8)."""

from __future__ import annotations

import socket
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_metrics_count_the_tasks_run(site):
    port = free_port()
    orch = site.orchestrator
    lst = site.listener(args=["--metrics-port", str(port)])
    before = scrape(port)
    assert value(before, "fem_broker_connected") == 1
    assert value(before, "fem_tasks_received_total") == 0
    assert value(before, "fem_task_slots") == 1

    orch.publish(site.task("m-ok"))
    orch.publish(site.task("m-exit3", command=["sh", "-c", "exit 3"]))
    orch.publish(b'{"schema": "fem.task/v1", "task_id": "m-bad"}')
    finals = {tid: orch.wait_terminal(tid) for tid in ("m-ok", "m-exit3", "m-bad")}
    assert [finals[t]["state"] for t in ("m-ok", "m-exit3", "m-bad")] == [
        "COMPLETED", "FAILED", "REJECTED"]

    # The worker leaves `running` just after the terminal event goes out.
    deadline = time.monotonic() + 30
    while (samples := scrape(port)) and value(samples, "fem_tasks_running") != 0:
        assert time.monotonic() < deadline, "fem_tasks_running stays above 0"
        time.sleep(0.2)
    assert value(samples, "fem_tasks_received_total") == 2
    assert value(samples, "fem_tasks_finished_total", state="COMPLETED") == 1
    assert value(samples, "fem_tasks_finished_total", state="FAILED") == 1
    assert value(samples, "fem_tasks_finished_total", state="REJECTED") == 1
    assert value(samples, "fem_tasks_finished_total", state="TIMED_OUT") == 0
    assert value(samples, "fem_task_errors_total", code="execution_failed") == 1
    assert value(samples, "fem_task_errors_total", code="invalid_message") == 1
    # both ran through every stage
    for stage in ("stage_in", "run", "stage_out"):
        assert value(samples, "fem_stage_duration_seconds_count", stage=stage) == 2
    assert value(samples, "fem_task_duration_seconds_count") == 2
    # every archive byte the events report was counted once
    for kind in ("outputs", "logs"):
        sent = sum(finals[t][kind]["size"] for t in ("m-ok", "m-exit3"))
        assert value(samples, "fem_upload_bytes_total", kind=kind) == sent
    assert value(samples, "fem_events_unpublished") == 0
    assert value(samples, "fem_info", version=samples and next(
        dict(k[1])["version"] for k in samples if k[0] == "fem_info"),
        node_id=site.node, listener_id="l1") == 1
    assert lst.alive
