"""FUSE passthrough: opens of promoted files served by the kernel from the
fast copy, never by the daemon (docs/passthrough.md).

The C hooks (`aattsfs._passthrough`) must be loaded with RTLD_GLOBAL before
pyfuse3 is, so that pyfuse3's calls into libfuse reach them first: the
package's __init__ calls `load()` before anything imports pyfuse3.

`OpenModes` keeps the kernel's rules, per FUSE inode: while any passthrough
open of an inode lives, every new open of it is a passthrough open of the
same backing file; while any cached-mode open lives, every new open is
cached. The daemon learns that an open ended from its RELEASE, which the
kernel sends after it has ended the open's mode itself, so the daemon's view
is never behind in the direction that would make the kernel refuse an open
(EIO): both rules hold in the daemon's view, which includes the kernel's.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import sys
from dataclasses import dataclass
from typing import Callable, Protocol

from .tiers import fs_type

log = logging.getLogger(__name__)

MODES = ("auto", "on", "off")
MIN_KERNEL = (6, 9)
# A directory handle with this bit: the hooks ask the kernel to cache its
# listing across opens (FOPEN_CACHE_DIR and FOPEN_KEEP_CACHE); without the
# hooks the bit is just part of the number
CACHE_DIR = 1 << 63

_hooks = None
_load_error = "not loaded"


def load() -> None:
    """Load the hooks, process-wide; a failure is kept as the reason why
    passthrough is unavailable, never raised."""
    global _hooks, _load_error
    if _hooks is not None:
        return
    if "pyfuse3" in sys.modules:
        _load_error = "pyfuse3 was imported before aattsfs, so its calls cannot be hooked"
        return
    flags = sys.getdlopenflags()
    sys.setdlopenflags(flags | os.RTLD_GLOBAL)
    try:
        from . import _passthrough
    except ImportError as exc:
        _load_error = f"the aattsfs._passthrough extension is missing ({exc}); reinstall aattsfs"
        return
    finally:
        sys.setdlopenflags(flags)
    if not _passthrough.state()["compiled"]:
        _load_error = ("aattsfs was built against libfuse headers older than 3.17; "
                       "rebuild it (make) against libfuse 3.17 or later")
        return
    _hooks, _load_error = _passthrough, ""


def _kernel_ok() -> str:
    """Why the running kernel cannot do passthrough, or "" if it may."""
    release = os.uname().release
    try:
        version = tuple(int(x) for x in release.split("-")[0].split(".")[:2])
    except ValueError:
        return ""
    if version < MIN_KERNEL:
        return f"the kernel is {release}; FUSE passthrough needs Linux 6.9 or later"
    return ""


def _libfuse_version() -> tuple[int, str]:
    """The version of the libfuse pyfuse3 loaded (major*100+minor) and its path."""
    import ctypes

    import pyfuse3  # noqa: F401  (maps its libfuse)

    with open("/proc/self/maps") as f:
        path = next((line.split()[-1] for line in f if "/libfuse3.so" in line), "")
    if not path:
        return 0, ""
    return ctypes.CDLL(path).fuse_version(), path


def _has_sys_admin() -> bool:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> 21 & 1)  # CAP_SYS_ADMIN
    return False


STACKED = ("overlay", "ecryptfs")  # stacked filesystems: cannot back a passthrough open


def unavailable(fast_dir: str) -> str:
    """Why passthrough cannot work in this process with its fast tier in
    `fast_dir`, or "" if it may (the kernel's offer at INIT and a first
    backing file decide the rest)."""
    if _hooks is None:
        return _load_error
    why = _kernel_ok()
    if why:
        return why
    fstype = fs_type(fast_dir)
    if fstype.startswith(STACKED):
        return (f"the fast tier is on {fstype}, which cannot back passthrough (a stacked "
                "filesystem); put --fast-dir on tmpfs or a disk")
    version, path = _libfuse_version()
    if version < 317:
        return (f"pyfuse3 uses libfuse {version // 100}.{version % 100} ({path}); passthrough "
                "needs 3.17 or later (make builds one: docs/passthrough.md)")
    if not _has_sys_admin():
        return "the daemon lacks CAP_SYS_ADMIN, which the kernel asks of a backing file"
    return ""


_wanted = False


def configure(want: bool) -> None:
    """Before the mount: whether INIT asks for passthrough. Open replies get
    noflush either way (the mount is read-only: a flush has nothing to do)."""
    global _wanted
    _wanted = want and _hooks is not None
    if _hooks is not None:
        _hooks.configure(_wanted, True)


def wanted() -> bool:
    return _wanted


def negotiated() -> str:
    """After INIT: why the session has no passthrough, or "" if it has."""
    if _hooks is None:
        return _load_error
    st = _hooks.state()
    if not st["hooked"]:
        return "pyfuse3 did not create its session through the hooks (libfuse older than 3.17?)"
    if not st["init_seen"]:
        return "the kernel's INIT was not seen"
    if not st["capable"]:
        return ("the kernel does not offer FUSE passthrough (it needs Linux 6.9+ built "
                "with CONFIG_FUSE_PASSTHROUGH)")
    return ""


def probe(fd: int) -> str:
    """Open and close a backing file for fd (a file of the fast tier): why
    that fails, or "" if it works."""
    try:
        _hooks.backing_close(_hooks.backing_open(fd))
    except OSError as exc:
        return _backing_error(exc)
    return ""


def _backing_error(exc: OSError) -> str:
    if exc.errno == errno.EPERM:
        return "the kernel refused a backing file (the daemon needs CAP_SYS_ADMIN)"
    if exc.errno in (errno.EINVAL, errno.ELOOP):  # ELOOP: stacked too deep
        return ("the fast tier's filesystem cannot back passthrough (a stacked one such "
                "as overlayfs, or a FUSE mount); put --fast-dir on tmpfs or a disk")
    return f"the kernel refused a backing file: {exc.strerror}"


class Held(Protocol):
    damaged: bool  # the copy no longer holds the bytes it was made of

    def release(self) -> None: ...  # noqa: E704


class _ColdFile:
    """The Held of a cold file that backs passthrough opens: it is no copy,
    nothing in the budget, and never damaged (its readers read the cold
    file as it is, like a reader of the cold directory)."""
    damaged = False

    def release(self) -> None:
        pass


COLD_FILE = _ColdFile()


@dataclass
class _Backing:
    id: int
    opens: int
    held: Held  # the budget's claim on the copy, released with the backing file
    uid: int  # who opened it first: whose share of the budget it counts in
    size: int


class OpenModes:
    """Per FUSE inode: the live cached-mode opens, or the backing file of the
    live passthrough opens. Synchronous; called from the FUSE adapter.

    A copy that passthrough opens hold cannot be evicted until they close
    (the budget counts it): users other than root and the mount's owner
    (`trusted`) may hold at most `others_limit` bytes that way, so that with
    --allow-other nobody can lock the fast tier by keeping files open;
    beyond it their opens are cached-mode opens, served by the daemon."""

    def __init__(self, trusted: frozenset[int] = frozenset({0}),
                 others_limit: int = 0) -> None:
        self.enabled = False
        self.trusted = trusted
        self.others_limit = others_limit
        self._cached: collections.Counter[int] = collections.Counter()
        self._backing: dict[int, _Backing] = {}
        self._held_by: collections.Counter[int] = collections.Counter()  # uid -> bytes
        self._failed_once = False

    def open(self, ino: int, fast_fd: int | None, size: int, uid: int,
             hold: Callable[[], Held]) -> int:
        """The backing id for a new open of ino by `uid` (0: a cached-mode
        open). A passthrough open needs a fast copy (`fast_fd`, of `size`
        bytes in the budget) unless the inode's backing file already serves
        it; `hold()` is called when a backing file is made, and its result
        released with it. A cold file wholly in the page cache may back it
        too: its fd, size 0 and a hold giving COLD_FILE."""
        b = self._backing.get(ino)
        if b is not None:
            b.opens += 1
            return b.id
        if (uid not in self.trusted
                and self._held_by[uid] + size > self.others_limit):
            fast_fd = None  # this user holds enough of the budget already
        if self.enabled and fast_fd is not None and not self._cached[ino]:
            try:
                bid = _hooks.backing_open(fast_fd)
            except OSError as exc:
                if not self._failed_once:
                    log.warning("a passthrough open fell back to the daemon: %s",
                                _backing_error(exc))
                    self._failed_once = True
            else:
                self._backing[ino] = _Backing(bid, 1, hold(), uid, size)
                self._held_by[uid] += size
                return bid
        self._cached[ino] += 1
        return 0

    def passthrough(self, ino: int) -> bool:
        """Whether new opens of ino must be passthrough opens."""
        return ino in self._backing

    def cold_file(self, ino: int) -> bool:
        """Whether the backing file of ino's passthrough opens is the cold
        file (not a fast copy)."""
        b = self._backing.get(ino)
        return b is not None and b.held is COLD_FILE

    def damaged(self, ino: int) -> bool:
        """Whether ino's backing file is a copy found changed: new opens
        must not join it, so ino must not be opened again."""
        b = self._backing.get(ino)
        return b is not None and b.held.damaged

    def release(self, ino: int, bid: int) -> None:
        if not bid:
            self._cached[ino] -= 1
            if self._cached[ino] <= 0:
                del self._cached[ino]
            return
        b = self._backing[ino]
        b.opens -= 1
        if b.opens == 0:
            del self._backing[ino]
            self._held_by[b.uid] -= b.size
            if self._held_by[b.uid] <= 0:
                del self._held_by[b.uid]
            try:
                _hooks.backing_close(b.id)
            except OSError as exc:  # the session is gone: so is the id
                log.debug("closing backing id %d: %s", b.id, exc)
            b.held.release()

