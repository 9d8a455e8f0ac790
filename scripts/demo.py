"""`make demo`: what aattsfs is for, in three short acts (a few minutes).

The models sit on a slow cold tier, as on an inference box whose models live
on an HDD, NFS or a network volume: an ext4 image on a loop device whose
reads pass a blkio throttle (bench/slowcold.py) at 200 MB/s. `DEMO_COLD=local`
reads the local disk instead, for comparison; `DEMO_MBPS=N` sets the rate.

1. Cold start of a sharded model: a direct load from the cold tier beside a
   first load through aattsfs, whose format hints stage the shards while the
   model is being built.
2. The same model again after a page-cache drop: served from the fast tier.
3. A rotation of generated models through a fast tier that holds about half
   of them, twice: aattsfs with its prefetcher beside LRU only. On the second
   pass the prefetcher stages each next model while the box is idle, from
   the order the first pass taught it.

Every load is a fresh process after a page-cache drop, and every output is
checked identical to the direct load. Whatever happens (Ctrl-C included),
nothing stays mounted, attached or throttled. `--scale tiny` runs the same
code on tiny models (the test suite does).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "bench"), str(REPO / "scripts"), str(REPO)]
import benchenv  # noqa: E402,F401  (quiet loaders)
import datasets  # noqa: E402
import peers  # noqa: E402
from harness import cli, drop_caches, load, stats, wait_promotions  # noqa: E402
from slowcold import BLKIO, SlowCold  # noqa: E402

from aattsfs.units import format_size  # noqa: E402

os.environ["TQDM_DISABLE"] = "1"
# the GPT-2-shaped models (bench/datasets.py); the rotation's are smaller, and
# one more number says how many there are
SCALES = {
    "full": {"sharded": dict(layers=8, width=768, shard="100MB"),
             "rotation": (3, dict(layers=4, width=768, vocab=8192, shard="64MB")),
             "think": 2.0},
    "tiny": {"sharded": dict(layers=2, width=64, vocab=1000, shard="100KB"),
             "rotation": (1, dict(layers=2, width=64, vocab=1000, shard="100KB")),
             "think": 0.2},
}
HOLDS = 0.55  # the rotation's fast tier: about half of its models (tmpfs rounds up)


def say(text: str = "") -> None:
    print(text, flush=True)


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def ratio(x: float, base: float) -> str:
    return f"{x / base:.2f}x" if base else "-"


class Demo:
    def __init__(self, scale: str, cold_kind: str, mbps: int) -> None:
        self.scale = SCALES[scale]
        self.work = REPO / "work" / ("demo" if scale == "full" else f"demo-{scale}")
        self.fast = Path(f"/dev/shm/aattsfs-demo-{scale}")
        self.cold_kind, self.mbps = cold_kind, mbps
        self.ok = True
        self.stack = ExitStack()
        self.stack.callback(shutil.rmtree, self.fast, True)  # runs last

    # --- set-up -----------------------------------------------------------

    def build(self) -> tuple[Path, list[Path]]:
        src = self.work / "src"
        sharded = datasets.sharded_model(src / "sharded", **self.scale["sharded"])
        n, shape = self.scale["rotation"]
        rotation = [datasets.sharded_model(src / "rotation" / f"model-{i}", **shape, seed=i + 1)
                    for i in range(n)]
        return sharded, rotation

    def cold_tier(self, sources: list[Path]):
        """The cold directory and the wrapper that puts a process under its
        throttle (for the direct loads and the daemons)."""
        if self.cold_kind == "local":
            return sources[0].parent, list, None
        if not BLKIO.is_dir():
            raise SystemExit(f"aattsfs demo: the emulated slow tier needs the cgroup-v1 blkio "
                             f"controller ({BLKIO}), which this box does not have; "
                             "DEMO_COLD=local runs the demo on the local disk")
        need = sum(tree_bytes(s) for s in sources)
        try:
            slow = self.stack.enter_context(
                SlowCold(self.work, size_mb=max(64, int(need * 1.3) >> 20) + 64,
                         read_mbps=self.mbps))
        except (subprocess.CalledProcessError, OSError) as exc:
            detail = getattr(exc, "stderr", None) or exc
            raise SystemExit(f"aattsfs demo: cannot set up the emulated slow tier "
                             f"({str(detail).strip()}); DEMO_COLD=local runs the demo on "
                             "the local disk") from None
        for s in sources:
            slow.fill(s, s.relative_to(self.work / "src").as_posix())
        return slow.mnt, slow.wrap, slow

    def mount(self, cold: Path, wrap, name: str, budget: int, options=()) -> peers.Aattsfs:
        target = peers.Aattsfs(cold, wrap, name, list(options), work=self.work,
                               fast=self.fast / name)
        self.stack.callback(target.stop)
        target.start(budget)
        return target

    # --- the loads --------------------------------------------------------

    def load(self, path: Path, wrap, reference: dict | None) -> dict:
        drop_caches()
        result = load("hf", path, wrap)
        if reference is not None and result["digest"] != reference["digest"]:
            self.ok = False
            result["output"] = "DIFFERENT"
        else:
            result["output"] = "identical" if reference is not None else "reference"
        return result

    def run(self) -> None:
        say(__doc__.split("\n\n")[1].replace("\n", " ") if self.cold_kind == "slow" else
            "The cold tier is the local disk (DEMO_COLD=local): no throttle.")
        sharded_src, rotation_src = self.build()
        cold, wrap, slow = self.cold_tier([sharded_src, *rotation_src])
        where = (f"a loop device throttled to {self.mbps} MB/s" if slow else "the local disk")
        say(f"cold tier: {where}; every load a fresh process, page cache dropped first.\n")
        self.act1_and_2(cold / "sharded", wrap)
        self.act3(cold / "rotation", wrap, slow)
        say("\nFor the full comparison with bindfs, rclone and JuiceFS on the same "
            "slow tier: make bench (about an hour; make bench-quick: minutes).")

    def act1_and_2(self, model: Path, wrap) -> None:
        size = tree_bytes(model)
        files = sum(1 for p in model.iterdir() if p.is_file())
        say(f"act 1: cold start of a sharded model ({format_size(size)} in {files} files: "
            "GPT-2 config, random weights)")
        direct = self.load(model, wrap, None)
        target = self.mount(model.parent, wrap, "act1", 2 * size)
        before = stats(target.mnt)
        first = self.load(target.mnt / model.name, list, direct)
        after = stats(target.mnt)
        hinted = after["prefetch"]["prefetched_bytes"] - before["prefetch"]["prefetched_bytes"]
        say(f"  direct from the cold tier        {ratio(direct['seconds'], direct['seconds']):>6}"
            f"  (the baseline)")
        say(f"  first load through aattsfs       {ratio(first['seconds'], direct['seconds']):>6}"
            f"  output {first['output']}; format hints staged {format_size(hinted)} "
            "while the model was built")
        say("  (a first load reads every byte from the cold tier once, either way: its "
            "bandwidth bounds both)")

        target.settle()
        second = self.load(target.mnt / model.name, list, direct)
        s = stats(target.mnt)
        pt = s["passthrough"]
        how = (f"{pt['opens'] - after['passthrough']['opens']} opens in kernel passthrough "
               "(reads never reach the daemon)" if pt["active"] else
               f"no passthrough ({pt['reason']}): served by the daemon")
        say("\nact 2: the same model again, page cache dropped")
        say(f"  load from the fast tier          {ratio(second['seconds'], direct['seconds']):>6}"
            f"  output {second['output']}; {how}")
        say(f"  the fast tier (tmpfs, RAM) holds {format_size(s['fast_tier']['used_bytes'])} of its "
            f"{format_size(s['fast_tier']['budget_bytes'])} budget")
        target.stop()

    def act3(self, root: Path, wrap, slow: SlowCold | None) -> None:
        names = [f"model-{i}" for i in range(self.scale["rotation"][0])]
        sizes = [tree_bytes(root / n) for n in names]
        budget = int(sum(sizes) * HOLDS)
        think = self.scale["think"]
        say(f"\nact 3: a rotation of {len(names)} models ({format_size(sizes[0])} each) through "
            f"a fast tier of {format_size(budget)} (about half of them), twice; "
            f"{think:g} s idle between requests")
        direct = {n: self.load(root / n, wrap, None) for n in names}
        say(f"{'':<27}{'pass 1 (learning)':>30}{'pass 2 (learned)':>30}")
        columns = f"{'load vs direct':>16}{'staged ahead':>14}"
        say(f"{'':<27}{columns}{columns}")
        last = None
        for label, name, options in (("LRU only (--no-prefetch)", "lru", ["--no-prefetch"]),
                                     ("aattsfs (default)", "default", [])):
            target = self.mount(root, wrap, name, budget, options)
            cells = []
            for _ in range(2):
                missed0 = stats(target.mnt)["prefetch"]["demand_miss_bytes"]
                seconds = 0.0
                for n in names:
                    time.sleep(think)
                    seconds += self.load(target.mnt / n, list, direct[n])["seconds"]
                # what the loaders found in the fast tier, or on its way, when
                # they opened it: staged ahead of them
                missed = stats(target.mnt)["prefetch"]["demand_miss_bytes"] - missed0
                staged = max(0.0, 1 - missed / sum(sizes))
                cells.append(f"{ratio(seconds, sum(d['seconds'] for d in direct.values())):>16}"
                             f"{staged:>14.0%}")
            say(f"  {label:<25}{''.join(cells)}")
            last = target
        s = stats(last.mnt)
        say(f"  (the default's prefetcher staged {format_size(s['prefetch']['prefetched_bytes'])}"
            f", of which {format_size(s['prefetch']['used_bytes'])} was opened; outputs "
            f"{'identical to the direct loads' if self.ok else 'DIFFERENT'})")
        shard = sorted((last.mnt / names[-1]).glob("*.safetensors"))[0]
        say(f"\n$ getfattr -d {shard.relative_to(REPO)}")
        say(subprocess.run(["getfattr", "-d", "--absolute-names", str(shard)],
                           capture_output=True, text=True).stdout.strip())
        say(f"\n$ aattsfs status {last.mnt.relative_to(REPO)}")
        say(cli("status", last.mnt).rstrip())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", choices=sorted(SCALES), default="full")
    scale = ap.parse_args().scale
    cold_kind = os.environ.get("DEMO_COLD", "slow")
    if cold_kind not in ("slow", "local"):
        raise SystemExit("aattsfs demo: DEMO_COLD must be 'slow' (the default) or 'local'")
    try:
        mbps = int(os.environ.get("DEMO_MBPS", "200"))
        assert mbps > 0
    except (ValueError, AssertionError):
        raise SystemExit("aattsfs demo: DEMO_MBPS must be a positive whole number of MB/s")
    if os.geteuid() != 0:
        raise SystemExit("aattsfs demo: run as root (it mounts, drops the page cache and "
                         "throttles a loop device)")
    # Ctrl-C or a kill: unwind through the clean-up below, which nothing interrupts
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    demo = Demo(scale, cold_kind, mbps)
    try:
        with demo.stack:
            try:
                demo.run()
            finally:
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except KeyboardInterrupt:
        raise SystemExit("\naattsfs demo: interrupted; everything it mounted, attached or "
                         "throttled was undone") from None
    say(f"\nunmounted; the fast tiers ({demo.fast}) were removed to give their RAM back.")
    if not demo.ok:
        raise SystemExit("aattsfs demo: an output through the mount differed from the "
                         "direct load")


if __name__ == "__main__":
    main()
