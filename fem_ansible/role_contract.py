"""The one description of what roles receive (DESIGN.md §6, docs/roles.md): the extra-vars'
shapes, which of them each built-in role reads, and the roles' own settings.

Everything about those shapes is made from here, so none can drift from another:

- every built-in role's ``meta/argument_specs.yml`` (:func:`argument_specs_text`);
- the ``fem_task`` and ``fem_run`` field tables of docs/roles.md (:func:`fields_table`);

and tests/test_role_contract.py holds the rest to it: the task JSON Schema has exactly these
``fem_task`` fields (less the secrets that go to ``fem_secrets``), the normal form
(``schema.read_task`` then ``schema.public_task``) has every one of them with its type, and
``policy.decide``'s ``fem_policy`` has exactly the keys of :data:`FEM_POLICY`.
``scripts/gen_docs.py`` writes the generated files; tests/test_docs.py fails when one is stale.

A role validates exactly the keys listed here (Ansible rejects unknown keys of a dict with
``options``), so a key the listener adds to ``fem_task``, ``fem_run`` or ``fem_policy`` is
added here first.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from . import schema


def o(type_: str, desc: str, **kw: Any) -> dict[str, Any]:
    """One option of an argument spec."""
    d = {"description": desc, "type": type_}
    d.update(kw)
    return d


FEM_RUN = o(
    "dict",
    "The task's run, laid out by the listener (fem_ansible/naming.py): its object names, "
    "its dirs on the target host, its container mounts, the listener-side run dir.",
    required=True,
    options={
        "dir": o(
            "str",
            "The task's work dir on the target host, C(<work dir>/tasks/<name>).",
            required=True,
        ),
        "attempt": o("int", "Attempt number, from 1.", required=True),
        "name": o(
            "str",
            "The name of the task's container, Slurm job and run dir: a readable "
            "C(fem-<node_id>-<task_id>) (cut at 64 characters), C(-), and 32 hex digits of "
            "a digest of the exact ids (docs/roles.md, \"Object names\"); selected by exactly "
            "this name, never by a prefix.",
            required=True,
        ),
        "accounts_container": o(
            "str",
            "The name of the never-started container that reads the image's account files.",
            required=True,
        ),
        "scratch": o(
            "list",
            "The task's scratch, in the order of C(fem_task.scratch).",
            elements="dict",
            required=True,
            options={
                "name": o("str", "The scratch's name in the task.", required=True),
                "mount": o("str", "Container path.", required=True),
                "dir": o("str", "Its dir on the target host, in the run dir.", required=True),
                "volume": o(
                    "str",
                    "The engine volume bound to C(dir) that the container mounts (Docker), "
                    "or null: the container binds C(dir) (podman, Slurm).",
                ),
            },
        ),
        "mounts": o(
            "list",
            "Every mount of the task's container, as the executor modules take them: input, "
            "source (when there is one), output, the datasets, the scratch.",
            elements="dict",
            required=True,
            options={
                "type": o("str", "Mount type.", required=True, choices=["bind", "volume"]),
                "source": o("str", "Host path or volume name.", required=True),
                "target": o("str", "Container path.", required=True),
                "read_only": o("bool", "Mounted read-only.", required=True),
            },
        ),
        "local_dir": o(
            "str",
            "The listener-side run dir; stage-out puts the archives in its C(archives/).",
            required=True,
        ),
        "image_repositories": o(
            "list",
            "The task image's repository (its reference without tag or digest) as engines "
            "spell it in repo digests: the normal form, then Docker's short forms for "
            "docker.io.",
            elements="str",
            required=True,
        ),
        "min_free_bytes": o(
            "int",
            "The node's free-space floor (C(execution.min_free_bytes)): an executor stops a "
            "container whose writes take the file system of the task's dir below it "
            "(C(fem_error_code=disk_full)).",
        ),
    },
)
FEM_NODE_ID = o("str", "This node's id.", required=True)

# An upload target as roles see it: the listener does the upload, with the real URL and the
# headers, which roles never get.
UPLOAD = {
    "url": o("str", "Display URL (no query string, no userinfo)."),
    "method": o("str", "HTTP method.", choices=["PUT", "POST"]),
}

# Fields of the task message that never reach fem_task: secrets, which go to fem_secrets
# (inputs' headers) or stay with the listener (upload headers).
SECRET_FIELDS = frozenset({"inputs[].headers", "outputs.upload.headers", "logs.upload.headers"})

TASK_FULL = {
    "schema": o("str", "C(fem.task/v1)."),
    "task_id": o("str", "The task's id.", required=True),
    "node_id": o("str", "The node id the task names, if any."),
    "experiment_id": o("str", "Echoed in events."),
    "not_after": o(
        "str", "RFC 3339 time after which the task is refused (checked by the listener)."
    ),
    "executor": o("str", "The executor the task asked for."),
    "image": o(
        "dict",
        "The image to run.",
        options={
            "ref": o(
                "str",
                "Normalised reference, C(registry/name:tag) or C(registry/name@sha256:...).",
                required=True,
            ),
            "pull_policy": o(
                "str", "When to pull.", choices=["missing", "always", "never"], default="missing"
            ),
        },
    ),
    "source": o(
        "dict",
        "The source repository, or null.",
        options={
            "repo": o(
                "str", "Repository URL (https, ssh or git scheme; no password, query or fragment).",
                required=True
            ),
            "version": o("str", "Branch, tag or commit; null for the remote HEAD."),
            "mount": o("str", "Container path of the checkout (read-only).",
                       default=schema.SOURCE_MOUNT),
        },
    ),
    "command": o("list", "Argument vector, or null for the image's command.", elements="str"),
    "workdir": o("str", "Working directory in the container, or null."),
    "env": o("dict", "Container environment."),
    "inputs": o(
        "list",
        "Files downloaded before the run (display URLs; the real ones are in fem_secrets).",
        elements="dict",
        options={
            "url": o("str", "Display URL (no query string, no userinfo)."),
            "path": o("str", "Relative path under the input dir.", required=True),
            "sha256": o("str", "Expected SHA-256 (hex), or null."),
        },
    ),
    "datasets": o(
        "list",
        "Site datasets the task mounts.",
        elements="dict",
        options={
            "name": o("str", "Dataset name.", required=True),
            "mount": o("str", "Container path.", required=True),
        },
    ),
    "scratch": o(
        "list",
        "Per-task writable volumes.",
        elements="dict",
        options={
            "name": o("str", "Volume name suffix.", required=True),
            "mount": o("str", "Container path.", required=True),
        },
    ),
    "outputs": o(
        "dict",
        "Where the task writes its outputs.",
        options={
            "path": o("str", "Container path of the output dir.", default=schema.OUTPUT_PATH),
            "upload": o("dict", "Where the listener uploads the outputs archive, or null.",
                        options=UPLOAD),
        },
    ),
    "logs": o(
        "dict",
        "Where the logs go.",
        options={
            "upload": o("dict", "Where the listener uploads the logs archive, or null.",
                        options=UPLOAD),
        },
    ),
    "resources": o(
        "dict",
        "What the task asked for, the site's defaults filled in (fem_policy holds what it gets).",
        options={
            "cpus": o("float", "CPUs (at least 0.01)."),
            "memory": o("int", "Memory in bytes, at least 4 MiB (the message may say C(512Mi))."),
            "gpus": o("int", "GPUs."),
            "timeout_s": o("int", "Run time of the container in seconds."),
        },
    ),
    "network": o("str", "Network the task asked for."),
    "target": o("str", "Inventory host or group the task asked for."),
    "labels": o("dict", "Echoed in events."),
}


def fem_task(read: set[str]) -> dict[str, Any]:
    """The spec of ``fem_task`` for a role that reads the fields ``read``: the others are
    declared without their inner options (a role does not validate what it never reads)."""
    opts = {}
    for k, v in TASK_FULL.items():
        v = copy.deepcopy(v)
        if k not in read:
            v.pop("options", None)
            v.pop("required", None)
            v.pop("default", None)
            v.pop("choices", None)
        opts[k] = v
    return o(
        "dict",
        "The validated, normalised task (docs/roles.md); every string is unsafe.",
        required=True,
        options=opts,
    )


FEM_POLICY = o(
    "dict",
    "The container settings the listener decided.",
    required=True,
    options={
        "executor": o("str", "Executor role suffix (C(fem_executor_<executor>)).", required=True),
        "user": o("str", "C(uid:gid) used when the image's user is root or unset.", required=True),
        "network": o("str", "Network mode of the container.", required=True),
        "cpus": o("float", "CPU limit.", required=True),
        "memory": o("int", "Memory limit in bytes.", required=True),
        "pids": o("int", "Process limit.", required=True),
        "gpus": o("int", "GPUs to request.", required=True),
        "timeout_s": o(
            "int", "Run time limit in seconds, counted from the container's start.", required=True
        ),
        "stop_grace_s": o(
            "int", "Seconds between SIGTERM and SIGKILL when stopping.", required=True
        ),
        "read_only": o("bool", "Read-only root filesystem.", required=True),
        "cap_drop": o("list", "Capabilities to drop.", elements="str", required=True),
        "no_new_privileges": o("bool", "Set no-new-privileges.", required=True),
        "tmpfs": o("dict", "Container path to tmpfs options.", required=True),
        "log_bytes": o("int", "Maximum size of each of stdout.log and stderr.log.", required=True),
        "input_bytes": o("int", "Maximum total size of the downloaded inputs.", required=True),
        "source_bytes": o("int", "Most disk the source checkout may take (blocks, C(.git) "
                          "included).", required=True),
        "output_bytes": o("int", "Most disk the output dir may take (blocks); while the task "
                          "runs, of output and scratch together.", required=True),
        "slurm": o(
            "dict",
            "Site settings of the Slurm executor (C(execution.slurm)); never from the message.",
            options={
                "runtime": o(
                    "str", "Container engine on the compute nodes.", choices=["docker", "podman"]
                ),
                "partition": o("str", "Partition of task jobs; null for the cluster's default."),
                "account": o("str", "Account of task jobs; null for the user's default."),
                "qos": o("str", "QoS of task jobs; null for the default."),
            },
        ),
        "engine": o(
            "str",
            "Engine that pulls, runs and removes the task's container (C(podman) for the "
            "podman executor, the Slurm runtime for Slurm, else C(docker)).",
            choices=["docker", "podman"],
            required=True,
        ),
        "podman": o(
            "dict",
            "Site settings of podman (C(execution.podman)); never from the message.",
            options={
                "tls_verify": o(
                    "bool",
                    "Pull with TLS verification (false for the image's registry when the site "
                    "lists it in C(execution.podman.insecure_registries)).",
                ),
            },
        ),
    },
)

FEM_DATASETS = o(
    "list",
    "Datasets resolved from the site policy.",
    elements="dict",
    required=True,
    options={
        "name": o("str", "Dataset name.", required=True),
        "host_path": o("str", "Directory on the target host.", required=True),
        "mount": o("str", "Container path (read-only).", required=True),
    },
)

SECRETS_FULL = {
    "registry_auth": o("dict", "Registry host to C({username, password}).", no_log=True),
    "git": o(
        "dict",
        "Git credentials for the source host, or null.",
        no_log=True,
        options={
            "username": o("str", "Git user name.", required=True, no_log=True),
            "token": o("str", "Git token or password.", required=True, no_log=True),
        },
    ),
    "inputs": o(
        "list",
        "Real input URLs and their headers, in the order of fem_task.inputs.",
        elements="dict",
        no_log=True,
        options={
            "url": o("str", "The real URL, query string included.", required=True, no_log=True),
            "headers": o("dict", "Request headers.", no_log=True),
        },
    ),
    "env": o(
        "dict",
        "Container env vars passed as secrets (a legacy run's token), laid over fem_task.env.",
        no_log=True,
    ),
}


def fem_secrets(read: set[str]) -> dict[str, Any]:
    """The spec of ``fem_secrets`` for a role that reads the keys ``read``."""
    opts = {}
    for k, v in SECRETS_FULL.items():
        v = copy.deepcopy(v)
        if k not in read:
            v.pop("options", None)
        opts[k] = v
    return o(
        "dict",
        "Secrets from the vault-encrypted vars file; every task reading them is no_log.",
        required=True,
        no_log=False,
        options=opts,
    )


# What every executor role's main entry point receives: one container run of the task.
EXECUTOR = {
    "fem_run": FEM_RUN,
    "fem_node_id": FEM_NODE_ID,
    "fem_task": fem_task({"task_id", "image", "command", "workdir", "env"}),
    "fem_datasets": FEM_DATASETS,
    "fem_policy": FEM_POLICY,
}

ROLES = {
    "fem_volumes": (
        "Create the task's run directory, scratch volumes and inputs.",
        {
            "fem_run": FEM_RUN,
            "fem_node_id": FEM_NODE_ID,
            "fem_task": fem_task({"task_id", "inputs"}),
            "fem_secrets": fem_secrets({"inputs"}),
            "fem_policy": FEM_POLICY,
            "fem_volumes_download_timeout": o(
                "int", "Timeout in seconds of each input download request.", default=60
            ),
            "fem_volumes_download_deadline": o(
                "int", "Seconds each input download may take in all, however slowly the "
                "server answers.", default=3600
            ),
            "fem_volumes_writable_mode": o(
                "str",
                "Mode of output/ and scratch/<name>/; they must be writable by the container "
                "user (the run dir itself is 0700).",
                default="0777",
            ),
        },
    ),
    "fem_image": (
        "Pull the task's image per its pull policy and report fem_image_digest.",
        {
            "fem_run": FEM_RUN,
            "fem_task": fem_task({"image"}),
            "fem_secrets": fem_secrets({"registry_auth"}),
            "fem_policy": FEM_POLICY,
            "fem_image_pull_timeout": o(
                "int", "Seconds a pull may take in all (the task's C(timeout)); the engine's "
                "own timeout bounds each API read only.", default=1800
            ),
        },
    ),
    "fem_source": (
        "Check out the task's source and report fem_source_commit.",
        {
            "fem_run": FEM_RUN,
            "fem_task": fem_task({"source"}),
            "fem_secrets": fem_secrets({"git"}),
            "fem_policy": FEM_POLICY,
            "fem_source_depth": o(
                "int",
                "History depth of the clone of a branch, tag or HEAD; 0 for the full history "
                "(a commit id always gets the full history).",
                default=1,
            ),
            "fem_source_submodules": o(
                "bool",
                "Check out submodules too (their URLs are not checked against the site policy).",
                default=False,
            ),
            "fem_source_accept_newhostkey": o(
                "bool",
                "Accept an unknown SSH host key of the source host (C(accept_newhostkey)).",
                default=False,
            ),
            "fem_source_timeout": o(
                "int", "Seconds the checkout (clone, checkout, submodules) may take in all; "
                "git is killed then.", default=1800
            ),
        },
    ),
    "fem_execute": (
        "Run the task through the executor role fem_policy.executor names.",
        {
            "fem_policy": FEM_POLICY,
        },
    ),
    "fem_executor_docker": (
        "Run the task's container on Docker and report fem_exit_code and fem_timed_out.",
        {
            **EXECUTOR,
            "fem_executor_docker_api_timeout": o(
                "int",
                "Seconds to wait for a Docker API call (the wait for the container excepted).",
                default=60,
            ),
        },
    ),
    "fem_executor_podman": (
        "Run the task's container on podman and report fem_exit_code and fem_timed_out.",
        {
            **EXECUTOR,
            "fem_executor_podman_api_timeout": o(
                "int",
                "Seconds to wait for a podman command (the wait for the container excepted).",
                default=60,
            ),
        },
    ),
    "fem_executor_slurm": (
        "Run the task's container as a Slurm job and report fem_progress, fem_exit_code and "
        "fem_timed_out.",
        {
            **EXECUTOR,
            "fem_executor_slurm_poll_interval": o(
                "float", "Seconds between two looks at the Slurm queue.", default=1
            ),
        },
    ),
    "fem_stage_out": (
        "Archive outputs and logs, bring them to the listener's host, report their paths.",
        {
            "fem_run": FEM_RUN,
            "fem_policy": FEM_POLICY,
        },
    ),
    "fem_cleanup": (
        "Remove the task's container, scratch volumes and run directory.",
        {
            "fem_run": FEM_RUN,
            "fem_policy": FEM_POLICY,
            "fem_cleanup_keep_run_dir": o(
                "bool",
                "Keep the run directory on the target host (debugging only: it may hold "
                "secrets' files until removed).",
                default=False,
            ),
        },
    ),
}


STOP = {
    "fem_execute": (
        "Stop the task's container through the executor role (playbooks/stop.yml).",
        {
            "fem_policy": FEM_POLICY,
        },
    ),
    "fem_executor_docker": (
        "Stop the task's container (cancel).",
        {
            "fem_run": FEM_RUN,
            "fem_policy": FEM_POLICY,
            "fem_executor_docker_api_timeout": ROLES["fem_executor_docker"][1][
                "fem_executor_docker_api_timeout"
            ],
        },
    ),
    "fem_executor_podman": (
        "Stop the task's container (cancel).",
        {
            "fem_run": FEM_RUN,
            "fem_policy": FEM_POLICY,
            "fem_executor_podman_api_timeout": ROLES["fem_executor_podman"][1][
                "fem_executor_podman_api_timeout"
            ],
        },
    ),
    "fem_executor_slurm": (
        "Cancel the task's Slurm job (cancel); the job stops the container.",
        {
            "fem_run": FEM_RUN,
            "fem_policy": FEM_POLICY,
        },
    ),
}


# Internal roles: no ``main``, only the entry points the built-in roles import (``tasks_from``),
# each validating what its importer passes; the contract vars were validated by the
# importer's own entry point.
INTERNAL = {
    "fem_container": {
        "run": (
            "Run the task's container on the engine fem_executor_docker or "
            "fem_executor_podman names, report fem_exit_code, fem_timed_out, fem_stopped and "
            "fem_oom_killed.",
            {
                "fem_container_engine": o(
                    "str", "The engine whose module runs the container.", required=True,
                    choices=["docker", "podman"],
                ),
                "fem_container_api_timeout": o(
                    "int", "Seconds an engine call may take (the wait for the container "
                    "excepted): the importing executor's setting.", required=True,
                ),
            },
        ),
    },
}


class _Dumper(yaml.SafeDumper):
    """Block style, indented lists, no anchors: the layout ansible-lint and people read."""

    def ignore_aliases(self, data: Any) -> bool:
        return True

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        return super().increase_indent(flow, False)


def argument_specs(role: str) -> dict[str, Any]:
    """The ``meta/argument_specs.yml`` document of built-in role ``role``."""
    if role in INTERNAL:
        return {"argument_specs": {
            entry: {"short_description": short, "options": copy.deepcopy(opts)}
            for entry, (short, opts) in INTERNAL[role].items()}}
    short, opts = ROLES[role]
    options = copy.deepcopy(opts)
    for v in options.values():
        if v.get("no_log") is False:
            v.pop("no_log")
    doc: dict[str, Any] = {"main": {"short_description": short, "options": options}}
    if role in STOP:
        doc["stop"] = {"short_description": STOP[role][0],
                       "options": copy.deepcopy(STOP[role][1])}
    return {"argument_specs": doc}


def argument_specs_text(role: str) -> str:
    return (
        "---\n# The contract vars (docs/roles.md) are described alike in every role:\n"
        "# fem_ansible/role_contract.py is their source (scripts/gen_docs.py writes this "
        "file);\n# edit it rather than this file.\n"
        + yaml.dump(argument_specs(role), Dumper=_Dumper, sort_keys=False, width=120,
                    default_flow_style=False)
    )


def _md(text: str) -> str:
    """Ansible's C(...) markup as Markdown code, for docs/roles.md."""
    out, rest = [], text
    while "C(" in rest:
        before, _, after = rest.partition("C(")
        depth, i = 1, 0
        while i < len(after) and depth:
            depth += {"(": 1, ")": -1}.get(after[i], 0)
            i += 1
        out += [before, f"`{after[:i - 1]}`"]
        rest = after[i:]
    return ("".join(out) + rest).replace("|", "\\|")


