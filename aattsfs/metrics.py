"""The Prometheus endpoint (prometheus-client), served from a thread.

A scrape asks the trio thread for one consistent snapshot of the store
(`trio.from_thread.run_sync`): the store's state is only ever touched from
that thread, and a scrape costs one hop there, nothing on the read path.
Names follow the Prometheus conventions: `aattsfs_..._total` for counters,
`_bytes` and `_seconds` units.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket

import psutil
import trio
from prometheus_client import start_http_server
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)
from prometheus_client.registry import CollectorRegistry

from .errors import UserError
from .store import Store

log = logging.getLogger(__name__)

TIERS = ("fast", "cold")


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

    def __init__(self, store: Store) -> None:
        self.store = store
        self.token: trio.lowlevel.TrioToken | None = None
        self.proc = psutil.Process(os.getpid())

    def _take(self) -> tuple[dict, dict]:  # on the trio thread
        latency = {t: (h.buckets(), h.sum) for t, h in self.store.stats.read_seconds.items()}
        return self.store.snapshot(), latency

    def collect(self):
        if self.token is None:
            return  # not serving yet
        try:
            s, latency = trio.from_thread.run_sync(self._take, trio_token=self.token)
        except trio.RunFinishedError:
            return  # shutting down
        pf, ft = s["prefetch"], s["fast_tier"]

        def counter(name, doc, value):
            c = CounterMetricFamily(f"aattsfs_{name}", doc)
            c.add_metric([], value)
            return c

        def gauge(name, doc, value):
            g = GaugeMetricFamily(f"aattsfs_{name}", doc)
            g.add_metric([], value)
            return g

        for name, key, doc in (("opens", "opens", "Opens, by the tier that served them."),
                               ("reads", "reads", "Read requests, by tier."),
                               ("served_bytes", "bytes_served", "Bytes served, by tier.")):
            c = CounterMetricFamily(f"aattsfs_{name}", doc, labels=["tier"])
            for tier in TIERS:
                c.add_metric([tier], s[key][tier])
            yield c
        yield counter("cold_read_bytes", "Bytes read from the cold tier (rate(): its "
                      "bandwidth).", s["cold_bytes_read"])
        yield counter("promotions", "Files copied into the fast tier.", s["promotions"])
        yield counter("promoted_bytes", "Bytes copied into the fast tier.", s["promoted_bytes"])
        yield counter("promotion_failures", "Promotions that could not read the cold tier.",
                      s["promotions_failed"])
        yield counter("evictions", "Fast copies dropped to make room.", s["evictions"])
        yield counter("evicted_bytes", "Bytes of fast copies dropped.", s["evicted_bytes"])
        yield counter("prefetched_bytes", "Bytes staged before any open.", pf["prefetched_bytes"])
        yield counter("prefetch_used_bytes", "Prefetched bytes later opened.", pf["used_bytes"])
        yield counter("prefetch_wasted_bytes", "Prefetched bytes evicted or cancelled unopened.",
                      pf["wasted_bytes"])
        yield counter("demand_misses", "Opens that found the file neither fast nor on its way.",
                      pf["demand_misses"])
        yield gauge("fast_tier_used_bytes", "Bytes the fast tier holds or has reserved.",
                    ft["used_bytes"])
        yield gauge("fast_tier_budget_bytes", "The fast tier's byte budget.", ft["budget_bytes"])
        yield gauge("fast_tier_files", "Files in the fast tier.", ft["files"])
        yield gauge("open_files", "Files open through the mount.", s["open_files"])
        h = HistogramMetricFamily("aattsfs_read_seconds", "Time to serve a read request, by "
                                  "tier (cold: waited for the cold tier).", labels=["tier"])
        for tier, (buckets, total) in latency.items():
            h.add_metric([tier], [(str(b) if b != float("inf") else "+Inf", n)
                                  for b, n in buckets], total)
        yield h
        cpu = self.proc.cpu_times()
        yield counter("process_cpu_seconds", "CPU time of the daemon (user + system).",
                      cpu.user + cpu.system)
        yield gauge("process_resident_memory_bytes", "Resident memory of the daemon.",
                    self.proc.memory_info().rss)


def start(store: Store, address: tuple[str, int]) -> Exporter:
    """Bind and serve the endpoint in a thread, before the mount, so that a
    taken port stops the start with one clear line."""
    exporter = Exporter(store)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(exporter)
    try:
        start_http_server(address[1], address[0], registry=registry)
    except OSError as exc:
        raise UserError(f"metrics address {address[0]}:{address[1]} cannot be used "
                        f"({exc.strerror}); choose another --metrics-address") from None
    log.info("metrics on http://%s:%d/metrics", *address)
    return exporter
