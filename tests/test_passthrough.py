"""Kernel FUSE passthrough (docs/passthrough.md) on real mounts.

A promoted file opens in passthrough: the kernel reads the fast copy itself
and the daemon never sees the reads of that open. These tests check, on
real mounts and real model files, and comparing every byte read with the
cold file:

- the bytes (read, pread at random offsets, mmap through safetensors and
  from_pretrained) with passthrough on, off, and unavailable;
- unavailable, three real ways: the fast dir on overlayfs (the daemon takes
  it as a fast tier, the kernel would refuse it as a backing file: a
  stacked filesystem), a process that imported pyfuse3 before aattsfs (the
  hooks cannot load), and a user namespace (known only after the mount:
  the kernel refuses the first backing file); auto then says why, on
  refuses to mount;
- that passthrough really engages when it should: the daemon's read
  counters do not move while a promoted file is read whole;
- concurrent opens (pread, O_DIRECT and mmap readers) while the file is
  promoted, evicted and promoted again;
- the budget with evicted copies still held by passthrough opens, on a
  tmpfs exactly the budget's size;
- kill -9 of the daemon while passthrough opens live, and a remount.
"""

from __future__ import annotations

import errno
import gc
import json
import mmap
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from aattsfs import passthrough
from aattsfs.mount import is_mounted
from conftest import BAD_LOG, BudgetWatch, MiB, act, run_cli, wait_for, write_random

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import modelgen  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch = pytest.importorskip("torch")

# The only requirement outside the project's control; everything else
# (hooks, libfuse 3.17, root) is the build's and the suite's job, and a
# failure there must fail these tests, not skip them.
KERNEL_TOO_OLD = passthrough._kernel_ok()
needs_kernel = pytest.mark.skipif(bool(KERNEL_TOO_OLD), reason=KERNEL_TOO_OLD)

BLOB = 5 * MiB + 12345  # not a multiple of a page, nor of a read request
TIER = "user.aatts.tier"


# -- fixtures and helpers -----------------------------------------------------

@pytest.fixture(scope="module")
def model_cold(tmp_path_factory):
    """A cold dir with a sharded GPT-2-shaped model and one random file."""
    cold = tmp_path_factory.mktemp("pt-models") / "cold"
    modelgen.gpt2(cold / "gpt2", layers=2, width=128, shard="300KB")
    write_random(cold / "blob.bin", BLOB, 77)
    return cold


def load_state(path) -> dict:
    """from_pretrained's state dict, copied, the model and any file it
    mapped released (so no open of the mount outlives the call)."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    del model
    gc.collect()
    return state


@pytest.fixture(scope="module")
def cold_state(model_cold):
    """The state dict from_pretrained gives for the cold dir itself."""
    return load_state(model_cold / "gpt2")


def mount_in_mode(mode: str, cold: Path, mounter, overlay_dir, **kw):
    """A mount with passthrough `mode`: on, off, auto, or unavailable (auto
    with the fast dir on overlayfs)."""
    if mode == "unavailable":
        m = mounter(cold, fast=overlay_dir(), extra=["--passthrough", "auto"], **kw)
    else:
        m = mounter(cold, extra=["--passthrough", mode], **kw)
    return m, started(m)


def started(m) -> dict:
    """The passthrough section once the daemon has decided (it does so
    after the kernel answered INIT and a first request)."""
    def decided():
        pt = m.stats()["passthrough"]
        return pt if pt["active"] or pt["reason"] != "the kernel has not answered yet" else None
    return wait_for(decided, what="the daemon to decide on passthrough")


def daemon_reads(m) -> int:
    r = m.stats()["reads"]
    return r["fast"] + r["cold"]


def files_of(cold: Path) -> dict[str, bytes]:
    return {str(p.relative_to(cold)): p.read_bytes()
            for p in sorted(cold.rglob("*")) if p.is_file()}


def read_whole(path, chunk=1 << 20) -> bytes:
    with open(path, "rb", buffering=0) as f:
        return b"".join(iter(lambda: f.read(chunk), b""))


def first_diff(got: bytes, want: bytes) -> int:
    return next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))


def check_preads(fd: int, want: bytes, rng: random.Random, n: int, what: str,
                 max_size: int = 300_000) -> int:
    """n preads at random offsets (some past EOF) of random sizes, each
    compared with the cold bytes; returns the bytes checked."""
    checked = 0
    for _ in range(n):
        off = rng.randrange(0, len(want) + 8192)
        size = rng.randrange(1, max_size)
        got = os.pread(fd, size, off)
        expect = want[off:off + size]
        assert got == expect, (f"{what}: pread({size}, {off}) gave {len(got)} bytes, expected "
                               f"{len(expect)}, first difference at +{first_diff(got, expect)}")
        checked += len(got)
    return checked


def check_direct_preads(fd: int, want: bytes, rng: random.Random, n: int, what: str) -> int:
    """Like check_preads on an O_DIRECT fd, with what O_DIRECT asks of a
    caller on any filesystem: page-aligned buffer, offset and length."""
    buf = mmap.mmap(-1, 64 * 4096)
    view = memoryview(buf)
    try:
        checked = 0
        for _ in range(n):
            off = rng.randrange(0, len(want) // 4096 + 2) * 4096
            size = rng.randrange(1, 65) * 4096
            got = os.preadv(fd, [view[:size]], off)
            expect = want[off:off + size]
            assert buf[:got] == expect, (f"{what}: O_DIRECT pread({size}, {off}) gave {got} "
                                         f"bytes, expected {len(expect)}")
            checked += got
        return checked
    finally:
        view.release()
        buf.close()


def check_mmap(path, want: bytes, rng: random.Random, n: int, what: str) -> int:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
        assert len(mm) == len(want), what
        checked = 0
        for _ in range(n):
            off = rng.randrange(0, len(want))
            size = rng.randrange(1, 200_000)
            assert mm[off:off + size] == want[off:off + size], f"{what}: mmap [{off}:+{size}]"
            checked += len(want[off:off + size])
        return checked


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def check_safetensors(m, cold: Path, rel_dir: str) -> None:
    """Every tensor of every shard through safe_open (mmap) on the mount,
    against safe_open on the cold file."""
    from safetensors import safe_open
    shards = sorted(p.name for p in (cold / rel_dir).glob("*.safetensors"))
    assert len(shards) >= 3
    for name in shards:
        with safe_open(m.path(f"{rel_dir}/{name}"), "pt") as got, \
                safe_open(cold / rel_dir / name, "pt") as want:
            assert sorted(got.keys()) == sorted(want.keys()) and list(want.keys())
            for key in want.keys():
                a, b = got.get_tensor(key), want.get_tensor(key)
                assert a.dtype == b.dtype and torch.equal(a, b), f"{name}: {key}"


def warm_all(m, rels) -> None:
    for rel in rels:
        act(m.path(rel), "warm")
        assert m.tier(rel) == "fast", rel


class Problems:
    """Failures seen in helper threads, reported by the test body."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.items: list[str] = []
        self.checked = 0
        self.counts: dict[str, int] = {}

    def add(self, msg: str) -> None:
        with self.lock:
            if len(self.items) < 30:
                self.items.append(msg)

    def count(self, what: str, n: int = 1) -> None:
        with self.lock:
            self.counts[what] = self.counts.get(what, 0) + n

    def verified(self, nbytes: int) -> None:
        with self.lock:
            self.checked += nbytes

    def thread(self, fn, *args) -> threading.Thread:
        def run():
            try:
                fn(*args)
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                self.add(f"{fn.__name__}{args}: {exc!r}")
        return threading.Thread(target=run, name=fn.__name__, daemon=True)

    def check(self) -> None:
        assert not self.items, "\n".join(self.items)


