"""Running as a service: the config file, systemd readiness and unit, the
SIGUSR1 dump, and a control surface that only root and the owner may use."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

from aattsfs.mount import is_mounted
from conftest import MiB, act, run_cli, sha256, wait_for, write_random

REPO = Path(__file__).resolve().parents[1]
NOBODY = 65534


def one_line_error(proc, *needles):
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_config_file_mistakes_name_the_line_and_the_key(tmp_path):
    cfg = tmp_path / "models.toml"
    cold, mnt = tmp_path / "cold", tmp_path / "mnt"
    cases = {
        'fast_size = "12X"': (f"{cfg}:3:", "'fast_size'", "not a size"),
        'fsat_size = "1G"': (f"{cfg}:3:", "unknown key 'fsat_size'", "fast_size"),
        'policy = "mru"': (f"{cfg}:3:", "'policy'", "'mru'"),
        'prefetch_jobs = 0': (f"{cfg}:3:", "'prefetch_jobs'"),
        '[fast]\nsize = "1G"': (f"{cfg}:3:", "unknown key 'fast'"),
        'fast_size =': ("not valid TOML", "line 3"),
    }
    for line, needles in cases.items():
        cfg.write_text(f'cold_dir = "{cold}"\nmountpoint = "{mnt}"\n{line}\n')
        one_line_error(run_cli("mount", "--config", cfg, check=False), *needles)
    one_line_error(run_cli("mount", "--config", tmp_path / "nope.toml", check=False),
                   "cannot read config file")
    cfg.write_text('fast_size = "1G"\n')
    one_line_error(run_cli("mount", "--config", cfg, check=False), "cold_dir and mountpoint")


def test_config_file_settings_and_command_line_overrides(cold_tree, mounter, tmp_path):
    cfg = tmp_path / "models.toml"
    cfg.write_text('# a mount\npolicy = "lfu"\npredictor = "ppm"\nread_ahead = "2M"\n'
                   'fast_size = "16M"\n')
    m = mounter(cold_tree, fast_size="32M", extra=["--config", cfg])  # also --policy lru
    s = m.stats()
    assert s["fast_tier"]["budget_bytes"] == 32 * MiB  # the command line wins
    assert s["fast_tier"]["policy"] == "lru"
    assert "prefetch ppm" in m.log.read_text()  # from the file
    from aattsfs.mount import _mount_table
    dev = next(d for t, _, d in _mount_table() if t == str(m.mnt))
    wait_for(lambda: Path(f"/sys/class/bdi/{dev}/read_ahead_kb").read_text().strip() == "2048",
             what="the configured readahead")
    cfg.write_text(f'mountpoint = "{m.mnt}"\n')
    run_cli("umount", "--config", cfg)  # what the unit's ExecStop runs
    wait_for(lambda: m.proc.poll() is not None, what="the daemon to exit")
    assert m.proc.returncode == 0


def test_ready_is_sent_to_systemd_once_the_mount_is_live(cold_tree, mounter, tmp_path):
    addr = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(addr)
        sock.settimeout(30)
        m = mounter(cold_tree, env={"NOTIFY_SOCKET": addr})
        assert sock.recv(4096) == b"READY=1"
        assert (m.path("mid.bin")).stat().st_size == 3 * MiB  # live when READY came


def test_sigusr1_dumps_tasks_and_threads_and_keeps_serving(cold_tree, mounter):
    m = mounter(cold_tree)
    m.expect_log("SIGUSR1: stacks of the trio tasks")
    m.proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: "SIGUSR1: stacks" in m.log.read_text(), what="the task dump")
    log = m.log.read_text()
    assert "Store.run" in log and "Prefetcher.run" in log  # the trio tasks
    assert "Current thread" in log or "Thread 0x" in log  # faulthandler's thread dump
    assert m.path("mid.bin").read_bytes() == (cold_tree / "mid.bin").read_bytes()


def test_the_systemd_unit_installs_and_verifies(tmp_path):
    run_cli("install-unit", "--unit-dir", tmp_path / "units", "--config-dir", tmp_path / "etc")
    unit = (tmp_path / "units" / "aattsfs@.service").read_text()
    assert "@" not in unit.replace("aattsfs@", "") and "Type=notify" in unit
    # the unit reads its configs from --config-dir, nowhere else
    conf = f"{tmp_path}/etc/%i.toml"
    assert f"ConditionPathExists={conf}\n" in unit
    assert f" mount --config {conf} --foreground\n" in unit
    assert "ExecStop=-" in unit and f" umount --config {conf}\n" in unit
    settings = [ln for ln in unit.splitlines() if not ln.startswith("#")]
    assert not any("/etc/aattsfs" in ln for ln in settings)
    assert (tmp_path / "etc" / "example.toml").read_text() == \
        (REPO / "aattsfs" / "systemd" / "example.toml").read_text()
    # a path systemd would split or expand is refused, nothing written
    one_line_error(run_cli("install-unit", "--unit-dir", tmp_path / "u2", "--config-dir",
                           tmp_path / "my configs", check=False), "--config-dir", "' '")
    assert not (tmp_path / "u2").exists()
    # a failed install leaves the installed unit as it was: a config dir that
    # cannot be made, one that is not UTF-8, an empty one
    (tmp_path / "a-file").touch()
    for config_dir, why in ((tmp_path / "a-file", "cannot install the unit"),
                            (tmp_path / "a-file" / "sub", "cannot install the unit"),
                            (os.fsdecode(os.fsencode(str(tmp_path)) + b"/bad\xff"),
                             "not valid UTF-8"),
                            ("", "--config-dir is empty")):
        one_line_error(run_cli("install-unit", "--unit-dir", tmp_path / "units",
                               "--config-dir", config_dir, check=False), why)
        assert (tmp_path / "units" / "aattsfs@.service").read_text() == unit
        assert os.listdir(tmp_path / "units") == ["aattsfs@.service"]
    # the example config is accepted by the mount command itself
    proc = run_cli("mount", "--config", tmp_path / "etc" / "example.toml", check=False)
    assert "bad value" not in proc.stderr and "unknown key" not in proc.stderr
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    instance = tmp_path / "units" / "aattsfs@models.service"
    instance.write_text(unit)
    out = subprocess.run(["systemd-analyze", "verify", "--man=no", str(instance)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def _as_nobody(fn):
    """fn() run in a child as nobody; its OSError's errno, or 0."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            fn()
        except OSError as exc:
            code = exc.errno or 255
        finally:
            os.write(w, str(code).encode())
            os._exit(0)
    os.close(w)
    out = os.read(r, 64)
    os.close(r)
    os.waitpid(pid, 0)
    return int(out)


