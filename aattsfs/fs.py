"""The FUSE adapter: pyfuse3 requests in, calls on the store, FUSEErrors out.

No policy lives here. Every handler is wrapped so that nothing but a
FUSEError can escape it (anything else would end pyfuse3's main loop).
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import dataclasses
import errno
import functools
import itertools
import json
import logging
import math
import os
import stat
import time

import pyfuse3
import trio
from pyfuse3 import FUSEError

from . import control, passthrough
from .namespace import ROOT, Namespace
from .store import Store
from .tiers import SharedFd, same_copy, version_of
from .watch import TRUST

log = logging.getLogger(__name__)

READDIR_BATCH = 256  # entries lstat'ed per worker-thread call
COALESCE = 0.01  # seconds between rounds of cold-watch events read and invalidated
STALE_AFTER = 0.5  # seconds getattr waits for the cold tier before answering from memory
# An O_DIRECT open keeps its path's opens off its cold file for this long
# (a reader using O_DIRECT tends to use it again), on this many paths at most
DIRECT_SECONDS = 60.0
MAX_DIRECT_PATHS = 4096
OTHERS_SHARE = 0.5  # of the budget other users' passthrough opens may hold (OpenModes)
_UNREAD = object()  # an entry's attributes, not lstat'ed yet


def _cookie(name: bytes) -> int:
    """An entry's position in its directory's listing (the readdir offset),
    the same in every reading of the directory for the daemon's life: a
    reader whose listing is continued from a newer reading (the kernel's
    cached copy dropped or invalidated midway) neither repeats nor skips an
    entry that did not change. 1 is the control directory's; 0 the start."""
    return (hash(name) & ((1 << 62) - 1)) + 2


def _ordered(names: list[bytes]) -> tuple[list[bytes], list[int]]:
    """names in listing order, and their offsets (`_cookie`; one of two
    names whose cookies collide moves up by one)."""
    pairs = sorted((_cookie(n), n) for n in names)
    offs: list[int] = []
    for off, _ in pairs:
        offs.append(max(off, offs[-1] + 1) if offs else off)
    return [n for _, n in pairs], offs


def ident_of(st: os.stat_result) -> tuple[int, int, int]:
    """What one inode number of the mount stands for: a cold file *as it
    is* (its inode, ctime and size: a change in place, or a freed inode
    number the cold filesystem gives to a new file, makes another), or a
    directory. The size too, though a change moves the ctime: two changes
    within one tick of a coarse clock may leave it where it was, and the
    kernel must never hold a size other than the one an open of that
    number found, or it zero-fills a read the file is now too short for."""
    if not stat.S_ISREG(st.st_mode):
        return st.st_ino, 0, 0
    return st.st_ino, st.st_ctime_ns, st.st_size


