"""Every user mistake: one clear line, a non-zero exit, no traceback, and the
cold directory untouched."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from aattsfs.mount import is_mounted
from conftest import manifest, run_cli


def assert_one_line_error(proc, *needles):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("aattsfs: error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def dirs(tmp_path, cold_tree):
    (tmp_path / "mnt").mkdir()
    return {"cold": cold_tree, "mnt": tmp_path / "mnt", "tmp": tmp_path,
            "opts": ["--fast-dir", tmp_path / "fast", "--state-dir", tmp_path / "state",
                     "--fast-size", "16M"]}


def mount(d, cold=None, mnt=None, *extra):
    return run_cli("mount", cold or d["cold"], mnt or d["mnt"], *d["opts"], *extra,
                   check=False)


def test_cold_dir_missing_or_not_a_directory(dirs):
    assert_one_line_error(mount(dirs, dirs["tmp"] / "nope"), "does not exist")
    assert_one_line_error(mount(dirs, dirs["cold"] / "mid.bin"), "is not a directory")


def test_mountpoint_missing_not_empty_or_inside_cold(dirs):
    assert_one_line_error(mount(dirs, None, dirs["tmp"] / "nope"), "does not exist", "mkdir")
    assert_one_line_error(mount(dirs, None, dirs["cold"] / "nested"), "not empty")
    (dirs["cold"] / "emptydir").mkdir()
    assert_one_line_error(mount(dirs, None, dirs["cold"] / "emptydir"), "overlap")
    (dirs["cold"] / "emptydir").rmdir()


@pytest.mark.parametrize("size,needle", [("0", "larger than 0"), ("lots", "is not a size"),
                                         ("-5G", "larger than 0")])
def test_bad_budget(dirs, size, needle):
    proc = run_cli("mount", dirs["cold"], dirs["mnt"], "--fast-size", size, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert needle in proc.stderr


def test_fast_dir_without_room(dirs):
    proc = run_cli("mount", dirs["cold"], dirs["mnt"], "--fast-dir", dirs["tmp"] / "fast",
                   "--state-dir", dirs["tmp"] / "state", "--fast-size", "900T", check=False)
    assert_one_line_error(proc, "has room for", "--fast-size")


def test_state_dir_unwritable(dirs):
    blocker = dirs["tmp"] / "a-file"
    blocker.write_text("")
    proc = run_cli("mount", dirs["cold"], dirs["mnt"], "--fast-dir", dirs["tmp"] / "fast",
                   "--state-dir", blocker / "state", "--fast-size", "16M", check=False)
    assert_one_line_error(proc, "state dir", "not usable", "--state-dir")


def test_fast_or_state_dir_inside_cold(dirs):
    proc = run_cli("mount", dirs["cold"], dirs["mnt"], "--fast-dir", dirs["cold"] / "fast",
                   "--fast-size", "16M", check=False)
    assert_one_line_error(proc, "fast dir", "overlaps the cold directory")
    assert not (dirs["cold"] / "fast").exists()


def test_already_mounted_and_dead_mount(dirs, mounter):
    m = mounter(dirs["cold"])
    assert_one_line_error(mount(dirs, None, m.mnt), "already a mount point")
    m.proc.kill()
    m.proc.wait()
    assert_one_line_error(mount(dirs, None, m.mnt), "daemon died", "aattsfs umount")
    run_cli("umount", m.mnt)
    assert not is_mounted(m.mnt)


def test_umount_of_something_not_mounted(dirs):
    assert_one_line_error(run_cli("umount", dirs["mnt"], check=False), "is not mounted")


def test_status_and_actions_off_a_mount(dirs):
    before = manifest(dirs["cold"])
    assert_one_line_error(run_cli("status", dirs["mnt"], check=False),
                          "not a live aattsfs mount")
    assert_one_line_error(run_cli("warm", dirs["cold"] / "mid.bin", check=False),
                          "not on an aattsfs mount")
    assert_one_line_error(run_cli("evict", dirs["cold"], check=False), "not on an aattsfs mount")
    assert_one_line_error(run_cli("pin", dirs["tmp"] / "nope", check=False), "does not exist")
    assert manifest(dirs["cold"]) == before


def test_fuse_unavailable(dirs):
    """Without /dev/fuse (a private mount namespace hides it) mount refuses."""
    if not shutil.which("unshare"):
        pytest.skip("unshare (util-linux) is missing")
    script = ("mount -t tmpfs none /dev && exec {py} -m aattsfs mount {cold} {mnt} "
              "--fast-size 16M --fast-dir {fast} --state-dir {state}").format(
        py=sys.executable, cold=dirs["cold"], mnt=dirs["mnt"], fast=dirs["tmp"] / "f",
        state=dirs["tmp"] / "s")
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True)
    assert_one_line_error(proc, "FUSE is not available", "/dev/fuse")


def test_cold_dir_untouched_by_all_of_the_above(dirs):
    before = manifest(dirs["cold"])
    mount(dirs, dirs["cold"] / "mid.bin")
    mount(dirs, None, dirs["cold"] / "nested")
    assert manifest(dirs["cold"]) == before
    assert os.listdir(dirs["mnt"]) == []


# -- option values: one line, exit 2, the same on the command line and in a config

BAD_SIZES = [("inf", "not a size"), ("nan", "not a size"), ("1e400", "not a size"),
             ("0", "larger than 0"), ("-5", "larger than 0"), ("-1G", "larger than 0"),
             ("1" + "0" * 30, "too large")]


@pytest.fixture
def loop_trace(tmp_path):
    path = tmp_path / "loop.jsonl"
    path.write_text(run_cli("trace", "generate", "loop").stdout)
    return path


@pytest.mark.parametrize("size,needle", BAD_SIZES)
def test_bad_sizes_on_the_command_line(tmp_path, loop_trace, size, needle):
    for option in ("--fast-size", "--read-ahead", "--prefetch-bandwidth", "--fast-min-free"):
        proc = run_cli("mount", tmp_path, tmp_path / "mnt", f"{option}={size}", check=False)
        assert_one_line_error(proc, option, needle)
        assert proc.returncode == 2
    for option in ("--budget", "--cold-bandwidth"):
        proc = run_cli("sim", loop_trace, "--budget=1G", f"{option}={size}", check=False)
        assert_one_line_error(proc, option, needle)
        assert proc.returncode == 2


def test_binary_units_however_spelled(loop_trace):
    """G, Gi, GiB and GB are all 2**30: the same simulation, whatever the spelling."""
    outs = {spelling: run_cli("sim", loop_trace, "--budget", spelling, "--json").stdout
            for spelling in ("80M", "80Mi", "80MiB", "80MB", "80 mib", str(80 << 20))}
    assert len(set(outs.values())) == 1, outs
    assert "binary" in run_cli("mount", "--help").stdout


@pytest.mark.parametrize("args,needles", [
    (["mount", "--policy", "mru"], ["--policy", "'mru'"]),
    (["mount", "--passthrough", "always"], ["--passthrough", "'always'"]),
    (["mount", "--prefetch-jobs", "99"], ["--prefetch-jobs", "99"]),
    (["mount", "--log-level", "loud"], ["--log-level", "'loud'"]),
    (["mount", "--bogus"], ["--bogus"]),
    (["sim", "--budget", "1G"], ["TRACE"]),
    (["sim", "/nonexistent/trace", "--budget", "1G"], ["/nonexistent/trace"]),
    (["frobnicate"], ["frobnicate"]),
])
def test_every_bad_option_value_is_one_line(args, needles):
    proc = run_cli(*args, check=False)
    assert_one_line_error(proc, *needles)
    assert proc.returncode == 2


def test_a_free_memory_floor_the_box_cannot_keep(dirs):
    """A floor at or above all of the box's memory would keep the fast tier
    empty for ever: refused, before anything is created. off and auto are
    words, in any case, on the command line and in a config."""
    proc = mount(dirs, None, None, "--fast-min-free", "900T")
    assert_one_line_error(proc, "--fast-min-free", "is not below this box's memory", "off")
    assert not (dirs["tmp"] / "fast").exists()
    for value in ("OFF", "auto"):
        proc = run_cli("mount", dirs["cold"], dirs["tmp"] / "nope", "--fast-min-free", value,
                       check=False)
        assert_one_line_error(proc, "mountpoint", "does not exist")
    cfg = dirs["tmp"] / "c.toml"
    cfg.write_text('fast_min_free = "off"\n')
    proc = run_cli("mount", dirs["cold"], dirs["tmp"] / "nope", "--config", cfg, check=False)
    assert_one_line_error(proc, "mountpoint", "does not exist")


def test_log_level_in_any_case(tmp_path):
    """Accepted: the start gets as far as the missing mountpoint."""
    proc = run_cli("mount", tmp_path, tmp_path / "nope", "--log-level", "WARNING", check=False)
    assert_one_line_error(proc, "mountpoint", "does not exist")
    cfg = tmp_path / "c.toml"
    cfg.write_text('log_level = "Debug"\nfast_size = "16Gi"\nread_ahead = 1048576\n')
    proc = run_cli("mount", tmp_path, tmp_path / "nope", "--config", cfg, check=False)
    assert_one_line_error(proc, "mountpoint", "does not exist")


BOOL, INT, SIZE, STR = ("expected true or false", "expected an integer",
                        "expected a size", "expected a string")


@pytest.mark.parametrize("line,key,needle", [
    ("fast_size = 0", "fast_size", "larger than 0"),
    ("fast_size = -5", "fast_size", "larger than 0"),
    ("fast_size = true", "fast_size", SIZE),
    ("fast_size = 1.5", "fast_size", SIZE),
    ("fast_size = nan", "fast_size", SIZE),
    ('fast_size = "inf"', "fast_size", "not a size"),
    ('fast_size = "1e400"', "fast_size", "not a size"),
    ("fast_size = 1_000_000_000_000_000_000_000", "fast_size", "too large"),
    ("read_ahead = -1", "read_ahead", "larger than 0"),
    ('prefetch_bandwidth = "0"', "prefetch_bandwidth", "larger than 0"),
    ("prefetch_jobs = 2.7", "prefetch_jobs", INT),
    ("prefetch_jobs = true", "prefetch_jobs", INT),
    ('prefetch_jobs = "2"', "prefetch_jobs", INT),
    ("prefetch_jobs = 0", "prefetch_jobs", "1<=x<=16"),
    ("allow_other = 1", "allow_other", BOOL),
    ('allow_other = "yes"', "allow_other", BOOL),
    ('prefetch = "no"', "prefetch", BOOL),
    ("push_page_cache = 0", "push_page_cache", BOOL),
    ("metrics_allow_remote = 1.0", "metrics_allow_remote", BOOL),
    ("cold_dir = 5", "cold_dir", STR),
    ("metrics_address = 9464", "metrics_address", STR),
    ("policy = 3", "policy", STR),
    ('policy = "mru"', "policy", "'mru'"),
    ("passthrough = true", "passthrough", STR),
    ('passthrough = "yes"', "passthrough", "'yes'"),
    ("log_level = false", "log_level", STR),
    ("fast_size = [1]", "fast_size", "not an array"),
    ("fast_min_free = 0", "fast_min_free", "larger than 0; or auto, or off"),
    ('fast_min_free = "-1G"', "fast_min_free", "larger than 0"),
    ("fast_min_free = nan", "fast_min_free", SIZE),
    ('fast_min_free = "inf"', "fast_min_free", "not a size"),
    ('fast_min_free = "never"', "fast_min_free", "not a size"),
    ("fast_min_free = false", "fast_min_free", SIZE),
])
def test_config_values_are_checked(tmp_path, line, key, needle):
    cfg = tmp_path / "models.toml"
    cfg.write_text(f"# a mount\n\n{line}\n")
    proc = run_cli("mount", tmp_path, tmp_path / "mnt", "--config", cfg, check=False)
    assert_one_line_error(proc, f"{cfg}:3:", f"'{key}'", needle)
    assert proc.returncode == 2


# -- status: whatever the stats say, it prints


@pytest.mark.parametrize("stats", [
    {"fast_tier": {"used_bytes": 0, "budget_bytes": 0, "files": 0, "pinned_files": 0,
                   "policy": "lru"}},
    {},
    {"fast_tier": None, "opens": {"fast": "x"}, "uptime_seconds": None},
])
def test_status_prints_odd_stats(tmp_path, stats):
    """Stats of another daemon version (keys missing) or an odd budget are
    printed with '?' where a number is missing; never a division by zero.
    Such stats cannot come from this daemon, so they are files in a plain
    directory laid out as a mount's control surface."""
    (tmp_path / ".aatts").mkdir()
    (tmp_path / ".aatts" / "stats").write_text(json.dumps(stats))
    (tmp_path / ".aatts" / "tiers").write_text(
        "tier\tsize\thits\tmisses\tpinned\tpath\tname\n"
        "fast\t5\t1\t0\t0\ta.bin\ta.bin\nbroken line\n")
    proc = run_cli("status", tmp_path, check=False)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert "fast tier" in proc.stdout and "a.bin" in proc.stdout


