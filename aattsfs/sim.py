"""Offline replay of an access trace through the daemon's own policy code,
and the offline optimum to report it against.

A trace is a list of opens (docs/trace-format.md); a file is cached whole,
as in the daemon. `simulate` takes the very `EvictionPolicy` classes and
`choose_victims` the daemon uses. The optimum:

- `belady_min`: Belady's MIN for files of equal size (evict the file whose
  next open is furthest away) — the best possible hit ratio;
- `byte_bound`: the same rule applied to bytes, letting a file be cached in
  part. Any whole-file policy is one such byte policy, so its byte hits are
  an upper bound for every policy on real file sizes.
"""

from __future__ import annotations

import heapq
import json
import math
from dataclasses import dataclass
from typing import Callable, Container, Hashable, Iterable

from collections import OrderedDict

from .errors import UserError
from .learn import IMPORTED, Imported, Learner, plan
from .policy import Admission, AdmitAll, EvictionPolicy
from .residency import Residency

INF = float("inf")
_NONE = object()


@dataclass(frozen=True)
class Request:
    path: str
    size: int
    stream: Hashable = None  # the opening process; None: one stream throughout
    t: float | None = None  # when, in seconds (only gaps matter); None: right after the last


@dataclass
class Result:
    requests: int = 0
    hits: int = 0
    bytes_requested: int = 0
    hit_bytes: int = 0
    prefetched_bytes: int = 0  # fetched from cold ahead of any request
    prefetch_used_bytes: int = 0  # of those, requested while still cached
    prefetch_wasted_bytes: int = 0  # of those, evicted before any request
    bypasses: int = 0  # misses read from the cold tier without a copy (not admitted)
    bypassed_bytes: int = 0
    # Time, with a cold-tier bandwidth (`simulate`): the replay's length,
    # of which waiting for the cold tier, and the length reading every open
    # from the cold tier directly would take.
    seconds: float = 0.0
    stall_seconds: float = 0.0
    direct_seconds: float = 0.0
    late: int = 0  # opens that found their file staged but still on its way

    @property
    def slowdown(self) -> float:
        """The replay's length against reading directly: above 1, slower."""
        return self.seconds / self.direct_seconds if self.direct_seconds else 1.0

    @property
    def hit_ratio(self) -> float:
        return self.hits / self.requests if self.requests else 0.0

    @property
    def byte_hit_ratio(self) -> float:
        return self.hit_bytes / self.bytes_requested if self.bytes_requested else 0.0

    @property
    def cold_bytes(self) -> int:
        """Every byte read from the cold tier: demand misses and prefetches."""
        return self.bytes_requested - self.hit_bytes + self.prefetched_bytes

    @property
    def precision(self) -> float:
        return self.prefetch_used_bytes / self.prefetched_bytes if self.prefetched_bytes \
            else 0.0

    @property
    def recall(self) -> float:
        """Share of the bytes that would have missed that prefetch provided."""
        missed = self.bytes_requested - self.hit_bytes + self.prefetch_used_bytes
        return self.prefetch_used_bytes / missed if missed else 0.0


MAX_LIVE = 64  # streams forecast for at once (prefetcher.MAX_LIVE)
MAX_SIZE = 1 << 62  # a file size past any disk: a corrupt trace, not a workload


def read_trace(lines: Iterable[str | bytes],
               check_path: Callable[[str], None] | None = None) -> list[Request]:
    """Opens from a JSON-lines trace (text or bytes lines); other events and
    blank lines are skipped. Raises ValueError naming the first line that is
    not a valid event, and what is wrong with it; `check_path` raises
    ValueError for a path the caller refuses (a trace to learn from must
    name files of the mount: control.check_learnable)."""
    out = []
    for n, line in enumerate(lines, 1):
        try:
            request = _request(line, check_path)
        except ValueError as exc:
            raise ValueError(f"line {n} is not a trace event: {exc}") from None
        if request is not None:
            out.append(request)
    return out


