"""Which process a FUSE request comes from, as a stream key that survives
pid reuse: (process id, process start time)."""

from __future__ import annotations

import os
import time

Stream = tuple[int, "float | None"]


def _start_time(pid: int) -> float:
    """Start time of a process, in seconds after boot (raises OSError if gone)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return int(fields[19]) / os.sysconf("SC_CLK_TCK")


RECENT_FOR = 1.0  # seconds a thread's stream is remembered (a loader opens many files)
_recent: dict[int, tuple[Stream, float]] = {}


def stream_of(tid: int) -> Stream:
    """(process id, start time) of thread `tid` (FUSE reports the thread);
    (tid, None) if it is already gone. Called while its request is pending,
    so the process is alive. Two procfs reads, so a thread's answer is kept
    for RECENT_FOR seconds: the kernel hands out ids in turn, and does not
    give a freed one to a new thread within a second."""
    now = time.monotonic()
    hit = _recent.get(tid)
    if hit is not None and hit[1] > now:
        return hit[0]
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            pid = next(int(line.split()[1]) for line in f if line.startswith(b"Tgid:"))
        stream: Stream = (pid, _start_time(pid))
    except (OSError, StopIteration, ValueError, IndexError):
        return tid, None
    if len(_recent) > 4096:  # forget the expired ones
        for key in [k for k, (_, until) in _recent.items() if until <= now]:
            del _recent[key]
    _recent[tid] = (stream, now + RECENT_FOR)
    return stream


def alive(stream: Stream) -> bool:
    """Whether the process still runs (one already gone when its request
    was read, start None, does not)."""
    pid, start = stream
    try:
        return start is not None and _start_time(pid) == start
    except (OSError, ValueError, IndexError):
        return False
