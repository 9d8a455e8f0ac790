"""The benchmark suite: aattsfs against the real alternatives on an emulated
slow cold tier, all reading the same logical files (bench/peers.py).

Workloads (docs/benchmarks.md has the full description and the figures):

  1  cold start of one sharded model: from_pretrained + every weight touched;
     phases cold, fast-tier warm, all warm; the daemons' CPU time and peak RSS
  2  model rotation under a RAM budget: a pipeline of models, each request a
     fresh process after a page-cache drop; p50/p90/max and cold-read share
  3  per-tensor files read layer by layer by torch.load; phases as in 1
  4  metadata: ls -lR and find -newer over many small files, cold and warm
  5  raw throughput of one big file: sequential dd (1 MiB) and random 4 KiB
     preads, fast-tier warm and page-cache warm

Each figure is the median of --reps runs (min and max beside it), and every
ratio is to a baseline measured in the same run. Results: bench/results/
suite.{csv,json,md} and plots/*.png; the summary replaces its block in
docs/benchmarks.md. --quick runs a reduced suite (smaller files, one run)
into bench/results/quick/ and leaves the docs alone: it checks that
everything works, its numbers are not figures.

    .venv/bin/python bench/suite.py [--quick] [--throttle 200] [--workloads 1,2,3,4,5]
        [--targets direct,tmpfs,...] [--reps 3]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchenv import REPO, WORK

import datasets
import harness
import peers
from harness import drop_caches

GiB, MiB = 1 << 30, 1 << 20
SCALES = {
    # w1: layers, width, shard size; w2: models, layers, width, shard, measured
    # requests; w3: layers, width; w4: dirs, files per dir; w5: blob bytes
    "full": dict(reps=3, w1=(16, 1024, "220MB"), w2=(6, 4, 768, "100MB", 12), w3=(16, 768),
                 w4=(200, 100), w5=GiB),
    "quick": dict(reps=1, w1=(4, 768, "60MB"), w2=(3, 2, 512, "40MB", 3), w3=(4, 512),
                  w4=(20, 100), w5=256 * MiB),
}
IMAGE_MB = 14 * 1024  # the cold tier's image: both scales' data, and JuiceFS's copy of it
BUDGET = 2 * GiB  # every cached target's cache, except in workload 2
THINK = 1.0  # seconds between two requests of workload 2
FOLLOW = 0.9  # workload 2: how often a model's successor is the next request
WORKLOADS = {1: "1 cold start", 2: "2 rotation", 3: "3 per-tensor", 4: "4 metadata",
             5: "5 throughput"}


class Bench:
    """What every workload needs: the cold tier, the targets, and the rows."""

    def __init__(self, slow, targets: list[peers.Target], reps: int) -> None:
        self.slow = slow
        self.targets = targets
        self.reps = reps
        self.rows: list[dict] = []
        self.failures: list[dict] = []  # a peer failing a load is a finding, not a crash

    def record(self, workload: int, phase: str, target: str, rep: int, value: float,
               unit: str = "s", cold_bytes: int | None = None) -> None:
        self.rows.append({"workload": WORKLOADS[workload], "phase": phase, "target": target,
                          "rep": rep, "value": round(value, 4), "unit": unit,
                          "cold_mib": "" if cold_bytes is None else round(cold_bytes / MiB, 1)})
        print(f"  {WORKLOADS[workload]:<14} {phase:<22} {target:<12} {value:9.3f} {unit}",
              flush=True)

    def timed(self, workload: int, phase: str, target: str, rep: int, fn, *args,
              record: bool = True) -> float | None:
        """Run fn(*args) (returning seconds), recording it with the cold-tier
        bytes read meanwhile; a failure is noted and returns None."""
        before = self.slow.read_bytes()
        try:
            seconds = fn(*args)
        except SystemExit as exc:  # harness.run: the command failed
            print(f"  {WORKLOADS[workload]:<14} {phase:<22} {target:<12} FAILED", flush=True)
            self.failures.append({"workload": WORKLOADS[workload], "phase": phase,
                                  "target": target, "rep": rep,
                                  "error": str(exc).strip().splitlines()[-1][:300]})
            return None
        if record:
            self.record(workload, phase, target, rep, seconds,
                        cold_bytes=self.slow.read_bytes() - before)
        return seconds

    @contextlib.contextmanager
    def up(self, target: peers.Target, budget: int = BUDGET):
        root = target.start(budget)
        try:
            yield root
        finally:
            target.stop()

    def load(self, kind: str, path: Path) -> float:
        return harness.load(kind, path, self.slow.wrap)["seconds"]

    def command(self, cmd: list) -> float:
        t0 = time.perf_counter()
        harness.run(cmd, self.slow.wrap)
        return time.perf_counter() - t0


def cpu_seconds(pids: list[int]) -> float:
    import psutil
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
    return total


def peak_rss(pids: list[int]) -> int:
    """VmHWM: the highest resident set size since the daemon started."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) * 1024
    return total


