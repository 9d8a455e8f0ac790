"""The daemon's prefetcher on real mounts: what separate processes open is
learned (within each and across them), staged ahead, cancelled when the
sequence goes elsewhere, counted, and kept inside the budget and away from
pinned files."""

from __future__ import annotations

import contextlib
import json
import os
import random
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


def model_dir(d: Path, shards: int, seed: int) -> dict[str, bytes]:
    """A sharded model directory as the format hints read it: config.json, an
    index naming the shards, and each shard a whole safetensors file."""
    files = {"config.json": json.dumps({"model_type": "gpt2", "seed": seed}).encode()}
    names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    for i, name in enumerate(names):
        data = random.Random(seed * 100 + i).randbytes(MiB)
        header = json.dumps({f"t{i}": {"dtype": "U8", "shape": [MiB],
                                       "data_offsets": [0, MiB]}}).encode()
        files[name] = len(header).to_bytes(8, "little") + header + data
    files["model.safetensors.index.json"] = json.dumps(
        {"weight_map": {f"t{i}": n for i, n in enumerate(names)}}).encode()
    for name, data in files.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(data)
    return files


def test_hints_follow_links_to_the_files_a_loader_opens(tmp_path, mounter):
    """Opening config.json through a link stages the files the loader will
    open next: through a `latest -> v2` directory link, and through a hub
    snapshot's file links (the blobs, known by their snapshot names)."""
    cold = tmp_path / "cold"
    files = model_dir(cold / "v2", 2, seed=1)
    (cold / "latest").symlink_to("v2")
    hub = tmp_path / "src"
    model_dir(hub, 2, seed=2)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import modelgen
    snapshot = modelgen.hub_cache(cold, hub, "org/tiny", "c" * 40).relative_to(cold)
    m = mounter(cold, fast_size="16M")

    shards = [n for n in files if n.endswith(".safetensors")]
    with holding(m.path("latest/config.json")):
        wait_for(lambda: all(m.tier(f"v2/{n}") == "fast" for n in shards),
                 what="the shards of v2 to be staged")
    blobs = {n: os.path.relpath(os.path.realpath(cold / snapshot / n), cold) for n in files}
    with holding(m.path(f"{snapshot}/config.json")):
        wait_for(lambda: all(m.tier(blobs[n]) == "fast" for n in shards),
                 what="the blobs of the snapshot's shards to be staged")
    s = m.stats()["prefetch"]
    # each model's index and shards, before any open; the two config.json opens missed
    assert s["prefetches"] == 2 * (len(shards) + 1) and s["demand_misses"] == 2
    rows = [ln.split("\t") for ln in m.path(".aatts/tiers").read_text().splitlines()[1:]]
    assert {r[5]: r[6] for r in rows}[blobs["config.json"]] == f"{snapshot}/config.json"
    for n in shards:  # what the staged copies serve is the cold file's bytes
        assert m.path(f"{snapshot}/{n}").read_bytes() == (cold / blobs[n]).read_bytes()
        assert m.path(f"latest/{n}").read_bytes() == files[n]
