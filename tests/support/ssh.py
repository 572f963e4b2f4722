"""Real SSH hosts for the remote-target tests: an ``sshd`` per loopback address.

Each :class:`SshHost` is its own ``sshd -D`` (host key, config, log and authorized keys made
by the test, in a dir the test owns), started and stopped by its process id; the system's
sshd, if any, is never touched.  Tasks log in as the unprivileged user :data:`USER` (made
once, in the ``docker`` group so that it can reach the engine, as a site's service account
would), with a key the test makes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

USER = "femssh"
PORT = 2222
# Not under pytest's tmp dirs: those are root's and 0700, and sshd reads the authorized
# keys, and the user works, with the user's own rights.
BASE = Path("/var/tmp/fem-ssh-tests")


def ensure_user() -> None:
    """The login user of the test hosts, made once per machine."""
    if subprocess.run(["id", USER], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", "--groups",
                        "docker", USER], check=True, capture_output=True)
    # No password, but not locked: sshd without PAM refuses locked accounts even with a key.
    subprocess.run(["usermod", "--password", "*", USER], check=True, capture_output=True)


class SshKeys:
    """A client key pair and a known-hosts file, in ``directory``."""

    def __init__(self, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        self.dir = directory
        self.private_key = directory / "id_ed25519"
        self.known_hosts = directory / "known_hosts"
        self.authorized_keys = directory / "authorized_keys"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "fem-test",
                        "-f", str(self.private_key)], check=True)
        shutil.copy(f"{self.private_key}.pub", self.authorized_keys)
        self.authorized_keys.chmod(0o644)
        self.known_hosts.write_text("")


class SshHost:
    """One sshd on ``address``:``port``, its files in ``directory``."""

    def __init__(self, address: str, directory: Path, keys: SshKeys, port: int = PORT):
        self.address, self.port, self.dir, self.keys = address, port, directory, keys
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o755)
        self.host_key = directory / "host_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                        str(self.host_key)], check=True)
        self.config = directory / "sshd_config"
        self.log = directory / "sshd.log"
        self.config.write_text(
            f"ListenAddress {address}:{port}\n"
            f"HostKey {self.host_key}\n"
            f"PidFile {directory}/sshd.pid\n"
            f"AuthorizedKeysFile {keys.authorized_keys}\n"
            f"AllowUsers {USER}\n"
            "PermitRootLogin no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "UsePAM no\nStrictModes no\nLogLevel VERBOSE\n"
            "Subsystem sftp /usr/lib/openssh/sftp-server\n")
        pub = (directory / "host_key.pub").read_text().split()
        with keys.known_hosts.open("a") as f:
            f.write(f"[{address}]:{port} {pub[0]} {pub[1]}\n")
        # A work dir for fem on this host, the login user's (inventory var fem_work_dir).
        self.work_dir = directory / "work"
        self.work_dir.mkdir(exist_ok=True)
        shutil.chown(self.work_dir, USER, USER)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> SshHost:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        self.proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-f", str(self.config),
                                      "-E", str(self.log)])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(
                    (self.address, self.port), timeout=1):
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"sshd on {self.address}:{self.port} did not start:\n"
                             f"{self.log.read_text() if self.log.exists() else ''}")

    def stop(self, sessions: bool = False) -> None:
        """Stop the sshd; with ``sessions``, also its open sessions (the host went away)."""
        if sessions and self.proc is not None and self.proc.poll() is None:
            for pid in _descendants(self.proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def leftovers(self) -> list[str]:
        """What fem left in this host's work dir."""
        return sorted(str(p.relative_to(self.work_dir)) for p in self.work_dir.rglob("*"))


def _descendants(pid: int) -> list[int]:
    """Every process started by ``pid``, directly or not (an sshd's sessions and theirs)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        children = subprocess.run(["pgrep", "-P", str(todo.pop())], capture_output=True,
                                  text=True).stdout.split()
        found += map(int, children)
        todo += map(int, children)
    return found


def inventory(path: Path, hosts: dict[str, SshHost], group: str = "compute") -> Path:
    """An inventory with ``hosts`` (name to host) in ``group``: per-host address, port and
    fem work dir; the login user and interpreter (Debian's python3 with python3-docker) for
    the group."""
    import yaml

    data = {"all": {"children": {group: {
        "hosts": {name: {"ansible_host": h.address, "ansible_port": h.port,
                         "fem_work_dir": str(h.work_dir)} for name, h in hosts.items()},
        "vars": {"ansible_user": USER, "ansible_python_interpreter": "/usr/bin/python3"},
    }}}}
    path.write_text(yaml.safe_dump(data))
    return path


@contextlib.contextmanager
def addresses_held() -> Iterator[None]:
    """Hold this machine's test sshd addresses for one test.  pytest-xdist may run two host
    tests at once: the second one's sshd cannot bind the address the first one's holds, and
    its start check, which only connects, would take the first one's for its own, whose host
    key is not in its known hosts."""
    BASE.mkdir(mode=0o755, exist_ok=True)
    with open(BASE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def new_dir(name: str) -> Path:
    """A fresh dir for one test's hosts under :data:`BASE` (readable by :data:`USER`)."""
    BASE.mkdir(mode=0o755, exist_ok=True)
    os.chmod(BASE, 0o755)
    directory = BASE / name
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(mode=0o755)
    return directory