def model_load(b: Bench, workload: int, kind: str, dataset: str) -> None:
    """Workloads 1 and 3: cold (page cache dropped, every cache empty, nothing
    learned), fast-tier warm (page cache dropped, the target's cache kept),
    all warm. Targets interleave within each repetition."""
    for rep in range(b.reps):
        for t in b.targets:
            with b.up(t) as root:
                path = root / dataset
                drop_caches()
                cpu0 = cpu_seconds(t.pids())
                b.timed(workload, "cold", t.name, rep, b.load, kind, path)
                t.settle()
                drop_caches()
                b.timed(workload, "fast-tier warm", t.name, rep, b.load, kind, path)
                b.timed(workload, "all warm", t.name, rep, b.load, kind, path)
                if workload == 1 and t.pids():
                    b.record(1, "daemon CPU", t.name, rep, cpu_seconds(t.pids()) - cpu0)
                    b.record(1, "daemon peak RSS", t.name, rep, peak_rss(t.pids()) / MiB, "MiB")


def pipeline(n: int, length: int, follow: float, seed: int) -> list[int]:
    """Model indices: i is followed by i+1 (mod n) with probability `follow`,
    by another model otherwise; a fixed seed, so every target sees the same."""
    rng = random.Random(seed)
    seq = [0]
    while len(seq) < length:
        nxt = (seq[-1] + 1) % n
        if rng.random() >= follow:
            nxt = rng.choice([i for i in range(n) if i != nxt])
        seq.append(nxt)
    return seq


def rotation(b: Bench, dataset: str, models: int, measured: int) -> dict:
    """Workload 2: one warm-up cycle of the pipeline (aattsfs learns it), then
    the measured requests; the fast tier holds about half of the models.

    The cold-read share counts every byte read from the cold tier during the
    measured requests and the think times between them (prefetches included)
    against the bytes the requests asked for: the I/O price, alike for all.
    The hit ratio is the share of the requested bytes served from the cache:
    aattsfs counts it itself; for the peers, which fetch nothing but the
    file being read, it is 1 minus the cold-read share."""
    names = [f"model-{i}" for i in range(models)]
    sizes = [sum(f.stat().st_size for f in (b.slow.mnt / dataset / n).iterdir())
             for n in names]
    budget = sum(sizes) // 2
    warmup = pipeline(models, models, 1.0, seed=1)
    sequence = pipeline(models, measured + 1, FOLLOW, seed=14)[1:]
    shares, hits = {}, {}
    for t in b.targets:
        with b.up(t, budget) as root:
            def request(i: int) -> float:
                time.sleep(THINK)
                drop_caches()
                return b.load("hf", root / dataset / names[i])

            for k, i in enumerate(warmup):
                b.timed(2, "warm-up", t.name, k, request, i, record=False)
            before, served = b.slow.read_bytes(), t.served()
            for k, i in enumerate(sequence):
                b.timed(2, "request", t.name, k, request, i)
            shares[t.name] = (b.slow.read_bytes() - before) / sum(sizes[i] for i in sequence)
            if served is None:
                hits[t.name] = max(0.0, 1 - shares[t.name])
            else:
                now = t.served()
                fast, cold = (now[k] - served[k] for k in ("fast", "cold"))
                hits[t.name] = fast / (fast + cold) if fast + cold else 0.0
    return {"budget_mib": budget / MiB, "model_mib": statistics.mean(sizes) / MiB,
            "warmup": warmup, "sequence": sequence, "cold_read_share": shares,
            "hit_ratio": hits}


def metadata(b: Bench, dataset: str, dirs: int, per_dir: int) -> None:
    """Workload 4: each command on a fresh target after a page-cache drop
    (cold), then once more (warm)."""
    ref = datasets.middle_file(Path(dataset), dirs, per_dir)
    for rep in range(b.reps):
        for t in b.targets:
            for name, cmd in (("ls -lR", lambda r: ["ls", "-lR", r / dataset]),
                              ("find -newer", lambda r: ["find", r / dataset, "-newer",
                                                         r / ref])):
                with b.up(t) as root:
                    drop_caches()
                    b.timed(4, f"{name}, cold", t.name, rep, b.command, cmd(root))
                    b.timed(4, f"{name}, warm", t.name, rep, b.command, cmd(root))


