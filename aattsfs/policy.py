"""Eviction and admission policies for the fast tier.

Plain synchronous code with no FUSE or trio inside, so that the daemon and the
offline simulator run the very same classes (through residency.Residency). An
eviction policy orders the files resident in the fast tier; the store decides
which of them may be evicted at all (pinned files and in-flight promotions
never are). An admission filter decides whether a file that does not fit
next to what is resident is worth what it would push out, or is better read
from the cold tier without a copy (docs/admission.md).
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import Callable, Hashable, Iterable, Iterator


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

    def should_admit(self, key: Hashable, victims: list) -> bool | None:
        """Whether bringing `key` in is worth evicting `victims`; None: this
        policy has no opinion (the admission filter decides)."""
        return None


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
        self._ranks: Callable[[], dict[Hashable, int]] = dict

    def set_forecast(self, keys: list | Callable[[], dict[Hashable, int]]) -> None:
        """The files expected next, soonest first; or a function giving each
        one's place, called when a rank is needed (learn.plan caches it)."""
        if callable(keys):
            self._ranks = keys
        else:
            rank = {k: i for i, k in enumerate(keys)}
            self._ranks = lambda: rank

    def rank(self, key: Hashable) -> float:
        """Position of key in the forecast; infinity if it is not expected."""
        return self._ranks().get(key, float("inf"))

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
        # out is better not cached. Of a file the forecast knows nothing
        # about, the admission filter judges: no prediction is not a
        # prediction of no use.
        rank = self.rank(key)
        if not victims or rank == float("inf"):
            return None
        return rank < max(self.rank(v) for v in victims)


class TwoQPolicy(EvictionPolicy):
    """2Q (Johnson and Shasha, 1994), in bytes: a file enters a FIFO of
    files seen once; evicted from there, its key is remembered in a ghost
    list, and coming back while remembered it enters the main LRU. The FIFO
    is evicted first while it holds more than a quarter of the resident
    bytes, so one scan cannot flush the files used more than once."""

    name = "2q"
    IN_SHARE = 0.25

    def __init__(self) -> None:
        self._in: OrderedDict[Hashable, int] = OrderedDict()
        self._main: OrderedDict[Hashable, int] = OrderedDict()
        self._ghost: OrderedDict[Hashable, None] = OrderedDict()
        self._in_bytes = self._main_bytes = 0

    def admit(self, key, size):
        if key in self._ghost:  # back after it left the FIFO: used more than once
            del self._ghost[key]
            self._main[key] = size
            self._main_bytes += size
        else:
            self._in[key] = size
            self._in_bytes += size

    def access(self, key):
        if key in self._main:
            self._main.move_to_end(key)

    def remove(self, key):
        if key in self._in:
            self._in_bytes -= self._in.pop(key)
            self._ghost[key] = None
            while len(self._ghost) > max(64, 2 * (len(self._in) + len(self._main))):
                self._ghost.popitem(last=False)
        elif key in self._main:
            self._main_bytes -= self._main.pop(key)

    def victims(self):
        if self._in_bytes > self.IN_SHARE * (self._in_bytes + self._main_bytes):
            return iter([*self._in, *self._main])
        return iter([*self._main, *self._in])


def choose_victims(order: Iterable[Hashable], need: int, free: int,
                   size_of: Callable[[Hashable], int],
                   evictable: Callable[[Hashable], bool]) -> tuple[list[Hashable], bool]:
    """The keys to evict, first in `order` first (a policy's victims), so
    that `need` bytes fit next to `free` bytes, and whether they are
    enough. The daemon and the simulator both decide evictions here."""
    chosen = []
    for key in order:
        if free >= need:
            break
        if evictable(key):
            chosen.append(key)
            free += size_of(key)
    return chosen, free >= need


POLICIES: dict[str, type[EvictionPolicy]] = {
    p.name: p for p in (LRUPolicy, LFUPolicy, PredictivePolicy, TwoQPolicy)}


def make_policy(name: str) -> EvictionPolicy:
    return POLICIES[name]()


class Admission(ABC):
    """Whether a file that needs room is worth what it would evict. Told of
    every open (hit or miss), so that it can judge from reuse."""

    name: str

    def opened(self, key: Hashable, size: int) -> None:
        """key (size bytes) was opened."""

    def left(self, key: Hashable) -> None:
        """key's copy left the fast tier."""

    def reopened(self, key: Hashable) -> None:
        """The process that opened key last opened it again: the same use,
        which tells nothing of reuse (Residency.opened)."""

    @abstractmethod
    def admit(self, key: Hashable, size: int, victims: list) -> bool:
        """Whether key comes in at the price of evicting `victims` (none:
        it fits in free room)."""

    def probation(self, key: Hashable) -> Callable[[Hashable], bool] | None:
        """For a file `admit` refused: which resident files it may push out
        instead, to come in on probation; None: none."""
        return None

    def on_probation(self, key: Hashable, size: int, victims: list) -> bool:
        """Whether key comes in on probation, pushing out `victims` (chosen
        among those `probation` allowed); if so, it is noted."""
        return False