def test_only_root_and_the_owner_may_use_the_control_surface(open_root, tmp_path, mounter):
    cold = tmp_path / "cold"
    write_random(cold / "shared.bin", MiB, 1).chmod(0o666)  # the kernel lets anyone try
    m = mounter(cold, root=open_root, extra=["--allow-other"])
    path = str(m.path("shared.bin"))

    def as_nobody(*cmd):
        return subprocess.run(cmd, capture_output=True, text=True, errors="replace",
                              user=NOBODY, group=NOBODY, extra_groups=[])

    tier = as_nobody("getfattr", "--only-values", "-n", "user.aatts.tier", path)
    assert tier.returncode == 0 and tier.stdout == "cold"  # looking is allowed
    # the mount is read-only for the kernel: no one acts through xattrs
    for user in (as_nobody, lambda *cmd: subprocess.run(cmd, capture_output=True, text=True)):
        refused = user("setfattr", "-n", "user.aatts.tier", "-v", "fast", path)
        assert refused.returncode != 0 and "Read-only file system" in refused.stderr
    # and only root and the owner through the control socket; others are
    # answered and closed at once, so no one can hold the daemon's fds
    assert _as_nobody(lambda: act(path, "warm")) == errno.EPERM

    def hold_connections():
        from aattsfs.control import XATTR_CONTROL
        name = os.getxattr(m.path(), XATTR_CONTROL)
        for _ in range(200):
            s = socket.socket(socket.AF_UNIX)
            s.connect(b"\0" + name)
            if s.recv(4096) == b"":  # closed without a reply
                raise OSError(errno.EPROTO, "no reply")
            if s.recv(4096) != b"":  # not closed after the reply
                raise OSError(errno.EBADE, "the daemon kept the connection")

    assert _as_nobody(hold_connections) == 0
    assert m.tier("shared.bin") == "cold" and m.stats()["promotions"] == 0
    assert as_nobody("cat", path).returncode == 0  # reading is allowed (and promotes)
    m.wait_tier("shared.bin")
    for action in ("evict", "pin"):
        assert _as_nobody(lambda: act(path, action)) == errno.EPERM

    def learn():  # nor teach the learner (aattsfs trace import)
        from aattsfs.control import Client
        with Client(str(m.path())) as client:
            client.learn([{"t": 0.0, "op": "open", "path": "shared.bin", "size": MiB}])
    assert _as_nobody(learn) == errno.EPERM
    assert '"imported"' not in m.path(".aatts/trace").read_text()
    assert m.tier("shared.bin") == "fast"
    assert os.getxattr(path, "user.aatts.pinned") == b"0"
    run_cli("evict", path)  # root may
    assert m.tier("shared.bin") == "cold"


