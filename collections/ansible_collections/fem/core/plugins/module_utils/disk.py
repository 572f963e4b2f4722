# Copyright: fem-ansible developers
# SPDX-License-Identifier: Apache-2.0
"""Measuring the dirs a task container can write (output/, scratch/) from the host: a link
the task planted there is counted as a link, never followed."""

# Runs on the target's Python (>= 3.8).

from __future__ import annotations

import os


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

