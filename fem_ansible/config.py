"""The site's config file (DESIGN.md §7): the model, its defaults, and loading it.

The model is a tree of frozen dataclasses; each field's ``doc`` metadata is the one place its
meaning is written, so the configuration reference in docs/ is generated from it.  Loading is
strict: an unknown key or a value of the wrong type is a :class:`ConfigError` naming the key's
full path, because a typo in a security policy must never silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import socket
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError
from .schema import NODE_ID_PATTERN, RESOURCE_FLOORS
from .sizes import parse_bytes

DEFAULT_CONFIG_PATH = "/etc/fem-ansible/config.yml"
# DESIGN.md §7: overrides are ours alone; other FEM_* variables (the original FEM-client's,
# a site's own such as FEM_HOME) belong to other programs and are ignored.
ENV_PREFIX = "FEM_ANSIBLE_"
# FEM_ANSIBLE_* variables that are not config overrides: the CLI's own (--config).
CONFIG_ENV = "FEM_ANSIBLE_CONFIG"
NOT_OVERRIDES = frozenset({CONFIG_ENV})
COLLECTION_PATTERN = r"^[a-z0-9][a-z0-9_]*\.[a-z0-9][a-z0-9_]*$"


def _doc(text: str, **kw: Any) -> Any:
    return field(metadata={"doc": text}, **kw)


@dataclass(frozen=True)
class TlsConfig:
    ca_file: str | None = _doc("CA bundle that signs the broker's certificate.", default=None)
    cert_file: str | None = _doc("Client certificate for mutual TLS.", default=None)
    key_file: str | None = _doc("Private key of the client certificate.", default=None)


@dataclass(frozen=True)
class BrokerConfig:
    url: str = _doc(
        "AMQP URL of the broker; `amqps://` for TLS.",
        default="amqp://guest:guest@127.0.0.1:5672/%2F",
    )
    tls: TlsConfig = _doc("TLS material for `amqps://`.", default_factory=TlsConfig)
    heartbeat_s: int = _doc(
        "AMQP heartbeat and node heartbeat event interval, seconds.", default=60
    )
    declare: bool = _doc(
        "Declare the topology; false checks it passively (accounts that may not declare).",
        default=True,
    )
    queue_type: Literal["classic", "quorum"] = _doc(
        "Type of the node's queues; `quorum` for RabbitMQ clusters.", default="classic"
    )


@dataclass(frozen=True)
class SlurmConfig:
    runtime: Literal["docker", "podman"] = _doc(
        "Container engine on the cluster's nodes.", default="docker"
    )
    partition: str | None = _doc("Slurm partition for task jobs.", default=None)
    account: str | None = _doc("Slurm account for task jobs.", default=None)
    qos: str | None = _doc("Slurm QoS for task jobs.", default=None)


@dataclass(frozen=True)
class PodmanConfig:
    insecure_registries: list[str] = _doc(
        "Registry hosts (`host:port`) podman pulls from without TLS verification "
        "(`--tls-verify=false`), e.g. a plain-HTTP mirror on 127.0.0.1.",
        default_factory=list,
    )


@dataclass(frozen=True)
class SshConfig:
    private_key_file: str | None = _doc(
        "Private key for SSH to inventory hosts; default the SSH agent and ~/.ssh "
        "(a host's `ansible_ssh_private_key_file` wins).",
        default=None,
    )
    known_hosts_file: str | None = _doc(
        "Known-hosts file for inventory hosts; default the listener user's ~/.ssh/known_hosts.",
        default=None,
    )
    host_key_checking: bool = _doc(
        "Refuse hosts whose key is unknown or changed (keep on outside of labs).", default=True
    )
    control_persist_s: int = _doc(
        "Seconds an idle SSH master connection stays open (`ControlPersist`), within a run "
        "and, with `keep_connections`, between runs.",
        default=60,
    )
    keep_connections: bool = _doc(
        "Keep a host's SSH master connection between runs, for at most `control_persist_s` "
        "idle: a host's next run skips the SSH handshake. Each inventory host has its own; "
        "a run's cancel never ends it (docs/hosts.md, \"Connections kept between runs\").",
        default=True,
    )


@dataclass(frozen=True)
class ExecutionConfig:
    max_parallel: int = _doc("Tasks accepted at once by this listener.", default=1)
    max_attempts: int = _doc(
        "Attempts (listener restarts included) before a task is FAILED `interrupted`.",
        default=3,
    )
    shutdown_grace_s: int = _doc(
        "On SIGTERM, how long running tasks may finish before they are left to recovery.",
        default=60,
    )
    work_dir: str = _doc(
        "Journal, per-task run dirs (archives, logs, ansible artifacts), audit log.",
        default="/var/lib/fem-ansible",
    )
    min_free_bytes: int = _doc(
        "Free-space floor under `work_dir` (bytes or `512Mi`): below it the listener takes "
        "no task (node status `accepting: false`, with the reason), and a running task whose "
        "writes take the file system below it is stopped, FAILED `disk_full`; the reserve "
        "lets the journal, the cleanup and the uploads of the tasks already there finish "
        "(docs/operating.md, \"When the node is unhealthy\").",
        default=256 * 1024**2,
    )
    keep_runs: int = _doc(
        "Finished runs whose listener-side run dir is kept (oldest removed first).", default=20
    )
    inventory: str | None = _doc(
        "Ansible inventory (file or directory); default the built-in `inventory/localhost.yml`.",
        default=None,
    )
    target: str = _doc("Inventory host or group tasks run on by default.", default="localhost")
    roles_path: list[str] = _doc(
        "Site role directories, searched before the built-in roles.", default_factory=list
    )
    playbook: str | None = _doc(
        "Site playbook instead of the built-in `playbooks/task.yml`. Ansible runs in the "
        "run's own empty `project/` dir, not the playbook's: an `ansible.cfg` beside it is "
        "not read (settings belong in the environment or the inventory).", default=None
    )
    strategy: Literal["mitogen", "linear"] = _doc(
        "How Ansible runs a task playbook's modules: `mitogen` (fem.core's "
        "`mitogen_linear`, Mitogen's with its import scans kept between runs in "
        "`<work_dir>/import-scan-cache`: one persistent interpreter per host and run, a "
        "module call costs a fraction of a fresh one; docs/decisions.md) or `linear` "
        "(stock Ansible, one interpreter per "
        "module call). The short stop and cleanup runs always use `linear`. With "
        "`mitogen`, a Mitogen or ansible-core other than the pinned one is checked at "
        "start: one warning, and runs use Mitogen's own `mitogen_linear` (or `linear`).",
        default="mitogen",
    )
    resident_ansible: bool = _doc(
        "Fork each run from a resident Ansible (one per distinct Ansible environment, "
        "started with the first run that needs it) instead of starting Ansible cold: "
        "imports and set-up once, not per run. Each run is still a new process in a cgroup "
        "of its own, killed with the run; it needs a writable cgroup v2 (root, or systemd's "
        "`Delegate=yes`), else one warning and runs start cold (docs/decisions.md, \"A "
        "resident Ansible\").",
        default=True,
    )
    collections: list[str] = _doc(
        "Ansible collections (`namespace.name`, installed as Python packages, e.g. by the "
        "`ansible` package) that site roles, inventory or connection plugins use besides "
        "ansible.builtin, fem.core, community.docker and containers.podman. Runs see only "
        "these: listing every installed collection costs about a second per task "
        "(docs/decisions.md).",
        default_factory=list,
    )
    default_executor: str = _doc(
        "Executor for tasks that name none (role `fem_executor_<name>`).", default="docker"
    )
    container_uid: int = _doc(
        "User (uid, and gid) for containers whose image user is root or unset.", default=65534
    )
    slurm: SlurmConfig = _doc("Settings of the Slurm executor.", default_factory=SlurmConfig)
    podman: PodmanConfig = _doc(
        "Settings of podman (the podman executor, Slurm with runtime podman).",
        default_factory=PodmanConfig,
    )
    ssh: SshConfig = _doc(
        "SSH to inventory hosts (docs/hosts.md); hosts' `ansible_*` variables win.",
        default_factory=SshConfig,
    )


@dataclass(frozen=True)
class AllowList:
    allow: list[str] = _doc(
        "Glob patterns; `*` does not cross `/`, `**` does.", default_factory=list
    )


@dataclass(frozen=True)
class ImagePolicy:
    allow: list[str] = _doc(
        "Glob patterns matched against the normalised image reference.", default_factory=list
    )
    require_digest: bool = _doc("Accept only `…@sha256:` references.", default=False)


@dataclass(frozen=True)
class DatasetConfig:
    path: str = _doc("Host directory of the dataset, mounted read-only.")


@dataclass(frozen=True)
class LimitsConfig:
    cpus: float = _doc("Most CPUs a task may ask for.", default=1.0)
    memory: int = _doc("Most memory a task may ask for (bytes or `2Gi`).", default=2 * 1024**3)
    gpus: int = _doc("Most GPUs a task may ask for.", default=0)
    timeout_s: int = _doc("Longest container run time a task may ask for.", default=3600)
    pids: int = _doc("Process limit of every task container.", default=256)
    input_bytes: int = _doc("Most bytes of downloaded inputs.", default=1024**3)
    source_bytes: int = _doc(
        "Most disk a source checkout may take (`.git` included, blocks and inodes as "
        "`output_bytes`); git is stopped past it.", default=1024**3)
    output_bytes: int = _doc(
        "Most disk a task's outputs may take (blocks, at least 4 KiB a file or directory); "
        "while it runs, its outputs and scratch together.", default=10 * 1024**3)
    log_bytes: int = _doc("Largest container log kept (per stream).", default=100 * 1024**2)


@dataclass(frozen=True)
class DefaultsConfig:
    cpus: float | None = _doc("CPUs when the task asks none; default the limit.", default=None)
    memory: int | None = _doc(
        "Memory when the task asks none; default the limit.", default=None
    )
    timeout_s: int | None = _doc(
        "Run time when the task asks none; default the limit.", default=None
    )


@dataclass(frozen=True)
class PolicyConfig:
    images: ImagePolicy = _doc("Images tasks may run.", default_factory=ImagePolicy)
    sources: AllowList = _doc("Git repositories tasks may check out.", default_factory=AllowList)
    downloads: AllowList = _doc("URLs inputs may be downloaded from.", default_factory=AllowList)
    uploads: AllowList = _doc("URLs outputs and logs may go to.", default_factory=AllowList)
    targets: AllowList = _doc(
        "Inventory hosts or groups tasks may name (`gpu-*`: each so named); a task names "
        "one, never a pattern.",
        default_factory=lambda: AllowList(allow=["localhost"]),
    )
    executors: AllowList = _doc(
        "Executors tasks may use; each needs its role.",
        default_factory=lambda: AllowList(allow=["docker"]),
    )
    networks: AllowList = _doc(
        "Container networks besides `none` (`*` allows `host` too).",
        default_factory=AllowList,
    )
    datasets: dict[str, DatasetConfig] = _doc(
        "Datasets by name; tasks name them, never a host path.", default_factory=dict
    )
    limits: LimitsConfig = _doc("Maxima of what a task may ask.", default_factory=LimitsConfig)
    defaults: DefaultsConfig = _doc(
        "Resources of a task that asks none.", default_factory=DefaultsConfig
    )
    share_logs: bool = _doc(
        "Upload container logs; false keeps them on the node.", default=True
    )


@dataclass(frozen=True)
class SignatureConfig:
    mode: Literal["none", "hmac", "ed25519"] = _doc(
        "How task and control messages are signed.", default="none"
    )
    key_file: str | None = _doc("Shared secret for `hmac`.", default=None)
    key_files: list[str] = _doc(
        "Orchestrator public keys (PEM) for `ed25519`.", default_factory=list
    )


@dataclass(frozen=True)
class SecurityConfig:
    signature: SignatureConfig = _doc(
        "Message signatures.", default_factory=SignatureConfig
    )
    max_message_bytes: int = _doc("Largest message body accepted.", default=1048576)


@dataclass(frozen=True)
class AuditConfig:
    file: str | None = _doc(
        "Append-only JSON-lines audit log; default `<work_dir>/audit.jsonl`.", default=None
    )


@dataclass(frozen=True)
class RegistryCredentials:
    username: str = _doc("Registry user.")
    password_file: str = _doc("File holding the registry password.")


@dataclass(frozen=True)
class SourceCredentials:
    username: str = _doc("Git user.")
    token_file: str = _doc("File holding the git token.")


@dataclass(frozen=True)
class HttpConfig:
    ca_file: str | None = _doc("CA bundle for downloads and uploads.", default=None)
    proxy: str | None = _doc("HTTP(S) proxy for downloads and uploads.", default=None)
    upload_tries: int = _doc(
        "Tries of each upload before the task fails `stage_out_failed`.", default=5
    )
    retry_backoff_s: float = _doc(
        "First wait between upload tries; doubled each try, at most 30 s.", default=1.0
    )
    transfer_timeout_s: int = _doc(
        "Longest time one upload may take, all its tries and waits included: a server that "
        "answers slowly, even a byte at a time, cannot hold a slot longer; past it the task "
        "fails `stage_out_failed`.", default=3600
    )


@dataclass(frozen=True)
class LegacyMountConfig:
    source: str = _doc(
        "What is mounted: `sandbox` or `sandbox/<dir>` (the run's sandbox: writable, its "
        "files land in the sandbox after the run), `data` or `data/<dir>` (under "
        "`legacy.data_path`, read-only), or an absolute host path of the site's (read-only)."
    )
    mount: str = _doc("Where the task's container sees it.")


@dataclass(frozen=True)
class LegacyToolConfig:
    image: str | None = _doc(
        "Image the site runs for this tool (checked by `policy.images`); none with "
        "`from_task_info`.", default=None
    )
    from_task_info: bool = _doc(
        "Run the task the message's own `task_info` describes (its image, volumes, "
        "var_envs, command), as far as the policy allows; the other keys are then unused.",
        default=False,
    )
    command: list[str] | None = _doc(
        "Argv template (never a shell): `%%placeholders%%` are filled in each word; a word "
        "that is exactly `%%TASK_COMMAND%%` becomes the words of `task_info.command`; "
        "`%%token%%` is refused here (env only).", default=None
    )
    workdir: str | None = _doc("Working directory in the container.", default=None)
    params: list[str] = _doc(
        "Per-node sections of `parametric_args` this tool also reads, laid under this "
        "node's own (e.g. `[server]` for a federated server tool).", default_factory=list
    )
    env: dict[str, str] = _doc(
        "Container environment; values may hold `%%placeholders%%`; a value that is exactly "
        "`%%token%%` is passed as a secret (never in argv, logs or events).",
        default_factory=dict,
    )
    mounts: list[LegacyMountConfig] = _doc("What the task's container sees.",
                                          default_factory=list)
    network: str = _doc("Container network (`none`, or one `policy.networks` allows).",
                        default="none")
    cpus: float | None = _doc("CPUs; default the site's.", default=None)
    memory: int | None = _doc("Memory (bytes or `2Gi`); default the site's.", default=None)
    gpus: int | None = _doc("GPUs; default none.", default=None)
    timeout_s: int | None = _doc("Run time; default the site's.", default=None)


@dataclass(frozen=True)
class LegacyConfig:
    enabled: bool = _doc("Also serve the original FEM-client protocol.", default=False)
    queue: str | None = _doc("Queue of the legacy protocol; default the node id.", default=None)
    sandbox_path: str | None = _doc("Root of per-run sandboxes.", default=None)
    data_path: str | None = _doc("Site data directory, mounted read-only.", default=None)
    site_vars: dict[str, str] = _doc(
        "Values of `$NAME` placeholders in legacy tasks.", default_factory=dict
    )
    chunk_size: int = _doc(
        "Characters of the base64-encoded result per reply chunk.", default=65536
    )
    tools: dict[str, LegacyToolConfig] = _doc(
        "The site's tool catalogue (its json_launcher.json): per `tool_id` (`*`: any other) "
        "the task a `submit_run` of that tool runs; a tool not listed is refused.",
        default_factory=dict,
    )
    prefetch: int = _doc(
        "Legacy messages held unacked at once: `submit_run`s waiting for a worker slot and "
        "the control action being answered; control actions wait behind held `submit_run`s "
        "only once this many are held.", default=16
    )
    max_transfer_bytes: int = _doc(
        "Most bytes of files one `send_files` serves or one `receive_files` writes.",
        default=1024**3,
    )
    api_base_url: str | None = _doc("Value of `%%api_base_url%%` in tool templates.",
                                    default=None)
    reply: Literal["stdout", "record"] = _doc(
        "`submit_run` reply: the command's stdout JSON (as the real client), or fem-ansible's "
        "process-info record around it.", default="stdout"
    )


@dataclass(frozen=True)
class Config:
    node_id: str = _doc("This node's id (routing key of its queues).")
    listener_id: str = _doc(
        "This listener's id; default the host name.", default_factory=socket.gethostname
    )
    broker: BrokerConfig = _doc("The RabbitMQ connection.", default_factory=BrokerConfig)
    execution: ExecutionConfig = _doc(
        "How and where tasks run.", default_factory=ExecutionConfig
    )
    policy: PolicyConfig = _doc("What tasks may do.", default_factory=PolicyConfig)
    security: SecurityConfig = _doc("Message checks.", default_factory=SecurityConfig)
    audit: AuditConfig = _doc("The local audit log.", default_factory=AuditConfig)
    registries: dict[str, RegistryCredentials] = _doc(
        "Registry credentials by registry host.", default_factory=dict
    )
    sources: dict[str, SourceCredentials] = _doc(
        "Git credentials by git host.", default_factory=dict
    )
    http: HttpConfig = _doc("HTTP client settings.", default_factory=HttpConfig)
    legacy: LegacyConfig = _doc(
        "The original FEM-client protocol (DESIGN.md §9).", default_factory=LegacyConfig
    )

    @property
    def work_dir(self) -> Path:
        return Path(self.execution.work_dir)

    @property
    def audit_file(self) -> Path:
        return Path(self.audit.file) if self.audit.file else self.work_dir / "audit.jsonl"

    def resource_defaults(self) -> dict[str, Any]:
        """The resources of a task that asks none: the policy defaults, else the limits."""
        limits, defaults = self.policy.limits, self.policy.defaults
        return {
            "cpus": defaults.cpus if defaults.cpus is not None else limits.cpus,
            "memory": defaults.memory if defaults.memory is not None else limits.memory,
            "gpus": 0,
            "timeout_s": defaults.timeout_s if defaults.timeout_s is not None else limits.timeout_s,
        }


# Byte-sized fields accept `2Gi`-style strings; every other int field takes a plain integer.
_BYTE_FIELDS = {"memory", "input_bytes", "source_bytes", "output_bytes", "log_bytes",
                "max_message_bytes", "max_transfer_bytes", "min_free_bytes"}


def _convert(value: Any, hint: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], path)
    if origin is Literal:
        if value not in typing.get_args(hint):
            choices = ", ".join(map(str, typing.get_args(hint)))
            raise ConfigError(f"{path}: {value!r} is not one of {choices}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(hint)
        return [_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        _, item = typing.get_args(hint)
        return {str(k): _convert(v, item, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if path.rsplit(".", 1)[-1] in _BYTE_FIELDS:
            try:
                return parse_bytes(value)
            except ValueError as e:
                raise ConfigError(f"{path}: {e}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported type {hint}")  # pragma: no cover - model bug


def _build(cls: type, data: Any, path: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            where = f"{path}.{key}" if path else str(key)
            raise ConfigError(f"unknown config key {where!r}{_did_you_mean(key, fields)}")
    kwargs = {}
    for name, f in fields.items():
        where = f"{path}.{name}" if path else name
        if name in data and (data[name] is not None or f.default is not dataclasses.MISSING
                             or f.default_factory is dataclasses.MISSING):
            # An empty key (`targets:` with nothing under it) keeps its default: YAML reads it
            # as null, and a section's default may not be its type's empty value.
            kwargs[name] = _convert(data[name], hints[name], where)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required config key {where!r}")
    return cls(**kwargs)


def _did_you_mean(key: object, names: Iterable[str], variable: str | None = None) -> str:
    """`` (did you mean `max_parallel`?)`` for a misspelt key (issue 31); for an override
    the variable's name, ``variable`` being its part before the key."""
    close = difflib.get_close_matches(str(key), list(names), n=1, cutoff=0.7)
    if not close:
        return ""
    return f" (did you mean `{close[0] if variable is None else variable + close[0].upper()}`?)"


