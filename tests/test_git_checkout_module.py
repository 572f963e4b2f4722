"""fem.core's ``git_checkout`` module, run as Ansible runs a module (its arguments in a JSON
file), on real repositories with real git: HEAD, branches, tags and commit ids, depth,
submodules, a directory left by an interrupted attempt, the SSH options it gives git,
versions that try to be options, and what git must not do for a task: read the host's
config, run an LFS filter, follow an HTTP redirect (issue 18)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.upload_server import UploadServer

COLLECTIONS = Path(__file__).resolve().parents[1] / "collections"
MODULE = (COLLECTIONS / "ansible_collections" / "fem" / "core" / "plugins" / "modules"
          / "git_checkout.py")
# Submodules by file:// URL (git refuses the file protocol for submodules by default).
FILE_PROTOCOL = {"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "protocol.file.allow",
                 "GIT_CONFIG_VALUE_0": "always"}


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout.strip()


def commit(work: Path, name: str) -> str:
    (work / name).write_text(f"{name}\n")
    git(work, "add", name)
    git(work, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", name)
    return git(work, "rev-parse", "HEAD")


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A repository with three commits on main (the first tagged v1, annotated), a branch
    ``feature`` off the second, and a submodule in the third."""
    root = tmp_path_factory.mktemp("repos")
    sub = root / "sub-work"
    sub.mkdir()
    git(sub, "init", "-q", "-b", "main")
    commit(sub, "in-submodule.txt")
    work = root / "work"
    work.mkdir()
    git(work, "init", "-q", "-b", "main")
    first = commit(work, "first.txt")
    git(work, "-c", "user.name=t", "-c", "user.email=t@t", "tag", "-a", "-m", "v1", "v1")
    second = commit(work, "second.txt")
    git(work, "branch", "feature")
    git(work, "checkout", "-q", "feature")
    feature = commit(work, "feature.txt")
    git(work, "checkout", "-q", "main")
    subprocess.run(["git", "submodule", "add", "-q", f"file://{sub}", "sub"], cwd=work,
                   check=True, env={**os.environ, **FILE_PROTOCOL})
    third = commit(work, "third.txt")
    bare = root / "repo.git"
    git(root, "clone", "-q", "--bare", str(work), str(bare))
    return {"url": f"file://{bare}", "first": first, "second": second, "third": third,
            "feature": feature}


def checkout(tmp_path: Path, env: dict[str, str] | None = None, **args: Any
             ) -> tuple[int, dict[str, Any]]:
    argfile = tmp_path / "args.json"
    argfile.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": args}))
    done = subprocess.run([sys.executable, str(MODULE), str(argfile)], capture_output=True,
                          text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(COLLECTIONS), **(env or {})})
    return done.returncode, json.loads(done.stdout)


def test_head_is_the_default_branch_shallow(repo, tmp_path: Path):
    dest = tmp_path / "src"
    rc, out = checkout(tmp_path, repo=repo["url"], dest=str(dest), depth=1)
    assert rc == 0 and out["after"] == repo["third"] and out["changed"], out
    assert (dest / "third.txt").is_file() and (dest / ".git" / "shallow").is_file()
    assert git(dest, "rev-list", "--count", "HEAD") == "1"
    assert not (dest / "sub" / "in-submodule.txt").exists()  # submodules only when asked


def test_a_branch_and_an_annotated_tag(repo, tmp_path: Path):
    rc, out = checkout(tmp_path, repo=repo["url"], dest=str(tmp_path / "b"), version="feature",
                       depth=1)
    assert rc == 0 and out["after"] == repo["feature"], out
    assert (tmp_path / "b" / "feature.txt").is_file()
    rc, out = checkout(tmp_path, repo=repo["url"], dest=str(tmp_path / "t"), version="v1",
                       depth=1)
    assert rc == 0 and out["after"] == repo["first"], out  # the commit, not the tag object
    assert not (tmp_path / "t" / "second.txt").exists()


def test_a_commit_id_gets_the_full_history_whatever_the_depth(repo, tmp_path: Path):
    dest = tmp_path / "src"
    rc, out = checkout(tmp_path, repo=repo["url"], dest=str(dest), version=repo["second"][:10],
                       depth=1)
    assert rc == 0 and out["after"] == repo["second"], out
    assert not (dest / ".git" / "shallow").exists() and not (dest / "third.txt").exists()