def test_status_of_garbled_stats(tmp_path):
    (tmp_path / ".aatts").mkdir()
    (tmp_path / ".aatts" / "stats").write_text("{not json")
    assert_one_line_error(run_cli("status", tmp_path, check=False), "not JSON")


# -- sim: a bad trace is one line naming the line


@pytest.mark.parametrize("text,needles", [
    ('{"path": "a", "size": -5}\n', ["line 1", "size"]),
    ('{"path": "a", "size": 1}\n{"path": "b", "size": %d}\n' % (2 ** 62 + 1), ["line 2", "size"]),
    ('{"path": "a", "size": 1.5}\n', ["line 1", "size"]),
    ('{"path": "a", "size": true}\n', ["line 1", "size"]),
    ('{"path": "a", "size": "5"}\n', ["line 1", "size"]),
    ('{"path": "a", "size": Infinity}\n', ["line 1", "size"]),
    ('{"path": "a", "size": 0}\n{"path": "b", "size": 0}\n', ["size 0"]),
    ('{"path": "a", "size": 1, "pid": [1]}\n', ["line 1", "pid"]),
    ('{"path": "a", "size": 1, "pid": {"x": 1}}\n', ["line 1", "pid"]),
    ('{"path": "a", "size": 1, "pid": 1, "start": [2]}\n', ["line 1", "start"]),
    ('{"path": "a", "size": 1}\n' + "[" * 100000 + "]" * 100000 + "\n", ["line 2", "nested"]),
    ("[1, 2]\n", ["line 1", "not a JSON object"]),
    ('"open"\n', ["line 1", "not a JSON object"]),
    ('{"size": 1}\n', ["line 1", "path"]),
    ('{"path": 5, "size": 1}\n', ["line 1", "path"]),
    ('{"path": "a"}\n', ["line 1", "size"]),
    ("\n{oops\n", ["line 2", "not JSON"]),
])
def test_bad_traces(tmp_path, text, needles):
    trace = tmp_path / "t.jsonl"
    trace.write_text(text)
    proc = run_cli("sim", trace, "--budget", "1G", check=False)
    assert_one_line_error(proc, *needles)
    assert proc.returncode == 2


