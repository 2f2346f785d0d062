"""Prometheus metrics of every Sixfold process and of the embedded engine.

Theory of operation
-------------------
Every metric Sixfold exports is defined here, and nowhere else. One `Metrics` object belongs to
one process (a storage node, a writer endpoint, a reader instance) or to one embedded volume,
and owns a `prometheus_client.CollectorRegistry` of its own, never the library's global default
registry: several embedded volumes in one process, or a test that opens many, then never share
or collide on a series.

Two kinds of metric, chosen by cost on the hot path:

* *Scrape-time collectors* for everything the engine already counts (VDL, epochs, SCLs and their
  lag behind the PGCLs, gossip and repair bytes, corrupt copies found, background errors...).
  `watch_writer`, `watch_nodes` and `watch_reader` register a collector that reads the writer's
  `status()` and `scl_lags()`, each node's `state()` and `counters()`, or a reader's
  `reader_status()` when Prometheus asks, and turns them into metric families. Writing costs
  nothing extra; a scrape costs what a status call costs. A collector whose object is closed or
  unreachable at that moment (`SixfoldError`) yields nothing for it; an unexpected exception is
  logged once per cause and yields nothing, so a scrape never fails because one part did.
* *Histograms* only where a distribution is the point: put and get latency
  (`observe_put`/`observe_get`, one `observe()` each, at the API boundary: the embedded backend,
  the KV servicer of the writer endpoint and of reader instances) and the size of each frame a
  writer sends a node (`observe_flush`: records and bytes, once per frame, not per record).
  Errors returned to callers are counted by their class (`count_error`), on the error path only.

Output: `text()` is the Prometheus text exposition (`prometheus_client.generate_latest`), the
very bytes a process serves over HTTP; `values()` is the same samples as a dict keyed by the
sample as the text writes it (`sixfold_vdl`, `sixfold_scl_lag_lsns{node="n3"}`,
`sixfold_put_latency_seconds_count`), which is what the embedded engine's `db.metrics()` returns.

Serving: `serve(metrics, port)` starts prometheus_client's own HTTP server (`start_http_server`,
a daemon thread) on loopback. Metrics travel as plaintext HTTP, so the exposure rule of every
other Sixfold listener holds: a non-loopback address is refused (`InsecureListen`); a busy or
forbidden port is `AddressInUse`, before the process opens any data. Port 0 picks a free port
(`MetricsServer.port` says which).

Rules of this module: prometheus_client, the standard library, `engine.errors` and the exposure
rules of `engine.transport.grpc_server`; it reads the objects it watches only through their
public status methods (duck-typed, so it imports neither the writer nor the node).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from engine.errors import InvalidArgument, SixfoldError

log = logging.getLogger("sixfold.metrics")

#: Where a process serves its metrics: loopback only (plaintext HTTP, see the module docstring).
METRICS_HOST = "127.0.0.1"
PORT_MAX = 65535

#: Put and get latency, seconds: from 50 us (a non-durable embedded put) to 10 s (twice the
#: default write timeout, past which a write has failed anyway).
LATENCY_BUCKETS_S = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                     1.0, 2.5, 5.0, 10.0)
#: Records per frame sent to a node: powers of two up to the writer's FRAME_RECORDS_MAX_SEND (8192).
FLUSH_RECORDS_BUCKETS = tuple(float(1 << i) for i in range(14))
#: Bytes per frame: 256 B to 32 MiB (the writer's frames stop at FRAME_BYTES_MAX / 2).
FLUSH_BYTES_BUCKETS = tuple(float(256 << (2 * i)) for i in range(9)) + (float(32 << 20),)


class _Callback:
    """A collector that yields what `fn()` yields, at scrape time (see the module docstring)."""

    def __init__(self, what: str, fn: Callable[[], Iterable[Metric]]) -> None:
        self.what = what
        self.fn = fn
        self._logged = ""

    def describe(self) -> list:
        return []  # names are not checked at registration: that would run a scrape first

    def collect(self) -> Iterator[Metric]:
        try:
            families = list(self.fn())
        except SixfoldError:
            return iter(())  # closed or unreachable right now: nothing to say of it
        except Exception as e:  # noqa: BLE001 - a bug in a collector must not fail the whole scrape
            cause = f"{type(e).__name__}: {e}"
            if cause != self._logged:
                self._logged = cause
                log.exception("metrics of %s could not be collected (logged once per cause)", self.what)
            return iter(())
        self._logged = ""
        return iter(families)


def _gauge(name: str, doc: str, value: float, labels: dict[str, str] | None = None) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=list(labels or ()))
    g.add_metric(list((labels or {}).values()), value)
    return g


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    c = CounterMetricFamily(name, doc)
    c.add_metric([], value)
    return c


class Metrics:
    """The metrics of one process or one embedded volume (see the module docstring)."""

    def __init__(self, *, process: bool = False, api: bool = True) -> None:
        """`process=True` adds the standard process and platform collectors (CPU, memory, open
        files, Python version): for a server process, not for an embedded volume, of which one
        process may hold several. `api=False` (a storage node's process) leaves out what only a
        process serving the volume's API fills: put and get latency, flushes, errors returned."""
        self.registry = CollectorRegistry(auto_describe=False)
        if process:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
        if api:
            self._api_metrics()

    def _api_metrics(self) -> None:
        r = self.registry
        self.put_latency = Histogram(
            "sixfold_put_latency_seconds",
            "Latency of writes acknowledged durable (a put, a delete or a batch: one atomic unit each), from the "
            "call (or the Write RPC) to its acknowledgement", registry=r, buckets=LATENCY_BUCKETS_S)
        self.get_latency = Histogram(
            "sixfold_get_latency_seconds",
            "Latency of gets answered (each get of a batched GetMany counts once, with the batch's time)",
            registry=r, buckets=LATENCY_BUCKETS_S)
        self.flush_records = Histogram(
            "sixfold_flush_records", "Records per frame the writer sent a node (group commit: a busy volume or a "
            "slow node gets bigger frames)", registry=r, buckets=FLUSH_RECORDS_BUCKETS)
        self.flush_bytes = Histogram(
            "sixfold_flush_bytes", "Bytes per frame the writer sent a node", registry=r, buckets=FLUSH_BYTES_BUCKETS)
        self.errors = Counter("sixfold_errors_total", "Errors returned to callers, by error class", ["kind"], registry=r)
        # Bound once: the hot paths call these.
        self.observe_put = self.put_latency.observe
        self.observe_get = self.get_latency.observe

    # --- what the hot paths call ------------------------------------------------------------
    def observe_flush(self, records: int, size: int) -> None:
        """One frame of `records` records and `size` bytes was sent to a node (and taken)."""
        self.flush_records.observe(records)
        self.flush_bytes.observe(size)

    def count_error(self, error: BaseException) -> None:
        """An error returned to a caller: counted by its class name."""
        self.errors.labels(type(error).__name__).inc()

    def timed(self, observe: Callable[[float], None], call: Callable[[], object]):
        """`call()`, its time given to `observe` (`observe_put`, `observe_get`) when it returns,
        its SixfoldError counted when it raises."""
        t0 = time.perf_counter()
        try:
            value = call()
        except SixfoldError as e:
            self.count_error(e)
            raise
        observe(time.perf_counter() - t0)
        return value

    def observe_each(self, observe: Callable[[float], None], results: Sequence, elapsed: float) -> None:
        """A batch's results (several write units, or gets): each error counted, each success
        observed with the batch's time (they shared one call)."""
        for r in results:
            if isinstance(r, SixfoldError):
                self.count_error(r)
            else:
                observe(elapsed)

    # --- scrape-time collectors -------------------------------------------------------------
    def add(self, what: str, fn: Callable[[], Iterable[Metric]]) -> None:
        """Register `fn` as a collector (it yields metric families when Prometheus asks)."""
        self.registry.register(_Callback(what, fn))

    def watch_writer(self, writer: Callable[[], object | None]) -> None:
        """Export the writer `writer()` returns (None: none serving now) at every scrape."""
        self.add("the writer", lambda: writer_families(writer()))

    def watch_nodes(self, nodes: Callable[[], Sequence[tuple[str, object | None]]]) -> None:
        """Export every storage node `nodes()` lists as (id, StorageNode or None when it is down)."""
        self.add("the storage nodes", lambda: node_families(nodes()))

    def watch_reader(self, status: Callable[[], dict | None]) -> None:
        """Export a reader instance's `reader_status()` (None: it is a reader no more)."""
        self.add("the reader", lambda: reader_families(status()))

    # --- output -----------------------------------------------------------------------------
    def text(self) -> str:
        """The Prometheus text exposition: what the process's metrics port serves."""
        return generate_latest(self.registry).decode()

    def values(self) -> dict[str, float]:
        """Every sample of `text()`, keyed as the text writes it: `name` or `name{label="value",...}`."""
        out: dict[str, float] = {}
        for family in self.registry.collect():
            for s in family.samples:
                if s.labels:
                    labels = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(s.labels.items()))
                    out[f"{s.name}{{{labels}}}"] = float(s.value)
                else:
                    out[s.name] = float(s.value)
        return out


