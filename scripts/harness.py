"""What the demo and the benchmarks both do around a mount: run the aattsfs
command and the model loader in fresh processes, drop the page cache, wait
for promotions, and write measured figures into docs/benchmarks.md.

`wrap` turns a command into one that runs inside the throttled cold tier's
cgroup (bench/slowcold.py); by default commands run as they are.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
Wrap = Callable[[list[str]], list[str]]


def drop_caches() -> bool:
    """Drop the page cache (root only); False if it could not be done."""
    if os.geteuid() != 0:
        return False
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    return True


def require_root() -> None:
    if os.geteuid() != 0:
        raise SystemExit("bench: run as root (it mounts, drops the page cache and sets up a "
                         "cgroup)")


def parse_bench_args(ap: argparse.ArgumentParser) -> argparse.Namespace:
    """A benchmark's arguments (it has --reps), refused unless run as root
    with at least 3 repetitions (figures are medians of 3 or more)."""
    args = ap.parse_args()
    require_root()
    if args.reps < 3:
        raise SystemExit("bench: figures are medians of at least 3 runs; use --reps 3 or more")
    return args


def run(cmd: list[str], wrap: Wrap = list) -> str:
    out = subprocess.run(wrap([str(c) for c in cmd]), capture_output=True, text=True,
                         cwd=REPO)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd[:4]))} ... failed:\n{out.stderr[-2000:]}")
    return out.stdout


def cli(*args, wrap: Wrap = list) -> str:
    """Run the aattsfs command."""
    return run([sys.executable, "-m", "aattsfs", *args], wrap)


def load(kind: str, path: Path, wrap: Wrap = list) -> dict:
    """Time unmodified loading code in a fresh process (scripts/loadmodel.py)."""
    out = run([sys.executable, REPO / "scripts" / "loadmodel.py", kind, path], wrap)
    return json.loads(out.strip().splitlines()[-1])


def stats(mnt: Path) -> dict:
    return json.loads((mnt / ".aatts" / "stats").read_bytes())


def wait_promotions(mnt: Path, timeout: float = 600) -> None:
    """Promotion starts at a file's first read (or a hint) and runs on after
    the loader exits; wait until none is in flight."""
    deadline = time.monotonic() + timeout
    while stats(mnt)["promotions_in_flight"]:
        if time.monotonic() > deadline:
            raise SystemExit(f"promotions still running after {timeout} s")
        time.sleep(0.1)


def publish(key: str, data, section: str) -> None:
    """Write a benchmark's results to bench/results/KEY.{json,md} and its
    section into docs/benchmarks.md."""
    results = REPO / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{key}.json").write_text(json.dumps(data, indent=2) + "\n")
    (results / f"{key}.md").write_text(section)
    update_doc(section, key)
    print(section)


def update_doc(section: str, key: str, doc: Path = REPO / "docs" / "benchmarks.md") -> None:
    """Replace the generated block `key` of docs/benchmarks.md (append it if new)."""
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    if begin not in text:
        text += f"\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    doc.write_text(f"{head}{begin}\n{section}{end}{rest.split(end, 1)[1]}")
