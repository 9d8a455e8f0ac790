"""An emulated slow cold tier: an ext4 image on a loop device whose reads are
throttled by a cgroup-v1 blkio rule (see ../shared/DESIGN-NOTES.md).

Every process that touches the cold tier must run inside the cgroup:
`SlowCold.wrap(cmd)` prefixes a command so that it joins it before it execs.
Set-up and teardown are idempotent; teardown unmounts, detaches the loop
device and removes the cgroup, also after an interrupted run.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

BLKIO = Path("/sys/fs/cgroup/blkio")


def _run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


class SlowCold:
    def __init__(self, work: Path, size_mb: int, read_mbps: int) -> None:
        self.image = work / "slowcold.img"
        self.mnt = work / "slowcold"
        self.size_mb = size_mb
        self.bps = read_mbps * 1_000_000
        self.loop: str | None = None
        # one cgroup per image: a test's cold tier and a benchmark's are apart
        tag = hashlib.sha1(str(self.image.resolve()).encode()).hexdigest()[:8]
        self.cgroup = BLKIO / f"aattsfs-bench-{tag}"

    def __enter__(self) -> "SlowCold":
        self.teardown()
        try:
            self._setup()
        except BaseException:  # half set up: undo what was done
            self.teardown()
            raise
        return self

    def _setup(self) -> None:
        self.mnt.mkdir(parents=True, exist_ok=True)
        if not self.image.exists() or self.image.stat().st_size < self.size_mb << 20:
            self.image.unlink(missing_ok=True)
            _run("truncate", "-s", f"{self.size_mb}M", str(self.image))
            _run("mkfs.ext4", "-q", "-F", str(self.image))
        # direct I/O: the image's own page cache must not serve what the
        # throttle is supposed to slow down
        self.loop = _run("losetup", "--find", "--show", "--direct-io=on", str(self.image))
        _run("mount", self.loop, str(self.mnt))
        self.cgroup.mkdir(exist_ok=True)
        rdev = os.stat(self.loop).st_rdev
        (self.cgroup / "blkio.throttle.read_bps_device").write_text(
            f"{os.major(rdev)}:{os.minor(rdev)} {self.bps}\n")

    def wrap(self, cmd: list[str]) -> list[str]:
        return ["sh", "-c", f'echo $$ > {self.cgroup}/cgroup.procs && exec "$@"', "sh", *cmd]

    def read_bytes(self) -> int:
        """Bytes the cgroup's processes have read from the cold tier so far."""
        rdev = os.stat(self.loop).st_rdev
        dev = f"{os.major(rdev)}:{os.minor(rdev)}"
        for line in (self.cgroup / "blkio.throttle.io_service_bytes").read_text().splitlines():
            fields = line.split()
            if fields[:2] == [dev, "Read"]:
                return int(fields[2])
        return 0

    def fill(self, src: Path, name: str) -> Path:
        dest = self.mnt / name
        marker = dest.parent / f".{dest.name}.source"
        if not marker.exists() or marker.read_text() != str(src):
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(src, dest, symlinks=True)  # a hub cache's snapshot links
            marker.write_text(str(src))
        return dest

    def teardown(self) -> None:
        if self.mnt.exists() and os.path.ismount(self.mnt):
            subprocess.run(["umount", str(self.mnt)], check=False)
        for line in _run("losetup", "-j", str(self.image)).splitlines() if \
                self.image.exists() else []:
            subprocess.run(["losetup", "-d", line.split(":")[0]], check=False)
        if self.cgroup.exists():
            for pid in (self.cgroup / "cgroup.procs").read_text().split():
                # a process left in the cgroup (an interrupted run): move it out
                (BLKIO / "cgroup.procs").write_text(pid)
            self.cgroup.rmdir()

    def __exit__(self, *exc) -> None:
        self.teardown()
