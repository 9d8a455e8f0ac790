"""Does tier inspection through xattrs slow down `ls -l`?

`ls -l` asks every entry for `security.selinux` and `system.posix_acl_access`;
the kernel caches no "no such attribute" answer, so each would be a round trip
to the daemon. aattsfs answers those namespaces with EOPNOTSUPP, which GNU ls
remembers per device, so it stops asking after the first entry
(docs/inspection.md). This measures `ls -lR` over 20,000 files in 200
directories, through the mount and directly, and counts the xattr system
calls ls makes. Medians of --reps runs, page cache warm (the second listing
onwards), each through-mount figure a ratio to the direct one of the same run.

    .venv/bin/python bench/ls_xattr.py [--reps 5]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import time
from pathlib import Path

from benchenv import WORK

from datasets import many_files
from harness import cli, update_doc


def ls_time(path: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(["ls", "-lR", str(path)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def xattr_calls(path: Path) -> int:
    out = subprocess.run(["strace", "-f", "-c", "-e", "trace=%file,getxattr,lgetxattr,"
                          "listxattr,llistxattr", "-o", "/dev/stderr", "ls", "-lR", str(path)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True).stderr
    return sum(int(m.group(1)) for m in
               re.finditer(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?l?(?:get|list)xattr$",
                           out, re.M))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    cold, mnt = many_files(WORK / "src" / "many-files", 200, 100), WORK / "ls-mnt"
    mnt.mkdir(parents=True, exist_ok=True)
    cli("mount", cold, mnt, "--fast-dir", WORK / "ls-fast", "--state-dir",
            WORK / "ls-state", "--fast-size", "64M")
    try:
        ls_time(mnt), ls_time(cold)  # fill the caches once
        direct, through = [], []
        for _ in range(args.reps):
            direct.append(ls_time(cold))
            through.append(ls_time(mnt))
        calls = {"direct": xattr_calls(cold), "aattsfs": xattr_calls(mnt)}
    finally:
        cli("umount", mnt)
    d, t = statistics.median(direct), statistics.median(through)
    section = (
        f"`ls -lR` over 20,000 files in 200 directories, page cache warm, median of "
        f"{args.reps} runs, interleaved ({time.strftime('%Y-%m-%d')}).\n\n"
        f"Reproduce: `.venv/bin/python bench/ls_xattr.py --reps {args.reps}`\n\n"
        "| target | median s | min | max | xattr syscalls made by ls |\n"
        "|---|---:|---:|---:|---:|\n"
        f"| cold directory, direct | {d:.3f} | {min(direct):.3f} | {max(direct):.3f} | "
        f"{calls['direct']} |\n"
        f"| aattsfs | {t:.3f} | {min(through):.3f} | {max(through):.3f} | "
        f"{calls['aattsfs']} |\n\n"
        f"aattsfs / direct: **{t / d:.2f}x**.\n")
    update_doc(section, "ls_xattr")
    print(section)


if __name__ == "__main__":
    main()