def test_an_unknown_version_fails_and_says_which(repo, tmp_path: Path):
    for version in ("no-such-ref", "deadbeef"):
        rc, out = checkout(tmp_path, repo=repo["url"], dest=str(tmp_path / version),
                           version=version, depth=1)
        assert rc == 1 and out["failed"] and version in out["msg"], out


def test_what_an_interrupted_attempt_left_is_replaced(repo, tmp_path: Path):
    dest = tmp_path / "src"
    (dest / ".git").mkdir(parents=True)
    (dest / ".git" / "HEAD").write_text("garbage\n")
    (dest / "stale.txt").write_text("from the last attempt\n")
    dest.chmod(0o755)
    rc, out = checkout(tmp_path, repo=repo["url"], dest=str(dest), depth=1)
    assert rc == 0 and out["after"] == repo["third"], out
    assert not (dest / "stale.txt").exists() and dest.stat().st_mode & 0o777 == 0o755


def test_submodules_and_umask(repo, tmp_path: Path):
    dest = tmp_path / "src"
    old = os.umask(0o077)
    try:
        rc, out = checkout(tmp_path, FILE_PROTOCOL, repo=repo["url"], dest=str(dest),
                           recursive=True, umask="0022")
    finally:
        os.umask(old)
    assert rc == 0, out
    assert (dest / "sub" / "in-submodule.txt").read_text() == "in-submodule.txt\n"
    assert (dest / "third.txt").stat().st_mode & 0o777 == 0o644


def test_a_checkout_past_max_bytes_is_stopped(tmp_path: Path):
    """Issue 26: a repository that packs small and checks out large (8 MiB of one line
    repeated, in 4 files) with ``max_bytes`` 1 MiB: git is stopped, the module fails
    ``limit_exceeded`` with the figure, and no more than the limit and one measure's worth
    of git's writing landed; under the limit the figure is reported."""
    work = tmp_path / "big"
    work.mkdir()
    git(work, "init", "-q", "-b", "main")
    for i in range(4):
        (work / f"f{i}.txt").write_bytes(b"AAAAAAAAAAAAAAA\n" * (1 << 17))
    git(work, "add", ".")
    git(work, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "big")
    dest = tmp_path / "src"
    rc, out = checkout(tmp_path, repo=f"file://{work}", dest=str(dest), max_bytes=1 << 20)
    assert rc == 1 and out["fem_error_code"] == "limit_exceeded", out
    assert "policy.limits.source_bytes" in out["msg"] and out["source_bytes"] > 1 << 20
    landed = sum(f.stat().st_blocks * 512 for f in dest.rglob("*") if f.is_file())
    assert landed <= (1 << 20) + (2 << 20), landed
    rc, out = checkout(tmp_path, repo=f"file://{work}", dest=str(dest), max_bytes=64 << 20)
    assert rc == 0 and out["source_bytes"] > 8 << 20, out


