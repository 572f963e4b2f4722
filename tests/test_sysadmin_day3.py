"""What a sysadmin's first week still tripped over (issue 31), the parts that need no
running service; doctor's SSH master, the guide and the dashboards have their e2e tests."""

from __future__ import annotations

import os
import subprocess

from click.testing import CliRunner

from fem_ansible.cli import main
from tests.support.harness import REPO


def test_demo_task_follows_moved_service_ports(make_config, tmp_path):
    """scripts/demo.sh with FEMDEV_UPLOAD_PORT set failed: the sample task named 8089."""
    moved = {"FEM_TEST_REGISTRY": "127.0.0.1:15000",
             "FEM_TEST_GIT_BASE_URL": "git://127.0.0.1:19418",
             "FEM_TEST_UPLOAD_URL": "http://127.0.0.1:18089"}
    done = subprocess.run([REPO / "scripts" / "demo-task.sh"], capture_output=True, text=True,
                          env={"PATH": os.environ["PATH"], **moved}, check=True)
    assert not [p for p in (":8089/", ":5000/", ":9418/") if p in done.stdout], done.stdout
    (tmp_path / "sample").mkdir()
    make_config(policy={"images": {"allow": ["127.0.0.1:15000/**"]},
                        "sources": {"allow": ["git://127.0.0.1:19418/**"]},
                        "uploads": {"allow": ["http://127.0.0.1:18089/**"]},
                        "datasets": {"sample": {"path": str(tmp_path / "sample")}}})
    (tmp_path / "task.json").write_text(done.stdout)
    out = CliRunner().invoke(main, ["validate", "--config", str(tmp_path / "config.yml"),
                                    str(tmp_path / "task.json")])
    assert out.exit_code == 0, out.output


def test_install_service_dry_run_shows_how_a_file_would_change(tmp_path):
    from fem_ansible.service import ServiceLayout, install_service

    layout = ServiceLayout(user="root", group="root", work_dir=tmp_path / "lib",
                           config_dir=tmp_path / "etc", log_dir=tmp_path / "log",
                           unit_dir=tmp_path / "systemd", logrotate_dir=tmp_path / "lr")
    install_service(layout, echo=lambda line: None)
    snippet = tmp_path / "lr" / "fem-ansible"
    snippet.write_text(snippet.read_text().replace("rotate 52", "rotate 4"))
    said: list[str] = []
    assert install_service(layout, dry_run=True, echo=said.append) == [f"update {snippet}"]
    assert said[0] == f"would update {snippet}"
    assert "    -    rotate 4" in said and "    +    rotate 52" in said
    assert "rotate 4" in snippet.read_text()  # dry: nothing written