# -- 1. the bytes, in every mode ---------------------------------------------

@needs_kernel
@pytest.mark.parametrize("mode", ["on", "off", "unavailable"])
def test_bytes_match_the_cold_files_in_every_mode(mode, model_cold, cold_state, overlay_dir,
                                                  mounter):
    """read, pread at random offsets, mmap (raw and through safetensors)
    and from_pretrained return the cold files' bytes, first while the files
    are cold or promoting (cached-mode opens), then once promoted (in
    passthrough when it is on)."""
    rng = random.Random(f"bytes-{mode}")
    files = files_of(model_cold)
    m, pt = mount_in_mode(mode, model_cold, mounter, overlay_dir, fast_size="64M")
    if mode == "on":
        assert pt["active"] is True and pt["reason"] == "", pt
    elif mode == "off":
        assert pt["active"] is False and pt["reason"] == "--passthrough off", pt
    else:
        assert pt["active"] is False and pt["reason"], pt

    # cold, promoting on first read
    assert_same_tensors(load_state(m.path("gpt2")), cold_state)
    assert read_whole(m.path("blob.bin")) == files["blob.bin"]
    warm_all(m, files)
    before = m.stats()["passthrough"]

    # promoted
    for rel, want in files.items():
        assert read_whole(m.path(rel)) == want, rel
        fd = os.open(m.path(rel), os.O_RDONLY)
        try:
            check_preads(fd, want, rng, 40, rel)
        finally:
            os.close(fd)
    check_mmap(m.path("blob.bin"), files["blob.bin"], rng, 50, "blob.bin")
    check_safetensors(m, model_cold, "gpt2")
    assert_same_tensors(load_state(m.path("gpt2")), cold_state)

    after = m.stats()["passthrough"]
    if mode == "on":
        # every open of a promoted file above was a passthrough open
        assert after["opens"] - before["opens"] >= 2 * len(files) + 1, (before, after)
        assert after["active"] is True
    else:
        assert after["opens"] == 0 and after["opened_bytes"] == 0, after
        assert after["active"] is False
    wait_for(lambda: m.stats()["passthrough"]["backing_files"] == 0,
             what="every backing file released")


# -- unavailable: what auto and on say ----------------------------------------

@needs_kernel
def test_auto_on_a_fast_dir_that_cannot_back_passthrough_says_why(tmp_path, overlay_dir,
                                                                  mounter):
    """auto on an overlayfs fast dir: the mount works without passthrough,
    and stats and one log line say why, in words that lead to the fix (the
    fast dir's filesystem), the same words in both."""
    cold = tmp_path / "cold"
    want = write_random(cold / "f.bin", 3 * MiB + 5, 3).read_bytes()
    m = mounter(cold, fast=overlay_dir(), extra=["--passthrough", "auto"])
    pt = started(m)
    assert pt["mode"] == "auto" and pt["active"] is False and pt["reason"], pt
    act(m.path("f.bin"), "warm")
    assert read_whole(m.path("f.bin")) == want
    assert m.stats()["passthrough"]["opens"] == 0
    lines = [ln for ln in m.log.read_text().splitlines() if "passthrough off:" in ln]
    assert len(lines) == 1, lines
    assert lines[0].endswith("passthrough off: " + pt["reason"]), (lines, pt)
    # not the kernel's ELOOP ("too many levels of symbolic links"): the
    # reason names what to change, the fast dir's filesystem
    assert "--fast-dir" in pt["reason"], pt["reason"]


