# Copyright: fem-ansible developers
# SPDX-License-Identifier: Apache-2.0
"""The one accounting of the disk a task takes on a host: its source checkout, inputs,
scratch and outputs are measured here and nowhere else, whatever their shape.

What counts is what the file system gives the task, not what its files claim to hold: the
blocks of every inode (``st_blocks``, directories and links included, a file with several
links once) and the inodes themselves, each at least one block (:data:`INODE_BYTES`), so
that 40,000 empty directories or files cost what 40,000 small files do (docs/decisions.md,
"Disk accounting").  Links are counted as links, never followed.
"""

# Runs on the target's Python (>= 3.8).

from __future__ import annotations

import stat
from collections import namedtuple

from ansible_collections.fem.core.plugins.module_utils.tree import walk

# The error code of a task stopped for taking more disk than its limit (fem_error_code).
LIMIT_EXCEEDED = "limit_exceeded"
# The least an inode is charged: one block of ext4 and XFS, what an empty file, a link or a
# directory really takes there (its inode, its directory entry, its first block).
INODE_BYTES = 4096

Usage = namedtuple("Usage", "bytes inodes")


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

