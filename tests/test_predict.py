"""Predictors, the forecast and the prediction-aware policy on small,
hand-checked sequences."""

import pytest

from aattsfs.policy import PredictivePolicy, make_policy
from aattsfs.learn import ExpectedBy, Imported, Learner, ranks, staging, stream_key
from aattsfs.predict import LastSuccessor, Markov, PPM, forecast
from aattsfs.sim import Request, belady_min, simulate
from aattsfs.tracegen import PATTERNS


def fed(p, seq):
    for k in seq:
        p.observe(k)
    return p


def test_last_successor_follows_the_latest_change():
    p = fed(LastSuccessor(), "abac")
    assert p.after(["a"]) == [("c", 1.0)]
    assert p.after(["c"]) == [] and p.after([]) == []


def test_markov_counts_transitions():
    p = fed(Markov(), "abacab")
    # a->b twice, a->c once
    assert p.after(["a"]) == [("b", pytest.approx(2 / 3)), ("c", pytest.approx(1 / 3))]
    assert p.after(["zz"]) == []


def test_ppm_uses_the_longer_context_and_falls_back():
    # after "x a" comes b, after "y a" comes c: order 1 cannot tell, order 2 can
    p = fed(PPM(order=2), "xab" "yac" "xab" "yac")
    best_after_xa = p.after(["x", "a"])[0]
    best_after_ya = p.after(["y", "a"])[0]
    assert best_after_xa[0] == "b" and best_after_ya[0] == "c"
    assert best_after_xa[1] > 0.5
    assert fed(Markov(), "xabyacxabyac").after(["a"])[0][1] == pytest.approx(0.5)
    # an unseen long context falls back to the shorter one
    assert p.after(["q", "a"])[0][0] in "bc"
    assert sum(pr for _, pr in p.after(["x", "a"])) <= 1.0 + 1e-9


def test_forecast_rolls_forward_within_the_budget():
    p = fed(Markov(), "abcd" * 3)
    assert [k for k, _ in forecast(p, lambda k: 10, budget=30)] == ["a", "b", "c"]
    assert [k for k, _ in forecast(p, lambda k: 10, budget=1000)] == ["a", "b", "c", "d"]
    p = fed(Markov(), "abcabdab")  # after b: c or d; the runner-up is listed too
    keys = [k for k, _ in forecast(p, lambda k: 1, budget=100, min_prob=0.3)]
    assert keys[:2] == ["c", "d"] or keys[:2] == ["d", "c"]


def test_predictive_policy_evicts_the_furthest_expected():
    pol = PredictivePolicy()
    for k in "abcd":
        pol.admit(k, 1)
    pol.set_forecast(["c", "a"])  # c soonest, then a; b and d not expected
    assert list(pol.victims()) == ["b", "d", "a", "c"]
    assert pol.should_admit("c", ["a"])  # c is expected before a
    assert not pol.should_admit("a", ["c"])  # bypass: a is expected after c
    # unknown to the forecast: no opinion, the admission filter decides
    assert pol.should_admit("x", ["a"]) is None


def test_predictive_policy_approaches_min_on_a_loop():
    trace = [Request(k, 1) for k in "abcde" * 20]
    best = belady_min(trace, 3).hits
    got = simulate(trace, 3, make_policy("predictive"), Learner("markov"),
                   prefetch=False).hits
    assert simulate(trace, 3, make_policy("lru")).hits == 0
    assert got >= 0.85 * best


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_prefetch_never_breaks_the_budget(pattern, monkeypatch):
    from aattsfs.residency import Residency
    trace = PATTERNS[pattern]()
    budget = sum({r.path: r.size for r in trace}.values()) // 2
    peak = []
    orig = Residency.commit

    def watched(self, key, size):
        peak.append(self.used)
        orig(self, key, size)

    monkeypatch.setattr(Residency, "commit", watched)
    r = simulate(trace, budget, make_policy("predictive"), Learner("ppm"))
    assert peak and max(peak) <= budget
    assert r.prefetch_used_bytes + r.prefetch_wasted_bytes == r.prefetched_bytes


def test_streams_learn_their_own_order_when_interleaved():
    lr = Learner("markov")
    for a, x in zip("abc", "xyz", strict=True):  # two processes open files in turn
        lr.observe(1, a)
        lr.observe(2, x)
    assert lr.within.after(["a"]) == [("b", 1.0)]
    assert lr.within.after(["x"]) == [("y", 1.0)]
    size = {k: 1 for k in "abcxyz"}.__getitem__
    lr.observe(3, "a")
    # its own rest, then the process that came after one starting with "a"
    assert [k for k, _ in lr.forecast([3], size, 5)] == ["b", "c", "x", "y", "z"]


