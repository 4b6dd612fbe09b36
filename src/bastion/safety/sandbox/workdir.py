"""A run's private work directory on the host (the landlock backend's; bwrap's and
gVisor's live in the sandbox's own mount namespace or Sentry and go with it).

Preferably a tmpfs mounted for the run alone (mount(2), tmpfs(5)): its size and
inode count are capped, its pages are charged to the run's memory cgroup, and
it is removed with one lazy unmount — whatever the run made inside (depth,
names, modes, flags) and whatever still holds it open. Where this process may
not mount (a container without CAP_SYS_ADMIN), a plain directory beneath the
work root, capped by the run's memory cgroup only, and emptied by
:func:`remove_tree`, which no tree can defeat: it never recurses, never follows
a link, and clears what stands in its way (modes, immutable and append-only
flags, mounts).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import stat
import struct
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path

_MS_NOSUID, _MS_NODEV = 0x2, 0x4
_MNT_DETACH = 0x2
# linux/fs.h: FS_IOC_GETFLAGS/SETFLAGS (an int, despite the "long" in the macro).
_FS_IOC_GETFLAGS, _FS_IOC_SETFLAGS = 0x80086601, 0x40086602
_FS_IMMUTABLE_FL, _FS_APPEND_FL = 0x10, 0x20
_libc = ctypes.CDLL(None, use_errno=True)


def _mount_tmpfs(path: Path, options: str) -> None:
    if _libc.mount(b"tmpfs", bytes(path), b"tmpfs", _MS_NOSUID | _MS_NODEV, options.encode()):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))


def _unmount(path: Path | str) -> bool:
    """Lazily unmount ``path`` (detached now, freed when nothing holds it)."""
    return bool(_libc.umount2(os.fsencode(path), _MNT_DETACH) == 0)


class WorkDir:
    """One run's work directory, owned by its uid, mode 0700."""

    def __init__(self, root: Path, *, uid: int, size_bytes: int, needs_cap: bool) -> None:
        """Make it; ``needs_cap``: without a mount, the run has no memory cgroup to
        count its files against either, so refuse (OSError) rather than run uncapped."""
        root.mkdir(mode=0o711, parents=True, exist_ok=True)
        self.path = root / f"run-{uuid.uuid4().hex}"
        self.path.mkdir(mode=0o700)
        try:
            inodes = max(1024, size_bytes // 4096)  # inodes take kernel memory beyond size=
            options = f"size={size_bytes},nr_inodes={inodes},mode=0700,uid={uid},gid={uid}"
            try:
                _mount_tmpfs(self.path, options)
                self.mounted = True
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.EACCES) or needs_cap:
                    raise OSError(exc.errno, f"no size-capped work dir: {exc.strerror}") from exc
                self.mounted = False
                os.chown(self.path, uid, uid)
        except BaseException:
            self.path.rmdir()
            raise

    def remove(self) -> None:
        """Remove it and everything in it; raise OSError if something is left."""
        if self.mounted and not _unmount(self.path):
            err = ctypes.get_errno()
            if err != errno.EINVAL:  # EINVAL: not a mount point (any more)
                raise OSError(err, os.strerror(err), str(self.path))
        remove_tree(self.path)


def _clear_flags(name: str, dir_fd: int) -> None:
    """Clear the immutable and append-only flags of ``name`` (needs CAP_LINUX_IMMUTABLE)."""
    with contextlib.suppress(OSError):
        fd = os.open(
            name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC,
            dir_fd=dir_fd,
        )  # fmt: skip
        try:
            buf = bytearray(fcntl.ioctl(fd, _FS_IOC_GETFLAGS, struct.pack("i", 0)))
            (flags,) = struct.unpack("i", buf)
            if flags & (_FS_IMMUTABLE_FL | _FS_APPEND_FL):
                cleared = flags & ~(_FS_IMMUTABLE_FL | _FS_APPEND_FL)
                fcntl.ioctl(fd, _FS_IOC_SETFLAGS, struct.pack("i", cleared))
        finally:
            os.close(fd)


def _unmount_at(name: str, dir_fd: int) -> None:
    _unmount(f"/proc/self/fd/{dir_fd}/{name}")


def _retrying(name: str, dir_fd: int, action: Callable[[], None]) -> None:
    """Run ``action`` on the entry ``name`` of ``dir_fd``; on EPERM/EACCES clear
    the immutable/append-only flags of the entry and its directory and open the
    directory's mode, on EBUSY unmount what is mounted there; then retry."""
    for _ in range(3):
        try:
            action()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.EACCES):
                _clear_flags(name, dir_fd)
                _clear_flags(".", dir_fd)
                os.chmod(dir_fd, 0o700)
            elif exc.errno == errno.EBUSY:
                _unmount_at(name, dir_fd)
            else:
                raise
    action()


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_dir(name: str, dir_fd: int, device: int) -> int:
    """Open the directory ``name`` of ``dir_fd``, first unmounting whatever is
    mounted on it (the walk never leaves the file system it started on)."""
    for _ in range(16):  # mounts can be stacked
        if os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_dev == device:
            break
        _unmount_at(name, dir_fd)
    else:
        raise OSError(errno.EBUSY, "cannot unmount", name)
    with contextlib.suppress(OSError):
        os.chmod(name, 0o700, dir_fd=dir_fd)  # a directory (checked above): no link
    return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)


def remove_tree(path: Path) -> None:
    """Remove ``path`` and everything beneath it; raise OSError only if something
    could not be removed.

    Iterative and flat: every subdirectory found is first moved up to ``path``
    itself (a rename within one file system), so no more than two directories
    are open at once and a chain of any depth is undone in a loop, not a
    recursion. Every operation is relative to an open directory, no link is
    followed, no mount crossed (it is unmounted first); names are taken as they are.
    """
    try:
        parent = os.open(path.parent, _DIR_FLAGS)
    except FileNotFoundError:
        return
    try:
        name = path.name
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            device = os.fstat(parent).st_dev
            if st.st_dev != device:
                _unmount_at(name, parent)  # a work dir still mounted
                device = os.stat(name, dir_fd=parent, follow_symlinks=False).st_dev
            top = _open_dir(name, parent, device)
            try:
                _empty_flat(top, device)
            finally:
                os.close(top)
            _retrying(name, parent, lambda: os.rmdir(name, dir_fd=parent))
        else:
            _retrying(name, parent, lambda: os.unlink(name, dir_fd=parent))
    finally:
        os.close(parent)


def _empty_flat(top: int, device: int) -> None:
    queue: list[str | None] = [None]  # None: ``top`` itself; else a directory moved into it
    serial = 0
    while queue:
        current = queue.pop()
        if current is None:
            fd = top
        else:
            try:
                fd = _open_dir(current, top, device)
            except FileNotFoundError:
                continue
        try:
            with os.scandir(fd) as entries:
                found = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
            for entry, is_dir in found:
                if not is_dir:
                    _retrying(entry, fd, partial(os.unlink, entry, dir_fd=fd))
                elif current is None:
                    queue.append(entry)  # already directly beneath the top
                else:
                    while True:  # a name not taken (the run is over: nothing races)
                        serial += 1
                        moved = f".bastion-rm-{serial}"
                        try:
                            os.stat(moved, dir_fd=top, follow_symlinks=False)
                        except FileNotFoundError:
                            break
                    rename = partial(os.rename, entry, moved, src_dir_fd=fd, dst_dir_fd=top)
                    _retrying(entry, fd, rename)
                    queue.append(moved)
        finally:
            if fd != top:
                os.close(fd)
        if current is not None:
            _retrying(current, top, partial(os.rmdir, current, dir_fd=top))
