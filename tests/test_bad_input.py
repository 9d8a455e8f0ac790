"""Every user mistake: one clear line, a non-zero exit, no traceback, and the
cold directory untouched."""

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
    assert_one_line_error(proc, "fast dir", "inside the cold directory")
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
