"""Admission on real mounts: files that would be evicted before their next
open are read from the cold tier without a copy, and the simulator, which
drives the same residency core, predicts what the mount does."""

import json
import os
import random
import re

import pytest
from conftest import MiB, drop_pages, run_cli, wait_for, write_random


def read_through(m, rel: str) -> None:
    """Read rel through the mount and check every byte against the cold
    file; then drop its pages, and the cold file's, so that the next open
    reads through the daemon again (not the kernel from the page cache),
    and wait for its promotion (if any) to land and for the
    kernel's release of the open, which it sends after close() returns (a
    copy a passthrough open still holds cannot be evicted)."""
    with open(m.path(rel), "rb") as f:
        data = f.read()
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    assert data == (m.cold / rel).read_bytes(), f"wrong bytes from {rel}"
    drop_pages(m.cold / rel)
    # (the stats file itself is open while it is read: 1)
    wait_for(lambda: (s := m.stats())["promotions_in_flight"] == 0 and s["open_files"] <= 1,
             what="promotions to land and the open to be released")


@pytest.mark.parametrize("admission", ["reuse", "all"])
def test_a_loop_longer_than_the_budget(tmp_path, mounter, admission):
    cold = tmp_path / "cold"
    names = [f"f{i}" for i in range(8)]
    for i, name in enumerate(names):
        write_random(cold / name, 4 * MiB, i)
    m = mounter(cold, fast_size="16M", admission=admission, extra=["--no-prefetch"])
    for _ in range(3):
        for name in names:
            read_through(m, name)
    s = m.stats()
    if admission == "all":  # LRU copies every file and evicts it before its next open
        # (now and then the kernel still holds a file's pages, dropped or not,
        # and the pass reads nothing through the daemon: one promotion fewer)
        assert s["opens"]["fast"] == 0 and s["bypasses"] == 0 and s["promotions"] >= 20
        assert s["evictions"] == s["promotions"] - 4
        assert s["cold_bytes_read"] == s["promotions"] * 4 * MiB
    else:  # the first four stay and hit on every later pass; the rest are read from cold
        assert s["promotions"] == 4 and s["evictions"] == 0
        assert s["opens"]["fast"] == 8 and s["bypasses"] == 12
        assert s["bypassed_bytes"] == 12 * 4 * MiB
        assert s["cold_bytes_read"] == 16 * 4 * MiB
        assert [m.tier(n) for n in names] == ["fast"] * 4 + ["cold"] * 4
        status = run_cli("status", m.path()).stdout
        assert re.search(r"^bypassed +12 opens \(48\.0 MiB\)", status, re.M), status
    assert s["fast_tier"]["admission"] == admission


def rotation_workload(cold, loads=30, seed=3) -> list[str]:
    """Six small models in a rotation whose successor holds 3 times in 4:
    the relative paths opened, in order."""
    rng = random.Random(seed)
    models = []
    for k in range(6):
        files = [f"model{k}/config.json"] + \
            [f"model{k}/model-{s}.safetensors" for s in range(2)]
        write_random(cold / files[0], 1024 + k, 100 + k)
        for s, rel in enumerate(files[1:]):
            write_random(cold / rel, MiB + (k * 2 + s) * 64 * 1024, 10 * k + s)
        models.append(files)
    order, current = [], 0
    for _ in range(loads):
        order += models[current] + models[current][:1]  # the config again, after the shards
        current = (current + 1) % 6 if rng.random() < 0.75 else rng.randrange(6)
    return order


@pytest.mark.parametrize("policy", ["lru", "predictive"])
def test_the_simulator_predicts_the_mount(tmp_path, mounter, policy):
    cold = tmp_path / "cold"
    order = rotation_workload(cold)
    working_set = sum(os.path.getsize(cold / rel) for rel in set(order))
    budget = working_set // 2
    m = mounter(cold, fast_size=str(budget), policy=policy, extra=["--no-prefetch"])
    for rel in order:
        read_through(m, rel)
    s = m.stats()
    mount_hits = s["opens"]["fast"] / (s["opens"]["fast"] + s["opens"]["cold"])
    assert s["bypasses"] > 0 and s["opens"]["fast"] > 0  # both paths were taken
    trace = tmp_path / "trace.jsonl"
    trace.write_text(run_cli("trace", "export", m.path()).stdout)
    sim = json.loads(run_cli("sim", trace, "--budget", str(budget), "--policy", policy,
                             "--json").stdout)
    (row,) = [r for name, r in sim.items() if name.startswith(policy)]
    assert abs(row["hit_ratio"] - mount_hits) <= 0.05, (row, s)
    assert abs(row["cold_bytes"] - s["cold_bytes_read"]) <= 0.10 * s["cold_bytes_read"], \
        (row, s)
