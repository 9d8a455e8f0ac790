"""The residency core and its admission filters, on hand-checked cases."""

import pytest

from aattsfs.learn import Learner
from aattsfs.policy import AdmitAll, FrequencyAdmission, LRUPolicy, PredictivePolicy, \
    ReuseAdmission, TwoQPolicy, make_policy
from aattsfs.residency import NO_ROOM, NOT_ADMITTED, TOO_BIG, Residency
from aattsfs.sim import Request, belady_min, byte_bound, simulate
from aattsfs.tracegen import PATTERNS


def bring_in(core: Residency, key, size, **kw):
    """What the store does with room(): drop the victims, reserve, commit."""
    victims, why = core.room(key, size, **kw)
    if why is None:
        for v in victims:
            core.release(core.drop(v))
        assert core.reserve(size)
        core.commit(key, size)
    return victims, why


def test_too_big_and_no_room_are_told_apart():
    core = Residency(10, LRUPolicy(), AdmitAll())
    assert core.room("big", 11) == ([], TOO_BIG)
    bring_in(core, "a", 6)
    assert core.room("b", 6, evictable=lambda k: k != "a") == ([], NO_ROOM)
    assert core.room("b", 6, protect={"a"}) == ([], NO_ROOM)
    assert core.room("b", 6) == (["a"], None)
    assert core.used == 6  # room() alone changes nothing


def test_reuse_admits_what_came_back_within_the_budget():
    core = Residency(10, LRUPolicy(), ReuseAdmission(10))
    for key in "ab":
        core.opened(key, 5)
        bring_in(core, key, 5)  # free room: both come in
    core.opened("c", 5)  # first open of c, the tier full: probation takes 1 byte at most
    assert core.room("c", 5) == ([], NOT_ADMITTED)
    core.opened("a", 5)  # a hit: a becomes the most recent
    core.opened("c", 5)  # c came back after 10 bytes of opens (a, c): within the budget
    assert core.room("c", 5) == (["b"], None)
    for key in "defghij":  # 35 bytes of other files
        core.opened(key, 5)
    core.opened("b", 5)  # b's distance is now 50 bytes: it would not last; read from cold
    assert core.room("b", 5) == ([], NOT_ADMITTED)
    # a user's warm, or a file staged for the forecast, is not judged by reuse
    assert core.room("b", 5, judge=False)[1] is None
    assert core.room("b", 5, ahead=True)[1] is None


def test_newcomers_come_in_on_probation_and_push_out_newcomers_first():
    core = Residency(100, LRUPolicy(), ReuseAdmission(100))
    for i in range(10):  # proven files fill the tier: each opened twice in a row
        core.opened(i, 10)
        bring_in(core, i, 10)
        core.opened(i, 10)
    core.opened("n1", 10)  # a newcomer takes 10% from the oldest proven file
    assert bring_in(core, "n1", 10) == ([0], None)
    core.opened("n2", 10)  # the probation share is full: n2 replaces n1, not a proven file
    assert bring_in(core, "n2", 10) == (["n1"], None)
    core.opened("n2", 10)  # opened again: proven, and no longer on probation
    core.opened("n3", 10)
    assert bring_in(core, "n3", 10) == ([1], None)


def test_a_newcomer_whose_copy_failed_leaves_the_probation_share():
    core = Residency(100, LRUPolicy(), ReuseAdmission(100))
    for i in range(10):
        core.opened(i, 10)
        bring_in(core, i, 10)
        core.opened(i, 10)
    core.opened("n1", 10)
    assert core.room("n1", 10) == ([0], None)  # on probation, room reserved for it
    core.release(core.drop(0))
    assert core.reserve(10)
    core.abandon("n1", 10)  # its copy failed: the share is free again
    assert core.used == 90
    core.opened("n2", 10)
    assert core.room("n2", 10) == ([], None)  # free room
    core.opened("n3", 10)
    assert bring_in(core, "n3", 10)[1] is None  # n2 took nothing: probation not full


def test_a_loop_longer_than_the_budget_keeps_what_min_keeps():
    trace = [Request(k, 1) for k in "abcdef" * 10]
    lru = simulate(trace, 3, LRUPolicy(), admission=AdmitAll())
    reuse = simulate(trace, 3, LRUPolicy(), admission=ReuseAdmission(3))
    assert lru.hits == 0
    # MIN keeps 2 of the 6 files and leaves one slot to the others: 2 hits a
    # pass; reuse keeps the 3 last opened of the first pass: 3 hits a pass
    # after the first, but misses the other 3 without copying them
    assert reuse.hits >= belady_min(trace, 3).hits - 3
    # every miss but the three that filled free room is read from cold
    assert reuse.bypasses == 60 - 3 - reuse.hits


