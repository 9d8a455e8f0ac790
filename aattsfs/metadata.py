"""The LMDB environment: the one module that owns it and its schema.

Databases (schema version in `meta`):

- ``files``:  relative path -> JSON `FileRecord` (what the daemon knows of it)
- ``trace``:  8-byte sequence number -> JSON access event (a bounded ring)
- ``meta``:   ``schema`` -> version, ``trace_next`` -> next sequence number

The trace is the learned state: the daemon replays it through its learner
at start (docs/prediction.md says why no counts are stored). Schema 1 also
kept global transition counts (``trans``); opening it drops them.

The daemon keeps its working state in memory and hands this module batches
(`write_batch`) from a periodic flush, so no read request ever waits on an
LMDB write. Every transaction is short and synchronous; callers never await
inside one. An environment that cannot be opened or read, or that carries
another schema version, is moved aside with one warning and rebuilt: the
metadata is a cache of what can be re-learned, never the only copy of data.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import time
from dataclasses import asdict, dataclass
from typing import Iterable

import lmdb

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
TRACE_CAPACITY = 100_000
_U64 = struct.Struct(">Q")


@dataclass
class FileRecord:
    size: int = 0
    mtime_ns: int = 0
    tier: str = "cold"  # "cold" or "fast"; promotions in flight are not persisted
    pinned: bool = False
    hits: int = 0  # opens served from the fast tier
    misses: int = 0  # opens that found the file in the cold tier
    last_access: float = 0.0

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> "FileRecord":
        return cls(**json.loads(raw))


class IncompatibleState(Exception):
    pass


class MetaStore:
    def __init__(self, path: str, map_size: int = 1 << 30) -> None:
        self.path = path
        self._map_size = map_size
        try:
            self._open()
        except (lmdb.Error, IncompatibleState, ValueError, TypeError) as exc:
            aside = f"{path}.broken-{time.strftime('%Y%m%d-%H%M%S')}"
            log.warning("metadata at %s is unusable (%s); moved it to %s and starting "
                        "with empty metadata", path, exc, aside)
            self._close_env()
            os.rename(path, aside)
            self._open()

    def _open(self) -> None:
        self.env = None
        os.makedirs(self.path, exist_ok=True)
        self.env = lmdb.open(self.path, map_size=self._map_size, max_dbs=4,
                             subdir=True, sync=True, metasync=True)
        self._files = self.env.open_db(b"files")
        self._trace = self.env.open_db(b"trace")
        self._meta = self.env.open_db(b"meta")
        with self.env.begin(write=True) as txn:
            version = txn.get(b"schema", db=self._meta)
            if version is not None and int(version) == 1:
                txn.drop(self.env.open_db(b"trans", txn=txn), delete=True)
                version = None
            if version is None:
                txn.put(b"schema", str(SCHEMA_VERSION).encode(), db=self._meta)
            elif int(version) != SCHEMA_VERSION:
                raise IncompatibleState(f"schema version {int(version)}, this aattsfs "
                                        f"reads version {SCHEMA_VERSION}")
        # Decoding every record now means a damaged one is found here, where
        # the environment can still be moved aside, not in the middle of a mount.
        self.records = self._load_files()

    def _close_env(self) -> None:
        if getattr(self, "env", None) is not None:
            self.env.close()
            self.env = None

    def _load_files(self) -> dict[str, FileRecord]:
        with self.env.begin(db=self._files) as txn:
            return {k.decode(): FileRecord.decode(v) for k, v in txn.cursor()}

    def write_batch(self, files: dict[str, FileRecord | None],
                    events: Iterable[dict] = ()) -> None:
        """Persist one batch: changed records (None deletes) and new trace
        events, in one transaction."""
        with self.env.begin(write=True) as txn:
            for rel, rec in files.items():
                if rec is None:
                    txn.delete(rel.encode(), db=self._files)
                else:
                    txn.put(rel.encode(), rec.encode(), db=self._files)
            events = list(events)
            if events:
                raw = txn.get(b"trace_next", db=self._meta)
                seq = _U64.unpack(raw)[0] if raw else 0
                for ev in events:
                    txn.put(_U64.pack(seq), json.dumps(ev).encode(), db=self._trace)
                    if seq >= TRACE_CAPACITY:
                        txn.delete(_U64.pack(seq - TRACE_CAPACITY), db=self._trace)
                    seq += 1
                txn.put(b"trace_next", _U64.pack(seq), db=self._meta)

    def events(self) -> list[dict]:
        """The trace ring, oldest first."""
        with self.env.begin(db=self._trace) as txn:
            return [json.loads(v) for _, v in txn.cursor()]

    def close(self) -> None:
        self._close_env()