def test_the_control_socket_acts_only_on_the_mounts_regular_files(tmp_path, mounter):
    from aattsfs.control import Client
    cold = tmp_path / "cold"
    write_random(cold / "d" / "f.bin", MiB, 1)
    write_random(tmp_path / "outside.bin", MiB, 2)
    (cold / "link").symlink_to("d/f.bin")
    (cold / "up").symlink_to("../outside.bin")
    m = mounter(cold)
    with Client(str(m.path())) as client:
        for rel, err in (("../outside.bin", errno.ENOENT), ("/etc/passwd", errno.ENOENT),
                         ("d/f.bin\0x", errno.ENOENT), ("d\0", errno.ENOENT),
                         ("d/../d/f.bin", errno.ENOENT), ("d//f.bin", errno.ENOENT),
                         ("d", errno.EOPNOTSUPP), ("link", errno.EOPNOTSUPP),
                         ("up", errno.EOPNOTSUPP), (".aatts/stats", errno.ENOENT),
                         ("", errno.ENOENT), ("missing.bin", errno.ENOENT)):
            with pytest.raises(OSError) as exc:
                client.act("warm", rel)
            assert exc.value.errno == err, rel
        with pytest.raises(OSError) as exc:
            client.act("delete", "d/f.bin")
        assert exc.value.errno == errno.EINVAL
        # not JSON, a path that is no string, nesting beyond the parser's depth:
        # EINVAL, and nothing in the daemon's log (the fixture fails on errors)
        for line in (b"not json", b'{"action": "warm", "path": {"a": 1}}',
                     b'{"action": ["warm"], "path": "d/f.bin"}',
                     b"[" * 30000 + b"]" * 30000,
                     b'{"action": "learn", "events": ' + b"[" * 30000 + b"]" * 30000 + b"}"):
            client.sock.sendall(line + b"\n")
            assert b'"errno": 22' in client.replies.readline(), line[:40]
        assert m.stats()["promotions"] == 0
        client.act("warm", "d/f.bin")  # the same connection still serves
    assert m.tier("d/f.bin") == "fast"
    # clients that leave mid-request, or send a line without end, end their
    # own connection only
    name = os.getxattr(m.path(), "user.aatts.control")
    for payload in (b'{"action": "evict", "path": "d/f.bin"}\n', b"x" * (1 << 17)):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(b"\0" + name)
            s.sendall(payload)
    with Client(str(m.path())) as client:
        client.act("warm", "d/f.bin")
    run_cli("evict", m.path("d"))
    assert m.tier("d/f.bin") == "cold"
    # the CLI follows a link it is given to the file it names
    assert run_cli("warm", m.path("link")).stdout == "warm: 1 file(s), 1.0 MiB\n"
    assert m.tier("d/f.bin") == "fast"
    assert sha256(m.path("link")) == sha256(cold / "d" / "f.bin")
    # a pinned file is not evicted; the control directory is no file to act on
    run_cli("pin", m.path("d/f.bin"))
    for args, why in ((("evict", m.path("d/f.bin")), "it is pinned; unpin it first"),
                      (("warm", m.path(".aatts/stats")), "control directory")):
        one_line_error(run_cli(*args, check=False), why)
    assert m.tier("d/f.bin") == "fast"


