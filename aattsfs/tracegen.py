"""Synthetic access traces for the simulator: the seed patterns of the
design notes. Each generator is deterministic for a given seed and returns
the opens as `Request`s; `write_trace` turns them into the JSON-lines format
the daemon exports (docs/trace-format.md).
"""

from __future__ import annotations

import json
import random
from typing import Callable, TextIO

from .sim import Request

MiB = 1 << 20


def _files(n: int, size: int, prefix: str = "f") -> list[Request]:
    return [Request(f"{prefix}{i:04d}", size) for i in range(n)]


def sequential(n: int = 200, size: int = 4 * MiB, seed: int = 0) -> list[Request]:
    """One scan, each file opened twice in a row (as loaders do: check, then read)."""
    return [r for f in _files(n, size) for r in (f, f)]


def loop(n: int = 40, size: int = 4 * MiB, passes: int = 10, seed: int = 0) -> list[Request]:
    """The same files in the same order, over and over."""
    return _files(n, size) * passes


def uniform(n: int = 100, size: int = 4 * MiB, length: int = 4000,
            seed: int = 0) -> list[Request]:
    rng = random.Random(seed)
    files = _files(n, size)
    return [rng.choice(files) for _ in range(length)]


def hotspot(n: int = 200, size: int = 4 * MiB, length: int = 4000, alpha: float = 1.1,
            seed: int = 0) -> list[Request]:
    """Zipf popularity: a few files take most of the opens."""
    rng = random.Random(seed)
    files = _files(n, size)
    weights = [1 / (i + 1) ** alpha for i in range(n)]
    return rng.choices(files, weights, k=length)


def burst(n: int = 200, size: int = 4 * MiB, length: int = 4000, group: int = 10,
          burst_len: int = 100, seed: int = 0) -> list[Request]:
    """Bursts of opens within a small group of files; the group moves on."""
    rng = random.Random(seed)
    files = _files(n, size)
    out: list[Request] = []
    while len(out) < length:
        start = rng.randrange(n - group)
        out += [rng.choice(files[start:start + group]) for _ in range(burst_len)]
    return out[:length]


def pipeline(models: int = 6, shards: int = 4, shard_size: int = 64 * MiB,
             loads: int = 120, p: float = 0.9, seed: int = 0) -> list[Request]:
    """Model rotation: each load opens a model directory's config, index and
    shards in order; the next model is a fixed successor with probability p,
    any other model otherwise."""
    rng = random.Random(seed)
    out: list[Request] = []
    current = 0
    for _ in range(loads):
        d = f"model{current}"
        out += [Request(f"{d}/config.json", 1024),
                Request(f"{d}/model.safetensors.index.json", 16 * 1024)]
        out += [Request(f"{d}/model-{s + 1:05d}-of-{shards:05d}.safetensors",
                        shard_size + s * MiB) for s in range(shards)]
        current = (current + 1) % models if rng.random() < p else rng.randrange(models)
    return out


def pertensor(layers: int = 24, passes: int = 6, seed: int = 0) -> list[Request]:
    """One file per tensor, read layer by layer (attention, then MLP), pass
    after pass; sizes as in a transformer block."""
    kinds = [("ln1", MiB // 64), ("qkv", 12 * MiB), ("proj", 4 * MiB),
             ("ln2", MiB // 64), ("fc", 16 * MiB), ("fc_proj", 16 * MiB)]
    one = [Request(f"layer{layer:03d}/{name}.pt", size)
           for layer in range(layers) for name, size in kinds]
    return one * passes


# Noisy patterns: real loaders are not as clean as the seed patterns above.

def pertensor_skips(layers: int = 24, passes: int = 6, skip: float = 0.05,
                    seed: int = 0) -> list[Request]:
    """Per-tensor files pass after pass, each file skipped with probability
    `skip` in each pass (a layer frozen, a tensor tied, a cached shard)."""
    rng = random.Random(seed)
    one = pertensor(layers, 1)
    return [r for _ in range(passes) for r in one if rng.random() >= skip]


def _model_load(d: str, shards: int, shard_size: int, stream) -> list[Request]:
    """What one fresh loader process opens: the config, the tokenizer files
    and the index around the shards, as transformers does."""
    small = [Request(f"{d}/config.json", 1024, stream),
             Request(f"{d}/tokenizer_config.json", 2048, stream),
             Request(f"{d}/tokenizer.json", 2 * MiB, stream),
             Request(f"{d}/model.safetensors.index.json", 16 * 1024, stream)]
    big = [Request(f"{d}/model-{s + 1:05d}-of-{shards:05d}.safetensors",
                   shard_size + s * MiB, stream) for s in range(shards)]
    return [*small[:1], *small[3:], *big, small[0], *small[1:3], Request(
        f"{d}/generation_config.json", 512, stream)]


def rotation(models: int = 8, shards: int = 3, shard_size: int = 48 * MiB,
             loads: int = 160, p: float = 0.75, seed: int = 0) -> list[Request]:
    """A rotation of models, each load a fresh process (its own stream);
    the next model is the fixed successor with probability p, another one
    otherwise; small files opened around the shards."""
    rng = random.Random(seed)
    out: list[Request] = []
    current = 0
    for n in range(loads):
        out += _model_load(f"model{current}", shards, shard_size, (n, None))
        current = (current + 1) % models if rng.random() < p else rng.randrange(models)
    return out


def interleaved(models: int = 8, shards: int = 3, shard_size: int = 48 * MiB,
                loads: int = 160, p: float = 0.75, seed: int = 0) -> list[Request]:
    """Two rotations over different halves of the models, their loads
    running side by side: the opens of two processes interleave at random."""
    rng = random.Random(seed)
    half = models // 2
    lanes = [rotation(half, shards, shard_size, loads // 2, p, seed + k) for k in (1, 2)]
    for k, lane in enumerate(lanes):  # tell the lanes' files and streams apart
        lane[:] = [Request(f"{'ab'[k]}{r.path}", r.size, (k, r.stream)) for r in lane]
    out = []
    while any(lanes):
        lane = rng.choice([lane for lane in lanes if lane])
        out.append(lane.pop(0))
    return out


PATTERNS: dict[str, Callable[..., list[Request]]] = {
    "sequential": sequential, "loop": loop, "random": uniform, "hotspot": hotspot,
    "burst": burst, "pipeline": pipeline, "pertensor": pertensor,
    "pertensor-skips": pertensor_skips, "rotation": rotation, "interleaved": interleaved,
}


def write_trace(trace: list[Request], out: TextIO) -> None:
    """Generated opens carry no time ("t" 0: one right after the other), and
    each stream becomes a process (pid 1, 2, ... started at 0)."""
    pids: dict = {}
    for r in trace:
        ev = {"t": 0.0 if r.t is None else r.t, "op": "open", "path": r.path, "size": r.size}
        if r.stream is not None:
            ev.update(pid=pids.setdefault(r.stream, len(pids) + 1), start=0.0)
        out.write(json.dumps(ev) + "\n")
