"""The store in-process, over real directories and real LMDB, without a
mount: what depends on the order of events is driven step by step here
instead of by timing."""

import errno
import os
import shutil

import pytest
import trio

from aattsfs.metadata import MetaStore
from aattsfs.policy import AdmitAll, LRUPolicy, ReuseAdmission
from aattsfs.residency import Residency
from aattsfs.store import CHUNK, Lanes, Promotion, Store
from aattsfs.tiers import ColdTier, FastTier


def test_lanes_go_to_the_most_urgent_waiter():
    granted = []

    async def main():
        lanes = Lanes(1)

        async def take(name, prio, patience=10.0):
            with trio.move_on_after(patience):
                async with lanes.slot(prio):
                    granted.append(name)

        async with trio.open_nursery() as nursery:
            async with lanes.slot((1, 0)):  # held while the others queue
                nursery.start_soon(take, "late", (1, 9))
                nursery.start_soon(take, "soon", (1, 1))
                nursery.start_soon(take, "gave up", (0, 0), 0.01)
                await trio.sleep(0.1)
                assert lanes.outranked((1, 5))  # "soon" waits, and is more urgent
                assert not lanes.outranked((1, 0))
        assert lanes.free == 1

    trio.run(main)
    assert granted == ["soon", "late"]


def make_store(tmp_path, budget: int, admission=None) -> Store:
    cold = ColdTier(str(tmp_path / "cold"))
    fast = FastTier(str(tmp_path / "fast"), {"cold": str(tmp_path / "cold")})
    meta = MetaStore(str(tmp_path / "lmdb"))
    return Store(cold, fast, meta, Residency(budget, LRUPolicy(), admission or AdmitAll()))


def close_store(store: Store) -> None:
    store.flush()
    store.meta.close()
    store.fast.close()


def cold_files(tmp_path, **sizes) -> dict[str, bytes]:
    (tmp_path / "cold").mkdir()
    want = {}
    for name, size in sizes.items():
        want[name] = os.urandom(size)
        (tmp_path / "cold" / name).write_bytes(want[name])
    return want


def running(store: Store, body) -> None:
    """trio.run(body()) with the store's background tasks running."""
    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            await body()
            nursery.cancel_scope.cancel()

    trio.run(main)


def hold_chunks_of(rel: str, monkeypatch) -> trio.Event:
    """Promotions of rel copy no chunk until the event returned is set."""
    gate = trio.Event()
    real_fetch = Promotion._copy

    async def fetch(self, idx):
        if self.rel == rel:
            await gate.wait()
        await real_fetch(self, idx)

    monkeypatch.setattr(Promotion, "_copy", fetch)
    return gate


async def read_whole(store: Store, rel: str, pid: int = 0) -> bytes:
    h = await store.open(rel, pid)
    try:
        out = b""
        while chunk := await store.read(h, len(out), CHUNK):
            out += chunk
        return out
    finally:
        store.release(h)


def test_staged_files_arrive_in_the_order_they_are_needed(tmp_path, monkeypatch):
    (tmp_path / "cold").mkdir()
    for name in "ab":
        (tmp_path / "cold" / name).write_bytes(os.urandom(3 * CHUNK))
    store = make_store(tmp_path, 64 * CHUNK)
    fetched = []
    real_fetch = Promotion._copy

    async def fetch(self, idx):
        fetched.append((self.rel, idx))
        await real_fetch(self, idx)

    monkeypatch.setattr(Promotion, "_copy", fetch)

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            # both staged at once, a first: two lanes, a takes both until it is in
            proms = [await store.prefetch(rel, frozenset()) for rel in "ab"]
            for prom in proms:
                await prom.done.wait()
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert sorted(fetched[:3]) == [("a", 0), ("a", 1), ("a", 2)]
    assert sorted(fetched[3:]) == [("b", 0), ("b", 1), ("b", 2)]
    for name in "ab":
        assert store.tier(name) == "fast"
        with open(store.fast.path(name), "rb") as f:
            assert f.read() == (tmp_path / "cold" / name).read_bytes()
    assert store.core.used == 6 * CHUNK


