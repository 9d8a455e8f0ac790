"""The tiered store: which copy serves a read, promotion, eviction, recovery.

This is the filesystem model below the FUSE adapter. It runs on the trio
thread: all state here is touched only between awaits, so it needs no locks.
Every cold-tier call runs in a worker thread under `io_limiter` (a bounded
pool), abandoned on cancellation, so a slow or hung cold tier stalls only
the requests that need it and never shutdown; fast-tier work that can take
long (verifying, committing) has its own `fast_limiter`. Small preads of a
fast copy run inline.

Promotion protocol (docs/promotion.md explains why):

1. On the first read of a file that is only in the cold tier, room for the
   whole file is *reserved* in the fast tier (evicting by policy), so the
   budget holds even while copies are in flight.
2. A `Promotion` fills a temporary file chunk by chunk, hashing the cold
   bytes it reads. A background filler walks the chunks in order at full
   speed; a demand read of a chunk that is not there yet fetches that chunk
   itself, or waits for the fetch already in flight. Either way each cold
   byte is read once, and a random read never waits for the filler.
3. Reads are served from the temporary copy as soon as their chunks are in.
4. When every chunk is in and the cold file is unchanged, the copy is read
   back and must hash to what was read from cold, chunk by chunk; only then
   is it renamed into place (the commit point), and open handles move over
   to it. On any failure the reservation is returned and handles fall back
   to the cold file they opened.
"""

from __future__ import annotations

import contextlib
import copy
import heapq
import errno
import itertools
import logging
import os
import stat
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Container

import lmdb
import trio

from . import memfloor
from .counters import Stats
from .metadata import FileRecord, MetaStore
from .procs import Stream, stream_of
from .residency import TOO_BIG, Residency
from .units import format_size
from .tiers import (ColdTier, FastTier, SharedFd, digest_of, new_digest, page_cached,
                    same_copy, version_of)
from .watch import ColdWatch

log = logging.getLogger(__name__)

CHUNK = 4 << 20
LANES = 2  # chunk copies the fillers run at once, the most urgent file first
FLUSH_INTERVAL = 1.0
WARM_WAITS = 64  # promotions warm waits to end, for their room, before it gives up
EVENT_BUFFER = 10_000  # access events waiting for the prefetcher; more are dropped
MAX_RANGES = 256  # read ranges recorded per open; the rest are counted, not listed
MAX_NAMES = 65_536  # files remembered by the link they were reached through

Version = tuple[int, int, int, int]  # size, mtime_ns, inode, ctime_ns (tiers.version_of)


def remember(cache: OrderedDict, key, value, limit: int) -> None:
    """cache[key] = value, forgetting the least recently set beyond limit."""
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > limit:
        cache.popitem(last=False)


class ColdError(OSError):
    """A promotion's read of the cold file failed. Any other error of a
    promotion is the fast tier's: its filesystem full (or out of memory, on
    tmpfs) or failing, and is never blamed on the cold tier."""


def _copy_range(src: int, dst: int, off: int, length: int) -> tuple[int, str]:
    """Copy [off, off+length) from src to dst; returns the bytes copied and
    the digest of what was read. A short write (a full fast-tier filesystem)
    is finished or raises: a gap must never look like copied data."""
    h = new_digest()
    done = 0
    while done < length:
        try:
            buf = os.pread(src, min(length - done, 1 << 20), off + done)
        except OSError as exc:
            raise ColdError(exc.errno, exc.strerror) from exc
        if not buf:
            break
        h.update(buf)
        view = memoryview(buf)
        while view:
            n = os.pwrite(dst, view, off + done)
            if n <= 0:
                raise OSError(errno.ENOSPC, "short write to the fast tier")
            view = view[n:]
            done += n
    return done, h.hexdigest()


def _verify_copy(fd: int, size: int, chunk_digests: list[str]) -> str | None:
    """Read a filled copy back: the digest of the whole copy if every chunk
    hashes to what was read from cold, else None."""
    whole = new_digest()
    for idx, expected in enumerate(chunk_digests):
        off = idx * CHUNK
        buf = os.pread(fd, min(CHUNK, size - off), off)
        if digest_of(buf) != expected:
            return None
        whole.update(buf)
    return whole.hexdigest()


def in_thread(fn: Callable, *args, fds: tuple[SharedFd, ...] = ()):
    """fn(*fd numbers of `fds`, *args) for a worker thread; each fd stays
    open until the thread is done with it, even if nobody waits any more."""
    nums = []
    try:
        for sfd in fds:
            nums.append(sfd.hold())
    except OSError:
        for sfd in fds[:len(nums)]:
            sfd.drop()
        raise

    def run():
        try:
            return fn(*nums, *args)
        finally:
            for sfd in fds:
                sfd.drop()
    return run


