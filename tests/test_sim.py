"""The simulator and the offline optimum, on hand-checked cases."""

import io

import pytest

from aattsfs.policy import LFUPolicy, LRUPolicy
from aattsfs.sim import Request, belady_min, byte_bound, read_trace, simulate
from aattsfs.tracegen import PATTERNS, write_trace


def reqs(names, size=1):
    return [Request(n, size) for n in names]


def test_belady_min_by_hand():
    # capacity 2, a b c a b: at c the next uses are a@3, b@4, c@never, so MIN
    # bypasses c and both a and b hit; LRU evicts a for c, then b for a: 0
    t = reqs("abcab")
    assert belady_min(t, 2).hits == 2
    assert simulate(t, 2, LRUPolicy()).hits == 0
    # a loop one file larger than the cache: LRU never hits; MIN keeps a and b
    # and bypasses c each time: a, b hit on passes 2-4 -> 6 hits
    t = reqs("abc" * 4)
    assert simulate(t, 2, LRUPolicy()).hits == 0
    assert belady_min(t, 2).hits == 6
    # one file opened by four processes: three reuses
    assert belady_min([Request("a", 1, p) for p in range(4)], 1).hits == 3
    assert belady_min(reqs("abcd"), 0).hits == 0


def test_a_stream_reopening_its_last_file_continues_one_use():
    """A loader checks a shard's header, then opens it again to map it: one
    use, whose bytes come from the cold tier once, and found or not as its
    first open was (on the mount, that open's copy is still in flight). The
    optimum counts it the same way, or it would score hits no policy can."""
    t = [Request("a", 4, 1), Request("b", 4, 2), Request("a", 4, 3), Request("a", 4, 3),
         Request("a", 4, 4)]
    lru, best, bound = simulate(t, 4, LRUPolicy()), belady_min(t, 1), byte_bound(t, 4)
    for r in (lru, best, bound):
        assert (r.requests, r.bytes_requested) == (5, 16)
    # LRU: b evicts a, stream 3's a misses at both its opens, stream 4's hits
    assert (lru.hits, lru.hit_bytes, lru.cold_bytes) == (1, 4, 12)
    # the optimum bypasses b: stream 3's a hits at both opens, stream 4's too
    assert (best.hits, best.hit_bytes) == (bound.hits, bound.hit_bytes) == (3, 8)


def test_simulate_counts_bytes_and_skips_files_larger_than_the_budget():
    t = [Request("big", 10), Request("s", 2), Request("big", 10), Request("s", 2)]
    r = simulate(t, 5, LRUPolicy())
    assert (r.hits, r.hit_bytes, r.bytes_requested, r.cold_bytes) == (1, 2, 24, 22)


def test_lfu_keeps_the_popular_file_where_lru_does_not():
    # capacity 2, a a a b c a: at c, LRU evicts a (least recent), LFU evicts b
    # (used once): the last a hits only under LFU
    t = [Request(n, 1, stream=p) for p, n in enumerate("aaabca")]
    assert simulate(t, 2, LRUPolicy()).hits == 2
    assert simulate(t, 2, LFUPolicy()).hits == 3


def test_byte_bound_by_hand():
    # budget 10, x(6) y(6) x(10): at y, x's next use is sooner than y's
    # (never), so the bound drops y's bytes and x hits in full: 6 bytes;
    # LRU evicts x for y: 0
    t = [Request("x", 6), Request("y", 6), Request("x", 6)]
    assert byte_bound(t, 10).hit_bytes == 6
    assert simulate(t, 10, LRUPolicy()).hit_bytes == 0
    # x(6) y(6) x(6) y(6), budget 10: only 10 of the 12 bytes fit; the bound
    # keeps all of x and 4 bytes of y: 6 + 4; whole files allow only 6
    t = [Request("x", 6), Request("y", 6), Request("x", 6), Request("y", 6)]
    assert byte_bound(t, 10).hit_bytes == 10
    assert simulate(t, 10, LRUPolicy()).hit_bytes == 0


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_no_policy_beats_the_bounds(pattern):
    trace = PATTERNS[pattern]()
    total = sum({r.path: r.size for r in trace}.values())
    budget = total // 2
    bound = byte_bound(trace, budget)
    sizes = {r.size for r in trace}
    for policy in (LRUPolicy(), LFUPolicy()):
        r = simulate(trace, budget, policy)
        assert 0 <= r.hit_bytes <= bound.hit_bytes
        if len(sizes) == 1:
            (size,) = sizes
            assert r.hits <= belady_min(trace, budget // size).hits


def test_trace_round_trip_and_errors():
    trace = PATTERNS["pipeline"](loads=3)
    buf = io.StringIO()
    write_trace(trace, buf)
    lines = buf.getvalue().splitlines() + ['{"op": "read", "path": "x", "off": 0}', ""]
    assert read_trace(lines) == trace
    with pytest.raises(ValueError, match="line 2"):
        read_trace(['{"op": "open", "path": "a", "size": 1}', '{"op": "open"}'])
    with pytest.raises(ValueError, match="line 1"):
        read_trace(["not json"])


def test_sim_cli(tmp_path):
    import json as _json

    from conftest import run_cli
    path = tmp_path / "loop.jsonl"
    path.write_text(run_cli("trace", "generate", "loop").stdout)
    out = _json.loads(run_cli("sim", path, "--budget", "80M", "--json").stdout)
    # a loop twice the budget: LRU alone hits nothing; LRU with the default
    # admission keeps the first budget's worth, as MIN does
    assert out["lru"]["hit_ratio"] == pytest.approx(0.45)
    plain = _json.loads(run_cli("sim", path, "--budget", "80M", "--admission", "all",
                                "--json").stdout)
    assert plain["lru"]["hit_ratio"] == 0.0
    assert out["optimum (MIN)"]["hit_ratio"] == pytest.approx(0.45)
    assert out["byte bound"]["byte_hit_ratio"] == pytest.approx(0.45)
    assert out["predictive+markov"]["hit_ratio"] == pytest.approx(0.45)
    table = run_cli("sim", path, "--budget", "80M", "--policy", "lru").stdout
    assert "lru" in table and "lfu" not in table
    pf = run_cli("sim", path, "--budget", "80M", "--policy", "lru", "--prefetch",
                 "ppm").stdout
    assert "lru+ppm+prefetch" in pf and "precision" in pf
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"op": "open", "path": "a"}\n')
    proc = run_cli("sim", bad, "--budget", "1G", check=False)
    assert proc.returncode == 2 and "line 1 is not a trace event" in proc.stderr
    assert "Traceback" not in proc.stderr
