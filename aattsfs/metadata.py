"""The LMDB environment: the one module that owns it and its schema.

Databases (schema version in `meta`):

- ``files``:  relative path (bytes, os.fsencode) -> JSON `FileRecord`
- ``trace``:  8-byte sequence number -> JSON access event (a bounded ring)
- ``meta``:   ``schema`` -> version, ``trace_next`` -> next sequence number

The trace is the learned state: the daemon replays it through its learner
at start (docs/prediction.md says why no counts are stored). Opens imported
from another box (`aattsfs trace import`) are kept in the same ring, tagged
with their import (docs/fleet.md). Schema 1 also
kept global transition counts (``trans``); opening it drops them.

The daemon keeps its working state in memory and hands this module batches
(`write_batch`) from a periodic flush that runs in a worker thread, so no
request ever waits on an LMDB write or its fsync. Every transaction is
short and synchronous; callers never await inside one. `lock` serialises
that thread's writes with reads of the trace from the trio thread.

The metadata is a cache of what can be re-learned, never the only copy of
data, so damage never stops a mount (docs/crash-recovery.md). LMDB maps
the file and checksums nothing: a truncated file kills the process that
reads it (SIGBUS), a flipped byte in a value is served as is. Hence:

- before mapping it, the environment is checked (its type, its size against
  its newest meta page) and read through once in a child process; one that
  fails, or cannot be opened, or carries another schema version, is moved
  aside with one warning and replaced by an empty one;
- every record and event is validated where it is read; a damaged one is
  skipped, and counted in one warning.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, fields
from typing import Iterable

import lmdb

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
TRACE_CAPACITY = 100_000
PROBE_TIMEOUT = 30.0  # seconds; reading 100,000 events takes well under one
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
        """Raises ValueError unless raw is a record with every field, of its type."""
        d = _json(raw)
        if not (isinstance(d, dict) and d.keys() == _RECORD_FIELDS.keys()
                and all(ok(d[k]) for k, ok in _RECORD_FIELDS.items())):
            raise ValueError("not a file record")
        return cls(**d)


# -- validation: what the store, the learner and the trace readers rely on --

def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _count(v) -> bool:
    return _int(v) and v >= 0


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _rel_path(v) -> bool:
    """A path as the store names files: relative, normalised, no NUL (which
    every os call refuses with ValueError, not OSError)."""
    if not isinstance(v, str):
        return False
    s = f"/{v}/"
    return "//" not in s and "/./" not in s and "/../" not in s and "\0" not in v


def _ranges(v) -> bool:
    return isinstance(v, list) and all(
        isinstance(r, list) and len(r) == 2 and _count(r[0]) and _count(r[1]) for r in v)


def _json(raw: bytes):
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None


_RECORD_FIELDS = {"size": _count, "mtime_ns": _int, "tier": lambda v: v in ("cold", "fast"),
                  "pinned": lambda v: isinstance(v, bool), "hits": _count, "misses": _count,
                  "last_access": _number}
assert _RECORD_FIELDS.keys() == {f.name for f in fields(FileRecord)}
_EVENT_FIELDS = {"t": _number, "op": lambda v: v in ("open", "read"), "path": _rel_path,
                 "via": _rel_path, "size": _count, "pid": _int, "start": lambda v: v is None or _number(v),
                 "ranges": _ranges, "more_ranges": _count,
                 # an open imported from another box: the import's id (docs/fleet.md)
                 "imported": lambda v: isinstance(v, str) and 0 < len(v) <= 64}


def _event(raw: bytes) -> dict | None:
    """The event stored as raw, or None if it is not one the daemon writes."""
    ev = _json(raw)
    if not (isinstance(ev, dict) and "op" in ev and "path" in ev):
        return None
    for k, v in ev.items():
        check = _EVENT_FIELDS.get(k)
        if check is None or not check(v):
            return None
    return ev


# -- checks made before the environment is mapped into this process --

# An LMDB meta page, after its 16-byte page header: magic, version, the
# page size (the free DB's md_pad), last page used, transaction id.
_META = struct.Struct("=II16xI92xQQ")
_MAGIC = 0xBEEFC0DE

# Run in a child: a damaged file can kill the process that reads it.
_PROBE = """
import sys, lmdb
env = lmdb.open(sys.argv[1], readonly=True, lock=False, max_dbs=4, map_size=int(sys.argv[2]))
with env.begin() as txn:
    for _ in txn.cursor():
        pass
    for name in (b"files", b"trace", b"meta", b"trans"):
        if txn.get(name) is not None:
            for _ in txn.cursor(db=env.open_db(name, txn=txn, create=False)):
                pass
