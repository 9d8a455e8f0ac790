"""The two tiers: a read-only view of the cold directory, and the fast
directory with its byte budget.

Neither knows about FUSE, trio or policies; every call here is plain
blocking I/O, and the store runs the cold ones in worker threads. Paths
handed in are relative to the tier root ("" is the root).

Nothing outside the cold root, by construction: every cold path is resolved
by the kernel beneath a directory fd of the root (`openat2` with
RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS |
RESOLVE_NO_XDEV), so a directory swapped for a symlink, or a mount that
appears inside the tree, fails the call instead of leading elsewhere.
Symlinks are never followed by the daemon: the kernel follows them inside
the mount, where each step is resolved here again. docs/reliability.md.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import logging
import mmap
import os
import re
import stat
import threading
import uuid

import xxhash

log = logging.getLogger(__name__)

_SYS_OPENAT2 = 437  # the same number on x86_64 and aarch64
_NO_XDEV, _NO_MAGICLINKS, _NO_SYMLINKS, _BENEATH = 0x01, 0x02, 0x04, 0x08
_RESOLVE = _NO_XDEV | _NO_MAGICLINKS | _NO_SYMLINKS | _BENEATH


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


_SYS_CACHESTAT = 451  # Linux 6.5+, the same number on every architecture


class _CacheStatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _CacheStat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in
                ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]


def page_cached(fd: int, size: int) -> bool:
    """Whether all `size` bytes of the file open as fd are in the kernel's
    page cache now, so reading them costs its filesystem no I/O
    (cachestat(2); False without it). A query of the page cache only: it
    never reaches the filesystem, so a hung cold tier cannot block it."""
    if size <= 0:
        return False
    st = _CacheStat()
    if _libc.syscall(_SYS_CACHESTAT, fd, ctypes.byref(_CacheStatRange(0, size)),
                     ctypes.byref(st), 0) != 0:
        return False
    return st.nr_cache * mmap.PAGESIZE >= size


def openat2(dirfd: int, path: str, flags: int, resolve: int = _RESOLVE) -> int:
    """openat2(2) beneath `dirfd`, by default never following a symlink or
    crossing a mount; raises OSError like os.open (EXDEV/ELOOP when
    something tried to lead elsewhere)."""
    how = _OpenHow(flags | os.O_CLOEXEC, 0, resolve)
    while True:
        fd = _libc.syscall(_SYS_OPENAT2, dirfd, os.fsencode(path or "."), ctypes.byref(how),
                           ctypes.sizeof(how))
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, os.strerror(err), path)


def check_rel(rel: str) -> str:
    """rel as the namespace builds it: names joined by '/', none empty, '.'
    or '..'. Anything else (say, from a model index file) names no file."""
    if rel and ("\0" in rel or any(part in ("", ".", "..") for part in rel.split("/"))):
        raise OSError(errno.ENOENT, "not a plain relative path", rel)
    return rel


class SharedFd:
    """A file descriptor closed only after its last user is done.

    Worker threads cannot be cancelled: when the trio side stops waiting for
    one (shutdown, a hung cold tier), the thread may still use the fd later.
    Closing it under the thread would let a reused number receive its
    writes, so each thread `hold`s the fd for its run and the owner's
    `close` only drops the owner's reference."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._refs = 1
        self._lock = threading.Lock()

    def hold(self) -> int:
        with self._lock:
            if self._refs == 0:
                raise OSError(errno.EBADF, "file already closed")
            self._refs += 1
            return self.fd

    def drop(self) -> None:
        with self._lock:
            self._refs -= 1
            last = self._refs == 0
        if last:
            os.close(self.fd)

    close = drop


def version_of(st: os.stat_result) -> tuple[int, int, int, int]:
    """What identifies one content of a cold file: size, mtime, inode and
    ctime. mtime can be set by anyone who writes the file (`cp -p`, `touch
    -r`, `rsync -t`) and a freed inode number is given to the next new file
    at once (ext4); ctime cannot be set, and moves with every write, rename
    and utime, so a file replaced or rewritten is always seen."""
    return st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns


def fs_type(path: str) -> str:
    """The type of the filesystem `path` is on, from the mount table."""
    dev = os.stat(path).st_dev
    want = f"{os.major(dev)}:{os.minor(dev)}"
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[2] == want and " - " in line:
                return line.split(" - ", 1)[1].split()[0]
    return ""


