"""The command line as a sysadmin meets it on day two (issue 20): help, environment,
errors that say what to do."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from click.testing import CliRunner

from fem_ansible.cli import main
from fem_ansible.journal import Journal


def test_help_names_the_config_variable():
    runner = CliRunner()
    assert "FEM_ANSIBLE_CONFIG" in runner.invoke(main, ["--help"]).output
    for command in ("listen", "run", "doctor", "tasks", "submit", "cancel"):
        shown = runner.invoke(main, [command, "--help"])
        assert shown.exit_code == 0 and "FEM_ANSIBLE_CONFIG" in shown.output, command


def test_config_variable_chooses_the_config_and_other_fem_variables_do_not_matter(
        make_config, tmp_path):
    make_config()
    env = {"FEM_ANSIBLE_CONFIG": str(tmp_path / "config.yml"), "FEM_HOME": "/opt/fem"}
    done = CliRunner().invoke(main, ["tasks"], env=env)
    assert done.exit_code == 0, done.output
    bad = CliRunner().invoke(main, ["tasks"], env={**env, "FEM_ANSIBLE_HOME": "/x"})
    assert bad.exit_code == 2 and "FEM_ANSIBLE_HOME: unknown config key 'home'" in bad.output


def _as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                           sys.executable, "-m", "fem_ansible", *args],
                          capture_output=True, text=True, cwd="/",
                          env={"PATH": os.environ["PATH"], "HOME": "/nonexistent"})


def _site(base: Path, work_mode: int) -> Path:
    """A config readable by anyone, its work dir root's (as before install-service)."""
    base.chmod(0o755)
    (base / "work").mkdir(mode=work_mode)
    config = base / "config.yml"
    config.write_text(f"node_id: a\nexecution:\n  work_dir: {base / 'work'}\n")
    config.chmod(0o644)
    return config


def test_a_permission_error_is_one_line_with_the_fix():
    """Issue 20: `run` as a user who may not write the work dir ended in a traceback."""
    base = Path(tempfile.mkdtemp(prefix="fem-perm-", dir="/tmp"))
    try:
        done = _as_nobody("tasks", "--config", str(_site(base, 0o700)))
    finally:
        shutil.rmtree(base)
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.splitlines()
    assert "Permission denied" in line and str(base / "work") in line
    assert "install-service" in line and "sudo -u fem" in line


def test_a_journal_this_user_may_only_read_is_one_line_with_the_fix():
    """`tasks` and `cancel` as a user who may read the journal but not write it ended in
    sqlite's traceback ("attempt to write a readonly database")."""
    base = Path(tempfile.mkdtemp(prefix="fem-perm-", dir="/tmp"))
    try:
        config = _site(base, 0o755)
        journal = base / "work" / "journal.sqlite"
        Journal(journal).close()
        journal.chmod(0o644)
        runs = [_as_nobody("tasks", "--config", str(config)),
                _as_nobody("cancel", "t1", "--config", str(config))]
    finally:
        shutil.rmtree(base)
    for done in runs:
        assert done.returncode == 2, done.stderr
        (line,) = done.stderr.splitlines()
        assert f"{journal}: Permission denied" in line and "read and write" in line, line
        assert "sudo -u fem" in line


def test_a_journal_this_user_may_not_open_is_one_line_with_the_fix():
    """A journal only its owner may read (0600) in a work dir anyone may enter: sqlite's
    "unable to open database file", on connecting."""
    base = Path(tempfile.mkdtemp(prefix="fem-perm-", dir="/tmp"))
    try:
        config = _site(base, 0o755)
        journal = base / "work" / "journal.sqlite"
        Journal(journal).close()
        done = _as_nobody("tasks", "--config", str(config))
    finally:
        shutil.rmtree(base)
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.splitlines()
    assert f"{journal}: Permission denied" in line and "sudo -u fem" in line, line


def test_a_file_that_is_no_journal_is_one_line(make_config, tmp_path):
    make_config()
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    (work / "journal.sqlite").write_bytes(b"not sqlite at all\n" * 100)
    done = CliRunner().invoke(main, ["tasks", "--config", str(tmp_path / "config.yml")])
    assert done.exit_code == 2, done.output
    assert f"{work / 'journal.sqlite'}: not a usable journal" in done.output


def test_init_writes_nothing_when_the_config_would_be_invalid(tmp_path):
    """Issue 20 item 6: a bad broker URL once left a config behind that blocked the next
    init."""
    target = tmp_path / "etc"
    runner = CliRunner()
    bad = runner.invoke(main, ["init", "--node-id", "hospital-a", "--dir", str(target),
                               "--broker-url", "http://broker:5672/"])
    assert bad.exit_code == 2 and "broker.url" in bad.output
    assert not (target / "config.yml").exists() and not (target / "inventory.yml").exists()
    bad_id = runner.invoke(main, ["init", "--node-id", "bad id!", "--dir", str(target)])
    assert bad_id.exit_code == 2 and "node_id" in bad_id.output
    assert not (target / "config.yml").exists()
    good = runner.invoke(main, ["init", "--node-id", "hospital-a", "--dir", str(target),
                                "--broker-url", "amqp://u:p@127.0.0.1:5672/%2F"])
    assert good.exit_code == 0, good.output
    assert "node_id: hospital-a" in (target / "config.yml").read_text()


def test_install_service_refuses_names_and_paths_that_would_add_unit_directives(tmp_path):
    """User, group and paths are written into the unit and the logrotate snippet as text:
    a line break (or a blank) in any of them is refused before anything is made."""
    base = ["install-service", "--dry-run", "--unit-dir", str(tmp_path / "unit"),
            "--logrotate-dir", str(tmp_path / "logrotate"), "--work-dir", str(tmp_path / "w"),
            "--config-dir", str(tmp_path / "c"), "--log-dir", str(tmp_path / "l")]
    for extra, fragment in ((["--user", "fem\nExecStartPre=/bin/sh"], "--user"),
                            (["--group", "Root"], "--group"),
                            (["--log-dir", f"{tmp_path}/l\nExecStartPre=/bin/sh"], "--log-dir"),
                            (["--work-dir", f"{tmp_path}/w x"], "--work-dir")):
        done = CliRunner().invoke(main, [*base, *extra])
        assert done.exit_code == 2 and fragment in done.output, (extra, done.output)
        assert "Traceback" not in done.output
    assert not any(tmp_path.iterdir())


def test_a_journal_on_a_read_only_file_system_is_one_line_for_each_command(make_config,
                                                                            tmp_path):
    """`tasks`, `cancel` and `listen` on a journal whose file system is mounted read-only
    (issue 28): one line saying so and what to do, exit 2, no traceback."""
    make_config(broker={"url": "amqp://guest:guest@127.0.0.1:5672/%2F"})
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "fem-ro", str(work)], check=True)
    try:
        Journal(work / "journal.sqlite").close()
        subprocess.run(["mount", "-o", "remount,ro", str(work)], check=True)
        config = str(tmp_path / "config.yml")
        runs = [CliRunner().invoke(main, [*args, "--config", config])
                for args in (["tasks"], ["cancel", "t1"], ["listen"])]
    finally:
        subprocess.run(["umount", str(work)], check=False)
    for done in runs:
        assert done.exit_code == 2, done.output
        (line,) = done.output.splitlines()
        assert f"{work / 'journal.sqlite'}: Read-only file system" in line, line
        assert "remount" in line
