"""Opens without a cold-tier call (aattsfs/watch.py, docs/reliability.md).

While inotify reports no change to a cold file (and to the directories
above it), a passthrough open of its fast copy uses the daemon's last stat
of it instead of opening the cold file. These tests make sure such opens really
happen (the daemon's `cold_watch.opens` counter moves), and then that every
way of changing the cold tree is seen by the very next open, with no pause
in between: the bytes read through the mount are compared with the cold
file's each time. Also: --cold-watch off, --passthrough off (opens the
daemon serves keep their cold file), a cold tier the kernel cannot watch
for changes (overlayfs), and an overflowed event queue.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import stat
import time
from pathlib import Path

import pytest

from aattsfs import passthrough
from aattsfs.watch import MAX_AGE, ColdWatch
from conftest import MiB, wait_for, write_random

KERNEL_TOO_OLD = passthrough._kernel_ok()
pytestmark = pytest.mark.skipif(bool(KERNEL_TOO_OLD), reason=KERNEL_TOO_OLD)

FILES = [f"m/f{i}.bin" for i in range(4)]


@pytest.fixture
def cold(tmp_path) -> Path:
    root = tmp_path / "cold"
    for i, rel in enumerate(FILES):
        write_random(root / rel, MiB + 1000 * i, i)
    return root


def watched_opens(m) -> int:
    return m.stats()["cold_watch"]["opens"]


def read_checked(m, cold: Path, rel: str) -> bytes:
    data = m.path(rel).read_bytes()
    assert data == (cold / rel).read_bytes(), f"{rel}: the mount served other bytes"
    return data


def promote(m, cold: Path) -> None:
    for rel in FILES:
        read_checked(m, cold, rel)
    for rel in FILES:
        m.wait_tier(rel)


def open_watched(m, cold: Path, rel: str) -> None:
    """Open rel through the mount until an open needs no cold call (the
    first ones place the watch and take the stat the next one uses)."""
    for _ in range(5):
        before = watched_opens(m)
        read_checked(m, cold, rel)
        if watched_opens(m) > before:
            return
    pytest.fail(f"no open of {rel} went without a cold-tier call: the watch never engaged")


def _rewrite(cold: Path, rel: str, rng: random.Random) -> None:
    p = cold / rel
    with open(p, "r+b") as f:  # same size, other bytes in the middle
        f.seek(p.stat().st_size // 2)
        f.write(rng.randbytes(4096))


def _truncate(cold: Path, rel: str, rng: random.Random) -> None:
    os.truncate(cold / rel, rng.randrange(1, MiB))


def _replace(cold: Path, rel: str, rng: random.Random) -> None:
    tmp = cold / "m" / ".new"
    tmp.write_bytes(rng.randbytes(MiB))
    os.rename(tmp, cold / rel)


def _symlink(cold: Path, rel: str, rng: random.Random) -> None:
    (cold / rel).unlink()
    os.symlink(Path(FILES[-1]).name, cold / rel)


def _swap_dir(cold: Path, rel: str, rng: random.Random) -> None:
    """The whole directory renamed away, another with the same names put in
    its place."""
    new = cold / "m.new"
    shutil.copytree(cold / "m", new, symlinks=True)
    for p in new.iterdir():
        if p.is_file() and not p.is_symlink():
            p.write_bytes(rng.randbytes(p.stat().st_size))
    os.rename(cold / "m", cold / f"m.old{rng.random()}")
    os.rename(new, cold / "m")


def _hard_link(cold: Path, rel: str, rng: random.Random) -> None:
    """Written through another name of the same file: no event names rel."""
    other = cold / "elsewhere"
    other.mkdir(exist_ok=True)
    link = other / f"link{rng.random()}"
    os.link(cold / rel, link)
    with open(link, "r+b") as f:
        f.write(rng.randbytes(4096))


CHANGES = {"rewritten in place": _rewrite, "truncated": _truncate,
           "replaced by rename": _replace, "swapped for a symlink": _symlink,
           "directory swapped": _swap_dir, "written through a hard link": _hard_link}


@pytest.mark.parametrize("change", CHANGES)
def test_the_next_open_sees_every_change(change, cold, mounter):
    m = mounter(cold, extra=["--passthrough", "on"])
    assert m.stats()["cold_watch"]["active"], m.stats()["cold_watch"]
    promote(m, cold)
    rng = random.Random(change)
    rel = FILES[0]
    for _ in range(3):
        open_watched(m, cold, rel)
        CHANGES[change](cold, rel, rng)
        read_checked(m, cold, rel)  # at once: no sleep between change and open
        for other in FILES[1:]:
            read_checked(m, cold, other)
        if change != "swapped for a symlink":
            m.wait_tier(rel)  # promoted again: the next round's open can be watched
        else:
            (cold / rel).unlink()
            write_random(cold / rel, MiB, rng.randrange(1 << 30))
            read_checked(m, cold, rel)
            m.wait_tier(rel)


def _view(root: Path) -> dict:
    """Every path below root with its type, mode and size (lstat)."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            try:
                st = p.lstat()
            except FileNotFoundError:  # removed since it was listed: not in the view
                continue
            out[str(p.relative_to(root))] = (st.st_mode, 0 if stat.S_ISDIR(st.st_mode)
                                             else st.st_size)
    return out


