"""Model rotation under a RAM budget: LRU only against learned prefetch, side
by side in one run, on a throttled cold tier.

Several generated models (GPT-2 configs, random weights, sharded) are
requested by a pipeline: each model has a fixed successor, taken with
probability --follow, another model otherwise (a fixed seed, so every target
sees the same sequence). Each request is a fresh process running
`from_pretrained` and touching every weight, after the page cache was
dropped and a short think time. The fast tier holds about half the models,
so LRU on such a cycle finds nothing; a prefetcher that learned the cycle
stages the next model while the current one runs.

Targets, each starting empty (nothing learned, fast tier empty):

  direct                       the cold directory itself (the baseline)
  tmpfs copy                   the models already in RAM: what no cache can beat
  aattsfs, LRU only            --no-prefetch
  aattsfs, prefetch            the default: learned order + format hints, LRU
  aattsfs, prefetch+predictive  --policy predictive

A warm-up pass (one cycle of the pipeline) lets aattsfs learn, then the
measured requests run. Reported per target: p50, p90 and max load time, the
median as a ratio to direct, and the share of opens served by the fast tier.

    .venv/bin/python bench/rotation.py [--models 6 --measured 12 --throttle 200]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import random
import shutil
import statistics
import time
from pathlib import Path

from benchenv import FAST, WORK

import harness
from aattsfs.mount import is_mounted
from harness import drop_caches, publish

TMPFS_COPY = Path("/dev/shm/aattsfs-bench-rotation")
TARGETS = {  # name -> aattsfs mount options, or the directory loaded from directly
    "direct": "cold",
    "tmpfs copy (the floor)": TMPFS_COPY,
    "aattsfs, LRU only": ["--no-prefetch"],
    "aattsfs, prefetch": [],
    "aattsfs, prefetch+predictive": ["--policy", "predictive"],
}


def pipeline(n: int, length: int, follow: float, seed: int = 1) -> list[int]:
    """Model indices: i is followed by i+1 (mod n) with probability `follow`."""
    rng = random.Random(seed)
    seq = [0]
    while len(seq) < length:
        nxt = (seq[-1] + 1) % n
        if rng.random() >= follow:
            nxt = rng.choice([i for i in range(n) if i != nxt])
        seq.append(nxt)
    return seq


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def run_target(name: str, opts, models: list[Path], warmup: list[int], measured: list[int],
               budget: int, think: float, wrap) -> dict:
    cold = models[0].parent
    mnt, state = WORK / "rot-mnt", WORK / "rot-state"
    mounted = isinstance(opts, list)
    root = cold if opts == "cold" else opts
    if mounted:
        shutil.rmtree(FAST, ignore_errors=True)
        shutil.rmtree(state, ignore_errors=True)
        harness.cli("mount", cold, mnt, "--fast-dir", FAST, "--fast-size", str(budget),
                    "--state-dir", state, *opts, wrap=wrap)
        root = mnt
    try:
        def request(i: int) -> float:
            time.sleep(think)
            drop_caches()
            return harness.load("hf", root / models[i].name, wrap)["seconds"]

        for i in warmup:
            request(i)
        before = harness.stats(mnt) if mounted else None
        times = [request(i) for i in measured]
        out = {"times": times, "p50": statistics.median(times),
               "p90": percentile(times, 0.9), "max": max(times)}
        if before is not None:
            after = harness.stats(mnt)
            fast = after["opens"]["fast"] - before["opens"]["fast"]
            total = fast + after["opens"]["cold"] - before["opens"]["cold"]
            out["fast_open_ratio"] = fast / total if total else 0.0
            out["prefetch"] = {k: after["prefetch"][k] - before["prefetch"][k]
                               for k in ("prefetched_bytes", "used_bytes", "wasted_bytes",
                                         "demand_miss_bytes")}
        print(f"{name}: p50 {out['p50']:.2f}s p90 {out['p90']:.2f}s max {out['max']:.2f}s",
              flush=True)
        return out
    finally:
        if mounted:
            harness.cli("umount", mnt)
            shutil.rmtree(FAST, ignore_errors=True)


def render(summary: dict, command: str) -> str:
    a = summary["args"]
    lines = [
        f"{a['models']} models (GPT-2 config, {a['layers']} layers x {a['width']}, random "
        f"weights, {summary['shards']} shards each, {summary['model_mib']:.0f} MiB each); fast "
        f"tier {summary['budget_mib']:.0f} MiB (about half); cold directory {summary['cold']}. "
        f"Pipeline: each model's successor follows with probability {a['follow']}; "
        f"{len(summary['warmup'])} warm-up requests (one cycle), then "
        f"{len(summary['measured'])} measured ({' '.join(map(str, summary['measured']))}), "
        f"each a fresh process after dropping the page cache and {a['think']} s think time; "
        f"{summary['when']} on {summary['host']}.",
        "",
        f"Reproduce: `{command}`",
        "",
        "| target | p50 s | p90 s | max s | p50 / direct p50 | opens from the fast tier |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    base = summary["targets"]["direct"]["p50"]
    for name, t in summary["targets"].items():
        ratio = "" if "fast_open_ratio" not in t else f"{t['fast_open_ratio']:.2f}"
        lines.append(f"| {name} | {t['p50']:.2f} | {t['p90']:.2f} | {t['max']:.2f} | "
                     f"{t['p50'] / base:.2f}x | {ratio} |")
    pf = summary["targets"]["aattsfs, prefetch"]["prefetch"]
    if pf["prefetched_bytes"]:
        lines += ["", f"Prefetch accuracy (default target, measured requests): "
                  f"{pf['used_bytes'] / pf['prefetched_bytes']:.2f} of the prefetched bytes "
                  f"were used, {pf['wasted_bytes'] / 2**20:.0f} MiB evicted unused, "
                  f"{pf['demand_miss_bytes'] / 2**20:.0f} MiB opened with no copy on its way."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=int, default=6)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--shard", default="100MB")
    ap.add_argument("--measured", type=int, default=12)
    ap.add_argument("--follow", type=float, default=0.9)
    ap.add_argument("--think", type=float, default=1.0)
    ap.add_argument("--throttle", type=int, default=200, metavar="MBPS")
    args = ap.parse_args()
    if args.models < 5 or args.measured < 3:
        raise SystemExit("bench: use at least 5 models and 3 measured requests")
    if os.geteuid() != 0:
        raise SystemExit("bench: run as root (it drops the page cache and mounts)")
    import modelgen
    from slowcold import SlowCold

    src = WORK / f"rotation-{args.layers}x{args.width}"
    models = []
    for i in range(args.models):
        m = src / f"model-{i}"
        if not (m / "config.json").exists():
            print(f"generating {m.name} ...", flush=True)
            shutil.rmtree(m, ignore_errors=True)
            modelgen.gpt2(m, args.layers, args.width, vocab=50257, shard=args.shard, seed=i)
        models.append(m)
    model_bytes = sum(p.stat().st_size for p in models[0].iterdir())
    total = sum(p.stat().st_size for m in models for p in m.iterdir())
    budget = total // 2
    warmup = pipeline(args.models, args.models, 1.0)
    measured = pipeline(args.models, args.measured + 1, args.follow, seed=14)[1:]
    mnt = WORK / "rot-mnt"
    if is_mounted(mnt):
        harness.cli("umount", "--lazy", mnt)
    mnt.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(TMPFS_COPY, ignore_errors=True)
    for m in models:
        shutil.copytree(m, TMPFS_COPY / m.name)
    try:
        with SlowCold(WORK, size_mb=total // 2**20 * 2 + 256, read_mbps=args.throttle) as slow:
            cold = [slow.fill(m, f"rotation/{m.name}") for m in models]
            targets = {name: run_target(name, opts, cold, warmup, measured, budget,
                                        args.think, slow.wrap)
                       for name, opts in TARGETS.items()}
    finally:
        shutil.rmtree(TMPFS_COPY, ignore_errors=True)
    summary = {
        "when": time.strftime("%Y-%m-%d"),
        "host": f"{os.cpu_count()} cores, {platform.release()}",
        "cold": f"on an ext4 loop device throttled to {args.throttle} MB/s (cgroup-v1 blkio)",
        "args": vars(args),
        "shards": len(list(models[0].glob("*.safetensors"))),
        "model_mib": model_bytes / 2**20,
        "budget_mib": budget / 2**20,
        "warmup": warmup,
        "measured": measured,
        "targets": targets,
    }
    command = f"make bench  # or: .venv/bin/python bench/rotation.py --throttle {args.throttle}"
    section = render(summary, command)
    publish("rotation", summary, section)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
