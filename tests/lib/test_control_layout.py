"""The control segment's byte layout is a contract between builds: emrctl of one install reads a
segment created by another.  These numbers were taken from the layout before block.py was split
into layout/seqlock/slots/snapshot; a change to any of them needs a VERSION bump."""

from __future__ import annotations

from flexemr.control import layout


def test_section_offsets_are_pinned():
    sections, total = layout.plan_layout(3, 5, 3, 64 << 10)
    assert total == 1191936
    assert sections == {
        "engine_proc": (4096, 3, 128), "engine_stats": (4480, 3, 128), "conn_static": (4864, 5, 8),
        "conn_ctl": (4928, 5, 64), "conn_stats": (5248, 15, 128), "inference_proc": (7168, 1, 64),
        "ranker": (7232, 1, 128), "cache": (7360, 1, 128), "table_names": (7488, 3, 64),
        "tables": (7680, 3, 64), "runtime": (7872, 1, 104), "topology": (8000, 1, 65536),
        "mailbox": (73728, 1, 1118208),
    }


def test_header_and_row_formats_are_pinned():
    assert (layout.MAGIC, layout.VERSION, layout.HEADER_BYTES) == (b"FXCTL\x00\x00\x01", 1, 4096)
    assert layout.HEADER.format == "<8sIIQIIIIqQQ" and layout.HEADER.size == 64
    assert layout.ENGINE_STATS.names == ("seq", "active_connections", "queue_depth", "inflight",
                                         "subrequests_total", "requests_total", "bytes_sent", "bytes_received",
                                         "busy_ns", "heartbeat_ns", "epoch_seen")
    assert all(dt.itemsize % layout.ROW_ALIGN == 0 for name, dt in layout.section_dtypes().items()
               if name not in ("conn_static", "table_names"))