def _requests(m, since: int) -> list[str]:
    """The lookups, attribute requests and listings the daemon answered
    since log offset `since` (it logs each request at debug level)."""
    with open(m.log, "rb") as f:
        f.seek(since)
        text = f.read().decode(errors="replace")
    return re.findall(r"\b(lookup|getattr|readdir)\(", text)


def test_reading_a_file_keeps_its_attributes_in_the_kernel(cold, mounter):
    """The mount is read-only for the kernel, so a read does not mark the
    file's atime stale: the stat after each read (torch.load makes one per
    file) is answered by the kernel, not by a GETATTR to the daemon."""
    m = mounter(cold, extra=["--log-level", "debug"])
    options = next(line.split()[3] for line in open("/proc/mounts")
                   if line.split()[1] == str(m.path()))
    assert "ro" in options.split(","), options
    promote(m, cold)
    for rel in FILES:  # the first passthrough opens drop the cached-mode pages
        read_checked(m, cold, rel)
    wait_for(lambda: m.stats()["passthrough"]["opens"] >= len(FILES), what="passthrough opens")
    time.sleep(0.2)  # the pages dropped (in the background)
    for rel in FILES:
        os.stat(m.path(rel))
    since = m.log.stat().st_size
    for rel in FILES:
        with open(m.path(rel), "rb") as f:
            os.fstat(f.fileno())
            assert f.read() == (cold / rel).read_bytes(), rel
            os.fstat(f.fileno())
        os.stat(m.path(rel))
    asked = _requests(m, since)
    assert "getattr" not in asked, f"the kernel asked the daemon again: {asked}"


