"""Prometheus exposition of a flexemr instance, built from the control segment.

A custom collector turns one :meth:`ControlBlock.snapshot` per scrape into
metric families, so the daemon keeps no second set of counters and the data
path never touches prometheus_client.  Units follow Prometheus conventions
(seconds, bytes, ratios in 0..1); latencies are gauges with a ``quantile``
label because the writers publish quantiles, not histograms::

    flexemr_up, flexemr_uptime_seconds, flexemr_info{flexemr_instance, mode}
    flexemr_engine_{queue_depth,inflight,connections,requests_per_second,busy_ratio,up}{engine}
    flexemr_engine_{requests,subrequests,sent_bytes,received_bytes,busy_seconds,restarts}_total{engine}
    flexemr_connection_{credits,queued,inflight,engine}{conn,server}
    flexemr_connection_{rtt,credit_latency}_seconds{conn,server,quantile}
    flexemr_connection_{subrequests,migrations,sent_bytes,received_bytes}_total{conn,server}
    flexemr_{requests,request_errors,samples,batches}_total, flexemr_requests_per_second,
    flexemr_request_latency_seconds{quantile}, flexemr_mean_batch_size, flexemr_inflight_batches
    flexemr_server_{up,reconnecting,outstanding,connections_up}{server,address}
    flexemr_server_restarts_total{server,address}, flexemr_shard_group_live_replicas{primary}
    flexemr_{failovers,reissued_subrequests,hedged_subrequests,hedges_won}_total
    flexemr_cache_{hit_ratio,capacity_bytes,used_bytes,entries,policy{policy}}
    flexemr_cache_{hits,lookups,evictions,fills}_total
    flexemr_table_{lookups,hits,ids,wire_bytes}_total{table}, flexemr_table_cache_hit_ratio{table}

``start_metrics_server(port, block)`` serves them on ``/metrics`` from a
daemon thread (the supervisor calls it when ``metrics_port`` is set).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from flexemr.control.block import ControlBlock

logger = logging.getLogger(__name__)

_QUANTILES = (("0.5", "p50"), ("0.99", "p99"))


class ControlBlockCollector(Collector):
    """Yields the metric families of one instance from a fresh snapshot per scrape."""

    def __init__(self, block: ControlBlock) -> None:
        self.block = block

    def collect(self) -> Iterator[Metric]:
        try:
            snap = self.block.snapshot()
        except Exception as e:  # a scrape must answer even when the segment is gone
            logger.warning("metrics: cannot read the control segment: %s", e)
            yield GaugeMetricFamily("flexemr_up", "1 when the control segment could be read", value=0)
            return
        yield GaugeMetricFamily("flexemr_up", "1 when the control segment could be read", value=1)
        yield GaugeMetricFamily("flexemr_uptime_seconds", "Seconds since the supervisor created the instance",
                                value=snap["uptime_s"])
        info = GaugeMetricFamily("flexemr_info", "Instance facts (value is always 1)",
                                 labels=["flexemr_instance", "mode"])
        info.add_metric([snap["instance"], str(snap.get("mode", ""))], 1)
        yield info
        yield from _engines(snap["engines"])
        yield from _connections(snap["connections"])
        yield from _ranker(snap["ranker"])
        yield from _servers(snap.get("servers", []), snap.get("shards", {}))
        yield from _cache(snap["cache"], snap["tables"])


def _gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)


def _counter(name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=labels)


def _engines(engines: list[dict[str, Any]]) -> Iterator[Metric]:
    lab = ["engine"]
    gauges = {
        "queue_depth": _gauge("flexemr_engine_queue_depth", "Subrequests waiting in the engine's ring", lab),
        "inflight": _gauge("flexemr_engine_inflight", "Subrequests posted and not yet answered", lab),
        "connections": _gauge("flexemr_engine_connections", "Connections the engine owns", lab),
        "requests_per_s": _gauge("flexemr_engine_requests_per_second", "Batches per second", lab),
        "busy_ratio": _gauge("flexemr_engine_busy_ratio", "Fraction of time the engine was busy", lab),
    }
    counters = {
        "requests_total": _counter("flexemr_engine_requests", "Batches the engine handled", lab),
        "subrequests_total": _counter("flexemr_engine_subrequests", "Subrequests the engine sent", lab),
        "bytes_sent": _counter("flexemr_engine_sent_bytes", "Bytes the engine sent", lab),
        "bytes_received": _counter("flexemr_engine_received_bytes", "Bytes the engine received", lab),
        "bytes_lent": _counter("flexemr_engine_lent_bytes",
                               "Answer payload bytes the ranker read where they landed (never copied)", lab),
        "bytes_copied": _counter("flexemr_engine_copied_bytes",
                                 "Answer payload bytes the engine copied into the completion ring", lab),
        "large_bytes_copied": _counter("flexemr_engine_large_copied_bytes",
                                       "Of the copied bytes, those in payloads big enough to have been lent", lab),
        "fills_read": _counter("flexemr_engine_read_fills", "Cache fills answered by one-sided RDMA READ", lab),
        "rows_read": _counter("flexemr_engine_read_rows", "Rows those RDMA READ fills carried", lab),
        "restarts": _counter("flexemr_engine_restarts", "Times the supervisor restarted the engine", lab),
    }
    busy = _counter("flexemr_engine_busy_seconds", "Seconds the engine spent working", lab)
    up = _gauge("flexemr_engine_up", "1 when the engine is ready", lab)
    for e in engines:
        key = [str(e["id"])]
        for field, fam in gauges.items():
            fam.add_metric(key, e[field])
        for field, fam in counters.items():
            fam.add_metric(key, e[field])
        busy.add_metric(key, e["busy_ns"] / 1e9)
        up.add_metric(key, 1 if e["state"] == "ready" else 0)
    yield from gauges.values()
    yield from counters.values()
    yield busy
    yield up


def _connections(conns: list[dict[str, Any]]) -> Iterator[Metric]:
    lab = ["conn", "server"]
    gauges = {
        "credits": _gauge("flexemr_connection_credits", "Credits the connection holds", lab),
        "queued": _gauge("flexemr_connection_queued", "Subrequests waiting for credits", lab),
        "inflight": _gauge("flexemr_connection_inflight", "Subrequests on the wire", lab),
        "engine": _gauge("flexemr_connection_engine", "Engine that owns the connection", lab),
    }
    counters = {
        "subrequests_total": _counter("flexemr_connection_subrequests", "Subrequests sent", lab),
        "migrations": _counter("flexemr_connection_migrations", "Times the connection moved engine", lab),
        "bytes_sent": _counter("flexemr_connection_sent_bytes", "Bytes sent", lab),
        "bytes_received": _counter("flexemr_connection_received_bytes", "Bytes received", lab),
    }
    rtt = _gauge("flexemr_connection_rtt_seconds", "Subrequest round-trip time", [*lab, "quantile"])
    credit = _gauge("flexemr_connection_credit_latency_seconds", "Delay of credit grants", [*lab, "quantile"])
    for c in conns:
        key = [str(c["id"]), str(c["server"])]
        for field, fam in gauges.items():
            fam.add_metric(key, c[field])
        for field, fam in counters.items():
            fam.add_metric(key, c[field])
        for q, tag in _QUANTILES:
            rtt.add_metric([*key, q], c[f"rtt_{tag}_us"] / 1e6)
            credit.add_metric([*key, q], c[f"credit_latency_{tag}_us"] / 1e6)
    yield from gauges.values()
    yield from counters.values()
    yield rtt
    yield credit


def _ranker(r: dict[str, Any]) -> Iterator[Metric]:
    for field, name, doc in (("requests_total", "flexemr_requests", "Inference requests answered"),
                             ("errors_total", "flexemr_request_errors", "Requests answered with an error"),
                             ("samples_total", "flexemr_samples", "Samples scored"),
                             ("batches_total", "flexemr_batches", "Batches run")):
        yield CounterMetricFamily(name, doc, value=r[field])
    yield GaugeMetricFamily("flexemr_requests_per_second", "Inference requests per second",
                            value=r["requests_per_s"])
    yield GaugeMetricFamily("flexemr_mean_batch_size", "Mean samples per batch", value=r["mean_batch"])
    yield GaugeMetricFamily("flexemr_inflight_batches", "Batches in flight", value=r["inflight_batches"])
    lat = GaugeMetricFamily("flexemr_request_latency_seconds", "Request latency", labels=["quantile"])
    for q, tag in _QUANTILES:
        lat.add_metric([q], r[f"latency_{tag}_ms"] / 1e3)
    yield lat
    yield from _failover(r.get("failover", {}))


def _servers(servers: list[dict[str, Any]], shards: dict[str, int]) -> Iterator[Metric]:
    lab = ["server", "address"]
    up = _gauge("flexemr_server_up", "1 when the ranker sees the embedding server up", lab)
    reconnecting = _gauge("flexemr_server_reconnecting",
                          "1 while every connection to the server is lost and being reopened", lab)
    outstanding = _gauge("flexemr_server_outstanding", "Subrequests sent to the server and not answered", lab)
    conns = _gauge("flexemr_server_connections_up", "Connections to the server that are up", lab)
    restarts = _counter("flexemr_server_restarts", "Times the supervisor restarted the (local) server", lab)
    for srv in servers:
        key = [str(srv["id"]), str(srv.get("address", ""))]
        up.add_metric(key, 1 if srv["state"] == "up" else 0)
        reconnecting.add_metric(key, 1 if srv["state"] == "reconnecting" else 0)
        outstanding.add_metric(key, srv["outstanding"])
        conns.add_metric(key, srv["connections_up"])
        restarts.add_metric(key, srv["restarts"])
    live = _gauge("flexemr_shard_group_live_replicas", "Live servers holding the shards of this primary",
                  ["primary"])
    for primary, n in shards.items():
        live.add_metric([str(primary)], n)
    yield from (up, reconnecting, outstanding, conns, restarts, live)


def _failover(f: dict[str, Any]) -> Iterator[Metric]:
    for field, name, doc in (
            ("failovers", "flexemr_failovers", "Subrequests sent to a replica because their primary was down"),
            ("reissued", "flexemr_reissued_subrequests", "Subrequests re-issued after their connection was lost"),
            ("hedges_sent", "flexemr_hedged_subrequests", "Hedged copies sent to a second replica"),
            ("hedges_won", "flexemr_hedges_won", "Hedged copies that answered first")):
        yield CounterMetricFamily(name, doc, value=f.get(field, 0))


def _cache(cache: dict[str, Any], tables: dict[str, dict[str, Any]]) -> Iterator[Metric]:
    yield GaugeMetricFamily("flexemr_cache_hit_ratio", "Embedding cache hits / lookups", value=cache["hit_rate"])
    yield GaugeMetricFamily("flexemr_cache_capacity_bytes", "Cache capacity", value=cache["capacity_bytes"])
    yield GaugeMetricFamily("flexemr_cache_used_bytes", "Cache bytes in use", value=cache["used_bytes"])
    yield GaugeMetricFamily("flexemr_cache_entries", "Rows in the cache", value=cache["entries"])
    pol = GaugeMetricFamily("flexemr_cache_policy", "Active cache policy (value is always 1)", labels=["policy"])
    pol.add_metric([cache["policy"]], 1)
    yield pol
    for field, name, doc in (("hits", "flexemr_cache_hits", "Cache hits"),
                             ("lookups", "flexemr_cache_lookups", "Cache lookups"),
                             ("evictions", "flexemr_cache_evictions", "Rows evicted"),
                             ("fills", "flexemr_cache_fills", "Rows inserted")):
        yield CounterMetricFamily(name, doc, value=cache[field])
    lab = ["table"]
    fams = {
        "lookups": _counter("flexemr_table_lookups", "Ids looked up in the table", lab),
        "hits": _counter("flexemr_table_hits", "Ids found in the cache", lab),
        "ids_total": _counter("flexemr_table_ids", "Ids sent to embedding servers", lab),
        "bytes_wire": _counter("flexemr_table_wire_bytes", "Bytes on the wire for the table", lab),
        "hit_rate": _gauge("flexemr_table_cache_hit_ratio", "Cache hit ratio of the table", lab),
    }
    for t, d in tables.items():
        for field, fam in fams.items():
            fam.add_metric([t], d[field])
    yield from fams.values()


def make_registry(block: ControlBlock) -> CollectorRegistry:
    """A registry holding only this instance's collector (no process/platform defaults)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ControlBlockCollector(block))
    return registry


def render_metrics(block: ControlBlock) -> str:
    """The Prometheus text exposition of ``block`` right now."""
    return generate_latest(make_registry(block)).decode()


@dataclass
class MetricsServer:
    """A running ``/metrics`` endpoint; :meth:`stop` shuts it down."""

    server: WSGIServer
    thread: threading.Thread
    addr: str

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    @property
    def url(self) -> str:
        return f"http://{self.addr}:{self.port}/metrics"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def start_metrics_server(port: int, block: ControlBlock, addr: str = "127.0.0.1") -> MetricsServer:
    """Serve ``block``'s metrics on ``http://addr:port/metrics`` (port 0: pick a free one)."""
    server, thread = start_http_server(port, addr=addr, registry=make_registry(block))
    logger.info("metrics on http://%s:%d/metrics", addr, server.server_port)
    return MetricsServer(server, thread, addr)
