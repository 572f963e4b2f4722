"""``doctor``'s legacy lines, and the check a ``submit_run`` passes before anything runs.

A missing ``legacy.data_path`` used to show up only at the engine's ``create`` of the first
task, whose error named the site's host path to the orchestrator; ``doctor`` said nothing
about the legacy settings.  Here: the sandbox and data paths, and each catalogue entry's
image, network and ``$SITE_VAR``s as a task of it will need them.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path

from ..config import Config, LegacyToolConfig
from ..doctor import Check, fail, ok, warn
from ..errors import PolicyViolation
from ..policy import allowed
from .taskinfo import INPUT_DATASET

_SITE_VAR = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")


def _enterable_by(path: Path, uid: int) -> bool:
    """Whether user ``uid`` (a task's container user) may enter and read ``path``."""
    st = path.stat()
    bits = stat.S_IRUSR | stat.S_IXUSR if st.st_uid == uid else stat.S_IROTH | stat.S_IXOTH
    return st.st_mode & bits == bits


def check_legacy(config: Config) -> Iterator[Check]:
    legacy, uid = config.legacy, config.execution.container_uid
    sandbox = Path(legacy.sandbox_path or "")
    if not legacy.sandbox_path or not sandbox.is_absolute():
        yield fail("legacy sandbox", "legacy.sandbox_path is not an absolute path",
                   "set legacy.sandbox_path to the root of the per-run sandboxes")
    elif not sandbox.is_dir():
        yield fail("legacy sandbox", f"{sandbox} is not a directory",
                   f"create it for the service user: install -d -m 0755 -o fem {sandbox}")
    elif not os.access(sandbox, os.W_OK | os.X_OK):
        yield fail("legacy sandbox", f"{sandbox} is not writable by this user",
                   f"give it to the service user: chown fem {sandbox}")
    elif not _enterable_by(sandbox, uid):
        yield fail("legacy sandbox", f"{sandbox} cannot be read by the tasks' user {uid} "
                   "(files pushed with receive_files are read at /fem/received)",
                   f"chmod o+rx {sandbox}")
    else:
        yield ok("legacy sandbox", str(sandbox))
    data = Path(legacy.data_path) if legacy.data_path else None
    if data is None:
        yield ok("legacy data", "legacy.data_path is not set: tools get no data mount")
    elif not data.is_dir():
        yield fail("legacy data", f"{data} is not a directory: every submit_run that "
                   "mounts the data is refused", "mount the data there or correct "
                   "legacy.data_path")
    elif not _enterable_by(data, uid):
        yield warn("legacy data", f"{data} cannot be read by the tasks' user {uid}",
                   f"chmod o+rx {data} (or give it to uid {uid})")
    else:
        yield ok("legacy data", str(data))
    for tid, tool in legacy.tools.items():
        yield _check_tool(config, tid, tool)


def _check_tool(config: Config, tid: str, tool: LegacyToolConfig) -> Check:
    name = f"legacy tool {tid}"
    if tool.from_task_info:
        return ok(name, "runs the message's own task_info; its image, network and "
                  f"$SITE_VARs are checked per message ({len(config.legacy.site_vars)} "
                  "site var(s) defined)")
    pol = config.policy
    if tool.image and not allowed(tool.image, pol.images.allow):
        return fail(name, f"image {tool.image} is not allowed by policy.images: every "
                    "submit_run of it is refused", "add it to policy.images.allow")
    if tool.network != "none" and not allowed(tool.network, pol.networks.allow):
        return fail(name, f"network {tool.network!r} is not allowed by policy.networks: "
                    "every submit_run of it is refused", "add it to policy.networks.allow "
                    "or set the tool's network to none")
    # An env value that is exactly $NAME, as a json_launcher.json entry would pass a site
    # variable: the catalogue fills only %%placeholders%%, so it would reach the tool as
    # written.
    unknown = sorted({m.group(1) for v in tool.env.values()
                      if (m := _SITE_VAR.fullmatch(v))} - set(config.legacy.site_vars))
    if unknown:
        return warn(name, f"env ${', $'.join(unknown)} reach the tool as written: not in "
                    "legacy.site_vars, and catalogue entries fill only %%placeholders%%",
                    "write the value into the entry itself")
    for m in tool.mounts:
        if m.source.startswith("/") and not Path(m.source).is_dir():
            return fail(name, f"mount source {m.source} is not a directory: every "
                        "submit_run of it is refused", "create it or correct the entry")
    return ok(name, f"{tool.image}, network {tool.network}")


def check_datasets(task_id: str, datasets: Mapping[str, str]) -> None:
    """Refuse a run whose site directories are missing, before any container: named by
    dataset (``legacy-data``), never by the host path, which is not the orchestrator's to
    know.  The run's own sandbox (``legacy-input``) is made by the adapter.

    :raises PolicyViolation: rule ``legacy.data_path``.
    """
    for name, path in datasets.items():
        if name != INPUT_DATASET and not os.path.isdir(path):
            raise PolicyViolation("legacy.data_path", f"the site's directory for {name} is "
                                  "missing on this node", task_id=task_id)
