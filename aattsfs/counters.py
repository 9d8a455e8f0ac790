"""What the daemon counts, defined once.

Each counter has one row in COUNTERS: the `Stats` attribute the store
increments, its place in `.aatts/stats` (which `aattsfs status` and the
dashboard read) and its Prometheus counter on /metrics (docs/operations.md
lists them; a test checks that every one is there and agrees with the
stats). A counter added here appears in all of them.

Plain code with no trio or FUSE; gauges (what the fast tier holds now, the
open files) are not counters and are read from the store when asked.
"""

from __future__ import annotations

import bisect
import itertools
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Counter:
    attr: str  # the Stats attribute
    key: str  # its place in .aatts/stats: "name" or "section.name"
    metric: str  # aattsfs_<metric>_total
    doc: str
    tier: str | None = None  # the `tier` label, for counters kept per tier


def _per_tier(attr: str, section: str, metric: str, doc: str) -> tuple[Counter, ...]:
    return tuple(Counter(f"{attr}_{t}", f"{section}.{t}", metric, doc, t)
                 for t in ("fast", "cold"))


COUNTERS: tuple[Counter, ...] = (
    *_per_tier("opens", "opens", "opens", "Opens, by the tier that served them."),
    *_per_tier("reads", "reads", "reads", "Read requests the daemon served, by tier."),
    *_per_tier("bytes", "bytes_served", "served_bytes", "Bytes the daemon served, by tier."),
    Counter("cold_bytes_read", "cold_bytes_read", "cold_read_bytes",
            "Bytes read from the cold tier, for readers and copies (rate(): its bandwidth)."),
    Counter("promotions", "promotions", "promotions", "Files copied into the fast tier."),
    Counter("promoted_bytes", "promoted_bytes", "promoted_bytes",
            "Bytes copied into the fast tier."),
    Counter("promotions_failed", "promotions_failed", "promotion_failures",
            "Copies that failed: the cold file unreadable, the fast tier full or failing."),
    Counter("promotions_nospace", "promotions_nospace", "promotion_failures_nospace",
            "Of those, copies that failed because the fast tier's filesystem was full "
            "(ENOSPC, EDQUOT; ENOMEM, a tmpfs short of memory). Never a cold-tier error."),
    Counter("promotions_cancelled", "promotions_cancelled", "promotions_cancelled",
            "Copies cancelled: the file was evicted or changed while being copied."),
    Counter("copies_verified", "copies_verified", "copies_verified",
            "Fast copies found at start (or checked on demand) whose digest matched."),
    Counter("copies_corrupt", "copies_corrupt", "copies_corrupt",
            "Fast copies whose digest did not match: dropped, never served."),
    Counter("prefetches", "prefetch.prefetches", "prefetches",
            "Copies the prefetcher started before any open."),
    Counter("prefetched_bytes", "prefetch.prefetched_bytes", "prefetched_bytes",
            "Bytes staged before any open."),
    Counter("prefetch_used_bytes", "prefetch.used_bytes", "prefetch_used_bytes",
            "Prefetched bytes later opened."),
    Counter("prefetch_wasted_bytes", "prefetch.wasted_bytes", "prefetch_wasted_bytes",
            "Prefetched bytes evicted or cancelled unopened."),
    Counter("prefetches_cancelled", "prefetch.cancelled", "prefetches_cancelled",
            "Prefetches cancelled in flight: the forecast went elsewhere."),
    Counter("demand_misses", "prefetch.demand_misses", "demand_misses",
            "Opens that found the file neither in the fast tier nor on its way."),
    Counter("demand_miss_bytes", "prefetch.demand_miss_bytes", "demand_miss_bytes",
            "Sizes of the files of those opens."),
    Counter("events_dropped", "prefetch.events_dropped", "prefetch_events_dropped",
            "Access events the prefetcher missed: it fell behind by a buffer's worth."),
    Counter("pushed_bytes", "prefetch.pushed_bytes", "page_cache_pushed_bytes",
            "Bytes of committed copies pushed into the kernel page cache."),
    Counter("bypasses", "bypasses", "bypasses",
            "Opens read from the cold tier without a copy (not admitted, too big, no room)."),
    Counter("bypassed_bytes", "bypassed_bytes", "bypassed_bytes",
            "Sizes of the files bypassed so."),
    Counter("evictions", "evictions", "evictions", "Fast copies dropped to make room."),
    Counter("evicted_bytes", "evicted_bytes", "evicted_bytes", "Bytes of fast copies dropped."),
    Counter("floor_evictions", "memory_floor.evictions", "floor_evictions",
            "Of the evictions, copies dropped because the box's available memory fell "
            "below --fast-min-free."),
    Counter("floor_evicted_bytes", "memory_floor.evicted_bytes", "floor_evicted_bytes",
            "Bytes of those copies."),
    Counter("invalidations", "invalidations", "invalidations",
            "Fast copies dropped because the cold file changed."),
    Counter("passthrough_opens", "passthrough.opens", "passthrough_opens",
            "Opens the kernel served from a fast copy itself."),
    Counter("passthrough_bytes", "passthrough.opened_bytes", "passthrough_opened_bytes",
            "Sizes of the files opened in passthrough (their reads never reach the daemon)."),
    Counter("page_cache_opens", "passthrough.page_cache_opens", "page_cache_opens",
            "Opens of files not in the fast tier that the kernel served from the cold "
            "file itself, wholly in its page cache at the open."),
    Counter("page_cache_bytes", "passthrough.page_cache_bytes", "page_cache_opened_bytes",
            "Sizes of the files opened so."),
    Counter("opens_watched", "cold_watch.opens", "cold_watch_opens",
            "Passthrough opens that needed no cold-tier call (the watch vouched)."),
    Counter("kernel_invalidations", "cold_watch.kernel_invalidations",
            "cold_watch_kernel_invalidations",
            "Kernel entries and inodes invalidated because the cold tree changed."),
)


def value_at(tree: dict, key: str):
    """The value at a dotted key of a stats tree."""
    for part in key.split("."):
        tree = tree[part]
    return tree


class Histogram:
    """Counts of observations per upper bound (Prometheus buckets: each
    count includes the smaller ones), plus their sum."""

    BOUNDS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
              2.5, float("inf"))

    def __init__(self) -> None:
        self.counts = [0] * len(self.BOUNDS)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.sum += value
        self.counts[bisect.bisect_left(self.BOUNDS, value)] += 1

    def buckets(self) -> list[tuple[float, int]]:
        return list(zip(self.BOUNDS, itertools.accumulate(self.counts), strict=True))


class Stats:
    """The counters since the daemon started (one attribute per COUNTERS
    row; a name not in the table is an AttributeError), and the read
    latencies."""

    __slots__ = ("started", "read_seconds", *(c.attr for c in COUNTERS))

    def __init__(self) -> None:
        self.started = time.time()
        self.read_seconds = {"fast": Histogram(), "cold": Histogram()}
        for c in COUNTERS:
            setattr(self, c.attr, 0)

    def tree(self) -> dict:
        """The counters as `.aatts/stats` nests them."""
        out: dict = {}
        for c in COUNTERS:
            *sections, name = c.key.split(".")
            node = out
            for section in sections:
                node = node.setdefault(section, {})
            node[name] = getattr(self, c.attr)
        return out
