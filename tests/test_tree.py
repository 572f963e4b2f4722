"""fem.core's tree walk (module_utils/tree.py) and disk accounting (module_utils/disk.py) on
trees a hostile task could leave (issue 26): 10,000 levels deep (past Python's recursion
limit and PATH_MAX), links to the host, sockets, fifos, modes that keep the owner out,
names that are not UTF-8, hard links."""

from __future__ import annotations

import io
import os
import shutil
import socket
import stat
import sys
import tarfile
from pathlib import Path

import pytest

COLLECTIONS = Path(__file__).resolve().parents[1] / "collections"
sys.path.insert(0, str(COLLECTIONS))

from ansible_collections.fem.core.plugins.module_utils import disk, tree  # noqa: E402

DEPTH = 10_000


def deep(root: Path, depth: int = DEPTH) -> None:
    """``root``/d/d/…/d (``depth`` levels) with a file at the bottom, made by descriptor:
    its path is longer than PATH_MAX."""
    root.mkdir()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        out = os.open("bottom", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(out, b"x" * 10)
        os.close(out)
    finally:
        os.close(fd)


def test_a_tree_10000_deep_is_measured_archived_and_removed(tmp_path):
    root = tmp_path / "output"
    deep(root)
    assert sys.getrecursionlimit() < DEPTH
    found = disk.usage([root])
    assert found.inodes == DEPTH + 1
    assert found.bytes >= (DEPTH + 1) * disk.INODE_BYTES
    dest = tmp_path / "out.tar.gz"
    assert tree.archive(root, dest) == 0
    with tarfile.open(dest) as tar:
        names = tar.getnames()
    assert len(names) == DEPTH + 2 and names[-1].endswith("/d/bottom")
    assert names[-1].count("/d") == DEPTH
    tree.remove(root)
    assert not root.exists() and list(tmp_path.iterdir()) == [dest]


@pytest.fixture
def hostile(tmp_path):
    """A tree holding what a task may write: a link out to a host file and one to a host
    dir, a socket, a fifo, a dir and a file of mode 0, a non-UTF-8 name, a hard link."""
    host = tmp_path / "host"
    host.mkdir()
    (host / "secret").write_bytes(b"s" * 100_000)
    root = tmp_path / "output"
    root.mkdir()
    (root / "to-secret").symlink_to(host / "secret")
    (root / "to-host").symlink_to(host)
    os.mkfifo(root / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "sock"))
    sock.close()
    locked = root / "locked"
    (locked / "inner").mkdir(parents=True)
    (locked / "inner" / "data").write_bytes(b"d" * 8192)
    os.chmod(locked / "inner", 0)
    os.chmod(locked, 0)
    (root / "nomode").write_bytes(b"n")
    os.chmod(root / "nomode", 0)
    odd = os.fsencode(root) + b"/caf\xe9-\xff"
    with open(odd, "wb") as out:
        out.write(b"odd")
    (root / "big").write_bytes(b"b" * 65536)
    os.link(root / "big", root / "big-again")
    return tmp_path, host, root


def test_links_sockets_fifos_modes_and_names(hostile):
    tmp_path, host, root = hostile
    found = disk.usage([root])
    # to-secret, to-host, fifo, sock, locked, inner, data, nomode, odd, big (once).
    assert found.inodes == 10
    assert found.bytes < 100_000 + 10 * disk.INODE_BYTES  # the host's secret not followed
    dest = tmp_path / "out.tar.gz"
    assert tree.archive(root, dest) == 1  # the socket
    with tarfile.open(dest, encoding="utf-8", errors="surrogateescape") as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert members["./to-secret"].issym()
        assert members["./to-secret"].linkname == str(host / "secret")
        assert members["./fifo"].isfifo() and "./sock" not in members
        assert tar.extractfile(members["./locked/inner/data"]).read() == b"d" * 8192
        assert os.fsencode("./caf\udce9-\udcff") == b"./caf\xe9-\xff"
        assert tar.extractfile(members["./caf\udce9-\udcff"]).read() == b"odd"
        links = [members["./big"], members["./big-again"]]
        assert sorted(m.type for m in links) == [tarfile.REGTYPE, tarfile.LNKTYPE]
    tree.remove(root)
    assert not root.exists()
    assert (host / "secret").read_bytes() == b"s" * 100_000


def test_directories_and_empty_files_count(tmp_path):
    """A block each at least: 2,000 empty dirs and 1,000 empty files are not zero bytes."""
    root = tmp_path / "output"
    root.mkdir()
    for i in range(2000):
        (root / f"d{i}").mkdir()
    for i in range(1000):
        (root / f"f{i}").touch()
    found = disk.usage([root, tmp_path / "missing"])
    assert found.inodes == 3000 and found.bytes >= 3000 * disk.INODE_BYTES


def test_removing_a_missing_path_or_a_link_touches_nothing_else(tmp_path):
    tree.remove(tmp_path / "missing")
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep").write_text("k")
    (tmp_path / "link").symlink_to(target)
    tree.remove(tmp_path / "link")
    assert not (tmp_path / "link").is_symlink() and (target / "keep").read_text() == "k"


def test_a_dir_moved_while_walked_stops_the_walk(tmp_path):
    root = tmp_path / "output"
    (root / "a" / "b").mkdir(parents=True)
    (root / "z").mkdir()
    with pytest.raises(tree.TreeChanged):
        for names, name, _st, _fd, leaving in tree.walk(root):
            if names == ["a"] and name == "b" and not leaving:
                os.rename(root / "a", tmp_path / "moved")


