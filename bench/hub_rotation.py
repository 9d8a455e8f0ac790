"""A rotation on a Hugging Face hub-layout cache: the first pass of a fresh
box, with and without a learner seeded from another box's trace
(docs/fleet.md, docs/huggingface.md).

The suite's workload-2 models (GPT-2-shaped, 4 x 768, 100 MB shards), as a
hub cache (models--bench--model-I: blobs by hash, snapshots/REV links,
refs/main) on the suite's throttled cold tier; the fast tier holds about
half of them. A *teacher* box (a fresh mount) serves two cycles of the
rotation and exports its trace. Then, in each run, each target serves one
cycle, every request a fresh process loading a snapshot directory after a
pause of suite.THINK and a page-cache drop:

  direct   the cold cache itself
  fresh    a new aattsfs box (empty state): it knows only the format hints
  seeded   a new box started with `--learn-from` the teacher's trace

Figures are medians of --reps runs, as ratios to direct's pass in the same
run; the hit ratio is the share of the requested bytes served from the fast
tier, the cold-read share counts every byte read from the cold tier during
the pass (prefetches included) against the bytes requested.

    .venv/bin/python bench/hub_rotation.py [--reps 3] [--models 4] [--throttle 200]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import time
from pathlib import Path

from benchenv import WORK

import datasets
import harness
import modelgen
import peers
import suite

REV = "{:040x}"  # model i's revision: a commit hash as the hub writes it


def hub_source(models: int) -> Path:
    """The workload-2 models as one hub cache (built once, kept)."""
    layers, width, shard = suite.SCALES["full"]["w2"][1:4]
    dest = WORK / "src" / "full" / f"hub-rotation-{models}"
    if not (dest / ".complete").exists():
        shutil.rmtree(dest, ignore_errors=True)
        for i in range(models):
            model = datasets.sharded_model(WORK / "src" / "full" / "w2-rotation" / f"model-{i}",
                                           layers, width, shard, seed=i)
            modelgen.hub_cache(dest, model, f"bench/model-{i}", REV.format(i + 1))
        (dest / ".complete").touch()
    return dest


def snapshot(i: int) -> str:
    return f"models--bench--model-{i}/snapshots/{REV.format(i + 1)}"


def one_pass(slow, target: peers.Target, budget: int, models: int,
             cycles: int = 1) -> dict:
    root = target.start(budget)
    try:
        wrap = slow.wrap if isinstance(target, peers.Direct) else list
        served0, read0 = target.served(), slow.read_bytes()
        seconds = 0.0
        for _ in range(cycles):
            for i in range(models):
                time.sleep(suite.THINK)
                harness.drop_caches()
                seconds += harness.load("hf", root / snapshot(i), wrap)["seconds"]
        out = {"seconds": seconds, "cold_read": slow.read_bytes() - read0}
        if served0 is not None:
            now = target.served()
            fast, cold = (now[k] - served0[k] for k in ("fast", "cold"))
            out["hit_ratio"] = fast / (fast + cold) if fast + cold else 0.0
        if isinstance(target, peers.Aattsfs):
            out["trace"] = harness.cli("trace", "export", root)
        return out
    finally:
        target.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--models", type=int, default=4)
    ap.add_argument("--throttle", type=int, default=200, metavar="MBPS")
    args = harness.parse_bench_args(ap)
    src = hub_source(args.models)
    from slowcold import SlowCold

    with SlowCold(WORK, size_mb=suite.IMAGE_MB, read_mbps=args.throttle) as slow:
        cold = slow.fill(src, f"full-{src.name}")
        sizes = [sum(f.stat().st_size for f in (cold / snapshot(i)).iterdir())
                 for i in range(args.models)]
        requested = sum(sizes)
        budget = requested // 2
        t0, started = time.monotonic(), time.strftime("%Y-%m-%d %H:%M")
        teacher = one_pass(slow, peers.Aattsfs(cold, slow.wrap, "hub-teacher", []), budget,
                           args.models, cycles=2)
        trace = WORK / "hub-teacher.trace.jsonl"
        trace.write_text(teacher["trace"])
        runs = []
        for rep in range(args.reps):
            targets = {"direct": peers.Direct(cold, slow.wrap),
                       "fresh": peers.Aattsfs(cold, slow.wrap, "hub-fresh", []),
                       "seeded": peers.Aattsfs(cold, slow.wrap, "hub-seeded",
                                               ["--learn-from", str(trace)])}
            run = {name: one_pass(slow, t, budget, args.models) for name, t in targets.items()}
            for r in run.values():
                r.pop("trace", None)
            runs.append(run)
            print(f"run {rep + 1}: " + ", ".join(
                f"{n} {r['seconds'] / run['direct']['seconds']:.2f}x" for n, r in run.items()),
                flush=True)
    meta = {"throttle_mbps": args.throttle, "reps": args.reps, "models": args.models,
            "model_mib": statistics.mean(sizes) / 2**20, "budget_mib": budget / 2**20,
            "requested_bytes": requested, "minutes": round((time.monotonic() - t0) / 60, 1),
            "started": started}
    publish(meta, runs)


def publish(meta: dict, runs: list[dict]) -> None:
    def cell(target: str, fn, fmt: str) -> str:
        values = sorted(fn(run[target], run) for run in runs)
        return (f"{fmt.format(statistics.median(values))} "
                f"({fmt.format(values[0])}–{fmt.format(values[-1])})")

    rows = [("first pass, load time vs direct",
             lambda t: cell(t, lambda r, run: r["seconds"] / run["direct"]["seconds"],
                            "{:.2f}x")),
            ("hit ratio (requested bytes from the fast tier)",
             lambda t: cell(t, lambda r, run: r["hit_ratio"], "{:.2f}")),
            ("bytes read from the cold tier / requested",
             lambda t: cell(t, lambda r, run: r["cold_read"] / meta["requested_bytes"],
                            "{:.2f}"))]
    table = ("| median (min–max) | fresh box | seeded box (`--learn-from`) |\n|---|---|---|\n"
             + "".join(f"| {label} | {of('fresh')} | {of('seeded')} |\n"
                       for label, of in rows))
    section = (f"{meta['models']} models of {meta['model_mib']:.0f} MiB as a hub cache on a cold "
               f"tier throttled to {meta['throttle_mbps']} MB/s, fast tier "
               f"{meta['budget_mib']:.0f} MiB (about half); one cycle of the rotation, each "
               f"request a fresh process after a {suite.THINK:g} s pause and a page-cache "
               f"drop; medians of {meta['reps']} runs ({meta['started']}, "
               f"{meta['minutes']} min), ratios to direct in the same run. The seeded box "
               "learned from the trace a teacher box exported after two cycles.\n\n"
               "Reproduce: `.venv/bin/python bench/hub_rotation.py` (as root, after "
               "`make bench-deps`).\n\n" + table)
    harness.publish("hub_rotation", {"meta": meta, "runs": runs}, section)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
