"""The store in-process, over real directories and real LMDB, without a
mount: what depends on the order of events is driven step by step here
instead of by timing."""

import os

import trio

from aattsfs.metadata import MetaStore
from aattsfs.policy import AdmitAll, LRUPolicy
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


def make_store(tmp_path, budget: int) -> Store:
    cold = ColdTier(str(tmp_path / "cold"))
    fast = FastTier(str(tmp_path / "fast"), {"cold": str(tmp_path / "cold")})
    meta = MetaStore(str(tmp_path / "lmdb"))
    return Store(cold, fast, meta, Residency(budget, LRUPolicy(), AdmitAll()))


def test_staged_files_arrive_in_the_order_they_are_needed(tmp_path, monkeypatch):
    (tmp_path / "cold").mkdir()
    for name in "ab":
        (tmp_path / "cold" / name).write_bytes(os.urandom(3 * CHUNK))
    store = make_store(tmp_path, 64 * CHUNK)
    fetched = []
    real_fetch = Promotion._fetch

    async def fetch(self, idx):
        fetched.append((self.rel, idx))
        await real_fetch(self, idx)

    monkeypatch.setattr(Promotion, "_fetch", fetch)

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
