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

from .store import Store

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


async def serve(store: Store, name: bytes, allowed: frozenset[int],
                task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Answer action requests on the abstract socket `name` until cancelled:
    JSON lines {"action": A, "path": REL}, each answered {"errno": 0} when
    done, or with the error's number and text."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    await sock.bind(b"\0" + name)
    sock.listen(16)
    task_status.started()
    clients = 0

    async def client(stream: trio.SocketStream) -> None:
        nonlocal clients
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
                            reply = await _answer(line)
                            await stream.send_all(json.dumps(reply).encode() + b"\n")
                finally:
                    clients -= 1

    async def _answer(line: bytes) -> dict:
        try:
            req = json.loads(line)
            await act(store, req["action"], req["path"])
        except OSError as exc:
            return {"errno": exc.errno or errno.EIO, "error": exc.strerror or str(exc)}
        except (ValueError, KeyError, TypeError):
            return {"errno": errno.EINVAL, "error": "not a request"}
        except Exception:
            log.exception("internal error in the control request %r", line[:200])
            return {"errno": errno.EIO, "error": "internal error (see the daemon's log)"}
        return {"errno": 0}

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
        try:
            self.sock.sendall(json.dumps({"action": action, "path": rel}).encode() + b"\n")
        except BrokenPipeError:
            pass  # refused: the daemon answered and closed before reading
        line = self.replies.readline()
        if not line:
            raise OSError(errno.ECONNRESET, "the daemon closed the control socket")
        reply = json.loads(line)
        if reply["errno"]:
            raise OSError(reply["errno"], reply.get("error", ""))
