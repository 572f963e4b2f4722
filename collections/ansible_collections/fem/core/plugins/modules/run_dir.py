#!/usr/bin/python
# Copyright: fem-ansible developers
# SPDX-License-Identifier: Apache-2.0
"""Create a task's run directory and its subdirectories, each with its own mode, in one call."""

# Ansible module layout (documentation before imports); runs on the target's Python (>= 3.8).
# ruff: noqa: E402

from __future__ import annotations

DOCUMENTATION = r"""
---
module: run_dir
short_description: Create (or remove) a directory tree, each directory with its own mode
version_added: 1.0.0
description:
  - Creates O(path) with O(mode) and each of O(subdirs) (relative paths) with its own mode,
    in the order given, setting the mode of directories that already exist.
  - One module call instead of a loop of M(ansible.builtin.file), which matters when every
    module call costs a fresh interpreter.
  - Modes are set with chmod, so the process umask does not apply.
  - With O(state=absent) it removes O(path) and everything in it (symbolic links are removed,
    never followed); a missing O(path) is fine. Any depth, sockets, fifos, names that are
    not UTF-8 and directories whose mode keeps their owner out are removed too.
options:
  path:
    description: The directory; its missing parents are created with mode 0700.
    type: path
    required: true
  mode:
    description: Octal mode of O(path).
    type: str
    default: "0700"
  state:
    description: V(present) creates the tree, V(absent) removes it.
    type: str
    choices: [present, absent]
    default: present
  subdirs:
    description:
      - Relative path to octal mode. Missing parents of a subdir that are not listed get
        the subdir's mode. A path with C(..) or an absolute path is refused.
    type: dict
    default: {}
attributes:
  check_mode:
    support: full
author:
  - fem-ansible developers
"""

EXAMPLES = r"""
- name: Create the run directory
  fem.core.run_dir:
    path: /var/lib/fem-ansible/runs/task42
    subdirs:
      input: "0755"
      input/data: "0755"
      output: "0777"
      logs: "0700"
"""

RETURN = r"""
created:
  description: Directories created.
  returned: when O(state=present)
  type: list
  elements: str
"""

import os
import stat

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.fem.core.plugins.module_utils.tree import remove as remove_tree


def octal(module, value):
    try:
        mode = int(str(value), 8)
    except ValueError:
        module.fail_json(msg=f"Invalid mode {value!r}: give it in octal, e.g. '0755'")
    if mode > 0o7777:
        module.fail_json(msg=f"Invalid mode {value!r}")
    return mode


def ensure(module, path, mode, result):
    """Create ``path`` (and missing parents) with ``mode``; fix the mode if it differs."""
    if os.path.islink(path):
        module.fail_json(msg=f"{path} is a symbolic link, not a directory")
    if not os.path.isdir(path):
        parent = os.path.dirname(path)
        if parent and parent != path and not os.path.isdir(parent):
            ensure(module, parent, mode, result)
        if module.check_mode:
            result["created"].append(path)
            result["changed"] = True
            return
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            # Another run made it since the check (two tasks starting at once on a new work
            # dir both make <work_dir>/tasks): theirs, as if it had been there.
            if os.path.islink(path) or not os.path.isdir(path):
                raise
        else:
            result["created"].append(path)
            result["changed"] = True
    if stat.S_IMODE(os.lstat(path).st_mode) == mode:
        return
    result["changed"] = True
    if not module.check_mode:
        os.chmod(path, mode)


def remove(module, path):
    """Remove ``path`` and its content, whatever a task left there (any depth, links,
    sockets, modes; module_utils/tree.py); report whether it existed."""
    if not os.path.lexists(path):
        module.exit_json(changed=False)
    if not module.check_mode:
        try:
            remove_tree(path)
        except OSError as exc:
            module.fail_json(msg=f"Cannot remove {path}: {exc}")
    module.exit_json(changed=True)


def main():
    module = AnsibleModule(
        argument_spec={
            "path": {"type": "path", "required": True},
            "mode": {"type": "str", "default": "0700"},
            "subdirs": {"type": "dict", "default": {}},
            "state": {"type": "str", "choices": ["present", "absent"], "default": "present"},
        },
        supports_check_mode=True,
    )
    root = os.path.normpath(module.params["path"])
    if module.params["state"] == "absent":
        remove(module, root)
    result = {"changed": False, "created": []}
    try:
        ensure(module, root, octal(module, module.params["mode"]), result)
        for rel, mode in module.params["subdirs"].items():
            norm = os.path.normpath(rel)
            if os.path.isabs(norm) or norm == ".." or norm.startswith("../") or norm == ".":
                module.fail_json(msg=f"Subdir {rel!r} is not a relative path inside {root}")
            ensure(module, os.path.join(root, norm), octal(module, mode), result)
    except OSError as exc:
        module.fail_json(msg=f"Cannot create {root}: {exc}", **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