def _fields(options: dict[str, Any], prefix: str) -> list[tuple[str, dict[str, Any]]]:
    rows = []
    for name, spec in options.items():
        path = prefix + name
        rows.append((path, spec))
        inner = f"{path}[]." if spec["type"] == "list" else f"{path}."
        rows += _fields(spec.get("options", {}), inner)
    return rows


# The extra-vars docs/roles.md shows field by field.
TABLES = {"fem_task": TASK_FULL, "fem_run": FEM_RUN["options"]}


def fem_task_fields() -> list[tuple[str, dict[str, Any]]]:
    """Every field of ``fem_task`` as ``(path, spec)``, depth first; list items as
    ``name[].field``."""
    return _fields(TASK_FULL, "")


def fields_table(var: str) -> str:
    """The table of docs/roles.md of extra-var ``var`` (one of :data:`TABLES`), field by
    field."""
    lines = ["| field | type | meaning |", "|---|---|---|"]
    for path, spec in _fields(TABLES[var], ""):
        kind = spec["type"] + (f" of {spec['elements']}" if "elements" in spec else "")
        extra = ""
        if "choices" in spec:
            extra += " One of " + ", ".join(f"`{c}`" for c in spec["choices"]) + "."
        if "default" in spec:
            extra += f" Default `{spec['default']}`."
        lines.append(f"| `{path}` | {kind} | {_md(spec['description'])}{extra} |")
    return "\n".join(lines) + "\n"