def read_trace_file(lines: Iterable[str | bytes], name: str,
                    check_path: Callable[[str], None] | None = None) -> list[Request]:
    """read_trace of the file `name`; a mistake in it, or no open event in
    it, is one UserError naming the file."""
    try:
        requests = read_trace(lines, check_path)
    except ValueError as exc:
        raise UserError(f"{name}: {exc}") from None
    except OSError as exc:
        raise UserError(f"cannot read {name}: {exc.strerror}") from None
    if not requests:
        raise UserError(f"{name} holds no open events")
    return requests


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _request(line: str | bytes, check_path: Callable[[str], None] | None = None
             ) -> Request | None:
    """The open one trace line records, None for another event; checks every
    field it uses, so that no odd value reaches the replay as a crash."""
    if isinstance(line, bytes):
        try:
            line = line.decode()
        except UnicodeDecodeError:
            raise ValueError("not UTF-8 text") from None
    if not line.strip():
        return None
    try:
        ev = json.loads(line)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    except ValueError as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(ev, dict):
        raise ValueError(f"not a JSON object but {json.dumps(ev)[:40]}")
    return check_open(ev, check_path)


def check_open(ev: dict, check_path: Callable[[str], None] | None = None) -> Request | None:
    """The open a trace event records, None for another kind of event;
    ValueError saying what is wrong otherwise. (The control socket checks
    each event an import sends with it too.)"""
    op = ev.get("op", "open")
    if not isinstance(op, str):
        raise ValueError('"op" is not a string')
    if op != "open":
        return None
    path, size = ev.get("path"), ev.get("size")
    if not isinstance(path, str) or not path:
        raise ValueError('an open needs "path", a non-empty string')
    if check_path is not None:
        check_path(path)
    if not (_is_int(size) and 0 <= size <= MAX_SIZE):
        raise ValueError(f'an open needs "size", an integer of bytes from 0 to 2**62, '
                         f'not {json.dumps(size)[:40]}')
    t = ev.get("t")
    if t is not None and not (isinstance(t, (int, float)) and not isinstance(t, bool)
                              and math.isfinite(t)):
        raise ValueError(f'"t" is not a number but {json.dumps(t)[:40]}')
    source = ev.get(IMPORTED)
    if source is not None and not (isinstance(source, str) and 0 < len(source) <= 64):
        raise ValueError(f'"{IMPORTED}" is not an import\'s id but {json.dumps(source)[:40]}')
    if "pid" not in ev and source is None:
        return Request(path, size, None, t)
    pid, start = ev.get("pid"), ev.get("start")  # the stream: (pid, process start time)
    if "pid" in ev and not _is_int(pid):
        raise ValueError(f'"pid" is not an integer but {json.dumps(pid)[:40]}')
    if start is not None and not (isinstance(start, (int, float)) and not
                                  isinstance(start, bool) and math.isfinite(start)):
        raise ValueError(f'"start" is not a number or null but {json.dumps(start)[:40]}')
    # an open imported from another box is of a process there (learn.Imported)
    return Request(path, size, (pid, start) if source is None else Imported(source, pid, start),
                   t)


def open_event(r: Request) -> dict:
    """The event an open is sent and kept as when a trace is imported (the
    other way round from `check_open`): its process's pid and start, not
    the import it may have come with on the exporting box (the importing
    box tags it with its own, docs/fleet.md)."""
    ev = {"t": 0.0 if r.t is None else r.t, "op": "open", "path": r.path, "size": r.size}
    if isinstance(r.stream, Imported):
        pid, start = r.stream.pid, r.stream.start
    else:
        pid, start = r.stream if r.stream is not None else (None, None)
    if pid is not None:
        ev.update(pid=pid, start=start)
    return ev


