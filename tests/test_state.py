"""Damaged metadata never stops a mount (docs/crash-recovery.md).

The LMDB environment only caches what can be re-learned, so whatever state
a previous run, a disk or a person left in the state directory — a
truncated file, flipped bytes, malformed records or events, something that
is not a directory, file names that are not UTF-8 — the daemon must come up,
serve the right bytes and say what it dropped in one line, never with a
traceback or a signal.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import lmdb
import pytest
from conftest import sha256, wait_for, write_random

from aattsfs.metadata import TRACE_CAPACITY, FileRecord, MetaStore

# What the first mount opens: records and trace events to damage afterwards.
FILES = ["mid.bin", "models/a/weights.bin", "models/b/weights.bin",
         *(f"many/f{i:04d}.txt" for i in range(0, 300, 10))]
UNUSABLE = r"WARNING .*metadata at .* is unusable"


def serves(m, files=FILES) -> None:
    """The daemon is alive and every file reads as its cold original."""
    assert m.proc.poll() is None, m.log.read_text()
    for rel in files:
        assert sha256(m.path(rel)) == sha256(m.cold / rel), rel


def log_lines(m, pattern: str) -> list[str]:
    return [ln for ln in m.log.read_text(errors="replace").splitlines()
            if re.search(pattern, ln)]


def moved_aside(m) -> list[Path]:
    return sorted(p for p in m.state.iterdir() if p.name.startswith("lmdb.broken-"))


def tiers(m) -> dict[bytes, list[bytes]]:
    """`.aatts/tiers` as path -> fields (bytes: names need not be UTF-8)."""
    lines = (m.mnt / ".aatts" / "tiers").read_bytes().splitlines()[1:]
    return {ln.split(b"\t")[5]: ln.split(b"\t")[:5] for ln in lines}


@pytest.fixture
def used(cold_tree, mounter):
    """A stopped mount whose state holds records and a trace of FILES."""
    m = mounter(cold_tree)
    serves(m)
    m.stop()  # a clean stop flushes the last batch
    return m


def edit_lmdb(m, db: bytes):
    env = lmdb.open(str(m.state / "lmdb"), max_dbs=4)
    return env, env.open_db(db)


def test_truncated_environment_is_moved_aside(used):
    data = used.state / "lmdb" / "data.mdb"
    os.truncate(data, data.stat().st_size // 2)  # LMDB maps it: SIGBUS at the first read
    used.expect_log(UNUSABLE)
    used.start()
    serves(used)
    assert len(moved_aside(used)) == 1
    assert len(log_lines(used, UNUSABLE + r".*truncated")) == 1


def test_damaged_trace_events_are_skipped(used):
    env, trace = edit_lmdb(used, b"trace")
    with env.begin(db=trace) as txn:
        stored = sum(1 for _ in txn.cursor())
        cur = txn.cursor()
        cur.first()
        first = cur.value()
        cur.last()
        seq = int.from_bytes(cur.key(), "big") + 1
    good = {"t": 1.0, "op": "open", "path": "mid.bin", "size": 3 << 20, "pid": 7, "start": 1.5}
    bad = [b"not json", b"[1, 2]", b'"open"', b"\xff\xfe", b"{}",
           {k: v for k, v in good.items() if k != "path"},
           {**good, "path": 5}, {**good, "path": "../../etc/passwd"}, {**good, "path": "a\0b"},
           {**good, "t": "soon"}, {**good, "size": -1}, {**good, "size": True},
           {**good, "pid": [1]},  # unhashable: would kill the learner
           {**good, "op": "stat"}, {**good, "extra": 1},
           {**good, "op": "read", "ranges": "all"}, {**good, "op": "read", "ranges": [[0]]}]
    meta = env.open_db(b"meta")
    with env.begin(write=True, db=trace) as txn:
        for i, value in enumerate(bad):
            raw = value if isinstance(value, bytes) else json.dumps(value).encode()
            txn.put((seq + i).to_bytes(8, "big"), raw)
        txn.put(b"trace_next", (seq + len(bad)).to_bytes(8, "big"), db=meta)
    env.close()
    # and one flipped byte in a value as stored (LMDB checksums nothing);
    # stale copies in free pages may hold the value too: flip each
    data = used.state / "lmdb" / "data.mdb"
    raw = bytearray(data.read_bytes())
    found = [x.start() for x in re.finditer(re.escape(first), raw)]
    assert found
    for at in found:
        raw[at] ^= 0x01  # '{' -> 'z'
    data.write_bytes(raw)

    used.expect_log(r"WARNING .*skipped %d damaged trace events" % (len(bad) + 1))
    used.start()
    serves(used)
    lines = (used.mnt / ".aatts" / "trace").read_text().splitlines()
    events = [json.loads(ln) for ln in lines]
    assert len(events) >= stored - 1
    assert all(isinstance(e["path"], str) and e["path"] in FILES for e in events)
    assert len(log_lines(used, "damaged trace events")) == 1  # not one per event or read
    assert not moved_aside(used)


def test_damaged_file_records_are_skipped(used):
    env, files = edit_lmdb(used, b"files")
    good = json.loads(FileRecord(size=1, hits=2).encode())
    bad = {"big.bin": json.dumps({**good, "size": "big"}).encode(),
           "empty": json.dumps({k: v for k, v in good.items() if k != "hits"}).encode(),
           "rel-link": json.dumps({**good, "color": "red"}).encode(),
           "models/c/weights.bin": b"{not json",
           "many/f0001.txt": json.dumps({**good, "size": -5}).encode(),
           "many/f0002.txt": json.dumps({**good, "tier": "moon"}).encode(),
           "many/f0003.txt": b"[]",
           "../escape": json.dumps(good).encode()}
    with env.begin(write=True, db=files) as txn:
        known = sum(1 for _ in txn.cursor())
        for rel, raw in bad.items():
            txn.put(rel.encode(), raw)
    env.close()
    used.expect_log(r"WARNING .*skipped %d damaged file records" % len(bad))
    used.start()
    listed = tiers(used)
    assert len(listed) == known  # the others are kept, hits and misses with them
    assert all(listed[rel.encode()][3] == b"1" for rel in FILES)  # one miss each
    assert not moved_aside(used)
    serves(used, FILES + ["big.bin", "models/c/weights.bin", "many/f0001.txt"])
    used.stop()
    used.start()  # the damaged records were dropped: no second warning
    assert len(log_lines(used, "damaged file records")) == 1


@pytest.mark.parametrize("what", ["file", "dangling-symlink", "symlink-to-file",
                                  "data-is-a-directory"])
def test_lmdb_that_is_not_an_environment_is_moved_aside(cold_tree, mounter, tmp_path, what):
    m = mounter(cold_tree, start=False)
    m.state.mkdir()
    path = m.state / "lmdb"
    if what == "file":
        path.write_bytes(b"x" * 100)
    elif what == "dangling-symlink":
        path.symlink_to(tmp_path / "nowhere")
    elif what == "symlink-to-file":
        (tmp_path / "a-file").write_bytes(b"x")
        path.symlink_to(tmp_path / "a-file")
    else:
        (path / "data.mdb").mkdir(parents=True)
    m.expect_log(UNUSABLE)
    m.start()
    serves(m)
    assert path.is_dir() and not path.is_symlink()
    assert len(moved_aside(m)) == 1
    assert len(log_lines(m, UNUSABLE)) == 1


def test_unmovable_environment_runs_on_temporary_metadata(cold_tree, mounter):
    m = mounter(cold_tree, start=False)
    path = m.state / "lmdb"
    path.mkdir(parents=True)
    # a mount point cannot be renamed (EBUSY)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4M", "tmpfs", str(path)], check=True)
    try:
        (path / "data.mdb").write_bytes(b"garbage" * 4096)
        m.expect_log(r"ERROR .*metadata at .* is unusable .* cannot be moved aside")
        m.start()
        serves(m)
        line, = log_lines(m, "cannot be moved aside")
        temporary = re.search(r"temporary metadata in (\S+)", line)[1]
        assert os.path.isdir(temporary)
        m.stop()
        assert not os.path.exists(temporary)  # removed at unmount
        assert (path / "data.mdb").read_bytes() == b"garbage" * 4096  # left for a person
    finally:
        m.stop()
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_unreadable_lmdb_dir_is_moved_aside_for_a_non_root_daemon():
    # root reads any directory: the case of a daemon run as nobody, in a
    # state directory of its own (pytest's tmp_path is root's only)
    base = Path(tempfile.mkdtemp(prefix="aattsfs-test-"))
    (base / "lmdb").mkdir(mode=0)
    for p in (base, base / "lmdb"):
        os.chown(p, 65534, 65534)
    pid = os.fork()
    if pid == 0:  # the child only opens the store, writes and exits
        status = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            MetaStore(str(base / "lmdb")).write_batch({"a": FileRecord(size=1)})
            status = 0
        finally:
            os._exit(status)
    assert os.waitpid(pid, 0)[1] == 0
    assert [p.name.startswith("lmdb.broken-") for p in base.iterdir()].count(True) == 1
    m = MetaStore(str(base / "lmdb"))
    assert m.records == {"a": FileRecord(size=1)}
    m.close()
    shutil.rmtree(base)


def test_file_names_that_are_not_utf8(cold_tree, mounter):
    name = b"bad\xff\xfename.bin"
    cold = os.fsencode(cold_tree / "models") + b"/" + name
    write_random(Path(os.fsdecode(cold)), 200_000, 9)
    m = mounter(cold_tree)
    through = os.fsencode(m.path("models")) + b"/" + name
    with open(through, "rb") as f:
        assert f.read() == Path(os.fsdecode(cold)).read_bytes()
    opened = m.stats()["uptime_seconds"]
    # a metadata flush (every second) has passed and the daemon still answers
    wait_for(lambda: m.stats()["uptime_seconds"] > opened + 2.5, what="two flushes")
    assert m.proc.poll() is None
    assert tiers(m)[b"models/" + name][3] == b"1"
    trace = [json.loads(ln) for ln in (m.mnt / ".aatts" / "trace").read_bytes().splitlines()]
    assert os.fsencode(trace[-1]["path"]) == b"models/" + name
    m.stop()
    m.start()
    assert tiers(m)[b"models/" + name][3] == b"1"  # still known after a restart
    assert any(os.fsencode(e["path"]) == b"models/" + name for e in
               map(json.loads, (m.mnt / ".aatts" / "trace").read_bytes().splitlines()))


def test_random_byte_flips_never_stop_a_mount(used):
    rng = random.Random(20240611)
    pristine = used.state / "pristine"
    shutil.copytree(used.state / "lmdb", pristine)
    size = (pristine / "data.mdb").stat().st_size
    used.expect_log(UNUSABLE)
    used.expect_log(r"WARNING .*skipped \d+ damaged (trace events|file records)")
    for trial in range(20):
        shutil.rmtree(used.state / "lmdb")
        shutil.copytree(pristine, used.state / "lmdb")
        raw = bytearray((pristine / "data.mdb").read_bytes())
        for _ in range(rng.randint(1, 8)):
            raw[rng.randrange(size)] ^= rng.randint(1, 255)
        (used.state / "lmdb" / "data.mdb").write_bytes(raw)
        used.start()
        serves(used, FILES[:4])
        used.stop()
        assert "Traceback" not in used.log.read_text(errors="replace"), f"trial {trial}"


def test_metastore_validates_what_it_reads(tmp_path, caplog):
    m = MetaStore(str(tmp_path / "db"))
    odd = "d\udcff/\udcfe.bin"  # os.fsdecode(b"d\xff/\xfe.bin")
    ev = {"t": 1.5, "op": "open", "path": odd, "size": 3, "pid": 1, "start": None}
    m.write_batch({odd: FileRecord(size=3), "x" * 600: FileRecord(size=4)}, [ev])
    m.close()
    m = MetaStore(str(tmp_path / "db"))
    assert m.records == {odd: FileRecord(size=3)}  # the key too long for LMDB is not stored
    assert m.events() == [ev]
    with m.env.begin(write=True) as txn:
        txn.put(b"trace_next", b"\x01", db=m._meta)  # not 8 bytes
        txn.put(b"\0\0\0\0\0\0\0\x09", b"[]", db=m._trace)
    m.write_batch({}, [ev])  # still writes
    assert m.events() == [ev, ev]
    assert caplog.text.count("damaged trace events") == 1
    m.close()


def test_damage_a_write_meets_rebuilds_with_every_record(tmp_path, caplog, monkeypatch):
    m = MetaStore(str(tmp_path / "db"))
    ev = {"t": 1.5, "op": "open", "path": "b", "size": 2, "pid": 1, "start": 2.0}
    m.write_batch({"a": FileRecord(size=1, pinned=True), "gone": FileRecord()}, [ev])
    m.write_batch({"gone": None})
    write = MetaStore._write

    def damaged(self, files, events):  # as when a reused free page is not one
        monkeypatch.setattr(MetaStore, "_write", write)
        raise lmdb.CorruptedError("mdb_put: MDB_CORRUPTED: Located page was wrong type")

    monkeypatch.setattr(MetaStore, "_write", damaged)
    m.write_batch({"b": FileRecord(size=2)}, [ev])
    m.write_batch({}, [ev])
    m.close()
    m = MetaStore(str(tmp_path / "db"))
    assert m.records == {"a": FileRecord(size=1, pinned=True), "b": FileRecord(size=2)}
    assert m.events() == [ev, ev]  # the trace starts over
    m.close()
    assert caplog.text.count("writing to it failed") == 1
    assert len(list(tmp_path.glob("db.broken-*"))) == 1


def test_trace_ring_stays_bounded_whatever_its_keys(tmp_path, monkeypatch):
    import aattsfs.metadata as md
    monkeypatch.setattr(md, "TRACE_CAPACITY", 10)
    m = MetaStore(str(tmp_path / "db"))
    evs = [{"op": "open", "path": f"f{i}"} for i in range(31)]
    for i in range(3):
        m.write_batch({}, evs[i * 7:i * 7 + 7])
    assert m.events() == evs[11:21]
    assert TRACE_CAPACITY >= 10_000  # the real ring (imported before the patch) is large
    with m.env.begin(write=True) as txn:  # a damaged key, far ahead of the others
        txn.put(b"\x7f" + bytes(7), json.dumps(evs[0]).encode(), db=m._trace)
    m.write_batch({}, evs[21:])
    assert m.events() == evs[21:]  # the oldest went first, by count
    m.close()


@pytest.fixture
def freezable_dir(loop_ext4):
    """(directory, freeze, thaw): an ext4 filesystem of its own on a loop
    device, whose writes block while it is frozen (fsfreeze), as on a disk
    that stops answering. Thawed before it is unmounted and detached."""
    path = loop_ext4(64 << 20).path

    def thaw():
        subprocess.run(["fsfreeze", "-u", str(path)], capture_output=True)

    try:
        yield path, lambda: subprocess.run(["fsfreeze", "-f", str(path)], check=True), thaw
    finally:
        thaw()


def test_a_metadata_disk_that_hangs_does_not_stop_reads(cold_tree, mounter, freezable_dir):
    """The LMDB flush (a write and an fsync a second) runs in a worker
    thread: with the state directory's disk frozen, reads through the mount
    go on; once it answers again, what was learned meanwhile is written."""
    state, freeze, thaw = freezable_dir
    m = mounter(cold_tree, start=False)
    m.state = state / "state"
    m.start()
    rel = "mid.bin"
    serves(m, [rel])
    freeze()
    try:
        done = threading.Event()

        def reader():
            for _ in range(30):  # 3 s: three flushes meet the frozen disk
                serves(m, [rel])
                time.sleep(0.1)
            done.set()

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        # with the flush on the trio thread, the first flush after the freeze
        # blocked every request of the mount until the thaw
        t.join(60)
        assert done.is_set(), "reads hung while the metadata disk was frozen"
        assert m.proc.poll() is None
    finally:
        thaw()
    proc = m.proc
    m.stop()
    assert proc.returncode == 0, m.log.read_text()
    opens = [e for e in MetaStore(str(m.state / "lmdb")).events()
             if e["op"] == "open" and e["path"] == rel]
    assert len(opens) == 31  # every open, the frozen ones too, reached LMDB
