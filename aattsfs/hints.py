"""Model-format hints: which files a loader will read next, from the layout
of a Hugging Face model directory alone.

`from_pretrained` opens `config.json` first, then (seconds later, after
building the model) the index and every shard it lists. Knowing that, the
first open of any of those files predicts the rest. A safetensors header
says where each tensor lies and where the data ends, which tells a complete
shard from one still being written. Plain synchronous code:
the caller passes how to list a directory and read a JSON file, so this
runs the same in the daemon, the simulator and the tests.
"""

from __future__ import annotations

import json
import posixpath
from typing import Callable

INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def is_trigger(rel: str) -> bool:
    """Whether opening rel can predict other files (no I/O)."""
    name = posixpath.basename(rel)
    return name == "config.json" or name in INDEX_NAMES or name.endswith(WEIGHT_SUFFIXES)


def model_files(rel: str, exists: Callable[[str], bool],
                read_json: Callable[[str], dict]) -> list[str]:
    """Files of the model directory that `rel` belongs to, in the order the
    loader reads them, without `rel` itself; [] if rel is not a trigger
    (config.json, an index, or a weights file of a model directory).

    Asks only whether a handful of names exist, never lists the directory:
    this runs on every open of such a file, and a directory may be huge."""
    if not is_trigger(rel):
        return []
    directory, name = posixpath.split(rel)

    def here(n: str) -> str:
        return posixpath.join(directory, n)

    if name != "config.json" and not exists(here("config.json")):
        return []
    index = next((n for n in INDEX_NAMES if n == name or exists(here(n))), None)
    if index is not None:
        weight_map = read_json(here(index)).get("weight_map", {})
        files = [index, *sorted(set(weight_map.values()))]
    else:
        files = list(SINGLE_WEIGHTS)
    if name != "config.json" and name not in files:
        return []  # some other .bin next to a model: no prediction
    return [here(f) for f in files if f != name and exists(here(f))]


SAFETENSORS_MAX_HEADER = 100 << 20  # the format's own limit


def safetensors_layout(read: Callable[[int, int], bytes],
                       size: int) -> list[tuple[str, int, int]]:
    """The tensors of a safetensors file of `size` bytes as (name, start, end)
    file offsets, in file order; `read(offset, length)` reads the file.
    Raises ValueError if the header is malformed or describes data beyond
    the end of the file — a shard still being written, not worth staging."""
    if size < 8:
        raise ValueError("shorter than a safetensors header")
    n = int.from_bytes(read(0, 8), "little")
    if not 2 <= n <= min(size - 8, SAFETENSORS_MAX_HEADER):
        raise ValueError(f"header length {n} out of range")
    try:
        header = json.loads(read(8, n))
        tensors = [(name, 8 + n + info["data_offsets"][0], 8 + n + info["data_offsets"][1])
                   for name, info in header.items() if name != "__metadata__"]
    except (KeyError, TypeError, IndexError, AttributeError) as exc:
        raise ValueError(f"malformed header ({exc!r})") from None
    end = max((e for _, _, e in tensors), default=8 + n)
    if end > size:
        raise ValueError(f"data ends at {end}, past the end of the file ({size})")
    return sorted(tensors, key=lambda t: t[1])
