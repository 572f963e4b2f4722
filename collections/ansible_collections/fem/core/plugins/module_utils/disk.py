# Copyright: fem-ansible developers
# SPDX-License-Identifier: Apache-2.0
"""Measuring the dirs a task container can write (output/, scratch/) from the host: a link
the task planted there is counted as a link, never followed; and the free space left on
their file system, against the node's floor."""

# Runs on the target's Python (>= 3.8).

from __future__ import annotations

import errno
import os

DISK_FULL = "disk_full"
# A write refused for want of space (a full file system, a quota).
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def tree_bytes(path):
    """Apparent size of the files under ``path``; links count as links, never followed."""
    total = 0
    for root, _dirs, files in os.walk(path, followlinks=False):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:  # removed by the running task meanwhile
                continue
    return total



def _mount_point(path):
    path = os.path.abspath(path)
    while not os.path.ismount(path):
        path = os.path.dirname(path)
    return path


class FloorWatch:
    """Whether the file system of the task's writable dirs has less than ``min_free_bytes``
    free (the node's ``execution.min_free_bytes``): a task whose writes take it below the
    floor is stopped, so that the node keeps room for its journal, cleanup and uploads."""

    def __init__(self, p):
        dirs = p.get("watch_dirs") or []
        self.path = dirs[0] if dirs else None
        self.floor = p.get("min_free_bytes")
        self.free = self.total = None

    def breached(self):
        if self.path is None or self.floor is None or not os.path.isdir(self.path):
            return False
        st = os.statvfs(self.path)
        self.free, self.total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
        return self.free < self.floor

    @property
    def hit(self):
        """The last look found the file system below the floor."""
        return self.free is not None and self.free < self.floor

    def failure(self, name):
        """The failed module result of a container stopped for the file system's floor."""
        return {"msg": f"Task {name} filled the file system of {self.path} (mounted at "
                       f"{_mount_point(self.path)}): {self.free} bytes free of {self.total}, "
                       f"below the node's floor of {self.floor} bytes "
                       "(execution.min_free_bytes); it was stopped and nothing is archived.",
                "fem_error_code": DISK_FULL, "free_bytes": self.free,
                "total_bytes": self.total}


def full_code(exc):
    """``{"fem_error_code": "disk_full"}`` for a write refused for want of space, else {}."""
    return {"fem_error_code": DISK_FULL} if getattr(exc, "errno", None) in FULL_ERRNOS else {}