def test_ssh_gets_the_options(tmp_path: Path):
    """git starts ``ssh`` with the module's options: a stand-in ``ssh`` on PATH records
    its arguments (and fails, as a refused key would)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "ssh-args"
    (bin_dir / "ssh").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {record}\nexit 255\n')
    (bin_dir / "ssh").chmod(0o755)
    rc, out = checkout(tmp_path, {"PATH": f"{bin_dir}:{os.environ['PATH']}"},
                       repo="ssh://git@127.0.0.1:2222/lab/x.git", dest=str(tmp_path / "src"),
                       ssh_opts="-o BatchMode=yes", accept_newhostkey=True)
    assert rc == 1 and "clone" in out["msg"], out
    args = record.read_text().splitlines()
    assert "BatchMode=yes" in args and "StrictHostKeyChecking=accept-new" in args, args


@pytest.mark.parametrize("version", ["--upload-pack=touch pwned", "-b", "a b", "$(touch pwned)",
                                     "main\n", "v1\n--upload-pack=x"])
def test_a_version_is_never_an_option_or_a_shell_word(repo, tmp_path: Path, version: str):
    rc, out = checkout(tmp_path, repo=repo["url"], dest=str(tmp_path / "src"), version=version)
    assert rc == 1 and "Invalid version" in out["msg"], out
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "src").exists()


def test_a_repo_is_never_an_option(tmp_path: Path):
    rc, out = checkout(tmp_path, repo="--upload-pack=touch pwned", dest=str(tmp_path / "src"))
    assert rc == 1 and "Invalid repository" in out["msg"], out
    assert not (tmp_path / "pwned").exists()


def test_the_hosts_git_config_is_not_read(repo, tmp_path: Path):
    """A system and a global config that would send the clone elsewhere (``insteadOf``) are
    not read: git runs without the system's, with only the run's own global config."""
    hostile = tmp_path / "hostile.gitconfig"
    hostile.write_text('[url "file:///nonexistent/"]\n    insteadOf = file://\n')
    home = tmp_path / "home"
    (home / ".config" / "git").mkdir(parents=True)
    (home / ".gitconfig").write_text(hostile.read_text())
    (home / ".config" / "git" / "config").write_text(hostile.read_text())
    env = {"GIT_CONFIG_SYSTEM": str(hostile), "HOME": str(home),
           "XDG_CONFIG_HOME": str(home / ".config")}
    # The same environment sends plain git to the hostile URL: the test can fail.
    plain = subprocess.run(["git", "ls-remote", repo["url"]], capture_output=True, text=True,
                           env={k: v for k, v in {**os.environ, **env}.items()
                                if k != "GIT_CONFIG_GLOBAL"}, check=False)
    assert plain.returncode != 0 and "nonexistent" in plain.stderr
    without_global = {k: v for k, v in os.environ.items() if k != "GIT_CONFIG_GLOBAL"}
    without_global["PYTHONPATH"] = str(COLLECTIONS)
    argfile = tmp_path / "args.json"
    argfile.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": {"repo": repo["url"],
                                                           "dest": str(tmp_path / "src")}}))
    done = subprocess.run([sys.executable, str(MODULE), str(argfile)], capture_output=True,
                          text=True, env={**without_global, **env}, cwd=tmp_path, check=False)
    out = json.loads(done.stdout)
    assert done.returncode == 0 and out["after"] == repo["third"], out


def test_no_lfs_filter_runs(tmp_path: Path):
    """A repository whose .gitattributes names the lfs filter, cloned where a config gives
    that filter a command (here the environment's, the strongest git reads besides ``-c``):
    the command never runs and the file is checked out as stored."""
    work = tmp_path / "lfs-work"
    work.mkdir()
    git(work, "init", "-q", "-b", "main")
    (work / ".gitattributes").write_text("*.bin filter=lfs diff=lfs merge=lfs -text\n")
    (work / "data.bin").write_text("version https://git-lfs.github.com/spec/v1\n")
    git(work, "add", ".")
    git(work, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "lfs")
    marker = tmp_path / "smudged"
    smudge = f"sh -c 'touch {marker}; cat'"
    env = {"GIT_CONFIG_COUNT": "3",
           "GIT_CONFIG_KEY_0": "filter.lfs.smudge", "GIT_CONFIG_VALUE_0": smudge,
           "GIT_CONFIG_KEY_1": "filter.lfs.process", "GIT_CONFIG_VALUE_1": "sh -c 'exit 1'",
           "GIT_CONFIG_KEY_2": "filter.lfs.required", "GIT_CONFIG_VALUE_2": "true"}
    rc, out = checkout(tmp_path, env, repo=f"file://{work}", dest=str(tmp_path / "src"))
    assert rc == 0, out
    assert not marker.exists()
    assert (tmp_path / "src" / "data.bin").read_text().startswith("version https://git-lfs")


def test_an_http_redirect_is_not_followed(tmp_path: Path):
    """A server answering 302 (a real HTTP server on 127.0.0.1): the clone fails and the
    redirect's target is never asked for, even when the environment's config says follow."""
    with UploadServer(tmp_path / "srv") as srv:
        target = "/moved/r.git/info/refs"
        # Plain git follows the first request's redirect: the test can fail.
        subprocess.run(["git", "ls-remote", f"{srv.url}/_redirect/moved/r.git"],
                       capture_output=True, check=False)
        assert any(r["path"] == target for r in srv.requests())
        before = len(srv.requests())
        rc, out = checkout(tmp_path, {"GIT_CONFIG_COUNT": "1",
                                      "GIT_CONFIG_KEY_0": "http.followRedirects",
                                      "GIT_CONFIG_VALUE_0": "true"},
                           repo=f"{srv.url}/_redirect/moved/r.git", dest=str(tmp_path / "src"))
        asked = [r["path"] for r in srv.requests()[before:]]
    assert rc == 1 and "clone" in out["msg"], out
    assert asked and all(p.startswith("/_redirect/") for p in asked), asked