"""


def _layout_problem(data: str) -> str | None:
    """Why data.mdb is not what its meta pages describe: shorter than the
    newest says (LMDB would map the missing pages and die reading them),
    or not LMDB at all."""
    with open(data, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return None  # LMDB initialises it
        metas, offset = [], 0
        for _ in range(2):  # the second meta page follows the first
            raw = os.pread(f.fileno(), 16 + _META.size, offset)
            if len(raw) < 16 + _META.size:
                return f"data.mdb is truncated: {size} bytes"
            magic, version, psize, last, txnid = _META.unpack_from(raw, 16)
            if magic != _MAGIC or version != 1 or psize & (psize - 1) or \
                    not 512 <= psize <= 1 << 16:
                return "data.mdb is not an LMDB file this version reads"
            metas.append((txnid, last, psize))
            offset = psize
    _, last, psize = max(metas, key=lambda m: m[0])  # LMDB uses the newest
    if size < (last + 1) * psize:
        return f"data.mdb is truncated: {size} bytes, its pages reach {(last + 1) * psize}"
    return None


def _problem(path: str, map_size: int) -> str | None:
    """Why the environment at path cannot be used safely, or None (also when
    there is none yet)."""
    if not os.path.lexists(path):
        return None
    if not os.path.isdir(path):
        return "not a directory"
    data = os.path.join(path, "data.mdb")
    try:
        if not stat.S_ISREG(os.stat(data).st_mode):
            return "data.mdb is not a regular file"
        problem = _layout_problem(data)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"data.mdb: {exc.strerror}"
    if problem:
        return problem
    try:
        probe = subprocess.run([sys.executable, "-I", "-c", _PROBE, path, str(map_size)],
                               stdin=subprocess.DEVNULL, capture_output=True,
                               timeout=PROBE_TIMEOUT)
    except subprocess.TimeoutExpired:
        return f"reading it took more than {PROBE_TIMEOUT:g} s"
    except OSError as exc:  # no interpreter to run: not the metadata's fault
        log.warning("could not check the metadata at %s (%s); opening it unchecked",
                    path, exc)
        return None
    if probe.returncode < 0:
        return f"reading it kills the reader with {signal.Signals(-probe.returncode).name}"
    if probe.returncode:
        lines = probe.stderr.decode(errors="replace").strip().splitlines()
        return f"reading it fails: {lines[-1] if lines else probe.returncode}"
    return None


class IncompatibleState(Exception):
    pass


class MetaStore:
    def __init__(self, path: str, map_size: int = 1 << 30) -> None:
        self.path = path
        self._map_size = map_size
        self._temporary: str | None = None  # an environment that lives for this mount only
        self._bad_events_reported = False
        self.lock = threading.Lock()  # held by whoever writes a batch or reads the ring
        problem = _problem(path, map_size)
        if problem is None:
            try:
                self._open()
                return
            except (lmdb.Error, IncompatibleState, OSError) as exc:
                problem = str(exc)
                self._close_env()
        self._move_aside(problem)
        self._open()

    def _move_aside(self, problem: str, then: str = "starting with empty metadata") -> None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = next(a for n in itertools.count()
                     if not os.path.lexists(a := f"{self.path}.broken-{stamp}"
                                            + (f".{n}" if n else "")))
        try:
            os.rename(self.path, aside)
        except OSError as exc:
            # Serve anyway, learning into a directory removed at close.
            self._temporary = tempfile.mkdtemp(prefix="aattsfs-lmdb-")
            log.error("metadata at %s is unusable (%s) and cannot be moved aside (%s); "
                      "using temporary metadata in %s until unmount: move %s away",
                      self.path, problem, exc.strerror, self._temporary, self.path)
            self.path = self._temporary
        else:
            log.warning("metadata at %s is unusable (%s); moved it to %s and %s",
                        self.path, problem, aside, then)

    def _open(self) -> None:
        self.env = None
        os.makedirs(self.path, exist_ok=True)
        self.env = lmdb.open(self.path, map_size=self._map_size, max_dbs=4,
                             subdir=True, sync=True, metasync=True)
        self._files = self.env.open_db(b"files")
        self._trace = self.env.open_db(b"trace")
        self._meta = self.env.open_db(b"meta")
        self._max_key = self.env.max_key_size()
        with self.env.begin(write=True) as txn:
            version = txn.get(b"schema", db=self._meta)
            try:
                version = None if version is None else int(version)
            except ValueError:
                raise IncompatibleState(f"schema version {version!r}") from None
            if version == 1:
                txn.drop(self.env.open_db(b"trans", txn=txn), delete=True)
                version = None
            if version is None:
                txn.put(b"schema", str(SCHEMA_VERSION).encode(), db=self._meta)
            elif version != SCHEMA_VERSION:
                raise IncompatibleState(f"schema version {version}, this aattsfs "
                                        f"reads version {SCHEMA_VERSION}")
            self.records = self._load_files(txn)

    def _load_files(self, txn: lmdb.Transaction) -> dict[str, FileRecord]:
        """Every well-formed record; damaged ones are deleted (the file is
        simply unknown until it is opened again) and counted in one warning."""
        records, bad = {}, []
        for key, raw in txn.cursor(db=self._files):
            rel = os.fsdecode(key)
            try:
                if not _rel_path(rel):
                    raise ValueError("not a path")
                records[rel] = FileRecord.decode(raw)
            except ValueError:
                bad.append(key)
        for key in bad:
            txn.delete(key, db=self._files)
        if bad:
            log.warning("skipped %d damaged file records in %s (dropped; the files are "
                        "learned again when opened)", len(bad), self.path)
        return records

    def _close_env(self) -> None:
        if getattr(self, "env", None) is not None:
            self.env.close()
            self.env = None

    def write_batch(self, files: dict[str, FileRecord | None],
                    events: Iterable[dict] = ()) -> None:
        """Persist one batch: changed records (None deletes) and new trace
        events, in one transaction."""
        events = list(events)
        for rel, rec in files.items():  # `records` stays what is stored, for a rebuild
            if rec is None:
                self.records.pop(rel, None)
            else:
                self.records[rel] = rec
        try:
            self._write(files, events)
        except (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.PanicError) as exc:
            # Damage only a write reaches (a free page list, a page header):
            # start over with every record, the trace from here on.
            records = self.records
            self._close_env()
            self._move_aside(f"writing to it failed: {exc}",
                             "writing every record anew; the trace starts over")
            self._open()
            self.records = records
            self._write(records, events)

    def _write(self, files: dict[str, FileRecord | None], events: list[dict]) -> None:
        with self.env.begin(write=True) as txn:
            for rel, rec in files.items():
                key = os.fsencode(rel)  # names need not be UTF-8
                if len(key) > self._max_key:
                    continue  # LMDB cannot key it: the file is just not remembered
                if rec is None:
                    txn.delete(key, db=self._files)
                else:
                    txn.put(key, rec.encode(), db=self._files)
            if events:
                seq = self._next_seq(txn)
                for ev in events:
                    # ASCII JSON: a name's undecodable bytes travel as \udcXX escapes
                    txn.put(_U64.pack(seq), json.dumps(ev).encode(), db=self._trace)
                    seq += 1
                txn.put(b"trace_next", _U64.pack(seq), db=self._meta)
                # Bound the ring by its count, whatever its keys (damage may
                # have left gaps or strays): the oldest go first.
                excess = txn.stat(self._trace)["entries"] - TRACE_CAPACITY
                cur = txn.cursor(db=self._trace)
                while excess > 0 and cur.first() and cur.delete():
                    excess -= 1

    def _next_seq(self, txn: lmdb.Transaction) -> int:
        """After both the stored counter and the newest key, if they are sane."""
        cur = txn.cursor(db=self._trace)
        last = cur.key() if cur.last() else b""
        counter = txn.get(b"trace_next", db=self._meta) or b""
        return max([_U64.unpack(raw)[0] + d for raw, d in ((counter, 0), (last, 1))
                    if len(raw) == _U64.size], default=0)

    def events(self) -> list[dict]:
        """The trace ring, oldest first: only well-formed events, so that
        every reader (the replay at start, `.aatts/trace`) can rely on their
        fields; damaged ones are skipped and counted in one warning."""
        with self.env.begin(db=self._trace) as txn:
            read = [_event(raw) for raw in txn.cursor().iternext(keys=False)]
        out = [ev for ev in read if ev is not None]
        if len(out) < len(read) and not self._bad_events_reported:
            self._bad_events_reported = True
            log.warning("skipped %d damaged trace events in %s", len(read) - len(out),
                        self.path)
        return out

    def close(self) -> None:
        self._close_env()
        if self._temporary is not None:
            shutil.rmtree(self._temporary, ignore_errors=True)
            self._temporary = None
