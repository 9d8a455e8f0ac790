"""Load a model with unmodified library code in this (fresh) process and
print one JSON line: {"seconds": load time, "digest": hash of the output}.

The clock starts after the imports and stops only once every parameter was
touched, because weights loaded through mmap are read lazily.

    python scripts/loadmodel.py hf PATH          # from_pretrained + one forward pass
    python scripts/loadmodel.py sentence PATH    # sentence-transformers encode
    python scripts/loadmodel.py pertensor PATH   # torch.load of every *.pt file, in order
"""

import hashlib
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

SENTENCES = ["aattsfs stages model weights before the loader asks for them.",
             "The quick brown fox jumps over the lazy dog."]


def touch(tensors) -> float:
    return float(sum(t.float().sum().item() for t in tensors))


def main(kind: str, path: str) -> None:
    torch.manual_seed(0)
    if kind == "hf":
        # transformers imports a model's code lazily, inside from_pretrained
        # (seconds here): the models loaded here are GPT-2-shaped, so import
        # it before the clock, which times the loading alone
        import transformers.models.gpt2.modeling_gpt2  # noqa: F401
        from transformers import AutoModelForCausalLM
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(path)
        touch(model.parameters())
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            out = model(torch.arange(16).unsqueeze(0)).logits
    elif kind == "sentence":
        import transformers.models.bert.modeling_bert  # noqa: F401 (as above: MiniLM is BERT)
        from sentence_transformers import SentenceTransformer
        t0 = time.perf_counter()
        model = SentenceTransformer(path, device="cpu")
        touch(model.parameters())
        seconds = time.perf_counter() - t0
        out = torch.from_numpy(model.encode(SENTENCES))
    elif kind == "pertensor":
        t0 = time.perf_counter()
        tensors = [torch.load(os.path.join(path, n), weights_only=True)
                   for n in sorted(os.listdir(path)) if n.endswith(".pt")]
        touch(tensors)
        seconds = time.perf_counter() - t0
        out = torch.cat([t.flatten().float() for t in tensors])
    else:
        raise SystemExit(f"unknown kind {kind!r}")
    digest = hashlib.sha256(out.contiguous().numpy().tobytes()).hexdigest()[:16]
    print(json.dumps({"seconds": seconds, "digest": digest}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
