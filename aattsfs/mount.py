"""Mounting: validate what the user asked for, wire the parts together, run
the FUSE main loop, and shut down in order (stop promotions, persist
metadata, unmount). `daemonize` runs the same thing in a detached child.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import faulthandler
import fcntl
import hashlib
import logging
import os
import re
import shutil
import select
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import lmdb
import pyfuse3
import trio

from .errors import UserError
from .fs import Operations
from .learn import ImportId
from .metadata import TRACE_CAPACITY, MetaStore
from . import control, memfloor, metrics, passthrough
from .policy import make_admission, make_policy
from .residency import Residency
from .prefetcher import Prefetcher
from .store import Store
from .watch import ColdWatch
from .tiers import ColdTier, FastTier, FastTierError
from .units import format_size

log = logging.getLogger(__name__)

LOCK_WAIT = 15.0  # a previous daemon of this mount may still be flushing
READY_TIMEOUT = 60.0  # how long `mount` waits for the daemon it started
READY_FD = "AATTSFS_READY_FD"  # the pipe on which that daemon says READY, or why not


@dataclass
class MountConfig:
    cold: str
    mountpoint: str
    fast_size: int
    fast_dir: str | None = None
    # free memory to keep (memfloor.py): bytes; None: memfloor.DEFAULT_FLOOR
    # if the fast dir is on tmpfs or ramfs, else off; 0: off
    fast_min_free: int | None = None
    state_dir: str | None = None
    policy: str = "lru"
    admission: str = "reuse"  # which files that need room are copied (policy.ADMISSIONS)
    allow_other: bool = False
    log_level: str = "info"
    timeout: float = 1.0
    read_ahead: int = 1 << 20
    prefetch: bool = True
    predictor: str = "markov"
    prefetch_jobs: int = 2  # promotions the prefetcher runs at once
    prefetch_bandwidth: int = 0  # bytes/s of cold reads for prefetch; 0: no cap
    push_page_cache: bool = False  # copy staged files into the kernel page cache too
    passthrough: str = "auto"  # kernel passthrough of promoted files: auto, on, off
    cold_watch: str = "auto"  # opens of fast copies without a cold call (watch.py): auto, off
    metrics_address: str | None = None  # HOST:PORT of the Prometheus endpoint
    metrics_allow_remote: bool = False
    learn_from: str | None = None  # a trace from another box, learned at each start


# Stopped (TERM, INT) or asked for a dump (USR1) through the trio loop
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def mount_key(mountpoint: str) -> str:
    """A stable, readable name for a mount point: /mnt/models -> mnt-models-1a2b3c4d."""
    real = os.path.realpath(mountpoint)
    slug = real.strip("/").replace("/", "-") or "root"
    return f"{slug[-48:]}-{hashlib.sha1(real.encode()).hexdigest()[:8]}"


def default_fast_dir(mountpoint: str) -> str:
    return os.path.join("/dev/shm/aattsfs", mount_key(mountpoint))


def default_state_dir(mountpoint: str) -> str:
    if os.geteuid() == 0:
        base = "/var/lib/aattsfs"
    else:
        base = os.path.join(os.environ.get("XDG_STATE_HOME")
                            or os.path.expanduser("~/.local/state"), "aattsfs")
    return os.path.join(base, mount_key(mountpoint))


def _mount_table() -> list[tuple[str, str, str]]:
    """(mount point, filesystem type, device major:minor) of every mount."""
    out = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.decode(errors="surrogateescape").split()
            sep = fields.index("-")
            # the table escapes space, tab, newline and backslash as octal
            target = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            out.append((target, fields[sep + 1], fields[2]))
    return out


def is_mounted(path: str) -> bool:
    """Whether path is a mount point, from the mount table: unlike
    os.path.ismount this also sees a FUSE mount whose daemon died."""
    real = os.path.realpath(path)
    return any(target == real for target, _, _ in _mount_table())


def aattsfs_mount_of(path: str) -> str | None:
    """The aattsfs mount point that path lies on, or None."""
    real = os.path.realpath(path)
    best = ("", "")
    for target, fstype, _ in _mount_table():
        if _inside(real, target) and len(target) >= len(best[0]):
            best = (target, fstype)
    return best[0] if best[1] == "fuse.aattsfs" else None


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _dir_bytes(path: str) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def _existing_ancestor(path: str) -> str:
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def _ensure_dir(path: str, what: str, option: str, created: list[str]) -> None:
    """Create path (0700) if missing, noting the topmost directory made;
    refuse one that other users could write into."""
    top = _existing_ancestor(path)
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        if top != path:
            created.append(os.path.join(top, os.path.relpath(path, top).split("/")[0]))
        st = os.stat(path)
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise UserError(f"{what} {path} belongs to another user or others can write to "
                            f"it; give a directory of your own (mode 0700) with {option}")
        unsafe = _unsafe_ancestor(path)
        if unsafe:
            raise UserError(f"{what} {path} lies in {unsafe}, which another user can change "
                            f"(rename or replace entries in it); choose another with {option}")
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise UserError(f"{what} {path} is not usable ({exc.strerror}); make it writable "
                        f"or choose another with {option}") from None


def _unsafe_ancestor(path: str) -> str | None:
    """The first directory above path that a user other than us (or root)
    could rename entries in, so as to swap our directory for another:
    owned by someone else, or writable by others without the sticky bit
    (/dev/shm and /tmp are sticky: there only an entry's owner renames it)."""
    parent = os.path.dirname(path)
    while True:
        st = os.stat(parent)
        if st.st_uid not in (0, os.geteuid()) or (
                st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX):
            return parent
        if parent == "/":
            return None
        parent = os.path.dirname(parent)


def _check_dir_arg(path: str, what: str) -> None:
    """The cold dir: exists, is a directory, can be read."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist; give the directory that holds "
                        "your files") from None
    except OSError as exc:
        raise UserError(f"{what} {path} cannot be reached ({exc.strerror}); check the "
                        "permissions of the directories above it") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UserError(f"{what} {path} is not a directory")
    if not os.access(path, os.R_OK | os.X_OK):
        raise UserError(f"{what} {path} is not readable by this user")


def prepare(cfg: MountConfig, created: list[str] | None = None) -> MountConfig:
    """Check everything the user gave; return the config with every path
    resolved and defaults filled in. Raises UserError with one clear line.
    Directories it had to create are appended to `created` (the caller
    removes them if the mount does not come up)."""
    created = [] if created is None else created
    if cfg.metrics_address:  # before anything is created on disk
        metrics.parse_address(cfg.metrics_address, cfg.metrics_allow_remote)
    if not os.path.exists("/dev/fuse"):
        raise UserError("FUSE is not available: /dev/fuse is missing; load the module "
                        "(modprobe fuse) or give this container the /dev/fuse device")
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as exc:
        raise UserError(f"FUSE is not available: cannot open /dev/fuse ({exc.strerror}); "
                        "run as root or give this user access to /dev/fuse") from None

    _check_dir_arg(cfg.cold, "cold directory")
    cold = os.path.realpath(cfg.cold)

    mnt = os.path.realpath(cfg.mountpoint)
    if is_mounted(mnt):
        try:
            os.statvfs(mnt)  # never answered from a cache, unlike stat
        except OSError as exc:
            if exc.errno == errno.ENOTCONN:
                raise UserError(f"{cfg.mountpoint} is a mount whose daemon died; clean it up "
                                f"with 'aattsfs umount {cfg.mountpoint}' and mount again") from None
        raise UserError(f"{cfg.mountpoint} is already a mount point; unmount it first "
                        f"(aattsfs umount {cfg.mountpoint}) or choose another")
    if not os.path.lexists(cfg.mountpoint):
        raise UserError(f"mountpoint {cfg.mountpoint} does not exist; create it with "
                        f"mkdir -p {cfg.mountpoint}")
    if not os.path.isdir(mnt):
        raise UserError(f"mountpoint {cfg.mountpoint} is not a directory")
    if os.listdir(mnt):
        raise UserError(f"mountpoint {cfg.mountpoint} is not empty; mount on an empty "
                        "directory")
    if _overlap(mnt, cold):
        raise UserError(f"mountpoint {cfg.mountpoint} and cold directory {cfg.cold} "
                        "overlap; choose a mountpoint outside the cold directory")

    fast = os.path.realpath(cfg.fast_dir or default_fast_dir(mnt))
    state = os.path.realpath(cfg.state_dir or default_state_dir(mnt))
    # The daemon deletes files in the fast dir and rewrites the state dir:
    # neither may share a single file with the cold tree, the mount or the other.
    for path, what, option in ((fast, "fast dir", "--fast-dir"),
                               (state, "state dir", "--state-dir")):
        for other, name in ((cold, "the cold directory"), (mnt, "the mountpoint")):
            if _overlap(path, other):
                raise UserError(f"{what} {path} overlaps {name}; choose another with {option}")
    if _overlap(fast, state):
        raise UserError(f"fast dir {fast} and state dir {state} overlap; give them "
                        "separate directories (--fast-dir, --state-dir)")

    fast_existed = os.path.exists(fast)
    sv = os.statvfs(_existing_ancestor(fast))
    room = sv.f_bavail * sv.f_frsize + (_dir_bytes(fast) if fast_existed else 0)
    if room < cfg.fast_size:
        raise UserError(f"fast dir {fast} has room for {format_size(room)}, less than the "
                        f"budget of {format_size(cfg.fast_size)}; lower --fast-size or choose "
                        "another --fast-dir")
    min_free = _min_free(cfg.fast_min_free, fast)
    _ensure_dir(fast, "fast dir", "--fast-dir", created)
    _ensure_dir(state, "state dir", "--state-dir", created)
    learn_from = os.path.abspath(cfg.learn_from) if cfg.learn_from else None
    return dataclasses.replace(cfg, cold=cold, mountpoint=mnt, fast_dir=fast, state_dir=state,
                               fast_min_free=min_free, learn_from=learn_from)


def _min_free(asked: int | None, fast: str) -> int:
    """The free-memory floor in bytes (0: off). By default only a fast dir
    in RAM has one: evicting a disk-backed copy frees no memory. A floor
    asked for holds whatever the filesystem, and must be checkable here."""
    if asked is None:
        return memfloor.DEFAULT_FLOOR if memfloor.on_ram(_existing_ancestor(fast),
                                                         _mount_table()) else 0
    if not asked:
        return 0
    total = memfloor.total_memory()
    if memfloor.read_available() is None or total is None:
        raise UserError(f"--fast-min-free needs MemAvailable and MemTotal in "
                        f"{memfloor.MEMINFO}, and this kernel does not give them; "
                        "pass --fast-min-free off")
    if asked >= total:
        raise UserError(f"--fast-min-free {format_size(asked)} is not below this box's "
                        f"memory ({format_size(total)}): the fast tier would never hold a "
                        "file; lower it, or pass --fast-min-free off")
    return asked


def read_seed(lines, name: str) -> list[dict]:
    """The opens of a trace to learn from (`--learn-from`, `aattsfs trace
    import`), each as it is sent and kept (sim.open_event). The whole file
    is checked first, as `aattsfs sim` checks a trace, and every path must
    name a file of the mount (control.check_learnable): a mistake is one
    UserError naming `name`, the line and what is wrong, and nothing of the
    file is learned."""
    from .sim import open_event, read_trace_file

    opens = [open_event(r) for r in read_trace_file(lines, name, control.check_learnable)]
    if len(opens) > TRACE_CAPACITY:
        raise UserError(f"{name} holds {len(opens)} opens, more than the {TRACE_CAPACITY} a "
                        "trace keeps; keep the latest of them")
    return opens


def _read_learn_from(path: str | None) -> list[dict] | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return read_seed(f, f"--learn-from {path}")
    except OSError as exc:
        raise UserError(f"cannot read --learn-from {path}: {exc.strerror}") from None


def _overlap(a: str, b: str) -> bool:
    return _inside(a, b) or _inside(b, a)


def _remove_created(created: list[str]) -> None:
    """Undo what a refused mount created (only directories this very start
    made, holding nothing but what it put there)."""
    for path in reversed(created):
        shutil.rmtree(path, ignore_errors=True)
    created.clear()


def _lock_state_dir(state: str) -> int:
    fd = os.open(os.path.join(state, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                os.close(fd)
                raise UserError(f"state dir {state} is in use by another aattsfs (pid "
                                f"{holder or '?'}); unmount that one first or pass "
                                "--state-dir") from None
            time.sleep(0.2)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _set_read_ahead(mountpoint: str, nbytes: int) -> None:
    """Raise the kernel readahead of this mount. FUSE mounts start at 128 KiB,
    so a sequential read or an mmap fault sequence reaches the daemon in
    128 KiB requests; 1 MiB requests make fast-tier reads about 2.5 times
    faster here (docs/benchmarks.md)."""
    dev = next((d for t, _, d in _mount_table() if t == mountpoint), None)
    path = f"/sys/class/bdi/{dev}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(max(4, nbytes // 1024)))
    except OSError as exc:
        log.info("could not set readahead (%s: %s); reads arrive in 128 KiB requests",
                 path, exc.strerror)


class _JournalFormatter(logging.Formatter):
    """Under systemd: no timestamp (the journal adds it, with the unit), and
    a `<N>` syslog priority prefix, which journald turns into the entry's
    priority, so that `journalctl -p warning` finds warnings."""

    PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
                logging.CRITICAL: 2}

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{self.PRIORITY.get(record.levelno, 6)}>"
        return prefix + super().format(record).replace("\n", "\n" + prefix)


def setup_logging(level: str = "info") -> None:
    # file names need not be UTF-8: log them escaped rather than fail
    sys.stderr.reconfigure(errors="backslashreplace")
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):  # stderr is connected to the journal
        handler.setFormatter(_JournalFormatter("%(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: "
                                               "%(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler], force=True)
    logging.getLogger("pyfuse3").addFilter(_late_reply_is_not_an_error)


def _late_reply_is_not_an_error(record: logging.LogRecord) -> bool:
    """pyfuse3 logs an ERROR when the kernel no longer waits for a reply
    (ENOENT: the request was interrupted, or the mount went away first, as
    a release racing an unmount). Nothing is lost then: log it as INFO."""
    if record.levelno >= logging.ERROR and "failed with No such file or directory" in \
            record.getMessage():
        record.levelno, record.levelname = logging.INFO, "INFO"
    return True


def _dump_tasks() -> None:
    """Log every trio task with the place it is waiting at (SIGUSR1)."""
    lines: list[str] = []

    def walk(task: trio.lowlevel.Task, depth: int) -> None:
        lines.append(f"{'  ' * depth}task {task.name}")
        for frame, lineno in task.iter_await_frames():
            lines.append(f"{'  ' * depth}    {frame.f_code.co_filename}:{lineno} "
                         f"in {frame.f_code.co_name}")
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child, depth + 1)

    walk(trio.lowlevel.current_root_task(), 0)
    log.warning("SIGUSR1: stacks of the trio tasks (threads follow on stderr):\n%s",
                "\n".join(lines))


def _notify_systemd(message: bytes) -> None:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message, addr)
    except OSError as exc:  # the manager went away: serving matters more than telling it
        log.info("could not notify systemd (%s): %s", message.decode(), exc)


def run_foreground(cfg: MountConfig) -> None:
    """Mount and serve until unmounted or signalled."""
    setup_logging(cfg.log_level)
    created: list[str] = []
    try:
        cfg = prepare(cfg, created)
        seed = _read_learn_from(cfg.learn_from)  # a bad file stops the start here
        with contextlib.ExitStack() as stack:  # every teardown step, in reverse order
            _serve_mount(cfg, stack, created, seed)
    except UserError as exc:
        _remove_created(created)
        _tell_parent(f"ERROR {exc}")
        raise


def _tell_parent(line: str) -> None:
    """One line to the `mount` that started this daemon (`daemonize`), once:
    READY when the mount serves as configured, else the error that stops it."""
    fd = os.environ.pop(READY_FD, None)
    if fd is None:
        return
    with contextlib.suppress(OSError, ValueError):
        os.write(int(fd), line.encode(errors="backslashreplace") + b"\n")
        os.close(int(fd))


def _serve_mount(cfg: MountConfig, stack: contextlib.ExitStack, created: list[str],
                 seed: list[dict] | None = None) -> None:
    stack.callback(os.close, _lock_state_dir(cfg.state_dir))
    cold = ColdTier(cfg.cold)
    stack.callback(cold.close)
    try:
        fast = FastTier(cfg.fast_dir, {"cold": cfg.cold, "mountpoint": cfg.mountpoint})
    except FastTierError as exc:
        raise UserError(str(exc)) from None
    stack.callback(fast.close)
    meta = MetaStore(os.path.join(cfg.state_dir, "lmdb"))
    stack.callback(meta.close)
    store = Store(cold, fast, meta, Residency(
        cfg.fast_size, make_policy(cfg.policy), make_admission(cfg.admission, cfg.fast_size)),
        prefetch_rate=cfg.prefetch_bandwidth)
    store.min_free = cfg.fast_min_free or 0
    exporter = None
    if cfg.metrics_address:  # a taken port stops the start before the mount
        exporter = metrics.start(store, metrics.parse_address(cfg.metrics_address,
                                                              cfg.metrics_allow_remote),
                                 cfg.mountpoint)
    store.recover()
    prefetcher = Prefetcher(store, cfg.predictor, cfg.prefetch, cfg.prefetch_jobs)
    prefetcher.learn_from(meta.events())
    if seed is not None:  # after the ring; not kept in it: the file is the source
        if prefetcher.learn_file(seed, str(ImportId(seed))):
            log.info("learned %d opens from %s (--learn-from)", len(seed), cfg.learn_from)
        else:
            log.info("--learn-from %s: the trace already holds its %d opens (aattsfs trace "
                     "import); not learned twice", cfg.learn_from, len(seed))
    ops = Operations(store, timeout=cfg.timeout)
    store.push_pages = ops.push_to_page_cache
    store.push_staged = cfg.push_page_cache
    _start_watch(store, cfg, stack)
    why_not = (passthrough.unavailable(cfg.fast_dir) if cfg.passthrough != "off"
               else "--passthrough off")
    if cfg.passthrough == "on" and why_not:
        raise UserError(f"--passthrough on cannot work here: {why_not}")
    passthrough.configure(want=not why_not)
    store.passthrough = {"mode": cfg.passthrough, "active": False,
                         "reason": why_not or "the kernel has not answered yet"}
    # From the mount on, a signal must reach the trio loop's receiver, which
    # exists only once the loop runs: until then it waits, blocked (SIGTERM's
    # default action would end the daemon with the mount still there).
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
    # Read-only for the kernel: it then never marks an inode's atime stale
    # after a read or a listing, which would cost a GETATTR at the next stat
    # (docs/architecture.md, "A read-only mount")
    options = set(pyfuse3.default_options) | {"fsname=aattsfs", "subtype=aattsfs", "ro"}
    if cfg.allow_other:
        options.add("allow_other")
    try:
        pyfuse3.init(ops, cfg.mountpoint, options)
    except RuntimeError as exc:
        raise UserError(f"mounting {cfg.mountpoint} failed: {exc}") from None
    created.clear()  # mounted: what was created is in use from now on
    log.info("mounted %s on %s (fast tier %s, budget %s, free-memory floor %s, policy %s, "
             "admission %s, prefetch %s)", cfg.cold, cfg.mountpoint, cfg.fast_dir,
             format_size(cfg.fast_size),
             format_size(store.min_free) if store.min_free else "off", cfg.policy,
             cfg.admission, cfg.predictor if cfg.prefetch else "off")
    unmount = True
    try:
        unmount = trio.run(_serve, store, ops, prefetcher, cfg, exporter)
    finally:
        # The trio loop has ended; threads it abandoned (a hung cold tier)
        # hold their own fds and are not waited for.
        try:
            store.flush()
        except lmdb.Error as exc:
            log.error("writing metadata at unmount failed (%s); the last second of "
                      "statistics is lost", exc)
        pyfuse3.close(unmount=unmount)
        log.info("unmounted %s", cfg.mountpoint)
    if cfg.passthrough == "on" and not store.passthrough["active"]:
        raise UserError(f"--passthrough on cannot work here: {store.passthrough['reason']}")


def _start_watch(store: Store, cfg: MountConfig, stack: contextlib.ExitStack) -> None:
    if cfg.cold_watch == "off":
        store.watch_reason = "--cold-watch off"
    else:
        store.watch, store.watch_reason = ColdWatch.start(store.cold.root, store.cold.root_fd)
    if store.watch is None:
        log.info("cold watch off: %s; every open checks the cold file", store.watch_reason)
        return
    stack.callback(store.watch.close)
    log.info("cold watch on: opens of fast copies need no cold-tier call while inotify "
             "reports no change")


def _start_passthrough(store: Store, ops: Operations) -> bool:
    """Once the kernel has answered INIT: turn passthrough on if it was
    agreed and a first backing file works; else say once why not. False if
    it was required (--passthrough on) and cannot work."""
    state = store.passthrough
    why = state["reason"] = (passthrough.negotiated() or passthrough.probe(store.fast.marker_fd)
                             if passthrough.wanted() else state["reason"])
    if why:
        if state["mode"] == "on":
            log.error("--passthrough on cannot work here: %s", why)
            return False
        log.info("passthrough off: %s", why)
        return True
    state["active"] = ops.modes.enabled = True
    log.info("passthrough on: promoted files are read by the kernel from the fast tier")
    if store.push_staged:
        log.info("--push-page-cache does nothing while passthrough is on (the kernel "
                 "reads the fast copy itself)")
    return True


async def _serve(store: Store, ops: Operations, prefetcher: Prefetcher, cfg: MountConfig,
                 exporter: "metrics.Exporter | None") -> bool:
    """Run until unmounted from outside (returns False) or told to stop by a
    signal (returns True: we still have to unmount)."""
    stopped_by_signal = False
    if exporter is not None:
        exporter.token = trio.lowlevel.current_trio_token()
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        await nursery.start(prefetcher.run)
        name = control.socket_name()
        await nursery.start(control.serve, store, name, frozenset({0, os.getuid()}),
                            prefetcher)
        ops.control_name = name
        nursery.start_soon(ops.invalidate_changes)
        if store.min_free:
            nursery.start_soon(_watch_memory, store)

        async def watch_signals():
            nonlocal stopped_by_signal
            with trio.open_signal_receiver(*HANDLED_SIGNALS) as signals:
                # The thread dump is faulthandler's, at C level, so it works
                # even while the trio thread is stuck; it then chains to
                # trio's handler, which dumps the tasks when the loop runs.
                faulthandler.register(signal.SIGUSR1, all_threads=True, chain=True)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)  # any pending arrive now
                try:
                    async for signum in signals:
                        if signum == signal.SIGUSR1:
                            _dump_tasks()
                            continue
                        log.info("%s received, unmounting", signal.Signals(signum).name)
                        stopped_by_signal = True
                        nursery.cancel_scope.cancel()
                finally:
                    faulthandler.unregister(signal.SIGUSR1)

        async def when_live():
            nonlocal stopped_by_signal
            # The kernel sets the mount's readahead and passthrough when it
            # processes the INIT reply, which is written before this task
            # runs again. (Not a request through the mount: that would wait
            # for a slow cold tier.)
            await ops.initialized.wait()
            _set_read_ahead(cfg.mountpoint, cfg.read_ahead)
            if not _start_passthrough(store, ops):
                stopped_by_signal = True  # still mounted: unmount on the way out
                nursery.cancel_scope.cancel()
                return
            _notify_systemd(b"READY=1")
            _tell_parent("READY")

        nursery.start_soon(watch_signals)
        nursery.start_soon(when_live)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()
    _notify_systemd(b"STOPPING=1")
    return stopped_by_signal


async def _watch_memory(store: Store) -> None:
    """Poll the box's available memory and hand it to the store's floor
    (memfloor.py decides, Store.apply_floor evicts). /proc/meminfo is read
    on the trio thread: procfs answers from memory in microseconds."""
    while True:
        store.apply_floor(memfloor.read_available())
        await trio.sleep(memfloor.POLL_SECONDS)


def daemonize(cfg: MountConfig, argv: list[str]) -> None:
    """Validate here (so mistakes print to the user's terminal), then run the
    daemon in a detached child and return once the mount is live."""
    created: list[str] = []
    try:
        cfg = prepare(cfg, created)
        _read_learn_from(cfg.learn_from)  # checked here too, to tell this terminal
    except UserError:
        _remove_created(created)
        raise
    log_path = os.path.join(cfg.state_dir, "aattsfs.log")
    ready_r, ready_w = os.pipe()
    try:
        with open(log_path, "ab") as logf:
            start = logf.tell()
            child = subprocess.Popen([sys.executable, "-m", "aattsfs", *argv, "--foreground"],
                                     stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                     start_new_session=True, close_fds=True,
                                     pass_fds=(ready_w,),
                                     env={**os.environ, READY_FD: str(ready_w)})
    finally:
        os.close(ready_w)
    try:
        answer = _read_line(ready_r, READY_TIMEOUT)
    finally:
        os.close(ready_r)
    if answer == "READY":
        return
    if answer is None:
        child.terminate()
        raise UserError(f"the daemon did not bring up {cfg.mountpoint} within "
                        f"{READY_TIMEOUT:.0f} s; see {log_path}")
    if not answer.startswith("ERROR "):  # it died without a word: its last line says why
        child.wait()
        with open(log_path, "rb") as f:
            f.seek(start)
            lines = f.read().decode(errors="replace").strip().splitlines()
        answer = (lines or ["no output"])[-1]
    detail = answer.removeprefix("ERROR ").removeprefix("aattsfs: error: ")
    raise UserError(f"the daemon stopped before the mount was ready: {detail} "
                    f"(log: {log_path})")


def _read_line(fd: int, timeout: float) -> str | None:
    """The first line written to the pipe `fd` ("" if it was closed
    without one), or None if none came within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not poller.poll(left * 1000):
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0].decode(errors="replace")


def unmount(mountpoint: str, lazy: bool = False) -> None:
    mnt = os.path.realpath(mountpoint)
    fstype = next((t for target, t, _ in reversed(_mount_table()) if target == mnt), None)
    if fstype is None:
        raise UserError(f"{mountpoint} is not mounted")
    if fstype != "fuse.aattsfs":  # never unmount what is not ours
        raise UserError(f"{mountpoint} is a {fstype} mount, not aattsfs; unmount it with "
                        "umount if that is what you want")
    cmd = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [mnt]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise UserError("fusermount3 is missing; install the fuse3 package") from None
    if proc.returncode != 0:
        msg = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"
        if "busy" in msg.lower():
            raise UserError(f"{mountpoint} is busy (a process has a file open there); close "
                            "it, or use --lazy to detach now and finish when it is closed")
        raise UserError(f"unmounting {mountpoint} failed: {msg}")

