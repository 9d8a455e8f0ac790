"""The free-memory floor (docs/memory.md): how far the fast tier's budget
shrinks while the box is short of memory, and how it grows back.

Plain code with no trio, FUSE or store: `effective_budget` is the whole
policy. The daemon polls MemAvailable every POLL_SECONDS (a thin trio loop
in mount.py) and the store evicts down to what this allows
(`Store.apply_floor`).

Why it works: a fast tier on tmpfs holds RAM that the kernel can neither
reclaim nor swap (these boxes have no swap), so when NCCL, PyTorch or
anything else needs it, the only way the cache gives it back is by the
daemon evicting. Each byte evicted from tmpfs is a byte of MemAvailable
again.
"""

from __future__ import annotations

import os

MEMINFO = "/proc/meminfo"
POLL_SECONDS = 0.5  # one read of /proc/meminfo: tens of microseconds
DEFAULT_FLOOR = 1 << 30  # on a RAM-backed fast dir, unless --fast-min-free says otherwise
MAX_MARGIN = 256 << 20  # the hysteresis band above the floor, at most
GROW_STEPS = 16  # the budget grows back in this many polls at the fastest
RAM_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})  # whose files are RAM (/dev/shm is tmpfs)


def parse_meminfo(text: str, key: str = "MemAvailable") -> int | None:
    """A field of a /proc/meminfo text, in bytes; None if it has none
    (MemAvailable: kernels before 3.14)."""
    for line in text.splitlines():
        if line.startswith(key + ":"):
            fields = line.split()
            if len(fields) >= 2 and fields[1].isdigit():
                return int(fields[1]) * (1024 if fields[2:3] == ["kB"] else 1)
    return None


def read_meminfo(key: str, path: str = MEMINFO) -> int | None:
    try:
        with open(path, "rb") as f:
            return parse_meminfo(f.read().decode("ascii", "replace"), key)
    except OSError:
        return None


def read_available(path: str = MEMINFO) -> int | None:
    """The box's available memory now (what the kernel could hand out
    without swapping or the OOM killer); None if it cannot tell."""
    return read_meminfo("MemAvailable", path)


def total_memory(path: str = MEMINFO) -> int | None:
    return read_meminfo("MemTotal", path)


def margin_of(floor: int) -> int:
    """The hysteresis band: a shrink aims at floor + margin, and the budget
    grows back only as far as a full tier would still leave floor + margin
    free. A quarter of the floor, at most MAX_MARGIN: wider than the noise
    of other processes, so that eviction and refill do not take turns."""
    return min(floor // 4, MAX_MARGIN)


def effective_budget(budget: int, current: int, used: int, available: int | None,
                     floor: int) -> int:
    """The fast tier's budget for the next poll.

    `budget` is the configured one (--fast-size), `current` the effective
    one until now, `used` what the tier holds (copies, reservations and
    held copies), `available` MemAvailable (None: unknown, nothing changes)
    and `floor` the free memory to keep (0: off).

    - Below the floor: give back the shortfall and the margin, so that
      MemAvailable comes back to floor + margin once the copies are gone.
      It never rises while below the floor; if memory keeps falling, it
      keeps shrinking, down to 0 (every read then comes from the cold
      tier, which costs bandwidth, not RAM).
    - At or above it: grow back towards `budget` by at most a sixteenth of
      it per poll, and only as far as a tier filled up to the new budget
      would still leave floor + margin available.
    - In between (above the floor, but a fuller tier would not leave the
      margin): keep `current`. That band is the hysteresis.
    """
    if not floor or available is None:
        return budget
    margin = margin_of(floor)
    if available < floor:
        return max(0, min(current, used - (floor + margin - available)))
    if current >= budget:
        return budget
    room = used + available - floor - margin  # the largest budget RAM allows now
    step = max(budget // GROW_STEPS, 1)
    return max(current, min(budget, current + step, room))


def on_ram(fast_dir: str, mounts: list[tuple[str, str, str]]) -> bool:
    """Whether fast_dir lies on a RAM-backed filesystem (tmpfs, ramfs), by
    the mount table: (mount point, fstype, device) rows."""
    real = os.path.realpath(fast_dir)
    best = ("", "")
    for target, fstype, _ in mounts:
        inside = real == target or real.startswith(target.rstrip("/") + "/")
        if inside and len(target) >= len(best[0]):
            best = (target, fstype)
    return best[1] in RAM_FILESYSTEMS
