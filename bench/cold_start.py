"""Cold start of one sharded model: aattsfs against direct loads, side by side.

Every load is `from_pretrained` plus touching every weight in a fresh process
(scripts/loadmodel.py). Each repetition measures, in this order:

  cold dir, page cache dropped   the baseline: what the model code does today
  tmpfs copy                     the physical limit: the model already in RAM
  cold dir, page cache warm      the kernel page cache of the cold dir
  aattsfs 1st load, --no-prefetch  fresh mount, empty fast tier, page cache dropped,
                                 files promoted only as they are read
  aattsfs 1st load               the same with model-format staging (the default)
  aattsfs promoted               fast tier filled, page cache dropped
  aattsfs all warm               fast tier filled, page cache kept

Figures are medians over the repetitions (min and max beside them); ratios
are taken between medians measured in the same run. Results go to
bench/results/cold_start.{json,md} and into docs/benchmarks.md.

    .venv/bin/python bench/cold_start.py [--reps 5] [--throttle MBPS]
        [--layers 8 --width 768 --shard 100MB]

With --throttle, the cold directory lives on an emulated slow disk (an ext4
image on a loop device read through a cgroup-v1 blkio limit, bench/slowcold.py)
and every load and the daemon run inside that cgroup.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

from benchenv import FAST, WORK

import harness
from aattsfs.mount import is_mounted
from harness import Wrap, drop_caches, publish, wait_promotions

TMPFS_COPY = Path("/dev/shm/aattsfs-bench-copy")


WRAP: Wrap = list  # how to run what touches the cold tier (its cgroup when throttled)


def load(path: Path) -> float:
    return harness.load("hf", path, WRAP)["seconds"]


def aattsfs(*args) -> None:
    harness.cli(*args, wrap=WRAP)


def one_rep(model: Path, mnt: Path, state: Path) -> dict[str, float]:
    t = {}
    drop_caches()
    t["cold dir, page cache dropped"] = load(model)
    t["tmpfs copy"] = load(TMPFS_COPY / model.name)
    load(model)
    t["cold dir, page cache warm"] = load(model)
    def fresh_mount(*extra):
        shutil.rmtree(FAST, ignore_errors=True)
        shutil.rmtree(state, ignore_errors=True)
        aattsfs("mount", model.parent, mnt, "--fast-dir", FAST, "--fast-size", "2G",
                "--state-dir", state, *extra)

    fresh_mount("--no-prefetch")
    try:
        drop_caches()
        t["aattsfs 1st load, --no-prefetch"] = load(mnt / model.name)
    finally:
        aattsfs("umount", mnt)
    fresh_mount()
    try:
        drop_caches()
        t["aattsfs 1st load"] = load(mnt / model.name)
        wait_promotions(mnt)
        drop_caches()
        t["aattsfs promoted"] = load(mnt / model.name)
        t["aattsfs all warm"] = load(mnt / model.name)
    finally:
        aattsfs("umount", mnt)
    return t


RATIOS = [  # (phase, baseline)
    ("aattsfs 1st load, --no-prefetch", "cold dir, page cache dropped"),
    ("aattsfs 1st load", "cold dir, page cache dropped"),
    ("aattsfs promoted", "cold dir, page cache dropped"),
    ("aattsfs promoted", "tmpfs copy"),
    ("aattsfs all warm", "cold dir, page cache warm"),
    ("aattsfs all warm", "tmpfs copy"),
]


def render(summary: dict, args, size: int, command: str) -> str:
    lines = [
        f"Model: GPT-2 config, {args.layers} layers x {args.width}, random weights, "
        f"{summary['shards']} safetensors shards, {size / 2**20:.0f} MiB; cold directory "
        f"{summary['cold']}; {args.reps} repetitions, phases interleaved; "
        f"{summary['when']} on {summary['host']}.",
        "",
        f"Reproduce: `{command}`",
        "",
        "| load (fresh process, every weight touched) | median s | min | max |",
        "|---|---:|---:|---:|",
    ]
    for phase, s in summary["phases"].items():
        lines.append(f"| {phase} | {s['median']:.2f} | {s['min']:.2f} | {s['max']:.2f} |")
    lines += ["", "| ratio of medians | value |", "|---|---:|"]
    for r in summary["ratios"]:
        lines.append(f"| {r['phase']} / {r['baseline']} | {r['ratio']:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--shard", default="100MB")
    ap.add_argument("--throttle", type=int, default=0, metavar="MBPS",
                    help="put the cold directory on a disk throttled to MBPS MB/s")
    args = ap.parse_args()
    if args.reps < 3:
        raise SystemExit("bench: use at least 3 repetitions (medians of fewer mean little)")
    if os.geteuid() != 0:
        raise SystemExit("bench: run as root (it drops the page cache and mounts)")
    import modelgen

    model = WORK / f"cold-{args.layers}x{args.width}" / "gpt2"
    if not (model / "config.json").exists():
        print("generating the model ...", flush=True)
        shutil.rmtree(model, ignore_errors=True)
        modelgen.gpt2(model, args.layers, args.width, vocab=50257, shard=args.shard)
    size = sum(p.stat().st_size for p in model.iterdir())
    with contextlib.ExitStack() as stack:
        if args.throttle:
            from slowcold import SlowCold

            slow = stack.enter_context(SlowCold(WORK, size_mb=size // 2**20 * 2 + 256,
                                                read_mbps=args.throttle))
            model = slow.fill(model, "gpt2")
            global WRAP
            WRAP = slow.wrap
            cold = f"on an ext4 loop device throttled to {args.throttle} MB/s (cgroup-v1 blkio)"
        else:
            cold = "on the local disk (not throttled)"
        summary = measure(model, size, args, cold)
    key = f"cold_start_{args.throttle}mbps" if args.throttle else "cold_start_local"
    command = (f"make bench  # or: .venv/bin/python bench/cold_start.py --reps {args.reps}"
               + (f" --throttle {args.throttle}" if args.throttle else ""))
    section = render(summary, args, size, command)
    publish(key, summary, section)


def measure(model: Path, size: int, args, cold: str) -> dict:
    shutil.rmtree(TMPFS_COPY, ignore_errors=True)
    shutil.copytree(model, TMPFS_COPY / model.name)
    mnt, state = WORK / "mnt", WORK / "state"
    if is_mounted(mnt):
        aattsfs("umount", "--lazy", mnt)
    mnt.mkdir(parents=True, exist_ok=True)
    runs = []
    try:
        for i in range(args.reps):
            runs.append(one_rep(model, mnt, state))
            print(f"rep {i + 1}/{args.reps}: " +
                  ", ".join(f"{k} {v:.2f}s" for k, v in runs[-1].items()), flush=True)
    finally:
        shutil.rmtree(TMPFS_COPY, ignore_errors=True)
        shutil.rmtree(FAST, ignore_errors=True)
    phases = {k: {"median": statistics.median(r[k] for r in runs),
                  "min": min(r[k] for r in runs), "max": max(r[k] for r in runs)}
              for k in runs[0]}
    return {
        "when": time.strftime("%Y-%m-%d"),
        "host": f"{os.cpu_count()} cores, {platform.release()}",
        "cold": cold,
        "shards": len(list(model.glob("*.safetensors"))),
        "size_bytes": size,
        "runs": runs,
        "phases": phases,
        "ratios": [{"phase": p, "baseline": b,
                    "ratio": phases[p]["median"] / phases[b]["median"]} for p, b in RATIOS],
    }


if __name__ == "__main__":
    main()