def _mount_argv(cold, mnt, fast, state):
    return ["mount", cold, mnt, "--fast-dir", fast, "--state-dir", state, "--fast-size", "32M",
            "--passthrough", "on"]


def _unmount_if_left(mnt: Path) -> None:
    if is_mounted(mnt):
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)


@needs_kernel
@pytest.mark.parametrize("how", ["foreground", "daemon"])
def test_on_fails_at_mount_where_it_cannot_work(how, tmp_path, overlay_dir):
    """--passthrough on with an overlayfs fast dir: non-zero exit, one
    error line naming passthrough (in the foreground, beside the log; from
    the detached mount, alone on the terminal), no traceback, nothing left
    mounted."""
    cold, mnt, state = tmp_path / "cold", tmp_path / "mnt", tmp_path / "state"
    write_random(cold / "f.bin", MiB, 1)
    mnt.mkdir()
    try:
        proc = run_cli(*_mount_argv(cold, mnt, overlay_dir(), state),
                       *(["--foreground"] if how == "foreground" else []),
                       check=False, timeout=120)
    finally:
        _unmount_if_left(mnt)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "Traceback" not in out, out
    errors = [ln for ln in out.splitlines() if ln.startswith("aattsfs: error:")]
    assert len(errors) == 1 and "--passthrough on cannot work here" in errors[0], out
    if how == "daemon":
        assert proc.stderr.strip().splitlines() == errors, proc.stderr
    assert not is_mounted(mnt)


def test_on_refuses_before_mounting_when_the_hooks_cannot_load(tmp_path):
    """The other way passthrough is unavailable: a process that imported
    pyfuse3 before aattsfs cannot hook it. --passthrough on then refuses
    before mounting anything: one error line with the reason, exit 2, no
    traceback, and the directories this start created are gone again."""
    cold, mnt = tmp_path / "cold", tmp_path / "mnt"
    write_random(cold / "f.bin", MiB, 1)
    mnt.mkdir()
    code = ("import pyfuse3, sys\nfrom aattsfs.cli import main\n"
            "sys.argv = ['aattsfs', *sys.argv[1:]]\nmain()")
    try:
        proc = subprocess.run([sys.executable, "-c", code,
                               *map(str, _mount_argv(cold, mnt, tmp_path / "fast",
                                                     tmp_path / "state")), "--foreground"],
                              capture_output=True, text=True, timeout=120)
    finally:
        _unmount_if_left(mnt)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "mounted" not in proc.stderr, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("aattsfs: error:")]
    assert len(errors) == 1 and "--passthrough on cannot work here" in errors[0] \
        and "pyfuse3 was imported before aattsfs" in errors[0], proc.stderr
    assert not (tmp_path / "fast").exists() and not (tmp_path / "state").exists()


# In a user namespace (a rootless container) the daemon is "root" with
# CAP_SYS_ADMIN there, and can mount FUSE, but the kernel asks a backing
# file for CAP_SYS_ADMIN in the initial namespace: passthrough fails only
# after the mount, at the daemon's first backing file. The mount lives in
# the namespace's own mount table and goes with it.
needs_unshare = pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare")
IN_USERNS = ["unshare", "--user", "--map-root-user", "--mount"]

USERNS_AUTO = """
import json, os, signal, subprocess, sys, time
cold, mnt, fast, state = sys.argv[1:5]
aattsfs = [sys.executable, "-m", "aattsfs"]
subprocess.run([*aattsfs, "mount", cold, mnt, "--fast-dir", fast, "--state-dir", state,
                "--fast-size", "32M", "--passthrough", "auto"], check=True)
try:
    stats = lambda: json.load(open(os.path.join(mnt, ".aatts", "stats")))
    deadline = time.monotonic() + 30
    while stats()["passthrough"]["reason"] == "the kernel has not answered yet":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    subprocess.run([*aattsfs, "warm", os.path.join(mnt, "f.bin")], check=True)
    with open(os.path.join(mnt, "f.bin"), "rb") as f:
        data = f.read()
    print(json.dumps({"stats": stats(), "data": data.hex()}))
finally:
    subprocess.run([*aattsfs, "umount", mnt])
    pid = int(open(os.path.join(state, "lock")).read().strip() or 0)
    for _ in range(500 if pid > 0 else 0):  # the daemon goes, and the namespace with it
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.02)
    else:
        if pid > 0:
            os.kill(pid, signal.SIGKILL)
"""


