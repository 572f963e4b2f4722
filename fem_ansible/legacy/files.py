"""The file actions: ``send_files`` (a run's sandbox files to the orchestrator) and
``receive_files`` (files pushed into it), both capped by ``legacy.max_transfer_bytes``
(docs/legacy.md, "The other actions")."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

from ..config import Config
from ..errors import RejectedError
from . import sandbox
from .message import TASK_PREFIX, LegacyMessage, run_ids
from .replies import success


def send_files(config: Config, msg: LegacyMessage) -> Callable[[], Iterator[bytes]]:
    """The run's sandbox files (all, or the relative paths in
    ``parametric_args.files``) as the pieces of ``{action, node, status, execution_id,
    user_id, files: [{path, size, data (base64), sha256}]}``: streamed, never whole in
    memory, at most ``legacy.max_transfer_bytes`` of files."""
    eid, user = run_ids(msg)
    assert user is not None
    root = sandbox.run_root(config, user, eid)
    if not root.is_dir():
        raise RejectedError(f"no sandbox of execution {eid} for user {user} here",
                            task_id=TASK_PREFIX + eid)
    wanted = msg.parametric_args.get("files")
    if wanted is None:
        names = sandbox.list_files(root)
    elif isinstance(wanted, list):
        names = [sandbox.safe_relative(p, "parametric_args/files") for p in wanted]
    else:
        raise RejectedError("parametric_args/files: expected a list of paths")
    total = 0
    for name in names:
        fd, size = sandbox.open_file(root, name)
        os.close(fd)
        total += size
    limit = config.legacy.max_transfer_bytes
    if total > limit:
        raise RejectedError(f"send_files: {total} bytes of files, the limit is {limit} "
                            "(legacy.max_transfer_bytes); ask for fewer files",
                            task_id=TASK_PREFIX + eid)
    head = success(msg, config.node_id, execution_id=eid, user_id=user)
    return lambda: sandbox.files_json(head, root, names)


def receive_files(config: Config, msg: LegacyMessage) -> dict[str, Any]:
    """Files pushed into the run's sandbox (``parametric_args.files``: a list of
    ``{path, data (base64), sha256?}``), which the task sees read-only at
    ``/fem/received``; decoded and written a block at a time."""
    eid, user = run_ids(msg)
    assert user is not None
    files = msg.parametric_args.get("files")
    if not isinstance(files, list) or not files:
        raise RejectedError("parametric_args/files: a non-empty list is required")
    items = []
    for i, item in enumerate(files):
        where = f"parametric_args/files/{i}"
        if not isinstance(item, dict) or not isinstance(item.get("data"), str):
            raise RejectedError(f"{where}: {{path, data}} is required")
        items.append((sandbox.safe_relative(item.get("path"), f"{where}/path"), item))
    root = sandbox.run_root(config, user, eid)
    root.mkdir(parents=True, exist_ok=True, mode=0o755)
    written, left = [], config.legacy.max_transfer_bytes
    for rel, item in items:
        size, digest = sandbox.write_b64_under(root, rel, item["data"], left)
        if item.get("sha256") not in (None, digest):
            (root / rel).unlink(missing_ok=True)
            raise RejectedError(f"files: {rel!r}: sha256 does not match the data")
        left -= size
        written.append({"path": rel, "size": size, "sha256": digest})
    return success(msg, config.node_id, execution_id=eid, user_id=user, files=written)
