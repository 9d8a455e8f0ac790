"""Unmodified model-loading code through the mount: the same tensors as a
load from the cold directory, on the first (promoting) read and after."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import modelgen  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def model_cold(tmp_path_factory):
    cold = tmp_path_factory.mktemp("models") / "cold"
    modelgen.minilm(cold / "minilm")
    modelgen.gpt2(cold / "gpt2", layers=2, width=128, shard="300KB")
    modelgen.pertensor(cold / "pertensor", layers=2, width=64)
    return cold


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys() and a
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def all_fast(m, rel_dir):
    return all(m.tier(f"{rel_dir}/{n}") == "fast" for n in os.listdir(m.path(rel_dir)))


def test_sharded_layout_is_real(model_cold):
    shards = sorted(p.name for p in (model_cold / "gpt2").glob("*.safetensors"))
    assert len(shards) >= 3
    assert (model_cold / "gpt2" / "model.safetensors.index.json").exists()


def test_safetensors_mmap(model_cold, mounter):
    from safetensors import safe_open
    from safetensors.torch import load_file

    m = mounter(model_cold)
    rel = "minilm/model.safetensors"
    want = load_file(model_cold / rel)
    for _ in range(2):  # first: while promoting; then from the fast tier
        assert_same_tensors(load_file(m.path(rel)), want)
        m.wait_tier(rel)
    with safe_open(m.path(rel), "pt") as f:  # lazy, mmap-backed access
        name = sorted(f.keys())[len(want) // 2]
        assert torch.equal(f.get_tensor(name), want[name])


def test_torch_load_per_tensor_files(model_cold, mounter):
    m = mounter(model_cold)
    names = sorted(os.listdir(model_cold / "pertensor"))
    for mmap in (False, True):
        got = {n: torch.load(m.path(f"pertensor/{n}"), mmap=mmap, weights_only=True)
               for n in names}
        want = {n: torch.load(model_cold / "pertensor" / n, weights_only=True) for n in names}
        assert_same_tensors(got, want)
    assert all_fast(m, "pertensor")


def test_from_pretrained_sharded(model_cold, mounter):
    from transformers import AutoModelForCausalLM

    m = mounter(model_cold)
    want = AutoModelForCausalLM.from_pretrained(model_cold / "gpt2").state_dict()
    first = AutoModelForCausalLM.from_pretrained(m.path("gpt2"))
    assert_same_tensors(first.state_dict(), want)
    assert m.stats()["opens"]["cold"] > 0
    from conftest import wait_for
    wait_for(lambda: all_fast(m, "gpt2"), what="every gpt2 file in the fast tier")
    second = AutoModelForCausalLM.from_pretrained(m.path("gpt2"))
    assert_same_tensors(second.state_dict(), want)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(second(ids).logits, first(ids).logits)


def test_sentence_transformers_encode(model_cold, mounter):
    from sentence_transformers import SentenceTransformer

    m = mounter(model_cold)
    sentences = ["a tiered filesystem for model weights", "the cat sat on the mat"]
    want = SentenceTransformer(str(model_cold / "minilm"), device="cpu").encode(sentences)
    got = SentenceTransformer(str(m.path("minilm")), device="cpu").encode(sentences)
    assert got.shape == (2, 384)
    assert (got == want).all()


def _tiers(m, rel_dir):
    return {n: m.tier(f"{rel_dir}/{n}") for n in os.listdir(m.path(rel_dir))
            if os.path.getsize(m.path(f"{rel_dir}/{n}"))}


def test_opening_config_stages_the_shards(model_cold, mounter):
    from conftest import wait_for
    m = mounter(model_cold)
    with open(m.path("gpt2/config.json"), "rb"):
        pass  # opened, not even read
    shards = [n for n in os.listdir(model_cold / "gpt2") if n.endswith(".safetensors")]
    wait_for(lambda: all(m.tier(f"gpt2/{n}") == "fast" for n in shards),
             what="the shards to be staged")
    assert m.tier("gpt2/model.safetensors.index.json") == "fast"
    assert m.tier("gpt2/generation_config.json") == "cold"  # not predicted
    s = m.stats()
    assert s["prefetch"]["prefetches"] == len(shards) + 1
    assert s["reads"]["cold"] == 0 and s["bytes_served"]["fast"] == 0


def test_a_shard_still_being_written_is_not_staged(model_cold, tmp_path, mounter):
    import shutil
    cold = tmp_path / "cold"
    shutil.copytree(model_cold / "gpt2", cold / "gpt2")
    shards = sorted(p.name for p in (cold / "gpt2").glob("*.safetensors"))
    partial = cold / "gpt2" / shards[-1]
    os.truncate(partial, partial.stat().st_size // 2)
    m = mounter(cold)
    with open(m.path("gpt2/config.json"), "rb"):
        pass
    from conftest import wait_for
    wait_for(lambda: all(m.tier(f"gpt2/{n}") == "fast" for n in shards[:-1]),
             what="the complete shards to be staged")
    assert m.tier(f"gpt2/{shards[-1]}") == "cold"
    assert "not staging gpt2/" in m.log.read_text()


def test_pushed_pages_serve_the_next_process_without_the_daemon(model_cold, mounter):
    from conftest import sha256, wait_for
    m = mounter(model_cold, extra=["--push-page-cache", "--passthrough", "off"])
    names = sorted(os.listdir(model_cold / "gpt2"))
    for n in names:
        os.stat(m.path(f"gpt2/{n}"))  # the kernel knows every inode
    with open(m.path("gpt2/config.json"), "rb"):
        pass  # stages the index and the shards, and pushes them
    staged = [n for n in names if n.endswith((".safetensors", ".index.json"))]
    size = sum(os.path.getsize(model_cold / "gpt2" / n) for n in staged)
    wait_for(lambda: m.stats()["prefetch"]["pushed_bytes"] >= size, what="the push")
    before = m.stats()["bytes_served"]
    for n in staged:  # what a fresh process reads: the pushed pages, the same bytes
        assert sha256(m.path(f"gpt2/{n}")) == sha256(model_cold / "gpt2" / n)
    assert m.stats()["bytes_served"] == before  # not one read reached the daemon


def test_no_prefetch_stages_nothing(model_cold, mounter):
    m = mounter(model_cold, extra=["--no-prefetch"])
    with open(m.path("gpt2/config.json"), "rb") as f:
        f.read()
    m.wait_tier("gpt2/config.json")
    assert m.stats()["prefetch"]["prefetches"] == 0
    assert m.tier("gpt2/model.safetensors.index.json") == "cold"


def test_a_model_larger_than_the_budget_loads_with_what_fits_staged(model_cold, mounter):
    from transformers import AutoModelForCausalLM

    budget = 500 << 10  # a fraction of the gpt2 shards together
    m = mounter(model_cold, fast_size=str(budget))
    want = AutoModelForCausalLM.from_pretrained(model_cold / "gpt2").state_dict()
    got = AutoModelForCausalLM.from_pretrained(m.path("gpt2")).state_dict()
    assert_same_tensors(got, want)
    s = m.stats()
    assert s["prefetch"]["prefetches"] > 0  # the first shards, as far as they fit
    assert s["fast_tier"]["used_bytes"] <= budget


HUB_LOAD = """
import hashlib, json, sys
from transformers import AutoModelForCausalLM
from sentence_transformers import SentenceTransformer
gpt2 = AutoModelForCausalLM.from_pretrained("acme/tiny-gpt2")
st = SentenceTransformer("acme/minilm", device="cpu")
print(json.dumps({
    "gpt2": hashlib.sha256(b"".join(p.detach().numpy().tobytes()
                                    for p in gpt2.parameters())).hexdigest(),
    "minilm": hashlib.sha256(st.encode(["a tiered filesystem"]).tobytes()).hexdigest()}))
