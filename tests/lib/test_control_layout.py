"""The control segment's byte layout is a contract between builds: emrctl of one install reads a
segment created by another.  Version 1's numbers were taken from the layout before block.py was
split into layout/seqlock/slots/snapshot; version 2 added the embedding-server sections and the
failover counters.  A change to any of these numbers needs a VERSION bump."""

from __future__ import annotations

from flexemr.control import layout


def test_section_offsets_are_pinned():
    sections, total = layout.plan_layout(3, 5, 3, 64 << 10, 4)
    assert total == 1196032
    assert sections == {
        "engine_proc": (4096, 3, 128), "engine_stats": (4480, 3, 128), "conn_static": (4864, 5, 8),
        "conn_ctl": (4928, 5, 64), "conn_stats": (5248, 15, 128), "server_proc": (7168, 4, 64),
        "server_stats": (7424, 4, 64), "inference_proc": (7680, 1, 64), "ranker": (7744, 1, 128),
        "cache": (7872, 1, 128), "table_names": (8000, 3, 64), "tables": (8192, 3, 64),
        "runtime": (8384, 1, 104), "topology": (8512, 1, 65536), "mailbox": (77824, 1, 1118208),
    }


def test_header_and_row_formats_are_pinned():
    assert (layout.MAGIC, layout.VERSION, layout.HEADER_BYTES) == (b"FXCTL\x00\x00\x01", 2, 4096)
    assert layout.HEADER.format == "<8sIIQIIIIqQQI4x" and layout.HEADER.size == 72
    # magic and version never move: any build can read them and refuse a segment of another layout
    assert layout.HEADER.unpack(layout.HEADER.pack(b"m" * 8, 7, *[0] * 10))[:2] == (b"m" * 8, 7)
    assert layout.SECTION_TABLE_OFF >= layout.HEADER.size
    assert layout.SECTION_TABLE_OFF + len(layout.SECTIONS) * layout.SECTION_ENTRY.size <= layout.HEADER_BYTES
    assert layout.ENGINE_STATS.names == ("seq", "active_connections", "queue_depth", "inflight",
                                         "subrequests_total", "requests_total", "bytes_sent", "bytes_received",
                                         "busy_ns", "heartbeat_ns", "epoch_seen", "bytes_lent", "bytes_copied",
                                         "large_bytes_copied", "fills_read", "rows_read")
    # The payload and READ counters filled the row's padding: same size, every earlier field where it was.
    assert layout.ENGINE_STATS.itemsize == 128
    assert [layout.ENGINE_STATS.fields[n][1] for n in layout.ENGINE_STATS.names] == [8 * i for i in range(16)]
    assert layout.SERVER_PROC.names == ("seq", "pid", "state", "restarts", "started_ns")
    assert layout.SERVER_STATS.names == ("seq", "state", "outstanding", "connections_up", "changed_ns")
    assert layout.RANKER.names[-4:] == ("reissued_total", "hedges_sent", "hedges_won", "failovers_total")
    assert all(dt.itemsize % layout.ROW_ALIGN == 0 for name, dt in layout.section_dtypes().items()
               if name not in ("conn_static", "table_names"))
