"""Trust first: never a wrong byte, never a cold file touched, never outside
the root, never hung. One test per fault found (issue "Trust first"); each
failed on the code before the fix."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from aattsfs.mount import is_mounted
from conftest import MiB, manifest, run_cli, sha256, wait_for, write_random

NOBODY = 65534
SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin") or "python3"
_libc = ctypes.CDLL(None, use_errno=True)


def exchange(a: Path, b: Path) -> None:
    """renameat2(RENAME_EXCHANGE): swap two names atomically."""
    if _libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), 2) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def one_line_error(proc, *needles):
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("aattsfs: error: "), proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


# -- 1. the fast tier's filesystem filling mid-copy -------------------------

def test_full_fast_filesystem_never_commits_a_gap(tmp_path, mounter, fast_tmpfs):
    cold = tmp_path / "cold"
    data = write_random(cold / "f.bin", 5 * MiB, 1).read_bytes()
    fast = fast_tmpfs(8 * MiB)
    m = mounter(cold, fast=fast, fast_size="6M")
    m.expect_log("the fast tier's filesystem is full")
    (fast / "junk").write_bytes(b"\0" * (3 * MiB + MiB // 2))  # 4.5 MiB stay free
    with open(m.path("f.bin"), "rb") as f:
        # the chunk at 4 MiB lands first; the one at 0 then runs out of room
        assert os.pread(f.fileno(), MiB, 4 * MiB) == data[4 * MiB:]
        offsets = list(range(0, 5 * MiB, 256 << 10))
        random.Random(1).shuffle(offsets)
        for off in offsets:
            assert os.pread(f.fileno(), 256 << 10, off) == data[off:off + (256 << 10)]
    wait_for(lambda: m.stats()["promotions_in_flight"] == 0, what="the promotion to end")
    s = m.stats()
    assert s["promotions_nospace"] == 1 and s["promotions"] == 0
    assert m.tier("f.bin") == "cold"
    assert m.path("f.bin").read_bytes() == data
    m.stop()
    (fast / "junk").unlink()
    m.start()
    assert m.tier("f.bin") == "cold"  # nothing half-copied was kept
    assert m.path("f.bin").read_bytes() == data
    m.wait_tier("f.bin")  # with room again it promotes, verified
    assert m.copy("f.bin").read_bytes() == data


def test_full_fast_filesystem_sequential_read_is_whole(tmp_path, mounter, fast_tmpfs):
    cold = tmp_path / "cold"
    write_random(cold / "f.bin", 18 * MiB, 2)
    fast = fast_tmpfs(24 * MiB)
    m = mounter(cold, fast=fast, fast_size="20M")
    m.expect_log("the fast tier's filesystem is full")
    (fast / "junk").write_bytes(b"\0" * (6 * MiB + MiB // 2))
    assert sha256(m.path("f.bin")) == sha256(cold / "f.bin")
    wait_for(lambda: m.stats()["promotions_in_flight"] == 0, what="the promotion to end")
    assert m.tier("f.bin") == "cold"
    assert sha256(m.path("f.bin")) == sha256(cold / "f.bin")


# -- 2. cold files deleted: who owns the fast dir ---------------------------

def test_cold_dir_inside_the_fast_dir_is_refused(tmp_path):
    fast, mnt = tmp_path / "fast", tmp_path / "mnt"
    mnt.mkdir()
    for i in range(3):
        write_random(fast / "data" / f"f{i}", 3 * MiB, i)
    write_random(fast / "tmp" / "keep.txt", 10, 9)
    before = manifest(fast)
    proc = run_cli("mount", fast / "data", mnt, "--fast-dir", fast, "--fast-size", "5M",
                   "--state-dir", tmp_path / "state", check=False)
    one_line_error(proc, "overlaps the cold directory")
    assert manifest(fast) == before and not is_mounted(mnt)


def test_a_fast_dir_with_foreign_files_or_another_mount_is_refused(cold_tree, tmp_path,
                                                                   mounter):
    foreign = tmp_path / "foreign"
    write_random(foreign / "keep.txt", 10, 1)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    args = ["--fast-size", "16M", "--state-dir", tmp_path / "s1"]
    one_line_error(run_cli("mount", cold_tree, mnt, "--fast-dir", foreign, *args, check=False),
                   "did not make")
    assert (foreign / "keep.txt").exists()
    m = mounter(cold_tree)
    one_line_error(run_cli("mount", cold_tree, mnt, "--fast-dir", m.fast, *args, check=False),
                   "in use by another aattsfs")
    one_line_error(run_cli("mount", cold_tree, mnt, "--fast-dir", tmp_path / "f2",
                           "--state-dir", tmp_path / "f2" / "state", "--fast-size", "16M",
                           check=False), "overlap")
    assert sha256(m.path("mid.bin")) == sha256(cold_tree / "mid.bin")
    assert not is_mounted(mnt)


def test_a_fast_dir_under_another_users_directory_is_refused(cold_tree, open_root):
    # a local user made the shared parent first (as /dev/shm/aattsfs could be)
    shared = open_root / "shm" / "aattsfs"
    shared.mkdir(parents=True)
    os.chown(shared, NOBODY, NOBODY)
    mnt = open_root / "mnt"
    mnt.mkdir()
    proc = run_cli("mount", cold_tree, mnt, "--fast-dir", shared / "x", "--fast-size", "16M",
                   "--state-dir", open_root / "state", check=False)
    one_line_error(proc, "another user can change", "--fast-dir")
    assert not is_mounted(mnt) and not (shared / "x").exists()


def test_only_its_own_copies_are_ever_deleted(cold_tree, mounter):
    m = mounter(cold_tree, fast_size="64M")
    run_cli("warm", m.path("mid.bin"))
    stray = m.fast / "copies" / "notes.txt"
    stray.write_text("mine\n")
    run_cli("evict", m.path("mid.bin"))
    m.stop()
    m.expect_log("is not an aattsfs copy; left alone")
    m.start()
    m.path("big.bin").read_bytes()
    m.wait_tier("big.bin")
    assert stray.read_text() == "mine\n"


def test_a_refused_mount_removes_the_directories_it_created(cold_tree, tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with taken:
        proc = run_cli("mount", cold_tree, mnt, "--foreground", "--fast-size", "16M",
                       "--fast-dir", tmp_path / "new" / "fast", "--state-dir",
                       tmp_path / "new2" / "state", "--metrics-address",
                       f"127.0.0.1:{taken.getsockname()[1]}", check=False)
    assert proc.returncode == 2 and "cannot be used" in proc.stderr
    assert not (tmp_path / "new").exists() and not (tmp_path / "new2").exists()


# -- 3. nothing outside the cold root ---------------------------------------

def test_a_directory_swapped_for_a_link_never_leads_outside(tmp_path, mounter):
    cold, outside = tmp_path / "cold", tmp_path / "outside"
    inside = write_random(cold / "d" / "x", 64 << 10, 1).read_bytes()
    secret = write_random(outside / "x", 64 << 10, 2).read_bytes()
    m = mounter(cold)
    stop = threading.Event()
    swaps = 0

    def swapper():
        nonlocal swaps
        link = cold / "link"
        os.symlink(outside, link)
        while not stop.is_set():
            exchange(cold / "d", link)
            swaps += 1
    t = threading.Thread(target=swapper)
    t.start()
    reads = good = 0
    try:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                with open(m.path("d/x"), "rb") as f:
                    data = f.read()
            except OSError:
                continue
            reads += 1
            assert data != secret, "read the file outside the cold directory"
            assert data == inside
            good += 1
    finally:
        stop.set()
        t.join()
    if (cold / "d").is_symlink():
        exchange(cold / "d", cold / "link")
    assert swaps > 100 and good > 0
    assert m.path("d/x").read_bytes() == inside  # and nothing outside stayed cached


def test_another_user_reads_only_what_the_cold_tree_allows(open_root, tmp_path, mounter):
    cold = open_root / "cold"
    write_random(cold / "pub" / "a.bin", 4096, 1)
    secret = write_random(cold / "private" / "secret.bin", 4096, 2).read_bytes()
    (cold / "private").chmod(0o700)
    (cold / "pub").chmod(0o755)
    (cold / "pub" / "a.bin").chmod(0o644)
    own = cold / "mine"
    mine = write_random(own / "x", 4096, 3).read_bytes()
    os.chown(own, NOBODY, NOBODY)
    os.chown(cold, NOBODY, NOBODY)  # so that nobody can rename entries of the root
    m = mounter(cold, root=open_root, extra=["--allow-other"])
    m.path("private/secret.bin").read_bytes()  # root opened it: now it is in the trace

    def as_nobody(code: str) -> subprocess.CompletedProcess:
        # the system's python: the test's own may live under root's 0700 home
        return subprocess.run([SYSTEM_PYTHON, "-c", code], capture_output=True, text=True,
                              user=NOBODY, group=NOBODY, extra_groups=[], timeout=60)

    probe = as_nobody(f"""