def _escape(value: str) -> str:
    """A label value as the text exposition writes it."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


# --- the families of each watched object ------------------------------------------------------
def writer_families(w) -> list[Metric]:
    """The writer's metrics, from `Writer.status()` and `Writer.scl_lags()` (None: not serving)."""
    if w is None:
        return [_gauge("sixfold_writer_serving", "1 while this process serves as the volume's writer", 0)]
    st = w.status()
    lags = w.scl_lags()
    stats = st["stats"]
    out = [
        _gauge("sixfold_writer_serving", "1 while this process serves as the volume's writer", 1 if w.serving else 0),
        _gauge("sixfold_vdl", "Volume durable LSN: every record at or below it is durable (and readable)", st["vdl"]),
        _gauge("sixfold_vcl", "Volume complete LSN: one below the lowest allocated record not yet durable", st["vcl"]),
        _gauge("sixfold_epoch", "The writer's volume epoch", st["epoch"]),
        _gauge("sixfold_in_flight_records", "Records allocated LSNs and not yet durable", st["in_flight"]),
        _gauge("sixfold_read_points", "Read points held against version collection (snapshots, scans, readers, "
               "the archiver)", stats.get("read_points", 0)),
        _gauge("sixfold_collect_lsn", "The collection point last sent to the nodes", stats.get("collect_lsn", 0)),
        _counter("sixfold_read_points_lapsed_total", "Read point registrations that lapsed unrenewed",
                 stats.get("read_points_lapsed", 0)),
        _counter("sixfold_requests_deduplicated_total", "Writes sent again under a request id and applied once",
                 stats.get("requests_deduplicated", 0)),
    ]
    if "tag_failures" in stats:
        out.append(_counter("sixfold_tag_failures_total", "Sealed values that failed their tag on an encrypted volume "
                            "(counted as corruption)", stats["tag_failures"]))
    lag = GaugeMetricFamily("sixfold_scl_lag_lsns", "Per node: LSNs its SCLs are behind the writer's PGCLs, summed "
                            "over protection groups (0: it can serve reads at the VDL)", labels=["node"])
    up = GaugeMetricFamily("sixfold_link_up", "Per node: 1 while the writer reaches it", labels=["node"])
    errors = CounterMetricFamily("sixfold_link_errors", "Per node: unexpected exceptions its sender met (bugs)",
                                 labels=["node"])
    for node in sorted(st["links"]):
        link = st["links"][node]
        up.add_metric([node], 1 if link["up"] else 0)
        errors.add_metric([node], link["errors"])
    for node in sorted(lags):
        lag.add_metric([node], lags[node])
    return out + [lag, up, errors]