@pytest.mark.parametrize("damage", ["removed", "replaced by a file"])
def test_a_fast_tier_that_cannot_take_a_copy_costs_no_resident_one(tmp_path, damage):
    """The directory of partial copies goes away (recreated) or cannot be
    used (the read is served cold): either way the copy already there
    stays, and the budget and probation are as before."""
    want = cold_files(tmp_path, a=CHUNK, b=CHUNK)
    store = make_store(tmp_path, CHUNK + CHUNK // 2, ReuseAdmission(CHUNK + CHUNK // 2))
    admission = store.core.admission

    async def body():
        await store.warm("a")
        shutil.rmtree(store.fast.tmp)
        if damage != "removed":
            open(store.fast.tmp, "w").close()
        # b by two processes: reused, it is admitted in place of a (one
        # process opening it twice in a row would be one use)
        for pid in (os.getpid(), os.getppid()):
            assert await read_whole(store, "b", pid) == want["b"]
            while any(e.prom for e in store.entries.values()):
                await trio.sleep(0.01)

    running(store, body)
    if damage == "removed":
        assert store.tier("b") == "fast" and store.tier("a") == "cold"
        assert store.stats.promotions_failed == 0
    else:
        assert store.tier("a") == "fast" and store.tier("b") == "cold"
        # the first read of b was not admitted (a newcomer beyond probation),
        # the second would have evicted a
        assert store.stats.bypasses == 1
        assert store.stats.promotions_failed == 1 and store.stats.promotions_nospace == 0
        assert store.stats.evictions == 0
    assert store.core.used == CHUNK
    assert admission._probation_bytes == 0
    close_store(store)


def test_a_cancelled_promotion_leaves_no_probation_behind(tmp_path, monkeypatch):
    want = cold_files(tmp_path, a=CHUNK, b=2 * CHUNK)
    budget = 4 * CHUNK
    store = make_store(tmp_path, budget, ReuseAdmission(budget))
    gate = hold_chunks_of("a", monkeypatch)
    got = []

    async def body():
        await store.warm("b")
        h = await store.open("a")

        async def read():
            got.append(await store.read(h, 0, CHUNK))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)  # a newcomer: comes in on probation
            while (prom := store.entries["a"].prom) is None:
                await trio.sleep(0.01)
            assert store.core.admission._probation_bytes == CHUNK
            store.evict("a")  # cancelled before a byte came
            gate.set()
        store.release(h)
        await prom.done.wait()

    running(store, body)
    assert got == [want["a"]]
    assert store.stats.promotions_cancelled == 1
    assert store.core.admission._probation_bytes == 0
    assert store.core.used == 2 * CHUNK
    close_store(store)


def test_unpinning_after_the_budget_shrank_gets_back_within_it(tmp_path, caplog):
    cold_files(tmp_path, **{f"p{i}": CHUNK for i in range(4)})
    store = make_store(tmp_path, 8 * CHUNK)

    async def pin_all():
        for i in range(4):
            await store.set_pinned(f"p{i}", True)

    running(store, pin_all)
    close_store(store)
    store = make_store(tmp_path, 2 * CHUNK)  # restarted with a quarter of the budget
    store.recover()
    assert store.core.used == 4 * CHUNK  # pins are kept past the budget, and said so
    assert "pinned files hold" in caplog.text

    async def unpin_all():
        for i in range(4):
            await store.set_pinned(f"p{i}", False)
            assert store.core.used <= max(2 * CHUNK, (3 - i) * CHUNK)

    running(store, unpin_all)
    assert store.core.used == 2 * CHUNK
    assert sum(store.tier(f"p{i}") in ("fast", "verifying") for i in range(4)) == 2
    close_store(store)