def test_the_kernel_keeps_what_the_watch_vouches_for_and_forgets_each_change(cold, mounter):
    """With the watch on, entries, attributes and listings the watch vouches
    for are kept by the kernel for watch.TRUST (30 s): a walk a few seconds
    after the last needs no lookup and no listing from the daemon (with the
    default 1 s it would ask for each). Every change made
    to the cold tree then shows through the mount long before that, since
    the daemon invalidates what the kernel keeps as soon as the event
    arrives; and every byte read is the cold file's."""
    (cold / "m" / "sub").mkdir()
    write_random(cold / "m" / "sub" / "a.bin", 5000, 9)
    (cold / "lone").mkdir()
    other = cold.parent / "outside" / "f0-link"
    other.parent.mkdir()
    os.link(cold / FILES[0], other)  # a second name, in no watched directory
    m = mounter(cold, extra=["--log-level", "debug"])
    assert m.stats()["cold_watch"]["active"], m.stats()["cold_watch"]
    for _ in range(2):  # the first walk places the watches, the second is vouched for
        assert _view(m.path("m")) == _view(cold / "m")
        # a directory's entry is kept long only once the directory is
        # watched (its own watch sees what changes its attributes): the
        # entries the first walk got expire, and the second looks them up
        time.sleep(1.1)
    time.sleep(1.5)  # the kernel's default timeout has passed
    since = m.log.stat().st_size
    _view(m.path("m"))
    asked = _requests(m, since)
    # only the attributes of the file with a second name: the listings and
    # the directories' attributes are kept (on a read-only mount the kernel
    # does not mark a directory's atime stale when it lists it)
    assert asked.count("getattr") <= 1 and asked.count("lookup") <= 1 \
        and "readdir" not in asked, f"the kernel asked the daemon again: {asked}"
    # reclaim drops the kept listings: the daemon, which opened the
    # directories without reading them, reads them when the kernel asks
    Path("/proc/sys/vm/drop_caches").write_text("1")
    since = m.log.stat().st_size
    assert _view(m.path("m")) == _view(cold / "m")
    assert "readdir" in _requests(m, since)
    rng = random.Random(3)
    changes = [
        # (a file with another name is never kept 30 s: the change through
        # that name, which no watch sees, shows once the default 1 s is up)
        ("a file written through its other name", lambda: open(other, "ab").write(b"x" * 100)),
        ("a file created", lambda: write_random(cold / "m" / "new.bin", 3000, 4)),
        ("a file removed", lambda: (cold / FILES[1]).unlink()),
        ("a file replaced by rename", lambda: (write_random(cold / "m" / "x.tmp", 7000, 5),
                                               os.rename(cold / "m" / "x.tmp", cold / FILES[2]))),
        ("a file appended to", lambda: open(cold / FILES[3], "ab").write(rng.randbytes(999))),
        ("a mode changed", lambda: os.chmod(cold / FILES[0], 0o600)),
        ("a directory made", lambda: (cold / "m" / "d2").mkdir()),
        ("a directory renamed", lambda: os.rename(cold / "m" / "sub", cold / "m" / "sub2")),
        ("a file in it rewritten", lambda: write_random(cold / "m" / "sub2" / "a.bin", 100, 6)),
        ("a directory's mode changed", lambda: os.chmod(cold / "m" / "sub2", 0o700)),
    ]
    for what, change in changes:
        _view(m.path("m"))  # the kernel holds the old view
        change()
        wait_for(lambda: _view(m.path("m")) == _view(cold / "m"), timeout=10,
                 what=f"{what} shown through the mount")
        for rel in _view(cold / "m"):
            if (cold / "m" / rel).is_file():
                read_checked(m, cold, f"m/{rel}")
    # a directory only looked up, never listed, has no watch: what it holds
    # may change unseen (and with it its link count and mtime), so its
    # attributes are not kept 30 s
    assert m.path("lone").stat().st_nlink == 2
    (cold / "lone" / "inner").mkdir()
    wait_for(lambda: m.path("lone").stat().st_nlink == 3, timeout=10,
             what="a directory's link count, changed where no watch sees it")


@pytest.mark.parametrize("midway", ["a name created", "the page cache dropped"])
def test_a_listing_continued_from_a_newer_reading_repeats_and_skips_nothing(midway, tmp_path,
                                                                           mounter):
    """A listing the kernel keeps is dropped midway (a change invalidates it,
    or reclaim takes it) while a reader is in it: the kernel continues from
    the daemon, whose reading of the directory is newer than the one the
    reader started with. Every name that did not change comes exactly once."""
    cold = tmp_path / "cold"
    names = {f"file_with_a_rather_long_name_{i:05d}" for i in range(3000)}
    (cold / "big").mkdir(parents=True)
    for n in names:
        (cold / "big" / n).touch()
    m = mounter(cold)
    for trial in range(3):
        for _ in range(2):  # kept by the kernel from the first on
            assert set(os.listdir(m.path("big"))) >= names
        got = []
        with os.scandir(m.path("big")) as it:
            for k, e in enumerate(it):
                got.append(e.name)
                if k == 700:
                    if midway == "a name created":
                        (cold / "big" / f"added{trial}").touch()
                        time.sleep(0.1)  # the invalidation lands
                    else:
                        Path("/proc/sys/vm/drop_caches").write_text("1")
        assert len(got) == len(set(got)), "a name came twice"
        assert set(got) >= names, "a name was skipped"