def test_services_status_names_the_pid_listening_on_the_port_it_checked(tmp_path):
    """``registry up 127.0.0.1:5000, pid N`` gave the pid services.sh recorded beside the
    port another process answered on (issue 31)."""
    import shutil
    import socket
    import sys
    import time

    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "services.sh", root / "scripts")
    run = root / ".fem-dev" / "run"
    run.mkdir(parents=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "v2").mkdir()
    (tmp_path / "v2" / "index.html").write_text("{}")
    other = subprocess.Popen([sys.executable, "-m", "http.server", "-b", "127.0.0.1", str(port)],
                             cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ours = subprocess.Popen(["sleep", "300"])
    try:
        (run / "registry.pid").write_text(str(ours.pid))
        (run / "registry.cmd").write_text("sleep 300")
        deadline = time.monotonic() + 30
        while True:
            done = subprocess.run([root / "scripts" / "services.sh", "status"], text=True,
                                  capture_output=True, env={**os.environ,
                                                            "FEMDEV_REGISTRY_PORT": str(port)})
            (registry,) = [x for x in done.stdout.splitlines() if x.startswith("registry")]
            # ss, under load, may not name a socket's process at once
            if "not started" in registry or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert registry.split(None, 2)[2] == (
            f"127.0.0.1:{port}, pid {other.pid} (not started by services.sh; its registry, "
            f"pid {ours.pid}, does not listen on {port})"), registry
    finally:
        for proc in (other, ours):
            proc.kill()
            proc.wait(10)


def test_a_misspelt_key_gets_a_suggestion(make_config, tmp_path):
    import pytest

    from fem_ansible.errors import ConfigError

    with pytest.raises(ConfigError, match=r"unknown config key 'execution.max_paralel' "
                                          r"\(did you mean `max_parallel`\?\)"):
        make_config(execution={"max_paralel": 2})
    with pytest.raises(ConfigError, match=r"unknown config key 'polcy' \(did you mean "
                                          r"`policy`\?\)"):
        make_config(polcy={})
    with pytest.raises(ConfigError) as err:
        make_config(execution={"zzz": 2})
    assert "did you mean" not in str(err.value)


def test_a_misspelt_variable_is_blamed_not_the_file(make_config, tmp_path):
    make_config()
    config = str(tmp_path / "config.yml")
    env = {"FEM_ANSIBLE_EXECUTION__MAX_PARALEL": "2"}
    out = CliRunner().invoke(main, ["doctor", "--config", config], env=env)
    assert out.exit_code == 2
    assert out.output.splitlines()[0] == (
        "✗ config: FEM_ANSIBLE_EXECUTION__MAX_PARALEL: unknown config key "
        "'execution.max_paralel' (did you mean `FEM_ANSIBLE_EXECUTION__MAX_PARALLEL`?) — "
        "correct or unset FEM_ANSIBLE_EXECUTION__MAX_PARALEL in this environment (the "
        "service's: its unit's Environment=)"), out.output
    listed = CliRunner().invoke(main, ["tasks", "--config", config], env=env)
    assert listed.exit_code == 2 and listed.output.startswith(
        "fem-ansible: config error: FEM_ANSIBLE_EXECUTION__MAX_PARALEL: "), listed.output
    # a bad value through a variable names the variable too
    out = CliRunner().invoke(main, ["doctor", "--config", config],
                             env={"FEM_ANSIBLE_EXECUTION__MAX_PARALLEL": "many"})
    assert out.output.startswith("✗ config: FEM_ANSIBLE_EXECUTION__MAX_PARALLEL: "), out.output
    assert f"correct {config}" not in out.output


def test_doctor_says_which_role_each_allowed_executor_runs_with(make_config, tmp_path):
    from fem_ansible.doctor import check_roles

    site_roles = REPO / "tests" / "site_roles"
    config = make_config(
        execution={"work_dir": str(tmp_path / "work"),
                   "roles_path": [str(site_roles / "rescuing"), str(site_roles / "strict")]},
        policy={"executors": {"allow": ["docker", "acc*", "gpu"]}})
    lines = [c.line() for c in check_roles(config)]
    assert lines[0] == (f"✓ roles: execution.roles_path {site_roles}/rescuing, "
                        f"{site_roles}/strict: 2 role(s), replacing built-in fem_stage_out; "
                        "then the built-in roles")
    assert lines[1:] == [
        f"✓ executor accounted: role {site_roles}/rescuing/fem_executor_accounted (the site's)",
        f"✓ executor docker: role {REPO}/roles/fem_executor_docker (built-in)",
        "✗ executor gpu: executor 'gpu' is allowed but no role fem_executor_gpu is on "
        "execution.roles_path or among the built-in roles — put a role fem_executor_gpu on "
        "execution.roles_path, or remove gpu from policy.executors.allow"], lines


def test_run_as_root_in_the_service_users_work_dir_is_refused(make_config, tmp_path):
    """It left root-owned files in the service's work dir (issue 31)."""
    import shutil

    assert os.geteuid() == 0, "the tests run as root"
    config = make_config()
    config.work_dir.mkdir()
    shutil.chown(config.work_dir, "nobody")
    (tmp_path / "task.json").write_text("{}")
    out = CliRunner().invoke(main, ["run", "--config", str(tmp_path / "config.yml"),
                                    str(tmp_path / "task.json")])
    assert out.exit_code == 2
    assert f"not as root: {config.work_dir} is nobody's" in out.output
    assert "runuser -u nobody -- fem-ansible run" in out.output
    assert list(config.work_dir.iterdir()) == []
