"""What a warm load costs in the memory aattsfs serves from (docs/benchmarks.md,
"Never slower"): one shard of workload 1's model, already in memory, mapped
and every byte summed (as a loader touching its weights), from ext4's page
cache (the cold directory read directly), from tmpfs (the fast tier, read by
passthrough), from tmpfs mounted with huge=within_size, and from the FUSE
page cache of an aattsfs open served by the daemon. Median of --reps
touches each, as a ratio to ext4 measured side by side.

    .venv/bin/python bench/mmap_touch.py [--reps 5]
"""

from __future__ import annotations

import argparse
import contextlib
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchenv import WORK

import datasets
import harness
import suite

import numpy as np


def touch(path: Path) -> float:
    """Seconds to map path and sum every float in it."""
    with open(path, "rb") as f:
        while f.read(1 << 24):  # in memory first: a warm load
            pass
        t0 = time.perf_counter()
        with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
            float(np.frombuffer(m, dtype=np.float32, count=len(m) // 4).sum())
        return time.perf_counter() - t0


@contextlib.contextmanager
def places(shard: Path):
    """Where the same bytes are read from: name -> path."""
    tmp = WORK / "mmap-touch"
    shutil.rmtree(tmp, ignore_errors=True)
    shm, huge, mnt, state = (Path("/dev/shm/aattsfs-bench-touch"), tmp / "huge",
                             tmp / "mnt", tmp / "state")
    for d in (shm, huge, mnt):
        d.mkdir(parents=True)
    mounted: list[Path] = []
    try:
        shutil.copy(shard, shm / shard.name)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1g,huge=within_size", "none",
                        str(huge)], check=True)
        mounted.append(huge)
        shutil.copy(shard, huge / shard.name)
        # a budget smaller than the shard: served by the daemon, from cold
        subprocess.run([sys.executable, "-m", "aattsfs", "mount", str(shard.parent), str(mnt),
                        "--fast-dir", str(tmp / "fast"), "--state-dir", str(state),
                        "--fast-size", "1M", "--no-prefetch"], check=True)
        mounted.append(mnt)
        yield {"ext4 page cache (direct)": shard,
               "tmpfs (fast tier, passthrough)": shm / shard.name,
               "tmpfs, huge=within_size": huge / shard.name,
               "FUSE page cache (daemon-served open)": mnt / shard.name}
    finally:
        for d in reversed(mounted):
            cmd = ["fusermount3", "-u", "-z"] if d == mnt else ["umount", "-l"]
            subprocess.run([*cmd, str(d)], capture_output=True)
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    args = harness.parse_bench_args(ap)
    model = datasets.sharded_model(WORK / "src" / "full" / "w1-model", *suite.SCALES["full"]["w1"])
    shard = sorted(model.glob("*.safetensors"))[1]
    times: dict[str, list[float]] = {}
    with places(shard) as where:
        for _ in range(args.reps):  # interleaved, so that noise falls on all alike
            for name, path in where.items():
                times.setdefault(name, []).append(touch(path))
    base = statistics.median(times["ext4 page cache (direct)"])
    rows = ["| memory | ratio to ext4 (median, min–max) |", "|---|---:|"]
    for name, ts in times.items():
        rows.append(f"| {name} | {statistics.median(ts) / base:.2f}x "
                    f"({min(ts) / base:.2f}–{max(ts) / base:.2f}) |")
    section = (f"One {shard.stat().st_size >> 20} MiB shard of workload 1, in memory, mapped and "
               f"every float summed; medians of {args.reps} touches, interleaved, as ratios to "
               "ext4's page cache in the same run.\n\nReproduce: `.venv/bin/python "
               "bench/mmap_touch.py` (as root; `make bench` runs it).\n\n" + "\n".join(rows) + "\n")
    harness.publish("mmap_touch", {"shard_bytes": shard.stat().st_size, "seconds": times},
                    section)


if __name__ == "__main__":
    main()
