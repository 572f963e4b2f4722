"""Build fem-ansible's sdist and wheel as a release would, from a copy of the checkout in the
state scripts/demo.sh leaves it in (issue 20 item 1)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.support.harness import REPO


def checkout_after_demo(dest: Path) -> Path:
    """The git-tracked files of this checkout copied to ``dest``, plus what a demo run leaves
    behind: a git-ignored ``.fem-dev/`` whose work dir holds the collections view, a symlink
    back to ``collections/ansible_collections/fem/core``."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    view = dest / ".fem-dev/demo/work/collections-0123abcd/ansible_collections/fem"
    view.mkdir(parents=True)
    (view / "core").symlink_to(dest / "collections/ansible_collections/fem/core")
    return dest


def build(source: Path, out: Path) -> tuple[Path, Path]:
    """``python -m build`` (sdist, then the wheel from the sdist) with this venv's hatchling;
    returns (sdist, wheel)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PYTEST"))}
    done = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "-o", str(out),
                           str(source)], env=env, cwd=out, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (sdist,) = out.glob("fem_ansible-*.tar.gz")
    (wheel,) = out.glob("fem_ansible-*.whl")
    return sdist, wheel


def venv_for_another_user(dest: Path) -> Path:
    """A venv at ``dest`` that a system user can run: this test venv's interpreter may live
    where only root can reach (pyenv under /root), so ``dest`` gets Debian's python3.11 with
    this venv's site-packages added and its console scripts re-pointed at the new
    interpreter.  Returns ``dest/bin``.  Cheap (no install); a test that must prove the
    wheel installs uses a fresh venv instead."""
    subprocess.run(["/usr/bin/python3.11", "-m", "venv", "--without-pip", str(dest)],
                   check=True)
    bin_dir, here = dest / "bin", Path(sys.executable).parent
    (site_packages,) = (here.parent / "lib").glob("python3.*/site-packages")
    (target,) = (dest / "lib").glob("python3.*/site-packages")
    (target / "fem-test-venv.pth").write_text(
        f"import site; site.addsitedir({str(site_packages)!r})\n")
    shebang = re.compile(rf"#!{re.escape(str(here))}/python[0-9.]*\n")
    for script in here.iterdir():
        if script.is_file() and not script.is_symlink() and \
                shebang.match(script.read_bytes()[:200].decode(errors="replace")):
            text = shebang.sub(f"#!{bin_dir / 'python'}\n", script.read_text(), count=1)
            (bin_dir / script.name).write_text(text)
            (bin_dir / script.name).chmod(0o755)
    return bin_dir
