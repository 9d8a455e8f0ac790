"""Unit tests of the pure parts: sizes, policies, namespace, metadata."""

import json
import os

import lmdb
import pytest

from aattsfs.errors import UserError
from aattsfs.metadata import FileRecord, MetaStore
from aattsfs.namespace import FIRST_DYNAMIC, ROOT, Namespace
from aattsfs.policy import AdmitAll, LFUPolicy, LRUPolicy
from aattsfs.residency import Residency
from aattsfs.tiers import ColdTier, FastTier
from aattsfs.units import format_size, parse_size


@pytest.mark.parametrize("text,value", [("512M", 512 << 20), ("2G", 2 << 30), ("1.5G", 3 << 29),
                                        ("4096", 4096), ("64k", 64 << 10), ("1GiB", 1 << 30)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["0", "-1G", "lots", "", "G", "1X"])
def test_parse_size_rejects(text):
    with pytest.raises(UserError):
        parse_size(text)


def test_format_size():
    assert format_size(512) == "512 B"
    assert format_size(3 << 20) == "3.0 MiB"


def test_lru_order():
    p = LRUPolicy()
    for k in "abc":
        p.admit(k, 1)
    p.access("a")
    p.access("zzz")  # not resident: ignored
    assert list(p.victims()) == ["b", "c", "a"]
    p.remove("c")
    assert list(p.victims()) == ["b", "a"]


def test_lfu_order_breaks_ties_by_recency():
    p = LFUPolicy()
    for k in "abc":
        p.admit(k, 1)
    p.access("a")
    p.access("a")
    p.access("c")
    assert list(p.victims()) == ["b", "c", "a"]
    p.admit("d", 1)  # one use, but newer than b
    assert list(p.victims())[:2] == ["b", "d"]


def test_namespace_lookup_counts():
    ns = Namespace()
    ino = ns.lookup("a/b")
    assert ino >= FIRST_DYNAMIC and ns.path(ino) == "a/b"
    assert ns.lookup("a/b") == ino
    ns.forget(ino, 1)
    assert ns.path(ino) == "a/b"  # one reference left
    ns.forget(ino, 1)
    with pytest.raises(KeyError):
        ns.path(ino)
    assert ns.lookup("a/b") != ino  # numbers are never reused
    ns.forget(ROOT, 5)
    assert ns.path(ROOT) == ""


def test_metadata_roundtrip(tmp_path):
    m = MetaStore(str(tmp_path / "db"))
    rec = FileRecord(size=10, mtime_ns=5, tier="fast", pinned=True, hits=3)
    m.write_batch({"a": rec, "b": FileRecord()}, [{"op": "open", "path": "a"}])
    m.write_batch({"b": None})
    m.close()
    m = MetaStore(str(tmp_path / "db"))
    assert m.records == {"a": rec}
    assert m.events() == [{"op": "open", "path": "a"}]
    m.close()


def test_metadata_schema_1_is_upgraded_in_place(tmp_path):
    import lmdb
    env = lmdb.open(str(tmp_path / "db"), max_dbs=4)
    with env.begin(write=True) as txn:
        txn.put(b"schema", b"1", db=env.open_db(b"meta", txn=txn))
        txn.put(b"a\0b", b"\0" * 8, db=env.open_db(b"trans", txn=txn))
        txn.put(b"a", FileRecord(size=3, pinned=True).encode(),
                db=env.open_db(b"files", txn=txn))
    env.close()
    m = MetaStore(str(tmp_path / "db"))
    assert m.records["a"].pinned  # kept: no move aside
    assert not list(tmp_path.glob("db.broken-*"))
    with m.env.begin() as txn:
        assert txn.get(b"trans") is None  # the old counts database is gone
    m.close()


def test_corrupt_metadata_is_moved_aside(tmp_path, caplog):
    db = tmp_path / "db"
    db.mkdir()
    (db / "data.mdb").write_bytes(b"this is not an lmdb file" * 1000)
    m = MetaStore(str(db))
    assert m.records == {}
    m.write_batch({"x": FileRecord(size=1)})
    m.close()
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("db.broken-")]
    assert len(aside) == 1 and (aside[0] / "data.mdb").exists()
    assert "unusable" in caplog.text


