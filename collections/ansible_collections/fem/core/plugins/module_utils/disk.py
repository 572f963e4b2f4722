# Copyright: fem-ansible developers
# SPDX-License-Identifier: Apache-2.0
"""The one accounting of the disk a task takes on a host: its source checkout, inputs,
scratch and outputs are measured here and nowhere else, whatever their shape; and the free
space left on their file system, against the node's floor.

What counts is what the file system gives the task, not what its files claim to hold: the
blocks of every inode (``st_blocks``, directories and links included, a file with several
links once) and the inodes themselves, each at least one block (:data:`INODE_BYTES`), so
that 40,000 empty directories or files cost what 40,000 small files do (docs/decisions.md,
"Disk accounting").  Links are counted as links, never followed.
"""

# Runs on the target's Python (>= 3.8).

from __future__ import annotations

import errno
import os
import stat
from collections import namedtuple

from ansible_collections.fem.core.plugins.module_utils.tree import walk

# The error code of a task stopped for taking more disk than its limit (fem_error_code).
LIMIT_EXCEEDED = "limit_exceeded"
# The least an inode is charged: one block of ext4 and XFS, what an empty file, a link or a
# directory really takes there (its inode, its directory entry, its first block).
INODE_BYTES = 4096

Usage = namedtuple("Usage", "bytes inodes")

DISK_FULL = "disk_full"
# A write refused for want of space (a full file system, a quota).
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def usage(paths):
    """The disk ``paths`` (directories; a missing one counts 0) take together, as a
    :class:`Usage`: ``bytes`` charged (each inode's blocks, at least :data:`INODE_BYTES`)
    and the number of ``inodes``.  A directory whose mode keeps its owner out is made 0700
    to be measured (a task cannot hide bytes behind a mode)."""
    total, inodes, seen = 0, 0, set()
    for path in paths:
        for _names, _name, st, _fd, leaving in walk(path, force=True):
            if leaving:
                continue
            if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            total += charge(st)
            inodes += 1
    return Usage(total, inodes)


def charge(st):
    """What one inode with ``lstat`` ``st`` is charged."""
    return max(st.st_blocks * 512, INODE_BYTES)



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
