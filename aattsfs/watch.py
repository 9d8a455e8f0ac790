"""Knowing that a cold file is unchanged without asking the cold tier.

Every open of a promoted file used to open and stat the cold file, in a
worker thread (a hung cold tier must not stall the daemon): on these
machines that thread hop was most of what an open cost the daemon, and a
loader opens hundreds of files. On a local filesystem the kernel can tell
instead. inotify queues an event synchronously with each change, before
the changing call returns; a directory's watch sees its names created,
removed, renamed, written or changed, and a file's own watch sees writes
and attribute changes made through any name or descriptor (another hard
link, a name since removed). So with both in place, once every pending
event has been read, a stat taken after the watches were registered, with
no event for the file or a directory above it since, is still the file as
it is: an open may use it without a cold call (docs/reliability.md,
"Opens without a cold-tier call"). What inotify does not see, a write
through a shared mapping, is bounded: no stat older than MAX_AGE is used.

The same knowledge lets the kernel keep entries, attributes and listings
longer (TRUST; fs.py): every change read is handed on (`on_change`,
`take_changes`) and invalidated in the kernel at once.

Synchronous, no trio: the trio thread reads the events and asks; only
`add` runs in worker threads (with the cold directory or file open).

A token orders stats against events: `begin()` reads the pending events
and hands out the next generation, and events read later count against
it. A stat is trusted only if no event for its path or a directory above
it was read at or after its token, and the file and each of those
directories were registered before the token. Conservative on purpose:
an overflowed queue, a directory moved, deleted or re-registered, or too
many remembered paths distrust everything known before.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
import struct
import time
from typing import Callable

from .tiers import fs_type

log = logging.getLogger(__name__)

_LIBC = ctypes.CDLL(None, use_errno=True)

IN_MODIFY = 0x2
IN_ATTRIB = 0x4
IN_CLOSE_WRITE = 0x8
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_UNMOUNT = 0x2000
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
IN_ISDIR = 0x40000000
FILE_MASK = IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_DELETE_SELF | IN_MOVE_SELF
DIR_MASK = FILE_MASK | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_ONLYDIR
NAMING = IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE  # a name now means another inode
SELF = IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT | IN_IGNORED  # the watched object itself
_EVENT = struct.Struct("iIII")

# Filesystems whose every change is made through this kernel, so inotify
# sees it. Not NFS, SMB, Ceph, 9p, virtiofs, FUSE or overlayfs: another
# host, or a lower layer, changes them behind the kernel's back.
LOCAL = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "ramfs", "f2fs",
                   "bcachefs", "jfs", "reiserfs", "nilfs2", "zfs", "vfat", "exfat", "ntfs3",
                   "hfsplus"})
MAX_AGE = 2.0  # seconds a noted stat stands in for the cold file at an open
# Seconds the kernel may cache an entry, attributes or a listing the watch
# vouches for (fs.py); every change inotify sees invalidates them at once
TRUST = 30.0
MAX_WATCHES = 16384  # inotify watches this daemon places; beyond, opens check cold
MAX_PATHS = 1 << 16  # remembered stats (and change marks) before starting over
MAX_READS = 16  # reads of the event queue in one drain (64 KiB each)


def _ancestors(rel: str) -> list[str]:
    """The directories above rel, the root ("") first."""
    parts = rel.split("/")[:-1]
    return [""] + ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]


class ColdWatch:
    def __init__(self, fd: int, root_wd: int) -> None:
        self.fd = fd
        self.gen = 1
        # watched directory -> the generation it was registered in; file ->
        # (that generation, its wd, the inode number watched)
        self._dirs: dict[str, int] = {"": 0}
        self._files: dict[str, tuple[int, int, int]] = {}
        self._wd: dict[int, tuple[str, bool]] = {root_wd: ("", True)}  # wd -> (path, is a dir)
        self._changed: dict[str, int] = {}  # path -> generation of its last event
        self._renamed: dict[str, int] = {}  # directory -> generation its names last changed
        self._known: dict[str, tuple[os.stat_result, int, float]] = {}  # path -> (stat, token, when)
        self._distrust_before = 0  # stats with older tokens are not trusted
        self._full_warned = False
        self.events = 0
        self.overflows = 0
        # Paths changed since `take_changes`, for the kernel's caches; True:
        # everything known before may have changed. `on_change` is told
        # (on the trio thread) when some arrive.
        self._pending: set[str] = set()
        self._pending_all = False
        self.on_change: Callable[[], None] = lambda: None

    @classmethod
    def start(cls, root: str, root_fd: int) -> "tuple[ColdWatch | None, str]":
        """A watch of the cold directory (its root already watched), or None
        and why not."""
        fstype = fs_type(root)
        if fstype not in LOCAL:
            return None, (f"the cold directory is on {fstype or 'an unknown filesystem'}, "
                          "which can change without this kernel seeing it")
        fd = _LIBC.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            return None, f"inotify: {os.strerror(ctypes.get_errno())}"
        wd = _add(fd, root_fd, DIR_MASK)
        if wd < 0:
            os.close(fd)
            return None, f"inotify: {os.strerror(-wd)}"
        return cls(fd, wd), ""

    def close(self) -> None:
        os.close(self.fd)

    # -- watches (add: worker threads; the rest: the trio thread) ------------

    def watching(self, rel: str, is_dir: bool = True) -> bool:
        return rel in (self._dirs if is_dir else self._files)

    def registered(self, rel_dir: str) -> int | None:
        """When rel_dir's watch was registered (None: it is not watched)."""
        return self._dirs.get(rel_dir)

    def add(self, fd: int, is_dir: bool = True) -> int | None:
        """In a worker thread: place a watch on the cold directory or file
        open as fd; its wd, for `register`."""
        if len(self._wd) >= MAX_WATCHES:
            return None
        wd = _add(self.fd, fd, DIR_MASK if is_dir else FILE_MASK)
        if wd < 0:
            if wd == -errno.ENOSPC and not self._full_warned:
                self._full_warned = True
                log.warning("no more inotify watches (fs.inotify.max_user_watches): opens "
                            "of further cold files check the cold file")
            return None
        return wd

    def register(self, wd: int | None, rel: str, is_dir: bool = True, ino: int = 0) -> None:
        """Count rel as watched from now on (stats taken before are not
        trusted through it); a file's watch is on inode `ino`, and vouches
        only for stats of that inode."""
        if wd is None or not is_dir and self._files.get(rel, (0,))[1:] == (wd, ino):
            return  # the same watch of the same file: nothing new to wait for
        old = self._wd.get(wd)
        if old is not None and old != (rel, is_dir):
            self._forget(*old)  # the same inode, known under another name now
        self._wd[wd] = (rel, is_dir)
        # A generation of its own: no two registrations share one, so a
        # directory handle can tell whether the watch is still the one that
        # was placed when it was opened (fs.Operations.readdir)
        self.gen += 1
        if is_dir:
            self._dirs[rel] = self.gen
        else:
            self._files[rel] = (self.gen, wd, ino)

    def unwatch(self, rel: str) -> None:
        """Remove the watch of the file rel (its fast copy is gone): watches
        follow the fast tier's files, not every file ever opened."""
        registered = self._files.pop(rel, None)
        if registered is not None:
            self._wd.pop(registered[1], None)
            _LIBC.inotify_rm_watch(self.fd, registered[1])

    # -- stats ---------------------------------------------------------------

    def begin(self) -> int:
        """A token for a stat about to be taken."""
        self.drain()
        self.gen += 1
        return self.gen

    def note(self, rel: str, st: os.stat_result, token: int) -> None:
        """rel's stat, taken after begin() gave `token`."""
        old = self._known.get(rel)
        if old is None or old[1] <= token:
            if len(self._known) >= MAX_PATHS:
                self._start_over()
            self._known[rel] = (st, token, time.monotonic())

    def known(self, rel: str) -> os.stat_result | None:
        """rel's last noted stat if nothing can have changed it since."""
        entry = self._known.get(rel)
        if entry is None:
            return None
        self.drain()
        st, token, when = entry
        since, _, ino = self._files.get(rel, (None, 0, 0))
        if (not self.unchanged(rel, token) or since is None or since >= token
                or st.st_ino != ino or time.monotonic() - when > MAX_AGE
                or not self.vouches_dir(rel.rpartition("/")[0], token)):
            self._known.pop(rel, None)
            return None
        return st

    def known_dir(self, rel: str) -> os.stat_result | None:
        """The directory rel's last noted stat if the watch would have seen
        any change to it since (its attributes change only through events
        on its own watch or on its names), and none came."""
        entry = self._known.get(rel)
        if entry is None or not stat.S_ISDIR(entry[0].st_mode):
            return None
        self.drain()
        st, token, _ = entry
        return st if self.vouches_listing(rel, token) else None

    def unchanged(self, rel: str, token: int) -> bool:
        """No event for rel itself was read at or after `token` (nor since
        everything was distrusted). The caller drains first."""
        return token > self._distrust_before and self._changed.get(rel, 0) < token

    def vouches_dir(self, rel_dir: str, token: int) -> bool:
        """The directory rel_dir and every one above it were watched before
        `token`, with no event for them since: a change to their names, or
        to an entry's attributes, would have been read. The caller drains."""
        for d in [*_ancestors(rel_dir), rel_dir] if rel_dir else [""]:
            since = self._dirs.get(d)
            if since is None or since >= token or not self.unchanged(d, token):
                return False
        return True

    def vouches_listing(self, rel_dir: str, token: int) -> bool:
        """`vouches_dir`, and no name in rel_dir came, went or moved at or
        after `token`: its listing, and its own attributes (link count,
        mtime), are as they were then. The caller drains."""
        return self.vouches_dir(rel_dir, token) and self._renamed.get(rel_dir, 0) < token

    def take_changes(self) -> tuple[bool, set[str]]:
        """(whether everything may have changed, the paths that did) since
        the last call."""
        out = self._pending_all, self._pending
        self._pending_all, self._pending = False, set()
        return out

    # -- events --------------------------------------------------------------

    def drain(self) -> None:
        """Read the pending events. A queue not empty after MAX_READS reads
        (more than the kernel queues at once) is being filled as fast as it
        is read: taken as overflowed, so that no caller reads forever."""
        for _ in range(MAX_READS):
            try:
                buf = os.read(self.fd, 64 * 1024)
            except BlockingIOError:
                break
            except OSError as exc:  # never: but then trust nothing
                log.warning("reading inotify events failed (%s)", exc.strerror)
                self._start_over()
                break
            off = 0
            while off < len(buf):
                wd, mask, _cookie, n = _EVENT.unpack_from(buf, off)
                name = buf[off + _EVENT.size:off + _EVENT.size + n].rstrip(b"\0")
                off += _EVENT.size + n
                self._event(wd, mask, name)
        else:
            self.overflows += 1
            self._start_over()
        if self._pending or self._pending_all:
            self.on_change()

    def _event(self, wd: int, mask: int, name: bytes) -> None:
        self.events += 1
        if mask & IN_Q_OVERFLOW:
            self.overflows += 1
            self._start_over()
            return
        watched = self._wd.get(wd)
        if watched is None:
            return  # no longer registered
        if len(self._changed) >= MAX_PATHS:
            self._start_over()
        d, is_dir = watched
        if mask & IN_IGNORED:  # the watch is gone (even the root's)
            del self._wd[wd]
            (self._dirs if is_dir else self._files).pop(d, None)
        if not is_dir:  # written, truncated, linked, renamed: through any name
            self._mark(d)
            self._known.pop(d, None)
            return
        if mask & SELF or not name:
            self._forget(d, True)
            return
        rel = f"{d}/{os.fsdecode(name)}" if d else os.fsdecode(name)
        self._mark(rel)
        if mask & NAMING:
            self._renamed[d] = self.gen
        self._known.pop(rel, None)
        if mask & IN_ISDIR:
            self._forget(rel, True)
        elif mask & NAMING:
            # the name may stand for another inode now: its file watch, on
            # the old one, says nothing of the new (a new watch is placed at
            # the next open that finds a fast copy)
            self.unwatch(rel)

    def _forget(self, rel: str, is_dir: bool) -> None:
        """rel, and for a directory everything below it: changed, and not
        trusted through its old watch again (until registered again)."""
        self._mark(rel)
        self._known.pop(rel, None)
        if not is_dir:
            self._files.pop(rel, None)
            return
        prefix = f"{rel}/" if rel else ""
        for d in [d for d in self._dirs if d == rel or d.startswith(prefix)]:
            if d:  # the root's watch lives as long as the mount
                del self._dirs[d]

    def _mark(self, rel: str) -> None:
        self._changed[rel] = self.gen
        self._pending.add(rel)

    def _start_over(self) -> None:
        self._pending_all = True
        self._distrust_before = self.gen
        self._changed.clear()
        self._renamed.clear()
        self._known.clear()

    def snapshot(self) -> dict:
        return {"directories": len(self._dirs), "events": self.events,
                "overflows": self.overflows}


def _add(inotify_fd: int, fd: int, mask: int) -> int:
    """inotify_add_watch on what fd is open on: its wd, or -errno."""
    wd = _LIBC.inotify_add_watch(inotify_fd, f"/proc/self/fd/{fd}".encode(), mask)
    return wd if wd >= 0 else -ctypes.get_errno()
