# Copyright: fem-ansible developers
# SPDX-License-Identifier: Apache-2.0
"""Walking, archiving and removing a task's trees (output/, scratch/, src/, the run dir)
whatever their shape: a task chooses it, so nothing here may depend on it.

- No recursion on the call stack (``os.walk``, ``os.fwalk``, ``shutil.rmtree`` and
  ``tarfile.add`` recurse on Python 3.11 and die with ``RecursionError`` near 1,000
  levels): one explicit stack of pending listings.
- One directory file descriptor open at a time, moving down by name and up by ``..``
  (checked against the device and inode it came from), so no path is ever longer than one
  name: a tree deeper than ``PATH_MAX`` or than the fd limit is walked too.
- No symbolic link is followed (``O_NOFOLLOW``, ``lstat``); sockets, fifos and devices are
  entries like any other; names are whatever bytes the task wrote (``surrogateescape``).
- With ``force``, a directory whose mode keeps its owner out is made 0700 first, so a
  task cannot hide bytes from the measure, or a tree from its removal, behind a mode.
"""

# Runs on the target's Python (>= 3.8).

from __future__ import annotations

import errno
import os
import stat
import tarfile

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
# What an entry that is gone, or is no longer a directory, raises when opened as one:
# the task changed it since it was listed (only while it runs); it is skipped.
_VANISHED = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)


class TreeChanged(OSError):
    """A directory was moved while it was walked: going up did not reach its parent."""


def _open_dir(name, dir_fd, force):
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except PermissionError:
        if not force:
            raise
    # Not through a link: O_NOFOLLOW above would have failed with ELOOP, not EACCES.
    os.chmod(name, 0o700, dir_fd=dir_fd)
    return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)


def _listing(fd):
    """``(name, lstat)`` of the entries of the directory ``fd``, by name, last first (the
    walk pops them from the end)."""
    entries = []
    with os.scandir(fd) as found:
        for entry in found:
            try:
                entries.append((entry.name, entry.stat(follow_symlinks=False)))
            except FileNotFoundError:  # removed by the running task meanwhile
                continue
    entries.sort(reverse=True)
    return entries


def walk(root, force=False):
    """Every entry under ``root`` (not ``root`` itself), parents before their content.

    Yields ``(names, name, st, dir_fd, leaving)``: ``names`` the directories from ``root``
    down to the entry's parent (a list the walk reuses: copy it to keep it), ``st`` its
    ``lstat``, ``dir_fd`` its parent's file descriptor (valid until the next step), and
    ``leaving`` False; once a directory's content is done it is yielded again with
    ``leaving`` True (``dir_fd`` then its parent's again), which is when it can be
    removed.  A missing ``root`` yields nothing.

    :raises TreeChanged: when a directory was moved away while the walk was in it.
    """
    try:
        fd = os.open(root, _DIR_FLAGS)
    except OSError as exc:
        if exc.errno in _VANISHED:
            return
        raise
    names, pending, ids = [], [], []
    try:
        pending.append(_listing(fd))
        ids.append(os.fstat(fd))
        while pending:
            if not pending[-1]:
                pending.pop()
                ids.pop()
                if not names:
                    break
                parent = os.open("..", _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = parent
                here = os.fstat(fd)
                if (here.st_dev, here.st_ino) != (ids[-1].st_dev, ids[-1].st_ino):
                    raise TreeChanged(errno.ESTALE, "moved while walked", "/".join(names))
                name = names.pop()
                yield names, name, None, fd, True
                continue
            name, st = pending[-1].pop()
            yield names, name, st, fd, False
            if not stat.S_ISDIR(st.st_mode):
                continue
            try:
                child = _open_dir(name, fd, force)
            except OSError as exc:
                if exc.errno in _VANISHED:
                    continue
                raise
            os.close(fd)
            fd = child
            names.append(name)
            ids.append(os.fstat(fd))
            pending.append(_listing(fd))
    finally:
        os.close(fd)


def remove(path):
    """Remove ``path`` and everything under it; a link is removed, never followed, and a
    missing ``path`` is fine.  Modes that keep the owner out are changed, not obeyed."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return
    if stat.S_IMODE(st.st_mode) & 0o700 != 0o700:
        os.chmod(path, 0o700)
    for _names, name, st, dir_fd, leaving in walk(path, force=True):
        if leaving:
            os.rmdir(name, dir_fd=dir_fd)
        elif not stat.S_ISDIR(st.st_mode):
            os.unlink(name, dir_fd=dir_fd)
        elif stat.S_IMODE(st.st_mode) & 0o700 != 0o700:
            # Entered (0100) is not enough: its entries are unlinked (0200) and listed (0400).
            os.chmod(name, 0o700, dir_fd=dir_fd)
    os.rmdir(path)


def empty(path):
    """Remove everything under the directory ``path``, keeping ``path`` (and its mode)."""
    with os.scandir(path) as found:
        names = [entry.name for entry in found]
    for name in names:
        remove(os.path.join(path, name))


def _tarinfo(arcname, st):
    """The archive header of an entry with ``lstat`` ``st``: owners as numbers only (as
    ``tar --numeric-owner``), None for what an archive cannot hold (a socket)."""
    info = tarfile.TarInfo(arcname)
    info.mode, info.uid, info.gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
    info.mtime = int(st.st_mtime)
    kind = stat.S_IFMT(st.st_mode)
    if kind == stat.S_IFREG:
        info.type, info.size = tarfile.REGTYPE, st.st_size
    elif kind == stat.S_IFDIR:
        info.type = tarfile.DIRTYPE
    elif kind == stat.S_IFLNK:
        info.type = tarfile.SYMTYPE
    elif kind == stat.S_IFIFO:
        info.type = tarfile.FIFOTYPE
    elif kind in (stat.S_IFCHR, stat.S_IFBLK):
        info.type = tarfile.CHRTYPE if kind == stat.S_IFCHR else tarfile.BLKTYPE
        info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
    else:
        return None
    return info


def archive(root, dest):
    """Write the tree ``root`` to ``dest`` as a gzip'd tar (names ``./…``, GNU format, the
    bytes of every name kept), one entry at a time; links stored as links, a file with
    several links stored once and then as hard links to it, sockets left out.

    Returns the number of entries left out (sockets).
    """
    skipped = 0
    linked = {}
    top = os.lstat(root)
    with tarfile.open(dest, "w:gz", format=tarfile.GNU_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as tar:
        tar.addfile(_tarinfo(".", top))
        for names, name, st, dir_fd, leaving in walk(root):
            if leaving:
                continue
            arcname = "/".join([".", *names, name])
            info = _tarinfo(arcname, st)
            if info is None:
                skipped += 1
                continue
            if info.type == tarfile.SYMTYPE:
                info.linkname = os.readlink(name, dir_fd=dir_fd)
            if info.isreg() and st.st_nlink > 1:
                first = linked.setdefault((st.st_dev, st.st_ino), arcname)
                if first != arcname:
                    info.type, info.size, info.linkname = tarfile.LNKTYPE, 0, first
            if not info.isreg():
                tar.addfile(info)
                continue
            # O_NONBLOCK: a fifo put in its place since the lstat must not hang the archive.
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
            with os.fdopen(fd, "rb") as data:
                tar.addfile(info, data)
    return skipped
