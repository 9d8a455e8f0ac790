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
from dataclasses import dataclass
from typing import Iterable

from .policy import EvictionPolicy, choose_victims

INF = float("inf")


@dataclass(frozen=True)
class Request:
    path: str
    size: int


@dataclass
class Result:
    requests: int = 0
    hits: int = 0
    bytes_requested: int = 0
    hit_bytes: int = 0

    @property
    def hit_ratio(self) -> float:
        return self.hits / self.requests if self.requests else 0.0

    @property
    def byte_hit_ratio(self) -> float:
        return self.hit_bytes / self.bytes_requested if self.bytes_requested else 0.0

    @property
    def cold_bytes(self) -> int:
        return self.bytes_requested - self.hit_bytes


def read_trace(lines: Iterable[str]) -> list[Request]:
    """Opens from a JSON-lines trace; other events and blank lines are skipped.
    Raises ValueError naming the line that is not a valid event."""
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            ev = json.loads(line)
            if ev.get("op", "open") == "open":
                out.append(Request(str(ev["path"]), int(ev["size"])))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"line {n} is not a trace event ({exc})") from None
    return out


def simulate(trace: list[Request], budget: int, policy: EvictionPolicy) -> Result:
    """Replay opens through `policy`: a miss admits the whole file if it fits
    the budget, evicting as the daemon would."""
    res = Result()
    resident: dict[str, int] = {}
    free = budget
    for r in trace:
        res.requests += 1
        res.bytes_requested += r.size
        if r.path in resident:
            res.hits += 1
            res.hit_bytes += r.size
            policy.access(r.path)
            continue
        if r.size > budget:
            continue
        victims, enough = choose_victims(policy, r.size, free, resident.__getitem__,
                                         lambda _key: True)
        if not enough:
            continue
        for key in victims:
            free += resident.pop(key)
            policy.remove(key)
        resident[r.path] = r.size
        free -= r.size
        policy.admit(r.path, r.size)
    return res


def _next_uses(trace: list[Request]) -> list[float]:
    nxt: list[float] = [INF] * len(trace)
    last: dict[str, int] = {}
    for i in range(len(trace) - 1, -1, -1):
        nxt[i] = last.get(trace[i].path, INF)
        last[trace[i].path] = i
    return nxt


def belady_min(trace: list[Request], capacity: int) -> Result:
    """The optimal hits with room for `capacity` files (all of one size)."""
    res = Result()
    nxt = _next_uses(trace)
    when: dict[str, float] = {}  # resident path -> its next use
    heap: list[tuple[float, str]] = []  # (-next use, path), lazily invalidated
    for i, r in enumerate(trace):
        res.requests += 1
        res.bytes_requested += r.size
        if r.path in when:
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
    nxt = _next_uses(trace)
    held: dict[str, int] = {}  # bytes of each file in the cache
    when: dict[str, float] = {}
    heap: list[tuple[float, str]] = []
    total = 0
    for i, r in enumerate(trace):
        res.requests += 1
        res.bytes_requested += r.size
        cached = held.get(r.path, 0)
        res.hit_bytes += cached
        res.hits += cached == r.size
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