def test_warm_follows_a_hub_cache_to_its_blobs(tmp_path, mounter):
    """A Hugging Face hub cache: snapshots/REV/NAME are relative links into
    blobs/, refs/main names the revision. `warm` of a snapshot, or of the
    model directory (meaning refs/main), promotes that revision's blobs,
    each once; other revisions stay cold."""
    model = tmp_path / "cold" / "models--org--tiny"
    blobs = {}
    for rev, names in (("aaa1", ("config.json", "model.safetensors")),
                       ("bbb2", ("config.json", "model.safetensors", "extra.bin"))):
        for i, name in enumerate(names):
            blob = f"{rev}{i:02d}blob"
            write_random(model / "blobs" / blob, 100_000 + 1000 * i, len(blobs) + 1)
            (model / "snapshots" / rev).mkdir(parents=True, exist_ok=True)
            (model / "snapshots" / rev / name).symlink_to(f"../../blobs/{blob}")
            blobs[rev, name] = f"models--org--tiny/blobs/{blob}"
    (model / "snapshots" / "aaa1" / "same-as-config.json").symlink_to(
        "../../blobs/aaa100blob")  # a second name: warmed once
    (model / "refs").mkdir()
    (model / "refs" / "main").write_text("bbb2")
    m = mounter(tmp_path / "cold")
    out = run_cli("warm", m.path("models--org--tiny/snapshots/aaa1")).stdout
    assert out.startswith("warm: 2 file(s)"), out
    assert {k: m.tier(v) for k, v in blobs.items()} == {
        k: "fast" if k[0] == "aaa1" else "cold" for k in blobs}
    run_cli("evict", m.path("models--org--tiny/snapshots/aaa1"))
    out = run_cli("warm", m.path("models--org--tiny")).stdout
    assert out.startswith("warm: 3 file(s)"), out
    assert {k: m.tier(v) for k, v in blobs.items()} == {
        k: "fast" if k[0] == "bbb2" else "cold" for k in blobs}


def test_warm_shows_a_progress_bar_on_a_terminal_only(cold_tree, mounter):
    m = mounter(cold_tree)
    target = m.path("models")
    import shlex
    import sys
    cmd = shlex.join([sys.executable, "-m", "aattsfs", "warm", str(target)])
    tty = subprocess.run(["script", "-qec", cmd, "/dev/null"], capture_output=True, text=True,
                         errors="replace")
    assert tty.returncode == 0 and "100%" in tty.stdout, tty.stdout
    assert "warm: 3 file(s), 12.0 MiB" in tty.stdout
    piped = run_cli("evict", target)
    assert piped.stdout == "evict: 3 file(s), 12.0 MiB\n" and piped.stderr == ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_prometheus_metrics_match_the_stats(cold_tree, mounter):
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families
    port = _free_port()
    m = mounter(cold_tree, extra=["--metrics-address", f"127.0.0.1:{port}"])
    for _ in range(2):
        (m.path("mid.bin")).read_bytes()
        m.wait_tier("mid.bin")
    (m.path("models/a/weights.bin")).read_bytes()
    wait_for(lambda: m.stats()["promotions_in_flight"] == 0, what="promotions to end")
    s = m.stats()
    text = urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {(x.name, tuple(sorted(x.labels.items()))): x.value
               for f in text_string_to_metric_families(text) for x in f.samples}
    # every counter, defined once (aattsfs/counters.py), in the stats and on
    # /metrics with the same value, and documented
    from aattsfs.counters import COUNTERS, value_at
    operations = (Path(__file__).parent.parent / "docs" / "operations.md").read_text()
    for c in COUNTERS:
        labels = (("tier", c.tier),) if c.tier else ()
        assert samples[(f"aattsfs_{c.metric}_total", labels)] == value_at(s, c.key), c
        assert f"aattsfs_{c.metric}_total" in operations, c
    assert s["opens"]["fast"] and s["promotions"] and s["prefetch"]["demand_misses"]
    for tier in ("fast", "cold"):
        assert samples[("aattsfs_read_seconds_count", (("tier", tier),))] == s["reads"][tier]
    assert samples[("aattsfs_fast_tier_budget_bytes", ())] == 256 * MiB
    assert samples[("aattsfs_fast_tier_used_bytes", ())] == s["fast_tier"]["used_bytes"]
    # no floor on a fast dir on disk (docs/memory.md): the budget is whole, nothing polled
    assert samples[("aattsfs_fast_tier_effective_budget_bytes", ())] == 256 * MiB
    assert samples[("aattsfs_memory_floor_bytes", ())] == 0
    assert samples[("aattsfs_memory_floor_active", ())] == 0
    assert ("aattsfs_memory_available_bytes", ()) not in samples
    # the second read of mid.bin was a passthrough open (this machine has it)
    pt = s["passthrough"]
    assert pt["active"] and pt["opens"] >= 1
    assert samples[("aattsfs_passthrough_active", ())] == 1
    cw = s["cold_watch"]
    assert samples[("aattsfs_cold_watch_active", ())] == int(cw["active"]) == 1
    # the standard process metrics, and which mount this is
    assert samples[("process_resident_memory_bytes", ())] > 10 * MiB
    assert samples[("process_cpu_seconds_total", ())] > 0
    assert samples[("process_open_fds", ())] > 0
    from aattsfs import __version__
    info = {(n, labels) for n, labels in samples if n == "aattsfs_mount_info"}
    assert info == {("aattsfs_mount_info", (("cold", str(m.cold.resolve())),
                                            ("mountpoint", str(m.path())),
                                            ("version", __version__)))}, info


