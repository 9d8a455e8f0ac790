"""Fault injection on real mounts: the paths users do not take.

Each test injects one kind of fault at random points (seeded: the points
vary with the timing, the outcome must not) for a few seconds while
threads read through the mount, and checks every byte each read returns
against what the cold file held: a fast tier whose filesystem fills up;
cold files swapped, renamed away, truncated, extended, rewritten in place
and replaced by symlinks under readers; a cold directory exchanged with a
symlink to a directory outside; kill -9 during promotions; fast copies
damaged behind the daemon's back. After the faults, the cold tree is
unchanged (but for what the test itself did), the daemon answers, and
after a remount every file reads back correct.

Each test prints one line "FAULTS <test>: ..." with the faults injected
and the bytes verified (run with -s to see them).

Readers that must reach the daemon open with O_DIRECT (or drop the file's
pages first): a read served by the kernel's page cache proves little about
the daemon. Reads through the page cache are exercised too, since that is
what users do.

Mutation check, done by hand on a copy of aattsfs/: a daemon that serves a
promotion's copy before its chunks are in (short reads, or zeros in a
pre-sized copy), ignores failed writes to a full fast tier, skips the
digest check at start or the identity check at open, keeps partial copies
at start, or resolves cold paths with plain open() fails these tests.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import random
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conftest import MiB, act, manifest, run_cli, sha256, wait_for, write_random

NOSPACE_LOG = r"promotion of .* stopped: the fast tier's filesystem is full"
FAILED_LOG = r"promotion of .* failed"
CORRUPT_LOG = r"fast copy of .* does not match its digest"
CHANGED_LOG = r"fast copy of .* was changed behind aattsfs's back"



# -- bookkeeping -------------------------------------------------------------

class Tally:
    """Counts of one test, shared by its threads; `problems` are failures
    found in threads, reported (and failed on) by the test body."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lock = threading.Lock()
        self.faults: Counter = Counter()
        self.bytes = 0
        self.reads = 0
        self.errors: Counter = Counter()
        self.notes: Counter = Counter()
        self.problems: list[str] = []

    def fault(self, kind: str) -> None:
        with self.lock:
            self.faults[kind] += 1

    def verified(self, nbytes: int) -> None:
        with self.lock:
            self.bytes += nbytes
            self.reads += 1

    def error(self, exc: OSError, where: str) -> None:
        with self.lock:
            self.errors[f"{where}:{errno.errorcode.get(exc.errno, exc.errno)}"] += 1

    def note(self, what: str, n: int = 1) -> None:
        with self.lock:
            self.notes[what] += n

    def problem(self, msg: str) -> None:
        with self.lock:
            if len(self.problems) < 50:
                self.problems.append(msg)

    def thread(self, fn, *args) -> threading.Thread:
        """A thread running fn; an exception in it is a problem of the test."""
        def run():
            try:
                fn(*args)
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                self.problem(f"{fn.__name__} raised {exc!r}")
        return threading.Thread(target=run, name=f"{self.name}-{fn.__name__}", daemon=True)

    @staticmethod
    def run(threads: list[threading.Thread], seconds: float, stop: threading.Event) -> None:
        """Run the threads for `seconds` (the length of the run, not a wait
        for a result), then stop them; none may hang."""
        for t in threads:
            t.start()
        time.sleep(seconds)
        stop.set()
        Tally.join(threads)

    @staticmethod
    def join(threads: list[threading.Thread]) -> None:
        for t in threads:
            t.join(timeout=60)
            assert not t.is_alive(), f"{t.name} hung"

    def check(self) -> None:
        assert not self.problems, f"{self.name}:\n" + "\n".join(self.problems)

    def summary(self) -> str:
        def fmt(c: Counter) -> str:
            return ", ".join(f"{k}={v}" for k, v in sorted(c.items())) or "none"
        line = (f"FAULTS {self.name}: {sum(self.faults.values())} faults injected "
                f"({fmt(self.faults)}); {self.bytes} bytes ({self.bytes / MiB:.0f} MiB) "
                f"verified in {self.reads} reads; failed opens/reads (allowed): "
                f"{fmt(self.errors)}")
        if self.notes:
            line += f"; {fmt(self.notes)}"
        print("\n" + line, flush=True)
        return line


def first_diff(got: bytes, want: bytes) -> int:
    n = min(len(got), len(want))
    diff = np.frombuffer(got, np.uint8, n) != np.frombuffer(want, np.uint8, n)
    return int(np.argmax(diff)) if diff.any() else n


def bytes_in(data: bytes, off: int, contents, zeros_from: int | None = None) -> bool:
    """Whether every byte of `data` (read at `off`) is the byte some content
    in `contents` (uint8 arrays) had at that position (or, from file offset
    `zeros_from` on, a zero)."""
    got = np.frombuffer(data, np.uint8)
    n = len(got)
    if n == 0:
        return True
    ok = np.zeros(n, bool)
    if zeros_from is not None:
        z = max(0, zeros_from - off)
        ok[z:] |= got[z:] == 0
    for c in contents:
        seg = c[off:off + n]
        if len(seg) == n and zeros_from is None and np.array_equal(seg, got):
            return True
        if len(seg):
            ok[:len(seg)] |= seg == got[:len(seg)]
    return bool(ok.all())


def matching_prefix(data: bytes, off: int, contents) -> int:
    """How many bytes at the start of `data` some content had there."""
    got = np.frombuffer(data, np.uint8)
    ok = np.zeros(len(got), bool)
    for c in contents:
        seg = c[off:off + len(got)]
        ok[:len(seg)] |= seg == got[:len(seg)]
    bad = np.nonzero(~ok)[0]
    return int(bad[0]) if len(bad) else len(got)