@needs_kernel
@needs_unshare
def test_auto_in_a_user_namespace_says_why_after_the_mount(tmp_path):
    """auto where the kernel refuses the first backing file (a user
    namespace): the mount serves the right bytes without passthrough, and
    stats and one log line say why."""
    cold, mnt, fast, state = (tmp_path / n for n in ("cold", "mnt", "fast", "state"))
    want = write_random(cold / "f.bin", 2 * MiB + 3, 4).read_bytes()
    mnt.mkdir()
    proc = subprocess.run([*IN_USERNS, sys.executable, "-c", USERNS_AUTO,
                           *map(str, (cold, mnt, fast, state))],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert bytes.fromhex(out["data"]) == want
    pt = out["stats"]["passthrough"]
    assert pt["mode"] == "auto" and pt["active"] is False and pt["opens"] == 0, pt
    assert "CAP_SYS_ADMIN" in pt["reason"], pt
    log = (state / "aattsfs.log").read_text()
    lines = [ln for ln in log.splitlines() if "passthrough off:" in ln]
    assert len(lines) == 1 and lines[0].endswith("passthrough off: " + pt["reason"]), log
    assert not BAD_LOG.search(log), log


@needs_kernel
@needs_unshare
@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_on_fails_at_mount_in_a_user_namespace_even_with_a_slow_cold_tier(tmp_path):
    """--passthrough on, without --foreground (the daemon detached), where
    passthrough fails only after the mount (a user namespace), with a cold
    tier that takes half a second to answer statfs (as a loaded NFS server
    does; injected with strace, on the cold dir's path only). The daemon
    decides on passthrough after its first request, a statfs: `aattsfs
    mount` must not report success before that decision, for a mount that
    is gone a moment later; the terminal gets one error line. (Without
    the delay the window is a few milliseconds: one start in twelve exited
    0 here.)"""
    cold, mnt, state = tmp_path / "cold", tmp_path / "mnt", tmp_path / "state"
    write_random(cold / "f.bin", MiB, 1)
    mnt.mkdir()
    # strace -f follows the daemon too, and returns when it has exited
    proc = subprocess.run(["strace", "-f", "-qq", "-o", "/dev/null", "-P", str(cold),
                           "-e", "trace=statfs", "-e", "inject=statfs:delay_exit=500000",
                           *IN_USERNS, sys.executable, "-m", "aattsfs",
                           *map(str, _mount_argv(cold, mnt, tmp_path / "fast", state))],
                          capture_output=True, text=True, timeout=120)
    log = (state / "aattsfs.log").read_text()
    assert "--passthrough on cannot work here" in log, log  # the daemon did refuse
    assert proc.returncode != 0, (f"'aattsfs mount --passthrough on' exited 0 "
                                  f"(stderr {proc.stderr!r}) though the daemon refused and "
                                  f"unmounted:\n{log}")
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--passthrough on cannot work here" in lines[0], proc.stderr


# -- 2. it engages when it should ---------------------------------------------

@needs_kernel
@pytest.mark.parametrize("mode", ["on", "auto", "off"])
def test_a_promoted_file_is_read_by_the_kernel_not_the_daemon(mode, tmp_path, mounter):
    """A promoted file, never read through the mount before (so no page of
    it is cached), is read whole and mmapped: with on and auto the open is
    a passthrough open and the daemon's read counters do not move; with off
    (the control that shows the counters would catch it) they do."""
    cold = tmp_path / "cold"
    want = write_random(cold / "blob.bin", BLOB, 11).read_bytes()
    m = mounter(cold, extra=["--passthrough", mode])
    pt = started(m)
    act(m.path("blob.bin"), "warm")  # promoted without a read through the mount
    assert m.tier("blob.bin") == "fast"
    s0 = m.stats()
    with open(m.path("blob.bin"), "rb", buffering=0) as f:
        got = b"".join(iter(lambda: f.read(MiB), b""))
        with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
            mapped = mm[:]
        s1 = m.stats()  # while the open lives
    assert got == want
    assert mapped == want
    moved = daemon_reads(m) - (s0["reads"]["fast"] + s0["reads"]["cold"])
    if mode == "off":
        assert pt["active"] is False
        assert moved > 0, "the daemon served no read: the control measures nothing"
        assert s1["passthrough"]["opens"] == 0
        return
    assert pt["active"] is True and s1["passthrough"]["active"] is True, pt
    assert s1["passthrough"]["opens"] == s0["passthrough"]["opens"] + 1, s1["passthrough"]
    assert s1["passthrough"]["opened_bytes"] == s0["passthrough"]["opened_bytes"] + BLOB
    assert s1["passthrough"]["backing_files"] == 1
    assert moved == 0, (f"the daemon served {moved} reads of a promoted file: passthrough "
                        f"did not engage ({s1['passthrough']})")
    assert s1["opens"]["fast"] == s0["opens"]["fast"] + 1  # still a fast hit for learning
    wait_for(lambda: m.stats()["passthrough"]["backing_files"] == 0,
             what="the backing file released at close")


# -- 3. concurrent opens while promoted, evicted, promoted again --------------

@needs_kernel
def test_concurrent_opens_while_promoted_evicted_and_promoted_again(tmp_path, mounter,
                                                                   fast_tmpfs):
    """Threads open the files over and over (pread at random offsets, with
    and without O_DIRECT, mmap) while another evicts them and promotes
    them again; one open of `a.bin` lives through it all, so its inode stays
    in passthrough on a copy evicted from under it. No open or read fails,
    no byte is wrong; afterwards the held copies are given back."""
    cold = tmp_path / "cold"
    sizes = {"a.bin": 6 * MiB + 111, "b.bin": 4 * MiB + 2222, "c.bin": 3 * MiB + 3}
    files = {n: write_random(cold / n, s, i).read_bytes()
             for i, (n, s) in enumerate(sizes.items())}
    m = mounter(cold, fast_size="64M", fast=fast_tmpfs(80 * MiB),
                extra=["--passthrough", "on", "--no-prefetch"])
    assert started(m)["active"] is True
    warm_all(m, files)
    names = sorted(files)
    problems = Problems()
    stop = threading.Event()
    held = os.open(m.path("a.bin"), os.O_RDONLY)  # the long-lived passthrough open
    held_seen = []

    def reader(seed: int):
        rng = random.Random(seed)
        while not stop.is_set():
            rel = rng.choice(names)
            direct = rng.random() < 0.3
            try:
                fd = os.open(m.path(rel), os.O_RDONLY | (os.O_DIRECT if direct else 0))
            except OSError as exc:
                problems.add(f"open {rel} (direct={direct}): {exc!r}")
                continue
            try:
                for _ in range(rng.randrange(1, 4)):
                    if direct and rng.random() < 0.5:
                        problems.verified(check_direct_preads(fd, files[rel], rng, 5, rel))
                    else:  # O_DIRECT too: the fast tier is a tmpfs, which takes any buffer
                        problems.verified(check_preads(fd, files[rel], rng, 5, rel))
                    time.sleep(rng.random() * 0.01)  # let the churner in while it is open
            finally:
                os.close(fd)
            problems.count(f"opens {rel}")

    def mapper(seed: int):
        rng = random.Random(seed)
        while not stop.is_set():
            rel = rng.choice(names)
            problems.verified(check_mmap(m.path(rel), files[rel], rng, 10, f"mmap {rel}"))
            problems.count("mmaps")
            problems.count(f"opens {rel}")

    def holder():
        rng = random.Random(5)
        while not stop.is_set():
            problems.verified(check_preads(held, files["a.bin"], rng, 3, "held a.bin"))
            time.sleep(0.01)

    def churner():
        rng = random.Random(9)
        order = ["a.bin"] + [rng.choice(names) for _ in range(10_000)]
        for rel in order:
            if stop.is_set():
                return
            act(m.path(rel), "evict")
            if rel == "a.bin" and not held_seen:
                held_seen.append(m.stats()["passthrough"]["held_evicted_bytes"])
            time.sleep(rng.random() * 0.05)
            try:
                act(m.path(rel), "warm")
            except OSError as exc:  # evicted again while promoted: not with one churner
                problems.add(f"warming {rel}: {exc!r}")
            problems.count("churns")
            time.sleep(rng.random() * 0.05)

    threads = ([problems.thread(reader, 100 + i) for i in range(3)]
               + [problems.thread(mapper, 200), problems.thread(holder),
                  problems.thread(churner)])
    try:
        for t in threads:
            t.start()
        time.sleep(4.0)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    problems.check()
    assert problems.counts.get("churns", 0) >= 5 and problems.counts.get("mmaps", 0) >= 3, \
        problems.counts
    assert problems.checked > 20 * MiB

    # the held open's copy was evicted under it: counted until it closes
    assert held_seen and held_seen[0] >= sizes["a.bin"], held_seen
    s = m.stats()
    assert s["passthrough"]["held_evicted_bytes"] >= sizes["a.bin"], s["passthrough"]
    # a.bin's inode was in passthrough throughout: every open of it joined
    assert s["passthrough"]["opens"] >= problems.counts["opens a.bin"] > 0, \
        (s["passthrough"], problems.counts)
    check_preads(held, files["a.bin"], random.Random(1), 30, "held a.bin at the end")
    os.close(held)
    wait_for(lambda: m.stats()["passthrough"]["backing_files"] == 0,
             what="every backing file released")
    s = m.stats()
    assert s["passthrough"]["held_evicted_bytes"] == 0, s["passthrough"]
    fast = [n for n in names if m.tier(n) == "fast"]
    assert s["fast_tier"]["used_bytes"] == sum(sizes[n] for n in fast), (s["fast_tier"], fast)
    for rel in names:  # and every file still reads right, in passthrough or not
        assert read_whole(m.path(rel)) == files[rel], rel


# -- 4. the budget, with evicted copies still held ----------------------------

@needs_kernel
def test_budget_holds_with_evicted_copies_still_open(tmp_path, mounter, fast_tmpfs):
    """The fast dir is a tmpfs exactly the budget's size. Copies held by
    passthrough opens are evicted; they stay allocated, the budget keeps
    counting them, and the daemon refuses what would not fit beside them
    (or evicts what is not held) instead of running into the filesystem's
    wall; as the opens close, the held bytes come back."""
    cold = tmp_path / "cold"
    budget = 16 * MiB
    sizes = {n: 5 * MiB + 1000 * i for i, n in enumerate("abcd")}
    files = {n: write_random(cold / n, s, 40 + i).read_bytes()
             for i, (n, s) in enumerate(sizes.items())}
    m = mounter(cold, fast_size=str(budget), fast=fast_tmpfs(budget),
                extra=["--passthrough", "on", "--no-prefetch"])
    assert started(m)["active"] is True

    def pt():
        return m.stats()["passthrough"]

    def used():
        return m.stats()["fast_tier"]["used_bytes"]

    def warm_refused(rel):
        proc = run_cli("warm", m.path(rel), check=False)
        assert proc.returncode == 2 and "does not fit" in proc.stderr, proc.stderr
        assert m.tier(rel) == "cold"

    fds: dict[str, list[int]] = {}

    def hold(rel):
        fd = os.open(m.path(rel), os.O_RDONLY)
        fds.setdefault(rel, []).append(fd)
        check_preads(fd, files[rel], random.Random(rel), 10, f"held {rel}")
        return fd

    def close_all(rel):
        for fd in fds.pop(rel):
            assert os.pread(fd, sizes[rel] + 10, 0) == files[rel], rel
            os.close(fd)

    try:
        with BudgetWatch(m) as watch:
            run_cli("warm", m.path("a"), m.path("b"), m.path("c"))
            assert used() == sizes["a"] + sizes["b"] + sizes["c"]
            hold("a")
            hold("b")
            assert pt()["backing_files"] == 2
            run_cli("evict", m.path("a"), m.path("b"))
            assert m.tier("a") == m.tier("b") == "cold"
            assert pt()["held_evicted_bytes"] == sizes["a"] + sizes["b"]
            assert used() == sizes["a"] + sizes["b"] + sizes["c"]  # still allocated
            # a new open of an evicted, held file joins its backing file
            opens = pt()["opens"]
            hold("a")
            assert pt()["opens"] == opens + 1 and pt()["backing_files"] == 2
            assert m.tier("a") == "cold"

            run_cli("warm", m.path("d"))  # room only by evicting c (a and b are held)
            assert m.tier("d") == "fast" and m.tier("c") == "cold"
            assert used() == sizes["a"] + sizes["b"] + sizes["d"]
            hold("d")
            for rel in ("c", "a"):  # nothing evictable is left, and the held bytes count
                warm_refused(rel)
            assert used() <= budget

            close_all("a")  # both opens of a
            wait_for(lambda: pt()["held_evicted_bytes"] == sizes["b"],
                     what="a's held bytes given back")
            assert used() == sizes["b"] + sizes["d"]
            run_cli("warm", m.path("a"))  # fits now
            assert m.tier("a") == "fast"
            hold("a")  # a new backing file, of the new copy
            close_all("b")
            wait_for(lambda: pt()["held_evicted_bytes"] == 0, what="b's held bytes given back")
            assert used() == sizes["a"] + sizes["d"]
            close_all("a")
            close_all("d")
            wait_for(lambda: pt()["backing_files"] == 0, what="every backing file released")
            run_cli("warm", m.path("c"))
            assert used() == sizes["a"] + sizes["c"] + sizes["d"]
    finally:
        for fd_list in fds.values():
            for fd in fd_list:
                os.close(fd)
    s = m.stats()
    assert s["promotions_nospace"] == 0, "the daemon ran into the filesystem's wall"
    assert 0 < watch.peak_stats <= budget
    assert 0 < watch.peak_dir <= budget
    sv = os.statvfs(m.fast)  # what the tmpfs holds now: the three copies, not the held ones
    assert (sv.f_blocks - sv.f_bfree) * sv.f_frsize < sizes["a"] + sizes["c"] + sizes["d"] + MiB
    for rel, want in files.items():
        assert read_whole(m.path(rel)) == want, rel


# -- 5. kill -9 while passthrough opens live ----------------------------------

@needs_kernel
def test_kill_9_with_passthrough_opens_live_then_remount(tmp_path, mounter):
    """The daemon is killed (SIGKILL) while passthrough opens (one on a copy
    evicted under it, one mmapped) and a cached-mode open live. The mount is
    dead (ENOTCONN for new requests); what the open files still return is
    right if it returns anything; the fixture cleans up with files still
    open; a remount on the same fast and state dirs reads everything right
    and passthrough engages again."""
    cold = tmp_path / "cold"
    files = {n: write_random(cold / n, 3 * MiB + 77 * i, 60 + i).read_bytes()
             for i, n in enumerate(["a.bin", "b.bin", "c.bin"])}
    root = tmp_path / "k"
    m = mounter(cold, root=root, extra=["--passthrough", "on", "--no-prefetch"])
    assert started(m)["active"] is True
    warm_all(m, ["a.bin", "b.bin"])
    rng = random.Random(3)
    fa = os.open(m.path("a.bin"), os.O_RDONLY)
    fb = open(m.path("b.bin"), "rb")
    mb = mmap.mmap(fb.fileno(), 0, prot=mmap.PROT_READ)
    fc = os.open(m.path("c.bin"), os.O_RDONLY | os.O_DIRECT)  # cold: the daemon serves it
    check_preads(fa, files["a.bin"], rng, 10, "a.bin")
    assert mb[:] == files["b.bin"]
    check_direct_preads(fc, files["c.bin"], rng, 5, "c.bin")
    act(m.path("a.bin"), "evict")  # evicted under its passthrough open
    assert m.stats()["passthrough"]["backing_files"] == 2

    m.proc.kill()
    m.proc.wait()
    with pytest.raises(OSError) as exc:
        os.statvfs(m.path())
    assert exc.value.errno == errno.ENOTCONN
    with pytest.raises(OSError) as exc:
        os.open(m.path("a.bin"), os.O_RDONLY)
    assert exc.value.errno == errno.ENOTCONN
    survived = 0
    for what, read in [("a.bin", lambda: check_preads(fa, files["a.bin"], rng, 10, "a.bin")),
                       ("b.bin mmap", lambda: mb[:] == files["b.bin"] or
                        pytest.fail("b.bin mmap: wrong bytes after the daemon died")),
                       ("c.bin", lambda: check_direct_preads(fc, files["c.bin"], rng, 3,
                                                             "c.bin"))]:
        try:
            read()
            survived += 1
        except OSError as exc_:  # an error is fine (the daemon is gone), a wrong byte is not
            assert exc_.errno in (errno.ENOTCONN, errno.EIO), (what, exc_)
    print(f"\nreads that worked after kill -9: {survived} of 3")

    # the fixture's stop: the daemon is gone and files are still open on the mount
    m.stop()
    assert not is_mounted(m.mnt)
    mb.close()
    fb.close()
    os.close(fa)
    os.close(fc)

    m2 = mounter(cold, root=root, extra=["--passthrough", "on", "--no-prefetch"])
    assert started(m2)["active"] is True
    m2.wait_tier("b.bin")  # the copy found at start, hashed before it is served
    assert m2.tier("a.bin") == "cold"  # evicted before the kill
    for rel, want in files.items():
        assert read_whole(m2.path(rel)) == want, rel
    s0 = m2.stats()
    assert read_whole(m2.path("b.bin")) == files["b.bin"]
    s1 = m2.stats()
    assert s1["passthrough"]["opens"] == s0["passthrough"]["opens"] + 1
    assert daemon_reads(m2) == s0["reads"]["fast"] + s0["reads"]["cold"]


@needs_kernel
def test_a_copy_changed_behind_the_daemon_is_never_joined_after_an_eviction(tmp_path, mounter):
    """Passthrough opens keep reading their copy in the kernel; a new open of
    the inode would have to join them. A copy written behind the daemon's
    back, then evicted (or warmed again), must still never reach a new
    open: the daemon looks at the held copy itself at each join."""
    cold = tmp_path / "cold"
    want = write_random(cold / "a.bin", 2 * MiB + 5, 7).read_bytes()
    m = mounter(cold, extra=["--passthrough", "on"])
    m.expect_log(r"changed behind aattsfs.s back")
    path = m.path("a.bin")
    act(path, "warm")
    fd1 = os.open(path, os.O_RDONLY)
    try:
        assert m.stats()["passthrough"]["opens"] == 1
        with open(m.copy("a.bin"), "r+b") as copy:
            copy.write(b"EVIL" * 64)
        act(path, "evict")  # the daemon's own unlink: not a reason to trust it
        for step in ("evicted", "warmed again"):
            fd = os.open(path, os.O_RDONLY)
            try:
                got = os.pread(fd, len(want) + 1, 0)
            finally:
                os.close(fd)
            assert got == want, f"{step}: a new open read {first_diff(got, want)} off"
            act(path, "warm")
        assert m.stats()["copies_corrupt"] >= 1
    finally:
        os.close(fd1)


NOBODY = 65534
# holds both files open (fds 3, 4: the same opens it reads) until a line comes
HOLDER = ('exec 3<"$1" 4<"$2"; a=0; b=0; cmp -s - "$3" <&3 && a=1; cmp -s - "$4" <&4 && b=1; '
          'echo "$a $b"; read x')


@needs_kernel
def test_another_user_cannot_lock_the_budget_with_passthrough_opens(open_root, mounter):
    """With --allow-other, copies held by another user's passthrough opens
    cannot be evicted until they close; that user may hold at most half the
    budget so. Beyond it their opens are served by the daemon (cached mode),
    and the owner can still evict and promote."""
    cold = open_root / "cold"
    for i, name in enumerate("abc"):
        write_random(cold / f"{name}.bin", 3 * MiB, i).chmod(0o644)
    m = mounter(cold, root=open_root, fast_size="8M", extra=["--allow-other"])
    for name in "ab":
        act(m.path(f"{name}.bin"), "warm")
    holder = subprocess.Popen(["sh", "-c", HOLDER, "sh", m.path("a.bin"), m.path("b.bin"),
                               cold / "a.bin", cold / "b.bin"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, user=NOBODY, group=NOBODY,
                              extra_groups=[])
    try:
        assert holder.stdout.readline().split() == ["1", "1"]  # both read right
        pt = m.stats()["passthrough"]
        assert pt["opens"] == 1 and pt["backing_files"] == 1  # b would pass half of 8 MiB
        for name in "ab":
            run_cli("evict", m.path(f"{name}.bin"))
        assert m.stats()["passthrough"]["held_evicted_bytes"] == 3 * MiB
        run_cli("warm", m.path("c.bin"))  # 3 held + 3 fit in 8
        assert m.tier("c.bin") == "fast"
        assert m.path("c.bin").read_bytes() == (cold / "c.bin").read_bytes()
    finally:
        holder.communicate("\n", timeout=30)
    wait_for(lambda: m.stats()["passthrough"]["held_evicted_bytes"] == 0,
             what="the held copy to be released")
    assert m.stats()["fast_tier"]["used_bytes"] == 3 * MiB


# -- cold files in the page cache ----------------------------------------------

def page_cache(m) -> tuple[int, int]:
    pt = m.stats()["passthrough"]
    return pt["page_cache_opens"], pt["page_cache_bytes"]


@needs_kernel
def test_a_cold_file_in_the_page_cache_is_read_by_the_kernel_from_the_cold_file(tmp_path,
                                                                                  mounter):
    """A file not in the fast tier whose cold file is all in the page cache
    opens in passthrough to the cold file: pread and mmap read the cold
    bytes with no read reaching the daemon, and the open promotes it as a
    first read would; a file with its pages dropped is served by the daemon; a
    fast copy wins over the page cache; an O_DIRECT open beside a live one
    gets a new inode served by the daemon (any buffer, no EINVAL), and its
    path stays off the cold file for a while; and a
    live open sees the cold file as a direct reader does when it is
    truncated in place: a short read, never a zero that was not there."""
    from conftest import drop_pages
    cold = tmp_path / "cold"
    want = write_random(cold / "f.bin", BLOB, 5).read_bytes()
    other = write_random(cold / "g.bin", BLOB, 6).read_bytes()
    third = write_random(cold / "h.bin", BLOB, 7).read_bytes()
    m = mounter(cold, extra=["--passthrough", "on", "--no-prefetch"])
    assert started(m)["active"] is True
    rng = random.Random(1)
    assert (cold / "f.bin").read_bytes() == want  # into the page cache
    with open(m.path("f.bin"), "rb") as f:
        check_preads(f.fileno(), want, rng, 20, "f.bin in the page cache")
        assert page_cache(m) == (1, BLOB)
        assert check_mmap(m.path("f.bin"), want, rng, 10, "f.bin mmap")  # joins it
        assert page_cache(m) == (2, 2 * BLOB)
        assert daemon_reads(m) == 0
        # an O_DIRECT open must not join the cold file's passthrough (a disk
        # refuses an unaligned buffer): a new inode, served by the daemon
        fd = os.open(m.path("f.bin"), os.O_RDONLY | os.O_DIRECT)
        try:
            assert os.fstat(fd).st_ino != os.fstat(f.fileno()).st_ino
            check_preads(fd, want, rng, 5, "f.bin O_DIRECT, unaligned")
        finally:
            os.close(fd)
    reads_before = daemon_reads(m)
    assert reads_before > 0  # the O_DIRECT reads, and only they
    m.wait_tier("f.bin")  # promoted at the open, as a first read would have

    # pages dropped: the daemon serves it, and promotes it
    drop_pages(cold / "g.bin")
    wait_for(lambda: m.stats()["open_files"] <= 1, what="the opens to be released")
    opens_before = page_cache(m)[0]
    assert read_whole(m.path("g.bin")) == other
    assert page_cache(m)[0] == opens_before and daemon_reads(m) > reads_before
    m.wait_tier("g.bin")
    # in the fast tier and in the page cache: the fast copy serves it
    assert (cold / "g.bin").read_bytes() == other
    wait_for(lambda: m.stats()["open_files"] <= 1, what="the opens to be released")
    fast_opens = m.stats()["passthrough"]["opens"]
    assert read_whole(m.path("g.bin")) == other
    assert m.stats()["passthrough"]["opens"] == fast_opens + 1
    assert page_cache(m)[0] == opens_before

    # a path opened with O_DIRECT lately stays off its cold file (a retried
    # O_DIRECT open must not meet such an inode again): evicted and all in
    # the page cache, f.bin is served by the daemon
    wait_for(lambda: m.stats()["promotions_in_flight"] == 0, what="f.bin's promotion to end")
    act(m.path("f.bin"), "evict")
    assert (cold / "f.bin").read_bytes() == want
    wait_for(lambda: m.stats()["open_files"] <= 1, what="the opens to be released")
    opens_before = page_cache(m)[0]
    assert read_whole(m.path("f.bin")) == want
    assert page_cache(m)[0] == opens_before

    # truncated in place under a live open of the cold file: what a direct
    # reader gets, a short read, and the right bytes before it
    assert (cold / "h.bin").read_bytes() == third
    wait_for(lambda: m.stats()["open_files"] <= 1, what="the opens to be released")
    opens_before = page_cache(m)[0]
    fd = os.open(m.path("h.bin"), os.O_RDONLY)
    try:
        assert page_cache(m)[0] == opens_before + 1
        assert os.pread(fd, 4096, 0) == third[:4096]
        os.truncate(cold / "h.bin", BLOB // 2)
        for off in (0, BLOB // 2 - 1000, BLOB // 2, BLOB - 10):
            got = os.pread(fd, 4096, off)
            assert got == third[off:min(off + 4096, BLOB // 2)], off
    finally:
        os.close(fd)


@needs_kernel
def test_a_page_cache_open_keeps_its_file_when_the_cold_path_is_swapped(tmp_path, mounter):
    """Under live opens of cold files in the page cache (pread and mmap),
    the path is renamed over by another file, or swapped for a link to a
    file outside the cold directory: each open keeps reading the file it
    opened, byte for byte, and new opens see the new file, or nothing."""
    cold = tmp_path / "cold"
    old = {n: write_random(cold / n, BLOB, i).read_bytes() for i, n in enumerate(("r", "s"))}
    new = write_random(tmp_path / "new.bin", BLOB, 9).read_bytes()
    write_random(tmp_path / "outside" / "secret", BLOB, 10)
    m = mounter(cold, extra=["--passthrough", "on", "--no-prefetch"])
    assert started(m)["active"] is True
    for n in old:
        assert (cold / n).read_bytes() == old[n]  # into the page cache
    fds = {n: os.open(m.path(n), os.O_RDONLY) for n in old}
    maps = {n: mmap.mmap(fds[n], 0, prot=mmap.PROT_READ) for n in old}
    try:
        assert page_cache(m)[0] == 2
        os.rename(tmp_path / "new.bin", cold / "r")  # renamed over
        (cold / "s").unlink()
        (cold / "s").symlink_to(tmp_path / "outside" / "secret")  # a link leading out
        rng = random.Random(4)
        for n in old:
            check_preads(fds[n], old[n], rng, 20, f"{n} after the swap")
            assert maps[n][:] == old[n], f"{n} mmap after the swap"
        wait_for(lambda: read_whole(m.path("r")) == new, what="r to show the new file")
        with pytest.raises(FileNotFoundError):
            read_whole(m.path("s"))  # hidden: it leads outside
    finally:
        for n in old:
            maps[n].close()
            os.close(fds[n])
