"""The files the benchmark workloads read, generated locally (no network) and
kept under work/bench/src between runs. Each builder is idempotent: a
`.complete` marker written last says the directory is whole."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Callable

MTIME_BASE = 1_700_000_000  # many_files: file k is MTIME_BASE + k seconds old


def _build(dest: Path, make: Callable[[Path], None]) -> Path:
    if not (dest / ".complete").exists():
        print(f"bench: generating {dest.name} ...", flush=True)
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        make(dest)
        (dest / ".complete").touch()
    return dest


def sharded_model(dest: Path, layers: int, width: int, shard: str, seed: int = 0,
                  vocab: int = 50257) -> Path:
    """A GPT-2-shaped transformers model with random weights, saved by
    `save_pretrained` in safetensors shards with an index."""
    import modelgen
    return _build(dest, lambda d: modelgen.gpt2(d, layers, width, vocab=vocab, shard=shard,
                                                seed=seed))


def per_tensor(dest: Path, layers: int, width: int) -> Path:
    """One torch.save file per tensor, named in layer order."""
    import modelgen
    return _build(dest, lambda d: modelgen.pertensor(d, layers, width))


def many_files(dest: Path, dirs: int, per_dir: int) -> Path:
    """dirs x per_dir small files (0.5-4 KiB); modification times one second
    apart, so `find -newer` of the middle file selects half of them."""
    def make(root: Path) -> None:
        rng = random.Random(0)
        for d in range(dirs):
            sub = root / f"d{d:03d}"
            sub.mkdir()
            for f in range(per_dir):
                path = sub / f"f{f:03d}.txt"
                path.write_bytes(rng.randbytes(rng.randint(512, 4096)))
                t = MTIME_BASE + d * per_dir + f
                os.utime(path, (t, t))
    return _build(dest, make)


def middle_file(root: Path, dirs: int, per_dir: int) -> Path:
    return root / f"d{dirs // 2:03d}" / "f000.txt"


def blob(dest: Path, size: int) -> Path:
    """One file of `size` random bytes, `dest/blob`."""
    def make(root: Path) -> None:
        with open(root / "blob", "wb") as f:
            for _ in range(size >> 24):
                f.write(os.urandom(1 << 24))
    return _build(dest, make)