@dataclasses.dataclass
class _Dir:
    """An open directory: its names at opendir, attributes as far as read."""
    rel: str
    fd: SharedFd | None
    names: list[bytes] | None  # None: not read yet (the kernel has a cached listing)
    offs: list[int] = dataclasses.field(default_factory=list)  # readdir offsets, ascending
    attrs: list = dataclasses.field(default_factory=list)  # or _UNREAD
    watched: int | None = None  # its watch's registration at opendir (store.cold_opendir)
    tokens: list = dataclasses.field(default_factory=list)  # per attribute (store.vouched)
    ino: int = 0


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
        self._dirs: dict[int, _Dir] = {}
        self._files: dict[int, object] = {}  # fh -> store Handle, or bytes (control)
        self._inos: dict[int, int] = {}  # fh -> inode, of the files' handles
        self._owner = (os.getuid(), os.getgid())
        # enabled once the kernel agreed (mount.py)
        self.modes = passthrough.OpenModes(frozenset({0, self._owner[0]}),
                                           int(store.core.budget * OTHERS_SHARE))
        self._versions: dict[int, tuple] = {}  # ino -> version at last open (page cache)
        # directory ino -> token of the listing the kernel may cache (opendir)
        self._listed: dict[int, int] = {}
        self._kept: set[str] = set()  # paths whose entry and attributes it may keep
        self._stats: dict[int, os.stat_result] = {}  # ino -> attributes last seen
        self._started_ns = time.time_ns()
        self._warned_ro = False
        self.control_name = b""  # the control socket's abstract name (control.serve)
        # path -> when it was last opened with O_DIRECT: no passthrough to its
        # cold file for a while (open)
        self._direct: collections.OrderedDict[str, float] = collections.OrderedDict()
        self.initialized = trio.Event()  # the kernel's INIT was answered
        if self.cold.exists(control.CONTROL_NAME):
            log.warning("the cold directory has an entry named %s; it is hidden by the "
                        "control directory of the same name", control.CONTROL_NAME)

    def init(self):
        # pyfuse3 calls this while answering INIT; the reply is written
        # before the trio loop runs another task
        self.initialized.set()

    # -- attributes --------------------------------------------------------

    def _attr(self, ino: int, st: os.stat_result,
              timeout: float | None = None) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.entry_timeout = a.attr_timeout = self.timeout if timeout is None else timeout
        for name in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size",
                     "st_blksize", "st_blocks", "st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
            setattr(a, name, getattr(st, name))
        return a

    def _control_attr(self, ino: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.entry_timeout = a.attr_timeout = self.timeout
        is_dir = ino == control.CONTROL_DIR_INO
        a.st_mode = (stat.S_IFDIR | 0o555) if is_dir else \
            (stat.S_IFREG | control.CONTROL_MODES.get(ino, 0o400))
        a.st_nlink = 2 if is_dir else 1
        a.st_uid, a.st_gid = self._owner
        a.st_blksize = 4096
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self._started_ns
        return a

    def _new_fh(self, backing: int = 0) -> int:
        """A file handle not in use. The high 32 bits carry the backing id
        of a passthrough open to the C hooks, which put it in the open
        reply (docs/passthrough.md); the low 32 bits count."""
        while True:
            fh = backing << 32 | next(self._fh) & 0xFFFFFFFF
            if fh & 0xFFFFFFFF and fh not in self._files and fh not in self._dirs:
                return fh

    async def _cold(self, fn, *args):
        return await self.store.cold_call(fn, *args)

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
        ino = self.ns.known(rel)
        if ino is not None and ino in self._stats:
            st, timeout = await self._fresh_or_known(ino, self.cold.visible_lstat)
        else:
            st, vouched = await self.store.cold_stat(self.cold.visible_lstat, rel)
            timeout = self._keep(rel, vouched)
        ino = self.ns.lookup(rel, ident_of(st))
        self._stats[ino] = st
        return self._attr(ino, st, timeout)

    @_handler
    async def forget(self, inode_list):
        for ino, n in inode_list:
            if ino not in control.CONTROL_INOS:
                rel = self.ns.path(ino) if ino in self.ns else None
                self.ns.forget(ino, n)
                if ino not in self.ns:
                    self._versions.pop(ino, None)
                    self._listed.pop(ino, None)
                    if rel is not None and self.ns.known(rel) is None:
                        self._kept.discard(rel)
                    self._stats.pop(ino, None)

    @_handler
    async def getattr(self, inode, ctx=None):
        if inode in control.CONTROL_INOS:
            return self._control_attr(inode)
        rel = self.ns.path(inode)
        st = self.store.known_dir(rel)
        if st is not None and self.ns.ident(inode) in (None, ident_of(st)):
            self._stats[inode] = st
            return self._attr(inode, st, self._keep(rel, True))
        st, timeout = await self._fresh_or_known(inode, self.cold.lstat)
        if timeout != 0 and self.ns.ident(inode) not in (None, ident_of(st)):
            # The path names another file now; this inode stands for the old
            # one, which open handles may still read: keep its attributes.
            st, timeout = self._stats.get(inode, st), 0
        self._stats[inode] = st
        return self._attr(inode, st, timeout)

    async def _fresh_or_known(self, ino: int, lstat) -> tuple[os.stat_result, float | None]:
        """(attributes, how long the kernel may keep them): fresh from the
        cold tier (watch.TRUST if the watch vouches for them, else the
        default), or if it does not answer within STALE_AFTER, the last ones
        seen (0). A stuck cold tier must not stall every path walk: the
        kernel asks for the root's attributes on each one, and it serializes
        the lookups of a directory (pyfuse3 cannot ask for parallel
        directory operations), so one hung lookup would block its whole
        directory. Names never seen still wait."""
        known = self._stats.get(ino)
        with trio.move_on_after(STALE_AFTER if known is not None else math.inf):
            rel = self.ns.path(ino)
            st, vouched = await self.store.cold_stat(lstat, rel)
            return st, self._keep(rel, vouched)
        log.debug("cold tier slow: attributes of %s served as last seen", self.ns.path(ino))
        return known, 0

    @_handler
    async def readlink(self, inode, ctx):
        try:
            target = await self.store.readlink(self.ns.path(inode))
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOENT):
                # no longer a link, or gone: the kernel looks the path up
                # again and retries once
                raise FUSEError(errno.ESTALE) from None
            raise
        if target is None:
            raise FUSEError(errno.ENOENT)
        return os.fsencode(target)

    @_handler
    async def opendir(self, inode, ctx):
        fh = self._new_fh()
        if inode == control.CONTROL_DIR_INO:
            names = [n.encode() for n in control.CONTROL_FILES]
            self._dirs[fh] = _Dir("", None, names, list(range(1, len(names) + 1)),
                                  [self._control_attr(ino) for ino in control.CONTROL_FILES.values()])
            return fh
        rel = self.ns.path(inode)
        listed = self._listed.get(inode)
        if listed and self.store.listing_current(rel, listed):
            # The kernel keeps the listing it was given until the watch sees
            # it change (invalidate_changes): no cold call unless it asks
            self._dirs[fh | passthrough.CACHE_DIR] = _Dir(rel, None, None, ino=inode)
            return fh | passthrough.CACHE_DIR
        d = await self._list(inode, rel)
        if inode in self._listed:
            fh |= passthrough.CACHE_DIR  # the C hooks turn this bit into the flags
        self._dirs[fh] = d  # a snapshot: offsets stay valid for this handle
        return fh

    async def _list(self, inode: int, rel: str) -> _Dir:
        """The cold directory rel read now; noted in _listed if the kernel
        may cache the listing."""
        fd, names, watched, listed = await self.store.cold_opendir(rel)
        if listed:
            self._listed[inode] = listed
        else:
            self._listed.pop(inode, None)
        hidden = control.CONTROL_NAME.encode() if inode == ROOT else None
        names, offs = _ordered([n for n in map(os.fsencode, names) if n != hidden])
        attrs: list = [_UNREAD] * len(names)
        if hidden:
            names, offs = [hidden, *names], [1, *offs]
            attrs.insert(0, self._control_attr(control.CONTROL_DIR_INO))
        return _Dir(rel, fd, names, offs, attrs, watched, [0] * len(names), inode)

    @_handler
    async def readdir(self, fh, start_id, token):
        d = self._dirs[fh]
        if d.names is None:  # the kernel's listing was dropped after all: read it now
            d = self._dirs[fh] = await self._list(d.ino, d.rel)
        vouched_dir: dict[int, bool] = {}  # per token, since the last await
        for i in range(bisect.bisect_right(d.offs, start_id), len(d.names)):
            if d.attrs[i] is _UNREAD:  # lstat the next batch, off the trio thread
                end = i + 1
                while end < min(len(d.names), i + READDIR_BATCH) and d.attrs[end] is _UNREAD:
                    end += 1
                batch = [os.fsdecode(n) for n in d.names[i:end]]
                d.attrs[i:end], since = await self.store.cold_stat_entries(
                    d.fd, d.rel, batch, d.watched)
                d.tokens[i:end] = [since] * (end - i)
                vouched_dir = {}
            name, attr = d.names[i], d.attrs[i]
            if attr is None:
                continue  # vanished since opendir, or hidden
            if isinstance(attr, pyfuse3.EntryAttributes):  # the control directory
                if not pyfuse3.readdir_reply(token, name, attr, d.offs[i]):
                    return
                continue
            rel = self._join(d.rel, name)
            ino = self.ns.ino(rel, ident_of(attr))
            since = d.tokens[i]
            if since and since not in vouched_dir:
                vouched_dir[since] = self.store.vouched_dir(d.rel, since)
            vouched = since and vouched_dir[since] and self.store.vouched_entry(rel, attr, since)
            if pyfuse3.readdir_reply(token, name, self._attr(ino, attr, self._keep(rel, vouched)),
                                     d.offs[i]):
                self.ns.lookup(rel, ident_of(attr))
                self._stats[ino] = attr
            else:
                self.ns.forget(ino, 0)  # drop it again unless the kernel knows it
                return

    @_handler
    async def releasedir(self, fh):
        d = self._dirs.pop(fh)
        if d.fd is not None:
            d.fd.close()

    @_handler
    async def statfs(self, ctx):
        sv = await self._cold(self.cold.statvfs)
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
        if flags & os.O_DIRECT and inode not in control.CONTROL_INOS:
            rel = self.ns.path(inode)
            self._direct[rel] = time.monotonic()
            self._direct.move_to_end(rel)
            if len(self._direct) > MAX_DIRECT_PATHS:
                self._direct.popitem(last=False)
        if inode in control.CONTROL_INOS:
            fh = self._new_fh()
            name = control.CONTROL_NAMES[inode]
            if name == "verify":  # hash every fast copy now: as long as that takes
                report = await self.store.verify_all()
                self._files[fh] = (json.dumps(report, indent=2) + "\n").encode()
            else:
                self._files[fh] = control.render(self.store, name)
            return pyfuse3.FileInfo(fh=fh, direct_io=True)
        try:
            h = await self.store.open(self.ns.path(inode), ctx.pid,
                                      functools.partial(self._check_version, inode),
                                      held=self.modes.passthrough(inode)
                                      and not self.modes.cold_file(inode),
                                      lazy_cold=self.modes.enabled)
        except FileNotFoundError:
            # The path names nothing now, or a symlink (which the daemon does
            # not follow): the kernel looks it up again and retries once
            raise FUSEError(errno.ESTALE) from None
        if self.modes.damaged(inode) or flags & os.O_DIRECT and self.modes.cold_file(inode):
            # Its live opens read a changed copy in the kernel, or (O_DIRECT)
            # the cold file, whose filesystem may refuse an unaligned buffer
            # where the daemon takes any, and a new open would have to join
            # them: give the path a new inode, and the kernel looks it up
            # again and retries (docs/passthrough.md)
            self.store.release(h)
            self.ns.retire(inode)
            raise FUSEError(errno.ESTALE)
        new_backing = not self.modes.passthrough(inode)
        backing, size = h.fast_fd, h.entry.fast_bytes
        hold = functools.partial(self.store.hold, h)
        if backing is None and h.page_cached and not self._direct_lately(h.rel):
            # Not fast, but all in the page cache: the kernel reads the cold
            # file itself, as fast as a direct reader and without a second
            # copy in this inode's page cache (docs/passthrough.md). Not for
            # a path opened with O_DIRECT lately: such an open must not join
            # it, and retried on a new inode it must not meet one again.
            backing, size, hold = h.cold_fd.fd, 0, lambda: passthrough.COLD_FILE
        # O_DIRECT: not in passthrough unless the inode already is, since the
        # kernel would then apply the backing filesystem's alignment rules
        # (EINVAL on a disk for an unaligned buffer, where the daemon takes any)
        bid = self.modes.open(inode, None if flags & os.O_DIRECT else backing, size, ctx.uid,
                              hold)
        if not bid and h.cold_fd is None:
            # Served by the daemon: keep the cold file this open found, for
            # reads after an eviction (docs/reliability.md)
            try:
                await self.store.attach_cold(h)
            except BaseException:
                self.modes.release(inode, 0)
                self.store.release(h)
                raise
        fh = self._new_fh(bid)
        self._files[fh] = h
        self._inos[fh] = inode
        if bid:
            self.store.passthrough_opened(h, cold=self.modes.cold_file(inode))
            if new_backing and self._versions.pop(inode, None) is not None:
                # pages cached-mode opens left are never read again: free them
                self.store.start_soon(self._drop_pages, inode)
            return pyfuse3.FileInfo(fh=fh, keep_cache=False)
        # The kernel may keep cached pages only if the file is the one it cached.
        keep = self._versions.get(inode) == h.version
        self._versions[inode] = h.version
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep)

    def _direct_lately(self, rel: str) -> bool:
        when = self._direct.get(rel)
        return when is not None and time.monotonic() - when < DIRECT_SECONDS

    async def invalidate_changes(self) -> None:
        """Run for the life of the mount with the cold watch on: whatever the
        kernel was allowed to keep for watch.TRUST of a path the watch saw
        change (its entry and attributes, its directory's listing) is
        invalidated in the kernel as soon as the event is read, so a change
        inotify sees shows through the mount at once. What it keeps for the
        default 1 s is left to expire: a storm of changes to a path nothing
        vouches for costs nothing here but reading the events."""
        w = self.store.watch
        if w is None:
            return
        changed = trio.Event()

        def wake() -> None:
            changed.set()

        async def read_events() -> None:  # events no open or lookup reads
            while True:
                await trio.lowlevel.wait_readable(w.fd)
                # only while the kernel keeps something, and at most every
                # COALESCE: a storm of changes must not take the thread that
                # answers the kernel (a flooded queue is taken as overflowed:
                # everything is invalidated, which stays correct)
                if self._kept or self._listed:
                    w.drain()
                await trio.sleep(COALESCE)

        w.on_change = wake
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_events)
            while True:
                await changed.wait()
                changed = trio.Event()
                everything, paths = w.take_changes()
                entries, inodes = self._kept_views(everything, paths)
                if entries or inodes:
                    self.store.stats.kernel_invalidations += len(entries) + len(inodes)
                    # in a thread: the kernel may wait for requests in flight
                    # on the entry, which this (trio) thread answers
                    await trio.to_thread.run_sync(self._invalidate, entries, inodes,
                                                  abandon_on_cancel=True)
                await trio.sleep(COALESCE)

    def _keep(self, rel: str, vouched: bool) -> float | None:
        """The timeout of a reply about rel: watch.TRUST if the watch vouched
        for it (then rel is noted, to be invalidated when it changes), else
        the default."""
        if not vouched:
            return None
        self._kept.add(rel)
        return TRUST

    def _kept_views(self, everything: bool, paths: set[str]) -> tuple[set, set]:
        """What the kernel was let keep of `paths` (all, if `everything`), no
        longer to be kept: (entries as (parent inode, name), inodes whose
        attributes or listing go)."""
        if everything:
            paths = set(self._kept) | {self.ns.path(i) for i in self._listed if i in self.ns}
        entries, inodes = set(), set()
        for rel in paths:
            parent, _, name = rel.rpartition("/")
            p = ROOT if not parent else self.ns.known(parent)
            ino = ROOT if not rel else self.ns.known(rel)
            if rel in self._kept:
                self._kept.discard(rel)
                if rel and p is not None:
                    entries.add((p, os.fsencode(name)))
                if ino is not None:
                    inodes.add(ino)
            if ino is not None and self._listed.pop(ino, None) is not None:
                inodes.add(ino)  # a directory whose listing the kernel keeps
            if rel and p is not None:  # the directory holding it: listing, mtime
                kept, listed = parent in self._kept, self._listed.pop(p, None) is not None
                if kept or listed:
                    self._kept.discard(parent)
                    inodes.add(p)
        return entries, inodes

    @staticmethod
    def _invalidate(entries: set, inodes: set) -> None:
        for parent, name in entries:
            with contextlib.suppress(OSError):  # the kernel no longer has it
                pyfuse3.invalidate_entry(parent, name)
        for ino in inodes:
            with contextlib.suppress(OSError):
                pyfuse3.invalidate_inode(ino, False)

    async def _drop_pages(self, inode: int) -> None:
        # in a thread: the kernel may wait for page locks held by readers
        # whose requests this (trio) thread answers
        with contextlib.suppress(OSError):
            await trio.to_thread.run_sync(pyfuse3.invalidate_inode, inode, False)

    def _check_version(self, inode: int, st: os.stat_result) -> None:
        """Refuse with ESTALE an open that finds a file other than the one
        this inode stands for (another file, or this one changed since):
        the kernel then looks the path up again, which gives the file as it
        is now a new inode with fresh attributes, and retries the open once.
        So the kernel never shows one file's cached pages or size for
        another's bytes (docs/reliability.md)."""
        if self.ns.ident(inode) not in (None, ident_of(st)):
            raise OSError(errno.ESTALE, "the path names another file, or a changed one")

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
            self.modes.release(self._inos.pop(fh), fh >> 32)
            self.store.release(h)

    async def push_to_page_cache(self, rel: str, version: tuple, live: bool) -> None:
        """Copy a file just committed into the kernel page cache of its
        inode, so that reads and mmap faults of its opens never reach the
        daemon: the live opens that read through the promotion (`live`), or
        the next process's opens of a staged file (--push-page-cache;
        measured in docs/benchmarks.md). Only an inode the kernel knows can
        receive data. Run at the commit, when every byte is in the copy: a
        read the kernel has asked for holds its pages locked until the
        daemon answers it, and it is answered without waiting for anything."""
        if self.modes.enabled and not live:
            return  # passthrough opens read the fast copy, never the pushed pages
        ino = self.ns.known(rel)
        e = self.store.entries.get(rel)
        known = self._stats.get(ino) if ino is not None else None
        if known is None or version_of(known) != version or e is None or not e.verified:
            return  # the kernel's inode stands for another file, or the copy is gone
        try:
            pushed = await trio.to_thread.run_sync(self._push, ino, rel, e.copy_stat,
                                                   limiter=self.store.fast_limiter,
                                                   abandon_on_cancel=True)
        except OSError as exc:  # evicted meanwhile, or the kernel forgot the inode
            log.debug("pushing %s into the page cache stopped: %s", rel, exc)
            return
        self.store.stats.pushed_bytes += pushed
        self._versions[ino] = version  # the next open keeps the pushed pages

    def _push(self, ino: int, rel: str, copy: os.stat_result) -> int:
        fd = self.store.fast.open(rel)
        try:
            if not same_copy(os.fstat(fd), copy):
                return 0  # evicted and made again meanwhile: not the bytes staged
            off = 0
            while chunk := os.pread(fd, 1 << 20, off):
                pyfuse3.notify_store(ino, off, chunk)
                off += len(chunk)
            return off
        finally:
            os.close(fd)

    # -- xattrs: the tier of every file, and actions on it ------------------

    async def _regular(self, inode) -> str | None:
        if inode in control.CONTROL_INOS:
            return None
        rel = self.ns.path(inode)
        return rel if stat.S_ISREG((await self._cold(self.cold.lstat, rel)).st_mode) else None

    @_handler
    async def getxattr(self, inode, name, ctx):
        if name.startswith((b"security.", b"system.", b"trusted.")):
            # "Not supported" (not "no such attribute") lets ls remember, per
            # device, not to ask again: see docs/inspection.md.
            raise FUSEError(errno.EOPNOTSUPP)
        if inode == pyfuse3.ROOT_INODE and name == control.XATTR_CONTROL and self.control_name:
            return self.control_name
        rel = await self._regular(inode)
        if rel is None or name not in control.XATTRS:
            raise FUSEError(pyfuse3.ENOATTR)
        return control.get_xattr(self.store, rel, name)

    @_handler
    async def listxattr(self, inode, ctx):
        if inode == pyfuse3.ROOT_INODE:
            return [control.XATTR_CONTROL] if self.control_name else []
        return list(control.XATTRS) if await self._regular(inode) is not None else []

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

    async def setxattr(self, inode, name, value, ctx):
        self._read_only("setxattr")  # actions go through the control socket

    async def removexattr(self, inode, name, ctx):
        self._read_only("removexattr")