import os
ok = open({str(m.path('pub/a.bin'))!r}, 'rb').read() == open({str(cold / 'pub/a.bin')!r}, 'rb').read()
res = []
for p in ({str(m.path('private/secret.bin'))!r}, {str(m.path('.aatts/tiers'))!r},
          {str(m.path('.aatts/trace'))!r}):
    try:
        open(p, 'rb').read(); res.append('read')
    except PermissionError:
        res.append('denied')
try:
    os.listdir({str(m.path('private'))!r}); res.append('listed')
except PermissionError:
    res.append('denied')
open({str(m.path('.aatts/stats'))!r}, 'rb').read()
print(ok, *res)
""")
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == ["True", "denied", "denied", "denied", "denied"]
    # The hostile user swaps a directory it owns for a link to the private one
    # while reading through the mount.
    race = as_nobody(f"""
import ctypes, os, time
libc = ctypes.CDLL(None, use_errno=True)
cold, mnt = {str(cold)!r}, {str(m.mnt)!r}
os.symlink(cold + '/private', cold + '/evil')
os.rename(cold + '/mine/x', cold + '/mine/secret.bin')
leaked = reads = 0
pid = os.fork()
if pid == 0:
    end = time.monotonic() + 3
    while time.monotonic() < end:
        libc.renameat2(-100, (cold + '/mine').encode(), -100, (cold + '/evil').encode(), 2)
    os._exit(0)

