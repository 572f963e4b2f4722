#!/usr/bin/python
# Copyright: fem-ansible developers
# SPDX-License-Identifier: Apache-2.0
"""Check out one version of a repository into an empty directory: one connection to the
git server, where ansible.builtin.git makes three."""

# Ansible module layout (documentation before imports); runs on the target's Python (>= 3.8).
# ruff: noqa: E402

from __future__ import annotations

DOCUMENTATION = r"""
---
module: git_checkout
short_description: Check out one version of a git repository into a fresh directory
version_added: 1.0.0
description:
  - Makes O(dest) hold the checkout of O(version) of O(repo), and nothing else; whatever
    O(dest) held before is removed first (an earlier, interrupted attempt of the same run).
  - One C(git clone) is the only connection to the server. M(ansible.builtin.git) first asks
    the server twice with C(git ls-remote) whether the version is a branch or a tag, even
    for C(HEAD); over the network each is a full connection (and TLS handshake).
  - O(version) C(HEAD) clones the default branch. A name is given to C(git clone --branch),
    which takes a branch or a tag. A commit id (7 to 40 hex digits) is checked out after a
    full clone, since a server need not serve a commit by its id; a branch or tag whose name
    looks like one is found by that checkout too. O(depth) applies to C(HEAD) and names.
  - Runs git with its arguments as a list, never through a shell; O(repo) and O(version)
    can never be read as options.
  - Git answers only to this module. HTTP redirects are not followed
    (C(http.followRedirects=false)), the host's git config is not read (no system config,
    C(GIT_CONFIG_NOSYSTEM); as global config only the environment's C(GIT_CONFIG_GLOBAL),
    the run's credentials file, else none; C(HOME) and C(XDG_CONFIG_HOME) an empty dir) and
    no Git LFS filter runs (C(GIT_LFS_SKIP_SMUDGE=1) and the C(filter.lfs) driver emptied).
options:
  repo:
    description: The repository URL.
    type: str
    required: true
  dest:
    description: The directory of the checkout; created if missing, emptied if not.
    type: path
    required: true
  version:
    description: C(HEAD), a branch or tag name, or a commit id.
    type: str
    default: HEAD
  depth:
    description: History depth of a C(HEAD) or name checkout; C(0) clones all of it.
    type: int
    default: 0
  recursive:
    description: Also check out the submodules, recursively (their full history).
    type: bool
    default: false
  accept_newhostkey:
    description: Over SSH, accept and record the key of a host not yet in known_hosts;
      a changed key is still refused.
    type: bool
    default: false
  ssh_opts:
    description: Options given to C(ssh), split on white space.
    type: str
  umask:
    description: Octal umask of the git processes (and so of the files they write).
    type: str
  timeout:
    description:
      - Seconds all of the module's git commands may take together; past it git and every
        process it started are killed (C(timeout) of coreutils) and the module fails.
        A server that sends a byte every few seconds is stopped by nothing else.
    type: int
    default: 1800
attributes:
  check_mode:
    support: none
notes:
  - The environment (C(GIT_CONFIG_GLOBAL) for credentials, C(GIT_TERMINAL_PROMPT)) is the
    task's, set with the C(environment) keyword.
  - Submodules are checked out by the same git, with the same settings.
author:
  - fem-ansible developers
"""

EXAMPLES = r"""
- name: Check out the source
  fem.core.git_checkout:
    repo: https://git.example.org/lab/analysis.git
    dest: /var/lib/fem-ansible/runs/task42/src
    version: v1.2
    depth: 1
    ssh_opts: -o BatchMode=yes
    umask: "0022"
"""

RETURN = r"""
after:
  description: The commit checked out (40 hex digits).
  returned: success
  type: str
before:
  description: Always null; kept for the shape of M(ansible.builtin.git)'s result.
  returned: success
  type: str
"""

import math
import os
import re
import shlex
import shutil
import time

from ansible.module_utils.basic import AnsibleModule

COMMIT = re.compile(r"^[0-9a-fA-F]{7,40}$")
# A ref name git accepts that can never be read as an option (git check-ref-format is
# stricter still, and git clone applies it).
NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_./-]*$")
# Given before every git command: a server's redirect is an error, and a repository's
# .gitattributes cannot start Git LFS (or any lfs filter a config could name).
HARDENING = ("-c", "http.followRedirects=false", "-c", "filter.lfs.smudge=",
             "-c", "filter.lfs.process=", "-c", "filter.lfs.required=false")