class AdmitAll(Admission):
    """Every file that fits comes in (a plain recency or frequency cache)."""

    name = "all"

    def admit(self, key, size, victims):
        return True


class ReuseAdmission(Admission):
    """Admit a file that needs room only if it came back last time within
    the budget's worth of opens: the bytes opened between its last two
    opens (its reuse distance) fit the budget. A file whose opens are
    further apart than that would be evicted before it is opened again
    (the fast tier turns over about a budget's worth of files in that
    time), so copying it costs a copy and a victim and saves nothing; it is
    read from the cold tier instead, and the files already resident stay.

    A file never seen before (no distance yet) comes in where there is free
    room, and otherwise on probation: files that came in so and were not
    opened again since may hold up to PROBATION of the budget (S3-FIFO's
    small queue); a newcomer pushes out other newcomers first. A file
    opened twice in a row (check, then read) hits; a scan of new files
    churns only that share.

    On a loop longer than the budget this keeps one budget's worth
    resident (what MIN does) where LRU and 2Q hit nothing; where the working
    set changes, a file of the new one comes in at its second open."""

    name = "reuse"
    MEMORY = 1 << 16  # files whose last open is remembered
    PROBATION = 0.1

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._clock = 0  # bytes opened so far
        self._last: OrderedDict[Hashable, tuple[int, int | None]] = OrderedDict()
        self._probation: dict[Hashable, int] = {}  # unproven residents: their sizes
        self._probation_bytes = 0

    def opened(self, key, size):
        prev = self._last.pop(key, None)
        self._last[key] = (self._clock, None if prev is None else self._clock - prev[0])
        self._clock += size
        if len(self._last) > self.MEMORY:
            self._last.popitem(last=False)
        self.left(key)  # opened again while resident: proven

    def left(self, key):
        self._probation_bytes -= self._probation.pop(key, 0)

    def reopened(self, key):
        self.left(key)  # a copy read right after it came in: proven

    def distance(self, key: Hashable) -> int | None:
        """Bytes opened between key's last two opens; None if not known."""
        seen = self._last.get(key)
        return None if seen is None else seen[1]

    def _unproven(self, key, size) -> None:
        self._probation[key] = size
        self._probation_bytes += size

    def admit(self, key, size, victims):
        distance = self.distance(key)
        if distance is not None:
            return not victims or distance <= self.budget
        if victims:
            return False
        self._unproven(key, size)
        return True

    def probation(self, key):
        if self.distance(key) is not None:
            return None
        # within its share, probation may take room from proven files too;
        # beyond, a newcomer only replaces another newcomer
        if self._probation_bytes < self.PROBATION * self.budget:
            return lambda k: True
        return self._probation.__contains__

    def on_probation(self, key, size, victims):
        freed = sum(self._probation.get(v, 0) for v in victims)
        if self._probation_bytes - freed + size > self.PROBATION * self.budget:
            return False
        for v in victims:
            self.left(v)
        self._unproven(key, size)
        return True


class FrequencyAdmission(Admission):
    """TinyLFU's rule (Einziger et al., 2017): a file comes in only if it
    was opened more often, recently, than the files it would push out.
    Counts are exact here (not a sketch) and halved every `window` opens so
    that old popularity fades."""

    name = "tinylfu"

    def __init__(self, budget: int = 0) -> None:
        self._counts: dict[Hashable, int] = {}
        self._opens = 0

    def opened(self, key, size):
        self._counts[key] = self._counts.get(key, 0) + 1
        self._opens += 1
        if self._opens >= max(1024, 10 * len(self._counts)):
            self._opens = 0
            self._counts = {k: n // 2 for k, n in self._counts.items() if n > 1}

    def admit(self, key, size, victims):
        count = self._counts.get(key, 0)
        return not victims or count > max(self._counts.get(v, 0) for v in victims)


ADMISSIONS: dict[str, Callable[[int], Admission]] = {
    "all": lambda budget: AdmitAll(), "reuse": ReuseAdmission, "tinylfu": FrequencyAdmission}


def make_admission(name: str, budget: int) -> Admission:
    return ADMISSIONS[name](budget)