def read_for(seconds):
    global reads, leaked
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            data = open(mnt + '/mine/secret.bin', 'rb').read()
        except OSError:
            continue
        reads += 1
        leaked += data == {secret!r}

read_for(3)
os.waitpid(pid, 0)
if os.path.islink(cold + '/mine'):
    libc.renameat2(-100, (cold + '/mine').encode(), -100, (cold + '/evil').encode(), 2)
# The kernel keeps what a lookup found for the entry timeout (1 s), so the
# race itself may see only the link or a negative entry; once it is over,
# the file reads, and still only as the file of the user's own directory.
read_for(1.5)
print(reads, leaked)
""")
    assert race.returncode == 0, race.stderr
    reads, leaked = map(int, race.stdout.split())
    assert leaked == 0 and reads > 0
    assert (cold / "mine" / "secret.bin").read_bytes() == mine


def test_a_reused_inode_number_never_shows_the_old_files_size(tmp_path, mounter):
    """The cold filesystem reuses a freed inode number at once (ext4 does):
    a file put in place under the number of the one the kernel still caches
    must not be read with the old file's size or pages."""
    cold = tmp_path / "cold"
    write_random(cold / "f", 3 * MiB, 1)
    m = mounter(cold, extra=["--no-prefetch"])
    old = os.stat(cold / "f").st_ino
    assert os.stat(m.path("f")).st_size == 3 * MiB  # the kernel caches it now
    os.rename(write_random(cold / "small", MiB, 2), cold / "f")  # frees the number
    for i in range(20):
        new = write_random(cold / f"c{i}", 5 * MiB, 3 + i)
        if os.stat(new).st_ino == old:
            break
    else:
        pytest.skip("this filesystem did not reuse the inode number")
    os.rename(new, cold / "f")
    # within the kernel's entry timeout: the open goes to the cached inode
    assert m.path("f").read_bytes() == (cold / "f").read_bytes()


