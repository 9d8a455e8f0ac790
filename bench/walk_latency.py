"""Fast-tier read latency while another process walks a slow cold tree
(issue 12): the cold tier is the throttled loop device at a few MB/s with
its inodes dropped from memory, so every lookup and stat of the walk waits
on it. A probe in this process reads 4 KiB blocks of a promoted file at
random offsets (O_DIRECT: each read reaches the FUSE daemon or, with
passthrough, the kernel's backing file), once alone and once while
`ls -lR` walks a part of the cold tree no one has looked at yet; the p99
of the two is compared, run by run (the order alternates).

Mounts: the default (passthrough where the kernel allows it, so its reads
never reach the daemon) and `--passthrough off` (every read is served by
the daemon's trio thread, the path a stall would hit).

    .venv/bin/python bench/walk_latency.py [--reps 3] [--throttle 2]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from benchenv import WORK

import harness
import peers
from slowcold import SlowCold

BLOCK = 4096
HOT = 16 << 20  # the promoted file
DIRS, FILES = 100, 100  # one walk: DIRS directories of FILES small files each
PROBE_READS = 4000  # reads of the probe alone; with the walk, as many as it lasts
MODES = {"default": [], "passthrough off": ["--passthrough", "off"]}


def build_tree(root: Path, walks: int) -> None:
    """The hot file and one untouched subtree per walk (made once, kept)."""
    marker = root / f".made-{walks}-{DIRS}-{FILES}"
    if marker.exists():
        return
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    (root / "hot.bin").write_bytes(random.Random(0).randbytes(HOT))
    for w in range(walks):
        for d in range(DIRS):
            sub = root / f"walk{w}" / f"d{d:03}"
            sub.mkdir(parents=True)
            for f in range(FILES):
                (sub / f"f{f:03}.json").write_text(f'{{"w": {w}, "d": {d}, "f": {f}}}\n')
    os.sync()
    marker.touch()


def probe(path: Path, want: bytes, rng: random.Random, until=None) -> list[float]:
    """Latencies (s) of 4 KiB O_DIRECT reads at random offsets: PROBE_READS
    of them, or as many as `until()` stays true. Every block is checked."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    out: list[float] = []
    try:
        blocks = HOT // BLOCK
        while (until() if until else len(out) < PROBE_READS):
            off = rng.randrange(blocks) * BLOCK
            t0 = time.perf_counter()
            got = os.pread(fd, BLOCK, off)
            out.append(time.perf_counter() - t0)
            if got != want[off:off + BLOCK]:
                raise SystemExit(f"bench: wrong bytes at {off} of {path}")
    finally:
        os.close(fd)
    return out


def p99(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=100)[98]


def measure(mnt: Path, walk: int, want: bytes, rep: int) -> dict:
    """One run: the probe alone and during a walk of subtree `walk`, in an
    order that alternates with `rep`; the page cache (and the cold tier's
    inodes) dropped before each."""
    rng = random.Random(rep)
    result: dict = {}
    for phase in (("alone", "walk") if rep % 2 == 0 else ("walk", "alone")):
        harness.drop_caches()
        if phase == "alone":
            result["alone"] = probe(mnt / "hot.bin", want, rng)
            continue
        t0 = time.monotonic()
        walker = subprocess.Popen(["ls", "-lR", str(mnt / f"walk{walk}")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        result["walk"] = probe(mnt / "hot.bin", want, rng,
                               until=lambda: walker.poll() is None)
        walker.wait()
        result["walk_seconds"] = time.monotonic() - t0
        if walker.returncode:
            raise SystemExit(f"bench: ls -lR failed ({walker.returncode})")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--throttle", type=float, default=2, metavar="MBPS")
    args = harness.parse_bench_args(ap)
    work = WORK / "walk"
    rows = []
    with SlowCold(work, size_mb=3072, read_mbps=args.throttle) as slow:  # inodes for 6 walks
        build_tree(slow.mnt / "tree", len(MODES) * args.reps)
        want = (slow.mnt / "tree" / "hot.bin").read_bytes()
        walk = 0
        for name, options in MODES.items():
            target = peers.Aattsfs(slow.mnt / "tree", slow.wrap, "walk-" + name.replace(" ", "-"),
                                   ["--no-prefetch", *options])
            try:
                mnt = target.start(256 << 20)
                harness.cli("warm", str(mnt / "hot.bin"))
                pt = harness.stats(mnt)["passthrough"]["active"]
                for rep in range(args.reps):
                    r = measure(mnt, walk, want, rep)
                    walk += 1
                    rows.append({"mount": name, "passthrough": pt, "rep": rep,
                                 "p99_alone": p99(r["alone"]), "p99_walk": p99(r["walk"]),
                                 "reads_walk": len(r["walk"]),
                                 "walk_seconds": r["walk_seconds"]})
                    print(f"{name} run {rep}: p99 {rows[-1]['p99_alone'] * 1e6:.0f} us alone, "
                          f"{rows[-1]['p99_walk'] * 1e6:.0f} us during a "
                          f"{r['walk_seconds']:.1f} s walk ({len(r['walk'])} reads)",
                          flush=True)
            finally:
                target.finish()
    out = ["| mount | p99 alone (µs) | p99 during the walk (µs) | ratio (median, min–max) "
           "| reads during the walk | walk (s) |", "|---|---:|---:|---:|---:|---:|"]
    for name in MODES:
        rs = [r for r in rows if r["mount"] == name]
        ratios = [r["p99_walk"] / r["p99_alone"] for r in rs]
        label = name + (" (passthrough active)" if rs[0]["passthrough"] else "")
        out.append(f"| {label} | {statistics.median(r['p99_alone'] for r in rs) * 1e6:.0f} | "
                   f"{statistics.median(r['p99_walk'] for r in rs) * 1e6:.0f} | "
                   f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}–{max(ratios):.2f}) | "
                   f"{statistics.median(r['reads_walk'] for r in rs):.0f} | "
                   f"{statistics.median(r['walk_seconds'] for r in rs):.1f} |")
    section = (f"Cold tier throttled to {args.throttle:g} MB/s, its inodes dropped before "
               f"each run; the walk is `ls -lR` of {DIRS} directories of {FILES} files no "
               f"one has looked at; the probe reads 4 KiB blocks of a promoted "
               f"{HOT >> 20} MiB file with O_DIRECT. Medians of {args.reps} runs, alone and "
               "during the walk alternating first.\n\nReproduce: `.venv/bin/python "
               "bench/walk_latency.py` (as root; `make bench` runs it).\n\n"
               + "\n".join(out) + "\n")
    harness.publish("walk_latency", {"throttle_mbps": args.throttle, "rows": rows}, section)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
