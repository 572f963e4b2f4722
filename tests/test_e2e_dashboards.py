"""contrib/grafana-dashboard.json and contrib/prometheus-rules.yml (issue 31): the rules
pass ``promtool check rules`` and their unit tests (``promtool test rules``), and a real
Prometheus scraping a running listener on loopback answers every expression of the
dashboard and the rules, which name only metrics the listener exports."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support.harness import REPO

pytestmark = pytest.mark.e2e

DASHBOARD = REPO / "contrib" / "grafana-dashboard.json"
RULES = REPO / "contrib" / "prometheus-rules.yml"
RULES_TESTS = REPO / "tests" / "data" / "prometheus-rules.test.yml"
# Grafana's variables, as Grafana fills them in.
GRAFANA_VARIABLES = {"$instance": ".+", "$__rate_interval": "1m", "$__range": "1h"}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert shutil.which("promtool"), "promtool (Debian package prometheus) is needed"
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120)


def dashboard_expressions() -> list[str]:
    exprs = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for name, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(name, value)
            exprs.append(expr)
    return exprs


def rule_expressions() -> list[str]:
    return [rule["expr"] for group in yaml.safe_load(RULES.read_text())["groups"]
            for rule in group["rules"]]


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(fem_[a-z_]+|up)\b", expr))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rules_pass_promtool_check_and_their_unit_tests():
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", str(RULES_TESTS))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    # every alert has a unit test
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    unit = yaml.safe_load(RULES_TESTS.read_text())
    assert alerts == {a["alertname"] for t in unit["tests"] for a in t["alert_rule_test"]}


def test_dashboard_expressions_parse(tmp_path):
    """Every panel's expression, Grafana's variables filled in, as promtool parses rules."""
    rules = tmp_path / "dashboard-rules.yml"
    rules.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:expr{i}", "expr": e}
        for i, e in enumerate(dashboard_expressions())]}]}))
    checked = promtool("check", "rules", str(rules))
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.fixture
def prometheus(tmp_path):
    """``prometheus(target)``: a Prometheus of the test's own on loopback, scraping
    ``target`` every second as job fem-ansible, with the contrib rules; its base URL."""
    assert shutil.which("prometheus"), "prometheus (Debian package prometheus) is needed"
    procs: list[subprocess.Popen[bytes]] = []

    def start(target: str) -> str:
        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "fem-ansible",
                                "static_configs": [{"targets": [target]}]}]}))
        log = (tmp_path / "prometheus.log").open("wb")
        procs.append(subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path}/tsdb",
             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=log))
        return f"http://127.0.0.1:{port}"

    yield start
    for proc in procs:  # its data dir is the test's: nothing to shut down cleanly
        proc.kill()
        proc.wait(30)


def query(base: str, expr: str) -> dict:
    resp = requests.get(f"{base}/api/v1/query", params={"query": expr}, timeout=10)
    body = resp.json()
    assert resp.status_code == 200 and body["status"] == "success", (expr, body)
    return body["data"]


def test_a_real_prometheus_answers_the_dashboard_and_rules(site, prometheus, tmp_path):
    port = free_port()
    site.listener(args=["--metrics-port", str(port)])
    site.orchestrator.publish(site.task("dash-ok"))
    site.orchestrator.publish(b'{"schema": "fem.task/v1", "task_id": "dash-bad"}')
    assert site.orchestrator.wait_terminal("dash-ok")["state"] == "COMPLETED"
    assert site.orchestrator.wait_terminal("dash-bad")["state"] == "REJECTED"
    scraped = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    exported = {s.name for f in text_string_to_metric_families(scraped) for s in f.samples}

    expressions = dashboard_expressions() + rule_expressions()
    for expr in expressions:
        assert metric_names(expr) - {"up"} <= exported, (expr, sorted(exported))

    base = prometheus(f"127.0.0.1:{port}")
    deadline = time.monotonic() + 120
    while True:
        try:
            if query(base, 'fem_tasks_finished_total{state="COMPLETED"} == 1')["result"]:
                break
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, (tmp_path / "prometheus.log").read_text()[-3000:]
        time.sleep(0.5)
    time.sleep(3)  # a few more scrapes, for rate()
    for expr in expressions:
        query(base, expr)
    # the panels that need no traffic have data, the alerts are quiet on a healthy node
    for expr in ("sum(fem_task_slots)", "min(fem_broker_connected)",
                 "min(fem_journal_writable)", "min(fem_disk_free_bytes)"):
        assert query(base, expr)["result"][0]["value"][1] != "0", expr
    rules = requests.get(f"{base}/api/v1/rules", timeout=10).json()["data"]["groups"]
    loaded = [r for g in rules for r in g["rules"]]
    assert len(loaded) == len(rule_expressions())
    assert all(r["health"] in ("ok", "unknown") and r["state"] == "inactive" for r in loaded), \
        loaded


def test_dashboard_names_only_metrics_of_the_registry(make_config):
    """Without a running listener: the metric families of the registry metrics.py makes,
    with the sample suffixes Prometheus gives counters and histograms."""
    from fem_ansible.metrics import Metrics

    families = {m.name for m in Metrics(make_config()).registry.collect()}
    exported = {f"{name}{suffix}" for name in families
                for suffix in ("", "_total", "_bucket", "_sum", "_count")}
    for expr in dashboard_expressions() + rule_expressions():
        assert metric_names(expr) - {"up"} <= exported, expr