def test_a_file_rewritten_in_place_under_readers_never_reads_as_zeros(tmp_path, mounter):
    """A writer truncates a cold file to nothing and writes the next version
    in its place, again and again; four readers read it whole through the
    mount. A reader may get a version, a prefix of one (the cold file is
    itself half written), parts of two (as reading the cold file directly
    does), or an error, but never a byte the file never held:
    the kernel zero-fills a short read if it believes the file longer than
    the open found it, which two changes within one tick of the clock (same
    ctime) allowed until the size was part of an inode's identity (1 read
    in about 7,000 zero-filled, found by a hostile test)."""
    cold = tmp_path / "cold"
    cold.mkdir()
    path = cold / "f"

    def version(v: int) -> bytes:
        size = random.Random(v).choice([1, 100, 4096, 5000, 65536, 200000])
        return (f"v{v:08d}-".encode() * (size // 10 + 1))[:size]
    path.write_bytes(version(0))
    m = mounter(cold)
    stop = threading.Event()
    bad, reads = [], [0]

    def writer():
        v = 1
        while not stop.is_set():
            with open(path, "r+b") as f:
                f.truncate(0)
                f.write(version(v))
            v += 1
            time.sleep(random.choice([0, 0.0005, 0.002]))

    def reader():
        while not stop.is_set():
            try:
                data = m.path("f").read_bytes()
            except OSError:
                continue  # ESTALE, EIO: the file changed under the open
            reads[0] += 1
            # parts of two versions are what a direct read gets too (the
            # rewrite is in place); a zero byte no version ever held
            if b"\0" in data:
                bad.append((len(data), data[:24], data[-24:]))

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader)
                                                   for _ in range(4)]
    for t in threads:
        t.start()
    try:  # 8 s and 200 whole reads at least, however busy the machine
        time.sleep(8)
        wait_for(lambda: reads[0] > 200, timeout=120, what="200 reads")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not bad, f"{len(bad)} of {reads[0]} reads held bytes the file never had: {bad[:3]}"


def test_a_replacement_with_the_old_mtime_and_a_reused_inode_is_seen(tmp_path, mounter):
    """`cp -p`, `rsync -t` and `tar x` carry the old mtime over; ext4 gives
    the freed inode number to the next file: size, mtime and inode all
    equal, the content not. The fast copy must not be served, live or
    after a restart."""
    cold = tmp_path / "cold"
    path = write_random(cold / "w.bin", 2 * MiB, 1)
    st = path.stat()
    m = mounter(cold, fast_size="16M")
    run_cli("warm", m.path("w.bin"))

    def replace(seed: int) -> None:
        for attempt in range(20):  # until the cold fs reuses the number
            new = write_random(cold / f"n{seed}-{attempt}", 2 * MiB, seed * 100 + attempt)
            os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns))
            os.rename(new, path)
            if path.stat().st_ino == st.st_ino:
                return
        pytest.skip("this filesystem did not reuse the inode number")

    replace(2)
    assert m.path("w.bin").read_bytes() == path.read_bytes()
    m.wait_tier("w.bin")
    m.stop()
    replace(3)
    m.start()
    assert m.path("w.bin").read_bytes() == path.read_bytes()


