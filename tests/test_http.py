"""The metrics/dashboard HTTP server of a real mount: it drops idle
connections, serves many clients at once without resetting any, and shows
in /api/stats only the paths any local user could read anyway."""

from __future__ import annotations

import json
import os
import selectors
import socket
import threading
import time
from urllib.request import urlopen

import pytest

from conftest import MiB, wait_for, write_random
from test_service import _free_port


@pytest.fixture
def served(cold_tree, mounter):
    """A mount of cold_tree with its metrics port; returns (mount, base URL)."""
    port = _free_port()
    m = mounter(cold_tree, extra=["--metrics-address", f"127.0.0.1:{port}"])
    return m, f"http://127.0.0.1:{port}"


def test_idle_connections_are_closed_by_the_server(served):
    """...each within a few seconds, by at most 64 handler threads at a time
    (the rest wait in the listen backlog)."""
    m, url = served
    port = int(url.rsplit(":", 1)[1])

    def threads() -> int:
        return len(os.listdir(f"/proc/{m.proc.pid}/task"))

    before = peak = threads()
    socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(200)]
    sel = selectors.DefaultSelector()
    try:
        for s in socks:  # connected, and never send a byte
            sel.register(s, selectors.EVENT_READ)
        open_ = set(socks)
        deadline = time.monotonic() + 90  # generous: a few seconds per round of handlers
        while open_ and time.monotonic() < deadline:
            peak = max(peak, threads())
            for key, _ in sel.select(timeout=1):
                try:
                    closed = key.fileobj.recv(1) == b""
                except ConnectionResetError:
                    closed = True
                if closed:
                    sel.unregister(key.fileobj)
                    open_.discard(key.fileobj)
        assert not open_, f"{len(open_)} of 200 idle connections still open after 90 s"
        assert peak - before <= 64 + 8, f"{peak - before} more threads for 200 idle clients"
        # and the server still answers
        assert urlopen(f"{url}/metrics", timeout=30).status == 200
    finally:
        sel.close()
        for s in socks:
            s.close()


def test_a_client_trickling_bytes_is_dropped(served):
    """A byte every second never trips the per-read timeout; the bound on the
    whole connection still ends it."""
    m, url = served
    sock = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=5)
    try:
        request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 60
        start, closed = time.monotonic(), False
        for byte in request:
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            time.sleep(1)
            if time.monotonic() - start > 40:
                break
        if not closed:
            sock.settimeout(5)
            try:
                closed = sock.recv(1) == b""
            except ConnectionResetError:
                closed = True
        assert closed, "the server kept a trickling client"
    finally:
        sock.close()


def test_200_concurrent_clients_all_served(served):
    m, url = served
    paths = ["/metrics", "/api/stats", "/"]
    start = threading.Barrier(200)
    errors: list[str] = []
    done = []

    def client(i: int) -> None:
        start.wait(timeout=60)
        for j in range(10):
            path = paths[(i + j) % len(paths)]
            try:
                with urlopen(url + path, timeout=120) as r:
                    r.read()
                    done.append(r.status)
            except OSError as exc:
                errors.append(f"{path}: {exc!r}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(200)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 300
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "clients still running after 300 s"
    assert not errors, f"{len(errors)} of 2000 requests failed, e.g. {errors[:3]}"
    assert done == [200] * 2000


def test_api_stats_hides_paths_other_users_could_not_read(cold_tree, mounter):
    """A file in a 0700 directory, a file without o+r, and one reached through
    a directory that became a symlink are listed as '(private)', with their
    tier, size and opens; a world-readable file by its path."""
    os.chmod(cold_tree, 0o755)
    secret = write_random(cold_tree / "secret" / "weights.bin", 1 * MiB + 1, 11)
    os.chmod(secret.parent, 0o700)
    own = write_random(cold_tree / "public" / "own.bin", 1 * MiB + 2, 12)
    os.chmod(own, 0o600)
    shown = write_random(cold_tree / "public" / "shown.bin", 1 * MiB + 3, 13)
    moved = write_random(cold_tree / "later-link" / "m.bin", 1 * MiB + 4, 14)
    for path in (cold_tree / "public", cold_tree / "later-link"):
        os.chmod(path, 0o755)
    for path in (secret, shown, moved):
        os.chmod(path, 0o644)
    port = _free_port()
    m = mounter(cold_tree, extra=["--metrics-address", f"127.0.0.1:{port}"])
    rels = ["secret/weights.bin", "public/own.bin", "public/shown.bin", "later-link/m.bin"]
    size = {rel: (cold_tree / rel).stat().st_size for rel in rels}  # tells the rows apart
    for rel in rels:
        m.path(rel).read_bytes()
    wait_for(lambda: m.stats()["promotions_in_flight"] == 0, what="promotions to end")
    # the directory is now a symlink to a public one: its path no longer proves anything
    os.rename(cold_tree / "later-link", cold_tree / "real")
    os.symlink("real", cold_tree / "later-link")

    def listed():
        view = json.loads(urlopen(f"http://127.0.0.1:{port}/api/stats", timeout=30).read())
        rows = {row["size"]: row for row in view["hottest"]}
        return rows if all(size[rel] in rows for rel in rels) else None

    rows = wait_for(listed, what="the four files in /api/stats")
    assert rows[size["public/shown.bin"]]["path"] == "public/shown.bin"
    for rel in ("secret/weights.bin", "public/own.bin", "later-link/m.bin"):
        row = rows[size[rel]]
        assert row["path"] == "(private)", row
        assert row["opens"] >= 1 and row["tier"] in ("fast", "promoting", "cold")