def test_an_open_soon_after_a_checked_one_needs_no_cold_call(cold, mounter):
    """The file is watched from its commit on. The kernel keeps its entry
    (watch.TRUST), so no lookup takes a fresh stat any more: once the noted
    stats are older than watch.MAX_AGE, an open checks the cold file, and
    the stat it takes lets the very next open go without a cold-tier call."""
    m = mounter(cold, extra=["--passthrough", "on"])
    promote(m, cold)
    time.sleep(MAX_AGE + 0.1)
    before = watched_opens(m)
    read_checked(m, cold, FILES[2])
    assert watched_opens(m) == before
    read_checked(m, cold, FILES[2])
    assert watched_opens(m) == before + 1


def test_a_change_made_while_the_daemon_was_dead_is_seen_after_a_remount(cold, tmp_path,
                                                                          mounter):
    """kill -9 with watched opens going on; the cold file is then rewritten
    in place with its mtime put back (only ctime tells), so no watch is
    there to see it. The remounted daemon knows nothing from the old watch:
    every read compares equal to the cold file, from the first open on,
    and the watch engages again."""
    root = tmp_path / "k"
    m = mounter(cold, root=root, extra=["--passthrough", "on"])
    promote(m, cold)
    open_watched(m, cold, FILES[0])
    m.proc.kill()
    m.proc.wait()
    m.stop()
    p = cold / FILES[0]
    st = p.stat()
    _rewrite(cold, FILES[0], random.Random(5))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    m2 = mounter(cold, root=root, extra=["--passthrough", "on"])
    for _ in range(3):
        for rel in FILES:
            read_checked(m2, cold, rel)
    m2.wait_tier(FILES[0])
    open_watched(m2, cold, FILES[0])


def test_an_overflowed_event_queue_trusts_nothing_it_knew(cold, mounter):
    """More events than the kernel queues (fs.inotify.max_queued_events):
    the lost ones may have named any file, so no stat from before is used;
    a file changed once the queue was full is served as it is now."""
    m = mounter(cold, extra=["--passthrough", "on"])
    promote(m, cold)
    for rel in FILES:
        open_watched(m, cold, rel)
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    storm = [cold / "m" / "storm0", cold / "m" / "storm1"]
    for p in storm:
        p.write_bytes(b"")
    os.kill(m.proc.pid, signal.SIGSTOP)  # the daemon reads events as they come: hold it
    try:
        for i in range(limit + 1000):  # alternating: inotify merges an event with the last one
            os.utime(storm[i % 2], (i, i))
        _rewrite(cold, FILES[1], random.Random(1))  # its events are lost: the queue is full
    finally:
        os.kill(m.proc.pid, signal.SIGCONT)
    for rel in FILES:
        read_checked(m, cold, rel)
    assert m.stats()["cold_watch"]["overflows"] >= 1
    m.wait_tier(FILES[1])
    open_watched(m, cold, FILES[1])  # and it recovers


@pytest.mark.parametrize("where", ["--cold-watch off", "--passthrough off",
                                   "cold tier on overlayfs"])
def test_without_the_watch_every_open_checks_the_cold_file(where, tmp_path, cold,
                                                            overlay_dir, mounter):
    if where == "cold tier on overlayfs":
        root = overlay_dir()
        shutil.copytree(cold, root, dirs_exist_ok=True)
        cold = root
        m = mounter(cold)
        reason = "overlay"
    else:
        m = mounter(cold, extra=where.split())
        reason = where
    state = m.stats()["cold_watch"]
    if where == "--passthrough off":  # watching, but the daemon serves every open
        assert state["active"], state
    else:
        assert not state["active"] and reason in state["reason"], state
    promote(m, cold)
    for _ in range(3):
        for rel in FILES:
            read_checked(m, cold, rel)
    assert watched_opens(m) == 0
    _rewrite(cold, FILES[0], random.Random(0))
    read_checked(m, cold, FILES[0])
    if not state["active"]:
        log = m.log.read_text()
        assert "cold watch off: " in log and reason in log


