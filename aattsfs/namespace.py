"""Inode numbers <-> paths under the cold root, with the kernel's lookup counts.

An inode lives while the kernel holds a lookup reference to it; `forget`
drops it at zero. Numbers are handed out from a counter and never reused
within a mount, so a stale number can never name another file.

One number names one cold *file as it is*, not one path: when a path comes
to name another file (renamed over, swapped, or changed in place), it gets a
new number, and the old one lives on until the kernel forgets it. The kernel keeps page cache and
attributes per number, so two files that once had the same path never share
cached pages or a cached size.
"""

from __future__ import annotations

import itertools
from typing import Hashable

import pyfuse3

ROOT = pyfuse3.ROOT_INODE
FIRST_DYNAMIC = 64  # numbers below are reserved for the control surface


class Namespace:
    def __init__(self) -> None:
        self._next = itertools.count(FIRST_DYNAMIC)
        self._path = {ROOT: ""}
        self._ino = {"": ROOT}
        self._lookups: dict[int, int] = {}
        self._ident: dict[int, Hashable] = {}  # ino -> what it stands for (fs.ident_of)

    def ident(self, ino: int) -> Hashable | None:
        """What `ino` stands for in the cold tree (given by the caller)."""
        return self._ident.get(ino)

    def path(self, ino: int) -> str:
        """The relative path of a live inode; KeyError if it is unknown."""
        return self._path[ino]

    def ino(self, rel: str, ident: Hashable | None = None) -> int:
        """The number for rel naming the cold file `ident`, allocated on first
        use or when rel names another file now (no lookup counted)."""
        ino = self._ino.get(rel)
        if ino is None or (ident is not None and ino != ROOT
                           and self._ident.get(ino, ident) != ident):
            ino = next(self._next)
            self._ino[rel] = ino
            self._path[ino] = rel
        if ident is not None:
            self._ident[ino] = ident
        return ino

    def known(self, rel: str) -> int | None:
        """rel's number if the kernel holds a reference to it, else None."""
        ino = self._ino.get(rel)
        return ino if ino in self._lookups else None

    def lookup(self, rel: str, ident: Hashable | None = None) -> int:
        """The kernel learned of rel: count one reference."""
        ino = self.ino(rel, ident)
        self._lookups[ino] = self._lookups.get(ino, 0) + 1
        return ino

    def forget(self, ino: int, n: int) -> None:
        left = self._lookups.get(ino, 0) - n
        if left > 0:
            self._lookups[ino] = left
            return
        self._lookups.pop(ino, None)
        if ino != ROOT:
            self._ident.pop(ino, None)
            rel = self._path.pop(ino, None)
            if rel is not None and self._ino.get(rel) == ino:
                del self._ino[rel]

    def retire(self, ino: int) -> None:
        """Let rel's next lookup get a new number, though it names the same
        file; `ino` lives on for its open handles until forgotten."""
        rel = self._path.get(ino)
        if rel is not None and self._ino.get(rel) == ino:
            del self._ino[rel]

    def __contains__(self, ino: int) -> bool:
        return ino in self._path
