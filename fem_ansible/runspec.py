"""What one run of a task is made of: the :class:`~fem_ansible.runner.RunSpec` ansible-runner
gets (the playbook, the host, the extra-vars) and the secrets beside it, built from the
journal's record and the policy decision.

One of the seams of a task's life (docs/architecture.md, "Seams"): this module builds a
run; ``tracking.StageTracker`` follows its stages and events, ``outcome.Finisher`` finishes
it (uploads, the outcome), ``lifecycle._Execution`` coordinates the three.  Nothing here
writes the journal or sends an event.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import naming, schema
from .config import Config
from .journal import TaskRecord
from .policy import Decision
from .refs import parse_image, split_url
from .runner import RunSpec, data_dir
from .site_roles import roles_path
from .targets import control_dir, inventory_path, ssh_env

if TYPE_CHECKING:
    from .lifecycle import Node

# Room for ansible itself above the container's own timeout before the playbook is killed.
PLAYBOOK_MARGIN_S = 600


def build(node: Node, rec: TaskRecord, decision: Decision, host: str, *,
          tags: list[str] | None = None, skip_tags: list[str] | None = None,
          playbook: str | None = None, private_data_dir: Path | None = None) -> RunSpec:
    """The run of the task playbook (or of the built-in ``playbook``, e.g. ``stop.yml``) of
    the task ``rec`` on inventory host ``host``; ``private_data_dir``: ansible-runner's files
    elsewhere than under the task's run dir."""
    config, task, tid = node.config, rec.task, rec.task_id
    pdd = node.run_dir(tid)
    (pdd / "archives").mkdir(parents=True, exist_ok=True, mode=0o700)
    pdd.chmod(0o700)
    name = node.object_name(tid)
    image = parse_image(task["image"]["ref"])
    builtin = data_dir()
    if playbook:
        path = builtin / "playbooks" / playbook
    elif config.execution.playbook:
        path = Path(config.execution.playbook).absolute()
    else:
        path = builtin / "playbooks" / "task.yml"
    suffix = "-".join(tags or []) or (playbook or "").removesuffix(".yml")
    ident = f"{name}.a{rec.attempt}" + (f"-{suffix}" if suffix else "")
    ssh_dir = control_dir(config, ident)
    inventory = inventory_path(config)
    return RunSpec(
        # Runs beside the main one (stop, cleanup) get their own private data dir:
        # ansible-runner runs sharing one corrupt each other's env/.
        private_data_dir=private_data_dir or (pdd / "aux" / suffix if suffix else pdd),
        # The marker of every process of the run; "." cannot occur in a name.
        ident=ident,
        playbook=path,
        inventory=inventory,
        limit=host,
        roles_path=roles_path(config),
        collections=node.collections,
        scan_cache=node.scan_cache,
        extravars={
            "fem_task": schema.public_task(task),
            "fem_node_id": config.node_id,
            "fem_run": {
                # Names, dirs (on the host's own work dir: inventory var fem_work_dir,
                # docs/hosts.md) and mounts; the image's repository as engines spell it.
                **naming.fem_run(
                    config.node_id, task, decision.policy, decision.datasets,
                    host_work_dir=node.targets.work_dir(host),
                    attempt=rec.attempt, local_dir=str(pdd)),
                "image_repositories": image.repo_digest_names,
                "min_free_bytes": config.execution.min_free_bytes,
            },
            "fem_datasets": decision.datasets,
            "fem_policy": decision.policy,
        },
        secrets=secrets(config, task, image.registry, node.run_secret_env(task)),
        tags=tags or [],
        skip_tags=skip_tags or [],
        timeout_s=task["resources"]["timeout_s"] + PLAYBOOK_MARGIN_S,
        env=ssh_env(config, ssh_dir),
        # Mitogen's start (multiplexer, then the host's interpreter: ~1.8 s here) pays
        # for itself over the task playbook's module calls, not in the one-call stop
        # and cleanup runs, where it would only delay a cancel (docs/decisions.md).
        strategy=config.execution.strategy if not (playbook or tags) else "linear",
        ssh_control_dir=ssh_dir,
        ssh_masters=node.ssh_masters,
        resident=node.resident,
        rerun_if_lost=bool(playbook or tags),
    )


def warm_ups(node: Node) -> list[RunSpec]:
    """Runs shaped like the task playbook's and like the short stop and cleanup runs, as far
    as their Ansible environment goes (nothing else of them is used): what
    fem_ansible.runner.prestart starts the resident Ansibles of at the listener's start."""
    config = node.config
    ident = "fem-warm-up.a0"
    ssh_dir = control_dir(config, ident)
    return [RunSpec(
        private_data_dir=node.runs_dir / f".warm-up-{strategy}", ident=ident,
        playbook=data_dir() / "playbooks" / "task.yml", inventory=inventory_path(config),
        limit="localhost", roles_path=roles_path(config), collections=node.collections,
        scan_cache=node.scan_cache, extravars={}, secrets={},
        timeout_s=PLAYBOOK_MARGIN_S, env=ssh_env(config, ssh_dir), strategy=strategy,
        ssh_control_dir=ssh_dir, resident=node.resident,
    ) for strategy in dict.fromkeys([config.execution.strategy, "linear"])]


def secrets(config: Config, task: dict[str, Any], registry: str,
            secret_env: Mapping[str, str]) -> dict[str, Any]:
    """``fem_secrets``: credentials from the site config for this task's ``registry`` and
    git host, the real input URLs and headers, and ``secret_env``, the container env the
    task's adapter passes as secrets (docs/roles.md)."""
    registry_auth = {}
    if registry in config.registries:
        cred = config.registries[registry]
        registry_auth[registry] = {"username": cred.username,
                                   "password": _read_secret(cred.password_file)}
    git = None
    if task["source"]:
        host = split_url(task["source"]["repo"]).hostname or ""
        if host in config.sources:
            cred = config.sources[host]
            git = {"username": cred.username, "token": _read_secret(cred.token_file)}
    return {
        "registry_auth": registry_auth,
        "git": git,
        "inputs": [{"url": i["url"], "headers": i["headers"]} for i in task["inputs"]],
        "env": dict(secret_env),
    }


def _read_secret(path: str) -> str:
    return Path(path).read_text(encoding="utf-8").strip()