def simulate(trace: list[Request], budget: int, policy: EvictionPolicy,
             learner: Learner | None = None, prefetch: bool = True,
             admission: Admission | None = None, cold_bandwidth: float = INF) -> Result:
    """Replay opens through the daemon's residency core: a miss brings the
    whole file in if it fits the budget and is admitted, evicting as the
    daemon would. With a `learner`, every open also updates its forecast,
    which a predictive policy ranks evictions by and, if `prefetch`, which
    is staged ahead of the requests. A prefetch never evicts a file
    expected sooner than the one it brings in.

    Time (docs/trace-format.md): the cold tier reads `cold_bandwidth` bytes
    a second, one file after the other, demand reads and prefetches alike;
    the fast tier costs nothing. Opens follow each other with the trace's
    gaps, and an open waits for its file: a miss for its read, behind any
    prefetch already reading; a staged file still on its way until it
    arrives. So a wasted prefetch delays the demand reads behind it. With
    an unlimited bandwidth (the default) a staged file is there at once."""
    res = Result()
    core = Residency(budget, policy, admission or AdmitAll())
    prefetched: set[str] = set()  # staged, not requested since
    sizes: dict[str, int] = {}

    def admit(path: str, size: int, protect: Container, ahead: bool = False) -> bool:
        victims, why = core.room(path, size, protect=protect, ahead=ahead)
        if why is not None:
            return False
        for key in victims:
            core.release(core.drop(key))
            if key in prefetched:
                prefetched.discard(key)
                res.prefetch_wasted_bytes += sizes[key]
        return core.reserve(size)

    # The cold tier: the staging queue of the latest plan (files start in
    # its order, each once the tier is free), the prefetch reading, and
    # when the tier is free again.
    queue: list[tuple[str, Container]] = []
    queued_at = 0.0
    flight: list = []  # [path, start, arrival] of the prefetch reading
    busy = 0.0

    def transfer(size: int) -> float:
        return size / cold_bandwidth

    def advance(until: float) -> None:
        """Run the cold tier up to `until`: prefetches arrive and start."""
        nonlocal busy, queue
        while True:
            if flight and flight[2] <= until:
                path = flight[0]
                core.commit(path, sizes[path])
                prefetched.add(path)
                flight.clear()
            elif not flight and queue and max(busy, queued_at) <= until:
                path, protect = queue.pop(0)
                if path in core.resident or not admit(path, sizes[path], protect, True):
                    continue
                res.prefetched_bytes += sizes[path]
                start = max(busy, queued_at)
                busy = start + transfer(sizes[path])
                flight[:] = [path, start, busy]
            else:
                return

    # A stream is live from its first open to its last (the daemon asks the
    # kernel whether the process still runs); the forecast covers them all,
    # the latest first, as the daemon's prefetcher does.
    last_open = {r.stream: i for i, r in enumerate(trace)}
    live: OrderedDict = OrderedDict()
    found: dict = {}  # stream -> whether its latest use found the file resident
    now, think, previous = 0.0, 0.0, None
    for i, r in enumerate(trace):
        if r.t is not None and previous is not None:
            gap = max(0.0, r.t - previous)
            now += gap
            think += gap
        previous = r.t if r.t is not None else previous
        advance(now)
        res.requests += 1
        sizes[r.path] = r.size
        staged: list = []
        if learner is not None:
            # observe first: admission judges the file's next use after this one
            learner.observe(r.stream, r.path)
            live[r.stream] = None
            live.move_to_end(r.stream)
            if len(live) > MAX_LIVE:
                live.popitem(last=False)
            streams = [s for s in reversed(live) if last_open[s] >= i]
            ranking, staged = plan(learner, streams, sizes.__getitem__, budget,
                                 also=frozenset([r.path]))
            core.set_forecast(ranking)
            if prefetch and flight and flight[0] != r.path and \
                    flight[0] not in {k for k, _ in staged}:
                # stale (and not the file opened now): cancelled at once, as
                # the daemon's planner does; the bytes read so far are wasted
                path, start, arrival = flight
                done = int(sizes[path] * (now - start) / (arrival - start))
                res.prefetch_wasted_bytes += done
                res.prefetched_bytes -= sizes[path] - done
                core.abandon(path, sizes[path])
                busy = now
                flight.clear()
        opened_at = now
        if core.opened(r.path, r.size, r.stream):
            # the same use as the stream's previous open: no bytes again, and
            # found or not as that open was (on the mount, the first open's
            # copy is still in flight when the loader opens the file again)
            res.hits += found[r.stream]
        else:
            res.bytes_requested += r.size
            if flight and flight[0] == r.path:  # staged, on its way: wait for it
                res.late += 1
                now = flight[2]
                advance(now)
            found[r.stream] = r.path in core.resident
            if found[r.stream]:
                res.hits += 1
                res.hit_bytes += r.size
                if r.path in prefetched:
                    prefetched.discard(r.path)
                    res.prefetch_used_bytes += r.size
            else:
                # read from cold once the tier is free; a demand read never
                # evicts what the forecast stages (as in Store)
                queue = [q for q in queue if q[0] != r.path]
                now = busy = max(now, busy) + transfer(r.size)
                if not admit(r.path, r.size, frozenset(k for k, _ in staged)):
                    res.bypasses += 1
                    res.bypassed_bytes += r.size
                else:
                    core.commit(r.path, r.size)
        res.stall_seconds += now - opened_at
        if not prefetch:
            continue
        queue = [(key, protect) for key, protect in staged
                 if key not in core.resident and key not in flight[:1]]
        queued_at = opened_at
    advance(INF)  # the last plan's staging goes on after the last open
    for key in prefetched:  # staged but never requested before the trace ended
        res.prefetch_wasted_bytes += sizes[key]
    res.seconds = now
    res.direct_seconds = think + transfer(res.bytes_requested)
    return res


