"""Random 4 KiB reads from one file, in this (fresh) process: `pread` at
block-aligned offsets from a fixed seed, so every target reads the same
blocks. Prints one JSON line: {"seconds": ..., "reads": N}.

    python bench/randread.py FILE [N]
"""

import json
import os
import random
import sys
import time

BLOCK = 4096


def main(path: str, n: int = 16384) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        blocks = os.fstat(fd).st_size // BLOCK
        offsets = [b * BLOCK for b in random.Random(0).choices(range(blocks), k=n)]
        t0 = time.perf_counter()
        for off in offsets:
            if len(os.pread(fd, BLOCK, off)) != BLOCK:
                raise SystemExit(f"short read at {off}")
        seconds = time.perf_counter() - t0
    finally:
        os.close(fd)
    print(json.dumps({"seconds": seconds, "reads": n}))


if __name__ == "__main__":
    main(sys.argv[1], *map(int, sys.argv[2:3]))
