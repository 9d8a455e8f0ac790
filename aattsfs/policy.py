"""Eviction policies for the fast tier.

Plain synchronous code with no FUSE or trio inside, so that the daemon and the
offline simulator run the very same classes. A policy only orders the files
that are resident in the fast tier; the store decides which of them may be
evicted at all (pinned files and in-flight promotions never are).
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import Callable, Hashable, Iterator


class EvictionPolicy(ABC):
    name: str

    @abstractmethod
    def admit(self, key: Hashable, size: int) -> None:
        """`key` became resident in the fast tier."""

    @abstractmethod
    def access(self, key: Hashable) -> None:
        """`key` was opened; ignored unless it is resident."""

    @abstractmethod
    def remove(self, key: Hashable) -> None:
        """`key` left the fast tier (evicted, invalidated or deleted)."""

    @abstractmethod
    def victims(self) -> Iterator[Hashable]:
        """Resident keys, the one to evict first coming first."""

    def should_admit(self, key: Hashable, victims: list) -> bool:
        """Whether bringing `key` in is worth evicting `victims`."""
        return True


class LRUPolicy(EvictionPolicy):
    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[Hashable, None] = OrderedDict()

    def admit(self, key, size):
        self._order[key] = None
        self._order.move_to_end(key)

    def access(self, key):
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key):
        self._order.pop(key, None)

    def victims(self):
        return iter(list(self._order))


class LFUPolicy(EvictionPolicy):
    """Least frequently used; ties go to the least recently used."""

    name = "lfu"

    def __init__(self) -> None:
        self._clock = itertools.count()
        self._state: dict[Hashable, tuple[int, int]] = {}  # key -> (uses, last use)

    def admit(self, key, size):
        uses = self._state.get(key, (0, 0))[0]
        self._state[key] = (uses + 1, next(self._clock))

    def access(self, key):
        if key in self._state:
            self._state[key] = (self._state[key][0] + 1, next(self._clock))

    def remove(self, key):
        self._state.pop(key, None)

    def victims(self):
        return iter(sorted(self._state, key=self._state.__getitem__))


class PredictivePolicy(EvictionPolicy):
    """Evict the file whose predicted next use is furthest away: an online
    approximation of Belady's MIN. Files absent from the forecast go first,
    least recently used first; then forecast files, furthest first. The
    forecast comes from a predictor (predict.forecast) via `set_forecast`."""

    name = "predictive"

    def __init__(self) -> None:
        self._lru = LRUPolicy()
        self._rank: dict[Hashable, int] = {}

    def set_forecast(self, keys) -> None:
        self._rank = {k: i for i, k in enumerate(keys)}

    def rank(self, key: Hashable) -> float:
        """Position of key in the forecast; infinity if it is not expected."""
        return self._rank.get(key, float("inf"))

    def admit(self, key, size):
        self._lru.admit(key, size)

    def access(self, key):
        self._lru.access(key)

    def remove(self, key):
        self._lru.remove(key)

    def victims(self):
        order = list(self._lru.victims())
        return iter(sorted(order, key=lambda k: -self.rank(k)))  # stable: LRU among equals

    def should_admit(self, key, victims):
        # MIN's bypass: a file expected later than everything it would push
        # out is better not cached. A file the forecast knows nothing about is
        # admitted, as by LRU: no prediction is not a prediction of no use.
        rank = self.rank(key)
        return not victims or rank == float("inf") or \
            rank < max(self.rank(v) for v in victims)


def choose_victims(policy: EvictionPolicy, need: int, free: int,
                   size_of: Callable[[Hashable], int],
                   evictable: Callable[[Hashable], bool]) -> tuple[list[Hashable], bool]:
    """The keys to evict, in policy order, so that `need` bytes fit next to
    `free` bytes, and whether they are enough. The daemon and the simulator
    both decide evictions here."""
    chosen = []
    for key in policy.victims():
        if free >= need:
            break
        if evictable(key):
            chosen.append(key)
            free += size_of(key)
    return chosen, free >= need


POLICIES: dict[str, type[EvictionPolicy]] = {
    p.name: p for p in (LRUPolicy, LFUPolicy, PredictivePolicy)}


def make_policy(name: str) -> EvictionPolicy:
    return POLICIES[name]()
