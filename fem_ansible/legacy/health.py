"""The node's health check (the original's ``pre_checks``), as an action and as a tool."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from .. import __version__
from ..config import Config


def health(config: Config, action: str, running: int) -> dict[str, Any]:
    """What the original's pre_checks reported, as far as it is not the site's secret:
    no listing of the data or sandbox contents."""
    legacy = config.legacy
    sandbox_root = Path(legacy.sandbox_path or "/nonexistent")
    mem_total = mem_avail = None
    try:
        meminfo = dict(line.split(":", 1) for line in
                       Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        mem_total = int(meminfo["MemTotal"].split()[0]) * 1024
        mem_avail = int(meminfo["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        pass
    return {
        "action": action, "node": config.node_id, "status": "success",
        "installation_check": {"fem_ansible_version": __version__,
                               "docker_version": _command_output(
                                   ["docker", "version", "--format",
                                    "{{.Server.Version}}"])},
        "paths_check": {
            "sandbox_path_exists": sandbox_root.is_dir(),
            "sandbox_path_writable": os.access(sandbox_root, os.W_OK),
            "data_path_exists": bool(legacy.data_path) and Path(legacy.data_path).is_dir(),
        },
        "resources_check": {
            "CPU Count": os.cpu_count(), "Memory Total": mem_total,
            "Memory Available": mem_avail, "GPU Count": _gpu_count(),
            "running_tasks": running,
            "max_parallel": config.execution.max_parallel,
        },
        "pem_certificates": _certificates(config),
    }


def _command_output(argv: list[str]) -> str | None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=15, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def _gpu_count() -> int:
    out = _command_output(["nvidia-smi", "-L"])
    return len(out.splitlines()) if out else 0


def _certificates(config: Config) -> dict[str, Any]:
    """Expiry of the broker TLS certificates (the original reported its PEM files)."""
    from datetime import UTC, datetime

    from cryptography import x509

    out: dict[str, Any] = {}
    tls = config.broker.tls
    for path in (tls.ca_file, tls.cert_file):
        if not path:
            continue
        try:
            cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
        except (OSError, ValueError) as e:
            out[Path(path).name] = {"expiry_date": None, "status": f"unreadable: {e}"[:200]}
            continue
        expiry = cert.not_valid_after_utc
        out[Path(path).name] = {"expiry_date": expiry.isoformat(),
                                "status": "valid" if expiry > datetime.now(UTC) else "expired"}
    return out