class ColdTier:
    """The backing directory. aattsfs never writes to it."""

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)
        self.root_fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.dev = os.fstat(self.root_fd).st_dev

    def close(self) -> None:
        os.close(self.root_fd)

    def path(self, rel: str) -> str:
        """For messages only: never open this."""
        return os.path.join(self.root, rel) if rel else self.root

    def _open(self, rel: str, flags: int) -> int:
        try:
            return openat2(self.root_fd, check_rel(rel), flags)
        except OSError as exc:
            if exc.errno in (errno.EXDEV, errno.ELOOP):
                # a mount inside the tree, or a directory swapped for a link:
                # not part of what the mount shows
                raise OSError(errno.ENOENT, "not beneath the cold directory", rel) from None
            raise

    def lstat(self, rel: str) -> os.stat_result:
        fd = self._open(rel, os.O_PATH | os.O_NOFOLLOW)
        try:
            return os.fstat(fd)
        finally:
            os.close(fd)

    def dir_fd(self, rel: str) -> int:
        """An O_PATH fd of the directory rel (to place a watch on it)."""
        return self._open(rel, os.O_PATH | os.O_DIRECTORY)

    def exists(self, rel: str) -> bool:
        try:
            self.lstat(rel)
            return True
        except OSError:
            return False

    def visible_lstat(self, rel: str) -> os.stat_result:
        """lstat rel, hiding links that lead out of the cold directory."""
        st = self.lstat(rel)
        if stat.S_ISLNK(st.st_mode) and self.readlink(rel) is None:
            raise OSError(errno.ENOENT, "link leads outside the cold directory", rel)
        return st

    def opendir(self, rel: str) -> tuple[int, list[str]]:
        """A directory fd and the sorted names in it."""
        fd = self.open_dir(rel)
        try:
            return fd, self.list_dir(fd)
        except BaseException:
            os.close(fd)
            raise

    def open_dir(self, rel: str) -> int:
        return self._open(rel, os.O_RDONLY | os.O_DIRECTORY)

    @staticmethod
    def list_dir(fd: int) -> list[str]:
        """The sorted names in the directory open as fd."""
        return sorted(os.listdir(fd))

    def stat_entries(self, dirfd: int, rel: str,
                     names: list[str]) -> list[os.stat_result | None]:
        """lstat each name in the directory open as dirfd (rel); None for what
        the mount hides: vanished entries, mount points and links that lead
        outside the cold directory."""
        out: list[os.stat_result | None] = []
        for name in names:
            try:
                # not a plain fstatat: that would ask a mount on the entry
                # (hung, perhaps) for its attributes; this fails first (EXDEV)
                fd = openat2(dirfd, name, os.O_PATH | os.O_NOFOLLOW)
                try:
                    st = os.fstat(fd)
                finally:
                    os.close(fd)
                if stat.S_ISLNK(st.st_mode) and self.readlink(
                        f"{rel}/{name}" if rel else name) is None:
                    st = None
            except OSError:
                st = None
            out.append(st)
        return out

    def readlink(self, rel: str) -> str | None:
        """The link target as the mount should show it, or None when the link
        leads outside the cold directory (such links are hidden).

        Relative targets are shown as they are; absolute ones under the root
        are rewritten relative to the link, so that the kernel resolves them
        inside the mount. Whether a target stays inside is decided the way
        the kernel will follow it (links within it included: `up -> .` makes
        `up/../x` leave the root), by resolving it beneath the root with
        openat2, never by following it freely: a target that points into the
        mount itself would deadlock the daemon."""
        fd = self._open(rel, os.O_PATH | os.O_NOFOLLOW)
        try:
            target = os.readlink("", dir_fd=fd)
        finally:
            os.close(fd)
        link_dir = os.path.dirname(rel)
        if os.path.isabs(target):
            if not (target == self.root or target.startswith(self.root.rstrip("/") + "/")):
                return None
            walk = os.path.relpath(os.path.normpath(target), self.root)
            shown = os.path.relpath(walk, link_dir or ".")
        else:
            walk, shown = os.path.join(link_dir, target), target
        try:
            os.close(openat2(self.root_fd, walk, os.O_PATH,
                             _BENEATH | _NO_MAGICLINKS | _NO_XDEV))
            return shown
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                return None  # EXDEV: it leaves the root or enters a mount; ELOOP
        # Dangling: shown only if it cannot climb, whatever appears later.
        inside = os.path.normpath(walk)
        climbs = ".." in target.split("/") or inside == ".." or inside.startswith("../")
        return None if climbs else shown

    def follow(self, rel: str) -> tuple[str | None, str | None]:
        """readlink(rel) as the mount shows it, and the regular file the link
        leads to (None if it leads to none, or out of the root)."""
        shown = self.readlink(rel)
        if shown is None:
            return None, None
        try:
            return shown, self.resolve(rel)
        except OSError:
            return shown, None

    def resolve(self, rel: str) -> str:
        """The path of the regular file that rel names, following links the
        way the kernel does through the mount (a Hugging Face snapshot's
        `config.json` -> `../../blobs/HASH`): never out of the root nor into
        a mount below it. rel itself if it is no link; OSError (ENOENT) when
        it leads nowhere or to something other than a regular file."""
        try:
            fd = openat2(self.root_fd, check_rel(rel), os.O_PATH,
                         _BENEATH | _NO_MAGICLINKS | _NO_XDEV)
        except OSError as exc:
            raise OSError(errno.ENOENT, f"leads to no file ({exc.strerror})", rel) from None
        try:
            real = os.readlink(f"/proc/self/fd/{fd}")
            if not stat.S_ISREG(os.fstat(fd).st_mode) or not real.startswith(self.root + "/"):
                raise OSError(errno.ENOENT, "leads to no regular file below the root", rel)
            return real[len(self.root) + 1:]
        finally:
            os.close(fd)

    def open(self, rel: str) -> tuple[int, os.stat_result]:
        """Open a regular file for reading; (fd, its stat). The version comes
        from the opened file itself, so nothing can change between the check
        and the open. O_NONBLOCK: a FIFO put in place of the file must not
        block the daemon; it is refused below."""
        fd = self._open(rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.ENXIO, "not a regular file", rel)
            return fd, st
        except BaseException:
            os.close(fd)
            raise

    def statvfs(self) -> os.statvfs_result:
        return os.statvfs(self.root)


