"""The free-memory floor (docs/memory.md): the budget rule on hand-checked
cases, the store evicting for it in-process, and a real mount whose fast
tier gives its RAM back to a real memory hog while readers go on reading."""

from __future__ import annotations

import errno
import os
import random
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import trio

from aattsfs.memfloor import (GROW_STEPS, effective_budget, margin_of, on_ram,
                              parse_meminfo, read_available)
from conftest import MiB, act, run_cli, wait_for, write_random
from test_faults import Tally, read_checked
from test_store import (CHUNK, close_store, cold_files, hold_chunks_of, make_store, read_whole,
                        running)

GiB = 1 << 30
SHORT_LOG = r"memory is short: .* below the floor of .* \(--fast-min-free\)"


# -- the rule ---------------------------------------------------------------

def test_below_the_floor_the_budget_gives_back_the_shortfall_and_a_margin():
    budget, floor = 4 * GiB, 2 * GiB
    margin = margin_of(floor)
    assert margin == 256 * MiB
    # 3 GiB held, 500 MiB short: evicting 500 MiB and the margin brings
    # MemAvailable back to floor + margin
    assert effective_budget(budget, budget, 3 * GiB, floor - 500 * MiB, floor) \
        == 3 * GiB - 500 * MiB - margin
    # shorter than the tier holds: down to nothing (reads go to the cold tier)
    assert effective_budget(budget, budget, 100 * MiB, floor - GiB, floor) == 0
    # an empty tier is shrunk too: nothing may refill it while memory is short
    assert effective_budget(budget, budget, 0, floor - 1, floor) == 0


def test_while_short_it_never_grows_and_shrinks_further_as_memory_falls():
    budget, floor = 4 * GiB, 2 * GiB
    margin = margin_of(floor)
    first = effective_budget(budget, budget, 3 * GiB, floor - 100 * MiB, floor)
    # the copies are gone but memory is still short (another process took
    # what they gave back): the budget stays, it does not follow `used` up
    assert effective_budget(budget, first, first, floor - 100 * MiB, floor) \
        == first - 100 * MiB - margin
    assert effective_budget(budget, first, 3 * GiB, floor - 10 * MiB, floor) == first
    assert effective_budget(budget, first, first, floor - GiB, floor) \
        == first - GiB - margin


