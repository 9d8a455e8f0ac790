"""The free-memory floor (docs/memory.md): the budget rule on hand-checked
cases."""

from __future__ import annotations

from aattsfs.memfloor import (GROW_STEPS, effective_budget, margin_of, on_ram,
                              parse_available, read_available)

MiB = 1 << 20
GiB = 1 << 30


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
    assert parse_available(text) == 24162360 * 1024
    assert parse_available("MemTotal: 5 kB\n") is None
    assert read_available() > 0  # this box's
    table = [("/", "ext4", "8:1"), ("/dev/shm", "tmpfs", "0:25"), ("/mnt/ram", "ramfs", "0:9")]
    assert on_ram("/dev/shm/aattsfs/x", table) and on_ram("/mnt/ram", table)
    assert not on_ram("/dev/shmx/a", table) and not on_ram("/var/cache", table)
