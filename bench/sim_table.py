"""Every eviction policy and predictor on every seed pattern, against the
offline optimum.

Budget: half of each trace's working set (the bytes of its distinct files).
Deterministic (traces from fixed seeds), so no repetitions are needed.

    .venv/bin/python bench/sim_table.py
"""

from __future__ import annotations


import benchenv  # noqa: F401 (the import path)

from aattsfs.learn import Learner
from aattsfs.policy import make_admission, make_policy
from aattsfs.sim import belady_min, byte_bound, simulate
from aattsfs.tracegen import PATTERNS
from harness import update_doc

# (column, policy, admission, predictor); the mount's default is LRU + reuse
DEMAND = [("LRU", "lru", "all", None), ("LFU", "lfu", "all", None),
          ("2Q", "2q", "all", None), ("LRU + TinyLFU", "lru", "tinylfu", None),
          ("**LRU + reuse**", "lru", "reuse", None),
          ("predictive + Markov", "predictive", "all", "markov"),
          ("predictive + Markov + reuse", "predictive", "reuse", "markov"),
          ("predictive + PPM + reuse", "predictive", "reuse", "ppm")]
BANDWIDTH = 200e6  # bytes a second of the cold tier, with prefetch (as in the suite)
PREFETCH = [("LRU + reuse, no prefetch", "lru", "reuse", None),
            ("LRU + Markov prefetch", "lru", "all", "markov"),
            ("**LRU + reuse + Markov prefetch**", "lru", "reuse", "markov"),
            ("predictive + reuse + Markov prefetch", "predictive", "reuse", "markov")]


def main() -> None:
    head = ["pattern", "opens", *[name for name, _, _, _ in DEMAND], "optimum"]
    demand = ["Byte hit ratio, and in brackets its fraction of the optimum: MIN where all "
              "files have one size, the byte bound otherwise (docs/trace-format.md). "
              "Budget = half the working set; demand caching only.", "",
              "Reproduce: `.venv/bin/python bench/sim_table.py`", "",
              "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    head2 = ["pattern", *[name for name, _, _, _ in PREFETCH]]
    prefetch = ["", "With prefetch (stage the forecast files more likely needed than not, "
                "up to the budget), through a cold tier of 200 MB/s, opens back to back "
                "(docs/trace-format.md): bytes read from the cold tier relative to the "
                "optimum's; the replay's time relative to reading every open directly; "
                "prefetch precision / recall. Hit ratios are not comparable to the optimum's "
                "here, since staged files hit before they were ever asked for.", "",
                "| " + " | ".join(head2) + " |", "|---|" + "---:|" * (len(head2) - 1)]
    for pattern, gen in PATTERNS.items():
        trace = gen()
        budget = sum({r.path: r.size for r in trace}.values()) // 2
        sizes = {r.size for r in trace}
        opt = belady_min(trace, budget // sizes.pop()) if len(sizes) == 1 \
            else byte_bound(trace, budget)
        best = opt.byte_hit_ratio
        cells = []
        for _, policy, admission, pred in DEMAND:
            r = simulate(trace, budget, make_policy(policy),
                         Learner(pred) if pred else None, prefetch=False,
                         admission=make_admission(admission, budget))
            frac = f" ({r.byte_hit_ratio / best:.2f})" if best else ""
            cells.append(f"{r.byte_hit_ratio:.3f}{frac}")
        demand.append(f"| {pattern} | {len(trace)} | " + " | ".join(cells) +
                      f" | {best:.3f} |")
        cells = []
        for _, policy, admission, pred in PREFETCH:
            r = simulate(trace, budget, make_policy(policy), Learner(pred) if pred else None,
                         admission=make_admission(admission, budget),
                         cold_bandwidth=BANDWIDTH)
            cells.append(f"{r.cold_bytes / opt.cold_bytes:.2f}x, {r.slowdown:.2f}x" +
                         (f", {r.precision:.2f} / {r.recall:.2f}" if pred else ""))
        prefetch.append(f"| {pattern} | " + " | ".join(cells) + " |")
    section = "\n".join(demand + prefetch) + "\n"
    update_doc(section, "sim_table")
    print(section)


if __name__ == "__main__":
    main()
