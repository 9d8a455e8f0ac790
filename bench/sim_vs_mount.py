"""The simulator against the mount (docs/benchmarks.md): the suite's
rotation (workload 2) and per-tensor (workload 3) datasets loaded by real
loaders in fresh processes through a mount with half the working set as its
budget, the page cache dropped before each load; then the trace the mount
recorded is replayed by `aattsfs sim` with the same budget, policy and
admission, and the two are set side by side: the share of opens that found
their file in the fast tier, and the bytes read from the cold tier.

Without prefetch: the simulator does not model time yet (a staged file is
there at once), so with prefetch it is not expected to agree.

    .venv/bin/python bench/sim_vs_mount.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchenv import WORK

import datasets
import harness
import peers
import suite
from harness import drop_caches

MiB = 1 << 20


def _loads(w: int) -> tuple[Path, list[tuple[str, Path]]]:
    """The dataset's root, and the loads in order: (loader kind, path)."""
    scale, src = suite.SCALES["full"], WORK / "src" / "full"
    if w == 2:
        models = [datasets.sharded_model(src / "w2-rotation" / f"model-{i}",
                                         *scale["w2"][1:4], seed=i) for i in range(scale["w2"][0])]
        order = suite.pipeline(len(models), len(models), 1.0, seed=1) + \
            suite.pipeline(len(models), scale["w2"][4] + 1, suite.FOLLOW, seed=14)[1:]
        return models[0].parent, [("hf", models[i].relative_to(models[0].parent))
                                  for i in order]
    root = datasets.per_tensor(src / "w3-pertensor", *scale["w3"])
    return root.parent, [("pertensor", Path(root.name))] * 3


def compare(w: int) -> dict:
    cold, loads = _loads(w)
    working_set = sum(f.stat().st_size for rel in {p for _, p in loads}
                      for f in (cold / rel).iterdir())
    budget = working_set // 2
    target = peers.Aattsfs(cold, list, "sim-vs-mount", ["--no-prefetch"])
    root = target.start(budget)
    try:
        for kind, rel in loads:
            drop_caches()
            harness.load(kind, root / rel)
        target.settle()
        s = harness.stats(root)
        trace = subprocess.run([sys.executable, "-m", "aattsfs", "trace", "export", str(root)],
                               capture_output=True, text=True, check=True).stdout
    finally:
        target.stop()
    path = WORK / f"sim-vs-mount-w{w}.jsonl"
    path.write_text(trace)
    sim = json.loads(subprocess.run(
        [sys.executable, "-m", "aattsfs", "sim", str(path), "--budget", str(budget),
         "--policy", "lru", "--json"], capture_output=True, text=True, check=True).stdout)
    (row,) = [r for name, r in sim.items() if name.startswith("lru")]
    opens = s["opens"]["fast"] + s["opens"]["cold"]
    return {"workload": suite.WORKLOADS[w], "loads": len(loads), "opens": opens,
            "budget_mib": round(budget / MiB), "mount_hit_ratio": s["opens"]["fast"] / opens,
            "sim_hit_ratio": row["hit_ratio"], "mount_cold_mib": s["cold_bytes_read"] / MiB,
            "sim_cold_mib": row["cold_bytes"] / MiB}


def main() -> None:
    harness.require_root()  # drops the page cache before each load
    rows = [compare(w) for w in (2, 3)]
    out = ["| workload | loads | opens | budget | hit ratio: mount | sim | cold MiB: mount "
           "| sim | cold bytes sim/mount |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['workload']} | {r['loads']} | {r['opens']} | {r['budget_mib']} MiB "
                   f"| {r['mount_hit_ratio']:.3f} | {r['sim_hit_ratio']:.3f} "
                   f"| {r['mount_cold_mib']:.0f} | {r['sim_cold_mib']:.0f} "
                   f"| {r['sim_cold_mib'] / r['mount_cold_mib']:.2f} |")
    section = ("Default policy and admission (LRU, reuse), no prefetch, budget half the working "
               "set; each load a fresh process after a page-cache drop, on a local cold "
               "directory (counts, not times: one run). Hit ratio: the share of opens that found "
               "the file in the fast tier.\n\nReproduce: `.venv/bin/python bench/sim_vs_mount.py` "
               "(as root).\n\n" + "\n".join(out) + "\n")
    harness.publish("sim_vs_mount", rows, section)


if __name__ == "__main__":
    main()
