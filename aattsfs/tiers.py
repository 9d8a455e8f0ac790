"""The two tiers: a read-only view of the cold directory, and the fast
directory with its byte budget.

Neither knows about FUSE, trio or policies. Paths handed in are relative to
the tier root ("" is the root) and come from the namespace, which only ever
builds them from single names the kernel looked up.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import uuid

log = logging.getLogger(__name__)


class ColdTier:
    """The backing directory. aattsfs never writes to it."""

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)

    def path(self, rel: str) -> str:
        return os.path.join(self.root, rel) if rel else self.root

    def lstat(self, rel: str) -> os.stat_result:
        return os.lstat(self.path(rel))

    def exists(self, rel: str) -> bool:
        return os.path.lexists(self.path(rel))

    def listdir(self, rel: str) -> list[str]:
        return sorted(os.listdir(self.path(rel)))

    def _inside(self, real: str) -> bool:
        return real == self.root or real.startswith(self.root + os.sep)

    def readlink(self, rel: str) -> str | None:
        """The link target as the mount should show it, or None when the link
        leads outside the cold directory (such links are hidden).

        Relative targets that stay inside are shown as they are; absolute
        targets inside the tree are rewritten relative to the link, so that the
        kernel resolves them inside the mount, not in the cold directory."""
        target = os.readlink(self.path(rel))
        link_dir = os.path.dirname(self.path(rel))
        real = os.path.realpath(os.path.join(link_dir, target))
        if not self._inside(real):
            return None
        return os.path.relpath(real, link_dir) if os.path.isabs(target) else target

    def open(self, rel: str) -> int:
        """Open a regular file for reading, refusing anything that a change in
        the cold tree since the lookup would resolve outside of it."""
        path = self.path(rel)
        if not self._inside(os.path.realpath(path)):
            raise PermissionError(f"{rel} leads outside the cold directory")
        return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)


class FastTier:
    """A directory holding complete copies of cold files, within a byte budget.

    Layout: ``data/<relative path>`` holds committed copies, ``tmp/`` the
    copies being filled. A committed copy carries the cold file's mtime and
    has its size, so it describes itself: after any crash, a copy is valid iff
    its size and mtime equal the cold file's (see docs/crash-recovery.md).

    `used` counts committed bytes plus reservations for promotions in flight;
    the store reserves before it writes a single byte, so `used` never goes
    over `budget`.
    """

    def __init__(self, root: str, budget: int) -> None:
        self.root = root
        self.budget = budget
        self.data = os.path.join(root, "data")
        self.tmp = os.path.join(root, "tmp")
        self.used = 0
        os.makedirs(self.data, exist_ok=True)
        os.makedirs(self.tmp, exist_ok=True)

    @property
    def free(self) -> int:
        return self.budget - self.used

    def path(self, rel: str) -> str:
        return os.path.join(self.data, rel)

    def scan(self) -> dict[str, os.stat_result]:
        """Drop partial copies and return what `data/` holds (for recovery)."""
        shutil.rmtree(self.tmp, ignore_errors=True)
        os.makedirs(self.tmp, exist_ok=True)
        found = {}
        for dirpath, _dirs, files in os.walk(self.data):
            for name in files:
                full = os.path.join(dirpath, name)
                st = os.lstat(full)
                if stat.S_ISREG(st.st_mode):
                    found[os.path.relpath(full, self.data)] = st
                else:
                    os.unlink(full)
        return found

    def reserve(self, n: int) -> bool:
        if n > self.free:
            return False
        self.used += n
        return True

    def release(self, n: int) -> None:
        self.used -= n
        assert self.used >= 0, "fast-tier accounting went negative"

    def create_temp(self) -> tuple[str, int]:
        path = os.path.join(self.tmp, uuid.uuid4().hex + ".part")
        return path, os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)

    def commit(self, tmp_path: str, fd: int, rel: str, mtime_ns: int) -> None:
        """Make a filled temporary copy the valid copy of `rel` (blocking:
        call from a worker thread). The rename is the commit point."""
        os.fsync(fd)
        os.utime(fd, ns=(mtime_ns, mtime_ns))
        dest = self.path(rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        os.rename(tmp_path, dest)

    def remove(self, rel: str) -> None:
        try:
            os.unlink(self.path(rel))
        except FileNotFoundError:
            pass

    def open(self, rel: str) -> int:
        return os.open(self.path(rel), os.O_RDONLY | os.O_CLOEXEC)
