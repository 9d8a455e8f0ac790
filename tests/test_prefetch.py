"""The daemon's prefetcher on real mounts: what separate processes open is
learned (within each and across them), staged ahead, cancelled when the
sequence goes elsewhere, counted, and kept inside the budget and away from
pinned files."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import sys
from pathlib import Path

from conftest import PAGE_SLACK, BudgetWatch, MiB, drop_pages, run_cli, wait_for, write_random

MODELS = "ABCD"
FILES = ("head", "w1", "w2")  # opened in this order by each "loader"


def pipeline_tree(cold: Path) -> Path:
    for i, model in enumerate(MODELS):
        for j, name in enumerate(FILES):
            write_random(cold / model / name, MiB + 4096 * j, 10 * i + j)
    return cold


def load(m, model: str) -> None:
    """One fresh process reading a model's files in order, as a loader does."""
    subprocess.run(["cat", *(m.path(f"{model}/{f}") for f in FILES)], check=True,
                   stdout=subprocess.DEVNULL)


@contextlib.contextmanager
def holding(path: Path):
    """A fresh process that opens `path` and keeps it open until the block ends."""
    proc = subprocess.Popen([sys.executable, "-c", "import sys; f = open(sys.argv[1], 'rb'); "
                             "print(flush=True); sys.stdin.read()", str(path)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        proc.stdout.readline()  # the file is open
        yield
    finally:
        proc.stdin.close()
        proc.wait()


def evict_all(m) -> None:
    """Every file out of the fast tier, and out of memory: a cold file all
    in the page cache is promoted at its open, read or not
    (docs/passthrough.md), and these tests count what opens alone do."""
    for model in MODELS:
        run_cli("evict", *(m.path(f"{model}/{f}") for f in FILES))
    drop_pages(m.cold)


def tiers(m, model: str) -> list[str]:
    return [m.tier(f"{model}/{f}") for f in FILES]


def test_the_next_process_is_staged_and_learning_survives_a_restart(tmp_path, mounter):
    m = mounter(pipeline_tree(tmp_path / "cold"), fast_size="8M")
    for _ in range(2):
        for model in MODELS:
            load(m, model)
    # a fresh process loads A: A's rest and the next process's model (B) are staged
    evict_all(m)
    before = m.stats()["prefetch"]
    with holding(m.path("A/head")):
        wait_for(lambda: tiers(m, "B") == ["fast"] * 3 and tiers(m, "A")[1:] == ["fast"] * 2,
                 what="A's rest and model B to be staged")
    load(m, "A")
    load(m, "B")
    after = m.stats()["prefetch"]
    staged_b = sum(os.path.getsize(m.path(f"B/{f}")) for f in FILES)
    assert after["used_bytes"] - before["used_bytes"] >= staged_b
    # A/head, opened by two processes before any read: every other open was predicted
    assert after["demand_misses"] == before["demand_misses"] + 2
    assert after["events_dropped"] == 0

    # the trace carries the stream of every event and the ranges each open read
    trace = [json.loads(ln) for ln in (m.path(".aatts/trace")).read_text().splitlines()]
    opens = [e for e in trace if e["op"] == "open"]
    reads = [e for e in trace if e["op"] == "read"]
    assert all(e["pid"] > 0 and e["start"] > 0 for e in opens)
    assert {(e["path"], tuple(map(tuple, e["ranges"]))) for e in reads} >= \
        {("B/w2", ((0, os.path.getsize(m.path("B/w2"))),))}

    # learned from the trace again after a restart
    m.stop()
    m.start()
    evict_all(m)
    with holding(m.path("C/head")):
        wait_for(lambda: tiers(m, "D") == ["fast"] * 3, what="model D to be staged")


def test_a_stale_prefetch_is_cancelled(cold_tree, mounter):
    # slow prefetch (1 MiB/s) keeps big.bin (3 chunks) in flight for seconds;
    # the budget holds a file and the next two expected, not three
    m = mounter(cold_tree, fast_size="14M", extra=["--prefetch-bandwidth", "1M"])
    a, big, mid, other = "models/a/weights.bin", "big.bin", "mid.bin", "models/c/weights.bin"
    for _ in range(2):  # processes "a then big", and "mid" after each
        subprocess.run(["cat", m.path(a), m.path(big)], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["cat", m.path(mid)], check=True, stdout=subprocess.DEVNULL)

    def evicted():
        # staging set off by the last opens may still bring one back: again
        # until both stay out (no open comes meanwhile to stage anything)
        run_cli("evict", m.path(big), m.path(mid))
        time.sleep(0.3)
        return m.stats()["promotions_in_flight"] == 0 and m.tier(big) == m.tier(mid) == "cold"
    wait_for(evicted, what="big.bin and mid.bin to stay evicted")
    # this process opens a (so big, then a process opening mid, are expected),
    # then goes elsewhere: big is no longer expected within the budget
    with open(m.path(a), "rb"):
        wait_for(lambda: m.tier(big) == "promoting", what="big.bin to be prefetched")
        with open(m.path(other), "rb"):
            wait_for(lambda: m.stats()["prefetch"]["cancelled"] >= 1,
                     what="the stale prefetch to be cancelled")
    wait_for(lambda: m.tier(big) == "cold", what="big.bin back to cold")
    assert m.stats()["prefetch"]["wasted_bytes"] >= os.path.getsize(m.path(big))


def test_prefetch_keeps_the_budget_and_spares_pinned_files(tmp_path, mounter, fast_tmpfs):
    cold = pipeline_tree(tmp_path / "cold")
    write_random(cold / "pinned.bin", 2 * MiB, 99)
    budget = 6 * MiB
    m = mounter(cold, fast_size=str(budget), policy="predictive", fast=fast_tmpfs(budget + MiB))
    run_cli("pin", m.path("pinned.bin"))
    run_cli("warm", m.path("pinned.bin"))
    with BudgetWatch(m) as watch:
        for _ in range(2):  # the order of models and of their files is learned
            for model in MODELS:
                load(m, model)
                assert m.tier("pinned.bin") == "fast"
        for model in MODELS:
            # a process that has opened a model's first file: the rest is
            # staged, in place of files of models whose process is gone
            with holding(m.path(f"{model}/head")):
                for f in FILES[1:]:
                    m.wait_tier(f"{model}/{f}")
            load(m, model)
            assert m.tier("pinned.bin") == "fast"
    assert 0 < watch.peak_dir <= budget + PAGE_SLACK and watch.peak_stats <= budget
    assert m.stats()["prefetch"]["prefetches"] > 0
    assert m.stats()["fast_tier"]["policy"] == "predictive"