def test_a_link_climbing_through_a_link_to_its_own_directory_is_hidden(tmp_path, mounter):
    cold = tmp_path / "cold"
    write_random(cold / "d" / "f", 100, 1)
    (tmp_path / "outside.txt").write_text("outside\n")
    os.symlink(".", cold / "up")
    os.symlink("up/../outside.txt", cold / "y")  # ".." of the root: outside
    os.symlink("up/up/up/../../../../etc/hostname", cold / "z")
    os.symlink("up/d/f", cold / "fine")
    m = mounter(cold)
    names = set(os.listdir(m.path()))
    assert "y" not in names and "z" not in names
    assert not os.path.lexists(m.path("y")) and not os.path.lexists(m.path("z"))
    assert m.path("fine").read_bytes() == (cold / "d" / "f").read_bytes()


@pytest.mark.parametrize("how", ["symlink", "foreign-files"])
def test_a_fast_dir_whose_copies_are_not_its_own_is_refused(cold_tree, tmp_path, how):
    victim = tmp_path / "victim"
    for i in range(3):  # hash-named files, as in a Hugging Face blobs/ directory
        (victim / f"{i:064x}").parent.mkdir(exist_ok=True)
        (victim / f"{i:064x}").write_bytes(b"blob")
    fast = tmp_path / "fast"
    fast.mkdir()
    if how == "symlink":
        os.symlink(victim, fast / "copies")
    else:
        shutil.copytree(victim, fast / "copies")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    before = manifest(tmp_path / "victim"), manifest(fast)
    proc = run_cli("mount", cold_tree, mnt, "--fast-dir", fast, "--fast-size", "16M",
                   "--state-dir", tmp_path / "state", check=False)
    one_line_error(proc, "fast dir")
    assert (manifest(tmp_path / "victim"), manifest(fast)) == before
    assert not is_mounted(mnt)


# -- 5. hangs ---------------------------------------------------------------

def _ls(path, *args) -> subprocess.CompletedProcess:
    return subprocess.run(["ls", *args, str(path)], capture_output=True, text=True, timeout=30)


def test_a_link_into_the_mount_and_a_mount_inside_the_tree_do_not_hang(cold_tree, tmp_path,
                                                                      mounter):
    m = mounter(cold_tree)
    os.symlink(m.path("nested/deep/er/note.txt"), cold_tree / "latest")
    (cold_tree / "loop").mkdir()
    (cold_tree / "tmpfs").mkdir()
    subprocess.run(["mount", "--bind", str(m.mnt), str(cold_tree / "loop")], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(cold_tree / "tmpfs")], check=True)
    try:
        (cold_tree / "tmpfs" / "hidden.txt").write_text("another filesystem\n")
        out = _ls(m.mnt, "-l")
        assert out.returncode == 0
        names = {line.split()[-1] for line in out.stdout.splitlines()[1:]}
        assert "latest" not in names  # its target lies outside the cold directory
        assert "loop" not in names and "tmpfs" not in names  # other filesystems
        assert _ls(m.mnt, "-lR").returncode == 0
        assert not m.path("loop/mid.bin").exists()
        assert sha256(m.path("mid.bin")) == sha256(cold_tree / "mid.bin")
    finally:
        subprocess.run(["umount", "-l", str(cold_tree / "loop")], check=False)
        subprocess.run(["umount", "-l", str(cold_tree / "tmpfs")], check=False)


@pytest.fixture
def bindfs_cold(tmp_path):
    """The cold tree behind a bindfs FUSE mount, which a test can freeze
    with SIGSTOP: every cold call then hangs, as on a dead NFS server."""
    if not shutil.which("bindfs"):
        pytest.skip("bindfs is missing (make test installs it)")
    real, view = tmp_path / "real", tmp_path / "view"
    view.mkdir()
    write_random(real / "fast.bin", 6 * MiB, 1)
    for i in range(50):
        write_random(real / "dir" / f"f{i}", 1000, i)
    write_random(real / "slow.bin", MiB, 2)
    proc = subprocess.Popen(["bindfs", "-f", str(real), str(view)])
    try:
        wait_for(lambda: is_mounted(view), what="bindfs")
        yield real, view, proc
    finally:
        proc.send_signal(signal.SIGCONT)
        subprocess.run(["fusermount3", "-u", "-z", str(view)], check=False)
        proc.terminate()
        proc.wait(timeout=20)