def _reopens(trace: list[Request]) -> list[bool]:
    """For each open, whether it continues its stream's previous open of the
    same file: the same use, as `Residency.opened` counts it."""
    latest: dict = {}
    again = []
    for r in trace:
        again.append(latest.get(r.stream, _NONE) == r.path)
        latest[r.stream] = r.path
    return again


def _next_uses(trace: list[Request], again: list[bool]) -> list[float]:
    nxt: list[float] = [INF] * len(trace)
    last: dict[str, int] = {}
    for i in range(len(trace) - 1, -1, -1):
        if not again[i]:
            nxt[i] = last.get(trace[i].path, INF)
            last[trace[i].path] = i
    return nxt


def belady_min(trace: list[Request], capacity: int) -> Result:
    """The optimal hits with room for `capacity` files (all of one size)."""
    res = Result()
    again = _reopens(trace)
    nxt = _next_uses(trace, again)
    when: dict[str, float] = {}  # resident path -> its next use
    heap: list[tuple[float, str]] = []  # (-next use, path), lazily invalidated
    found: dict = {}  # stream -> whether its latest use hit
    for i, r in enumerate(trace):
        res.requests += 1
        if again[i]:  # the same use as the stream's open before it
            res.hits += found[r.stream]
            continue
        res.bytes_requested += r.size
        found[r.stream] = r.path in when
        if found[r.stream]:
            res.hits += 1
            res.hit_bytes += r.size
        when[r.path] = nxt[i]
        heapq.heappush(heap, (-nxt[i], r.path))
        while len(when) > capacity:
            neg, path = heapq.heappop(heap)
            if when.get(path) == -neg:
                del when[path]  # may be the file just opened: then it bypasses
    return res


def byte_bound(trace: list[Request], budget: int) -> Result:
    """An upper bound on the byte hits of any policy, for real file sizes:
    MIN over bytes, where a file may stay cached in part."""
    res = Result()
    again = _reopens(trace)
    nxt = _next_uses(trace, again)
    held: dict[str, int] = {}  # bytes of each file in the cache
    when: dict[str, float] = {}
    heap: list[tuple[float, str]] = []
    total = 0
    whole: dict = {}  # stream -> whether its latest use found the whole file
    for i, r in enumerate(trace):
        res.requests += 1
        if again[i]:  # the same use as the stream's open before it
            res.hits += whole[r.stream]
            continue
        res.bytes_requested += r.size
        cached = held.get(r.path, 0)
        res.hit_bytes += cached
        whole[r.stream] = cached == r.size
        res.hits += whole[r.stream]
        total += r.size - cached
        held[r.path] = r.size
        when[r.path] = nxt[i]
        heapq.heappush(heap, (-nxt[i], r.path))
        while total > budget:
            neg, path = heapq.heappop(heap)
            if when.get(path) != -neg or not held.get(path):
                continue
            drop = min(held[path], total - budget)
            held[path] -= drop
            total -= drop
            if held[path]:
                heapq.heappush(heap, (neg, path))
            else:
                del held[path], when[path]
    return res