def node_families(nodes: Sequence[tuple[str, object | None]]) -> list[Metric]:
    """Every storage node's metrics, from `StorageNode.state()` and `StorageNode.counters()`."""
    def family(kind, name: str, doc: str, labels=("node",)):
        return kind(name, doc, labels=list(labels))

    up = family(GaugeMetricFamily, "sixfold_node_up", "1 while the node runs")
    epoch = family(GaugeMetricFamily, "sixfold_node_epoch", "The node's volume epoch")
    scl = family(GaugeMetricFamily, "sixfold_scl", "The node's segment complete LSN per protection group",
                 ("node", "pg"))
    hint = family(GaugeMetricFamily, "sixfold_node_vdl_hint", "The VDL the writer last told the node")
    records = family(GaugeMetricFamily, "sixfold_node_records", "Records the node holds")
    used = family(GaugeMetricFamily, "sixfold_node_used_bytes", "Bytes of the node's data file in use")
    capacity = family(GaugeMetricFamily, "sixfold_node_capacity_bytes", "The most the node's data may take now")
    room = family(GaugeMetricFamily, "sixfold_node_room_bytes", "Bytes left above the node's reserve")
    low = family(GaugeMetricFamily, "sixfold_node_space_low", "1 while the node is within its reserve (deletes only)")
    corrupt = family(CounterMetricFamily, "sixfold_corrupt_copies_found",
                     "Stored records that failed their CRC on a read, fetch or scrub, quarantined and refetched")
    repaired = family(CounterMetricFamily, "sixfold_repaired_records", "Records gossip fetched from peers to fill holes")
    collected = family(CounterMetricFamily, "sixfold_collected_records", "Versions removed by version collection")
    rounds = family(CounterMetricFamily, "sixfold_gossip_rounds", "Gossip rounds (one State call to every peer)")
    gossip = family(CounterMetricFamily, "sixfold_gossip_bytes", "Bytes of record frames moved by gossip: fetched from "
                    "peers, or served to a Fetch (a peer's gossip, a recovering writer)", ("node", "direction"))
    repair = family(CounterMetricFamily, "sixfold_repair_bytes", "Bytes of record frames appended in repair mode: "
                    "fetched by gossip, or re-replicated by a recovering writer (RepairAppend)")
    errors = family(CounterMetricFamily, "sixfold_node_errors", "Requests the node answered with an error, by error "
                    "class", ("node", "kind"))
    background = family(CounterMetricFamily, "sixfold_background_errors", "Errors that ended a background step "
                        "(gossip, scrub, collect): expected (a fault) or not (a bug)", ("node", "thread", "expected"))
    peers = family(CounterMetricFamily, "sixfold_gossip_peer_errors", "Gossip exchanges with a peer that failed",
                   ("node", "peer"))
    for node_id, node in nodes:
        if node is None:
            up.add_metric([node_id], 0)
            continue
        try:
            st = node.state()
            counts = node.counters()
        except SixfoldError:
            up.add_metric([node_id], 0)  # closed under the scrape: down now
            continue
        up.add_metric([node_id], 1)
        epoch.add_metric([node_id], st.epoch)
        for pg, s in enumerate(st.scls):
            scl.add_metric([node_id, str(pg)], s)
        hint.add_metric([node_id], st.hint_lsn)
        records.add_metric([node_id], st.records)
        used.add_metric([node_id], st.used_bytes)
        capacity.add_metric([node_id], st.capacity_bytes)
        room.add_metric([node_id], st.room_bytes)
        low.add_metric([node_id], 1 if st.space_low else 0)
        corrupt.add_metric([node_id], st.corrupt_found)
        repaired.add_metric([node_id], st.repaired)
        collected.add_metric([node_id], st.collected_records)
        rounds.add_metric([node_id], counts["gossip_rounds"])
        gossip.add_metric([node_id, "fetched"], counts["gossip_fetched_bytes"])
        gossip.add_metric([node_id, "served"], counts["fetch_served_bytes"])
        repair.add_metric([node_id], counts["repair_bytes"])
        for kind in sorted(counts["request_errors"]):
            errors.add_metric([node_id, kind], counts["request_errors"][kind])
        for expected, table in (("true", st.extra.get("background_expected_errors") or {}),
                                ("false", st.extra.get("background_errors") or {})):
            for thread in sorted(table):
                background.add_metric([node_id, thread, expected], table[thread])
        for peer, n in sorted((st.extra.get("gossip_peer_errors") or {}).items()):
            peers.add_metric([node_id, peer], n)
    return [up, epoch, scl, hint, records, used, capacity, room, low, corrupt, repaired, collected, rounds, gossip,
            repair, errors, background, peers]


