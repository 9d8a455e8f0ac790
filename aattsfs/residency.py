"""The residency core: which files the fast tier holds, within a byte
budget, and which may come in (docs/admission.md).

Plain synchronous code with no FUSE, trio or I/O, driven by the daemon's
`Store` (which does the copying, and keeps its promotions and open handles
in its own entries) and by the simulator, so that a change of policy is
judged offline on the very code the daemon runs.

Bytes are counted in three states, all within the budget:

- *resident*: a committed copy the policy orders (`commit` .. `drop`);
- *reserved*: room taken for a copy in flight, before a byte is written;
- *held*: a dropped copy whose bytes stay allocated until its last reader
  goes (passthrough opens); the Store returns them with `release`.

`budget` is the configured one; `limit`, what room is made within, is the
same unless the box is short of memory (memfloor.py lowers it, and the
Store evicts down to it with `shrink_to_budget`).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Container, Hashable, Iterator

from .policy import Admission, EvictionPolicy, PredictivePolicy, choose_victims

Key = Hashable

# Why a file did not come in (`room`): it is larger than the whole budget;
# the files that could make room for it are pinned, protected or in use;
# or the policy expects it back later than what it would push out.
TOO_BIG, NO_ROOM, NOT_ADMITTED = "too big", "no room", "not admitted"
MAX_STREAMS = 1024  # streams whose latest open is remembered
_NONE = object()


class Residency:
    def __init__(self, budget: int, policy: EvictionPolicy, admission: Admission) -> None:
        self.budget = budget  # --fast-size: a file larger than this never comes in
        self.limit = budget  # the effective budget: lower while memory is short
        self.used = 0  # resident + reserved + held
        self.policy = policy
        self.admission = admission
        self.resident: dict[Key, int] = {}
        self._ranking: Callable[[], dict[Key, int]] = dict  # the latest forecast (learn.plan)
        self._latest: OrderedDict[Hashable, Key] = OrderedDict()  # stream -> its last open

    @property
    def free(self) -> int:
        return self.limit - self.used

    def set_forecast(self, ranking: Callable[[], dict[Key, int]]) -> None:
        """Each expected file's place in the forecast, when asked
        (learn.plan): a prefetch evicts by it, and so does a predictive
        policy."""
        self._ranking = ranking
        if isinstance(self.policy, PredictivePolicy):
            self.policy.set_forecast(ranking)

    def _by_forecast(self) -> Iterator[Key]:
        """The policy's order, files expected later first (those not
        expected at all before any): what a prefetch evicts. A staged file
        pushes out what the forecast needs last, whatever the policy, so
        that staging does not evict files the next loads reread."""
        rank = self._ranking()
        return iter(sorted(self.policy.victims(), key=lambda k: -rank.get(k, len(rank))))

    def opened(self, key: Key, size: int, stream: Hashable = None) -> bool:
        """An open of key by `stream`, fast or not: what admission learns
        reuse from; True if it continues the stream's previous open. A
        stream opening the file it opened last continues that use (a loader
        checks a safetensors header, then opens the file again to map it).
        Counted as reuse, it would make every file of a loop longer than the
        budget look reused at once, and each would be copied only to be
        evicted before the next pass."""
        again = self._latest.get(stream, _NONE) == key
        self._latest[stream] = key
        self._latest.move_to_end(stream)
        if len(self._latest) > MAX_STREAMS:
            self._latest.popitem(last=False)
        if again:
            self.admission.reopened(key)
        else:
            self.admission.opened(key, size)
        if key in self.resident:
            self.policy.access(key)
        return again

    def room(self, key: Key, size: int, evictable: Callable[[Key], bool] = lambda k: True,
             protect: Container = frozenset(), judge: bool = True, ahead: bool = False
             ) -> tuple[list[Key], str | None]:
        """The resident files to drop so that key (size bytes) comes in, in
        policy order; or ([], why not). `judge`: whether the policy and the
        admission filter have a say (not for a file a user asked for).
        `ahead`: key is staged for a forecast that expects it before the
        files in `protect`; the forecast, not past reuse, vouches for it, so
        the admission filter has no say. Nothing changes until the caller
        drops them and calls `reserve`."""
        if size > self.budget:
            return [], TOO_BIG

        def may_go(k: Key) -> bool:
            return k not in protect and evictable(k)

        if ahead and size > self.free:
            # Ranking is the costly part: not when evicting every file that
            # may go would not make room anyway (files open or held, or
            # expected first: a staging plan longer than the tier retries
            # such files at every plan)
            if not self._could_free(size, may_go):
                return [], NO_ROOM
            order = self._by_forecast()
        else:
            order = self.policy.victims()
        victims, enough = choose_victims(order, size, self.free,
                                         self.resident.__getitem__, may_go)
        if not enough:
            return [], NO_ROOM
        if not judge:
            return victims, None
        verdict = self.policy.should_admit(key, victims)
        if verdict is None and ahead:
            verdict = True
        if verdict is not None:
            return (victims, None) if verdict else ([], NOT_ADMITTED)
        # the policy has no opinion: the admission filter decides
        if self.admission.admit(key, size, victims):
            return victims, None
        only = self.admission.probation(key)
        if only is not None:
            victims, enough = choose_victims(self.policy.victims(), size, self.free,
                                             self.resident.__getitem__,
                                             lambda k: only(k) and may_go(k))
            if enough and self.admission.on_probation(key, size, victims):
                return victims, None
        return [], NOT_ADMITTED

    def _could_free(self, size: int, may_go: Callable[[Key], bool]) -> bool:
        """Whether evicting every file that may go would make room for size."""
        room = self.free
        for k, n in self.resident.items():
            if room >= size:
                return True
            if may_go(k):
                room += n
        return room >= size

    def shrink_to_budget(self, evictable: Callable[[Key], bool]) -> list[Key]:
        """The files to drop, in policy order, to get back within the
        effective budget (it shrank since the copies were made: a restart
        with a lower --fast-size, or memory short); as many as may go."""
        victims, _ = choose_victims(self.policy.victims(), 0, self.free, self.resident.__getitem__,
                                    evictable)
        return victims

    def reserve(self, size: int) -> bool:
        if size > self.free:
            return False
        self.used += size
        return True

    def release(self, size: int) -> None:
        self.used -= size
        assert self.used >= 0, "fast-tier accounting went negative"

    def abandon(self, key: Key, reserved: int = 0) -> None:
        """key will not come in after all (its copy failed or was cancelled):
        return what was reserved for it and take it off probation."""
        if reserved:
            self.release(reserved)
        self.admission.left(key)

    def commit(self, key: Key, size: int) -> None:
        """A copy of key, reserved before, is in place."""
        self.resident[key] = size
        self.policy.admit(key, size)

    def adopt(self, key: Key, size: int) -> None:
        """A copy found at start: counted (even past the budget) and ordered."""
        self.used += size
        self.commit(key, size)

    def drop(self, key: Key) -> int:
        """key's copy is gone (or only held); its bytes, which the caller
        releases now or when the last holder goes."""
        self.policy.remove(key)
        self.admission.left(key)
        return self.resident.pop(key, 0)
