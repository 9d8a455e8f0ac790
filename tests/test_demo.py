"""`make demo`'s code at a tiny scale: the three acts run on a throttled loop
device, every output through the mount matches the direct load, and nothing
stays mounted, attached or throttled afterwards, also after Ctrl-C."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import wait_for

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "work" / "demo-tiny"
FAST = Path("/dev/shm/aattsfs-demo-tiny")


def throttle() -> "SlowCold":  # noqa: F821 (bench/slowcold.py)
    sys.path.insert(0, str(REPO / "bench"))
    from slowcold import SlowCold
    return SlowCold(WORK, size_mb=0, read_mbps=1)  # only to name and undo the demo's


def leftovers() -> list[str]:
    """What a demo run could leave behind: mounts under its work directory,
    its loop device, its throttling cgroup, its fast tiers."""
    out = [line for line in Path("/proc/mounts").read_text().splitlines()
           if str(WORK) in line]
    slow = throttle()
    if slow.image.exists():
        out += subprocess.run(["losetup", "-j", str(slow.image)], capture_output=True,
                              text=True).stdout.split()
    out += [str(p) for p in (slow.cgroup, FAST) if p.exists()]
    return out


def demo(**kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "scripts" / "demo.py"), "--scale",
                             "tiny"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "DEMO_COLD": "slow"}, **kw)


@pytest.fixture
def clean():
    """Fails a test after which the demo left something, and removes it."""
    assert leftovers() == []
    yield
    left = leftovers()
    for line in Path("/proc/mounts").read_text().splitlines():
        if str(WORK / "mnt-") in line:
            subprocess.run(["fusermount3", "-u", "-z", line.split()[1]], check=False)
    throttle().teardown()
    shutil.rmtree(FAST, ignore_errors=True)
    assert left == []


@pytest.mark.timeout(900)
def test_the_demo_runs_its_three_acts_and_leaves_nothing(clean):
    proc = demo()
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    for shown in ("throttled to 200 MB/s", "act 1: cold start", "first load through aattsfs",
                  "act 2: the same model again", "load from the fast tier", "act 3: a rotation",
                  "LRU only (--no-prefetch)", "aattsfs (default)", "user.aatts.tier=",
                  "$ aattsfs status", "make bench"):
        assert shown in out, (shown, out)
    assert out.count("output identical") == 2 and "DIFFERENT" not in out
    assert "identical to the direct loads" in out
    assert "Traceback" not in err


@pytest.mark.timeout(300)
def test_ctrl_c_undoes_what_the_demo_set_up(clean):
    """Interrupted (as by Ctrl-C: SIGINT to its whole process group) once its
    first mount is up, the demo unmounts, detaches and removes the throttle."""
    proc = demo(start_new_session=True)
    try:
        wait_for(lambda: any(str(WORK / "mnt-") in line
                             for line in Path("/proc/mounts").read_text().splitlines()),
                 timeout=240, what="the demo's first mount")
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert "interrupted; everything it mounted, attached or throttled was undone" in err, err
    assert "Traceback" not in err
