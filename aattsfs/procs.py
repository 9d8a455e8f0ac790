"""Which process a FUSE request comes from, as a stream key that survives
pid reuse: (process id, process start time)."""

from __future__ import annotations

import os

Stream = tuple[int, "float | None"]


def _start_time(pid: int) -> float:
    """Start time of a process, in seconds after boot (raises OSError if gone)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return int(fields[19]) / os.sysconf("SC_CLK_TCK")


def stream_of(tid: int) -> Stream:
    """(process id, start time) of thread `tid` (FUSE reports the thread);
    (tid, None) if it is already gone. Called while its request is pending,
    so the process is alive."""
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            pid = next(int(line.split()[1]) for line in f if line.startswith(b"Tgid:"))
        return pid, _start_time(pid)
    except (OSError, StopIteration, ValueError, IndexError):
        return tid, None


def alive(stream: Stream) -> bool:
    pid, start = stream
    try:
        return start is None or _start_time(pid) == start
    except (OSError, ValueError, IndexError):
        return False
