"""The suite's summary in Markdown: the issue's targets met or missed, then a
table per workload (median, min-max, ratio to the phase's baseline)."""

from __future__ import annotations

import os
import statistics
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The baseline of a phase: the direct cold directory, except where the
# question is how close a cache comes to RAM.
TMPFS_BASELINE = {("1 cold start", "fast-tier warm"), ("3 per-tensor", "fast-tier warm")}

# (workload, phase, baseline target, the most aattsfs may take as a ratio)
TARGETS = [
    ("1 cold start", "cold", "direct", 0.85),
    ("1 cold start", "fast-tier warm", "tmpfs", 1.10),
    ("1 cold start", "all warm", "direct", 1.05),
    ("2 rotation", "request", "direct", 0.55),
    ("3 per-tensor", "fast-tier warm", "tmpfs", 1.50),
    ("4 metadata", "ls -lR, warm", "juicefs", 1.00),
    ("4 metadata", "find -newer, warm", "juicefs", 1.00),
]


def baseline(workload: str, phase: str) -> str:
    return "tmpfs" if (workload, phase) in TMPFS_BASELINE else "direct"


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _fmt(v: float) -> str:
    return f"{v:.3f}" if v < 10 else f"{v:,.0f}" if v >= 1000 else f"{v:.1f}"


def targets_table(summary: dict) -> list[str]:
    lines = ["| target (from the issue) | aattsfs | baseline | ratio | limit | |",
             "|---|---:|---:|---:|---:|---|"]
    for workload, phase, base, limit in TARGETS:
        stats = summary.get(workload, {}).get(phase, {})
        if "aattsfs" not in stats or base not in stats:
            continue
        a, b = stats["aattsfs"]["median"], stats[base]["median"]
        what = f"workload {workload}, {'p50' if phase == 'request' else phase}"
        lines.append(f"| {what} vs {base} | {_fmt(a)} s | {_fmt(b)} s | {a / b:.2f}x | "
                     f"{limit:.2f}x | {'met' if a / b <= limit else '**missed**'} |")
    return lines


def workload_table(workload: str, phases: dict, order: list[str]) -> list[str]:
    ps = [p for p in phases if not p.startswith("daemon")]
    lines = ["| target | " + " | ".join(f"{p} ({phases[p][next(iter(phases[p]))]['unit']})"
                                        for p in ps) + " |",
             "|---|" + "---:|" * len(ps)]
    for t in order:
        cells = []
        for p in ps:
            s = phases[p].get(t)
            base = phases[p].get(baseline(workload, p))
            if s is None:
                cells.append("")
                continue
            ratio = f" · **{s['median'] / base['median']:.2f}x**" if base else ""
            cells.append(f"{_fmt(s['median'])} ({_fmt(s['min'])}–{_fmt(s['max'])}){ratio}")
        if any(cells):
            lines.append(f"| {t} | " + " | ".join(cells) + " |")
    daemon = [p for p in phases if p.startswith("daemon")]
    if daemon:
        lines += ["", "| daemon during the workload's three loads | " +
                  " | ".join(f"{p} ({phases[p][next(iter(phases[p]))]['unit']})"
                             for p in daemon) + " |", "|---|" + "---:|" * len(daemon)]
        for t in order:
            if t in phases[daemon[0]]:
                lines.append(f"| {t} | " + " | ".join(
                    f"{_fmt(phases[p][t]['median'])} ({_fmt(phases[p][t]['min'])}–"
                    f"{_fmt(phases[p][t]['max'])})" for p in daemon) + " |")
    return lines


def rotation_table(rows: list[dict], rotation: dict, order: list[str]) -> list[str]:
    times: dict[str, list[float]] = {}
    for r in rows:
        if r["workload"].startswith("2"):
            times.setdefault(r["target"], []).append(r["value"])
    base = statistics.median(times["direct"]) if "direct" in times else None
    lines = ["| target | p50 s | p90 s | max s | p50 / direct | cold-read share | hit ratio |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for t in order:
        if t not in times:
            continue
        xs = times[t]
        p50 = statistics.median(xs)
        ratio = f"{p50 / base:.2f}x" if base else ""
        lines.append(f"| {t} | {p50:.2f} | {percentile(xs, 0.9):.2f} | {max(xs):.2f} | "
                     f"{ratio} | {rotation['cold_read_share'][t]:.2f} | "
                     f"{rotation['hit_ratio'][t]:.2f} |")
    for f in rotation.get("failures", []):
        lines.append(f"\n{f['target']} failed request {f['rep']}: `{f['error']}`")
    return lines


def render(meta: dict, summary: dict, rows: list[dict], images: dict, command: str,
           out: Path) -> str:
    order = list(dict.fromkeys(r["target"] for r in rows))
    v = meta["versions"]
    sets = ", ".join(f"workload {k} ({d['files']} files, {d['mib']:.0f} MiB)"
                     for k, d in meta["datasets"].items())
    runs = "; ".join(f"{w.split()[0]}: {r['started']}, {r['minutes']} min"
                     for w, r in sorted(meta["runs"].items()))
    rotation = meta["runs"].get("2 rotation", {})
    lines = [
        f"Runs (workload: start, duration): {runs}; on {meta['host']}. Cold tier: an ext4 "
        f"loop device read through a cgroup-v1 blkio limit of {meta['throttle_mbps']} MB/s. "
        f"{meta['reps']} run(s) per figure, targets interleaved within each run. Cache "
        f"budget {meta['budget_mib']:.0f} MiB for every cached target"
        + (f" (workload 2: {rotation['budget_mib']:.0f} MiB, about half the models)"
           if rotation else "") +
        f". Peers: {v['bindfs']}; {v['rclone']}; {v['juicefs']}. Data: {sets}.",
        "",
        f"Reproduce: `{command}` (raw rows: `{os.path.relpath(out, REPO)}/suite.csv`,"
        f" summary: `suite.json`).",
        "",
        "Cells: median (min–max) · ratio of medians to the phase's baseline, which is "
        "direct, except tmpfs for fast-tier warm loads. Times in seconds (lower is better); "
        "MB/s and IOPS higher is better.",
        "",
        *targets_table(summary),
    ]
    for workload, phases in summary.items():
        lines += ["", f"### Workload {workload}", ""]
        if workload.startswith("2"):
            rot = meta["runs"][workload]
            lines += [f"{len(rot['warmup'])} warm-up requests (one cycle), then "
                      f"{len(rot['sequence'])} measured: {' '.join(map(str, rot['sequence']))};"
                      f" models of {rot['model_mib']:.0f} MiB. The cold-read share is the "
                      "bytes read from the cold tier during the measured requests and think "
                      "times (prefetches included) over the bytes requested. The hit ratio is "
                      "the share of the requested bytes served from the cache: aattsfs's own "
                      "count; for the peers, which fetch only the file being read, 1 minus "
                      "the cold-read share.", "", *rotation_table(rows, rot, order)]
        else:
            lines += workload_table(workload, phases, order)
            for f in meta["runs"][workload].get("failures", []):
                lines.append(f"\n{f['target']} failed ({f['phase']}, run {f['rep'] + 1}): "
                             f"`{f['error']}`")
        img = images.get(workload)
        if img:
            rel = os.path.relpath(img, REPO / "docs")
            lines += ["", f"![workload {workload}]({rel})"]
    return "\n".join(lines) + "\n"
