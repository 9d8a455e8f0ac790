"""Inode numbers <-> paths under the cold root, with the kernel's lookup counts.

An inode lives while the kernel holds a lookup reference to it; `forget`
drops it at zero. Numbers are handed out from a counter and never reused
within a mount, so a stale number can never name another file.
"""

from __future__ import annotations

import itertools

import pyfuse3

ROOT = pyfuse3.ROOT_INODE
FIRST_DYNAMIC = 64  # numbers below are reserved for the control surface


class Namespace:
    def __init__(self) -> None:
        self._next = itertools.count(FIRST_DYNAMIC)
        self._path = {ROOT: ""}
        self._ino = {"": ROOT}
        self._lookups: dict[int, int] = {}

    def path(self, ino: int) -> str:
        """The relative path of a live inode; KeyError if it is unknown."""
        return self._path[ino]

    def ino(self, rel: str) -> int:
        """The number for rel, allocated on first use (no lookup counted)."""
        ino = self._ino.get(rel)
        if ino is None:
            ino = next(self._next)
            self._ino[rel] = ino
            self._path[ino] = rel
        return ino

    def known(self, rel: str) -> int | None:
        """rel's number if the kernel holds a reference to it, else None."""
        ino = self._ino.get(rel)
        return ino if ino in self._lookups else None

    def lookup(self, rel: str) -> int:
        """The kernel learned of rel: count one reference."""
        ino = self.ino(rel)
        self._lookups[ino] = self._lookups.get(ino, 0) + 1
        return ino

    def forget(self, ino: int, n: int) -> None:
        left = self._lookups.get(ino, 0) - n
        if left > 0:
            self._lookups[ino] = left
            return
        self._lookups.pop(ino, None)
        if ino != ROOT:
            rel = self._path.pop(ino, None)
            if rel is not None and self._ino.get(rel) == ino:
                del self._ino[rel]

    def __contains__(self, ino: int) -> bool:
        return ino in self._path