class Pacer:
    """Spaces out transfers so that they average at most `rate` bytes/s."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._next = 0.0

    def delay(self, nbytes: int, now: float) -> float:
        """Seconds to wait before moving `nbytes`."""
        start = max(now, self._next)
        self._next = start + nbytes / self.rate
        return start - now


class Lanes:
    """Slots for background chunk copies (fillers), granted in priority
    order: on a bandwidth-bound cold tier two files copied side by side
    each arrive at half the rate, so the file needed first should have
    every slot until it is in, while single-chunk files (a latency-bound
    tier's case) still copy side by side. Demand reads do not take a slot."""

    def __init__(self, slots: int) -> None:
        self.free = slots
        self._waiting: list = []  # heap of [priority, ticket, event, abandoned]
        self._tickets = itertools.count()

    @contextlib.asynccontextmanager
    async def slot(self, priority: tuple):
        if self.free and not self._waiting:
            self.free -= 1
        else:
            entry = [priority, next(self._tickets), trio.Event(), False]
            heapq.heappush(self._waiting, entry)
            try:
                await entry[2].wait()
            except BaseException:
                if entry[2].is_set():  # granted as it was cancelled: pass it on
                    self._release()
                entry[3] = True
                raise
        try:
            yield
        finally:
            self._release()

    def outranked(self, priority: tuple) -> bool:
        """Whether a more urgent file waits for a slot."""
        while self._waiting and self._waiting[0][3]:
            heapq.heappop(self._waiting)  # abandoned
        return bool(self._waiting) and self._waiting[0][0] < priority

    def _release(self) -> None:
        while self._waiting:
            entry = heapq.heappop(self._waiting)
            if not entry[3]:
                entry[2].set()  # the slot passes straight to the most urgent
                return
        self.free += 1


class Promotion:
    _order = itertools.count()  # promotions started earlier are needed sooner

    def __init__(self, store: "Store", rel: str, version: Version,
                 cold_fd: SharedFd, tmp_path: str, tmp_fd: SharedFd, prefetch: bool) -> None:
        self.store = store
        self.rel = rel
        self.version = version
        self.size = version[0]
        self.cold_fd = cold_fd  # a reference of its own: handles may close theirs
        self.tmp_path = tmp_path
        self.tmp_fd: SharedFd | None = tmp_fd
        nchunks = (self.size + CHUNK - 1) // CHUNK
        self.state = bytearray(nchunks)  # 0 missing, 1 in flight, 2 present
        self.digests = [""] * nchunks  # of the cold bytes of each chunk, as read
        self.fetched: dict[int, trio.Event] = {}
        self.done = trio.Event()
        self.failed = False
        self.nospace = False  # failed because the fast tier's filesystem is full
        self.cold_failed = False  # failed reading the cold file (else the fast tier failed)
        self.cancelled = False
        self._cancel_event = trio.Event()
        self.committing = False  # the commit (verify, rename) is running in a thread
        self.committed = False  # renamed into place; a cancel may still arrive after
        self.watch_wd: int | None = None  # the cold file's inotify watch, placed at the commit
        self.copy_stat: os.stat_result | None = None  # the committed copy's identity
        self.prefetch = prefetch  # the filler is paced until a process opens the file
        self._seq = next(self._order)
        self._claimed: set[int] = set()  # chunks a filler lane is about to copy
        self._scan = 0  # every chunk below is present or being copied
        self._lane_scopes: set[trio.CancelScope] = set()  # lanes' copies, stopped by cancel

    def fail(self, exc: OSError) -> None:
        self.failed = True
        if isinstance(exc, ColdError):
            self.cold_failed = True
            log.warning("promotion of %s failed reading the cold file: %s", self.rel,
                        exc.strerror)
        elif exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.ENOMEM):
            # ENOMEM: a tmpfs write the kernel found no memory for (the
            # daemon's memory cgroup at its limit, say): no room all the same
            self.nospace = True
            log.warning("promotion of %s stopped: the fast tier's filesystem is full (%s)",
                        self.rel, exc.strerror)
        else:
            log.warning("promotion of %s failed: the fast tier: %s", self.rel, exc)

    async def _fetch(self, idx: int) -> None:
        self._mark(idx)
        try:
            await self._copy(idx)
        finally:
            self._settle(idx)

    def _mark(self, idx: int) -> None:
        self.state[idx] = 1
        self.fetched[idx] = trio.Event()

    def _settle(self, idx: int) -> None:
        if self.state[idx] == 1:  # cancelled: the thread was abandoned
            self.state[idx] = 0
        self.fetched[idx].set()

    async def _copy(self, idx: int) -> None:
        """Copy chunk idx (marked in flight) from the cold file."""
        off = idx * CHUNK
        length = min(CHUNK, self.size - off)
        try:
            n, digest = await self.store.cold_call(
                in_thread(_copy_range, off, length, fds=(self.cold_fd, self.tmp_fd)))
            self.store.stats.cold_bytes_read += n
            if n != length:
                log.info("%s shrank while being promoted; copy discarded", self.rel)
                self.state[idx] = 0
                self.cancel()
            else:
                self.digests[idx] = digest
                self.state[idx] = 2
        except OSError as exc:
            self.fail(exc)
            self.state[idx] = 0

    def cancel(self) -> None:
        """Stop at the next chunk boundary (a paced filler stops waiting now,
        a lane's copy is abandoned so that its slot goes to another file);
        the reservation is returned when the filler ends."""
        self.cancelled = True
        self._cancel_event.set()
        for scope in self._lane_scopes:
            scope.cancel()

    async def wait_cancelled(self, timeout: float) -> None:
        with trio.move_on_after(timeout):
            await self._cancel_event.wait()

    def _alive(self) -> bool:
        return not (self.failed or self.cancelled) and self.tmp_fd is not None

    def _chunks(self, off: int, size: int) -> range:
        return range(off // CHUNK, (min(off + size, self.size) + CHUNK - 1) // CHUNK)

    def present(self, off: int, size: int) -> bool:
        """Whether the temporary copy holds [off, off+size) now."""
        return self._alive() and all(self.state[i] == 2 for i in self._chunks(off, size))

    def fetch_soon(self, off: int, size: int) -> bool:
        """Start copying, in the background, the chunks of [off, off+size)
        nobody copies yet; False if the promotion is over. A reader does not
        wait for them: it reads the same bytes from the cold file meanwhile
        (Store._read), and the cold tier's page cache gives them to whichever
        of the two asks second, so the reader streams where it would wait
        for a whole chunk before its first byte."""
        if not self._alive():
            return False
        for idx in self._chunks(off, size):
            if self.state[idx] == 0 and idx not in self._claimed:
                self._mark(idx)
                self.store.start_soon(self._background, idx)
        return True

    async def _background(self, idx: int) -> None:
        scope = trio.CancelScope()  # cancel() abandons it, as a lane's copy
        self._lane_scopes.add(scope)
        try:
            with scope:
                if self._alive():  # not cancelled or ended before this task ran
                    await self._copy(idx)
        finally:
            self._lane_scopes.discard(scope)
            self._settle(idx)

    def _unchanged(self, cold_fd: int) -> bool:
        """Whether the cold path still names the very file that was copied,
        with the content it had (blocking)."""
        try:
            return (version_of(os.fstat(cold_fd)) == self.version
                    and version_of(self.store.cold.lstat(self.rel)) == self.version)
        except FileNotFoundError:  # renamed away, or no longer beneath the root
            return False
        except OSError as exc:
            raise ColdError(exc.errno, exc.strerror) from exc

    def _verify_and_commit(self, cold_fd: int, tmp_fd: int) -> os.stat_result | None:
        if not self._unchanged(cold_fd):
            log.info("%s changed while being promoted; copy discarded", self.rel)
            return None
        digest = _verify_copy(tmp_fd, self.size, self.digests)
        if digest is None:
            log.warning("the fast copy of %s does not read back as the cold bytes; "
                        "discarded (is the fast tier's storage failing?)", self.rel)
            self.store.stats.copies_corrupt += 1
            return None
        committed = self.store.fast.commit(self.tmp_path, tmp_fd, self.rel, self.version,
                                           digest)
        if self.store.watch is not None:  # from now on the file has a fast copy
            self.watch_wd = self.store.watch.add(cold_fd, is_dir=False)
        return committed

    def _priority(self) -> tuple[int, int]:
        """Files a process has open first, then in the order they started."""
        return (0 if self.store.entries[self.rel].handles else 1, self._seq)

    def _claim(self) -> int | None:
        """The lowest chunk nobody copies yet, claimed for a lane. (A chunk
        below the scan only goes missing again when the promotion fails or
        is cancelled, which ends every lane.)"""
        while self._scan < len(self.state) and (self.state[self._scan] != 0
                                                or self._scan in self._claimed):
            self._scan += 1
        if self._scan == len(self.state):
            return None
        self._claimed.add(self._scan)
        return self._scan

    async def _lane(self) -> None:
        """Copy chunks, lowest first, holding a slot of the store's lanes
        until none is left or a more urgent file waits for the slot."""
        scope = trio.CancelScope()
        self._lane_scopes.add(scope)
        try:
            with scope:
                while self._alive():
                    idx = self._claim()
                    if idx is None:
                        return
                    try:
                        async with self.store.lanes.slot(self._priority()):
                            while idx is not None:
                                await self.store.pace(self, min(CHUNK, self.size - idx * CHUNK))
                                if self.state[idx] == 0 and self._alive():  # a read may have
                                    await self._fetch(idx)  # copied it meanwhile
                                self._claimed.discard(idx)
                                idx = None
                                if self._alive() and not \
                                        self.store.lanes.outranked(self._priority()):
                                    idx = self._claim()
                    finally:
                        if idx is not None:
                            self._claimed.discard(idx)
        finally:
            self._lane_scopes.discard(scope)

    async def fill(self) -> None:
        try:
            async with self.store.promote_limiter:
                async with trio.open_nursery() as lanes:
                    for _ in range(min(LANES, len(self.state))):
                        lanes.start_soon(self._lane)
                for idx in range(len(self.state)):  # what demand reads still copy
                    while self._alive() and self.state[idx] != 2:
                        if self.state[idx] == 1:
                            await self.fetched[idx].wait()
                        else:
                            await self._fetch(idx)
                if self._alive():
                    self.committing = True
                    self.copy_stat = await self.store.cold_call(
                        in_thread(self._verify_and_commit, fds=(self.cold_fd, self.tmp_fd)))
                    if self.copy_stat is None:
                        self.cancel()
                    else:
                        self.committed = True
                        if self.store.watch is not None:
                            self.store.watch.register(self.watch_wd, self.rel, is_dir=False,
                                                      ino=self.version[2])
        except OSError as exc:
            self.fail(exc)
        finally:
            self.store._promotion_ended(self)


def _active(prom: Promotion | None) -> bool:
    """Whether prom still holds its file: not cancelled, or committing (its
    rename may still land). A cancelled one winding down otherwise (waiting
    for a chunk copy) does not keep a new promotion of the file waiting."""
    return prom is not None and (not prom.cancelled or prom.committing)


@dataclass(eq=False)
class Handle:
    rel: str
    version: Version
    entry: "Entry"
    # the cold file this open resolved to, kept for its whole life. None only
    # for a passthrough open the watch vouched for: the kernel reads its copy
    # and never sends its reads here (any other open gets one: attach_cold)
    cold_fd: SharedFd | None
    stream: Stream = (0, None)  # the process that opened it
    fast_fd: int | None = None
    # not fast, but the whole cold file was in the page cache at the open:
    # the kernel may read the cold file itself (docs/passthrough.md)
    page_cached: bool = False
    prom: Promotion | None = None
    tried_promotion: bool = False
    ranges: list = field(default_factory=list)  # [offset, length] read, coalesced
    more_ranges: int = 0  # reads beyond MAX_RANGES
    read_bytes: int = 0  # through the daemon, so far

    def note_read(self, off: int, n: int) -> None:
        self.read_bytes += n
        last = self.ranges[-1] if self.ranges else None
        if last is not None and last[0] + last[1] == off:
            last[1] += n
        elif len(self.ranges) < MAX_RANGES:
            self.ranges.append([off, n])
        else:
            self.more_ranges += 1


class Hold:
    """The budget's claim on a fast copy that passthrough opens read in the
    kernel: one per copy, however many inodes' backing files it is. It
    keeps an fd of the copy, to tell whether the copy is still as it was
    when a new open would join those opens (after an eviction, too)."""

    def __init__(self, store: "Store", rel: str, key: tuple[int, int], fd: int,
                 size: int) -> None:
        self.store = store
        self.rel = rel
        self.key = key  # (st_dev, st_ino) of the copy
        self.fd = os.dup(fd)
        self.stat = os.fstat(self.fd)  # as the daemon last left it
        self.size = size
        self.holders = 0
        self.dropped = False  # evicted meanwhile: its bytes are freed at the last release
        self._damaged = False  # found changed: no new open may read it

    @property
    def damaged(self) -> bool:
        if not self._damaged and not same_copy(os.fstat(self.fd), self.stat):
            log.warning("the fast copy of %s, open in passthrough, was changed behind "
                        "aattsfs's back; new opens read the cold file", self.rel)
            self.store.stats.copies_corrupt += 1
            self._damaged = True
        return self._damaged

    def unlinked(self, damaged: bool) -> None:
        """The daemon has just unlinked the copy (which moves its ctime);
        whether it had changed before was looked at (`damaged`) first."""
        self.dropped = True
        self._damaged |= damaged
        self.stat = os.fstat(self.fd)

    def release(self) -> None:
        self.holders -= 1
        if self.holders == 0:
            del self.store._holds[self.key]
            os.close(self.fd)
            if self.dropped:
                self.store.core.release(self.size)


@dataclass(eq=False)
class Entry:
    record: FileRecord
    version: Version | None = None  # of the cold file, as last seen; None: not yet
    fast_bytes: int = 0  # bytes this file's committed copy holds in the budget
    copy_stat: os.stat_result | None = None  # the copy as committed or verified
    verified: bool = False  # the copy may be served (False: found at start, unchecked)
    prom: Promotion | None = None
    handles: set = field(default_factory=set)
    prefetched: bool = False  # staged by the prefetcher and not opened since


class Store:
    def __init__(self, cold: ColdTier, fast: FastTier, meta: MetaStore, core: Residency,
                 io_threads: int = 16, max_promotions: int = 2, prefetch_rate: int = 0) -> None:
        self.cold = cold
        self.fast = fast
        self.meta = meta
        self.core = core  # the budget, what is resident, eviction and admission
        self.io_limiter = trio.CapacityLimiter(io_threads)  # the cold tier's threads
        self.fast_limiter = trio.CapacityLimiter(2)  # hashing fast copies
        self.promote_limiter = trio.CapacityLimiter(max_promotions)
        self.lanes = Lanes(LANES)  # the fillers' cold reads at once
        self.stats = Stats()
        self._pacer = Pacer(prefetch_rate) if prefetch_rate else None
        # The files the prefetcher's latest plan stages: a demand promotion
        # does not evict them (they are expected sooner than a file read now).
        self.expected: Container[str] = frozenset()
        # Called before a promotion is decided: the prefetcher plans for the
        # latest open if it has not yet (the forecast ranks admissions).
        self.plan_pending: Callable[[], None] = lambda: None
        # Called (as a task) with (rel, version, live) to copy a committed file
        # into the kernel page cache of its inode: always when opens that
        # read through the promotion's copy are live (live=True: the kernel
        # sends their reads to the daemon until they close, so the pages
        # spare every later fault a round trip), and for prefetched copies
        # when `push_staged` (--push-page-cache).
        self.push_pages: Callable[[str, Version, bool], Awaitable[None]] | None = None
        self.push_staged = False
        self.entries: dict[str, Entry] = {rel: Entry(rec) for rel, rec in meta.records.items()}
        self._nursery: trio.Nursery | None = None
        self._promotion_end = trio.Event()  # set (and replaced) as each promotion ends
        self._dirty: set[str] = set()
        self._events: list[dict] = []  # trace events not yet in LMDB
        self._writing: list[dict] = []  # events a flush thread is writing now
        self._meta_limiter = trio.CapacityLimiter(1)  # one LMDB flush at a time
        self._recovered: list[str] = []  # copies found at start, to verify
        # Copies the kernel reads for passthrough opens, by (dev, ino). A
        # dropped copy's bytes stay allocated, and counted in the budget,
        # until its last holder goes.
        self._holds: dict[tuple[int, int], Hold] = {}
        self.passthrough = {"mode": "off", "active": False, "reason": "not started"}
        self.watch: ColdWatch | None = None  # set by mount.py where the cold tier allows
        self.watch_reason = "not started"
        # The free-memory floor (memfloor.py, set by mount.py): bytes of
        # MemAvailable to keep (0: off), and the latest reading. The budget
        # it allows is core.limit (apply_floor).
        self.min_free = 0
        self.mem_available: int | None = None
        self._floor_from = (0, 0)  # the floor's eviction counters when it began to shrink
        # Access events for the prefetcher: the read path never waits on them.
        self.events_out, self.events_in = trio.open_memory_channel(EVENT_BUFFER)
        # A file by the link it was last reached through: a Hugging Face hub
        # snapshot's `config.json` for the blob it points at, which is what
        # the loader opens (docs/huggingface.md).
        self.names: OrderedDict[str, str] = OrderedDict()

    def start_soon(self, fn: Callable, *args) -> None:
        """Run fn(*args) as a background task of the store (until unmount)."""
        self._nursery.start_soon(fn, *args)

    async def cold_call(self, fn: Callable, *args):
        """fn(*args) in a cold-tier worker thread. Abandoned when cancelled:
        a hung cold tier must not hold up shutdown (threads given fds hold
        them through `in_thread`)."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self.io_limiter,
                                             abandon_on_cancel=True)

    async def readlink(self, rel: str) -> str | None:
        """The target of the link rel as the mount shows it (None: hidden);
        the regular file it leads to is known by rel from now on."""
        shown, leads_to = await self.cold_call(self.cold.follow, rel)
        if leads_to is not None:
            self.name(leads_to, rel)
        return shown

    def name(self, rel: str, link: str) -> None:
        if rel != link:
            remember(self.names, rel, link, MAX_NAMES)

    def display_name(self, rel: str) -> str:
        return self.names.get(rel, rel)

    # -- lifecycle ---------------------------------------------------------

    def recover(self) -> None:
        """Take stock of the copies the fast directory holds (no cold I/O
        here: the mount comes up at once). Each is counted in the budget but
        served only once `run` has checked it against the cold file and its
        digest (docs/crash-recovery.md)."""
        for rel, (fst, source) in self.fast.scan().items():
            e = self._entry(rel)
            e.fast_bytes = fst.st_size
            e.copy_stat = fst
            # what the copy says it is a copy of: an open of another version
            # drops it at once, the same version waits for the check below
            e.version = tuple(source.get(k) for k in ("size", "mtime_ns", "ino", "ctime_ns"))
            self._recovered.append(rel)
        for rel, e in self.entries.items():
            if e.record.tier == "fast" and not e.fast_bytes:
                e.record.tier = "cold"
                self._dirty.add(rel)
        core = self.core
        for rel, e in sorted(self.entries.items(), key=lambda kv: kv[1].record.last_access):
            if e.fast_bytes:
                core.adopt(rel, e.fast_bytes)
        if core.free < 0:  # the budget shrank since last time
            self._shrink()
            if core.free < 0:
                log.warning("pinned files hold %d bytes, more than the budget of %d; "
                            "unpin some or raise --fast-size", core.used, core.budget)
        self._recovered.sort(key=lambda rel: -self.entries[rel].record.last_access)
        log.info("fast tier: %d copies found (%d bytes), to be verified before use",
                 len(self._recovered), core.used)

    async def _verify_recovered(self) -> None:
        """Check every copy found at start, most recently used first; then
        bring pinned files back."""
        kept = dropped = 0
        for rel in self._recovered:
            e = self.entries.get(rel)
            if e is None or not e.fast_bytes or e.verified:
                continue  # evicted or replaced meanwhile
            expected = e.version
            try:
                fd, st = await self.cold_call(self.cold.open, rel)
                os.close(fd)
                ok = version_of(st) == expected and await self._copy_matches(rel, e)
            except OSError as exc:
                log.debug("copy of %s not kept: %s", rel, exc)
                ok = False
            e = self.entries.get(rel)
            if e is None or not e.fast_bytes or e.verified:
                continue
            if ok:
                e.verified = True
                e.record.size, e.record.mtime_ns = expected[:2]
                e.record.tier = "fast"
                kept += 1
            else:
                self._drop_fast(rel)
                dropped += 1
            self._dirty.add(rel)
        self._recovered = []
        if kept or dropped:
            log.info("fast tier recovered: %d copies verified and kept, %d dropped",
                     kept, dropped)
        for rel, e in list(self.entries.items()):
            if e.record.pinned and not e.fast_bytes:
                self._nursery.start_soon(self._warm_quietly, rel)

    async def _copy_matches(self, rel: str, e: Entry) -> bool:
        """Hash a fast copy against the digest it carries, and check that it
        is still the copy the store knows (counted; a mismatch is logged)."""
        st, ok = await trio.to_thread.run_sync(self.fast.check, rel, e.fast_bytes,
                                               limiter=self.fast_limiter,
                                               abandon_on_cancel=True)
        if ok and same_copy(st, e.copy_stat or st):
            self.stats.copies_verified += 1
            e.copy_stat = st
            return True
        log.warning("the fast copy of %s does not match its digest; dropped, never served",
                    rel)
        self.stats.copies_corrupt += 1
        return False

    async def verify_all(self) -> dict:
        """Hash every copy in use again (`aattsfs verify`); a mismatch is
        dropped. Returns what was checked."""
        checked = nbytes = 0
        bad = []
        for rel in [rel for rel, e in self.entries.items() if e.fast_bytes and e.verified]:
            e = self.entries[rel]
            try:
                ok = await self._copy_matches(rel, e)
            except OSError as exc:
                log.warning("the fast copy of %s cannot be read (%s); dropped", rel, exc)
                ok = False
            if not (e.fast_bytes and e.verified):
                continue  # evicted or replaced meanwhile
            checked += 1
            nbytes += e.fast_bytes
            if not ok:
                bad.append(rel)
                self._drop_fast(rel, damaged=True)
        return {"checked": checked, "bytes": nbytes, "corrupt": bad}

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Own the background tasks (promotions, metadata flush) until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._verify_recovered)
            task_status.started()
            failing = False
            while True:
                await trio.sleep(FLUSH_INTERVAL)
                try:
                    await self._flush_in_thread()
                except Exception as exc:  # a full disk, a damaged map, a bug
                    # The metadata only caches what can be re-learned: keep
                    # serving, and say so once, not every second.
                    if not failing:
                        log.error("writing metadata failed (%s); batches are lost until it "
                                  "works again", exc, exc_info=not isinstance(exc, lmdb.Error))
                    failing = True
                else:
                    if failing:
                        log.info("writing metadata works again")
                    failing = False

    async def _warm_quietly(self, rel: str) -> None:
        try:
            await self.warm(rel)
        except OSError as exc:
            log.warning("could not bring pinned file %s back into the fast tier: %s",
                        rel, os.strerror(exc.errno))

    def _take_batch(self) -> tuple[dict, list[dict]] | None:
        """What changed since the last flush: copies of the changed records
        (the trio thread goes on changing the records themselves) and the
        new events (never changed once emitted)."""
        if not (self._dirty or self._events):
            return None
        batch = {rel: copy.copy(self.entries[rel].record) if rel in self.entries else None
                 for rel in self._dirty}
        events = self._events
        self._dirty, self._events = set(), []
        return batch, events

    def flush(self) -> None:
        """Write what changed, here and now (at unmount, when no flush
        thread runs)."""
        taken = self._take_batch()
        if taken is not None:
            self.meta.write_batch(*taken)

    async def _flush_in_thread(self) -> None:
        """Write what changed in a worker thread: an LMDB commit (fsync, a
        millisecond or more) must not hold up the requests the trio thread
        serves. Not abandoned on cancellation: shutdown waits for the write,
        so that the final flush and close find LMDB idle."""
        taken = self._take_batch()
        if taken is None:
            return
        self._writing = taken[1]
        await trio.to_thread.run_sync(self._write_batch, *taken, limiter=self._meta_limiter)

    def _write_batch(self, batch: dict, events: list[dict]) -> None:
        with self.meta.lock:  # trace() sees the events either written or pending
            try:
                self.meta.write_batch(batch, events)
            finally:
                self._writing = []

    def _emit(self, event: dict) -> None:
        """An access event: kept for the trace (flushed to LMDB with the next
        batch) and sent to the prefetcher, without waiting for either."""
        self._events.append(event)
        try:
            self.events_out.send_nowait(event)
        except trio.WouldBlock:
            self.stats.events_dropped += 1

    def keep_events(self, events: list[dict]) -> None:
        """Events learned elsewhere (an import, docs/fleet.md): kept for the
        trace and its ring in LMDB like the daemon's own, so that a restart
        replays them, but not sent to the prefetcher, which learned them
        itself."""
        self._events.extend(events)

    async def pace(self, prom: Promotion, nbytes: int) -> None:
        """Hold a prefetch's filler to the cold-tier bandwidth cap, until a
        process opens the file (then it is a demand read)."""
        if self._pacer is not None and prom.prefetch and not self.entries[prom.rel].handles:
            await prom.wait_cancelled(self._pacer.delay(nbytes, trio.current_time()))

    # -- queries -----------------------------------------------------------

    def _entry(self, rel: str) -> Entry:
        e = self.entries.get(rel)
        if e is None:
            e = self.entries[rel] = Entry(FileRecord())
        return e

    def trace(self) -> list[dict]:
        """The recent access events, oldest first (docs/trace-format.md)."""
        with self.meta.lock:  # waits out a flush writing (a few ms at most)
            return self.meta.events() + self._writing + self._events

    def tier(self, rel: str) -> str:
        e = self.entries.get(rel)
        if e is None:
            return "cold"
        if _active(e.prom):
            return "promoting"
        if e.fast_bytes and not e.verified:
            return "verifying"  # found at start, not served until its digest is checked
        return "fast" if e.fast_bytes else "cold"

    def record(self, rel: str) -> FileRecord:
        e = self.entries.get(rel)
        return e.record if e is not None else FileRecord()

    def snapshot(self) -> dict:
        """`.aatts/stats`: the counters (counters.COUNTERS) and what the
        store holds now."""
        fast_files = [e for e in self.entries.values() if e.fast_bytes]
        now = {
            "uptime_seconds": round(time.time() - self.stats.started, 3),
            "promotions_in_flight": sum(1 for e in self.entries.values() if _active(e.prom)),
            "open_files": sum(len(e.handles) for e in self.entries.values()),
            "passthrough": {
                **self.passthrough,
                "backing_files": len(self._holds),
                "held_evicted_bytes": sum(h.size for h in self._holds.values() if h.dropped),
            },
            "cold_watch": {
                "active": self.watch is not None,
                "reason": self.watch_reason,
                **(self.watch.snapshot() if self.watch is not None else {}),
            },
            "fast_tier": {
                "used_bytes": self.core.used,
                "budget_bytes": self.core.budget,
                "effective_budget_bytes": self.core.limit,
                "files": len(fast_files),
                "pinned_files": sum(1 for e in fast_files if e.record.pinned),
                "policy": self.core.policy.name,
                "admission": self.core.admission.name,
            },
            "memory_floor": {
                "floor_bytes": self.min_free,
                "active": self.core.limit < self.core.budget,
                "available_bytes": self.mem_available,
            },
        }
        out = self.stats.tree()
        for key, value in now.items():
            if isinstance(value, dict):
                out.setdefault(key, {}).update(value)
            else:
                out[key] = value
        return out

    # -- the read path -----------------------------------------------------

    def _refresh(self, rel: str, st: os.stat_result) -> tuple[Entry, Version]:
        """Compare the cold file just opened with what is known of it; a
        changed file loses its fast copy and any promotion of the old version."""
        version = version_of(st)
        e = self._entry(rel)
        rec = e.record
        known = e.version or (rec.size, rec.mtime_ns, *version[2:])
        if known != version:
            if e.fast_bytes:
                log.info("%s changed in the cold tier; its fast copy is dropped", rel)
                self.stats.invalidations += 1
                self._drop_fast(rel)
            if e.prom is not None and e.prom.version != version:
                e.prom.cancel()
            rec.size, rec.mtime_ns = version[:2]
            self._dirty.add(rel)
        e.version = version
        return e, version

    async def _open_cold(self, rel: str, check: Callable[[os.stat_result], None] | None = None
                         ) -> tuple[SharedFd, Entry, Version]:
        w = self.watch
        if w is None:
            fd, st = await self.cold_call(self.cold.open, rel)
        else:
            token = w.begin()
            e = self.entries.get(rel)
            if e is None or not e.fast_bytes:
                fd, st = await self.cold_call(self.cold.open, rel)
            else:  # watched while it has a fast copy (_drop_fast unwatches it)
                fd, st, wd = await self.cold_call(self._watched, False, self.cold.open, rel)
                w.register(wd, rel, is_dir=False, ino=st.st_ino)
            w.note(rel, st, token)
        cold_fd = SharedFd(fd)
        if check is not None:
            try:
                check(st)
            except BaseException:
                cold_fd.close()
                raise
        e, version = self._refresh(rel, st)
        return cold_fd, e, version

    # -- cold stats, noted for the watch (watch.py) -------------------------

    async def cold_stat(self, lstat: Callable[[str], os.stat_result], rel: str
                        ) -> tuple[os.stat_result, bool]:
        """lstat(rel) in a worker thread, noted for the watch: an open soon
        after may use it instead of a cold call. The directory is watched
        first if nothing watches it yet. With it, whether the watch vouches
        for it now: the kernel may keep it longer (`vouched`)."""
        w = self.watch
        if w is None:
            return await self.cold_call(lstat, rel), False
        token = w.begin()
        parent = rel.rpartition("/")[0]
        if w.watching(parent):
            st = await self.cold_call(lstat, rel)
        else:
            # this stat is taken before the registration: the next one counts
            st, wd = await self.cold_call(self._stat_watching, lstat, rel, parent)
            w.register(wd, parent)
        w.note(rel, st, token)
        return st, self.vouched(rel, st, token)

    def vouched(self, rel: str, st: os.stat_result, token: int) -> bool:
        """Whether a change to rel since `token`, when its stat st was taken,
        would have been seen, and none was: then the kernel may keep it for
        watch.TRUST, since any change seen later is invalidated in the
        kernel at once (fs.Operations.invalidate_changes). To be asked just
        before the reply that hands it to the kernel: a change read after
        that is invalidated after the reply."""
        return self.vouched_dir(rel.rpartition("/")[0], token) and \
            self.vouched_entry(rel, st, token)

    def known_dir(self, rel: str) -> os.stat_result | None:
        """A directory's attributes as last seen, if the watch vouches that
        nothing changed them since (no cold call: a warm walk asks for each
        directory's attributes after listing it)."""
        return self.watch.known_dir(rel) if self.watch is not None else None

    def vouched_dir(self, rel_dir: str, token: int) -> bool:
        """The first half of `vouched`, for every entry of rel_dir at once
        (the pending events read first)."""
        w = self.watch
        if w is None:
            return False
        w.drain()
        return w.vouches_dir(rel_dir, token)

    def vouched_entry(self, rel: str, st: os.stat_result, token: int) -> bool:
        """The second half of `vouched`, just after `vouched_dir` said yes."""
        w = self.watch
        if not w.unchanged(rel, token):
            return False
        if stat.S_ISDIR(st.st_mode):
            # what a directory holds changes its attributes: only its own
            # watch sees that
            return w.vouches_listing(rel, token)
        # a file with other names may be written through one that no watched
        # directory holds (a file's own watch, which would see it, is placed
        # only on promoted files: not asked for here)
        return st.st_nlink == 1

    async def cold_opendir(self, rel: str) -> tuple[SharedFd, list[str], int | None, int]:
        """cold.opendir(rel) in worker threads, the directory watched: (fd,
        names, the watch's registration, for cold_stat_entries, and if the
        kernel may cache the listing, the token to ask `listing_current`
        with, else 0: the watch was there before it was read, so any change
        to it since is seen)."""
        w = self.watch
        if w is None:
            fd, names = await self.cold_call(self.cold.opendir, rel)
            return SharedFd(fd), names, None, 0
        if w.watching(rel):
            token = w.begin()
            fd, names = await self.cold_call(self.cold.opendir, rel)
            return SharedFd(fd), names, w.registered(rel), \
                token if self.listing_current(rel, token) else 0
        # watched first, then read: a change the listing misses is seen
        fd, wd = await self.cold_call(self._watched, True,
                                      lambda r: (self.cold.open_dir(r),), rel)
        sfd = SharedFd(fd)
        try:
            w.register(wd, rel)
            token = w.begin()
            names = await self.cold_call(in_thread(self.cold.list_dir, fds=(sfd,)))
        except BaseException:
            sfd.close()
            raise
        return sfd, names, w.registered(rel), token if self.listing_current(rel, token) else 0

    def listing_current(self, rel: str, token: int) -> bool:
        """No name in the directory rel came, went or moved since `token`, and
        the watch would have seen it: a listing read after the token is
        still the directory's."""
        w = self.watch
        if w is None:
            return False
        w.drain()
        return w.vouches_listing(rel, token)

    async def cold_stat_entries(self, dir_fd: SharedFd, rel: str, names: list[str],
                                watched: int | None
                                ) -> tuple[list[os.stat_result | None], int]:
        """cold.stat_entries of the directory open as dir_fd, noted for the
        watch only while its watch is the one registered at its opendir
        (`watched`): a directory swapped since lists what is no longer there.
        With them, the token to ask `vouched` with (0: never)."""
        w = self.watch
        token = w.begin() if w is not None and watched is not None else 0
        attrs = await self.cold_call(in_thread(self.cold.stat_entries, rel, names,
                                               fds=(dir_fd,)))
        if token and w.registered(rel) == watched:
            for name, st in zip(names, attrs):
                if st is not None:
                    w.note(f"{rel}/{name}" if rel else name, st, token)
        else:
            token = 0
        return attrs, token

    def _stat_watching(self, lstat: Callable[[str], os.stat_result], rel: str,
                       rel_dir: str) -> tuple[os.stat_result, int | None]:
        """In a worker thread: lstat(rel), and a watch on the directory rel_dir
        (None if it cannot be placed)."""
        st = lstat(rel)
        try:
            fd = self.cold.dir_fd(rel_dir)
        except OSError:
            return st, None
        try:
            return st, self.watch.add(fd)
        finally:
            os.close(fd)

    def _watched(self, is_dir: bool, open_fn: Callable, *args) -> tuple:
        """In a worker thread: open_fn(*args), which returns (fd, ...), then a
        watch on that fd; (..., its wd or None)."""
        out = open_fn(*args)
        return (*out, self.watch.add(out[0], is_dir))

    def _open_watched(self, rel: str, check: Callable[[os.stat_result], None] | None
                      ) -> tuple[None, Entry, Version] | None:
        """Like _open_cold for a file with a verified fast copy whose cold
        file the watch knows unchanged since a stat: without a cold call."""
        st = self.watch.known(rel) if self.watch is not None else None
        e = self.entries.get(rel)
        if st is None or e is None or not (e.fast_bytes and e.verified) \
                or e.version != version_of(st):
            return None
        if check is not None:
            check(st)
        return None, e, e.version

    async def attach_cold(self, h: Handle) -> None:
        """h's cold file, opened now if its open had none: the version the
        open found, or ESTALE (the kernel then looks the path up again)."""
        if h.cold_fd is None:
            fd, st = await self.cold_call(self.cold.open, h.rel)
            if version_of(st) != h.version:
                os.close(fd)
                raise OSError(errno.ESTALE, "the cold file changed since it was opened",
                              h.rel)
            h.cold_fd = SharedFd(fd)  # the handle is not shared yet: no other call

    def _open_fast(self, rel: str, e: Entry) -> int | None:
        """An fd of rel's copy if it may be served: verified, and unchanged
        since (a copy written behind the daemon's back is dropped)."""
        if not (e.fast_bytes and e.verified):
            return None
        try:
            fd = self.fast.open(rel)
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
                # the daemon is short of fds or memory: the copy is fine
                log.warning("fast copy of %s cannot be opened now (%s); read from cold",
                            rel, exc.strerror)
                return None
            log.warning("fast copy of %s is unreadable (%s); dropped", rel, exc.strerror)
            self._drop_fast(rel)
            return None
        if not same_copy(os.fstat(fd), e.copy_stat):
            os.close(fd)
            self._copy_damaged(rel)
            return None
        return fd

    def _copy_damaged(self, rel: str, exc: OSError | None = None) -> None:
        if exc is None:
            log.warning("the fast copy of %s was changed behind aattsfs's back; dropped, "
                        "never served", rel)
        else:
            log.warning("reading the fast copy of %s failed (%s); dropped, read from the "
                        "cold tier", rel, exc.strerror)
        self.stats.copies_corrupt += 1
        self._drop_fast(rel, damaged=True)

    async def open(self, rel: str, pid: int = 0,
                   check: Callable[[os.stat_result], None] | None = None,
                   held: bool = False, lazy_cold: bool = False) -> Handle:
        """Open rel for reading; `check` may refuse the cold file opened (its
        stat; by raising) before anything is counted. `held`: the kernel
        serves this open from a copy passthrough opens hold (counted fast).
        `lazy_cold` (passthrough is on): a handle without a cold fd will do if
        the watch vouches for the fast copy (a passthrough open never reads
        through the daemon; `attach_cold` gives it one otherwise); a cold
        file wholly in the page cache is noted (`Handle.page_cached`)."""
        cold_fd, e, version = (lazy_cold and self._open_watched(rel, check)) or \
            await self._open_cold(rel, check)
        rec = e.record
        h = Handle(rel, version, e, cold_fd, stream_of(pid))
        h.fast_fd = self._open_fast(rel, e)
        if lazy_cold and h.fast_fd is None and not held and cold_fd is not None:
            h.page_cached = page_cached(cold_fd.fd, version[0])
        self.core.opened(rel, version[0], h.stream)
        if h.fast_fd is not None or held:
            rec.hits += 1
            self.stats.opens_fast += 1
        else:
            rec.misses += 1
            self.stats.opens_cold += 1
            if _active(e.prom) and e.prom.version == version:
                h.prom = e.prom
            else:
                self.stats.demand_misses += 1
                self.stats.demand_miss_bytes += version[0]
        if e.prefetched:
            e.prefetched = False
            self.stats.prefetch_used_bytes += version[0]
        e.handles.add(h)
        rec.last_access = time.time()
        self._dirty.add(rel)
        via = {"via": self.names[rel]} if rel in self.names else {}
        self._emit({"t": rec.last_access, "op": "open", "path": rel, **via, "size": version[0],
                    "pid": h.stream[0], "start": h.stream[1]})
        return h

    async def read(self, h: Handle, off: int, size: int) -> bytes:
        start = time.perf_counter()
        # noted in the order the kernel asked: reads from the cold tier run
        # in threads and may end in another order, which would split ranges
        h.note_read(off, max(0, min(size, h.version[0] - off)))
        data, fast = await self._read(h, off, size)
        s = self.stats
        if fast:
            s.reads_fast += 1
            s.bytes_fast += len(data)
        else:
            s.reads_cold += 1
            s.bytes_cold += len(data)
        s.read_seconds["fast" if fast else "cold"].observe(time.perf_counter() - start)
        return data

    async def _read(self, h: Handle, off: int, size: int) -> tuple[bytes, bool]:
        """The bytes, and whether they came without waiting for the cold tier."""
        while True:
            if h.fast_fd is not None:
                try:
                    data = os.pread(h.fast_fd, size, off)
                    # Read, then check: a write to the copy before or during
                    # the read has moved its ctime by now (docs/reliability.md).
                    if same_copy(os.fstat(h.fast_fd), h.entry.copy_stat):
                        return data, True
                    self._copy_damaged(h.rel)
                except OSError as exc:  # a failing fast disk: the cold file has the bytes
                    self._copy_damaged(h.rel, exc)
                continue
            self._demand_promotion(h)
            if h.prom is not None:
                prom = h.prom
                if prom.present(off, size):
                    try:
                        return os.pread(prom.tmp_fd.fd, size, off), True
                    except OSError as exc:  # the copy is failing: stop it, read cold
                        prom.fail(exc)
                        prom.cancel()
                        h.prom = None
                        continue
                if not prom.fetch_soon(off, size):
                    if h.prom is prom:  # ended without moving this handle
                        h.prom = None
                    continue
            # Not in the fast tier, or not in the copy yet: from the cold file
            # (whose cache then holds the bytes the copy reads: counted once)
            streamed = h.prom is not None
            data = await self.cold_call(in_thread(os.pread, size, off, fds=(h.cold_fd,)))
            if not streamed:
                self.stats.cold_bytes_read += len(data)
            if len(data) < size and off + len(data) < h.version[0]:
                # Truncated in place since this open: a short read here would
                # make the kernel zero-fill the rest of its pages and, if it
                # refreshed the file's attributes meanwhile, keep the old size
                # and hand out those zeros as file content. An error instead.
                raise OSError(errno.EIO, "the cold file was truncated while open", h.rel)
            return data, False

    def _demand_promotion(self, h: Handle) -> None:
        """At the first read of a file that is not fast: promote it if
        admission lets it in (else it is counted as bypassed)."""
        if not h.tried_promotion and not _active(h.entry.prom) and h.version[0] > 0:
            h.tried_promotion = True
            self._start_promotion(h.rel, h.entry, h.version, h.cold_fd, self.expected)

    def passthrough_opened(self, h: Handle, cold: bool = False) -> None:
        """Count an open the kernel serves from a backing file itself: the
        fast copy, or (`cold`) the cold file, all in the page cache. Its
        reads never reach the store, so it needs no fd of the copy; an open
        of a cold file that is not fast promotes it as its first read
        would have (the fast tier then serves it after the page cache has
        let it go)."""
        if cold:
            self.stats.page_cache_opens += 1
            self.stats.page_cache_bytes += h.version[0]
            if h.fast_fd is None:
                self._demand_promotion(h)
        else:
            self.stats.passthrough_opens += 1
            self.stats.passthrough_bytes += h.version[0]
        if h.cold_fd is None:
            self.stats.opens_watched += 1
        if h.fast_fd is not None:
            os.close(h.fast_fd)
            h.fast_fd = None

    def hold(self, h: Handle) -> "Hold":
        """Keep the budget counting h's fast copy while the kernel reads it
        for passthrough opens, even after it is evicted (until released)."""
        cs = h.entry.copy_stat
        key = (cs.st_dev, cs.st_ino)
        held = self._holds.get(key)
        if held is None:
            held = self._holds[key] = Hold(self, h.rel, key, h.fast_fd, h.entry.fast_bytes)
        held.holders += 1
        return held

    def _held(self, e: Entry) -> "Hold | None":
        cs = e.copy_stat
        return self._holds.get((cs.st_dev, cs.st_ino)) if cs is not None else None

    def release(self, h: Handle) -> None:
        if h.ranges:
            ev = {"t": time.time(), "op": "read", "path": h.rel, "pid": h.stream[0],
                  "start": h.stream[1], "ranges": h.ranges}
            if h.more_ranges:
                ev["more_ranges"] = h.more_ranges
            self._emit(ev)
        h.entry.handles.discard(h)
        if h.fast_fd is not None:
            os.close(h.fast_fd)
        if h.cold_fd is not None:
            h.cold_fd.close()
        h.fast_fd = None
        h.prom = None

    # -- promotion ---------------------------------------------------------

    def _start_promotion(self, rel: str, e: Entry, version: Version, cold_fd: SharedFd,
                         protect: Container[str] = frozenset(), prefetch: bool = False,
                         judge: bool = True) -> Promotion | None:
        """Begin promoting rel (the file open as `cold_fd`) if its whole size
        fits the budget and (if `judge`) the residency core admits it at the
        price of what it evicts. None: rel is read from the cold tier."""
        if e.fast_bytes or _active(e.prom):
            return e.prom
        if self._nursery is None:
            return None
        victims, why = self._room(rel, version[0], protect, prefetch, judge)
        if why is not None:
            if judge and not prefetch:
                self.stats.bypasses += 1
                self.stats.bypassed_bytes += version[0]
            return None
        try:
            return self._begin(rel, e, version, cold_fd, victims, prefetch)
        except OSError:
            return None  # logged and counted

    def _begin(self, rel: str, e: Entry, version: Version, cold_fd: SharedFd,
               victims: list[str], prefetch: bool) -> Promotion:
        """Promote rel in place of `victims` (what `_room` chose, with no
        await since): the temporary copy first, so that a fast tier that
        cannot take one (full, failing, its directory gone) costs no copy
        already there; then the victims go, the room is reserved and every
        open handle of this version of the file follows the promotion."""
        size = version[0]
        try:
            tmp_path, tmp_fd = self.fast.create_temp()
        except OSError as exc:
            self.core.abandon(rel)
            self.stats.promotions_failed += 1
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.ENOMEM):
                self.stats.promotions_nospace += 1
            log.warning("cannot promote %s: no temporary copy in the fast tier (%s); "
                        "read from the cold tier", rel, exc.strerror)
            raise
        for other in victims:
            self._drop_fast(other)
            self.stats.evictions += 1
        reserved = self.core.reserve(size)
        assert reserved, "the room _room found went away without an await"
        cold_fd.hold()  # the promotion's own reference, dropped when it ends
        prom = e.prom = Promotion(self, rel, version, cold_fd, tmp_path, SharedFd(tmp_fd),
                                  prefetch)
        if prefetch:
            e.prefetched = True
            self.stats.prefetches += 1
            self.stats.prefetched_bytes += size
        for h in e.handles:
            if h.fast_fd is None and h.version == version:
                h.prom = prom
        self._nursery.start_soon(prom.fill)
        return prom

    def absent(self, rel: str) -> bool:
        """Neither in the fast tier nor on its way there, as far as the
        daemon knows (without looking at the cold tier)."""
        e = self.entries.get(rel)
        return e is None or not (e.fast_bytes or _active(e.prom))

    async def prefetch(self, rel: str, protect: Container[str]) -> Promotion | None:
        """Start promoting rel ahead of any open, evicting neither the files
        in `protect` nor files open right now; None if it is already in the
        fast tier or on its way, or cannot be brought in at that price."""
        cold_fd, e, version = await self._open_cold(rel)
        try:
            if not self.absent(rel) or version[0] == 0:
                return None
            return self._start_promotion(rel, e, version, cold_fd, protect, prefetch=True)
        finally:
            cold_fd.close()

    def _promotion_ended(self, prom: Promotion) -> None:
        e = self.entries[prom.rel]
        committed = prom.committed
        if e.prom is prom:
            e.prom = None
        if committed:
            if e.version != prom.version:  # the file changed while the commit ran
                prom.cancel()
            e.fast_bytes = prom.size
            e.copy_stat = prom.copy_stat
            e.verified = True
            e.record.tier = "fast"
            self.core.commit(prom.rel, prom.size)
            self.stats.promotions += 1
            self.stats.promoted_bytes += prom.size
            self._dirty.add(prom.rel)
            # (not for an open that has read most of the file already, as a
            # whole-file reader has: its pages are in the kernel, pushing
            # them again is CPU for nothing)
            live = any(h.prom is prom and h.read_bytes < prom.size // 2 for h in e.handles)
            if self.push_pages is not None and not prom.cancelled and (
                    live or (prom.prefetch and self.push_staged)):
                self._nursery.start_soon(self.push_pages, prom.rel, prom.version, live)
        else:
            self.core.abandon(prom.rel, prom.size)
            self._unused_prefetch(e)
            if prom.failed:
                self.stats.promotions_failed += 1
                self.stats.promotions_nospace += prom.nospace
            else:
                self.stats.promotions_cancelled += 1
            with contextlib.suppress(OSError):
                os.unlink(prom.tmp_path)
        for h in e.handles:
            if h.prom is prom:
                h.prom = None  # falls back to its cold file unless moved below
                if committed and not prom.cancelled:
                    h.fast_fd = self._open_fast(prom.rel, e)
        prom.tmp_fd.close()
        prom.cold_fd.close()
        prom.tmp_fd = None
        if committed and prom.cancelled:
            # Cancelled (evicted, changed, stale) while the commit ran: the
            # copy is in place and counted; drop it the ordinary way.
            self._drop_fast(prom.rel)
        prom.done.set()
        self._promotion_end.set()
        self._promotion_end = trio.Event()

    def _room(self, rel: str, size: int, protect: Container[str], prefetch: bool,
              judge: bool) -> tuple[list[str], str | None]:
        """The files to evict, in policy order, for rel to come in: never
        pinned files, files in `protect`, files open right now if
        `prefetch`, copies passthrough opens hold or promotions in flight.
        Or ([], why not): too big, no room, or (if `judge`) not admitted at
        that price. Nothing changes here."""
        def evictable(other: str) -> bool:
            e = self.entries[other]
            # a copy passthrough opens hold would free nothing until they close
            return not (e.record.pinned or prefetch and e.handles
                        or self._held(e) is not None)

        if judge:
            self.plan_pending()
        victims, why = self.core.room(rel, size, evictable, protect, judge, ahead=prefetch)
        if why is not None:
            log.debug("%s read from the cold tier without a copy: %s", rel, why)
        return victims, why

    def _drop_fast(self, rel: str, damaged: bool = False) -> None:
        """Remove rel's fast copy (`damaged`: it no longer holds the cold
        bytes). Open handles reading it switch to the cold file each of them
        opened, so they keep returning the same bytes; passthrough opens
        keep reading it in the kernel (docs/passthrough.md)."""
        e = self.entries[rel]
        held = self._held(e)
        damaged = damaged or held is not None and held.damaged
        self.fast.remove(rel)
        if self.watch is not None:
            self.watch.unwatch(rel)
        self.core.drop(rel)
        if held is not None:
            held.unlinked(damaged)  # the budget gets these bytes back at the last close
        else:
            self.core.release(e.fast_bytes)
        self.stats.evicted_bytes += e.fast_bytes
        self._unused_prefetch(e)
        e.fast_bytes = 0
        e.copy_stat = None
        e.verified = False
        e.record.tier = "cold"
        self._dirty.add(rel)
        for h in e.handles:
            if h.fast_fd is not None:
                os.close(h.fast_fd)
                h.fast_fd = None
        log.debug("dropped fast copy of %s", rel)

    def _unused_prefetch(self, e: Entry) -> None:
        if e.prefetched:
            e.prefetched = False
            self.stats.prefetch_wasted_bytes += e.record.size

    # -- control -----------------------------------------------------------

    async def warm(self, rel: str, attempts: int = 3) -> None:
        """Promote rel and wait until it is in the fast tier. Raises OSError:
        EFBIG if it is larger than the budget; ENOMEM if it does not fit
        while the box is short of memory (the floor shrank the budget);
        EDQUOT if it does not fit next to pinned files and copies
        passthrough opens hold (after waiting for the promotions in flight,
        whose room may come free);
        ENOSPC if the fast tier's filesystem is full, or another error of
        it (counted in promotions_nospace only when it is out of room); EIO
        only if reading the cold file failed; EBUSY if every attempt was
        cancelled (the file changed, or was evicted again meanwhile)."""
        waits = WARM_WAITS
        while attempts:
            cold_fd, e, version = await self._open_cold(rel)
            try:
                if e.fast_bytes or version[0] == 0:
                    return  # a copy found at start is being verified
                why = None
                prom = e.prom if _active(e.prom) else None
                if prom is None and self._nursery is not None:
                    victims, why = self._room(rel, version[0], frozenset(), False, judge=False)
                    if why is None:
                        prom = self._begin(rel, e, version, cold_fd, victims, False)
            finally:
                cold_fd.close()
            if why == TOO_BIG:
                raise OSError(errno.EFBIG, "larger than the fast tier's budget")
            if prom is None and self.core.limit < self.core.budget:
                # no waiting for promotions to end: the room is not theirs
                raise OSError(errno.ENOMEM, "the fast tier is shrunk: memory is short")
            if prom is None:
                if waits and any(_active(o.prom) for o in self.entries.values()):
                    waits -= 1  # their reservations may free room: the budget,
                    await self._promotion_end.wait()  # not the file, is in use
                    continue
                raise OSError(errno.EDQUOT, "no room next to pinned and held copies")
            await prom.done.wait()
            if prom.cold_failed:
                raise OSError(errno.EIO, "reading the cold file failed")
            if prom.failed:
                raise OSError(errno.ENOSPC, "the fast tier's filesystem is full or failing")
            if prom.committed and not prom.cancelled:
                return
            attempts -= 1
        raise OSError(errno.EBUSY, "cancelled while being promoted")

    def evict(self, rel: str) -> None:
        e = self.entries.get(rel)
        if e is None:
            return
        if e.prom is not None:
            e.prom.cancel()
        if e.fast_bytes:
            self._drop_fast(rel)
            self.stats.evictions += 1

    async def set_pinned(self, rel: str, pinned: bool) -> None:
        """Pin (and promote) or unpin rel. A pin that cannot be honoured is
        not kept: the error is raised and the file stays unpinned."""
        e = self._entry(rel)
        was = e.record.pinned
        e.record.pinned = pinned
        self._dirty.add(rel)
        if pinned:
            try:
                await self.warm(rel)
            except BaseException:
                e.record.pinned = was
                raise
        elif self.core.free < 0:
            self._shrink()  # pins kept copies past a budget lowered since

    def _shrink(self, floor: bool = False) -> None:
        """Evict, in policy order, until the copies fit the budget again or
        only pinned (and held) ones are left; `floor`: counted as the
        memory floor's (apply_floor)."""
        for rel in self.core.shrink_to_budget(
                lambda rel: not (self.entries[rel].record.pinned
                                 or self._held(self.entries[rel]) is not None)):
            nbytes = self.entries[rel].fast_bytes
            self._drop_fast(rel)
            self.stats.evictions += 1
            if floor:
                self.stats.floor_evictions += 1
                self.stats.floor_evicted_bytes += nbytes

    def apply_floor(self, available: int | None) -> None:
        """One poll of the free-memory floor: the budget memfloor allows for
        `available` (MemAvailable) becomes the effective one, and the tier
        is brought within it. Copies go the ordinary way (_drop_fast):
        never a pinned one, nor one passthrough opens hold (it would free
        nothing before they close); an open reading a dropped copy goes on
        with the cold file it opened. Promotions in flight are cancelled
        while the tier is still over: their temporary copies are RAM too,
        and their readers fall back to their cold files likewise."""
        core = self.core
        self.mem_available = available
        was = core.limit < core.budget
        core.limit = memfloor.effective_budget(core.budget, core.limit, core.used, available,
                                               self.min_free)
        shrunk = core.limit < core.budget
        s = self.stats
        if shrunk and not was:
            self._floor_from = (s.floor_evictions, s.floor_evicted_bytes)
            # a warning: the box is near the OOM killer, and reads go to the
            # cold tier until it is not (journalctl -p warning shows it)
            log.warning("memory is short: %s available, %s below the floor of %s "
                        "(--fast-min-free); the fast tier gives up copies, its budget "
                        "down from %s to %s", format_size(available),
                        format_size(self.min_free - available), format_size(self.min_free),
                        format_size(core.budget), format_size(core.limit))
        elif was and not shrunk:
            files, nbytes = (s.floor_evictions - self._floor_from[0],
                             s.floor_evicted_bytes - self._floor_from[1])
            log.info("memory is back: %s available; the fast tier's budget is %s again "
                     "(%d copies, %s, were evicted for the floor)", format_size(available),
                     format_size(core.budget), files, format_size(nbytes))
        if core.free < 0:
            self._shrink(floor=True)
        if core.free < 0:
            for e in self.entries.values():
                if _active(e.prom):
                    e.prom.cancel()
