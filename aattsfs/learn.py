"""Learning the open sequence of many processes at once, and turning it into
the list of files to stage. Plain synchronous code, shared by the daemon's
prefetcher and the simulator (docs/prediction.md explains the design).

Two orders are learned, with the same predictor class:

- *within* a process (a stream, keyed by pid and process start time): one
  predictor's counts shared by every stream, each stream with its own
  context, so a loader's order is learned from every run of it and two
  processes loading at once do not garble each other's context;
- *across* processes: the chain of the first file each process opens
  (typically a model's `config.json`), whose successor says which model a
  pipeline of fresh processes loads next.

A forecast lists the rest of each live stream (the files format hints
promised it and it has not opened yet, then the learned continuation), then
the next processes of the chain, each expanded into the files it is
expected to open.

Opens imported from another box (`aattsfs trace import`, `--learn-from`;
docs/fleet.md) teach the same counts, but their streams are keyed apart
(`Imported`): a pid there is not a process here, and one import's chain of
processes is its own sequence, never stitched onto this box's.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Container, Hashable, Iterable, Iterator, Sequence

from .predict import Key, forecast, make_predictor

PREFETCH_MIN_PROB = 0.5  # stage a file only if it is more likely needed than not
RANK_HORIZON = 4  # budgets' worth of forecast that evictions rank by
# A forecast follows a path down to this probability: far enough to rank
# the files of a loop whose steps each hold 19 times in 20 (a file skipped
# now and then): at 0.05 it stopped after some 60 steps, and the files
# beyond, taken for not expected at all, were the first a prefetch evicted.
RANK_MIN_PROB = 1e-4
RANK_STEPS = 1024
MAX_STREAMS = 1024  # streams remembered; the oldest is forgotten first
MAX_SOURCES = 64  # imports whose chain context is remembered
REPLAY_STEP = 1000  # opens a replay learns between two pauses (`Learner.replaying`)
IMPORTED = "imported"  # the event field naming the import an open came with

Stream = Hashable
Forecast = list[tuple[Key, float]]


def _no_hints(key: Key) -> list[Key]:
    return []


@dataclass(frozen=True)
class Imported:
    """The stream of a process that ran on another box, as one import
    (`source`, the import's id) recorded it. Never equal to a local stream
    (pid, start): a pid there must not continue, or be taken for, a process
    here."""

    source: str
    pid: int | None
    start: float | None


def stream_key(ev: dict) -> Stream:
    """The stream a trace event belongs to: its process, or for an imported
    event, its process within that import."""
    pid, start = ev.get("pid"), ev.get("start")
    return (pid, start) if IMPORTED not in ev else Imported(ev[IMPORTED], pid, start)


class ImportId:
    """The id of an import: a digest of its opens as sent (`sim.open_event`),
    whatever the file's formatting or other events, so that a trace
    imported twice, or imported and also given to --learn-from, is learned
    once. Fed batch by batch (`add`), as the control socket receives it."""

    def __init__(self, opens: Iterable[dict] = ()) -> None:
        self._digest = hashlib.sha256()
        self.add(opens)

    def add(self, opens: Iterable[dict]) -> None:
        for ev in opens:
            self._digest.update(json.dumps(ev, sort_keys=True).encode() + b"\n")

    def __str__(self) -> str:
        return self._digest.hexdigest()[:16]


class _StreamState:
    __slots__ = ("context", "opened", "pending")

    def __init__(self) -> None:
        self.context: list = []  # the latest opens, as many as the predictor reads
        self.opened: set = set()
        self.pending: dict = {}  # files the format hints promised, not opened yet


class Learner:
    def __init__(self, predictor: str) -> None:
        self.within = make_predictor(predictor)
        self.chain = make_predictor(predictor)
        self.streams: OrderedDict[Stream, _StreamState] = OrderedDict()
        # each import's chain context: its processes follow one another, not
        # this box's (None, the chain's own history, is this box's)
        self._chains: OrderedDict[str, list] = OrderedDict()

    def observe(self, stream: Stream, key: Key, hinted: Iterable[Key] = ()) -> bool:
        """`stream` opened `key`, after which the format hints expect `hinted`;
        True if that was the stream's first open."""
        state = self.streams.get(stream)
        first = state is None
        if first:
            state = self.streams[stream] = _StreamState()
            self.chain.observe(key, self._chain_context(stream))
            while len(self.streams) > MAX_STREAMS:
                self.streams.popitem(last=False)
        else:
            self.streams.move_to_end(stream)
        self.within.observe(key, state.context)
        state.opened.add(key)
        state.pending.pop(key, None)
        # A loader reads each hinted file once: promised files stay expected
        # through the process's other opens, until it opens them.
        state.pending.update((k, None) for k in hinted if k not in state.opened)
        return first

    def _chain_context(self, stream: Stream) -> list | None:
        if not isinstance(stream, Imported):
            return None
        context = self._chains.setdefault(stream.source, [])
        self._chains.move_to_end(stream.source)
        while len(self._chains) > MAX_SOURCES:
            self._chains.popitem(last=False)
        return context

    def replaying(self, events: Sequence[dict]) -> Iterator[None]:
        """Learn the opens of a recorded trace (the ring at start, an import)
        as if they were seen now, pausing (yielding) every REPLAY_STEP opens
        so that the daemon can serve between. An imported stream is
        forgotten after its last open here: no process on this box continues
        it, and kept, a large import would push the streams of live
        processes out of the MAX_STREAMS remembered."""
        opens = [(stream_key(ev), ev["path"]) for ev in events if ev.get("op") == "open"]
        last = {s: i for i, (s, _) in enumerate(opens) if isinstance(s, Imported)}
        for i, (stream, key) in enumerate(opens):
            self.observe(stream, key)
            if last.get(stream) == i:
                self.streams.pop(stream, None)
            if i % REPLAY_STEP == REPLAY_STEP - 1:
                yield

    def replay(self, events: Sequence[dict]) -> None:
        """`replaying` without pauses."""
        for _ in self.replaying(events):
            pass

    def forecast(self, streams: Iterable[Stream], size_of: Callable[[Key], int],
                 budget: int, hints: Callable[[Key], list[Key]] = _no_hints,
                 max_steps: int = 64, min_prob: float = 0.05) -> Forecast:
        """The files expected next, soonest first, with probabilities, until
        their sizes add up to `budget`: the rest of each of `streams` (most
        urgent first, interleaved), then the processes the chain expects
        next. `hints(key)` lists the files a loader reads after opening key."""
        parts = [self._continuation(self.streams[s].context, 1.0, self.streams[s].pending,
                                    size_of, budget, max_steps, min_prob)
                 for s in streams if s in self.streams]
        out = _merge(parts)
        for first, p in forecast(self.chain, lambda k: 0, budget, max_steps=8):
            if sum(size_of(k) for k, _ in out) >= budget:
                break
            promised = [k for k in hints(first) if k != first]
            out = _concat(out, [(first, p)], self._continuation(
                [first], p, promised, size_of, budget, max_steps, min_prob))
        return _until(out, size_of, budget)

    def _continuation(self, context: Sequence[Key], p0: float, promised: Iterable[Key],
                      size_of, budget: int, max_steps: int, min_prob: float) -> Forecast:
        """What follows `context` (reached with probability p0): the files
        the format hints promised, then the learned order."""
        learned = [(k, p0 * q) for k, q in forecast(self.within, size_of, budget,
                                                    max_steps=max_steps, context=context,
                                                    min_prob=min_prob)]
        return _concat([(k, p0) for k in promised], learned)


def _merge(parts: list[Forecast]) -> Forecast:
    """Interleave forecasts of streams running side by side (the first of
    each, then the second ...), keeping each file's soonest place."""
    return _concat([part[i] for i in range(max(map(len, parts), default=0))
                    for part in parts if i < len(part)])


def _concat(*parts: Iterable[tuple[Key, float]]) -> Forecast:
    """One forecast after the other, keeping each file's soonest place."""
    out: Forecast = []
    seen: set = set()
    for part in parts:
        for key, p in part:
            if key not in seen:
                seen.add(key)
                out.append((key, p))
    return out


def _until(ahead: Forecast, size_of: Callable[[Key], int], budget: int) -> Forecast:
    used = 0
    for i, (key, _) in enumerate(ahead):
        used += size_of(key)
        if used >= budget:
            return ahead[:i + 1]
    return ahead


def staging(ahead: Forecast, size_of: Callable[[Key], int], budget: int,
            min_prob: float = PREFETCH_MIN_PROB) -> list[int]:
    """Positions in `ahead` worth staging: files more likely needed than not,
    soonest first, up to `budget` bytes. Staging the i-th may evict only
    files not among ahead[:i + 1] (see `ExpectedBy`)."""
    out, staged = [], 0
    for i, (key, prob) in enumerate(ahead):
        if prob < min_prob:
            continue
        staged += size_of(key)
        if staged > budget:
            break
        out.append(i)
    return out


class ExpectedBy:
    """The files expected no later than position i of a forecast, plus
    `also`: staging the i-th must not evict them. A view, not a copy, so
    that protecting each of n staged files costs O(n), not O(n^2)."""

    __slots__ = ("_rank", "_i", "_also")

    def __init__(self, rank: dict[Key, int], i: int, also: Container = frozenset()) -> None:
        self._rank, self._i, self._also = rank, i, also

    def __contains__(self, key: Key) -> bool:
        return key in self._also or self._rank.get(key, self._i + 1) <= self._i


def ranks(ahead: Forecast) -> dict[Key, int]:
    """Each file's position in a forecast."""
    return {k: i for i, (k, _) in enumerate(ahead)}


class _AnyOf:
    """Membership in any of some sets (a view: they go on growing)."""

    __slots__ = ("_sets",)

    def __init__(self, sets: list[Container]) -> None:
        self._sets = sets

    def __contains__(self, key: Key) -> bool:
        return any(key in s for s in self._sets)


def plan(learner: Learner, streams: list[Stream], size_of: Callable[[Key], int],
         budget: int, hints: Callable[[Key], list[Key]] = _no_hints,
         also: frozenset = frozenset()
         ) -> tuple[Callable[[], dict[Key, int]], list[tuple[Key, ExpectedBy]]]:
    """What the prefetcher of the daemon and of the simulator plans after an
    open, for `streams` (the one that just opened first, then the other
    live ones, most recent first): the files to stage, one budget's worth
    of the forecast, each with the files it must not evict (those expected
    sooner, those a live process has opened, and `also`); and the ranking
    that evictions follow, each file's place among those expected in the
    next RANK_HORIZON budgets (`ranks`), computed when first asked for.

    The ranking reaches past what is staged so that a prefetch (and the
    predictive policy) evicts the file expected last (Residency.
    set_forecast). On a cycle longer than the budget, what MIN keeps is a
    fixed part of it; a prefetch that evicted in recency order pushed out
    exactly that part, which then had to be read again: every byte of every
    pass came from the cold tier (docs/prefetch.md). It is computed only
    when an eviction needs it: with everything in the fast tier, most plans
    are followed by none, and on a per-tensor model four budgets are
    thousands of files, planned up to fifty times a second.

    A live process's files stay for the same reason: a loader past its
    first shards would otherwise stage the next in their place, so that on
    a model larger than the budget every shard is copied and evicted on
    every load; kept, the first shards serve the next load from the fast
    tier and the rest is read from cold, what MIN does. (A stream of None,
    a trace that names no processes, is not one process, and protects
    nothing.)"""
    ahead = learner.forecast(streams, size_of, budget, hints=hints)
    rank = ranks(ahead)
    in_use = _AnyOf([also, *(learner.streams[s].opened for s in streams
                             if s is not None and s in learner.streams)])
    ranking = functools.cache(lambda: ranks(learner.forecast(
        streams, size_of, RANK_HORIZON * budget, hints, RANK_STEPS, RANK_MIN_PROB)))
    return ranking, [(ahead[i][0], ExpectedBy(rank, i, in_use))
                     for i in staging(ahead, size_of, budget)]
