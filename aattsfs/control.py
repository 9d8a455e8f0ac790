"""The control surface: the hidden `.aatts/` directory, `user.aatts.*`
xattrs to read, and a socket for actions.

`.aatts/stats` and `.aatts/tiers` are generated when opened (a consistent
snapshot per open) and served with direct_io, so `cat` always sees the
current content whatever size `stat` reports.

Actions (warm, evict, pin, unpin) cannot be requests through the mount: it
is read-only for the kernel (docs/architecture.md, "A read-only mount"),
which refuses a setxattr before the daemon sees it. They are lines on a
Unix socket in the abstract namespace (nothing in a directory to go stale
after kill -9) whose name the mount's root gives in `user.aatts.control`;
the daemon takes them only from root and the mount's owner, by the
socket's peer credentials. Nothing touches the fast directory behind the
daemon's back.

The same socket takes a trace recorded on another box for the learner
(`aattsfs trace import`, docs/fleet.md): "learn" requests carry batches of
opens, each checked as it comes; nothing is learned before the last batch
has come (all or nothing).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import socket
import stat
import struct

import trio

from .learn import ImportId
from .metadata import TRACE_CAPACITY
from .prefetcher import Prefetcher
from .sim import check_open, open_event
from .store import Store
from .tiers import check_rel

log = logging.getLogger(__name__)

CONTROL_NAME = ".aatts"
CONTROL_DIR_INO = 2
# name -> inode number; numbers stay below namespace.FIRST_DYNAMIC
CONTROL_FILES = {"stats": 3, "tiers": 4, "trace": 5, "verify": 6}
# Counts are for everyone; file names and pids only for the mount's owner
# (they name files that other users may not be allowed to see), and
# `verify` hashes the whole fast tier.
CONTROL_MODES = {3: 0o444, 4: 0o400, 5: 0o400, 6: 0o400}
CONTROL_NAMES = {ino: name for name, ino in CONTROL_FILES.items()}
CONTROL_INOS = {CONTROL_DIR_INO, *CONTROL_NAMES}

XATTR_TIER = b"user.aatts.tier"
XATTR_HITS = b"user.aatts.hits"
XATTR_PINNED = b"user.aatts.pinned"
XATTRS = (XATTR_TIER, XATTR_HITS, XATTR_PINNED)
XATTR_CONTROL = b"user.aatts.control"  # on the root: the control socket's name

ACTIONS = ("warm", "evict", "pin", "unpin")
MAX_REQUEST = 1 << 16  # bytes of one request line
PATH_MAX = 4096  # bytes of a path the kernel takes, its NUL included
# Any local user can connect to an abstract socket: those it refuses are
# answered and closed at once, and its own users hold at most MAX_CLIENTS
# connections, each closed after IDLE seconds without a whole request, so
# that no one can use up the daemon's file descriptors (which its reads need)
MAX_CLIENTS = 64
IDLE = 60.0


def render(store: Store, name: str) -> bytes:
    if name == "stats":
        return (json.dumps(store.snapshot(), indent=2) + "\n").encode()
    if name == "trace":
        # ASCII JSON: a name's undecodable bytes are \udcXX escapes, which
        # json.loads and os.fsencode turn back into the bytes
        return "".join(json.dumps(ev) + "\n" for ev in store.trace()).encode()
    # name: the link the file was last opened through (a hub snapshot's
    # file, for a blob), or its path
    lines = ["# tier\tsize\thits\tmisses\tpinned\tpath\tname"]
    for rel in sorted(store.entries):
        rec = store.entries[rel].record
        lines.append(f"{store.tier(rel)}\t{rec.size}\t{rec.hits}\t{rec.misses}\t"
                     f"{int(rec.pinned)}\t{_field(rel)}\t{_field(store.display_name(rel))}")
    # names are the file system's bytes, UTF-8 or not
    return ("\n".join(lines) + "\n").encode(errors="surrogateescape")


def _field(name: str) -> str:
    """One field per name even if it holds a tab or a newline."""
    return name.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")


def get_xattr(store: Store, rel: str, name: bytes) -> bytes:
    if name == XATTR_TIER:
        return store.tier(rel).encode()
    rec = store.record(rel)
    if name == XATTR_HITS:
        return str(rec.hits).encode()
    return b"1" if rec.pinned else b"0"


# -- actions over the control socket -----------------------------------------

def socket_name() -> bytes:
    """A fresh abstract socket name, unguessable so no one can take it first."""
    return f"aattsfs-{os.getpid()}-{secrets.token_hex(8)}".encode()


def check_learnable(rel: str) -> None:
    """ValueError unless rel can name a file of the mount, as every path of a
    trace to learn from must (the prefetcher would stage it): a plain
    relative path (tiers.check_rel), outside the control directory, that
    the system can encode and the kernel take."""
    shown = json.dumps(rel)[:60]
    try:
        check_rel(rel)
        size = len(os.fsencode(rel))
    except OSError:
        raise ValueError(f'"path" is not a plain relative path (no leading /, no empty, '
                         f'"." or ".." name, no NUL) but {shown}') from None
    except UnicodeEncodeError:
        raise ValueError(f'"path" is not a file name this system can encode: {shown}') from None
    if rel.split("/", 1)[0] == CONTROL_NAME:
        raise ValueError(f'"path" is in aattsfs\'s control directory, not a file of the cold '
                         f'directory: {shown}')
    if size >= PATH_MAX:
        raise ValueError(f'"path" is longer than the {PATH_MAX - 1} bytes of a path: {shown}')


async def act(store: Store, action: str, rel: str) -> None:
    """Carry out one action on the cold directory's regular file rel (OSError
    with the errno the CLI explains otherwise; see Store.warm)."""
    if action not in ACTIONS:
        raise OSError(errno.EINVAL, "no such action")
    # (a path that is not plain — absolute, '..', '//', a NUL — is refused by
    # the cold tier itself: tiers.check_rel)
    if not rel or rel.split("/", 1)[0] == CONTROL_NAME:
        raise OSError(errno.ENOENT, "not a file of the mount")
    if not stat.S_ISREG((await store.cold_call(store.cold.lstat, rel)).st_mode):
        raise OSError(errno.EOPNOTSUPP, "not a regular file")
    if action == "warm":
        await store.warm(rel)
    elif action == "evict":
        if store.record(rel).pinned:  # a pin means never evicted
            raise OSError(errno.EBUSY, "pinned")
        store.evict(rel)
    else:
        await store.set_pinned(rel, action == "pin")


class _Connection:
    """What one client's connection holds between its requests: the import
    it is sending, if any (its opens as checked so far, and their id)."""

    def __init__(self) -> None:
        self.opens: list[dict] = []
        self.source = ImportId()


async def serve(store: Store, name: bytes, allowed: frozenset[int],
                prefetcher: Prefetcher | None = None,
                task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Answer action requests on the abstract socket `name` until cancelled:
    JSON lines {"action": A, "path": REL}, each answered {"errno": 0} when
    done, or with the error's number and text; and imports for the
    prefetcher's learner, {"action": "learn", "events": [OPEN...], "more":
    BOOL}, the last (more false) answered with what was learned."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    await sock.bind(b"\0" + name)
    sock.listen(16)
    task_status.started()
    clients = 0
    importer: _Connection | None = None  # one import at a time: each is held in memory

    async def client(stream: trio.SocketStream) -> None:
        nonlocal clients, importer
        creds = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                         struct.calcsize("3i"))
        uid = struct.unpack("3i", creds)[1]
        buf = b""
        # A client gone (or a request too long) ends its connection, never
        # the daemon: an exception leaving here would end every task
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            async with stream:
                if uid not in allowed or clients >= MAX_CLIENTS:
                    why = (errno.EPERM, "only root and the mount's owner may") \
                        if uid not in allowed else (errno.EUSERS, "too many connections")
                    await stream.send_all(json.dumps({"errno": why[0], "error": why[1]})
                                          .encode() + b"\n")
                    return
                clients += 1
                conn = _Connection()
                try:
                    while len(buf) <= MAX_REQUEST:
                        chunk = b""
                        with trio.move_on_after(IDLE):
                            chunk = await stream.receive_some(MAX_REQUEST)
                        if not chunk:
                            return
                        buf += chunk
                        while b"\n" in buf:
                            line, buf = buf.split(b"\n", 1)
                            reply = await _answer(line, conn)
                            await stream.send_all(json.dumps(reply).encode() + b"\n")
                finally:
                    clients -= 1
                    if importer is conn:  # gone mid-import: nothing of it is learned
                        importer = None

    async def _answer(line: bytes, conn: _Connection) -> dict:
        try:
            req = json.loads(line)
            if req["action"] == "learn":
                return await _learn(req["events"], req["more"], conn)
            if not (isinstance(req["action"], str) and isinstance(req["path"], str)):
                raise TypeError("not a request")
            await act(store, req["action"], req["path"])
        except OSError as exc:
            return {"errno": exc.errno or errno.EIO, "error": exc.strerror or str(exc)}
        except (ValueError, KeyError, TypeError, RecursionError):  # nested beyond json's depth
            return {"errno": errno.EINVAL, "error": "not a request"}
        except Exception:
            log.exception("internal error in the control request %r", line[:200])
            return {"errno": errno.EIO, "error": "internal error (see the daemon's log)"}
        return {"errno": 0}

    async def _learn(events: list, more: bool, conn: _Connection) -> dict:
        nonlocal importer
        if not isinstance(events, list) or not isinstance(more, bool):
            raise TypeError("not a request")
        if prefetcher is None:
            raise OSError(errno.EOPNOTSUPP, "this daemon has no learner")
        if importer not in (None, conn):
            raise OSError(errno.EBUSY, "another import is in progress")
        importer = conn
        try:
            batch = []
            for ev in events:
                where = f"open {len(conn.opens) + len(batch) + 1}"
                try:
                    r = check_open(ev, check_learnable) if isinstance(ev, dict) else None
                except ValueError as exc:
                    raise OSError(errno.EINVAL, f"{where}: {exc}") from None
                if r is None:
                    raise OSError(errno.EINVAL, f"{where}: not an open")
                batch.append(open_event(r))
            if len(conn.opens) + len(batch) > TRACE_CAPACITY:
                raise OSError(errno.EFBIG, f"more than the {TRACE_CAPACITY} events the "
                                           "trace keeps")
            if not (more or conn.opens or batch):
                raise OSError(errno.EINVAL, "no open to learn")
        except BaseException:  # a bad batch ends the import: nothing of it is learned
            importer, conn.opens, conn.source = None, [], ImportId()
            raise
        conn.opens += batch
        conn.source.add(batch)
        if more:
            return {"errno": 0}
        opens, source = conn.opens, str(conn.source)
        importer, conn.opens, conn.source = None, [], ImportId()
        learned = await prefetcher.seed(opens, source)
        return {"errno": 0, "opens": len(opens), "source": source, "learned": learned}

    await trio.serve_listeners(client, [trio.SocketListener(sock)])


class Client:
    """The CLI's side: one connection to the daemon serving a mount point."""

    def __init__(self, mountpoint: str) -> None:
        name = os.getxattr(mountpoint, XATTR_CONTROL)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.connect(b"\0" + name)
        self.replies = self.sock.makefile("rb")

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.replies.close()
        self.sock.close()

    def act(self, action: str, rel: str) -> None:
        """Raises OSError with the daemon's errno if the action failed."""
        self._ask({"action": action, "path": rel})

    def learn(self, opens: list[dict]) -> dict:
        """Have the daemon learn opens recorded on another box (`aattsfs
        trace import`; each as `sim.open_event` makes it), sent in request
        lines shorter than MAX_REQUEST. Its answer to the last: "opens"
        received, "learned" (False: that import was learned before) and
        "source", the import's id."""
        batch: list[dict] = []
        size = 0
        for ev in opens:
            n = len(json.dumps(ev)) + 2
            if batch and size + n > MAX_REQUEST - 256:  # 256: the request's own keys
                self._ask({"action": "learn", "events": batch, "more": True})
                batch, size = [], 0
            batch.append(ev)
            size += n
        return self._ask({"action": "learn", "events": batch, "more": False})

    def _ask(self, request: dict) -> dict:
        """One request and its answer; OSError with the daemon's errno if it failed."""
        try:
            self.sock.sendall(json.dumps(request).encode() + b"\n")
        except BrokenPipeError:
            pass  # refused: the daemon answered and closed before reading
        line = self.replies.readline()
        if not line:
            raise OSError(errno.ECONNRESET, "the daemon closed the control socket")
        reply = json.loads(line)
        if reply["errno"]:
            raise OSError(reply["errno"], reply.get("error", ""))
        return reply