@pytest.mark.timeout(120)
def test_a_hung_cold_tier_stalls_only_what_needs_it(bindfs_cold, mounter):
    real, view, bindfs = bindfs_cold
    m = mounter(view, fast_size="64M")
    run_cli("warm", m.path("fast.bin"))
    expected = (real / "fast.bin").read_bytes()
    f = open(m.path("fast.bin"), "rb")
    assert "dir" in os.listdir(m.path())  # names seen before the tier hangs
    slow = open(m.path("slow.bin"), "rb", buffering=0)
    hung = []
    try:
        bindfs.send_signal(signal.SIGSTOP)
        for target in (lambda: os.listdir(m.path("dir")),
                       lambda: m.path("slow.bin").read_bytes(),
                       lambda: slow.read(4096)):  # a promotion stuck in its first chunk
            t = threading.Thread(target=lambda fn=target: _swallow(fn), daemon=True)
            t.start()
            hung.append(t)
        time.sleep(0.5)  # let them get stuck in the cold tier
        assert all(t.is_alive() for t in hung), "the cold tier did not hang"
        reader = threading.Thread(target=lambda: [os.pread(f.fileno(), MiB, off)
                                                  for off in range(0, 6 * MiB, MiB)])
        reader.start()
        reader.join(timeout=20)
        assert not reader.is_alive(), "a fast-tier read waited for the hung cold tier"
        assert os.pread(f.fileno(), 6 * MiB, 0) == expected
        stats = m.stats()  # the control surface answers too
        assert stats["opens"]["fast"] >= 1 and stats["promotions_in_flight"] == 1
        m.proc.send_signal(signal.SIGTERM)
        # Shutdown does not wait for the hung threads: the mount is gone and
        # the state lock free at once. (The process itself may linger until
        # the cold tier answers: a FUSE request the stopped bindfs had read
        # already holds its thread in the kernel, uninterruptibly.)
        wait_for(lambda: not is_mounted(m.mnt) and _lock_free(m.state / "lock"),
                 timeout=15, what="the unmount and the state lock")
    finally:
        f.close()
        bindfs.send_signal(signal.SIGCONT)
        for t in hung:
            t.join(timeout=20)
        slow.close()


def _lock_free(path: Path) -> bool:
    lock = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(lock)


def _swallow(fn):
    try:
        fn()
    except OSError:
        pass


def test_a_hung_mount_inside_the_cold_tree_stalls_nothing(bindfs_cold, tmp_path, mounter):
    real, view, bindfs = bindfs_cold  # here: a filesystem mounted inside the cold tree
    cold = tmp_path / "cold"
    write_random(cold / "sub" / "a.txt", 1000, 1)
    (cold / "sub" / "m").mkdir()
    subprocess.run(["mount", "--bind", str(view), str(cold / "sub" / "m")], check=True)
    try:
        m = mounter(cold)
        assert os.listdir(m.path("sub")) == ["a.txt"]
        bindfs.send_signal(signal.SIGSTOP)
        try:
            done = []
            t = threading.Thread(target=lambda: done.append(
                (sorted(os.listdir(m.path("sub"))), m.path("sub/a.txt").read_bytes())),
                daemon=True)
            t.start()
            t.join(timeout=20)
            assert done == [(["a.txt"], (cold / "sub" / "a.txt").read_bytes())], \
                "listing next to a hung mount waited for it"
        finally:
            bindfs.send_signal(signal.SIGCONT)
    finally:
        subprocess.run(["umount", "-l", str(cold / "sub" / "m")], check=False)