def test_it_grows_back_a_step_at_a_time_as_far_as_memory_allows():
    budget, floor = 4 * GiB, 2 * GiB
    margin, step = margin_of(floor), 4 * GiB // GROW_STEPS
    # just above the floor, inside the margin: the band where nothing moves
    assert effective_budget(budget, GiB, GiB, floor + margin // 2, floor) == GiB
    # plenty free: a step per poll, up to the budget and no further
    current, polls = 0, 0
    while current < budget:
        current = effective_budget(budget, current, 0, 16 * GiB, floor)
        polls += 1
        assert current <= budget
    assert polls == GROW_STEPS
    # 600 MiB above floor + margin: a full tier may take 600 MiB more than it holds
    assert effective_budget(budget, GiB, GiB, floor + margin + 600 * MiB, floor) \
        == GiB + 256 * MiB  # a step is less than the room
    assert effective_budget(budget, GiB, GiB, floor + margin + 100 * MiB, floor) \
        == GiB + 100 * MiB
    # a tier emptier than its budget: the room counts what it may still fill
    assert effective_budget(budget, 2 * GiB, GiB, floor + margin + 100 * MiB, floor) \
        == 2 * GiB


def test_off_or_unknown_memory_leaves_the_budget():
    assert effective_budget(4 * GiB, GiB, 0, 0, 0) == 4 * GiB  # off
    assert effective_budget(4 * GiB, GiB, 3 * GiB, None, GiB) == 4 * GiB  # no MemAvailable


def test_meminfo_and_the_filesystem_of_the_fast_dir():
    text = "MemTotal:       24683784 kB\nMemFree:  1 kB\nMemAvailable:   24162360 kB\n"
    assert parse_meminfo(text) == 24162360 * 1024
    assert parse_meminfo("MemTotal: 5 kB\n") is None
    assert parse_meminfo(text, "MemTotal") == 24683784 * 1024
    assert read_available() > 0  # this box's
    table = [("/", "ext4", "8:1"), ("/dev/shm", "tmpfs", "0:25"), ("/mnt/ram", "ramfs", "0:9")]
    assert on_ram("/dev/shm/aattsfs/x", table) and on_ram("/mnt/ram", table)
    assert not on_ram("/dev/shmx/a", table) and not on_ram("/var/cache", table)


# -- the store, in-process ----------------------------------------------------

def test_the_store_evicts_for_the_floor_but_keeps_pins_and_readers(tmp_path):
    """Three copies, one pinned and one open: memory falls far below the
    floor. The unpinned ones go (in LRU order), the open one's reader goes
    on with the cold file, the pin stays; nothing comes in while memory is
    short (warm says why); then the budget grows back and warm works."""
    want = cold_files(tmp_path, a=CHUNK, b=CHUNK, p=CHUNK)
    budget = 8 * CHUNK
    store = make_store(tmp_path, budget)
    floor = store.min_free = 64 * CHUNK

    async def body():
        for rel in ("a", "b"):
            await store.warm(rel)
        await store.set_pinned("p", True)
        h = await store.open("b")
        assert await store.read(h, 0, 4096) == want["b"][:4096]
        store.apply_floor(floor + 40 * CHUNK)  # plenty: nothing changes
        assert store.core.limit == budget and store.stats.floor_evictions == 0
        store.apply_floor(floor - CHUNK)  # short: everything that may go goes
        assert store.core.limit == 0
        assert [store.tier(r) for r in "abp"] == ["cold", "cold", "fast"]
        assert store.stats.floor_evictions == 2 == store.stats.evictions
        assert store.stats.floor_evicted_bytes == 2 * CHUNK
        assert await store.read(h, 4096, CHUNK) == want["b"][4096:]  # from its cold file
        store.release(h)
        with pytest.raises(OSError) as exc:
            await store.warm("a")
        assert exc.value.errno == errno.ENOMEM
        assert await read_whole(store, "a") == want["a"]  # read cold, no promotion
        assert await store.prefetch("a", frozenset()) is None
        assert store.entries["a"].prom is None and store.core.used == CHUNK
        snap = store.snapshot()
        assert snap["memory_floor"] == {"floor_bytes": floor, "active": True,
                                        "available_bytes": floor - CHUNK, "evictions": 2,
                                        "evicted_bytes": 2 * CHUNK}
        assert snap["fast_tier"]["effective_budget_bytes"] == 0
        # memory is back: the budget grows a step per poll up to the budget
        polls = 0
        while store.core.limit < budget:
            store.apply_floor(floor + 40 * CHUNK)
            polls += 1
        assert polls == GROW_STEPS and not store.snapshot()["memory_floor"]["active"]
        await store.warm("a")
        assert store.tier("a") == "fast"

    running(store, body)
    close_store(store)


def test_the_floor_cancels_promotions_in_flight(tmp_path, monkeypatch):
    """A copy in flight is RAM too: with nothing resident to evict, the
    floor cancels it, and its reader still reads every byte (cold)."""
    want = cold_files(tmp_path, a=2 * CHUNK)
    store = make_store(tmp_path, 8 * CHUNK)
    floor = store.min_free = 64 * CHUNK
    gate = hold_chunks_of("a", monkeypatch)
    got = []

    async def body():
        h = await store.open("a")
        async with trio.open_nursery() as nursery:
            async def read():
                got.append(await store.read(h, 0, 2 * CHUNK))
            nursery.start_soon(read)
            while (prom := store.entries["a"].prom) is None:
                await trio.sleep(0.01)
            store.apply_floor(floor - CHUNK)
            assert prom.cancelled
            gate.set()
        await prom.done.wait()
        store.release(h)

    running(store, body)
    assert got == [want["a"]]
    assert store.tier("a") == "cold" and store.core.used == 0
    assert store.stats.promotions_cancelled == 1 and store.stats.promotions == 0
    close_store(store)


# -- a real mount, a real memory hog ----------------------------------------------

MEMCG = Path("/sys/fs/cgroup/memory")
# Allocates argv[1] bytes in 64 MiB pieces, every page written (a bytearray
# repeated is filled, not merely reserved), says so and holds them.
HOG = """
import sys
n = int(sys.argv[1])
held = [bytearray(b"\\x01") * (64 << 20) for _ in range(-(-n // (64 << 20)))]
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def memhog():
    """start(nbytes) -> a process holding nbytes of RAM, in a memory cgroup
    (v1) of its own limited to a little more than that: a mistake in the
    test cannot take the box's memory. Killed, and the cgroup removed, at
    the end, even if the test failed."""
    if not (MEMCG / "memory.limit_in_bytes").exists():
        pytest.skip("needs the cgroup v1 memory controller")
    cgroup = MEMCG / f"aattsfs-test-memhog-{os.getpid()}"
    procs: list[subprocess.Popen] = []

    def start(nbytes: int) -> subprocess.Popen:
        cgroup.mkdir(exist_ok=True)
        (cgroup / "memory.limit_in_bytes").write_text(str(nbytes + 192 * MiB))
        proc = subprocess.Popen(
            ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$@"', "sh",
             sys.executable, "-c", HOG, str(nbytes)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        procs.append(proc)
        assert proc.stdout.readline() == b"ready\n", "the hog did not get its memory"
        return proc

    def stop(proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.kill()
        proc.wait()

    start.stop = stop
    try:
        yield start
    finally:
        for proc in procs:
            stop(proc)
        if cgroup.exists():
            for pid in (cgroup / "cgroup.procs").read_text().split():
                (MEMCG / "cgroup.procs").write_text(pid)  # none expected: ours only
            cgroup.rmdir()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics(port: int) -> dict:
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families
    text = urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {x.name: x.value for f in text_string_to_metric_families(text) for x in f.samples
            if not x.labels}


def test_a_memory_hog_empties_the_fast_tier_and_no_read_fails(tmp_path, mounter, fast_tmpfs,
                                                              memhog):
    """A few hundred MiB warm in a tmpfs fast tier, a floor 1 GiB below
    what the box has free after that, readers checking every byte: a real
    process in a memory cgroup takes enough to fall 512 MiB below the floor.
    The daemon evicts (every copy no reader holds, at once; the others as
    their readers close them), refills nothing while memory is short, and
    no read fails or returns a wrong byte. When the hog goes, the budget
    grows back and files come in again. Margins are hundreds of MiB: other
    processes on a shared box move tens."""
    cold = tmp_path / "cold"
    files = {f"w{i}.bin": write_random(cold / f"w{i}.bin", 48 * MiB + 4099 * i, 900 + i)
             .read_bytes() for i in range(6)}
    total = sum(map(len, files.values()))  # about 290 MiB
    fast = fast_tmpfs(512 * MiB)
    # the warm copies will take `total` of RAM: 1 GiB is left above the floor then
    floor = read_available() - total - GiB
    port = _free_port()
    m = mounter(cold, fast_size="448M", fast=fast,
                extra=["--fast-min-free", str(floor), "--metrics-address", f"127.0.0.1:{port}"])
    m.expect_log(SHORT_LOG)
    for rel in files:
        act(m.path(rel), "warm")
    s = m.stats()
    assert s["fast_tier"]["files"] == len(files)
    assert s["memory_floor"]["floor_bytes"] == floor
    assert not s["memory_floor"]["active"], "memory was short before the hog: a busy box?"
    assert s["fast_tier"]["effective_budget_bytes"] == 448 * MiB

    tally = Tally("test_a_memory_hog_empties_the_fast_tier")
    stop = threading.Event()

    def reader(i: int) -> None:
        rng = random.Random(40 + i)
        while not stop.is_set():
            rel = rng.choice(sorted(files))
            read_checked(m.path(rel), files[rel], tally, rng, direct=rng.random() < 0.5,
                         shuffled=rng.random() < 0.5, what=rel)

    threads = [tally.thread(reader, i) for i in range(3)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: tally.reads >= 3, what="the readers to start", timeout=60)
        hog = memhog(read_available() - floor + 512 * MiB)
        wait_for(lambda: m.stats()["memory_floor"]["active"], timeout=60,
                 what="the daemon to see memory short")
        # every copy goes: those no reader holds at once, the others as
        # their readers close them (copies passthrough opens read in the
        # kernel would free nothing before that)
        wait_for(lambda: m.stats()["fast_tier"]["used_bytes"] == 0, timeout=60,
                 what="the fast tier to be emptied")
        s = m.stats()
        assert s["memory_floor"]["active"] and s["fast_tier"]["effective_budget_bytes"] == 0
        assert s["memory_floor"]["evictions"] == len(files) <= s["evictions"]
        assert s["memory_floor"]["evicted_bytes"] == total
        assert s["memory_floor"]["available_bytes"] < floor
        sv = os.statvfs(fast)
        assert (sv.f_blocks - sv.f_bfree) * sv.f_frsize < 4 * MiB  # the RAM is given back
        # the readers go on, from the cold tier; nothing comes back in
        promotions, reads = s["promotions"], tally.reads
        wait_for(lambda: tally.reads >= reads + 2 * len(files), timeout=120,
                 what="more reads while memory is short")
        s = m.stats()
        assert s["promotions"] == promotions and s["fast_tier"]["used_bytes"] == 0
        assert s["bypasses"] > 0
        warm = run_cli("warm", m.path("w1.bin"), check=False)  # refused at once, saying why
        assert warm.returncode != 0 and "short of memory" in warm.stderr, warm.stderr
        status = run_cli("status", m.mnt).stdout
        assert "memory floor" in status and "active: budget shrunk to 0 B" in status, status
        metrics = _metrics(port)
        assert metrics["aattsfs_memory_floor_active"] == 1
        assert metrics["aattsfs_fast_tier_effective_budget_bytes"] == 0
        assert metrics["aattsfs_floor_evictions_total"] == len(files)
        assert metrics["aattsfs_memory_floor_bytes"] == floor

        memhog.stop(hog)
        wait_for(lambda: not m.stats()["memory_floor"]["active"], timeout=60,
                 what="the budget to grow back")
        assert m.stats()["fast_tier"]["effective_budget_bytes"] == 448 * MiB
        act(m.path("w0.bin"), "warm")  # files come in again
        assert m.tier("w0.bin") == "fast"
        reads = tally.reads
        wait_for(lambda: tally.reads >= reads + len(files), timeout=120,
                 what="reads after memory came back")
    finally:
        stop.set()
        Tally.join(threads)
    tally.check()
    assert tally.reads and tally.bytes
    log = m.log.read_text()
    assert len([ln for ln in log.splitlines() if "memory is short" in ln]) == 1, log
    assert "memory is back" in log and "6 copies" in log


def test_by_default_only_a_fast_tier_in_ram_has_a_floor(cold_tree, mounter, fast_tmpfs):
    """Evicting a copy on disk frees no memory: no floor there unless asked
    for; on tmpfs 1 GiB (the daemon polls, this box is far above it)."""
    on_disk = mounter(cold_tree)
    assert on_disk.stats()["memory_floor"] == {"floor_bytes": 0, "active": False,
                                               "available_bytes": None, "evictions": 0,
                                               "evicted_bytes": 0}
    in_ram = mounter(cold_tree, fast=fast_tmpfs(64 * MiB), fast_size="64M")
    wait_for(lambda: in_ram.stats()["memory_floor"]["available_bytes"], what="a poll")
    s = in_ram.stats()["memory_floor"]
    assert s["floor_bytes"] == GiB and not s["active"]
    assert re.search(r"^memory floor +off; 0 evictions", run_cli("status", on_disk.mnt).stdout,
                     re.M)