def test_warm_waits_for_the_room_promotions_in_flight_hold(tmp_path, monkeypatch):
    """a's promotion holds most of the budget: warm b waits for it to end
    (then evicts it) instead of answering that b does not fit; a file
    larger than the whole budget is refused at once, as such."""
    want = cold_files(tmp_path, a=2 * CHUNK, b=2 * CHUNK, huge=4 * CHUNK)
    store = make_store(tmp_path, 3 * CHUNK)
    gate = hold_chunks_of("a", monkeypatch)
    order = []

    async def body():
        prom = await store.prefetch("a", frozenset())
        assert prom is not None
        with pytest.raises(OSError) as exc:
            await store.warm("huge")
        assert exc.value.errno == errno.EFBIG

        async def warm_b():
            await store.warm("b")
            order.append("b warm")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(warm_b)
            await trio.sleep(0.05)
            order.append("a released")
            gate.set()

    running(store, body)
    assert order == ["a released", "b warm"]
    assert store.tier("b") == "fast"
    with open(store.fast.path("b"), "rb") as f:
        assert f.read() == want["b"]
    assert store.core.used <= 3 * CHUNK
    close_store(store)


def test_a_temporary_copy_that_fails_a_read_is_read_around(tmp_path, monkeypatch):
    """A read served from a promotion's temporary copy fails (a failing
    fast disk): the promotion stops and the read returns the cold bytes."""
    want = cold_files(tmp_path, a=2 * CHUNK)
    store = make_store(tmp_path, 4 * CHUNK)
    gate = trio.Event()
    real_fetch, real_pread = Promotion._copy, os.pread
    bad_fds: set[int] = set()

    async def fetch(self, idx):
        if idx == 1:  # chunk 0 arrives, the promotion stays in flight
            await gate.wait()
        await real_fetch(self, idx)

    def pread(fd, n, off):
        if fd in bad_fds:
            raise OSError(errno.EIO, "Input/output error")
        return real_pread(fd, n, off)

    monkeypatch.setattr(Promotion, "_copy", fetch)
    monkeypatch.setattr(os, "pread", pread)
    got = []

    async def body():
        h = await store.open("a")
        got.append(await store.read(h, 0, CHUNK))  # from cold, while chunk 0 is copied
        prom = store.entries["a"].prom
        assert prom is not None and not prom.committed
        while not prom.present(0, CHUNK):
            await trio.sleep(0.01)
        bad_fds.add(prom.tmp_fd.fd)
        got.append(await store.read(h, 0, CHUNK))  # from the temporary copy: fails
        gate.set()
        await prom.done.wait()
        store.release(h)

    running(store, body)
    assert got == [want["a"][:CHUNK]] * 2
    assert store.stats.promotions_failed == 1
    assert store.tier("a") == "cold" and store.core.used == 0
    close_store(store)


def test_a_read_during_a_promotion_does_not_wait_for_its_chunk(tmp_path, monkeypatch):
    """A chunk not yet in the temporary copy is read from the cold file
    while it is copied: the reader streams instead of waiting for 4 MiB,
    and the bytes are counted once as read from the cold tier."""
    want = cold_files(tmp_path, a=2 * CHUNK)
    store = make_store(tmp_path, 4 * CHUNK)
    gate = hold_chunks_of("a", monkeypatch)
    got = []

    async def body():
        h = await store.open("a")
        with trio.fail_after(30):  # waiting for the held chunk would never end
            got.append(await store.read(h, CHUNK + 4096, 65536))
        prom = store.entries["a"].prom
        assert prom is not None and prom.state[1] == 1  # its copy started, held
        gate.set()
        await prom.done.wait()
        got.append(await store.read(h, CHUNK + 4096, 65536))
        store.release(h)

    running(store, body)
    assert got == [want["a"][CHUNK + 4096:CHUNK + 4096 + 65536]] * 2
    assert store.tier("a") == "fast"
    assert store.stats.cold_bytes_read == 2 * CHUNK
    assert store.stats.reads_cold == 1 and store.stats.reads_fast == 1
    close_store(store)


async def read_all(store: Store, h, size: int, step: int = 65536) -> bytes:
    out = b""
    while len(out) < size and (chunk := await store.read(h, len(out), step)):
        out += chunk
    return out


