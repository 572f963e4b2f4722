"""The node's health check (the original's ``pre_checks``), as an action and as the tool
``health-check``, with the keys and formats of the real records ([NB] DT4HDemo2025 cell
30); docs/legacy.md, "The other actions", gives its source and says which values are
deliberately withheld."""

from __future__ import annotations

import json
import os
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509

from .. import __version__
from ..config import Config
from .message import SUBMIT, LegacyMessage
from .replies import legacy_time

HEALTH_TOOL = "health-check"
MAX_IMAGES = 500
GB = 1024**3


def health(config: Config) -> dict[str, Any]:
    """``{installation_check, gpu_check, paths_check, resources_check,
    docker_images_installed, pem_certificates}``.  Errors of one check are caught and shown
    as its ``error`` field, as the original does."""
    legacy = config.legacy
    sandbox_root = Path(legacy.sandbox_path or "/nonexistent")
    gpus = _gpu_names()
    mem = _meminfo()
    return {
        "installation_check": {
            "docker_version": _command_output(["docker", "--version"])
            or "error: docker --version failed",
            # Not disclosed: the gateway's network details are not the orchestrator's.
            "ip_info": {},
            "fem_ansible_version": __version__,
        },
        "gpu_check": {"gpu_detected": bool(gpus),
                      "message": f"{len(gpus)} GPU(s) detected" if gpus
                      else "No GPU detected"},
        "paths_check": {
            "sandbox_path_exists": sandbox_root.is_dir(),
            "data_path_exists": bool(legacy.data_path) and Path(legacy.data_path).is_dir(),
            # The keys of the real record, deliberately empty: the site's data and other
            # users' sandboxes are not the orchestrator's to browse.
            "sandbox_contents": [],
            "data_path_contents": [],
        },
        "resources_check": {
            "CPU Count": os.cpu_count(),
            "CPU Percent": _cpu_percent(),
            "Memory Available": _gb(mem.get("MemAvailable")),
            "Memory Total": _gb(mem.get("MemTotal")),
            "GPU Count": len(gpus),
            # Not probed: a hospital's gateway does not dial out to answer a health check.
            "Has Internet": None,
        },
        "docker_images_installed": _images(),
        "pem_certificates": _certificates(config),
    }


def health_tool(config: Config, msg: LegacyMessage) -> dict[str, Any]:
    """``submit_run`` of the tool ``health-check``: the health result itself, or (with
    ``legacy.reply: record``) the process-info record around it, as the orchestrator's
    Health Check records show [NB]."""
    started = legacy_time()
    result = health(config)
    if config.legacy.reply != "record":
        return result
    return {"execution_id": msg.execution_id, "action": SUBMIT, "tool_id": HEALTH_TOOL,
            "task_id": HEALTH_TOOL, "user_id": msg.user_id, "node": config.node_id,
            "result": result, "status": "success", "return_code": 0,
            "starting_time": started, "finish_time": legacy_time()}


def _command_output(argv: list[str]) -> str | None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=15, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def _gpu_names() -> list[str]:
    out = _command_output(["nvidia-smi", "-L"])
    return out.splitlines() if out else []


def _meminfo() -> dict[str, int]:
    out = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                out[name] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return out


def _gb(n: int | None) -> str | None:
    """``"25.20 GB"``, as the real records write memory."""
    return None if n is None else f"{n / GB:.2f} GB"


def _cpu_percent(interval: float = 0.2) -> float | None:
    """Busy share of all CPUs over ``interval`` seconds, from /proc/stat."""
    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle

    try:
        total1, idle1 = sample()
        time.sleep(interval)
        total2, idle2 = sample()
    except (OSError, ValueError, IndexError):
        return None
    total = total2 - total1
    return round(100.0 * (total - (idle2 - idle1)) / total, 1) if total > 0 else 0.0


def _images() -> dict[str, Any]:
    out = _command_output(["docker", "image", "ls", "--digests", "--format", "{{json .}}"])
    if out is None:
        return {"docker_images": [], "error": "docker image ls failed"}
    images = []
    for line in out.splitlines()[:MAX_IMAGES]:
        try:
            item = json.loads(line)
        except ValueError:
            continue
        digest = item.get("Digest") or ""
        images.append({"repository": item.get("Repository"), "tag": item.get("Tag"),
                       "image_id": item.get("ID"),
                       "sha256_digest": digest if digest.startswith("sha256:") else None})
    return {"docker_images": images}


def _certificates(config: Config) -> dict[str, Any]:
    """Expiry of the broker TLS certificates (the original reported its PEM files):
    ``{expiry_date: "2026-02-03 14:54:42 UTC", status: "Valid"|"Expired"}`` or ``{error}``."""
    out: dict[str, Any] = {}
    tls = config.broker.tls
    for path in (tls.ca_file, tls.cert_file):
        if not path:
            continue
        try:
            cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
        except (OSError, ValueError) as e:
            out[Path(path).name] = {"error": f"unreadable: {e}"[:200]}
            continue
        expiry = cert.not_valid_after_utc
        out[Path(path).name] = {
            "expiry_date": expiry.strftime("%Y-%m-%d %H:%M:%S UTC"),
            "status": "Valid" if expiry > datetime.now(UTC) else "Expired"}
    return out