MARKER = ".aattsfs-fast-tier"
_COPY_NAME = re.compile(r"[0-9a-f]{64}")
_PART_NAME = re.compile(r"[0-9a-f]{32}\.part")
XATTR_SOURCE = "user.aatts.source"  # on each copy: what it is a copy of, and its digest


def new_digest() -> "xxhash.xxh3_128":
    return xxhash.xxh3_128()


def digest_of(buf: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(buf)


def digest_fd(fd: int, size: int) -> str:
    """The digest of the first `size` bytes of fd (blocking)."""
    h = new_digest()
    off = 0
    while off < size:
        buf = os.pread(fd, min(size - off, 4 << 20), off)
        if not buf:
            break
        h.update(buf)
        off += len(buf)
    return h.hexdigest() if off == size else ""


class FastTierError(Exception):
    """The fast dir cannot be used; the message says why and what to do."""


class FastTier:
    """A directory holding complete, verified copies of cold files (the
    budget they fit is counted by residency.Residency).

    Layout: a marker file (locked while a daemon uses the directory),
    ``copies/<sha256 of the path>`` for committed copies, ``partial/`` for
    copies being filled. Each copy carries the xattr `user.aatts.source`:
    the cold path, the cold file's size, mtime and inode, and the xxh3-128
    digest of its bytes, so a copy describes itself and is verified against
    that digest before it is served after a restart. The daemon deletes only
    names of those two patterns, and only inside its own directory.
    """

    def __init__(self, root: str, owner: dict | None = None) -> None:
        self.root = root
        self.data = os.path.join(root, "copies")
        self.tmp = os.path.join(root, "partial")
        try:
            os.makedirs(root, mode=0o700, exist_ok=True)
            self._lock_fd = self._claim(owner or {})
        except OSError as exc:
            raise FastTierError(f"fast dir {root} cannot be used ({exc.strerror}: "
                                f"{exc.filename}); give another with --fast-dir") from None
        os.makedirs(self.data, mode=0o700, exist_ok=True)
        os.makedirs(self.tmp, mode=0o700, exist_ok=True)

    def _claim(self, owner: dict) -> int:
        """Take the directory for this mount: an empty directory or one this
        mount made before; refuse anything else."""
        marker = os.path.join(self.root, MARKER)
        names = set(os.listdir(self.root))
        ours = MARKER in names
        # lost+found: the fast dir may be the root of a filesystem of its own
        foreign = set() if ours else names - {"copies", "partial", "lost+found"}
        for name in names & {"copies", "partial"}:
            path = os.path.join(self.root, name)
            if not stat.S_ISDIR(os.lstat(path).st_mode):  # a link would lead elsewhere
                raise FastTierError(f"fast dir {self.root}: {name} is not a directory; give "
                                    "an empty directory (or one aattsfs made) with --fast-dir")
            if not ours and os.listdir(path):
                foreign.add(name)
        if foreign:
            raise FastTierError(f"fast dir {self.root} holds files aattsfs did not make; give "
                                "an empty directory (or one aattsfs made) with --fast-dir")
        fd = os.open(marker, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise FastTierError(f"fast dir {self.root} is in use by another aattsfs "
                                    "mount; give each mount its own --fast-dir") from None
            raw = os.pread(fd, 1 << 16, 0)
            try:
                before = json.loads(raw) if raw else {}
            except ValueError:
                before = {}
            if before.get("cold") not in (None, owner.get("cold")):
                raise FastTierError(f"fast dir {self.root} belongs to the mount of "
                                    f"{before['cold']}; give this mount its own --fast-dir")
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(owner).encode(), 0)
            try:  # copies describe themselves in xattrs: the fs must keep them
                os.setxattr(fd, XATTR_SOURCE, b"{}")
                os.removexattr(fd, XATTR_SOURCE)
            except OSError as exc:
                raise FastTierError(f"fast dir {self.root} does not keep extended attributes "
                                    f"({exc.strerror}), which aattsfs needs to verify its "
                                    "copies; use a tmpfs or a local ext4/xfs directory") from None
            return fd
        except BaseException:
            os.close(fd)
            raise

    @property
    def marker_fd(self) -> int:
        """An fd of a file of the fast tier's filesystem (to probe it)."""
        return self._lock_fd

    def close(self) -> None:
        os.close(self._lock_fd)

    @staticmethod
    def name(rel: str) -> str:
        return hashlib.sha256(os.fsencode(rel)).hexdigest()

    def path(self, rel: str) -> str:
        return os.path.join(self.data, self.name(rel))

    def scan(self) -> dict[str, tuple[os.stat_result, dict]]:
        """Drop partial copies and unreadable ones; return rel -> (stat,
        source) for every copy `copies/` holds (for recovery)."""
        for name in os.listdir(self.tmp):
            if _PART_NAME.fullmatch(name):
                self._unlink(os.path.join(self.tmp, name))
        found = {}
        for name in os.listdir(self.data):
            full = os.path.join(self.data, name)
            if not _COPY_NAME.fullmatch(name):
                log.warning("fast dir: %s is not an aattsfs copy; left alone", full)
                continue
            try:
                st = os.lstat(full)
                source = json.loads(os.getxattr(full, XATTR_SOURCE, follow_symlinks=False))
                rel = source["path"]
                if not (stat.S_ISREG(st.st_mode) and self.name(rel) == name):
                    raise ValueError("not the copy its name says")
                found[rel] = (st, source)
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                log.info("fast dir: dropping %s (%s)", name, exc)
                self._unlink(full)
        return found

    def create_temp(self) -> tuple[str, int]:
        path = os.path.join(self.tmp, uuid.uuid4().hex + ".part")
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            return path, os.open(path, flags, 0o600)
        except FileNotFoundError:  # someone removed the directory of partial copies
            os.makedirs(self.tmp, mode=0o700, exist_ok=True)
            return path, os.open(path, flags, 0o600)

    def commit(self, tmp_path: str, fd: int, rel: str, version: tuple[int, int, int, int],
               digest: str) -> os.stat_result:
        """Make a filled, verified temporary copy the copy of `rel` (blocking:
        call from a worker thread). The rename is the commit point; returns
        the stat of the committed copy (its identity while it is served)."""
        source = {"path": rel,  # json escapes the surrogates of an undecodable name
                  "size": version[0], "mtime_ns": version[1], "ino": version[2],
                  "ctime_ns": version[3],
                  "xxh3_128": digest}
        os.setxattr(fd, XATTR_SOURCE, json.dumps(source).encode())
        os.fsync(fd)
        os.rename(tmp_path, self.path(rel))
        return os.fstat(fd)

    @staticmethod
    def _unlink(path: str) -> None:
        """Unlink, never raising: a failing fast disk must not keep a copy
        that is being dropped looking present (it is logged instead)."""
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not remove %s from the fast tier: %s", path, exc.strerror)

    def remove(self, rel: str) -> None:
        self._unlink(self.path(rel))

    def open(self, rel: str) -> int:
        return os.open(self.path(rel), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)

    def check(self, rel: str, size: int) -> tuple[os.stat_result, bool]:
        """Hash the copy of rel (blocking): its stat, and whether its bytes
        match the digest it carries."""
        fd = self.open(rel)
        try:
            st = os.fstat(fd)
            source = json.loads(os.getxattr(fd, XATTR_SOURCE))
            return st, st.st_size == size and digest_fd(fd, size) == source["xxh3_128"]
        except (ValueError, KeyError, TypeError):
            return st, False
        finally:
            os.close(fd)


def same_copy(a: os.stat_result, b: os.stat_result) -> bool:
    """Whether two stats are of one copy, unmodified in between (any write,
    truncate, chmod or xattr change moves ctime)."""
    return (a.st_ino, a.st_dev, a.st_size, a.st_ctime_ns) == \
        (b.st_ino, b.st_dev, b.st_size, b.st_ctime_ns)
