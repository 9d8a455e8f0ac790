"""Predictors of the next file opens. Plain synchronous code, shared by the
daemon and the simulator.

A predictor learns from the sequence of opens (`observe`) and answers "what
comes after this context" (`after`). The context is the tail of the
sequence, most recent last. `forecast` rolls a predictor forward several
steps to list the files expected next, in order, with probabilities, up to a
byte budget — what the prefetcher stages and what the prediction-aware
eviction policy reads distances from.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter, defaultdict
from typing import Callable, Hashable, Sequence

Key = Hashable


class Predictor(ABC):
    name: str
    order = 1  # how many recent keys `after` looks at

    def __init__(self) -> None:
        self.history: list[Key] = []

    def observe(self, key: Key, history: list | None = None) -> None:
        """Learn that `key` follows `history` (by default the predictor's
        own), and append it there. Several streams can share one predictor's
        counts by each passing its own history."""
        h = self.history if history is None else history
        self._learn(tuple(h[-self.order:]), key)
        h.append(key)
        del h[:-self.order]

    @abstractmethod
    def _learn(self, context: tuple, key: Key) -> None:
        """`key` was opened right after `context`."""

    @abstractmethod
    def after(self, context: Sequence[Key]) -> list[tuple[Key, float]]:
        """Candidates for the next open after `context`, most likely first,
        with probabilities that sum to at most 1."""


class LastSuccessor(Predictor):
    """What followed this file last time follows it again."""

    name = "last"

    def __init__(self) -> None:
        super().__init__()
        self._next: dict[Key, Key] = {}

    def _learn(self, context, key):
        if context:
            self._next[context[-1]] = key

    def after(self, context):
        nxt = self._next.get(context[-1]) if context else None
        return [] if nxt is None else [(nxt, 1.0)]


def _ranked(counts: Counter) -> list[tuple[Key, float]]:
    total = sum(counts.values())
    return [(k, n / total) for k, n in counts.most_common()]


class Markov(Predictor):
    """First order: transition counts from each file to the next."""

    name = "markov"

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[Key, Counter] = defaultdict(Counter)

    def _learn(self, context, key):
        if context:
            self.counts[context[-1]][key] += 1

    def after(self, context):
        return _ranked(self.counts[context[-1]]) if context and context[-1] in self.counts \
            else []


class PPM(Predictor):
    """Prediction by partial matching, up to `order` files of context: use the
    longest context seen before, and fill in from shorter ones (blended with
    the escape probability 1/(n+1) of the longer context)."""

    name = "ppm"

    def __init__(self, order: int = 3) -> None:
        super().__init__()
        self.order = order
        self.counts: dict[tuple, Counter] = defaultdict(Counter)

    def _learn(self, context, key):
        for n in range(1, len(context) + 1):
            self.counts[tuple(context[-n:])][key] += 1

    def after(self, context):
        out: dict[Key, float] = {}
        mass = 1.0  # probability left for shorter contexts
        for n in range(min(self.order, len(context)), 0, -1):
            counts = self.counts.get(tuple(context[-n:]))
            if not counts:
                continue
            total = sum(counts.values())
            escape = 1 / (total + 1)
            for k, c in counts.items():
                out[k] = out.get(k, 0.0) + mass * (1 - escape) * c / total
            mass *= escape
        return sorted(out.items(), key=lambda kv: -kv[1])


PREDICTORS: dict[str, Callable[[], Predictor]] = {
    p.name: p for p in (LastSuccessor, Markov, PPM)}


def make_predictor(name: str) -> Predictor:
    return PREDICTORS[name]()


def forecast(p: Predictor, size_of: Callable[[Key], int], budget: int,
             max_steps: int = 64, min_prob: float = 0.05,
             context: Sequence[Key] | None = None) -> list[tuple[Key, float]]:
    """The files expected next after `context` (by default the predictor's
    own history), in the order they are expected, each with the probability
    of the path that reaches it, until their sizes add up to `budget` or the
    path becomes less likely than `min_prob`. Follows the most likely
    successor at each step; the runners-up of the first step are listed
    after it, since one of them may be next instead."""
    context = list(p.history if context is None else context)
    seen: set = set()
    out: list[tuple[Key, float]] = []
    used, prob = 0, 1.0
    for step in range(max_steps):
        candidates = p.after(context)
        if not candidates:
            break
        key, q = candidates[0]
        prob *= q
        if prob < min_prob or key in seen:
            break
        if step == 0:
            extra = [(k, pk) for k, pk in candidates[1:] if pk >= min_prob]
        seen.add(key)
        out.append((key, prob))
        used += size_of(key)
        if used >= budget:
            break
        context = (context + [key])[-p.order:]
    if out:
        out[1:1] = [(k, pk) for k, pk in extra if k not in seen]
    return out
