"""Prometheus exposition built from the control segment."""

from __future__ import annotations

import time
import urllib.request

import pytest

from flexemr.control.block import CacheMode, ControlBlock
from flexemr.metrics import render_metrics, start_metrics_server


@pytest.fixture
def block(instance):
    b = ControlBlock.create(instance, 2, 2, ["t0", "t1"], {"servers": [{"name": "s0", "address": "a:1"}]},
                            cache_policy="fixed")
    b.engines[0].update(queue_depth=5, requests_total=10, busy_ns=2_000_000_000, bytes_lent=4096,
                        bytes_copied=512, fills_read=3, rows_read=90)
    b.engines[0].set_process(pid=11, cpu=0, state="ready")
    b.engines[1].conn(1).update(credits=3, rtt_p99_us=1500.0, updated_ns=time.monotonic_ns())
    b.ranker.update(requests_total=42, latency_p50_ms=2.0, latency_p99_ms=8.0)
    b.cache.update(policy=int(CacheMode.FIXED), capacity_bytes=1 << 20, hits=1, lookups=4)
    b.add_tables(lookups=[100, 7], hits=[25, 0], bytes_wire=[4096, 512], ids_total=[75, 7])
    yield b
    b.close()
    b.unlink()


def test_text_exposition_contains_the_metrics(block):
    text = render_metrics(block)
    for line in [
        "flexemr_up 1.0",
        'flexemr_engine_queue_depth{engine="0"} 5.0',
        'flexemr_engine_requests_total{engine="0"} 10.0',
        'flexemr_engine_busy_seconds_total{engine="0"} 2.0',
        'flexemr_engine_up{engine="0"} 1.0',
        'flexemr_engine_lent_bytes_total{engine="0"} 4096.0',
        'flexemr_engine_copied_bytes_total{engine="0"} 512.0',
        'flexemr_engine_read_fills_total{engine="0"} 3.0',
        'flexemr_engine_read_rows_total{engine="0"} 90.0',
        'flexemr_connection_credits{conn="1",server="0"} 3.0',
        'flexemr_connection_rtt_seconds{conn="1",quantile="0.99",server="0"} 0.0015',
        "flexemr_requests_total 42.0",
        'flexemr_request_latency_seconds{quantile="0.99"} 0.008',
        "flexemr_cache_hit_ratio 0.25",
        'flexemr_cache_policy{policy="fixed"} 1.0',
        'flexemr_table_lookups_total{table="t0"} 100.0',
        'flexemr_table_wire_bytes_total{table="t1"} 512.0',
        'flexemr_table_cache_hit_ratio{table="t0"} 0.25',
    ]:
        assert line in text, f"{line!r} missing from:\n{text}"
    assert "# TYPE flexemr_requests_total counter" in text


def test_closed_block_reports_down(block):
    other = ControlBlock.attach(block.instance)
    other.close()
    assert "flexemr_up 0.0" in render_metrics(other)


def test_http_server_serves_and_stops(block):
    server = start_metrics_server(0, block)
    try:
        body = urllib.request.urlopen(server.url, timeout=5).read().decode()
        assert 'flexemr_engine_queue_depth{engine="0"} 5.0' in body
    finally:
        server.stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(server.url, timeout=1)
