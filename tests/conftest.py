"""Fixtures that mount real aattsfs filesystems.

Each mount runs the real daemon in the foreground as a subprocess. Teardown
always unmounts (lazily if busy), waits for the daemon, kills it if it will
not go, and fails the test if the daemon logged a warning, an error or a
traceback that the test did not declare with `Mount.expect_log`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
import threading
import time
from pathlib import Path

import pytest

from aattsfs.mount import is_mounted
from aattsfs.tiers import FastTier

MiB = 1 << 20
PAGE_SLACK = 64 << 10  # tmpfs rounds each file up to whole pages
BAD_LOG = re.compile(r"WARNING|ERROR|CRITICAL|Traceback")


def wait_for(predicate, timeout=30.0, what="condition", interval=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run_cli(*args, check=True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "aattsfs", *map(str, args)],
                          capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"aattsfs {args} failed: {proc.stderr}")
    return proc


def drop_pages(root: Path) -> None:
    """Drop the page cache of the file root, or of every file below it, as on a cold tier that
    is not in memory: a file wholly in the page cache is opened in
    passthrough to the cold file itself (docs/passthrough.md), and most
    tests are about what the daemon does with reads. A test about that
    passthrough reads the cold file first."""
    os.sync()  # written pages are dirty until then, and DONTNEED keeps those
    paths = [root] if root.is_file() else \
        [Path(d) / n for d, _dirs, files in os.walk(root) for n in files]
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:  # a FIFO, say
            pass
        finally:
            os.close(fd)


def act(path, action: str) -> None:
    """What `aattsfs warm|evict|pin|unpin PATH` asks the daemon, raising its
    OSError (for tests that race actions against reads)."""
    from aattsfs.control import Client
    from aattsfs.mount import aattsfs_mount_of

    mountpoint = aattsfs_mount_of(str(path))
    if mountpoint is None:  # its daemon was killed, say: what setxattr said then
        raise OSError(errno.ENOTCONN, "not on a live aattsfs mount", str(path))
    with Client(mountpoint) as client:
        client.act(action, os.path.relpath(os.path.realpath(path), mountpoint))


class Mount:
    def __init__(self, root: Path, cold: Path, fast_size="256M", policy="lru",
                 extra=(), fast: Path | None = None, env: dict | None = None,
                 admission="reuse", command=None) -> None:
        self.cold = Path(cold)
        self.mnt = root / "mnt"
        self.fast = fast or root / "fast"
        self.state = root / "state"
        self.log = root / "daemon.log"
        self.fast_size = fast_size
        self.policy = policy
        self.admission = admission
        self.extra = list(extra)
        self.env = env  # added to the environment; a None value removes the variable
        # the aattsfs to run: this checkout's by default, an installed one's
        # console script in tests of the package (test_packaging.py)
        self.command = list(command or [sys.executable, "-m", "aattsfs"])
        self.allowed: list[re.Pattern] = []
        self.proc: subprocess.Popen | None = None
        self.mnt.mkdir(parents=True, exist_ok=True)

    def start(self) -> "Mount":
        drop_pages(self.cold)
        cmd = [*self.command, "mount", str(self.cold), str(self.mnt),
               "--foreground", "--fast-dir", str(self.fast), "--state-dir", str(self.state),
               "--fast-size", str(self.fast_size), "--policy", self.policy,
               "--admission", self.admission, *self.extra]
        with open(self.log, "ab") as logf:
            env = None if self.env is None else {
                k: v for k, v in {**os.environ, **self.env}.items() if v is not None}
            self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env)

        def live():
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited ({self.proc.returncode}):\n"
                                     f"{self.log.read_text()}")
            return is_mounted(self.mnt)

        wait_for(live, what=f"mount of {self.mnt}")
        return self

    def stop(self, kill=False) -> None:
        if self.proc is None:
            return
        if kill:
            self.proc.kill()
        if is_mounted(self.mnt):
            if subprocess.run(["fusermount3", "-u", str(self.mnt)],
                              capture_output=True).returncode != 0:
                subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def path(self, rel="") -> Path:
        return self.mnt / rel

    def copy(self, rel) -> Path:
        """Where the fast tier keeps its copy of rel."""
        return self.fast / "copies" / FastTier.name(rel)

    def stats(self) -> dict:
        return json.loads((self.mnt / ".aatts" / "stats").read_bytes())

    def tier(self, rel) -> str:
        return os.getxattr(self.mnt / rel, "user.aatts.tier").decode()

    def wait_tier(self, rel, tier="fast"):
        wait_for(lambda: self.tier(rel) == tier, what=f"{rel} in tier {tier}")

    def expect_log(self, pattern: str) -> None:
        self.allowed.append(re.compile(pattern))

    def unexpected_log_lines(self) -> list[str]:
        if not self.log.exists():
            return []
        lines = self.log.read_text(errors="replace").splitlines()
        return [ln for ln in lines if BAD_LOG.search(ln)
                and not any(p.search(ln) for p in self.allowed)]


@pytest.fixture
def mounter(tmp_path, request, fast_tmpfs):  # after fast_tmpfs: unmounted before it
    mounts: list[Mount] = []

    def make(cold, start=True, root=None, **kw) -> Mount:
        m = Mount(root or tmp_path / f"m{len(mounts)}", cold, **kw)
        mounts.append(m)
        return m.start() if start else m

    try:
        yield make
    finally:
        for m in mounts:
            m.stop()
    for m in mounts:
        bad = m.unexpected_log_lines()
        if bad:
            pytest.fail("daemon logged unexpected problems:\n" + "\n".join(bad[:20]))


class BudgetWatch:
    """While the block runs, samples in a thread what the fast tier really
    holds (its own tmpfs: one statvfs is an atomic count, where a walk of the
    directory would add up files that never coexisted) and the daemon's own
    count; `peak_dir` and `peak_stats` are the largest seen."""

    def __init__(self, m: Mount) -> None:
        self.m = m
        self.peak_dir = self.peak_stats = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch)

    def _watch(self) -> None:
        while not self._done.is_set():
            sv = os.statvfs(self.m.fast)
            self.peak_dir = max(self.peak_dir, (sv.f_blocks - sv.f_bfree) * sv.f_frsize)
            self.peak_stats = max(self.peak_stats,
                                  self.m.stats()["fast_tier"]["used_bytes"])

    def __enter__(self) -> "BudgetWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()


@pytest.fixture
def open_root():
    """A directory every user can traverse (tmp_path is root's alone); set up
    before the mounter, so removed only after its mounts are gone."""
    d = Path(tempfile.mkdtemp(prefix="aattsfs-test-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def fast_tmpfs(tmp_path):
    """make(size) -> a directory on a tmpfs of its own, of `size` bytes;
    writing past it fails, so a daemon that overshoots its budget is caught."""
    def mount(path: Path, size: int) -> None:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                        str(path)], check=True)

    yield from _mounts(tmp_path / "fast-tmpfs", mount)


@dataclass
class LoopFs:
    path: Path  # where the ext4 filesystem is mounted
    dev: str  # its loop device
    image: Path  # the file behind the loop device

    def fail_reads(self) -> None:
        """Make the device fail every read past its first MiB with EIO, as a
        dying disk does: the image shrinks under the loop device."""
        os.truncate(self.image, MiB)
        subprocess.run(["losetup", "-c", self.dev], check=True)


@pytest.fixture
def loop_ext4(tmp_path):
    """make(size) -> a LoopFs: an ext4 filesystem of its own on a loop
    device; unmounted (lazily) and detached when the fixture ends, even if
    the test failed (request it before `mounter`)."""
    made: list[LoopFs] = []

    def make(size: int) -> LoopFs:
        n = len(made)
        image, path = tmp_path / f"ext4-{n}.img", tmp_path / f"ext4-{n}"
        with open(image, "wb") as f:
            f.truncate(size)
        subprocess.run(["mkfs.ext4", "-q", str(image)], check=True)
        dev = subprocess.run(["losetup", "--find", "--show", str(image)], check=True,
                             capture_output=True, text=True).stdout.strip()
        made.append(fs := LoopFs(path, dev, image))
        path.mkdir()
        subprocess.run(["mount", dev, str(path)], check=True)
        return fs

    try:
        yield make
    finally:
        for fs in reversed(made):
            subprocess.run(["umount", "-l", str(fs.path)], capture_output=True)
            subprocess.run(["losetup", "-d", fs.dev], check=True)


@pytest.fixture
def overlay_dir(tmp_path, fast_tmpfs):
    """make() -> an empty directory on overlayfs (lower, upper and work dirs
    on a tmpfs of their own). The daemon takes it as a fast tier (it has
    user xattrs) but the kernel refuses it as the backing file of a
    passthrough open (a stacked filesystem); as a cold tier, a filesystem
    that changes behind the kernel's back (its lower layer). Unmounted after
    the mounts on it (requested before `mounter`)."""
    def mount(path: Path) -> None:
        base = fast_tmpfs(256 * MiB)
        for d in ("lower", "upper", "work"):
            (base / d).mkdir()
        (base / "upper").chmod(0o700)
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={base}/lower,upperdir={base}/upper,workdir={base}/work",
                        str(path)], check=True)

    yield from _mounts(tmp_path / "overlay", mount)


def _mounts(prefix: Path, mount):
    """A fixture's body: yields make(*args) -> a new directory prefixN with
    mount(path, *args) done on it; every one is unmounted (lazily, newest
    first) when the fixture ends, even if the test failed."""
    mounted: list[Path] = []

    def make(*args) -> Path:
        path = prefix.with_name(f"{prefix.name}{len(mounted)}")
        path.mkdir()
        mount(path, *args)
        mounted.append(path)
        return path

    try:
        yield make
    finally:
        for path in reversed(mounted):
            subprocess.run(["umount", "-l", str(path)], check=False)


def write_random(path: Path, size: int, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(random.Random(seed).randbytes(size))
    return path


@pytest.fixture
def cold_tree(tmp_path) -> Path:
    """A cold directory with files around the chunk size, many small files,
    nested directories, an empty file and symlinks of every kind."""
    cold = tmp_path / "cold"
    write_random(cold / "big.bin", 9 * MiB + 12345, 1)
    write_random(cold / "mid.bin", 3 * MiB, 2)
    write_random(cold / "models" / "a" / "weights.bin", 4 * MiB, 3)
    write_random(cold / "models" / "b" / "weights.bin", 4 * MiB, 4)
    write_random(cold / "models" / "c" / "weights.bin", 4 * MiB, 5)
    for i in range(300):
        write_random(cold / "many" / f"f{i:04d}.txt", 100 + i, 100 + i)
    (cold / "empty").write_bytes(b"")
    (cold / "nested" / "deep" / "er").mkdir(parents=True)
    (cold / "nested" / "deep" / "er" / "note.txt").write_text("deep\n")
    os.symlink("nested/deep/er/note.txt", cold / "rel-link")
    os.symlink(cold / "mid.bin", cold / "abs-link")
    os.symlink("/etc/hostname", cold / "escape-abs")
    os.symlink("../../outside", cold / "escape-rel")
    os.chmod(cold / "mid.bin", 0o640)
    return cold


def manifest(root: Path) -> dict:
    """Everything observable about a tree, to prove it was not modified."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            st = p.lstat()
            digest = sha256(p) if p.is_file() and not p.is_symlink() else os.readlink(p) \
                if p.is_symlink() else None
            xattrs = sorted(os.listxattr(p, follow_symlinks=False))
            out[str(p.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns, digest,
                                             xattrs)
    return out
