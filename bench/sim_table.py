"""Every eviction policy on every seed pattern, against the offline optimum.

Budget: half of each trace's working set (the bytes of its distinct files).
Cells are byte hit ratios; in brackets, the fraction of the byte bound (the
optimum for any whole-file policy, docs/trace-format.md). Deterministic:
the traces come from fixed seeds, so no repetitions are needed.

    .venv/bin/python bench/sim_table.py
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from aattsfs.policy import POLICIES, make_policy  # noqa: E402
from aattsfs.sim import belady_min, byte_bound, simulate  # noqa: E402
from aattsfs.tracegen import PATTERNS  # noqa: E402
from cold_start import update_doc  # noqa: E402


def main() -> None:
    names = sorted(POLICIES)
    lines = ["Budget = half the working set; byte hit ratio (fraction of the byte bound).",
             "", "Reproduce: `.venv/bin/python bench/sim_table.py`", "",
             "| pattern | opens | " + " | ".join(names) + " | MIN (equal sizes) | byte bound |",
             "|---|---:|" + "---:|" * (len(names) + 2)]
    for pattern, gen in PATTERNS.items():
        trace = gen()
        budget = sum({r.path: r.size for r in trace}.values()) // 2
        bound = byte_bound(trace, budget)
        cells = []
        for name in names:
            r = simulate(trace, budget, make_policy(name))
            cells.append(f"{r.byte_hit_ratio:.3f} ({r.byte_hit_ratio / bound.byte_hit_ratio:.2f})"
                         if bound.byte_hit_ratio else f"{r.byte_hit_ratio:.3f}")
        sizes = {r.size for r in trace}
        mn = f"{belady_min(trace, budget // sizes.pop()).hit_ratio:.3f}" \
            if len(sizes) == 1 else "—"
        lines.append(f"| {pattern} | {len(trace)} | " + " | ".join(cells) +
                     f" | {mn} | {bound.byte_hit_ratio:.3f} |")
    section = "\n".join(lines) + "\n"
    update_doc(section, "sim_table")
    print(section)


if __name__ == "__main__":
    main()
