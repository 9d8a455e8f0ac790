"""Does pushing a staged model into the kernel page cache (`--push-page-cache`,
pyfuse3.notify_store) make the next process's load faster? Side by side.

Each repetition, page cache dropped first, fresh mount and empty fast tier:

  staged             every file looked up (`stat`), config.json opened, so the
                     format hints stage the model; the load then reads the
                     fast tier through the daemon
  staged + pushed    the same with --push-page-cache: the staged copies are
                     also copied into the page cache of the FUSE inodes
  all warm           a second load on that mount: the page cache holds the
                     model because a process read it (the physical best)

Reported: load times (fresh process, every weight touched), the ratio
pushed / staged and pushed / all warm, the time staging took with and
without the push, and the bytes the daemon served during the pushed load.
No page-cache drop may come between staging and loading here: it would drop
the pushed pages too, which is why the throttled rotation benchmark (which
drops it before every load) cannot show this effect.

    .venv/bin/python bench/page_cache_push.py [--reps 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from pathlib import Path

from benchenv import FAST, WORK

import harness
from aattsfs.mount import is_mounted
from harness import drop_caches, publish, stats


def stage(model: Path, mnt: Path, push: bool) -> tuple[float, float, int]:
    """Fresh mount, stage the model; returns (staging seconds, load seconds,
    bytes the daemon served during the load)."""
    state = WORK / "push-state"
    shutil.rmtree(FAST, ignore_errors=True)
    shutil.rmtree(state, ignore_errors=True)
    drop_caches()
    harness.cli("mount", model.parent, mnt, "--fast-dir", FAST, "--fast-size", "2G",
                "--state-dir", state, "--passthrough", "off",
                *(["--push-page-cache"] if push else []))
    files = sorted(p.name for p in model.iterdir())
    staged = [mnt / model.name / f for f in files
              if f.endswith(".safetensors") or f.endswith(".index.json")]
    for f in files:
        os.stat(mnt / model.name / f)  # the kernel now knows every inode
    start = time.monotonic()
    with open(mnt / model.name / "config.json", "rb"):
        pass
    while not all(os.getxattr(f, "user.aatts.tier") == b"fast" for f in staged) or \
            push and stats(mnt)["prefetch"]["pushed_bytes"] < sum(map(os.path.getsize, staged)):
        time.sleep(0.01)
    staging = time.monotonic() - start
    before = stats(mnt)["bytes_served"]
    load = harness.load("hf", mnt / model.name)["seconds"]
    after = stats(mnt)["bytes_served"]
    return staging, load, sum(after.values()) - sum(before.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    if args.reps < 3 or os.geteuid() != 0:
        raise SystemExit("bench: run as root, with at least 3 repetitions")
    model = WORK / "cold-8x768" / "gpt2"
    if not (model / "config.json").exists():
        import modelgen
        modelgen.gpt2(model, 8, 768, vocab=50257, shard="100MB")
    mnt = WORK / "push-mnt"
    if is_mounted(mnt):
        harness.cli("umount", "--lazy", mnt)
    mnt.mkdir(parents=True, exist_ok=True)
    runs = []
    try:
        for i in range(args.reps):
            r = {}
            for push in (False, True):
                try:
                    key = "staged + pushed" if push else "staged"
                    r[f"{key}: staging"], r[key], r[f"{key}: daemon bytes"] = \
                        stage(model, mnt, push)
                    if push:
                        r["all warm"] = harness.load("hf", mnt / model.name)["seconds"]
                finally:
                    harness.cli("umount", mnt)
            runs.append(r)
            print(f"rep {i + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in r.items()), flush=True)
    finally:
        shutil.rmtree(FAST, ignore_errors=True)
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    size = sum(p.stat().st_size for p in model.iterdir())
    lines = [
        f"Model: the {size / 2**20:.0f} MiB GPT-2-shaped model of the cold-start benchmark, "
        f"cold directory on the local disk; {args.reps} repetitions, medians (min-max).",
        "",
        "Reproduce: `.venv/bin/python bench/page_cache_push.py`",
        "",
        "| load after staging (fresh process) | median s | min | max | bytes the daemon served |",
        "|---|---:|---:|---:|---:|",
    ]
    for k in ("staged", "staged + pushed"):
        served = med[f"{k}: daemon bytes"] / 2**20
        lines.append(f"| {k} | {med[k]:.2f} | {min(r[k] for r in runs):.2f} | "
                     f"{max(r[k] for r in runs):.2f} | {served:.0f} MiB |")
    lines.append(f"| all warm (page cache filled by a load) | {med['all warm']:.2f} | "
                 f"{min(r['all warm'] for r in runs):.2f} | "
                 f"{max(r['all warm'] for r in runs):.2f} | |")
    lines += [
        "",
        "| ratio of medians | value |",
        "|---|---:|",
        f"| staged + pushed / staged | {med['staged + pushed'] / med['staged']:.2f}x |",
        f"| staged + pushed / all warm | {med['staged + pushed'] / med['all warm']:.2f}x |",
        f"| staging time, with push / without | "
        f"{med['staged + pushed: staging'] / med['staged: staging']:.2f}x |",
    ]
    section = "\n".join(lines) + "\n"
    publish("page_cache_push", runs, section)


if __name__ == "__main__":
    main()
