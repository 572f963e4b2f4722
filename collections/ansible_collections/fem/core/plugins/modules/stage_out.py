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
  - Refuses an output directory larger than O(output_bytes) (apparent sizes, symbolic links
    counted as links, never followed).
  - Writes C(outputs.tar.gz) of O(run_dir)/output and C(logs.tar.gz) of O(run_dir)/logs into
    O(dest), each first under a temporary name and then renamed, so a half-written archive is
    never taken for a whole one.
  - GNU tar without C(-h) stores symbolic links as links, so nothing outside the directories gets
    into an archive.
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
  description: Apparent size of the output directory.
  returned: success
  type: int
archives:
  description: Archive name to its path.
  returned: success
  type: dict
"""

import errno
import os

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.fem.core.plugins.module_utils.disk import DISK_FULL, tree_bytes

# tar's message for ENOSPC (modules run in the C locale)
ENOSPC_TEXT = os.strerror(errno.ENOSPC)

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
    size = tree_bytes(os.path.join(run_dir, "output"))
    if size > module.params["output_bytes"]:
        module.fail_json(
            msg=f"The task's output is {size} bytes, over the site's limit of "
            f"{module.params['output_bytes']} bytes (policy.limits.output_bytes); "
            "it is not archived.",
            output_bytes=size,
        )
    if not os.path.isdir(dest):
        os.makedirs(dest, mode=0o700)
    archives = {}
    for name, sub in ARCHIVES:
        final = os.path.join(dest, name)
        partial = final + ".partial"
        rc, out, err = module.run_command(
            ["tar", "--create", "--gzip", "--numeric-owner", "--file=" + partial,
             "--directory=" + os.path.join(run_dir, sub), "."])
        if rc != 0:
            # A full file system is the node's fault, not the task's (disk_full).
            full = {"fem_error_code": DISK_FULL} if ENOSPC_TEXT in err else {}
            module.fail_json(msg=f"Archiving {sub}/ failed (tar rc {rc}): {err.strip()}",
                             rc=rc, stdout=out, stderr=err, **full)
        os.replace(partial, final)
        archives[name] = final
    module.exit_json(changed=True, output_bytes=size, archives=archives)


if __name__ == "__main__":
    main()