def test_empty_keeps_the_dir_and_its_mode(tmp_path):
    root = tmp_path / "src"
    deep(root, 50)
    root.chmod(0o751)
    tree.empty(root)
    assert list(root.iterdir()) == [] and stat.S_IMODE(root.stat().st_mode) == 0o751


def test_archive_reads_back_with_the_repositorys_helper(tmp_path):
    from tests.support.archives import tar_members
    root = tmp_path / "output"
    root.mkdir()
    (root / "result.txt").write_text("42\n")
    dest = tmp_path / "out.tar.gz"
    tree.archive(root, dest)
    assert tar_members(dest.read_bytes()) == {"result.txt": b"42\n"}
    assert io.BytesIO(dest.read_bytes()).read(2) == b"\x1f\x8b"


def test_the_legacy_sandbox_lists_and_replaces_deep_trees(tmp_path):
    """The listener's legacy sandbox (fem_ansible.legacy.sandbox) walks with the same code:
    a 2,000-deep tree a task left is listed, and replaced by the next outputs archive."""
    from fem_ansible.legacy import sandbox
    assert sandbox.tree is tree or sandbox.tree.walk.__code__.co_filename == tree.__file__
    dest = tmp_path / "sandbox"
    dest.mkdir()
    deep(dest / "out", 2000)
    (dest / "out-link").symlink_to(tmp_path)
    files = sandbox.list_files(dest)
    assert files == ["/".join(["out", *["d"] * 2000, "bottom"])]
    src = tmp_path / "src"
    (src / "out").mkdir(parents=True)
    (src / "out" / "new.txt").write_text("new\n")
    archive = tmp_path / "outputs.tar.gz"
    tree.archive(src, archive)
    assert sandbox.extract_outputs(archive, dest) == ["out/new.txt"]
    assert sandbox.list_files(dest) == ["out/new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "outputs.tar.gz", "sandbox", "src"]


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/usr/bin/python3").exists(),
                    reason="needs root to run as another user, and the system's Python")
def test_modes_that_keep_the_owner_out_are_changed_not_obeyed(tmp_path):
    """As a listener that is not root (the task's files its own, SECURITY.md): directories
    of mode 0, 0100 and 0500 are measured, archived and removed."""
    import subprocess
    import tempfile
    base = Path(tempfile.mkdtemp(dir="/tmp", prefix="fem-tree-"))
    try:
        base.chmod(0o755)
        root = base / "output"
        (root / "a" / "b").mkdir(parents=True)
        (root / "a" / "b" / "data").write_bytes(b"x" * 10000)
        (root / "c").mkdir()
        (root / "c" / "f").write_text("f")
        for path in [root, *root.rglob("*")]:
            os.chown(path, 65534, 65534)
        os.chmod(root / "a" / "b", 0)
        os.chmod(root / "a", 0o100)
        os.chmod(root / "c", 0o500)
        # The modules copied where nobody may read them, whatever the checkout's modes.
        utils = Path("ansible_collections/fem/core/plugins/module_utils")
        shutil.copytree(COLLECTIONS / utils, base / "lib" / utils)
        code = (f"import sys; sys.path.insert(0, {str(base / 'lib')!r})\n"
                "from ansible_collections.fem.core.plugins.module_utils import disk, tree\n"
                f"u = disk.usage([{str(root)!r}])\n"
                f"tree.archive({str(root)!r}, {str(base / 'out.tar.gz')!r})\n"
                f"tree.remove({str(root)!r})\n"
                "print(u.inodes)\n")

        def as_nobody() -> None:
            os.setgid(65534)
            os.setuid(65534)

        os.chown(base, 65534, 65534)
        # The system's Python: the tests' may sit where nobody may read it (the module
        # runs on the target's Python anyway).
        done = subprocess.run(["/usr/bin/python3", "-c", code], capture_output=True,
                              text=True, preexec_fn=as_nobody, cwd="/")
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["5"] and not root.exists()
        with tarfile.open(base / "out.tar.gz") as tar:
            assert tar.extractfile("./a/b/data").read() == b"x" * 10000
    finally:
        subprocess.run(["rm", "-rf", str(base)], check=False)


def test_stage_out_reports_an_archive_it_cannot_make(tmp_path):
    """fem.core.stage_out, run as Ansible runs a module: a logs/ dir that is not there is
    an archive that cannot be made, said so, and no partial archive is left."""
    import json
    import subprocess
    run_dir = tmp_path / "run"
    (run_dir / "output").mkdir(parents=True)
    (run_dir / "output" / "result.txt").write_text("42\n")
    dest = tmp_path / "archives"
    args = tmp_path / "args.json"
    args.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": {
        "run_dir": str(run_dir), "dest": str(dest), "output_bytes": 1 << 20}}))
    module = COLLECTIONS / "ansible_collections/fem/core/plugins/modules/stage_out.py"
    done = subprocess.run([sys.executable, str(module), str(args)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(COLLECTIONS)})
    out = json.loads(done.stdout)
    assert done.returncode == 1 and "logs.tar.gz" in out["msg"], out
    assert "cannot be made" in out["msg"], out
    assert sorted(p.name for p in dest.iterdir()) == ["outputs.tar.gz"]
