"""The FUSE adapter: pyfuse3 requests in, calls on the store, FUSEErrors out.

No policy lives here. Every handler is wrapped so that nothing but a
FUSEError can escape it (anything else would end pyfuse3's main loop).
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import stat
import time

import pyfuse3
import trio
from pyfuse3 import FUSEError

from . import control
from .namespace import ROOT, Namespace
from .store import Store

log = logging.getLogger(__name__)


def _handler(fn):
    @functools.wraps(fn)
    async def wrapper(self, *args):
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s%r", fn.__name__, args)
        try:
            return await fn(self, *args)
        except FUSEError:
            raise
        except OSError as exc:
            raise FUSEError(exc.errno or errno.EIO) from None
        except KeyError:  # an inode or handle the kernel should not know
            raise FUSEError(errno.ESTALE) from None
        except Exception:
            log.exception("internal error in %s%r", fn.__name__, args)
            raise FUSEError(errno.EIO) from None
    return wrapper


class Operations(pyfuse3.Operations):
    def __init__(self, store: Store, timeout: float = 1.0) -> None:
        super().__init__()
        self.store = store
        self.cold = store.cold
        self.ns = Namespace()
        self.timeout = timeout
        self._fh = itertools.count(1)
        self._dirs: dict[int, list[tuple[bytes, int | str]]] = {}
        self._files: dict[int, object] = {}  # fh -> store Handle, or bytes (control)
        self._versions: dict[int, tuple[int, int]] = {}  # ino -> version at last open
        self._owner = (os.getuid(), os.getgid())
        self._started_ns = time.time_ns()
        self._warned_ro = False
        if os.path.lexists(self.cold.path(control.CONTROL_NAME)):
            log.warning("the cold directory has an entry named %s; it is hidden by the "
                        "control directory of the same name", control.CONTROL_NAME)

    # -- attributes --------------------------------------------------------

    def _attr(self, ino: int, st: os.stat_result) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.entry_timeout = a.attr_timeout = self.timeout
        for name in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size",
                     "st_blksize", "st_blocks", "st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
            setattr(a, name, getattr(st, name))
        return a

    def _control_attr(self, ino: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.entry_timeout = a.attr_timeout = self.timeout
        is_dir = ino == control.CONTROL_DIR_INO
        a.st_mode = (stat.S_IFDIR | 0o555) if is_dir else (stat.S_IFREG | 0o444)
        a.st_nlink = 2 if is_dir else 1
        a.st_uid, a.st_gid = self._owner
        a.st_blksize = 4096
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self._started_ns
        return a

    def _visible_stat(self, rel: str) -> os.stat_result:
        """lstat rel, hiding links that lead out of the cold directory."""
        st = self.cold.lstat(rel)
        if stat.S_ISLNK(st.st_mode) and self.cold.readlink(rel) is None:
            log.debug("hiding %s: its link target is outside the cold directory", rel)
            raise FUSEError(errno.ENOENT)
        return st

    @staticmethod
    def _join(parent: str, name: bytes) -> str:
        name_s = os.fsdecode(name)
        return f"{parent}/{name_s}" if parent else name_s

    # -- namespace ---------------------------------------------------------

    @_handler
    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode == ROOT and name == control.CONTROL_NAME.encode():
            return self._control_attr(control.CONTROL_DIR_INO)
        if parent_inode == control.CONTROL_DIR_INO:
            ino = control.CONTROL_FILES.get(os.fsdecode(name))
            if ino is None:
                raise FUSEError(errno.ENOENT)
            return self._control_attr(ino)
        if name in (b".", b".."):
            raise FUSEError(errno.ENOENT)  # the kernel resolves these itself
        rel = self._join(self.ns.path(parent_inode), name)
        st = self._visible_stat(rel)
        return self._attr(self.ns.lookup(rel), st)

    @_handler
    async def forget(self, inode_list):
        for ino, n in inode_list:
            if ino not in control.CONTROL_INOS:
                self.ns.forget(ino, n)
                if ino not in self.ns:
                    self._versions.pop(ino, None)

    @_handler
    async def getattr(self, inode, ctx=None):
        if inode in control.CONTROL_INOS:
            return self._control_attr(inode)
        return self._attr(inode, self.cold.lstat(self.ns.path(inode)))

    @_handler
    async def readlink(self, inode, ctx):
        target = self.cold.readlink(self.ns.path(inode))
        if target is None:
            raise FUSEError(errno.ENOENT)
        return os.fsencode(target)

    @_handler
    async def opendir(self, inode, ctx):
        if inode == control.CONTROL_DIR_INO:
            entries = [(n.encode(), ino) for n, ino in control.CONTROL_FILES.items()]
        else:
            rel = self.ns.path(inode)
            entries = [(os.fsencode(n), self._join(rel, os.fsencode(n)))
                       for n in self.cold.listdir(rel)]
            if inode == ROOT:
                entries = [e for e in entries if e[0] != control.CONTROL_NAME.encode()]
                entries.insert(0, (control.CONTROL_NAME.encode(), control.CONTROL_DIR_INO))
        fh = next(self._fh)
        self._dirs[fh] = entries  # a snapshot: offsets stay valid for this handle
        return fh

    @_handler
    async def readdir(self, fh, start_id, token):
        entries = self._dirs[fh]
        for i in range(start_id, len(entries)):
            name, target = entries[i]
            if isinstance(target, int):
                if not pyfuse3.readdir_reply(token, name, self._control_attr(target), i + 1):
                    return
                continue
            try:
                st = self._visible_stat(target)
            except (OSError, FUSEError):
                continue  # vanished since opendir, or hidden
            ino = self.ns.ino(target)
            if pyfuse3.readdir_reply(token, name, self._attr(ino, st), i + 1):
                self.ns.lookup(target)
            else:
                self.ns.forget(ino, 0)  # drop it again unless the kernel knows it
                return

    @_handler
    async def releasedir(self, fh):
        del self._dirs[fh]

    @_handler
    async def statfs(self, ctx):
        sv = os.statvfs(self.cold.root)
        out = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                     "f_ffree", "f_favail", "f_namemax"):
            setattr(out, name, getattr(sv, name))
        return out

    # -- files -------------------------------------------------------------

    @_handler
    async def open(self, inode, flags, ctx):
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            self._read_only("open for writing")
        fh = next(self._fh)
        if inode in control.CONTROL_INOS:
            self._files[fh] = control.render(self.store, control.CONTROL_NAMES[inode])
            return pyfuse3.FileInfo(fh=fh, direct_io=True)
        h = self.store.open(self.ns.path(inode), ctx.pid)
        self._files[fh] = h
        # The kernel may keep cached pages only if the file is the one it cached.
        keep = self._versions.get(inode) == h.version
        self._versions[inode] = h.version
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep)

    @_handler
    async def read(self, fh, off, size):
        h = self._files[fh]
        if isinstance(h, bytes):
            return h[off:off + size]
        return await self.store.read(h, off, size)

    @_handler
    async def release(self, fh):
        h = self._files.pop(fh)
        if not isinstance(h, bytes):
            self.store.release(h)

    async def push_to_page_cache(self, rel: str, version: tuple[int, int]) -> None:
        """Copy a file just staged into the kernel page cache of its inode,
        so that the next process's reads and mmap faults never reach the
        daemon (--push-page-cache; measured in docs/benchmarks.md). Only an
        inode the kernel knows can receive data."""
        ino = self.ns.known(rel)
        if ino is None:
            return
        try:
            pushed = await trio.to_thread.run_sync(self._push, ino, rel,
                                                   limiter=self.store.io_limiter)
        except OSError as exc:  # evicted meanwhile, or the kernel forgot the inode
            log.debug("pushing %s into the page cache stopped: %s", rel, exc)
            return
        self.store.stats.pushed_bytes += pushed
        self._versions[ino] = version  # the next open keeps the pushed pages

    def _push(self, ino: int, rel: str) -> int:
        fd = self.store.fast.open(rel)
        try:
            off = 0
            while chunk := os.pread(fd, 1 << 20, off):
                pyfuse3.notify_store(ino, off, chunk)
                off += len(chunk)
            return off
        finally:
            os.close(fd)

    # -- xattrs: the tier of every file, and actions on it ------------------

    def _regular(self, inode) -> str | None:
        if inode in control.CONTROL_INOS:
            return None
        rel = self.ns.path(inode)
        return rel if stat.S_ISREG(self.cold.lstat(rel).st_mode) else None

    @_handler
    async def getxattr(self, inode, name, ctx):
        if name.startswith((b"security.", b"system.", b"trusted.")):
            # "Not supported" (not "no such attribute") lets ls remember, per
            # device, not to ask again: see docs/inspection.md.
            raise FUSEError(errno.EOPNOTSUPP)
        rel = self._regular(inode)
        if rel is None or name not in control.XATTRS:
            raise FUSEError(pyfuse3.ENOATTR)
        return control.get_xattr(self.store, rel, name)

    @_handler
    async def listxattr(self, inode, ctx):
        return list(control.XATTRS) if self._regular(inode) is not None else []

    @_handler
    async def setxattr(self, inode, name, value, ctx):
        rel = self._regular(inode)
        if rel is None or name not in (control.XATTR_TIER, control.XATTR_PINNED):
            raise FUSEError(errno.EOPNOTSUPP)
        if ctx.uid not in (0, self._owner[0]):
            raise FUSEError(errno.EPERM)
        value = bytes(value).strip()
        if name == control.XATTR_PINNED and value in (b"0", b"1"):
            self.store.set_pinned(rel, value == b"1")
            if value == b"1":
                await self.store.warm(rel)
        elif name == control.XATTR_TIER and value == b"fast":
            await self.store.warm(rel)
        elif name == control.XATTR_TIER and value == b"cold":
            self.store.evict(rel)
        else:
            raise FUSEError(errno.EINVAL)

    # -- the write path is a later issue: refuse it clearly ----------------

    def _read_only(self, what: str):
        if not self._warned_ro:
            log.info("refused %s: aattsfs serves the cold directory read-only", what)
            self._warned_ro = True
        raise FUSEError(errno.EROFS)

    async def setattr(self, inode, attr, fields, fh, ctx):
        self._read_only("setattr")

    async def create(self, parent_inode, name, mode, flags, ctx):
        self._read_only("create")

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        self._read_only("mknod")

    async def mkdir(self, parent_inode, name, mode, ctx):
        self._read_only("mkdir")

    async def unlink(self, parent_inode, name, ctx):
        self._read_only("unlink")

    async def rmdir(self, parent_inode, name, ctx):
        self._read_only("rmdir")

    async def symlink(self, parent_inode, name, target, ctx):
        self._read_only("symlink")

    async def link(self, inode, new_parent_inode, new_name, ctx):
        self._read_only("link")

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        self._read_only("rename")

    async def write(self, fh, off, buf):
        self._read_only("write")

    async def removexattr(self, inode, name, ctx):
        self._read_only("removexattr")