def reader_families(st: dict | None) -> list[Metric]:
    """A reader instance's metrics, from `ReaderEndpoint.reader_status()` (None: promoted)."""
    if st is None:
        return []
    return [
        _gauge("sixfold_read_point", "The read point this reader serves at (the writer's VDL it last adopted)",
               st["read_point"]),
        _gauge("sixfold_replica_lag_lsns", "The newest writer VDL seen minus the read point served", st["lag_lsns"]),
        _gauge("sixfold_replica_lag_seconds", "Time from a commit becoming durable on the writer to it being readable "
               "here (the newest update; at least the time since the writer was last heard while it is not)",
               st["lag_ms"] / 1000.0),
        _gauge("sixfold_replica_writer_connected", "1 while the writer's read point stream is up",
               1 if st["connected"] else 0),
        _counter("sixfold_replica_updates_total", "Read point updates received from the writer", st["updates"]),
        _counter("sixfold_replica_reconnects_total", "Reconnections of the read point stream", st["reconnects"]),
    ]


# --- serving over HTTP ------------------------------------------------------------------------
class MetricsServer:
    """prometheus_client's HTTP server of one `Metrics` (see `serve`)."""

    def __init__(self, httpd, thread: threading.Thread, host: str) -> None:
        self._httpd = httpd
        self._thread = thread
        self.host = host
        self.port: int = httpd.server_port

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}/metrics"

    def close(self) -> None:
        """Stop serving and free the port."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def check_port(port) -> int:
    """A metrics port: an int in 0..65535 (0: any free port). InvalidArgument otherwise."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= PORT_MAX:
        raise InvalidArgument(f"a metrics port is an integer in 0..{PORT_MAX} (0: any free port), got {port!r}")
    return port