def throughput(b: Bench, dataset: str, size: int) -> None:
    """Workload 5: the file is read once through the target (filling its
    cache), then dd and random reads, each fast-tier warm (page cache
    dropped) and page-cache warm (run again)."""
    reader = [sys.executable, REPO / "bench" / "randread.py"]
    for rep in range(b.reps):
        for t in b.targets:
            with b.up(t) as root:
                blob = root / dataset / "blob"
                dd = ["dd", f"if={blob}", "of=/dev/null", "bs=1M"]
                b.command(dd)
                t.settle()
                for warm in ("fast-tier warm", "page-cache warm"):
                    if warm == "fast-tier warm":
                        drop_caches()
                    b.record(5, f"dd 1 MiB, {warm}", t.name, rep,
                             size / b.command(dd) / 1e6, "MB/s")
                for warm in ("fast-tier warm", "page-cache warm"):
                    if warm == "fast-tier warm":
                        drop_caches()
                    out = json.loads(harness.run([*reader, blob], b.slow.wrap))
                    b.record(5, f"random 4 KiB, {warm}", t.name, rep,
                             out["reads"] / out["seconds"], "IOPS")


def summarize(rows: list[dict]) -> dict:
    """{workload: {phase: {target: {median, min, max, n, unit}}}}"""
    groups: dict = {}
    for r in rows:
        groups.setdefault(r["workload"], {}).setdefault(r["phase"], {}) \
            .setdefault(r["target"], []).append(r)
    return {w: {p: {t: {"median": statistics.median(x["value"] for x in rs),
                        "min": min(x["value"] for x in rs), "max": max(x["value"] for x in rs),
                        "n": len(rs), "unit": rs[0]["unit"]}
                    for t, rs in ts.items()} for p, ts in ps.items()}
            for w, ps in groups.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a reduced suite in a few minutes")
    ap.add_argument("--throttle", type=int, default=200, metavar="MBPS",
                    help="cold-tier read bandwidth [default: 200]")
    ap.add_argument("--workloads", default="1,2,3,4,5", metavar="LIST")
    ap.add_argument("--targets", default=None, metavar="LIST",
                    help="a subset of: direct,tmpfs,bindfs,rclone,juicefs,aattsfs-lru,aattsfs")
    ap.add_argument("--reps", type=int, default=None, help="runs per figure [full: 3]")
    args = ap.parse_args()
    scale_name = "quick" if args.quick else "full"
    scale = SCALES[scale_name]
    reps = args.reps or scale["reps"]
    try:
        chosen = sorted({int(w) for w in args.workloads.split(",")})
    except ValueError:
        chosen = [0]
    if not set(chosen) <= set(WORKLOADS):
        raise SystemExit("bench: --workloads takes numbers from 1 to 5, e.g. 1,3")
    if os.geteuid() != 0:
        raise SystemExit("bench: run as root (it mounts, drops the page cache and "
                         "sets up a cgroup)")
    wanted = args.targets.split(",") if args.targets else peers.NAMES
    if set(wanted) - set(peers.NAMES):
        raise SystemExit(f"bench: unknown target in --targets; choose from "
                         f"{','.join(peers.NAMES)}")
    if not args.quick and reps < 3:
        raise SystemExit("bench: figures are medians of at least 3 runs; use --reps 3 or more "
                         "(or --quick for a smoke run)")
    from slowcold import SlowCold

    src = WORK / "src" / scale_name
    build = {  # workload -> (dataset name on the cold tier, local source)
        1: lambda: datasets.sharded_model(src / "w1-model", *scale["w1"]),
        2: lambda: [datasets.sharded_model(src / "w2-rotation" / f"model-{i}",
                                           *scale["w2"][1:4], seed=i)
                    for i in range(scale["w2"][0])][0].parent,
        3: lambda: datasets.per_tensor(src / "w3-pertensor", *scale["w3"]),
        4: lambda: datasets.many_files(src / "w4-metadata", *scale["w4"]),
        5: lambda: datasets.blob(src / "w5-blob", scale["w5"]),
    }
    sources = {w: build[w]() for w in chosen}
    names = {w: f"{scale_name}-{p.name}" for w, p in sources.items()}
    meta = {"host": f"{os.cpu_count()} cores, {platform.release()}", "scale": scale_name,
            "scale_args": scale, "reps": reps, "throttle_mbps": args.throttle,
            "budget_mib": BUDGET / MiB, "versions": versions(), "datasets": {}, "runs": {}}
    with SlowCold(WORK, size_mb=IMAGE_MB, read_mbps=args.throttle) as slow:
        for w, p in sources.items():
            meta["datasets"][WORKLOADS[w]] = dataset_info(slow.fill(p, names[w]))
        targets = [t for t in peers.all_targets(slow.mnt, slow.wrap) if t.name in wanted]
        b = Bench(slow, targets, reps)
        try:
            for t in targets:
                t.prepare(sorted(names.values()))
            for w in chosen:
                print(f"workload {WORKLOADS[w]} ...", flush=True)
                run = {"started": time.strftime("%Y-%m-%d %H:%M")}
                t0 = time.monotonic()
                if w in (1, 3):
                    model_load(b, w, "hf" if w == 1 else "pertensor", names[w])
                elif w == 2:
                    run.update(rotation(b, names[w], scale["w2"][0], scale["w2"][4]))
                elif w == 4:
                    metadata(b, names[w], *scale["w4"])
                else:
                    throughput(b, names[w], scale["w5"])
                run["minutes"] = round((time.monotonic() - t0) / 60, 1)
                run["failures"] = [f for f in b.failures if f["workload"] == WORKLOADS[w]]
                meta["runs"][WORKLOADS[w]] = run
                # after each workload: an interrupted suite keeps what it measured
                write_results([r for r in b.rows if r["workload"] == WORKLOADS[w]],
                              meta, args, wanted)
        finally:
            for t in targets:
                t.finish()


def versions() -> dict:
    def first_line(cmd: list) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True)
            return (out.stdout or out.stderr).splitlines()[0]
        except (OSError, IndexError):
            return "?"
    return {"bindfs": first_line(["bindfs", "--version"]),
            "rclone": first_line([peers.BIN / "rclone", "version"]),
            "juicefs": first_line([peers.BIN / "juicefs", "version"]),
            "kernel": platform.release()}


