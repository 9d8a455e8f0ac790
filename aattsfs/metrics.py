"""The Prometheus endpoint (prometheus-client) and the live dashboard,
served from one port by a thread.

A scrape asks the trio thread for one consistent snapshot of the store
(`trio.from_thread.run_sync`): the store's state is only ever touched from
that thread, and a scrape costs one hop there, nothing on the read path.
Names follow the Prometheus conventions: `aattsfs_..._total` for counters,
`_bytes` and `_seconds` units.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import socket
import stat
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import trio
from prometheus_client import CONTENT_TYPE_LATEST, ProcessCollector, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)
from prometheus_client.registry import CollectorRegistry

from . import __version__
from .counters import COUNTERS, value_at
from .errors import UserError
from .store import Store

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
HOTTEST = 15  # files in the dashboard's table


PRIVATE = "(private)"


def world_readable(root: str, rel: str, traversable: dict[str, bool]) -> bool:
    """Could any local user read the cold file `rel` anyway? Only then may the
    unauthenticated HTTP API name it: every directory from the cold root
    down must be o+x, the file o+r, and no component a symlink (lstat; a
    symlink's target could be anywhere). `traversable` caches directories."""
    def has(path: str, kind, bit: int) -> bool:
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            return False
        return kind(mode) and bool(mode & bit)

    parts = rel.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return False  # not a plain path below the root: nothing to vouch for
    ok = True
    for i in range(len(parts)):  # the root itself (""), then each directory below
        d = "/".join(parts[:i])
        if d not in traversable:
            traversable[d] = ok and has(os.path.join(root, d) if d else root,
                                        stat.S_ISDIR, stat.S_IXOTH)
        ok = traversable[d]
    return ok and has(os.path.join(root, rel), stat.S_ISREG, stat.S_IROTH)


def parse_address(text: str, allow_remote: bool) -> tuple[str, int]:
    """HOST:PORT (or :PORT for 127.0.0.1); refuses a non-loopback host unless
    `allow_remote`, since the endpoint has no authentication."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"metrics address {text!r} is not HOST:PORT; for example "
                        "127.0.0.1:9464")
    try:
        ips = {ipaddress.ip_address(ai[4][0]) for ai in socket.getaddrinfo(host, None)}
    except (socket.gaierror, ValueError):
        raise UserError(f"metrics address {text!r}: cannot resolve {host}") from None
    if not allow_remote and not all(ip.is_loopback for ip in ips):
        raise UserError(f"metrics address {text!r} is reachable from other machines and "
                        "the endpoint has no authentication; bind to 127.0.0.1, or pass "
                        "--metrics-allow-remote if that is intended")
    return host, int(port)


class Exporter:
    """The collector behind the endpoint; `token` is set once trio runs."""

    def __init__(self, store: Store, mountpoint: str = "") -> None:
        self.store = store
        self.mountpoint = mountpoint
        self.token: trio.lowlevel.TrioToken | None = None

    def _take(self) -> tuple[dict, dict]:  # on the trio thread
        latency = {t: (h.buckets(), h.sum) for t, h in self.store.stats.read_seconds.items()}
        return self.store.snapshot(), latency

    def _view(self) -> dict:  # on the trio thread: what the dashboard polls
        s, latency = self._take()
        store = self.store
        hot = sorted(store.entries.items(),
                     key=lambda kv: -(kv[1].record.hits + kv[1].record.misses))[:HOTTEST]
        return {
            "time": time.time(),
            "mountpoint": self.mountpoint,
            "stats": s,
            "latency": {t: {"buckets": [["+Inf" if b == float("inf") else b, n]
                                        for b, n in buckets], "sum": total}
                        for t, (buckets, total) in latency.items()},
            "hottest": [{"path": rel, "name": store.display_name(rel), "tier": store.tier(rel),
                         "size": e.record.size,
                         "opens": e.record.hits + e.record.misses} for rel, e in hot],
        }

    def view(self) -> dict | None:
        """What /api/stats serves. Paths are checked here, on the HTTP thread:
        an lstat of a slow cold tier must not stall the trio thread."""
        if self.token is None:
            return None
        try:
            view = trio.from_thread.run_sync(self._view, trio_token=self.token)
        except trio.RunFinishedError:
            return None
        traversable: dict[str, bool] = {}  # per directory, for this request only
        for row in view["hottest"]:
            if not all(world_readable(self.store.cold.root, row[k], traversable)
                       for k in ("path", "name")):
                row["path"] = row["name"] = PRIVATE
        return view

    def collect(self):
        if self.token is None:
            return  # not serving yet
        try:
            s, latency = trio.from_thread.run_sync(self._take, trio_token=self.token)
        except trio.RunFinishedError:
            return  # shutting down
        ft = s["fast_tier"]
        families: dict[str, CounterMetricFamily] = {}
        for c in COUNTERS:
            if c.metric not in families:
                families[c.metric] = CounterMetricFamily(
                    f"aattsfs_{c.metric}", c.doc, labels=["tier"] if c.tier else None)
            families[c.metric].add_metric([c.tier] if c.tier else [], value_at(s, c.key))
        yield from families.values()

        def gauge(name, doc, value):
            g = GaugeMetricFamily(f"aattsfs_{name}", doc)
            g.add_metric([], value)
            return g

        yield gauge("fast_tier_used_bytes", "Bytes the fast tier holds or has reserved.",
                    ft["used_bytes"])
        yield gauge("fast_tier_budget_bytes", "The fast tier's byte budget.", ft["budget_bytes"])
        yield gauge("fast_tier_effective_budget_bytes", "The budget the fast tier is held "
                    "within now: lower than its budget while memory is short.",
                    ft["effective_budget_bytes"])
        yield gauge("fast_tier_files", "Files in the fast tier.", ft["files"])
        mf = s["memory_floor"]
        yield gauge("memory_floor_bytes", "Free memory the daemon keeps on the box "
                    "(--fast-min-free; 0: off).", mf["floor_bytes"])
        yield gauge("memory_floor_active", "1 while the box's available memory is short and "
                    "the fast tier is shrunk.", int(mf["active"]))
        if mf["available_bytes"] is not None:  # polled only while a floor is set
            yield gauge("memory_available_bytes", "The box's MemAvailable, as the daemon "
                        "last read it.", mf["available_bytes"])
        yield gauge("open_files", "Files open through the mount.", s["open_files"])
        pt = s["passthrough"]
        yield gauge("passthrough_active", "1 if promoted files open in kernel passthrough.",
                    int(pt["active"]))
        yield gauge("passthrough_backing_files", "Fast copies open as backing files.",
                    pt["backing_files"])
        yield gauge("passthrough_held_evicted_bytes", "Bytes of evicted copies that "
                    "passthrough opens still hold (counted in the budget).",
                    pt["held_evicted_bytes"])
        yield gauge("cold_watch_active", "1 if inotify vouches for unchanged cold files.",
                    int(s["cold_watch"]["active"]))
        h = HistogramMetricFamily("aattsfs_read_seconds", "Time to serve a read request, by "
                                  "tier (cold: waited for the cold tier).", labels=["tier"])
        for tier, (buckets, total) in latency.items():
            h.add_metric([tier], [(str(b) if b != float("inf") else "+Inf", n)
                                  for b, n in buckets], total)
        yield h
        # which daemon this is, when several on one box feed one Prometheus
        info = GaugeMetricFamily("aattsfs_mount_info", "The mount this daemon serves (1).",
                                 labels=["mountpoint", "cold", "version"])
        info.add_metric([self.mountpoint, self.store.cold.root, __version__], 1)
        yield info


def _hang_up(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed


class _Server(ThreadingHTTPServer):
    """A handler thread per connection, but at most THREADS of them: when all
    are busy the accept loop waits, and new clients queue in the listen
    backlog (they are not reset, as they were with the default backlog of 5)
    until a handler is free. Handlers drop a client silent for `timeout`."""
    THREADS = 64
    CONNECTION_SECONDS = 10  # the longest a connection may last (keep-alive included)
    request_queue_size = 1024  # the listen backlog (the kernel caps it at somaxconn)
    daemon_threads = True

    def __init__(self, *args) -> None:
        self._free = threading.BoundedSemaphore(self.THREADS)
        self._lock = threading.Lock()
        self._deadlines: dict[socket.socket, float] = {}
        super().__init__(*args)
        threading.Thread(target=self._watchdog, name="metrics-deadlines", daemon=True).start()

    def process_request(self, request, client_address) -> None:
        self._free.acquire()  # released when the handler thread ends
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: give its place back
            self._free.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        # `timeout` bounds each silence; the deadline bounds the whole
        # connection, so a client trickling a byte at a time cannot keep a
        # handler either (one watchdog thread for all connections)
        with self._lock:
            self._deadlines[request] = time.monotonic() + self.CONNECTION_SECONDS
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._lock:
                del self._deadlines[request]
            self._free.release()

    def _watchdog(self) -> None:
        while True:
            time.sleep(1)
            now = time.monotonic()
            with self._lock:
                late = [sock for sock, end in self._deadlines.items() if end < now]
            for sock in late:
                _hang_up(sock)

    def handle_error(self, request, client_address) -> None:
        # instead of socketserver's traceback on stderr: a client that went
        # away or timed out is its own business; anything else is a bug
        if isinstance(sys.exc_info()[1], OSError):
            log.debug("http: %s: %s", client_address[0], sys.exc_info()[1])
        else:
            log.exception("http: a request from %s failed", client_address[0])


class _Handler(BaseHTTPRequestHandler):
    exporter: Exporter
    registry: CollectorRegistry
    # Seconds a client may stay silent (before and within its request, or
    # not reading the reply): an idle or slowloris client is dropped rather
    # than holding one of the handler threads forever.
    timeout = 3
    FILES = {"/": ("dashboard.html", "text/html; charset=utf-8"),
             "/chart.umd.js": ("chart.umd.js", "application/javascript")}

    def do_GET(self) -> None:  # noqa: N802 (the http.server name)
        path = urlsplit(self.path).path
        if path == "/metrics":
            self._reply(200, CONTENT_TYPE_LATEST, generate_latest(self.registry))
        elif path == "/api/stats":
            view = self.exporter.view()
            if view is None:
                self._reply(503, "text/plain", b"not serving\n")
            else:
                self._reply(200, "application/json", json.dumps(view).encode())
        elif path in self.FILES:
            name, ctype = self.FILES[path]
            try:
                self._reply(200, ctype, (STATIC / name).read_bytes())
            except OSError:
                self._reply(404, "text/plain", f"{name} is missing from the install\n".encode())
        else:
            self._reply(404, "text/plain", b"not found\n")

    def _reply(self, code: int, ctype: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args) -> None:
        log.debug("http: " + fmt, *args)


def start(store: Store, address: tuple[str, int], mountpoint: str = "") -> Exporter:
    """Bind and serve /metrics, the dashboard (/) and its data (/api/stats)
    in a thread, before the mount, so that a taken port stops the start with
    one clear line."""
    exporter = Exporter(store, mountpoint)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(exporter)
    ProcessCollector(registry=registry)  # the standard process_* metrics
    handler = type("Handler", (_Handler,), {"exporter": exporter, "registry": registry})
    try:
        server = _Server(address, handler)
    except OSError as exc:
        raise UserError(f"metrics address {address[0]}:{address[1]} cannot be used "
                        f"({exc.strerror}); choose another --metrics-address") from None
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    log.info("metrics on http://%s:%d/metrics, dashboard on http://%s:%d/", *address, *address)
    return exporter
