"""`fem-ansible install-service` for real (issue 20 item 2): it makes a system user, its
dirs, a unit that `systemd-analyze verify` accepts and a logrotate snippet logrotate reads;
a second run changes nothing; `--dry-run` changes nothing; and the unit's command, run as
the user it made, takes a task to COMPLETED."""

from __future__ import annotations

import grp
import os
import pwd
import shlex
import shutil
import stat
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.dists import venv_for_another_user
from tests.support.harness import site_config

pytestmark = pytest.mark.e2e


@pytest.fixture
def svc_root() -> Iterator[tuple[Path, str]]:
    """A dir the new user can reach (pytest's tmp dirs are root's alone) and a user name
    no one has; both gone afterwards."""
    base = Path(tempfile.mkdtemp(prefix="fem-svc-", dir="/tmp"))
    base.chmod(0o755)
    user = f"femt{uuid.uuid4().hex[:8]}"
    yield base, user
    subprocess.run(["userdel", user], capture_output=True, check=False)
    subprocess.run(["groupdel", user], capture_output=True, check=False)
    shutil.rmtree(base, ignore_errors=True)


def install(base: Path, user: str, *extra: str) -> subprocess.CompletedProcess[str]:
    fem = base / "venv" / "bin" / "fem-ansible"
    return subprocess.run(
        [str(fem), "install-service", "--user", user, "--work-dir", str(base / "lib"),
         "--config-dir", str(base / "etc"), "--log-dir", str(base / "log"),
         "--unit-dir", str(base / "systemd"), "--logrotate-dir", str(base / "logrotate.d"),
         *extra], capture_output=True, text=True, check=False)


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen[bytes],
             timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()[0].decode(errors="replace")
        assert time.monotonic() < deadline, "the listener did not connect"
        time.sleep(0.2)


def owner_and_mode(path: Path) -> tuple[str, str, int]:
    st = path.stat()
    return (pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name,
            stat.S_IMODE(st.st_mode))


def test_install_service_makes_a_user_and_unit_the_listener_runs_as(svc_root, site):
    base, user = svc_root
    venv_for_another_user(base / "venv")
    dry = install(base, user, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"would add system user {user} (home {base}/lib, in group docker)" in dry.stdout
    # what it would write, line by line (issue 31)
    assert f"would write {base}/systemd/fem-ansible.service" in dry.stdout
    assert f"    ExecStart={base}/venv/bin/fem-ansible listen" in dry.stdout
    assert f"    {base}/log/*.log {base}/lib/audit.jsonl {{" in dry.stdout
    assert not (base / "lib").exists() and not (base / "systemd").exists()
    with pytest.raises(KeyError):
        pwd.getpwnam(user)

    done = install(base, user)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"add system user {user} (home {base}/lib, in group docker)" in done.stdout
    entry = pwd.getpwnam(user)
    assert entry.pw_dir == str(base / "lib") and entry.pw_shell == "/usr/sbin/nologin"
    assert user in grp.getgrnam("docker").gr_mem
    assert owner_and_mode(base / "lib") == (user, user, 0o700)
    assert owner_and_mode(base / "etc") == ("root", user, 0o750)
    assert owner_and_mode(base / "log") == (user, user, 0o750)

    unit = base / "systemd" / "fem-ansible.service"
    verified = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                              text=True, check=False)
    assert verified.returncode == 0 and not verified.stderr.strip(), verified.stderr
    snippet = base / "logrotate.d" / "fem-ansible"
    assert f"{base}/log/*.log {base}/lib/audit.jsonl" in snippet.read_text()
    rotate = subprocess.run(["logrotate", "--debug", "--state", str(base / "lr.state"),
                             str(snippet)], capture_output=True, text=True, check=False)
    assert rotate.returncode == 0, rotate.stderr

    again = install(base, user)
    assert again.returncode == 0 and again.stdout.startswith("nothing to do"), again.stdout

    # The listener as the unit starts it, as the user install-service made.
    config = site_config(base, site.env, site.node,
                         execution={"work_dir": str(base / "lib"), "shutdown_grace_s": 30})
    config = config.rename(base / "etc" / "config.yml")
    os.chown(config, 0, grp.getgrnam(user).gr_gid)
    config.chmod(0o640)
    (exec_start,) = [line.removeprefix("ExecStart=") for line in unit.read_text().splitlines()
                     if line.startswith("ExecStart=")]
    argv = shlex.split(exec_start)
    assert argv[0] == str(base / "venv" / "bin" / "fem-ansible") and "--log-file" in argv
    argv = argv[:argv.index("--metrics-port")]  # another test may hold the port
    env = {"PATH": os.environ["PATH"], "HOME": entry.pw_dir, "LANG": "C.UTF-8",
           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    proc = subprocess.Popen(["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups",
                             "--", *argv], env=env, cwd="/", stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        log = base / "log" / "listener.log"
        wait_for(lambda: log.exists() and "connected to the broker" in log.read_text(),
                 proc)
        site.orchestrator.publish(site.task("as-service-user"))
        final = site.orchestrator.wait_terminal("as-service-user", timeout=300)
        assert final["state"] == "COMPLETED", final
        status = Path(f"/proc/{proc.pid}/status").read_text()
        (uids,) = [line.split()[1:] for line in status.splitlines() if line.startswith("Uid:")]
        assert set(uids) == {str(entry.pw_uid)}
        assert owner_and_mode(log)[0] == user and "connected to the broker" in log.read_text()
        assert owner_and_mode(base / "lib" / "journal.sqlite")[0] == user
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, out.decode(errors="replace")
