#!/usr/bin/python
# Copyright: fem-ansible developers
# SPDX-License-Identifier: Apache-2.0
"""Check a task's output size and archive its output and logs directories, in one call."""

# Ansible module layout (documentation before imports); runs on the target's Python (>= 3.8).
# ruff: noqa: E402

from __future__ import annotations

DOCUMENTATION = r"""
---
module: stage_out
short_description: Archive a fem task's output and logs directories
version_added: 1.0.0
description:
  - Refuses an output directory that takes more than O(output_bytes) of disk (blocks, at
    least one per file or directory; symbolic links counted as links, never followed) with
    RV(fem_error_code=limit_exceeded).
  - Writes C(outputs.tar.gz) of O(run_dir)/output and C(logs.tar.gz) of O(run_dir)/logs into
    O(dest), each first under a temporary name and then renamed, so a half-written archive is
    never taken for a whole one; an archive that cannot be made fails the module, saying so.
  - Entries are added one at a time, at any depth. Symbolic links are stored as links
    (nothing outside the directories gets into an archive), a file with several links once,
    sockets left out (RV(skipped)), owners as numbers, names as the bytes they are.
  - One module call instead of a size check, two archive commands and their loop, which
    matters when every module call costs a fresh interpreter.
options:
  run_dir:
    description: The task's run directory, holding C(output/) and C(logs/).
    type: path
    required: true
  dest:
    description: Directory the archives are written to (created with mode 0700 if missing).
    type: path
    required: true
  output_bytes:
    description: Largest output directory archived, in bytes.
    type: int
    required: true
author:
  - fem-ansible developers
"""

EXAMPLES = r"""
- name: Archive outputs and logs
  fem.core.stage_out:
    run_dir: /var/lib/fem-ansible/tasks/fem-site-t1
    dest: /var/lib/fem-ansible/runs/t1/archives
    output_bytes: 10737418240
"""

RETURN = r"""
output_bytes:
  description: Disk the output directory takes (blocks, at least one per inode).
  returned: always
  type: int
skipped:
  description: Entries that no archive can hold (sockets), left out.
  returned: success
  type: int
fem_error_code:
  description: C(limit_exceeded) when the output is over O(output_bytes); C(disk_full) when
    an archive cannot be written for want of space.
  returned: failure
  type: str
archives:
  description: Archive name to its path.
  returned: success
  type: dict
"""

import contextlib
import os

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.fem.core.plugins.module_utils.disk import (
    LIMIT_EXCEEDED,
    full_code,
    usage,
)
from ansible_collections.fem.core.plugins.module_utils.tree import archive

ARCHIVES = (("outputs.tar.gz", "output"), ("logs.tar.gz", "logs"))


def main():
    module = AnsibleModule(
        argument_spec={
            "run_dir": {"type": "path", "required": True},
            "dest": {"type": "path", "required": True},
            "output_bytes": {"type": "int", "required": True},
        },
        supports_check_mode=False,
    )
    run_dir, dest = module.params["run_dir"], module.params["dest"]
    size = usage([os.path.join(run_dir, "output")]).bytes
    if size > module.params["output_bytes"]:
        module.fail_json(
            msg=f"The task's output takes {size} bytes of disk, over the site's limit of "
            f"{module.params['output_bytes']} bytes (policy.limits.output_bytes); "
            "it is not archived.",
            output_bytes=size, fem_error_code=LIMIT_EXCEEDED,
        )
    if not os.path.isdir(dest):
        os.makedirs(dest, mode=0o700)
    archives, skipped = {}, 0
    for name, sub in ARCHIVES:
        final = os.path.join(dest, name)
        partial = final + ".partial"
        try:
            skipped += archive(os.path.join(run_dir, sub), partial)
        except OSError as exc:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(partial)
            # A full file system is the node's fault, not the task's (disk_full).
            module.fail_json(msg=f"The archive {name} of the task's {sub}/ cannot be made: "
                                 f"{exc}", output_bytes=size, **full_code(exc))
        os.replace(partial, final)
        archives[name] = final
    module.exit_json(changed=True, output_bytes=size, archives=archives, skipped=skipped)


if __name__ == "__main__":
    main()