"""


def test_models_load_by_name_from_a_hub_cache_on_the_read_only_mount(model_cold, tmp_path,
                                                                       mounter):
    """HF_HUB_CACHE pointing at the mount of a hub cache, offline: from_pretrained
    and SentenceTransformer load by repository name through the snapshots'
    links, the same weights as from the cold cache, and nothing is written
    anywhere in the cache (docs/huggingface.md). The blobs are known by the
    snapshot names they were opened by: the format hints fire on the first
    load, and the listings show the names."""
    import json
    import subprocess
    from conftest import manifest, run_cli
    cache = tmp_path / "hub"
    modelgen.hub_cache(cache, model_cold / "gpt2", "acme/tiny-gpt2", "a" * 40)
    modelgen.hub_cache(cache, model_cold / "minilm", "acme/minilm", "b" * 40)
    before = manifest(cache)
    m = mounter(cache)

    def load(hub: Path) -> dict:
        env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path / "home"),
               "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
        out = subprocess.run([sys.executable, "-c", HUB_LOAD], env=env, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    want = load(cache)
    assert load(m.path()) == want
    # nothing was learned before: what was staged ahead, the hints staged
    # from the snapshot's config.json and index, which the loader opened as blobs
    assert m.stats()["prefetch"]["prefetches"] > 0
    snapshot = f"models--acme--tiny-gpt2/snapshots/{'a' * 40}"
    rows = [line.split("\t") for line in m.path(".aatts/tiers").read_text().splitlines()[1:]]
    names = {row[6]: row[5] for row in rows}
    index = json.loads((model_cold / "gpt2" / "model.safetensors.index.json").read_text())
    for name in ["config.json", *set(index["weight_map"].values())]:
        blob = os.path.realpath(cache / snapshot / name)
        assert names[f"{snapshot}/{name}"] == os.path.relpath(blob, cache)
    assert f"{snapshot}/config.json" in run_cli("status", m.path()).stdout
    # warm of the model directory means its refs/main snapshot
    run_cli("warm", m.path("models--acme--tiny-gpt2"))
    blobs = os.listdir(cache / "models--acme--tiny-gpt2" / "blobs")
    assert all(m.tier(f"models--acme--tiny-gpt2/blobs/{b}") == "fast" for b in blobs)
    assert load(m.path()) == want
    m.stop()
    assert manifest(cache) == before