def test_trace_not_utf8(tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_bytes(b'{"path": "a", "size": 1}\n\xff\xfe\n')
    assert_one_line_error(run_cli("sim", trace, "--budget", "1G", check=False), "line 2",
                          "UTF-8")


# -- trace import and --learn-from: a bad trace is one line, nothing learned

GOOD_OPEN = '{"op": "open", "path": "mid.bin", "size": 1, "pid": 7, "start": 1.5}\n'


@pytest.mark.parametrize("text,needles", [
    (GOOD_OPEN + "{oops\n", ["line 2", "not JSON"]),
    (GOOD_OPEN + '{"path": "a", "size": "5"}\n', ["line 2", "size"]),
    ('{"path": "a", "size": 1, "pid": "7"}\n', ["line 1", "pid"]),
    ('{"path": "a", "size": 1, "start": "now", "pid": 1}\n', ["line 1", "start"]),
    ('{"path": "a", "size": 1, "imported": 3}\n', ["line 1", "imported"]),
    ('{"path": ["a"], "size": 1}\n', ["line 1", "path"]),
    ('{"path": "/etc/passwd", "size": 1}\n', ["line 1", "plain relative path"]),
    (GOOD_OPEN * 2 + '{"path": "models/../../x", "size": 1}\n', ["line 3", "plain relative"]),
    ('{"path": "a//b", "size": 1}\n', ["line 1", "plain relative path"]),
    ('{"path": ".aatts/stats", "size": 1}\n', ["line 1", "control directory"]),
    ('{"path": "a\\u0000b", "size": 1}\n', ["line 1", "plain relative path"]),
    ('{"path": "a\\ud800", "size": 1}\n', ["line 1", "can encode"]),
    ('{"path": "%s", "size": 1}\n' % ("d/" * 2048 + "f"), ["line 1", "longer than"]),
    ('{"op": "read", "path": "a", "ranges": []}\n\n', ["no open events"]),
])
def test_trace_import_of_a_bad_trace(tmp_path, text, needles):
    trace = tmp_path / "t.jsonl"
    trace.write_text(text)
    # the file is checked before the mount point: no mount needed here
    assert_one_line_error(run_cli("trace", "import", tmp_path, trace, check=False),
                          str(trace), *needles)
    assert_one_line_error(run_cli("trace", "import", tmp_path, "-", input=text,
                                  check=False), "<stdin>", *needles)


def test_trace_import_of_a_missing_file_or_off_a_mount(tmp_path):
    assert_one_line_error(run_cli("trace", "import", tmp_path, tmp_path / "nope.jsonl",
                                  check=False), "nope.jsonl", "No such file")
    assert_one_line_error(run_cli("trace", "import", tmp_path, tmp_path, check=False),
                          "directory")
    trace = tmp_path / "t.jsonl"
    trace.write_text(GOOD_OPEN)
    assert_one_line_error(run_cli("trace", "import", tmp_path, trace, check=False),
                          f"{tmp_path} is not on an aattsfs mount")
    assert_one_line_error(run_cli("trace", "import", tmp_path / "nope", trace, check=False),
                          "not a live aattsfs mount")


@pytest.mark.parametrize("text,needles", [
    (None, ["cannot read --learn-from", "No such file"]),
    ("{oops\n", ["--learn-from", "line 1", "not JSON"]),
    ('{"path": "../x", "size": 1}\n', ["--learn-from", "line 1", "plain relative path"]),
    ("", ["--learn-from", "no open events"]),
])
def test_mount_with_a_bad_learn_from(dirs, text, needles):
    trace = dirs["tmp"] / "seed.jsonl"
    if text is not None:
        trace.write_text(text)
    assert_one_line_error(mount(dirs, None, None, "--learn-from", trace), *needles)
    assert not is_mounted(dirs["mnt"])
    assert not (dirs["tmp"] / "fast").exists() and not (dirs["tmp"] / "state").exists()
    config = dirs["tmp"] / "m.toml"  # the same from a config file
    config.write_text(f'learn_from = "{trace}"\n')
    assert_one_line_error(mount(dirs, None, None, "--config", config), *needles)
    assert not is_mounted(dirs["mnt"])
