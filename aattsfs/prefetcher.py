"""The prefetcher: a trio task that learns from access events and turns the
forecast into promotions (docs/prediction.md).

The store sends every open and, at release, the read ranges of each open
over a memory channel (and keeps them for the trace itself); the read path
never waits for this task. Each event names its stream, (process id,
process start time), resolved while the request was pending. An open
teaches the learner; then the forecast for the live streams is made: the
predictive eviction policy ranks by it, its likely part replaces the
staging queue, and prefetches in flight that left it are cancelled (at
most once per PLAN_INTERVAL: the latest open is always planned for).

`jobs` workers take files from the queue and promote them, each holding
the forecast files expected sooner than it as protected from eviction; the
store paces their cold reads to the bandwidth cap. With prefetch off, the
task still learns, so turning it on later starts from what was seen.

Opens recorded on another box seed the learner too (docs/fleet.md): a
`--learn-from` file at start, replayed after the ring and not kept, and
`aattsfs trace import` while serving, kept in the ring. Each import is
learned once, by its id, and its processes are keyed apart from this box's.
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from typing import Iterator, Sequence

import trio

from . import hints
from .learn import IMPORTED, ExpectedBy, Learner, plan
from .procs import Stream, alive
from .store import Promotion, Store, remember

log = logging.getLogger(__name__)

MAX_LIVE = 64  # processes whose streams are forecast for at once
MAX_CACHED = 4096  # entries of each cache: hints, sizes of hinted files, checked headers
# At most one plan per interval: a loader opening hundreds of small files
# (one per tensor) would otherwise pay a forecast on every open. The
# forecast reaches far ahead, so planning a few opens late loses nothing.
PLAN_INTERVAL = 0.02


class Prefetcher:
    def __init__(self, store: Store, predictor: str = "markov", enabled: bool = True,
                 jobs: int = 2) -> None:
        self.store = store
        self.learner = Learner(predictor)
        self.enabled = enabled
        self.jobs = jobs
        self._queue: list[tuple[str, ExpectedBy]] = []  # (file, files it must not evict)
        self._wake = trio.Event()
        self._starting = trio.Lock()
        self._replan = trio.Event()
        self._pending = False  # an open came that is not planned for yet
        self._live: OrderedDict[Stream, None] = OrderedDict()
        self._hinted: OrderedDict[str, list[str]] = OrderedDict()  # rel -> model files
        # sizes of files not opened here yet that hints or imports name
        self._sizes: OrderedDict[str, int] = OrderedDict()
        self._checked: OrderedDict[tuple, bool] = OrderedDict()  # (rel, size, mtime) -> complete
        self._inflight: dict[str, Promotion] = {}
        self.imported: set[str] = set()  # ids of the imports learned (learn.ImportId)

    def learn_from(self, events: Sequence[dict]) -> None:
        """Replay a trace (the LMDB ring at start) into the learner, and the
        names files were opened by."""
        for _ in self._replaying(events):
            pass

    def learn_file(self, opens: list[dict], source: str) -> bool:
        """Learn the opens of a --learn-from file (at start, after the ring),
        as import `source`; not kept: the file is read again at each start.
        False if the ring holds that import already (`aattsfs trace import`
        of the same trace): it is not learned twice."""
        if source in self.imported:
            return False
        self.learn_from([{**ev, IMPORTED: source} for ev in opens])
        return True

    async def seed(self, opens: list[dict], source: str) -> bool:
        """Learn opens another box recorded (`aattsfs trace import`, already
        checked) as import `source`, and keep them in the ring so that a
        restart remembers them. False if that import is learned already.
        Replayed in steps, serving requests between (100,000 opens take
        about a second)."""
        if source in self.imported:
            return False
        self.imported.add(source)
        tagged = [{**ev, IMPORTED: source} for ev in opens]
        # kept first: should shutdown cut the replay short, the next start
        # replays the whole import from the ring
        self.store.keep_events(tagged)
        for _ in self._replaying(tagged):
            await trio.sleep(0)
        return True

    def _replaying(self, events: Sequence[dict]) -> Iterator[None]:
        for ev in events:
            if IMPORTED in ev:
                self.imported.add(ev[IMPORTED])
                # sizes from the other box stand in for files not seen here yet,
                # so that the plan knows how much of the budget they take
                if ev.get("op") == "open" and ev.get("size") and \
                        ev["path"] not in self.store.entries:
                    remember(self._sizes, ev["path"], ev["size"], MAX_CACHED)
            if ev.get("op") == "open" and "via" in ev:
                self.store.name(ev["path"], ev["via"])
        yield from self.learner.replaying(events)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.store.plan_pending = self.plan_pending
        async with trio.open_nursery() as nursery:
            for _ in range(self.jobs):
                nursery.start_soon(self._worker)
            nursery.start_soon(self._planner)
            task_status.started()
            async for ev in self.store.events_in:
                try:
                    await self._handle(ev)
                except Exception:  # prefetching is an optimisation: never let it stop serving
                    log.exception("prefetcher failed on %s; going on", ev)

    async def _handle(self, ev: dict) -> None:
        if ev["op"] != "open":
            return
        rel, stream = ev["path"], (ev["pid"], ev["start"])
        # a blob of a hub cache is hinted by the snapshot name it was opened by
        name = ev.get("via", rel)
        files: dict[str, int] = {}
        if hints.is_trigger(name):  # read again on every open: the model may have changed
            files = await self.store.cold_call(self._model_files, name)
            for f, n in files.items():
                remember(self._sizes, f, n, MAX_CACHED)
            remember(self._hinted, rel, list(files), MAX_CACHED)
        self.learner.observe(stream, rel, files)
        remember(self._live, stream, None, MAX_LIVE)
        self._pending = True
        self._replan.set()

    def plan_pending(self) -> None:
        """Plan now if an open is not planned for yet: the store asks before
        it decides on a promotion, which the forecast ranks (between two
        plans, throttled, the forecast would be an open behind)."""
        if self._pending:
            self._pending = False
            try:
                self._plan()
            except Exception:
                log.exception("prefetch planning failed; going on")

    async def _planner(self) -> None:
        while True:
            await self._replan.wait()
            self._replan = trio.Event()
            self.plan_pending()
            await trio.sleep(PLAN_INTERVAL)

    def _read_json(self, rel: str) -> dict:
        with os.fdopen(self.store.cold.open(self.store.cold.resolve(rel))[0], "rb") as f:
            return json.loads(f.read(16 << 20))

    def _model_files(self, rel: str) -> dict[str, int]:
        """The files the format hints expect after rel, with their sizes (in a
        worker thread: this reads the cold tier). Links are followed, as the
        loader's opens will: a hub snapshot's files are its blobs."""
        cold = self.store.cold
        files = {}
        try:
            for name in hints.model_files(rel, cold.exists, self._read_json):
                try:
                    real = cold.resolve(name)
                    st = cold.lstat(real)
                except OSError:
                    continue  # a dangling link: a blob not downloaded
                if self._complete(name, real, st):
                    files[real] = st.st_size
        except (OSError, ValueError, AttributeError, TypeError):
            return {}  # not a well-formed model directory: no hint
        return files

    def _complete(self, name: str, rel: str, st: os.stat_result) -> bool:
        """False for a safetensors file (by its name; rel is where the link
        `name` leads) whose header describes more data than it holds (still
        being written): staging it would waste the budget."""
        if not name.endswith(".safetensors"):
            return True
        key = (rel, st.st_size, st.st_mtime_ns)
        if key not in self._checked:
            fd = self.store.cold.open(rel)[0]
            try:
                hints.safetensors_layout(lambda off, n: os.pread(fd, n, off), st.st_size)
                ok = True
            except ValueError as exc:
                log.info("not staging %s: %s", rel, exc)
                ok = False
            finally:
                os.close(fd)
            remember(self._checked, key, ok, MAX_CACHED)
        return self._checked[key]

    def _size(self, rel: str) -> int:
        e = self.store.entries.get(rel)
        return e.record.size if e is not None and e.record.size else self._sizes.get(rel, 0)

    def _plan(self) -> None:
        # a process that has exited opens nothing more, and its files are no
        # longer in use (learn.plan); the chain still forecasts its successor
        for s in [s for s in self._live if not alive(s)]:
            del self._live[s]
        streams = list(reversed(self._live))
        core = self.store.core
        # within the effective budget: nothing is staged that the memory
        # floor would refuse room for
        ranking, staged = plan(self.learner, streams, self._size, core.limit,
                               hints=lambda k: self._hinted.get(k, []))
        core.set_forecast(ranking)
        if not self.enabled:
            return
        store = self.store
        wanted = frozenset(rel for rel, _ in staged)
        store.expected = wanted
        # Only files still to bring in are queued: checking a staged file
        # again would stat the cold tier, once per file per open.
        self._queue = [(rel, protect) for rel, protect in staged if store.absent(rel)]
        for rel, prom in self._inflight.items():
            if rel not in wanted and store.entries[rel].prefetched and not prom.cancelled:
                log.debug("prefetch of %s is stale; cancelled", rel)
                prom.cancel()
                store.stats.prefetches_cancelled += 1
        self._wake.set()

    async def _next(self) -> tuple[str, ExpectedBy]:
        while not self._queue:
            if self._wake.is_set():
                self._wake = trio.Event()
            await self._wake.wait()
        return self._queue.pop(0)

    async def _worker(self) -> None:
        while True:
            # Promotions start in queue order (the file needed first reserves
            # its room first), though starting one waits for a cold open.
            async with self._starting:
                rel, protect = await self._next()
                try:
                    prom = await self.store.prefetch(rel, protect)
                except OSError as exc:
                    log.debug("cannot prefetch %s: %s", rel, exc)
                    continue
            if prom is None:
                continue
            # A stale prefetch of rel may still be winding down under another
            # worker: each removes only its own entry.
            self._inflight[rel] = prom
            try:
                await prom.done.wait()
            finally:
                if self._inflight.get(rel) is prom:
                    del self._inflight[rel]