def bad_bytes(data: bytes, off: int, contents) -> str:
    """Where `data` holds bytes that no content had there (for messages)."""
    got = np.frombuffer(data, np.uint8)
    bad = np.ones(len(got), bool)
    for c in contents:
        seg = c[off:off + len(got)]
        bad[:len(seg)] &= seg != got[:len(seg)]
    idx = np.nonzero(bad)[0]
    if not len(idx):
        return "no byte is foreign"
    return (f"{len(idx)} foreign bytes from file offset {off + idx[0]} to {off + idx[-1]}, "
            f"{int((got[idx] == 0).sum())} of them zeros")


def read_checked(path: Path, want: bytes, tally: Tally, rng: random.Random, direct: bool,
                 shuffled: bool, chunk: int = MiB, what: str = "") -> None:
    """Read `path` whole in `chunk`s (in file order or shuffled, as mmap
    loaders touch tensors) and compare every read with `want`."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    try:
        if not direct:  # make the daemon serve this open, not pages cached before
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        offs = list(range(0, len(want), chunk))
        if shuffled:
            rng.shuffle(offs)
        for off in offs + [len(want)]:  # and EOF where it should be
            got = os.pread(fd, chunk, off)
            expect = want[off:off + chunk]
            if got != expect:
                tally.problem(f"{what or path} ({'direct' if direct else 'cached'}): read at "
                              f"{off} returned {len(got)} bytes, expected {len(expect)}, "
                              f"first difference at +{first_diff(got, expect)}")
                return
            tally.verified(len(got))
    finally:
        os.close(fd)


def tiers(m) -> dict[str, str]:
    """rel -> tier of every file the daemon knows, from .aatts/tiers."""
    out = {}
    for line in m.path(".aatts/tiers").read_text().splitlines():
        if line and not line.startswith("#"):
            cols = line.split("\t")
            out[cols[5]] = cols[0]
    return out


def settled(m) -> bool:
    """No promotion in flight and no copy waiting to be verified."""
    return (m.stats()["promotions_in_flight"] == 0
            and "verifying" not in tiers(m).values())


def copies_match_cold(m, cold: Path) -> int:
    """Every copy in the fast dir is a byte-exact copy of the cold file it
    names (its xattr says which); none is left half-written. Returns how
    many copies were checked."""
    assert not [n for n in os.listdir(m.fast / "partial") if n.endswith(".part")], \
        "partial copies left in the fast dir"
    n = 0
    for name in os.listdir(m.fast / "copies"):
        copy = m.fast / "copies" / name
        try:
            source = json.loads(os.getxattr(copy, "user.aatts.source"))
        except FileNotFoundError:
            continue  # evicted meanwhile
        assert sha256(copy) == sha256(cold / source["path"]), \
            f"the fast copy of {source['path']} differs from the cold file"
        n += 1
    return n


def remount_reads_back(m, files: dict[str, bytes], tally: Tally, rng: random.Random) -> None:
    """Unmount, mount again, and read every file back (through the daemon
    and through the page cache)."""
    m.stop()
    m.start()
    m.stats()
    for rel, want in files.items():
        read_checked(m.path(rel), want, tally, rng, direct=True, shuffled=True, what=rel)
        read_checked(m.path(rel), want, tally, rng, direct=False, shuffled=False, what=rel)


def random_files(cold: Path, names: list[str], low: int, high: int, rng: random.Random,
                 seed: int) -> dict[str, bytes]:
    """Files of random sizes in [low, high) plus up to a page, random bytes."""
    files = {}
    for i, rel in enumerate(names):
        size = rng.randrange(low, high) + rng.randrange(4096)
        files[rel] = write_random(cold / rel, size, seed + i).read_bytes()
    return files


def untouched_and_reads_back(m, cold: Path, before: dict, files: dict[str, bytes],
                             tally: Tally, rng: random.Random) -> None:
    """The end of a fault test: the cold tree is as the test left it, and
    after a remount every file reads back right."""
    m.stop()
    assert manifest(cold) == before
    remount_reads_back(m, files, tally, rng)
    tally.check()
    tally.summary()


def flip_byte(path: Path, off: int) -> None:
    """Damage a file behind everybody's back: one byte inverted, the mtime
    put back as it was."""
    st = os.stat(path)
    fd = os.open(path, os.O_RDWR)
    try:
        b = os.pread(fd, 1, off)
        os.pwrite(fd, bytes([b[0] ^ 0xFF]), off)
    finally:
        os.close(fd)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_EXCHANGE = 2


def exchange(a: Path, b: Path) -> None:
    """renameat2(a, b, RENAME_EXCHANGE): both names swap atomically."""
    args = (AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE)
    try:
        rc = _libc.renameat2(*args)
    except AttributeError:  # a libc without the wrapper (x86_64 syscall number)
        rc = _libc.syscall(316, *args)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(a))


def resize_tmpfs(path: Path, size: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


# -- the fast tier's filesystem fills up ------------------------------------

class Junk:
    """A file on the fast tier's filesystem that takes its free room away
    (fallocate, so the pages really are used) and gives it back."""

    def __init__(self, fast: Path) -> None:
        self.fast = fast
        self.path = fast / "junk"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        self.size = 0

    def free(self) -> int:
        sv = os.statvfs(self.fast)
        return sv.f_bavail * sv.f_frsize

    def fill(self, leave: int) -> None:
        """Grow until about `leave` bytes are free (0: full to the page)."""
        step = MiB
        while step >= 4096:
            want = self.size + self.free() - leave
            if want - self.size < step:
                step //= 16
                continue
            try:
                os.posix_fallocate(self.fd, self.size, step)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                step //= 16
                continue
            self.size += step

    def shrink(self, size: int) -> None:
        os.ftruncate(self.fd, size)
        self.size = size

    def remove(self) -> None:
        os.close(self.fd)
        os.unlink(self.path)


def test_fast_filesystem_fills_at_random_points(tmp_path, mounter, fast_tmpfs):
    """The fast tier's filesystem runs out of room (a 24 MiB tmpfs under a
    64 MiB budget, plus a junk file that fills it at random moments to
    random levels) while files of 3-20 MiB are read whole, in shuffled
    1 MiB chunks and concurrently: no read fails and every byte is right;
    once the room is back, files promote normally."""
    tally = Tally("test_fast_filesystem_fills_at_random_points")
    rng = random.Random(20240611)
    cold = tmp_path / "cold"
    files = random_files(cold, [f"w{i}.bin" for i in range(6)], 3 * MiB, 20 * MiB, rng, 7000)
    before = manifest(cold)
    fast = fast_tmpfs(72 * MiB)  # the budget must fit at mount time...
    m = mounter(cold, fast_size="64M", fast=fast)
    m.expect_log(NOSPACE_LOG)
    resize_tmpfs(fast, 24 * MiB)  # ...then the filesystem shrinks under it
    junk = Junk(fast)
    stop = threading.Event()

    def filler():
        frng = random.Random(31)
        while not stop.wait(frng.uniform(0.02, 0.3)):
            kind = frng.choices(["fill", "full", "shrink", "release"], [4, 2, 2, 2])[0]
            if kind == "fill":
                junk.fill(frng.randrange(0, 8 * MiB))
            elif kind == "full":
                junk.fill(0)
            elif kind == "shrink":
                junk.shrink(frng.randrange(0, junk.size + 1) // 4096 * 4096)
            else:
                junk.shrink(0)
            tally.fault(kind)

    def reader(i: int):
        rrng = random.Random(500 + i)
        while not stop.is_set():
            rel = rrng.choice(sorted(files))
            how = rrng.choice(["whole", "shuffled", "whole-direct", "shuffled-direct"])
            try:
                read_checked(m.path(rel), files[rel], tally, rrng, direct="direct" in how,
                             shuffled="shuffled" in how, what=rel)
                if rrng.random() < 0.3:  # and again from scratch: a new promotion
                    act(m.path(rel), "evict")
            except OSError as exc:
                tally.problem(f"{rel} ({how}): {exc!r}: a full fast tier must not fail reads")

    threads = [tally.thread(filler)] + [tally.thread(reader, i) for i in range(3)]
    tally.run(threads, 4.0, stop)
    tally.check()
    s = m.stats()
    assert s["promotions_nospace"] > 0, "the fast filesystem never filled: the test tested nothing"
    assert s["fast_tier"]["used_bytes"] <= s["fast_tier"]["budget_bytes"]
    tally.note("promotions_nospace", s["promotions_nospace"])
    tally.note("promotions_ok", s["promotions"])

    # the room comes back: every file promotes normally and reads right
    junk.remove()
    resize_tmpfs(fast, 72 * MiB)
    wait_for(lambda: m.stats()["promotions_in_flight"] == 0, what="promotions to end")
    nospace = m.stats()["promotions_nospace"]
    for rel in sorted(files, key=lambda r: len(files[r])):
        read_checked(m.path(rel), files[rel], tally, rng, direct=True, shuffled=True, what=rel)
        m.wait_tier(rel)
        assert sha256(m.copy(rel)) == sha256(cold / rel)
    assert m.stats()["promotions_nospace"] == nospace
    wait_for(lambda: settled(m), what="the fast tier to settle")
    copies_match_cold(m, cold)
    tally.check()
    untouched_and_reads_back(m, cold, before, files, tally, rng)


# -- cold files change under readers ----------------------------------------

class Lineage:
    """One cold file (one inode) and every content it has held; a file
    rewritten in place holds several, a file only ever replaced by rename
    exactly one."""

    def __init__(self, content: bytes) -> None:
        self.contents = [np.frombuffer(content, np.uint8)]

    @property
    def last(self) -> np.ndarray:
        return self.contents[-1]

    def add(self, content: np.ndarray) -> None:
        self.contents.append(content)

    def judge(self, data: bytes, off: int, asked: int, everything: list) -> str:
        """How a read of `asked` bytes at `off` that returned `data` through
        a handle of this file looks:

        "ok": this file's bytes, and (for a file never changed in place)
        all of them up to its EOF;
        "stale: ...": this file's bytes wherever the daemon answers (below the
        EOF of every content the file had), then bytes of another file
        that path named, or zeros, or fewer bytes: what a kernel cache
        holding another version's pages or size gives (a failure);
        "wrong": anything else."""
        contents = list(self.contents)
        if bytes_in(data, off, contents) and (
                len(contents) > 1 or len(data) == max(0, min(asked, len(contents[0]) - off))):
            return "ok"
        k = max(0, min(len(data), min(len(c) for c in contents) - off))
        if not bytes_in(data[:k], off, contents):
            return "wrong"
        tail = data[k:]
        if not bytes_in(tail, off + k, contents + everything, zeros_from=off + k):
            return "wrong"
        if not bytes_in(tail, off + k, contents + everything):
            return "stale: zeros past an EOF"
        if not bytes_in(tail, off + k, contents):
            return "stale: another version's bytes"
        return "stale: stopped short of the EOF"


class ColdChurn:
    """Changes cold files at random moments and records, for each path,
    which file it named after each change. Change k (1-based) is recorded
    before it is made: a reader that read `done` before its open and
    `started` after it saw the state after some change in [done, started]."""

    def __init__(self, cold: Path, outside: Path, paths: list[str], stable: Lineage,
                 rng: random.Random, tally: Tally) -> None:
        self.cold = cold
        self.staging = cold / "staging"
        self.staging.mkdir()
        self.outside = outside
        self.stable = stable
        self.rng = rng
        self.tally = tally
        self.started = 0
        self.done = 0
        self.n = 0
        self.history: dict[str, list] = {}  # path -> [(change, Lineage | None)]
        self.ever: dict[str, list] = {}  # path -> every Lineage it ever named
        self.links: dict[str, str] = {}  # path -> link target, when a link
        self.away: dict[str, Lineage] = {}  # files renamed away: staging name -> file
        self.log: list = []
        for p in paths:
            lin = Lineage((cold / p).read_bytes())
            self.history[p] = [(0, lin)]
            self.ever[p] = [lin]

    def current(self, p: str):
        return self.history[p][-1][1]

    def candidates(self, p: str, lo: int, hi: int) -> list[Lineage]:
        hist = list(self.history[p])
        at_lo = [s for k, s in hist if k <= lo][-1]
        out = [at_lo] + [s for k, s in hist if lo < k <= hi]
        return [s for s in dict.fromkeys(out) if s is not None]

    def _record(self, p: str, state) -> None:
        self.started += 1
        self.history[p].append((self.started, state))
        if state is not None and state not in self.ever[p]:
            self.ever[p].append(state)

    def _content(self) -> bytes:
        return self.rng.randbytes(self.rng.randrange(256 << 10, 3 * MiB))

    def step(self) -> None:
        rng = self.rng
        p = rng.choice(sorted(self.history))
        path = self.cold / p
        cur = self.current(p)
        kinds = ["swap", "swap", "link-inside", "link-outside"]
        if p in self.links:
            kinds += ["unlink"]
        elif cur is not None:  # a regular file
            kinds += ["rename-away", "unlink", "truncate", "extend", "rewrite", "rewrite"]
        kind = rng.choice(kinds)
        self.n += 1
        n = self.n
        if kind == "swap":  # a new file renamed over the path
            new = self._content()
            tmp = self.staging / f"new{n}"
            tmp.write_bytes(new)
            self._record(p, Lineage(new))
            os.rename(tmp, path)
            self.links.pop(p, None)
        elif kind in ("link-inside", "link-outside"):
            if kind == "link-inside":
                target = rng.choice(["../stable.bin", str(self.cold / "stable.bin")])
            else:
                target = rng.choice([str(self.outside / "secret.bin"),
                                     "../../outside/secret.bin"])
            tmp = self.staging / f"link{n}"
            os.symlink(target, tmp)
            self._record(p, self.stable if kind == "link-inside" else None)
            os.rename(tmp, path)
            self.links[p] = target
        elif kind == "rename-away":
            self._record(p, None)
            os.rename(path, self.staging / f"away{n}")
            self.away[f"away{n}"] = cur
        elif kind == "unlink":
            self._record(p, None)
            os.unlink(path)
            self.links.pop(p, None)
        else:  # in place: the same inode gets new bytes (recorded first)
            old = cur.last
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
            try:
                if kind == "truncate":
                    size = rng.randrange(0, len(old) + 1)
                    cur.add(old[:size])
                    self._record(p, cur)
                    os.ftruncate(fd, size)
                elif kind == "extend":
                    more = rng.randbytes(rng.randrange(1, MiB))
                    cur.add(np.concatenate([old, np.frombuffer(more, np.uint8)]))
                    self._record(p, cur)
                    os.pwrite(fd, more, len(old))
                else:
                    off = rng.randrange(0, max(1, len(old)))
                    new = rng.randbytes(rng.randrange(1, MiB))
                    arr = np.frombuffer(new, np.uint8)
                    grown = np.concatenate([old[:off], arr, old[off + len(arr):]])
                    cur.add(grown)
                    self._record(p, cur)
                    os.pwrite(fd, new, off)
            finally:
                os.close(fd)
        self.done = self.started
        self.log.append((self.started, p, kind, len(self.current(p).last)
                         if self.current(p) is not None else None))
        self.tally.fault(kind)


def test_cold_files_change_under_readers(tmp_path, mounter):
    """Cold files are swapped (renamed over), renamed away, unlinked,
    truncated, extended, rewritten in place and replaced by symlinks (to a
    file inside and to a file outside the cold dir) at random moments while
    threads read them through the mount. Where the daemon answers, a
    reader gets the bytes of the file its open found (one content, if the
    file was only ever replaced by rename); no read ever returns a byte
    that no file at that path held there; the outside file's bytes never
    appear. A read that shows the kernel's cache of another version fails
    the test."""
    tally = Tally("test_cold_files_change_under_readers")
    rng = random.Random(8086)
    cold, outside = tmp_path / "cold", tmp_path / "outside"
    secret = write_random(outside / "secret.bin", 3 * MiB, 666).read_bytes()
    secret_arr = np.frombuffer(secret, np.uint8)
    stable = Lineage(write_random(cold / "stable.bin", 2 * MiB + 77, 777).read_bytes())
    paths = [f"hot/t{i}" for i in range(3)]
    for i, p in enumerate(paths):
        write_random(cold / p, rng.randrange(256 << 10, 3 * MiB), 800 + i)
    write_random(cold / "still" / "a.bin", 5 * MiB, 901)
    write_random(cold / "still" / "b.bin", 100, 902)
    outside_before = manifest(outside)
    m = mounter(cold, fast_size="64M")
    m.expect_log(FAILED_LOG)  # a promotion whose cold file vanished under it
    churn = ColdChurn(cold, outside, paths, stable, random.Random(4242), tally)
    before = manifest(cold)  # after the staging dir exists
    stop = threading.Event()

    def mutator():
        while not stop.wait(rng.uniform(0.01, 0.08)):
            churn.step()

    def reader(i: int):
        rrng = random.Random(900 + i)
        direct = i % 2 == 0
        where = "direct" if direct else "cached"
        while not stop.is_set():
            p = rrng.choice(paths)
            lo = churn.done
            try:
                fd = os.open(m.path(p), os.O_RDONLY | (os.O_DIRECT if direct else 0))
            except OSError as exc:
                tally.error(exc, "open")
                continue
            hi = churn.started
            try:
                read_one(p, fd, lo, hi, rrng, direct, where)
            finally:
                try:
                    os.close(fd)
                except OSError as exc:  # a bad inode: the path changed type meanwhile
                    tally.error(exc, "close")

    def read_one(p, fd, lo, hi, rrng, direct, where):
        cands = churn.candidates(p, lo, hi)
        if not cands:
            tally.problem(f"{p} opened ({where}) while it was absent or a link outside "
                          f"(changes {lo}..{hi})")
            return
        alive = cands
        sequential = rrng.random() < 0.5
        off = 0
        for _ in range(16):
            asked = rrng.choice([4096, 65536, 256 << 10, MiB])
            if not sequential:
                off = rrng.randrange(0, 3 * MiB + 4096)
            try:
                data = os.pread(fd, asked, off)
            except OSError as exc:
                tally.error(exc, f"read-{where}")
                return
            if len(data) >= 64 and np.array_equal(
                    secret_arr[off:off + len(data)], np.frombuffer(data, np.uint8)):
                tally.problem(f"{p}: the OUTSIDE file's bytes were served at {off}")
            everything = [c for lin in list(churn.ever[p]) for c in list(lin.contents)]
            verdicts = {lin: lin.judge(data, off, asked, everything) for lin in alive}
            stale = sorted(v for v in verdicts.values() if v.startswith("stale"))
            if not stale and not direct and bytes_in(
                    data, off, everything, zeros_from=min(map(len, everything))):
                stale = ["stale: another version's bytes"]
            if "ok" in verdicts.values():
                # narrowed by bytes, not by length: a read stopped short by a
                # stale size says nothing about which file it is
                alive = [lin for lin, v in verdicts.items()
                         if v in ("ok", "stale: stopped short of the EOF")]
                tally.verified(len(data))
            elif stale:
                # another version's pages or size: the kernel cache must
                # never be shared by two files (namespace.py, fs._check_version)
                tally.problem(f"{p} ({where}): read at {off} of {asked} returned "
                              f"{len(data)} bytes: {stale[0]} (changes {lo}..{hi})")
                tally.note(f"{where} reads {stale[0]}")
                return
            else:
                prefixes = [(len(lin.last), matching_prefix(data, off, lin.contents))
                            for lin in alive]
                tally.problem(
                    f"{p} ({where}): read at {off} of {asked} returned {len(data)} bytes that "
                    f"are not those of the file the open found (changes {lo}..{hi}, now "
                    f"{churn.started}): {bad_bytes(data, off, everything)}; (size, bytes "
                    f"matching) of each file it may have found: {prefixes}; sizes of the "
                    f"path's files {[len(c) for c in everything]}; its last changes "
                    f"{[e for e in churn.log if e[1] == p][-6:]}")
                return
            if sequential:
                if not data:
                    return
                off += len(data)

    threads = [tally.thread(mutator)] + [tally.thread(reader, i) for i in range(4)]
    tally.run(threads, 4.0, stop)
    tally.check()
    allowed = {"ENOENT", "EIO", "ESTALE", "EINVAL", "ELOOP"}
    odd = {k for k in tally.errors if k.split(":")[1] not in allowed}
    assert not odd, f"unexpected errors: {odd}"
    assert sum(tally.faults.values()) >= 20 and tally.reads >= 100
    m.stats()  # the daemon answers

    # the cold tree holds exactly what the test put there
    after = manifest(cold)
    mine = ("hot", "staging")
    assert {k: v for k, v in after.items() if not k.startswith(mine)} == \
        {k: v for k, v in before.items() if not k.startswith(mine)}
    assert manifest(outside) == outside_before
    for p in paths:
        cur = churn.current(p)
        if p in churn.links:
            assert os.readlink(cold / p) == churn.links[p]
        elif cur is None:
            assert not os.path.lexists(cold / p)
        else:
            assert (cold / p).read_bytes() == cur.last.tobytes()
    for name, lin in churn.away.items():
        assert (churn.staging / name).read_bytes() == lin.last.tobytes()

    # after a remount, every file reads right and the links behave
    files = {str(f.relative_to(cold)): f.read_bytes() for f in cold.rglob("*")
             if f.is_file() and not f.is_symlink()}
    remount_reads_back(m, files, tally, rng)
    tally.check()
    for p, target in churn.links.items():
        if churn.current(p) is None:
            assert not os.path.lexists(m.path(p))
        else:
            assert m.path(p).read_bytes() == stable.last.tobytes()
    wait_for(lambda: settled(m), what="the fast tier to settle")
    copies_match_cold(m, cold)
    tally.summary()


# -- a cold directory exchanged with a symlink to outside --------------------

def test_directory_swapped_for_a_link_outside(tmp_path, mounter):
    """cold/d (holding x) and cold/dl, a symlink to a directory outside that
    also holds an x, are exchanged atomically (renameat2 RENAME_EXCHANGE)
    at random moments while threads read MNT/d/x and MNT/dl/x and list
    MNT/d: a read returns the inside x or fails, never the outside bytes
    or names."""
    tally = Tally("test_directory_swapped_for_a_link_outside")
    cold, outside = tmp_path / "cold", tmp_path / "outside"
    inside_x = write_random(cold / "d" / "x", 2 * MiB + 5, 71).read_bytes()
    write_random(cold / "d" / "y", 1000, 72)
    outside_x = write_random(outside / "x", 3 * MiB + 9, 73).read_bytes()
    write_random(outside / "only-outside", 10, 74)
    os.symlink(outside, cold / "dl")
    before, outside_before = manifest(cold), manifest(outside)
    m = mounter(cold, fast_size="64M")
    m.expect_log(FAILED_LOG)  # a promotion whose directory was swapped away under it
    stop = threading.Event()
    swaps = [0]

    def swapper():
        srng = random.Random(99)
        while not stop.wait(srng.uniform(0.002, 0.04)):
            exchange(cold / "d", cold / "dl")
            swaps[0] += 1
            tally.fault("exchange")

    def reader(i: int):
        rrng = random.Random(300 + i)
        direct = i % 2 == 0
        where = "direct" if direct else "cached"
        while not stop.is_set():
            rel = rrng.choice(["d/x", "d/x", "dl/x"])
            try:
                fd = os.open(m.path(rel), os.O_RDONLY | (os.O_DIRECT if direct else 0))
            except OSError as exc:
                tally.error(exc, "open")
                continue
            try:
                off = 0
                while True:
                    try:
                        data = os.pread(fd, 256 << 10, off)
                    except OSError as exc:
                        tally.error(exc, f"read-{where}")
                        break
                    want = inside_x[off:off + (256 << 10)]
                    if data != want:
                        leak = data[:64] == outside_x[off:off + 64] and len(data) >= 64
                        tally.problem(f"{rel} ({where}) at {off}: {len(data)} bytes, "
                                      f"expected {len(want)}"
                                      + ("; THE OUTSIDE FILE'S BYTES" if leak else ""))
                        break
                    tally.verified(len(data))
                    if not data:
                        break
                    off += len(data)
            finally:
                try:
                    os.close(fd)
                except OSError as exc:  # a bad inode: a path changed type meanwhile
                    tally.error(exc, "close")

    def lister():
        while not stop.is_set():
            try:
                names = os.listdir(m.path("d"))
                st = os.stat(m.path("d/x"))
            except OSError as exc:
                tally.error(exc, "list")
                continue
            if "only-outside" in names:
                tally.problem(f"the outside directory was listed as MNT/d: {names}")
            if st.st_size != len(inside_x):
                tally.problem(f"MNT/d/x has the size of the outside x: {st.st_size}")
            tally.note("listings")

    threads = ([tally.thread(swapper), tally.thread(lister)]
               + [tally.thread(reader, i) for i in range(3)])
    tally.run(threads, 3.0, stop)
    if swaps[0] % 2:
        exchange(cold / "d", cold / "dl")
    tally.check()
    allowed = {"ENOENT", "EIO", "ESTALE", "ENOTDIR", "ELOOP", "EINVAL"}
    odd = {k for k in tally.errors if k.split(":")[1] not in allowed}
    assert not odd, f"unexpected errors: {odd}"
    assert swaps[0] >= 20 and tally.reads >= 50
    m.stats()
    assert manifest(cold) == before and manifest(outside) == outside_before
    remount_reads_back(m, {"d/x": inside_x}, tally, random.Random(1))
    tally.check()
    assert sorted(os.listdir(m.path("d"))) == ["x", "y"]
    assert not os.path.lexists(m.path("dl"))  # a link outside: hidden
    wait_for(lambda: settled(m), what="the fast tier to settle")
    copies_match_cold(m, cold)
    tally.summary()


# -- kill -9 during promotions -------------------------------------------------

def test_kill_9_during_promotions(tmp_path, mounter, fast_tmpfs):
    """The daemon is killed (SIGKILL) at random moments while files are
    being promoted, read and evicted, several times, once more while the
    restarted daemon verifies what it found: after each restart no partial
    copy is left, every copy kept is byte-exact, and every file reads right."""
    tally = Tally("test_kill_9_during_promotions")
    rng = random.Random(1999)
    cold = tmp_path / "cold"
    files = random_files(cold, [f"m{i // 3}/s{i}.bin" for i in range(8)], 2 * MiB, 12 * MiB,
                         rng, 3000)
    before = manifest(cold)
    m = mounter(cold, fast_size="64M", fast=fast_tmpfs(80 * MiB))
    for cycle in range(5):
        crng = random.Random(7000 + cycle)
        killed = threading.Event()
        stop = threading.Event()

        def reader(i: int):
            rrng = random.Random(crng.random())
            while not stop.is_set():
                rel = rrng.choice(sorted(files))
                try:
                    read_checked(m.path(rel), files[rel], tally, rrng,
                                 direct=rrng.random() < 0.5, shuffled=rrng.random() < 0.5,
                                 what=rel)
                except OSError as exc:
                    if not killed.is_set():
                        tally.problem(f"{rel}: {exc!r} before the daemon was killed")
                    tally.error(exc, "after-kill")
                    return

        def churner():  # evict and promote again, over and over
            wrng = random.Random(crng.random())
            while not stop.is_set():
                rel = wrng.choice(sorted(files))
                try:
                    act(m.path(rel), "evict")
                    act(m.path(rel), "warm")
                except OSError as exc:
                    if killed.is_set():
                        return
                    # EBUSY: evicted again while promoted (three times); EDQUOT: the
                    # budget stayed held by promotions in flight (prefetches too)
                    if exc.errno not in (errno.EBUSY, errno.EDQUOT):
                        tally.problem(f"warming {rel}: {exc!r}")
                    tally.error(exc, "warm")

        threads = [tally.thread(reader, i) for i in range(2)] + [tally.thread(churner)]
        for t in threads:
            t.start()
        time.sleep(crng.uniform(0.05, 0.5))  # the random point of the kill...
        wait_for(lambda: m.stats()["promotions_in_flight"] > 0, timeout=10,
                 what="a promotion in flight")  # ...with a promotion running
        killed.set()
        m.stop(kill=True)
        tally.fault("kill-during-promotion")
        stop.set()
        tally.join(threads)
        tally.check()
        left = set(os.listdir(m.fast / "partial"))
        tally.note("partial_copies_left_by_kills", len(left))
        m.start()
        assert not left & set(os.listdir(m.fast / "partial")), "recovery kept partial copies"
        if cycle % 2:  # and again while the new daemon verifies what it found
            time.sleep(crng.uniform(0.0, 0.05))
            m.stop(kill=True)
            tally.fault("kill-just-after-restart")
            m.start()
        wait_for(lambda: settled(m), what="the fast tier to settle")
        tally.note("copies_checked_after_restart", copies_match_cold(m, cold))
        for rel, want in files.items():
            read_checked(m.path(rel), want, tally, crng, direct=True, shuffled=True, what=rel)
        tally.check()
    m.stats()
    untouched_and_reads_back(m, cold, before, files, tally, rng)


# -- fast copies damaged behind the daemon's back ------------------------------

def test_damaged_fast_copies_are_never_served(tmp_path, mounter):
    """A byte of a committed fast copy is flipped (its mtime put back) at
    random moments while the daemon serves other readers, then while the
    daemon is stopped, and while the restarted daemon verifies its copies:
    the damaged copy is never served, each one is counted in copies_corrupt,
    and the file is promoted again, correct."""
    tally = Tally("test_damaged_fast_copies_are_never_served")
    rng = random.Random(4711)
    cold = tmp_path / "cold"
    files = {f"c{i}.bin": write_random(cold / f"c{i}.bin", rng.randrange(MiB, 6 * MiB) + i,
                                       600 + i).read_bytes() for i in range(6)}
    before = manifest(cold)
    m = mounter(cold, fast_size="64M", extra=["--no-prefetch"])
    m.expect_log(CHANGED_LOG)
    m.expect_log(CORRUPT_LOG)
    locks = {rel: threading.Lock() for rel in files}  # held while a file is open

    def promote_all():
        for rel, want in files.items():
            read_checked(m.path(rel), want, tally, rng, direct=True, shuffled=False, what=rel)
        for rel in files:
            m.wait_tier(rel)

    promote_all()
    stop = threading.Event()

    def reader(i: int):
        rrng = random.Random(40 + i)
        while not stop.is_set():
            rel = rrng.choice(sorted(files))
            with locks[rel]:
                read_checked(m.path(rel), files[rel], tally, rrng, direct=rrng.random() < 0.7,
                             shuffled=rrng.random() < 0.5, chunk=256 << 10, what=rel)

    damaged = 0

    def damager():
        nonlocal damaged
        drng = random.Random(41)
        while not stop.wait(drng.uniform(0.05, 0.3)):
            rel = drng.choice(sorted(files))
            with locks[rel]:  # no handle open on it (test_a_copy_damaged_under_an_open_handle)
                if m.tier(rel) != "fast":
                    continue  # its copy was dropped and is being made again
                flip_byte(m.copy(rel), drng.randrange(len(files[rel])))
                damaged += 1
                tally.fault("flip-while-running")
                # the next open must notice; read through the daemon
                read_checked(m.path(rel), files[rel], tally, drng, direct=True,
                             shuffled=True, what=rel)

    threads = [tally.thread(damager)] + [tally.thread(reader, i) for i in range(2)]
    tally.run(threads, 3.0, stop)
    tally.check()
    assert damaged >= 5
    assert m.stats()["copies_corrupt"] == damaged
    wait_for(lambda: settled(m), what="the fast tier to settle")
    promote_all()
    copies_match_cold(m, cold)

    # while stopped: damaged copies are found when the daemon verifies them
    m.stop()
    stopped = rng.sample(sorted(files), 3)
    for rel in stopped:
        flip_byte(m.copy(rel), rng.randrange(len(files[rel])))
        tally.fault("flip-while-stopped")
    m.start()
    # and while the new daemon is verifying: a random moment after the start
    late = rng.choice([rel for rel in files if rel not in stopped])
    time.sleep(rng.uniform(0.0, 0.05))
    flip_byte(m.copy(late), rng.randrange(len(files[late])))
    tally.fault("flip-while-verifying")
    wait_for(lambda: settled(m), what="the copies to be verified")
    for rel in stopped:
        assert m.tier(rel) == "cold"
    for rel, want in files.items():
        read_checked(m.path(rel), want, tally, rng, direct=True, shuffled=True, what=rel)
    tally.check()
    assert m.stats()["copies_corrupt"] == len(stopped) + 1
    wait_for(lambda: settled(m), what="the fast tier to settle")
    promote_all()
    copies_match_cold(m, cold)
    untouched_and_reads_back(m, cold, before, files, tally, rng)


# -- minimal reproductions of what the tests above found ---------------------

def test_a_file_replaced_by_rename_keeps_each_reader_on_its_own_version(tmp_path, mounter):
    cold = tmp_path / "cold"
    old = write_random(cold / "f", 3 * MiB, 1).read_bytes()
    m = mounter(cold, fast_size="64M", extra=["--no-prefetch"])
    with open(m.path("f"), "rb", buffering=0) as a:
        assert os.pread(a.fileno(), 4096, 0) == old[:4096]
        new = write_random(cold / "f.new", 3 * MiB, 2).read_bytes()
        os.rename(cold / "f.new", cold / "f")
        with open(m.path("f"), "rb", buffering=0) as b:
            seen = {
                # the old reader first: it fills the page cache with old bytes
                "old reader at 1 MiB": os.pread(a.fileno(), 4096, MiB) == old[MiB:MiB + 4096],
                "new reader at 1 MiB": os.pread(b.fileno(), 4096, MiB) == new[MiB:MiB + 4096],
                # the new reader first: the old reader gets new bytes
                "new reader at 2 MiB": os.pread(b.fileno(), 4096, 2 * MiB)
                == new[2 * MiB:2 * MiB + 4096],
                "old reader at 2 MiB": os.pread(a.fileno(), 4096, 2 * MiB)
                == old[2 * MiB:2 * MiB + 4096],
            }
    wrong = [k for k, ok in seen.items() if not ok]
    assert not wrong, f"wrong bytes for: {wrong}"


def test_a_file_replaced_by_rename_with_a_bigger_one_reads_whole(tmp_path, mounter):
    cold = tmp_path / "cold"
    write_random(cold / "f", MiB, 1)
    m = mounter(cold, fast_size="64M", extra=["--no-prefetch"])
    os.stat(m.path("f"))  # as ls -l or a loader's exists() check do
    new = write_random(cold / "f.new", 3 * MiB, 2).read_bytes()
    os.rename(cold / "f.new", cold / "f")
    got = m.path("f").read_bytes()  # an open after the rename: the new file, whole
    n = len(got)
    assert n == len(new), f"read {n} bytes of a file of {len(new)}"
    assert got == new


def test_a_copy_damaged_under_an_open_handle_is_not_served(tmp_path, mounter):
    cold = tmp_path / "cold"
    want = write_random(cold / "f", 3 * MiB, 1).read_bytes()
    m = mounter(cold, fast_size="64M", extra=["--no-prefetch"])
    m.expect_log("changed behind aattsfs's back")
    assert m.path("f").read_bytes() == want
    m.wait_tier("f")
    fd = os.open(m.path("f"), os.O_RDONLY | os.O_DIRECT)
    try:
        assert os.pread(fd, 4096, 0) == want[:4096]  # served from the fast copy
        flip_byte(m.copy("f"), 2 * MiB)
        got = os.pread(fd, 4096, 2 * MiB)
    finally:
        os.close(fd)
    assert got == want[2 * MiB:2 * MiB + 4096], "the damaged byte was served"
    assert m.stats()["copies_corrupt"] == 1


def test_a_fast_disk_that_fails_reads_is_read_around(tmp_path, loop_ext4, mounter):
    """The fast tier's disk starts failing reads (EIO) under an open handle
    and later opens, passthrough off: every read still returns the cold
    bytes, from the cold file; the copies are dropped, not served."""
    cold = tmp_path / "cold"
    want = {n: write_random(cold / n, 6 * MiB + 123 * i, 40 + i).read_bytes()
            for i, n in enumerate(("a", "b"))}
    fast = loop_ext4(64 * MiB)
    m = mounter(cold, fast_size="32M", fast=fast.path, extra=["--no-prefetch",
                                                              "--passthrough", "off"])
    m.expect_log("reading the fast copy of [ab] failed")
    m.expect_log("EXT4-fs|I/O error|Input/output error")  # the fast tier's own complaints
    for n in want:
        run_cli("warm", m.path(n))
    fd = os.open(m.path("a"), os.O_RDONLY | os.O_DIRECT)
    try:
        assert os.pread(fd, MiB, 0) == want["a"][:MiB]  # from the fast copy
        for n in want:  # the copies' pages leave memory: the next reads go to the disk
            cfd = os.open(m.copy(n), os.O_RDONLY)
            os.posix_fadvise(cfd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(cfd)
        fast.fail_reads()
        for off in range(0, len(want["a"]) + MiB, MiB):  # the open handle
            assert os.pread(fd, MiB, off) == want["a"][off:off + MiB], f"a at {off}"
    finally:
        os.close(fd)
    tally = Tally("fast disk fails")
    read_checked(m.path("b"), want["b"], tally, random.Random(1), direct=True,
                 shuffled=True)  # a new open
    assert not tally.problems, tally.problems
    # both copies dropped (a read may promote a file again onto the failing
    # disk: its pages are cached until they are not, then it is dropped again)
    assert m.stats()["copies_corrupt"] >= 2
