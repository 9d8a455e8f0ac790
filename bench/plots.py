"""The suite's figures as PNG (matplotlib, no display): grouped bars per
workload and phase (median, whiskers from min to max), and the latency CDF
of the rotation workload's requests."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LOWER_IS_BETTER = {"s", "MiB"}


def _panels(phases: dict) -> dict[str, list[str]]:
    """Phases that share an axis: same unit, and each daemon figure alone."""
    panels: dict[str, list[str]] = {}
    for phase, targets in phases.items():
        unit = next(iter(targets.values()))["unit"]
        panels.setdefault(phase if phase.startswith("daemon") else unit, []).append(phase)
    return panels


def bars(workload: str, phases: dict, path: Path, order: list[str]) -> None:
    panels = _panels(phases)
    widths = [max(2, len(ps)) for ps in panels.values()]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 * sum(widths) + 1, 4.2),
                             gridspec_kw={"width_ratios": widths}, squeeze=False)
    for ax, ps in zip(axes[0], panels.values(), strict=True):
        targets = [t for t in order if any(t in phases[p] for p in ps)]
        step = 0.8 / len(targets)
        for k, t in enumerate(targets):
            xs = [i + (k - (len(targets) - 1) / 2) * step for i, p in enumerate(ps)
                  if t in phases[p]]
            stats = [phases[p][t] for p in ps if t in phases[p]]
            med = [s["median"] for s in stats]
            err = [[m - s["min"] for m, s in zip(med, stats, strict=True)],
                   [s["max"] - m for m, s in zip(med, stats, strict=True)]]
            ax.bar(xs, med, step, yerr=err, capsize=2, label=t, color=f"C{order.index(t)}")
        unit = phases[ps[0]][targets[0]]["unit"]
        ax.set_xticks(range(len(ps)), ps, fontsize=8)
        better = "lower" if unit in LOWER_IS_BETTER else "higher"
        ax.set_ylabel(f"{unit} ({better} is better)")
        if workload.startswith("4"):
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"workload {workload}: median of runs, whiskers min-max")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def cdf(times: dict[str, list[float]], path: Path, order: list[str]) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for t in order:
        if t not in times:
            continue
        xs = sorted(times[t])
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        ax.step(xs, ys, where="post", label=t, color=f"C{order.index(t)}")
    ax.set_xlabel("load time of a request, s (fresh process, page cache dropped)")
    ax.set_ylabel("share of requests")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("workload 2, model rotation: latency CDF")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def draw(rows: list[dict], summary: dict, out: Path) -> dict[str, Path]:
    """Write every plot into `out`; returns {workload: png}."""
    out.mkdir(parents=True, exist_ok=True)
    order = list(dict.fromkeys(r["target"] for r in rows))
    images = {}
    for workload, phases in summary.items():
        path = out / f"workload{workload.split()[0]}.png"
        if workload.startswith("2"):
            times: dict[str, list[float]] = {}
            for r in rows:
                if r["workload"] == workload:
                    times.setdefault(r["target"], []).append(r["value"])
            cdf(times, path, order)
        else:
            bars(workload, phases, path, order)
        images[workload] = path
    return images