def test_a_streaming_reader_of_a_promotion_the_full_fast_tier_stops(tmp_path, monkeypatch):
    """The fast tier fills while chunk 1 is copied: the promotion fails, and
    the reader, streaming from the cold file meanwhile, reads every byte
    right (a chunk served from the copy before it is there would be zeros)."""
    import aattsfs.store as store_mod
    want = cold_files(tmp_path, a=3 * CHUNK)
    store = make_store(tmp_path, 4 * CHUNK)
    real = store_mod._copy_range

    def copy_range(src, dst, off, length):
        if off == CHUNK:
            os.pwrite(dst, b"\0" * 4096, off)  # a part written, then the filesystem is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst, off, length)

    monkeypatch.setattr(store_mod, "_copy_range", copy_range)
    got = []

    async def body():
        h = await store.open("a")
        got.append(await read_all(store, h, 3 * CHUNK))
        prom = h.prom or store.entries["a"].prom
        if prom is not None:
            await prom.done.wait()
        got.append(await read_all(store, h, 3 * CHUNK))  # after the failure: cold
        store.release(h)

    running(store, body)
    assert got == [want["a"]] * 2
    assert store.stats.promotions_nospace == 1 and store.tier("a") == "cold"
    assert store.core.used == 0
    close_store(store)


def test_a_streaming_reader_keeps_the_file_its_open_found(tmp_path, monkeypatch):
    """While a promotion's chunk is held, the cold path is replaced by
    another file and then the file the open found is truncated in place:
    the reader gets that file's bytes, then EIO past its new end (never
    the new file's bytes, never zeros), and the copy is not committed."""
    want = cold_files(tmp_path, a=2 * CHUNK)
    cold = tmp_path / "cold"
    store = make_store(tmp_path, 4 * CHUNK)
    gate = hold_chunks_of("a", monkeypatch)
    got, errors = [], []

    async def body():
        h = await store.open("a")
        got.append(await store.read(h, 0, 65536))  # starts the promotion, held
        prom = store.entries["a"].prom
        old = os.open(cold / "a", os.O_RDWR)
        (cold / "b").write_bytes(os.urandom(2 * CHUNK))
        os.rename(cold / "b", cold / "a")  # the path names another file now
        got.append(await store.read(h, CHUNK, 65536))  # still the file the open found
        os.ftruncate(old, CHUNK + 4096)  # that file shrinks in place
        os.close(old)
        got.append(await store.read(h, CHUNK, 4096))
        try:
            await store.read(h, CHUNK + 65536, 65536)
        except OSError as exc:
            errors.append(exc.errno)
        gate.set()
        await prom.done.wait()
        store.release(h)

    running(store, body)
    a = want["a"]
    assert got == [a[:65536], a[CHUNK:CHUNK + 65536], a[CHUNK:CHUNK + 4096]]
    assert errors == [errno.EIO]
    assert store.tier("a") == "cold" and store.stats.promotions == 0
    assert store.core.used == 0
    close_store(store)


@pytest.mark.parametrize("side", ["cold", "fast"])
def test_a_failed_copy_is_blamed_on_the_tier_that_failed(tmp_path, monkeypatch, side):
    """A promotion's copy fails for real: its read of the cold file (the
    fd is a directory's) or its write to the fast tier (the fd is read-only).
    Only the first is the cold tier's: warm says EIO for it; a fast tier
    that fails is ENOSPC ("full or failing"), as a full one is."""
    import aattsfs.store as store_mod
    cold_files(tmp_path, a=CHUNK)
    store = make_store(tmp_path, 4 * CHUNK)
    real = store_mod._copy_range

    def copy_range(src, dst, off, length):
        bad = os.open(tmp_path / "cold" if side == "cold" else os.devnull, os.O_RDONLY)
        try:
            return real(bad, dst, off, length) if side == "cold" else \
                real(src, bad, off, length)
        finally:
            os.close(bad)

    monkeypatch.setattr(store_mod, "_copy_range", copy_range)

    async def body():
        with pytest.raises(OSError) as exc:
            await store.warm("a")
        assert exc.value.errno == (errno.EIO if side == "cold" else errno.ENOSPC)

    running(store, body)
    assert store.stats.promotions_failed == 1 and store.stats.promotions_nospace == 0
    assert store.tier("a") == "cold" and store.core.used == 0
    close_store(store)