# -- 7. a fast copy changed behind the daemon's back ------------------------

def _flip_a_byte(path: Path, off: int) -> None:
    st = path.stat()
    with open(path, "r+b") as f:
        b = os.pread(f.fileno(), 1, off)
        os.pwrite(f.fileno(), bytes([b[0] ^ 0xFF]), off)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_changed_fast_copy_is_never_served(cold_tree, mounter):
    m = mounter(cold_tree, fast_size="64M")
    m.expect_log("changed behind aattsfs's back|does not match its digest")
    cold = (cold_tree / "mid.bin").read_bytes()
    run_cli("warm", m.path("mid.bin"), m.path("big.bin"))
    _flip_a_byte(m.copy("mid.bin"), 1000)  # while the daemon runs
    assert m.path("mid.bin").read_bytes() == cold
    assert m.stats()["copies_corrupt"] == 1
    m.wait_tier("mid.bin")  # promoted again, from cold
    m.stop()
    _flip_a_byte(m.copy("big.bin"), 5 * MiB)  # while it is stopped
    m.start()
    wait_for(lambda: m.stats()["copies_corrupt"] == 1, what="the copy to be checked")
    assert m.tier("big.bin") == "cold"
    assert sha256(m.path("big.bin")) == sha256(cold_tree / "big.bin")
    m.wait_tier("mid.bin")


def test_verify_rehashes_every_copy(cold_tree, mounter):
    m = mounter(cold_tree, fast_size="64M")
    m.expect_log("does not match its digest")
    run_cli("warm", m.path("models"))
    report = json.loads(m.path(".aatts/verify").read_bytes())
    assert report == {"checked": 3, "bytes": 12 * MiB, "corrupt": []}
    _flip_a_byte(m.copy("models/b/weights.bin"), 77)
    proc = run_cli("verify", m.mnt, check=False)
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.splitlines() == ["verified 3 copies (12.0 MiB): 1 did not match",
                                        "dropped (did not match): models/b/weights.bin"]
    assert m.tier("models/b/weights.bin") == "cold"
    assert sha256(m.path("models/b/weights.bin")) == \
        sha256(cold_tree / "models/b/weights.bin")


# -- 8. umount ---------------------------------------------------------------

def test_umount_refuses_a_filesystem_that_is_not_aattsfs(tmp_path):
    target = tmp_path / "t"
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(target)], check=True)
    try:
        one_line_error(run_cli("umount", target, check=False), "tmpfs", "not aattsfs")
        assert is_mounted(target)
    finally:
        subprocess.run(["umount", str(target)], check=False)


# -- 11. mistakes that were accepted ----------------------------------------

def test_pinning_what_cannot_fit_leaves_it_unpinned(cold_tree, mounter):
    m = mounter(cold_tree, fast_size="8M")
    proc = run_cli("pin", m.path("big.bin"), check=False)
    one_line_error(proc, "does not fit")
    assert os.getxattr(m.path("big.bin"), "user.aatts.pinned") == b"0"


def test_a_cold_dir_this_user_cannot_reach_is_not_called_missing(open_root):
    from aattsfs.errors import UserError
    from aattsfs.mount import _check_dir_arg

    parent = open_root / "locked"
    (parent / "cold").mkdir(parents=True)
    parent.chmod(0o700)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # as nobody: root reaches every directory
        try:
            os.setegid(NOBODY)
            os.seteuid(NOBODY)
            _check_dir_arg(str(parent / "cold"), "cold directory")
            os.write(w, b"accepted")
        except UserError as exc:
            os.write(w, str(exc).encode())
        finally:
            os._exit(0)
    os.close(w)
    message = os.read(r, 4096).decode()
    os.close(r)
    os.waitpid(pid, 0)
    assert "cannot be reached" in message and "Permission denied" in message, message