def test_metrics_refuse_a_remote_address_and_a_taken_port(cold_tree, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for address, needles in (("0.0.0.0:9464", ("no authentication", "--metrics-allow-remote")),
                             ("localhost", ("is not HOST:PORT",))):
        one_line_error(run_cli("mount", cold_tree, mnt, "--metrics-address", address,
                               check=False), *needles)
    # refused before the default fast and state directories were created
    from aattsfs.mount import default_fast_dir, default_state_dir
    assert not os.path.exists(default_fast_dir(str(mnt)))
    assert not os.path.exists(default_state_dir(str(mnt)))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        one_line_error(run_cli("mount", cold_tree, mnt, "--foreground", "--metrics-address",
                               f"127.0.0.1:{port}", "--state-dir", tmp_path / "s",
                               "--fast-dir", tmp_path / "f", "--fast-size", "16M",
                               check=False), "cannot be used")


def test_under_systemd_log_lines_carry_journal_priorities(cold_tree, mounter):
    m = mounter(cold_tree, env={"JOURNAL_STREAM": "8:1234"})
    m.expect_log("<4>WARNING")
    m.proc.send_signal(signal.SIGUSR1)  # logs a WARNING (the task dump)
    wait_for(lambda: "<4>WARNING aattsfs.mount: SIGUSR1" in m.log.read_text(),
             what="the dump at warning priority")
    lines = [ln for ln in m.log.read_text().splitlines() if ln.startswith("<")]
    assert any(ln.startswith("<6>INFO aattsfs.mount: mounted ") for ln in lines)
    assert not any(ln[3:7].isdigit() for ln in lines)  # no timestamp of our own


def test_a_signal_as_soon_as_the_mount_appears_is_handled(cold_tree, mounter):
    """SIGTERM the moment the mount shows (systemd stopping a unit that just
    started): the daemon unmounts and exits 0. The signal arrives before
    the trio loop's receiver exists, so it must wait, not kill the daemon
    with the mount left behind (it did, every time)."""
    m = mounter(cold_tree, start=False)
    real = str(m.mnt.resolve())  # now, while no FUSE daemon answers for it

    def in_table() -> bool:  # never touches the mount (is_mounted's realpath would)
        with open("/proc/mounts") as f:
            return any(line.split()[1] == real for line in f)

    def start():
        with contextlib.suppress(AssertionError):  # "the daemon exited": checked below
            m.start()

    starting = threading.Thread(target=start)
    starting.start()
    wait_for(in_table, what="the mount in the table", interval=0.0005)
    m.proc.send_signal(signal.SIGTERM)
    starting.join()
    assert m.proc.wait(timeout=30) == 0
    assert not is_mounted(m.mnt)
    assert "SIGTERM received, unmounting" in m.log.read_text()