def _model_path(keys: list[str], variable: str) -> None:
    """Check that ``keys`` name a key of the config model, so that an override of a key
    that does not exist is an error naming the variable, not only the key."""
    hint: Any = Config
    for i, key in enumerate(keys):
        while typing.get_origin(hint) in (typing.Union, types.UnionType):
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        if dataclasses.is_dataclass(hint):
            names = {f.name for f in dataclasses.fields(hint)}
            if key not in names:
                raise ConfigError(f"{variable}: unknown config key {'.'.join(keys[:i + 1])!r}"
                                  + _did_you_mean(key, names, ENV_PREFIX + "".join(
                                      f"{k.upper()}__" for k in keys[:i])))
            hint = typing.get_type_hints(hint)[key]
        elif typing.get_origin(hint) is dict:
            hint = typing.get_args(hint)[1]
        else:
            raise ConfigError(f"{variable}: {'.'.join(keys[:i])!r} is not a mapping")


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, str]:
    """Lay ``FEM_ANSIBLE_A__B=value`` over ``data['a']['b']``; return the key paths set,
    each with the variable that set it."""
    used = {}
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name in NOT_OVERRIDES:
            continue
        keys = [k.lower() for k in name[len(ENV_PREFIX) :].split("__")]
        if not all(keys):
            raise ConfigError(f"{name}: malformed override name")
        _model_path(keys, name)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"{name}: not valid YAML: {e}") from None
        node = data
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{name}: {key!r} is not a mapping")
            node = child
        node[keys[-1]] = value
        used[".".join(keys)] = name
    return used