def dataset_info(path: Path) -> dict:
    files = [f for f in path.rglob("*") if f.is_file() and not f.name.startswith(".")]
    return {"files": len(files), "mib": round(sum(f.stat().st_size for f in files) / MiB, 1)}


def keep_other_workloads(out: Path, rows: list[dict], meta: dict) -> list[dict]:
    """Rows of a workload replace that workload's rows only: the others are
    kept from the previous results if those were taken with the same
    settings (a partial run, or the workloads before this one)."""
    try:
        old = json.loads((out / "suite.json").read_text())
        with open(out / "suite.csv", newline="") as f:
            old_rows = list(csv.DictReader(f))
    except (OSError, ValueError):
        return rows
    same = ("scale", "reps", "throttle_mbps", "budget_mib", "versions")
    if "runs" not in old or any(old.get(k) != meta[k] for k in same):
        return rows
    ran = {r["workload"] for r in rows}
    kept = [{**r, "rep": int(r["rep"]), "value": float(r["value"])} for r in old_rows
            if r["workload"] not in ran]
    for key in ("runs", "datasets"):
        meta[key] = {**old[key], **meta[key]}
    return sorted(kept + rows, key=lambda r: r["workload"])


def write_results(rows: list[dict], meta: dict, args, wanted: list[str]) -> None:
    import plots
    import report

    # Only a run of every target at full scale is a set of figures; others
    # go aside (git-ignored) and leave the docs alone.
    partial = args.quick or set(wanted) != set(peers.NAMES)
    out = REPO / "bench" / "results" / ("quick" if args.quick else "partial" if partial else "")
    out.mkdir(parents=True, exist_ok=True)
    rows = keep_other_workloads(out, rows, meta)
    with open(out / "suite.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    summary = summarize(rows)
    meta["summary"] = summary
    (out / "suite.json").write_text(json.dumps(meta, indent=2) + "\n")
    images = plots.draw(rows, summary, out / "plots")
    command = "make bench-quick" if args.quick else \
        " ".join([".venv/bin/python", *sys.argv]) if partial else "make bench"
    section = report.render(meta, summary, rows, images, command, out)
    (out / "suite.md").write_text(section)
    if not partial:
        harness.update_doc(section, "suite")
    print(section)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