# -- the watch alone, on a real directory and real inotify (no mount) -------


def storm(d: Path) -> None:
    """More events than the kernel queues, alternating between two names
    (inotify merges an event with the one queued just before)."""
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    names = [d / "storm0", d / "storm1"]
    for p in names:
        p.write_bytes(b"")
    for i in range(limit + 1000):
        os.utime(names[i % 2], (i, i))


@pytest.fixture
def watched(tmp_path):
    """(watch, root, note): a ColdWatch of tmp_path/root with d/ and d/x
    registered; note(rel) stats rel the way the daemon does and notes it."""
    root = tmp_path / "root"
    write_random(root / "d" / "x", 4096, 0)
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    w, why = ColdWatch.start(str(root), root_fd)
    assert w is not None, why
    for rel, is_dir in (("d", True), ("d/x", False)):
        fd = os.open(root / rel, os.O_RDONLY)
        w.register(w.add(fd, is_dir), rel, is_dir, os.fstat(fd).st_ino)
        os.close(fd)

    def note(rel: str) -> os.stat_result:
        token = w.begin()
        st = os.lstat(root / rel)
        w.note(rel, st, token)
        return st

    yield w, root, note
    w.close()
    os.close(root_fd)


def test_watch_vouches_until_any_change(watched, tmp_path):
    w, root, note = watched
    st = note("d/x")
    assert w.known("d/x") == st
    os.link(root / "d" / "x", tmp_path / "elsewhere")  # no event in d: the file's own
    assert w.known("d/x") is None
    assert w.known("d/x") is None  # and it stays forgotten until a new stat
    st = note("d/x")
    assert w.known("d/x") == st


def test_watch_forgets_what_a_moved_directory_held(watched):
    w, root, note = watched
    note("d/x")
    os.rename(root / "d", root / "d.old")
    write_random(root / "d" / "x", 4096, 1)
    assert w.known("d/x") is None
    note("d/x")  # the new d is not watched yet: nothing vouches for it
    assert w.known("d/x") is None


def test_watch_overflow_distrusts_everything_known_before(watched):
    w, root, note = watched
    note("d/x")
    storm(root)
    assert w.known("d/x") is None
    assert w.overflows == 1
    st = note("d/x")  # a stat taken after the overflow was read is fine
    assert w.known("d/x") == st


def test_a_stat_taken_while_a_change_lands_is_not_trusted(watched):
    """The event of a change made after begin() but read only after the
    stat came back counts against that stat."""
    w, root, note = watched
    token = w.begin()
    st = os.lstat(root / "d" / "x")
    with open(root / "d" / "x", "r+b") as f:
        f.write(b"changed")
    w.note("d/x", st, token)
    assert w.known("d/x") is None


def test_a_file_unwatched_with_its_copy_is_not_vouched_for(watched):
    w, root, note = watched
    note("d/x")
    w.unwatch("d/x")  # its fast copy was dropped: the daemon keeps no watch on it
    assert not w.watching("d/x", is_dir=False)
    note("d/x")
    assert w.known("d/x") is None


def test_each_registration_is_told_apart(watched):
    """A directory forgotten (its name moved) and watched again between two
    stats, with no stat in between, is another registration: a directory
    handle opened under the first must not note stats under the second."""
    w, root, note = watched
    first = w.registered("d")
    os.rename(root / "d", root / "d.old")
    (root / "d").mkdir()
    w.drain()
    assert w.registered("d") is None
    fd = os.open(root / "d", os.O_RDONLY)
    w.register(w.add(fd), "d")
    os.close(fd)
    assert w.registered("d") not in (None, first)


def test_a_file_watch_vouches_only_for_its_own_inode(watched, tmp_path):
    """The watch of d/x was placed on another inode than the one the path
    names now (a swap raced the open that placed it): stats of the file at
    d/x are not vouched for, whatever happens to it."""
    w, root, note = watched
    other = tmp_path / "other"
    other.write_bytes(b"y")
    fd = os.open(other, os.O_RDONLY)
    w.register(w.add(fd, False), "d/x", False, os.fstat(fd).st_ino)
    os.close(fd)
    note("d/x")
    assert w.known("d/x") is None


