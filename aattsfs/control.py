"""The control surface: the hidden `.aatts/` directory and `user.aatts.*` xattrs.

`.aatts/stats` and `.aatts/tiers` are generated when opened (a consistent
snapshot per open) and served with direct_io, so `cat` always sees the
current content whatever size `stat` reports. Actions (warm, evict, pin)
are requests on the file itself: setting `user.aatts.tier` to `fast` or
`cold`, or `user.aatts.pinned` to 1 or 0. The CLI uses exactly that, so a
shell user with `setfattr` has the same power and nothing touches the fast
directory behind the daemon's back.
"""

from __future__ import annotations

import json

from .store import Store

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


def render(store: Store, name: str) -> bytes:
    if name == "stats":
        return (json.dumps(store.snapshot(), indent=2) + "\n").encode()
    if name == "trace":
        # ASCII JSON: a name's undecodable bytes are \udcXX escapes, which
        # json.loads and os.fsencode turn back into the bytes
        return "".join(json.dumps(ev) + "\n" for ev in store.trace()).encode()
    lines = ["# tier\tsize\thits\tmisses\tpinned\tpath"]
    for rel in sorted(store.entries):
        rec = store.entries[rel].record
        # one line per file even if a name holds a tab or a newline
        path = rel.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")
        lines.append(f"{store.tier(rel)}\t{rec.size}\t{rec.hits}\t{rec.misses}\t"
                     f"{int(rec.pinned)}\t{path}")
    # names are the file system's bytes, UTF-8 or not
    return ("\n".join(lines) + "\n").encode(errors="surrogateescape")


def get_xattr(store: Store, rel: str, name: bytes) -> bytes:
    if name == XATTR_TIER:
        return store.tier(rel).encode()
    rec = store.record(rel)
    if name == XATTR_HITS:
        return str(rec.hits).encode()
    return b"1" if rec.pinned else b"0"