def git_env(ssh_command, home):
    """The variables git runs with: no system config, as global config only the run's own
    (``GIT_CONFIG_GLOBAL`` from the task's environment) else none, ``home`` (an empty dir)
    as ``HOME`` and ``XDG_CONFIG_HOME`` (whose git/attributes and git/ignore git reads even
    then), and no LFS download."""
    return {"GIT_SSH_COMMAND": ssh_command, "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.environ.get("GIT_CONFIG_GLOBAL") or os.devnull,
            "HOME": home, "XDG_CONFIG_HOME": home, "GIT_LFS_SKIP_SMUDGE": "1"}


def empty(module, dest):
    """Make ``dest`` an empty directory, keeping the directory itself (and its mode)."""
    if os.path.islink(dest) or (os.path.lexists(dest) and not os.path.isdir(dest)):
        module.fail_json(msg=f"{dest} is not a directory")
    if not os.path.isdir(dest):
        os.makedirs(dest)
        return
    for entry in os.scandir(dest):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)


def main():
    module = AnsibleModule(
        argument_spec={
            "repo": {"type": "str", "required": True},
            "dest": {"type": "path", "required": True},
            "version": {"type": "str", "default": "HEAD"},
            "depth": {"type": "int", "default": 0},
            "recursive": {"type": "bool", "default": False},
            "accept_newhostkey": {"type": "bool", "default": False},
            "ssh_opts": {"type": "str"},
            "umask": {"type": "str"},
            "timeout": {"type": "int", "default": 1800},
        },
        supports_check_mode=False,
    )
    p = module.params
    repo, dest, version, depth = p["repo"], p["dest"], p["version"], p["depth"]
    if version != "HEAD" and not NAME.fullmatch(version):
        module.fail_json(msg=f"Invalid version {version!r}: a branch, tag or commit id")
    if repo.startswith("-"):
        module.fail_json(msg=f"Invalid repository {repo!r}")
    if depth < 0:
        module.fail_json(msg=f"Invalid depth {depth}")
    if p["timeout"] < 1:
        module.fail_json(msg=f"Invalid timeout {p['timeout']}: at least 1 second")
    end = time.monotonic() + p["timeout"]
    if p["umask"] is not None:
        try:
            os.umask(int(p["umask"], 8))
        except ValueError:
            module.fail_json(msg=f"Invalid umask {p['umask']!r}: give it in octal, e.g. '0022'")
    ssh = ["ssh", *shlex.split(p["ssh_opts"] or "")]
    if p["accept_newhostkey"]:
        ssh += ["-o", "StrictHostKeyChecking=accept-new"]
    home = os.path.join(module.tmpdir, "home")  # module.tmpdir goes when the module exits
    os.mkdir(home, 0o700)
    env = git_env(shlex.join(ssh), home)
    git = module.get_bin_path("git", required=True)
    timeout = module.get_bin_path("timeout", required=True)

    def run(*args, cwd=None):
        # timeout(1) signals git's whole process group (git-remote-*, ssh), then kills it.
        left = max(1, math.ceil(end - time.monotonic()))
        rc, out, err = module.run_command(
            [timeout, "--kill-after=5", str(left), git, *HARDENING, *args], cwd=cwd,
            environ_update=env)
        if rc in (124, 137) and time.monotonic() >= end:
            module.fail_json(msg=f"git {args[0]} did not end within the {p['timeout']}s "
                                 "the checkout may take", rc=rc, cmd=shlex.join(["git", *args]))
        if rc != 0:
            module.fail_json(msg=f"git {args[0]} failed: {(err or out).strip()}", rc=rc,
                             cmd=shlex.join(["git", *args]))
        return out

    try:
        empty(module, dest)
    except OSError as exc:
        module.fail_json(msg=f"Cannot empty {dest}: {exc}")
    commit = version != "HEAD" and COMMIT.fullmatch(version)
    clone = ["clone", "--origin", "origin"]
    if depth and not commit:
        clone += ["--depth", str(depth)]
    if version != "HEAD" and not commit:
        clone += ["--branch", version]
    run(*clone, "--", repo, dest)
    if commit:
        run("checkout", "--force", "--quiet", version, cwd=dest)
    if p["recursive"]:
        run("submodule", "update", "--init", "--recursive", cwd=dest)
    module.exit_json(changed=True, before=None, after=run("rev-parse", "HEAD", cwd=dest).strip())


if __name__ == "__main__":
    main()