def test_a_directory_handle_opened_before_a_swap_vouches_for_nothing(tmp_path, mounter):
    """A directory handle opened before its directory was swapped lists the
    old directory. What it lists must not vouch for the new directory's
    files, even when the path was watched anew in between with no stat
    taken (a hostile tester's sequence, step by step)."""
    cold = tmp_path / "cold2"
    write_random(cold / "other", MiB, 1)
    write_random(cold / "dd" / "x", MiB, 2)
    m = mounter(cold, extra=["--passthrough", "on"])
    promote_files = ["other", "dd/x"]
    for rel in promote_files:
        read_checked(m, cold, rel)
        m.wait_tier(rel)
        open_watched(m, cold, rel)
    for i in range(2):
        m.wait_tier("dd/x")
        open_watched(m, cold, "dd/x")
        os.rename(cold / "dd", cold / "dd.tmp")  # the daemon forgets dd's watch
        os.rename(cold / "dd.tmp", cold / "dd")
        time.sleep(1.1)  # the kernel's entries expire: the next stat reaches the daemon
        for rel in ("other", "dd", "dd/x"):
            os.stat(m.path(rel))  # watches dd anew
        before = os.open(m.path("dd"), os.O_RDONLY | os.O_DIRECTORY)
        os.rename(cold / "dd", cold / f"dd.old{i}")
        write_random(cold / "dd" / "x", MiB, 10 + i)
        read_checked(m, cold, "other")  # reads the events: dd forgotten again
        after = os.open(m.path("dd"), os.O_RDONLY | os.O_DIRECTORY)  # watched anew
        os.listdir(before)  # the old dd's x, under the path dd/x
        try:
            read_checked(m, cold, "dd/x")
        finally:
            os.close(before)
            os.close(after)


def test_a_listing_stays_true_as_a_directory_gains_and_loses_subdirectories(cold, mounter):
    """A directory whose listing the kernel keeps, given a subdirectory, a
    file in it, then neither, lists what the cold directory holds at each
    step, never stuck on a listing of before (a change reaches the kernel as
    soon as the daemon reads its event); and every byte read through it is
    the cold file's."""
    leaf = cold / "leaf"
    leaf.mkdir()
    write_random(leaf / "a.bin", 3000, 1)
    m = mounter(cold, extra=["--log-level", "debug"])
    assert m.stats()["cold_watch"]["active"]

    def listing() -> list[str]:
        return sorted(os.listdir(m.path("leaf")))

    steps = [
        (lambda: None, ["a.bin"]),
        (lambda: (leaf / "sub").mkdir(), ["a.bin", "sub"]),
        (lambda: write_random(leaf / "sub" / "s.bin", 2000, 2), ["a.bin", "sub"]),
        (lambda: write_random(leaf / "b.bin", 4000, 3), ["a.bin", "b.bin", "sub"]),
        (lambda: ((leaf / "sub" / "s.bin").unlink(), (leaf / "sub").rmdir()), ["a.bin", "b.bin"]),
        (lambda: (leaf / "a.bin").unlink(), ["b.bin"]),
        (lambda: write_random(leaf / "c.bin", 5000, 4), ["b.bin", "c.bin"]),
    ]
    for change, expected in steps:
        for _ in range(2):  # listed twice: the second may come from the kernel's copy
            listing()
        change()
        # a change shows once the daemon has read its event (every 10 ms)
        wait_for(lambda: listing() == expected and _view(m.path("leaf")) == _view(leaf),
                 timeout=10, what=f"leaf to list {expected}, and sub what it holds")
        for name in expected:
            if (leaf / name).is_file():
                read_checked(m, cold, f"leaf/{name}")
    # a leaf's listing is kept: listed again, it is not read from the daemon
    listing()
    since = m.log.stat().st_size
    listing()
    assert "readdir" not in _requests(m, since)