def test_other_schema_version_is_moved_aside(tmp_path):
    db = tmp_path / "db"
    env = lmdb.open(str(db), max_dbs=4)
    with env.begin(write=True) as txn:
        txn.put(b"schema", b"999", db=env.open_db(b"meta", txn=txn))
    env.close()
    m = MetaStore(str(db))
    assert m.records == {}
    m.close()
    assert any(p.name.startswith("db.broken-") for p in tmp_path.iterdir())


def test_cold_symlinks(tmp_path):
    (tmp_path / "cold" / "d").mkdir(parents=True)
    (tmp_path / "cold" / "d" / "f").write_text("x")
    os.symlink("d/f", tmp_path / "cold" / "rel")
    os.symlink(tmp_path / "cold" / "d" / "f", tmp_path / "cold" / "d" / "abs")
    os.symlink("../..", tmp_path / "cold" / "d" / "up")
    os.symlink("/etc", tmp_path / "cold" / "etc")
    cold = ColdTier(str(tmp_path / "cold"))
    assert cold.readlink("rel") == "d/f"
    assert cold.readlink("d/abs") == "f"
    assert cold.readlink("d/up") is None
    assert cold.readlink("etc") is None


def test_residency_budget():
    core = Residency(100, LRUPolicy(), AdmitAll())
    assert core.reserve(60) and not core.reserve(41) and core.reserve(40)
    assert core.free == 0
    core.release(100)
    assert core.used == 0


def _model_dir(names, weight_map=None):
    files = {f"m/{n}" for n in names}
    asked = []

    def exists(rel):
        asked.append(rel)
        return rel in files

    read_json = lambda rel: {"weight_map": weight_map or {}}  # noqa: E731
    exists.asked = asked
    return exists, read_json


def test_hints_sharded_model():
    from aattsfs.hints import model_files
    wm = {"a": "model-00002-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",
          "c": "model-00001-of-00002.safetensors"}
    ld, rj = _model_dir(["config.json", "model.safetensors.index.json", "tokenizer.json",
                         "model-00001-of-00002.safetensors",
                         "model-00002-of-00002.safetensors"], wm)
    shards = ["m/model-00001-of-00002.safetensors", "m/model-00002-of-00002.safetensors"]
    assert model_files("m/config.json", ld, rj) == ["m/model.safetensors.index.json", *shards]
    assert model_files("m/model.safetensors.index.json", ld, rj) == shards
    assert model_files(shards[1], ld, rj) == ["m/model.safetensors.index.json", shards[0]]
    assert model_files("m/tokenizer.json", ld, rj) == []
    # only the names the hint needs are looked up, never the whole directory
    assert "m/tokenizer.json" not in ld.asked


def test_hints_single_file_and_non_models():
    from aattsfs.hints import model_files
    ld, rj = _model_dir(["config.json", "model.safetensors", "vocab.txt"])
    assert model_files("m/config.json", ld, rj) == ["m/model.safetensors"]
    assert model_files("m/model.safetensors", ld, rj) == []
    ld, rj = _model_dir(["data.bin", "other.bin"])  # no config.json: not a model
    assert model_files("m/data.bin", ld, rj) == []
    ld, rj = _model_dir(["config.json", "model.safetensors.index.json"],
                        {"a": "missing.safetensors"})
    assert model_files("m/config.json", ld, rj) == ["m/model.safetensors.index.json"]


def _safetensors(tensors: dict[str, int]) -> bytes:
    """A safetensors file of float32 vectors of the given lengths."""
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, n in tensors.items():
        header[name] = {"dtype": "F32", "shape": [n], "data_offsets": [off, off + 4 * n]}
        off += 4 * n
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + bytes(off)


def test_safetensors_layout_and_incomplete_files():
    from aattsfs.hints import safetensors_layout
    data = _safetensors({"b": 3, "a": 2})
    base = len(data) - 20

    def read(off, n):
        return data[off:off + n]

    assert safetensors_layout(read, len(data)) == [("b", base, base + 12),
                                                   ("a", base + 12, base + 20)]
    with pytest.raises(ValueError, match="past the end"):
        safetensors_layout(read, len(data) - 1)  # a shard still being written
    for bad in (b"\xff" * 8 + b"{}", (5).to_bytes(8, "little") + b"[1,2]",
                (4).to_bytes(8, "little") + b"{\"x\""):
        with pytest.raises(ValueError):
            safetensors_layout(lambda off, n, b=bad: b[off:off + n], len(bad))