def test_the_chain_of_processes_stages_the_next_model():
    lr = Learner("markov")
    pid = 0
    for _ in range(3):  # a pipeline of fresh processes: model A, then model B
        for model in ("A", "B"):
            pid += 1
            for f in ("config", "w1", "w2"):
                lr.observe(pid, f"{model}/{f}")
    lr.observe(pid + 1, "A/config")
    ahead = lr.forecast([pid + 1], lambda k: 1, 100)
    # the rest of A, then B, then A again (its files are already listed)
    assert [k for k, _ in ahead] == ["A/w1", "A/w2", "B/config", "B/w1", "B/w2", "A/config"]
    assert all(p >= 0.5 for _, p in ahead)
    # the byte budget cuts the look-ahead
    assert [k for k, _ in lr.forecast([pid + 1], lambda k: 1, 3)] == \
        ["A/w1", "A/w2", "B/config"]


def test_imported_streams_are_kept_apart_from_local_ones():
    lr = Learner("markov")
    lr.observe((100, 5.0), "local/config")  # a live process here
    lr.observe((200, 6.0), "z/config")  # the latest first open here
    # another box's trace: its pid 100 is not this box's process 100, and
    # its processes follow one another, not this box's
    imported = [{"op": "open", "path": p, "size": 1, "pid": pid, "start": 5.0,
                 "imported": "abc"}
                for pid, p in ((100, "a/config"), (100, "a/w"), (101, "b/config"),
                               (101, "b/w"))]
    assert stream_key(imported[0]) == Imported("abc", 100, 5.0) != (100, 5.0)
    lr.replay(imported)
    assert lr.streams[(100, 5.0)].opened == {"local/config"}
    assert lr.within.after(["local/config"]) == []
    assert lr.chain.after(["z/config"]) == []  # no z -> a stitched across the two
    assert lr.chain.after(["a/config"]) == [("b/config", 1.0)]
    assert lr.within.after(["a/config"]) == [("a/w", 1.0)]
    # the import's processes ran elsewhere: forgotten once replayed, they
    # push no live stream out of those remembered
    assert list(lr.streams) == [(100, 5.0), (200, 6.0)]
    # and the live chain goes on from this box's latest process
    lr.observe((300, 7.0), "a/config")
    assert lr.chain.after(["z/config"]) == [("a/config", 1.0)]
    assert [k for k, _ in lr.forecast([(300, 7.0)], lambda k: 1, 10)] == \
        ["a/w", "b/config", "b/w"]


def test_hinted_files_stay_expected_until_the_process_opens_them():
    lr = Learner("markov")
    size = lambda k: 1  # noqa: E731
    lr.observe(7, "m/config", hinted=["m/index", "m/s1", "m/s2"])
    assert [k for k, _ in lr.forecast([7], size, 100)] == ["m/index", "m/s1", "m/s2"]
    lr.observe(7, "m/tokenizer")  # another file first: the promise still holds
    lr.observe(7, "m/s1", hinted=["m/config", "m/index", "m/s2"])  # opened: not again
    assert [k for k, _ in lr.forecast([7], size, 100)] == ["m/index", "m/s2"]
    # the next process of the chain is expanded through the hints of its first file
    lr.observe(8, "n/config")
    lr.observe(9, "m/config")
    model = {"n/config": ["n/s1"]}
    keys = [k for k, _ in lr.forecast([9], size, 100, hints=lambda k: model.get(k, []))]
    assert keys[keys.index("n/config") + 1] == "n/s1"


def test_staging_takes_likely_files_up_to_the_budget():
    ahead = [("a", 1.0), ("b", 0.3), ("c", 0.6), ("d", 0.9), ("e", 0.9)]
    assert staging(ahead, lambda k: 10, 30) == [0, 2, 3]
    protected = ExpectedBy(ranks(ahead), 2, frozenset({"x"}))
    assert [k for k in "abcdexy" if k in protected] == ["a", "b", "c", "x"]


def test_per_process_streams_lose_nothing_against_one_sequence():
    # the pipeline pattern, replayed as one stream and with each model load
    # a process of its own: the chain of processes must recover what the
    # global sequence knew (which model comes next)
    from aattsfs.tracegen import pipeline
    one = pipeline(loads=60)
    pid, per_process = 0, []
    for r in one:
        pid += r.path.endswith("config.json")
        per_process.append(Request(r.path, r.size, (pid, 0.0)))
    budget = sum({r.path: r.size for r in one}.values()) // 2
    for policy, prefetch in (("predictive", False), ("lru", True)):
        a = simulate(one, budget, make_policy(policy), Learner("markov"), prefetch=prefetch)
        b = simulate(per_process, budget, make_policy(policy), Learner("markov"),
                     prefetch=prefetch)
        assert b.hit_bytes >= 0.999 * a.hit_bytes and b.hit_bytes > 0.4 * b.bytes_requested
        assert b.cold_bytes <= 1.1 * a.cold_bytes
