"""Never slower than the cold directory, at any budget (docs/admission.md):
aattsfs with its defaults against the cold directory read directly, on the
suite's throttled cold tier, with fast-tier budgets of 0.25x, 0.5x, 0.75x and
1.5x the working set; `--admission all` (every file read is copied, the
behaviour before admission) beside it.

  1  the suite's workload 1 (one sharded model): cold, fast-tier warm and
     all warm, each a fresh process (bench/suite.py model_load)
  2  the suite's workload 2 (a rotation of six models, each request a fresh
     process after a page-cache drop): the p50 over the measured requests,
     after one warm-up cycle
  3  the suite's workload 3 (per-tensor files), as 1

For 1 and 3, a copy in /dev/shm read directly (no FUSE, no budget) runs
beside them: the fast tier's own memory, whose all-warm ratio is the floor
of any mount serving that phase from a tmpfs fast tier.

Medians of --reps runs for 1 and 3 (targets interleaved within each run);
2 is one pass of 12 measured requests per target, as in the suite. Ratios
are to direct in the same run.

    .venv/bin/python bench/budgets.py [--reps 3] [--workloads 1,2,3]
        [--fractions 0.25,0.5,0.75,1.5] [--throttle 200]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

from benchenv import WORK

import datasets
import harness
import peers
import suite

ADMIT_ALL = 0.5  # the budget fraction at which `--admission all` is measured too


class Budgeted:
    """A target started with a budget of its own, whatever it is asked for;
    everything else is the wrapped target's."""

    def __init__(self, target: peers.Target, budget: int, name: str) -> None:
        self.inner, self.budget, self.name = target, budget, name

    def start(self, budget: int) -> Path:
        return self.inner.start(self.budget)

    def __getattr__(self, attr):  # settle, stop, pids, served, finish, ...
        return getattr(self.inner, attr)


def _targets(slow, working_set: int, fractions: list[float], floor: bool) -> list:
    out: list = [peers.Direct(slow.mnt, slow.wrap)]
    if floor:
        out.append(peers.Tmpfs(slow.mnt, slow.wrap))
    for f in fractions:
        out.append(Budgeted(peers.Aattsfs(slow.mnt, slow.wrap, "aattsfs", []),
                            int(working_set * f), f"aattsfs {f}x"))
        if f == ADMIT_ALL:
            out.append(Budgeted(peers.Aattsfs(slow.mnt, slow.wrap, "aattsfs-all",
                                              ["--admission", "all"]),
                                int(working_set * f), f"admit-all {f}x"))
    return out


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def table(rows: list[dict], fractions: list[float]) -> str:
    """Per workload and phase: direct's median, then each budget's ratio of
    medians to it (min–max of the per-run values beside, for 1 and 3)."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["workload"], r["phase"]), {}).setdefault(r["target"], []) \
            .append(r["value"])
    cols = [f"aattsfs {f}x" for f in fractions] + [f"admit-all {ADMIT_ALL}x", "tmpfs"]
    out = ["| workload, phase | direct (s) | " + " | ".join(cols) + " |",
           "|---|---:|" + "---:|" * len(cols)]
    for (w, phase), by in groups.items():
        base = statistics.median(by["direct"])
        cells = []
        for c in cols:
            if c not in by:
                cells.append("-")
                continue
            ratio = statistics.median(by[c]) / base
            worst = "" if ratio <= 1.02 or c == "tmpfs" else " **over**"
            cells.append(f"{ratio:.2f}x{worst}")
        out.append(f"| {w}, {phase} | {base:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workloads", default="1,2,3")
    ap.add_argument("--fractions", default="0.25,0.5,0.75,1.5")
    ap.add_argument("--throttle", type=int, default=200, metavar="MBPS")
    args = harness.parse_bench_args(ap)
    chosen = [int(w) for w in args.workloads.split(",")]
    fractions = [float(f) for f in args.fractions.split(",")]
    scale = suite.SCALES["full"]
    src = WORK / "src" / "full"
    build = {
        1: lambda: datasets.sharded_model(src / "w1-model", *scale["w1"]),
        2: lambda: [datasets.sharded_model(src / "w2-rotation" / f"model-{i}",
                                           *scale["w2"][1:4], seed=i)
                    for i in range(scale["w2"][0])][0].parent,
        3: lambda: datasets.per_tensor(src / "w3-pertensor", *scale["w3"]),
    }
    from slowcold import SlowCold

    rows: list[dict] = []
    meta = {"throttle_mbps": args.throttle, "reps": args.reps, "fractions": fractions,
            "runs": {}}
    with SlowCold(WORK, size_mb=suite.IMAGE_MB, read_mbps=args.throttle) as slow:
        for w in chosen:
            name = f"full-{build[w]().name}"
            slow.fill(build[w](), name)
            working_set = _tree_bytes(slow.mnt / name)
            targets = _targets(slow, working_set, fractions, floor=w != 2)
            for t in targets:
                t.prepare([name])
            b = suite.Bench(slow, targets, args.reps)
            print(f"workload {suite.WORKLOADS[w]}, working set {working_set >> 20} MiB",
                  flush=True)
            t0 = time.monotonic()
            try:
                if w == 2:
                    suite.rotation(b, name, scale["w2"][0], scale["w2"][4])
                else:
                    suite.model_load(b, w, "hf" if w == 1 else "pertensor", name)
            finally:
                for t in targets:
                    t.finish()
            meta["runs"][suite.WORKLOADS[w]] = {
                "working_set_mib": working_set >> 20, "failures": b.failures,
                "minutes": round((time.monotonic() - t0) / 60, 1),
                "started": time.strftime("%Y-%m-%d %H:%M")}
            if w == 2:  # one pass: its requests are the repetitions
                b.rows = [dict(r, phase="request p50") for r in b.rows]
            rows += [r for r in b.rows if r["phase"] in
                     ("cold", "fast-tier warm", "all warm", "request p50")]
            publish(args, meta, rows, fractions)  # after each workload: a later failure keeps it


def publish(args, meta: dict, rows: list[dict], fractions: list[float]) -> None:
    runs = "; ".join(f"{w}: working set {r['working_set_mib']} MiB, {r['minutes']} min"
                     + (f", {len(r['failures'])} failed loads" if r["failures"] else "")
                     for w, r in meta["runs"].items())
    section = (f"Cold tier throttled to {args.throttle} MB/s; {runs}. Medians of {args.reps} "
               "runs (workload 2: of its 12 measured requests), as ratios to direct in the "
               "same run; over 1.02x is marked. tmpfs: a copy in /dev/shm read directly, "
               "no FUSE and no budget (the fast tier's memory: the floor of its all-warm "
               "phase).\n\nReproduce: `.venv/bin/python "
               "bench/budgets.py` (as root; `make bench` runs it).\n\n"
               + table(rows, fractions))
    harness.publish("budgets", {"meta": meta, "rows": rows}, section)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