def test_a_file_opened_twice_in_a_row_by_one_process_is_one_use():
    """A loader checks each shard's header, then opens it again to map it:
    on a loop longer than the budget, each pass by a fresh process, that must
    not make every shard look reused and copy each only to evict it."""
    trace = [Request(k, 1, stream=p) for p in range(10) for k in "abcdef" for _ in "12"]
    reuse = simulate(trace, 3, LRUPolicy(), admission=ReuseAdmission(3))
    # the 3 that filled free room stay and hit at both opens of every pass
    # after the first; the others are read from cold every time, never copied
    assert reuse.hits == 9 * 3 * 2
    assert reuse.bypasses == 60 - 3 - reuse.hits // 2
    # opened by two processes, the same file is reused
    core = Residency(2, LRUPolicy(), ReuseAdmission(2))
    for key, stream in [("a", 1), ("b", 1), ("c", 1), ("c", 1)]:
        core.opened(key, 1, stream)
        if key not in core.resident:
            bring_in(core, key, 1)
    assert set(core.resident) == {"a", "b"}  # c: one use, not admitted
    core.opened("c", 1, 2)
    assert bring_in(core, "c", 1)[1] is None


@pytest.mark.parametrize("pattern", ["loop", "pipeline", "pertensor", "pertensor-skips"])
def test_reuse_admission_reaches_the_optimum_on_ordered_patterns(pattern):
    trace = PATTERNS[pattern]()
    budget = sum({r.path: r.size for r in trace}.values()) // 2
    best = byte_bound(trace, budget).byte_hit_ratio
    lru = simulate(trace, budget, LRUPolicy(), admission=AdmitAll()).byte_hit_ratio
    got = simulate(trace, budget, LRUPolicy(), admission=ReuseAdmission(budget))
    assert got.byte_hit_ratio >= 0.85 * best > lru
    assert got.bypassed_bytes > 0


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_reuse_admission_is_never_much_worse_than_admitting_everything(pattern):
    trace = PATTERNS[pattern]()
    budget = sum({r.path: r.size for r in trace}.values()) // 2
    plain = simulate(trace, budget, LRUPolicy(), admission=AdmitAll()).byte_hit_ratio
    got = simulate(trace, budget, LRUPolicy(), admission=ReuseAdmission(budget))
    assert got.byte_hit_ratio >= plain - 0.02


def test_predictive_policy_overrides_the_filter_where_the_forecast_knows():
    pol = PredictivePolicy()
    core = Residency(2, pol, ReuseAdmission(2))
    for key in "ab":
        core.opened(key, 1)
        bring_in(core, key, 1)
    core.opened("c", 1)  # a newcomer, no free room, probation too small for it
    pol.set_forecast(["c", "a", "b"])  # but the forecast expects it first
    assert core.room("c", 1) == (["b"], None)
    pol.set_forecast(["a", "b", "c"])  # expected after both: MIN bypasses it
    assert core.room("c", 1) == ([], NOT_ADMITTED)


def test_tinylfu_and_2q_are_scan_resistant():
    hot = [Request("h", 1), Request("i", 1)]
    scan = [Request(f"s{n}", 1) for n in range(50)]
    trace = hot * 5 + scan + hot
    assert simulate(trace, 2, LRUPolicy(), admission=AdmitAll()).hits == 8
    # the hot pair survives the scan: 2 more hits at the end
    assert simulate(trace, 2, LRUPolicy(), admission=FrequencyAdmission()).hits == 10
    # 2Q: the pair goes to its main LRU once it comes back after leaving the
    # FIFO of files seen once; from then on a scan churns only the FIFO
    trace = hot * 5 + scan + hot * 5 + [Request(f"t{n}", 1) for n in range(50)] + hot
    assert simulate(trace, 4, LRUPolicy(), admission=AdmitAll()).hits == 16
    assert simulate(trace, 4, TwoQPolicy(), admission=AdmitAll()).hits == 16 + 2


def test_the_daemon_and_the_simulator_share_the_core():
    # sim.simulate drives Residency: a budget never exceeded, whatever the mix
    trace = PATTERNS["interleaved"]()
    budget = sum({r.path: r.size for r in trace}.values()) // 3
    r = simulate(trace, budget, make_policy("predictive"), Learner("markov"),
                 admission=ReuseAdmission(budget))
    assert r.prefetch_used_bytes + r.prefetch_wasted_bytes == r.prefetched_bytes
    assert r.bytes_requested == sum(x.size for x in trace)


def test_a_prefetch_evicts_in_the_forecasts_order_ranked_only_when_needed():
    # LRU would push out a (used longest ago); the forecast expects a next,
    # then c, and b not at all: a prefetch pushes out b, then c, whatever
    # the recency. The forecast is listed only when something must go.
    core = Residency(30, LRUPolicy(), AdmitAll())
    for key in "abc":
        bring_in(core, key, 10)
    asked = []

    def ranking():
        asked.append(1)
        return {"a": 0, "c": 1}

    core.set_forecast(ranking)
    assert core.room("x", 10, ahead=True) == (["b"], None)
    assert core.room("x", 20, ahead=True) == (["b", "c"], None)
    assert core.room("x", 10) == (["a"], None)  # a demand read: the policy's order
    assert len(asked) == 2
    # nor when evicting all that may go would not make room: a staging plan
    # longer than the tier asks again for the same files at every plan
    assert core.room("x", 20, ahead=True, protect={"a", "c"}) == ([], NO_ROOM)
    assert core.room("x", 30, ahead=True, evictable=lambda k: k == "b") == ([], NO_ROOM)
    assert len(asked) == 2
    core.release(core.drop("b"))
    assert core.room("x", 10, ahead=True) == ([], None) and len(asked) == 2
