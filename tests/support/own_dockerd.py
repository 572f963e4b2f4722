"""A dockerd of a test's own (its own socket, data, exec root and pid file, no bridge, no
iptables), beside the shared one, which a test may stop and start: the shared engine is
never restarted (other tests use it)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

SOCKET = "/run/fem-faults-docker.sock"


class OwnDockerd:
    def __init__(self, base: Path, live_restore: bool = False):
        self.base = base
        self.host = f"unix://{SOCKET}"
        self.live_restore = live_restore
        self.proc: subprocess.Popen[bytes] | None = None

    def docker(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["docker", "-H", self.host, *args], capture_output=True,
                              text=True, check=check, timeout=120)

    def answers(self) -> bool:
        return self.docker("version", check=False).returncode == 0

    def start(self, timeout: float = 60) -> None:
        args = ["dockerd", "--data-root", str(self.base / "data"),
                "--exec-root", str(self.base / "exec"), "--pidfile", str(self.base / "pid"),
                "-H", self.host, "--bridge=none", "--iptables=false", "--ip-masq=false",
                "--ip-forward=false"]
        if self.live_restore:
            args.append("--live-restore")
        with (self.base / "dockerd.log").open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self.answers():
            assert self.proc.poll() is None, (self.base / "dockerd.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "own dockerd did not answer"
            time.sleep(0.3)

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM, as `systemctl stop docker` does; waits for it to end."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def close(self) -> None:
        """Remove every container, stop the engine (its containerd with it), remove its
        dirs; whatever state the test left it in."""
        try:
            if self.proc is not None and self.proc.poll() is not None:
                self.start()  # stopped by the test: started again to remove what it holds
            if self.proc is not None and self.proc.poll() is None:
                ids = self.docker("ps", "-aq", check=False).stdout.split()
                if ids:
                    self.docker("rm", "-f", "-v", *ids, check=False)
        finally:
            self.live_restore = False
            self.stop()
            for pid_file in self.base.glob("exec/containerd/*.pid"):
                with contextlib.suppress(OSError, ValueError):
                    os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
            subprocess.run(["umount", "-R", "-l", str(self.base / "data")],
                           capture_output=True)
            subprocess.run(["umount", "-R", "-l", str(self.base / "exec")],
                           capture_output=True)
            shutil.rmtree(self.base, ignore_errors=True)