def load_config(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    scrub_environ: bool = False,
) -> Config:
    """Read, override and validate the config.

    :param path: the YAML file; default ``/etc/fem-ansible/config.yml``.
    :param environ: where ``FEM_ANSIBLE_*`` overrides come from; default ``os.environ``.
    :param scrub_environ: remove the overrides used from ``os.environ`` afterwards.  An
        override may hold a credential (``FEM_ANSIBLE_BROKER__URL``), and ansible-runner
        writes the whole environment into each run's artifacts, so the service drops them
        once read.
    :returns: the validated :class:`Config`.
    :raises ConfigError: naming the bad key.
    """
    path = Path(path or DEFAULT_CONFIG_PATH)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    return parse_config(text, path, environ, scrub_environ=scrub_environ)


def parse_config(text: str, path: str | os.PathLike[str],
                 environ: Mapping[str, str] | None = None, *,
                 scrub_environ: bool = False) -> Config:
    """:func:`load_config` of a config's ``text`` (``path`` names it in errors): ``init``
    checks what it is about to write before writing it."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path} is not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: expected a mapping at the top level")
    used = _apply_env(data, os.environ if environ is None else environ)
    try:
        config = _build(Config, data, "")
        _check(config)
    except ConfigError as e:
        # a bad value that came from the environment: say which variable to correct
        for key, name in used.items():
            if str(e).startswith((f"{key}:", f"{key}[")):
                raise ConfigError(f"{name}: {e}") from None
        raise
    if scrub_environ:
        for name in used.values():
            os.environ.pop(name, None)
    return config


def _check(config: Config) -> None:
    """Rules across fields, which the type model alone cannot say."""
    if not re.fullmatch(NODE_ID_PATTERN, config.node_id):
        raise ConfigError(f"node_id: {config.node_id!r} does not match {NODE_ID_PATTERN}")
    if not re.fullmatch(NODE_ID_PATTERN, config.listener_id):
        raise ConfigError(f"listener_id: {config.listener_id!r} does not match {NODE_ID_PATTERN}")
    ex = config.execution
    for name in ("max_parallel", "max_attempts", "heartbeat_s"):
        owner = config.broker if name == "heartbeat_s" else ex
        if getattr(owner, name) < 1:
            section = "broker" if owner is config.broker else "execution"
            raise ConfigError(f"{section}.{name}: must be at least 1")
    if config.http.transfer_timeout_s < 1:
        raise ConfigError("http.transfer_timeout_s: must be at least 1")
    if ex.keep_runs < 0:
        raise ConfigError("execution.keep_runs: must not be negative")
    for name in ex.collections:
        if not re.fullmatch(COLLECTION_PATTERN, name):
            raise ConfigError(f"execution.collections: {name!r} is not a collection name "
                              "(namespace.name)")
    if not config.broker.url.startswith(("amqp://", "amqps://")):
        raise ConfigError("broker.url: must start with amqp:// or amqps://")
    sig = config.security.signature
    if sig.mode == "hmac" and not sig.key_file:
        raise ConfigError("security.signature.key_file: required when mode is hmac")
    if sig.mode == "ed25519" and not sig.key_files:
        raise ConfigError("security.signature.key_files: required when mode is ed25519")
    defaults, limits = config.policy.defaults, config.policy.limits
    # A limit or default under its floor would be read by an engine as "no limit"; YAML's
    # .nan and .inf would pass every comparison.
    for name, floor in RESOURCE_FLOORS.items():
        for section, owner in (("limits", limits), ("defaults", defaults)):
            value = getattr(owner, name, None)
            if value is not None and not (math.isfinite(value) and value >= floor):
                raise ConfigError(f"policy.{section}.{name}: must be a number, at least {floor}")
    for name in ("cpus", "memory", "timeout_s"):
        value = getattr(defaults, name)
        if value is not None and value > getattr(limits, name):
            raise ConfigError(f"policy.defaults.{name}: above policy.limits.{name}")
    for name, ds in config.policy.datasets.items():
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise ConfigError(f"policy.datasets.{name}: invalid dataset name")
        if not os.path.isabs(ds.path):
            raise ConfigError(f"policy.datasets.{name}.path: must be an absolute path")


def field_docs(cls: type = Config, prefix: str = "", *, owner: Any = None,
               section_doc: str = "") -> list[tuple[str, str, str]]:
    """``(key path, default, meaning)`` for every leaf of the model, for the docs and the
    example config (docs/configuration.md, examples/config.yml).

    Defaults are read from the default instance of the section they are in (so
    ``policy.targets.allow`` shows ``[localhost]``, not ``AllowList``'s ``[]``), written as
    YAML; a one-key section (``policy.sources``) lends its own doc to its key.
    """
    rows = []
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    for f in fields:
        key = f"{prefix}{f.name}"
        hint = hints[f.name]
        doc = f.metadata.get("doc", "")
        if len(fields) == 1 and section_doc:
            doc = f"{section_doc} {doc}"
        if f.default is not dataclasses.MISSING:
            value: Any = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            value = dataclasses.MISSING
        if owner is not None:
            value = getattr(owner, f.name)
        if dataclasses.is_dataclass(hint):
            rows.extend(field_docs(hint, f"{key}.", owner=value, section_doc=doc))
            continue
        if typing.get_origin(hint) is dict:
            _, item = typing.get_args(hint)
            if dataclasses.is_dataclass(item):
                rows.extend(field_docs(item, f"{key}.<name>.", section_doc=doc))
                continue
        if value is dataclasses.MISSING:
            default = "required"
        elif f.name == "listener_id":
            default = "host name"
        elif value is None:
            default = "none"
        elif f.name in _BYTE_FIELDS and isinstance(value, int):
            default = _size_text(value)
        else:
            default = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
            default = default.removesuffix("\n...").strip()
        rows.append((key, default, doc))
    return rows


def _size_text(n: int) -> str:
    for unit, size in (("Ti", 1024**4), ("Gi", 1024**3), ("Mi", 1024**2), ("Ki", 1024)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)