def serve(metrics: Metrics, port: int, host: str = METRICS_HOST) -> MetricsServer:
    """Serve `metrics` on http://host:port/ (any path; Prometheus asks /metrics) until closed.
    InvalidArgument for a port out of range, InsecureListen off loopback (plaintext HTTP),
    AddressInUse when the port is taken or may not be bound."""
    # The exposure rule and errors of every Sixfold listener; imported here, not at the top: an
    # embedded volume has metrics but no listener, and need not load gRPC.
    from engine.transport.grpc_server import AddressInUse, InsecureListen, is_loopback

    check_port(port)
    address = f"{host}:{port}"
    if not is_loopback(address):
        raise InsecureListen(f"refusing to serve metrics on {address}: they are plaintext HTTP, for loopback only "
                             f"(serve them on {METRICS_HOST})")
    try:
        httpd, thread = start_http_server(port, addr=host, registry=metrics.registry)
    except OSError as e:
        raise AddressInUse(f"cannot serve metrics on {address}: {e.strerror or e} (is the port in use? give "
                           "another --metrics-port, or 0 for any free port)") from None
    return MetricsServer(httpd, thread, host)


__all__ = ["FLUSH_BYTES_BUCKETS", "FLUSH_RECORDS_BUCKETS", "LATENCY_BUCKETS_S", "METRICS_HOST", "Metrics",
           "MetricsServer", "check_port", "node_families", "reader_families", "serve", "writer_families"]
