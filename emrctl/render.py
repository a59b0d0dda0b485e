"""Human rendering of a status snapshot: a header line, engine, connection and embedding-server tables,
a shard-replica line, a cache line.

Every line fits WIDTH (100) columns: long fields (server addresses) are cut
with an ellipsis and, as a last guard, lines are clipped.  Only formatting
lives here; ``--json`` prints the snapshot itself.
"""

from __future__ import annotations

from typing import Any

WIDTH = 100


def human_bytes(n: float) -> str:
    """``64.0 MiB``: binary units, as ``cache resize`` accepts them."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover


def human_duration(seconds: float) -> str:
    """``3d04h``, ``1h02m``, ``5m03s``, ``12.3s``."""
    s = max(0.0, float(seconds))
    if s < 60:
        return f"{s:.1f}s"
    m, sec = divmod(int(s), 60)
    if m < 60:
        return f"{m}m{sec:02d}s"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


def _rate(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}"


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _count(n: int) -> str:
    """``987``, ``12.3k``, ``4.5M``, ``6.7G``: counters that stay narrow."""
    if n < 10_000:
        return str(n)
    for div, suffix in ((10**9, "G"), (10**6, "M"), (10**3, "k")):
        if n >= div:
            return f"{n / div:.1f}{suffix}"
    return str(n)  # pragma: no cover


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def _table(headers: list[tuple[str, int]], rows: list[list[str]]) -> list[str]:
    """Left-aligned columns of fixed widths separated by two spaces."""
    fmt = "  ".join(f"{{:<{w}}}" for _, w in headers)
    out = [fmt.format(*(h for h, _ in headers)).rstrip()]
    for r in rows:
        out.append(fmt.format(*(_cut(v, w) for v, (_, w) in zip(r, headers))).rstrip())
    return out


def header_line(snap: dict[str, Any]) -> str:
    r = snap["ranker"]
    return (f"flexemr {snap['instance']!r}  up {human_duration(snap['uptime_s'])}  "
            f"{_rate(r['requests_per_s'])} req/s  p50 {r['latency_p50_ms']:.2f} ms  "
            f"p99 {r['latency_p99_ms']:.2f} ms  batch {r['mean_batch']:.1f}  errors {r['errors_total']}")


def engine_lines(snap: dict[str, Any]) -> list[str]:
    headers = [("ENGINE", 6), ("PID", 7), ("CPU", 3), ("STATE", 10), ("CONNS", 5), ("QUEUE", 5),
               ("INFLIGHT", 8), ("REQ/S", 7), ("SUBREQ/S", 8), ("BUSY", 4), ("RESTARTS", 8), ("HB AGE", 6)]
    rows = []
    for e in snap["engines"]:
        hb = e.get("heartbeat_age_s")
        rows.append([str(e["id"]), str(e["pid"] or "-"), "-" if e["cpu"] < 0 else str(e["cpu"]), e["state"],
                     str(e["connections"]), str(e["queue_depth"]), str(e["inflight"]),
                     _rate(e.get("requests_per_s")), _rate(e.get("subrequests_per_s")),
                     _pct(e.get("busy_ratio") or 0.0), str(e["restarts"]),
                     "-" if hb is None else f"{hb:.1f}s"])
    return _table(headers, rows) + payload_lines(snap)


def payload_lines(snap: dict[str, Any]) -> list[str]:
    """One line on the engines' answer payloads: how much the ranker read where it landed (zero-copy),
    and the cache fills answered by RDMA READ; nothing before the first answer."""
    engines = snap["engines"]
    lent = sum(e.get("bytes_lent", 0) for e in engines)
    copied = sum(e.get("bytes_copied", 0) for e in engines)
    fills, rows = sum(e.get("fills_read", 0) for e in engines), sum(e.get("rows_read", 0) for e in engines)
    if not lent + copied and not fills:
        return []
    line = (f"answers: {_pct(lent / (lent + copied)) if lent + copied else '-'} read in place "
            f"({human_bytes(lent)} lent, {human_bytes(copied)} copied)")
    if fills:
        line += f"; RDMA READ fills {_count(fills)} ({_count(rows)} rows)"
    return [line]


def connection_lines(snap: dict[str, Any]) -> list[str]:
    headers = [("CONN", 4), ("SERVER", 20), ("ENGINE", 6), ("QUEUED", 6), ("INFLIGHT", 8), ("CREDITS", 7),
               ("RTT P50/P99 us", 15), ("CREDIT P99 us", 13), ("MIGR", 4)]
    rows = []
    for c in snap["connections"]:
        server = f"{c['server']} {c['address']}".rstrip() if c.get("address") else str(c["server"])
        rows.append([str(c["id"]), server, str(c["engine"]), str(c["queued"]), str(c["inflight"]),
                     str(c["credits"]), f"{c['rtt_p50_us']:.0f}/{c['rtt_p99_us']:.0f}",
                     f"{c['credit_latency_p99_us']:.0f}", str(c["migrations"])])
    return _table(headers, rows)


def server_lines(snap: dict[str, Any]) -> list[str]:
    """The embedding servers: the ranker's view (STATE) and, for local children, the process (PROC)."""
    headers = [("SERVER", 6), ("ADDRESS", 23), ("STATE", 12), ("PROC", 10), ("PID", 7), ("RESTARTS", 8),
               ("OUTSTANDING", 11), ("CONNS", 5)]
    rows = []
    for s in snap.get("servers", []):
        rows.append([str(s["id"]), s.get("address") or "-", s["state"], s.get("process") or "remote",
                     str(s["pid"] or "-"), str(s["restarts"]), str(s["outstanding"]), str(s["connections_up"])])
    return _table(headers, rows)


def shards_line(snap: dict[str, Any]) -> str:
    """``shards: 3 groups, all with ≥2 live replicas``, or the groups that have fewer."""
    shards = snap.get("shards", {})
    want = max(1, int(snap.get("replicas", 1)))
    noun = "replica" if want == 1 else "replicas"
    short = [(p, n) for p, n in shards.items() if n < want]
    if not short:
        return f"shards: {len(shards)} groups, all with ≥{want} live {noun}"
    parts = [f"group {p} {n}/{want} live{' (unavailable)' if n == 0 else ''}" for p, n in short]
    return f"shards: {len(shards)} groups, {len(short)} short of {want} live {noun}: " + ", ".join(parts)


def failover_line(snap: dict[str, Any]) -> str:
    f = snap["ranker"].get("failover", {})
    return (f"failover: {_count(f.get('failovers', 0))} subrequests to replicas, "
            f"{_count(f.get('reissued', 0))} re-issued, hedges {_count(f.get('hedges_sent', 0))} sent / "
            f"{_count(f.get('hedges_won', 0))} won")


def cache_line(snap: dict[str, Any]) -> str:
    c = snap["cache"]
    return (f"cache {c['policy']}  {human_bytes(c['used_bytes'])} / {human_bytes(c['capacity_bytes'])}  "
            f"hit rate {_pct(c['hit_rate'])} of {_count(c['lookups'])} lookups  entries {_count(c['entries'])}  "
            f"evictions {_count(c['evictions'])}")


def cache_target_line(snap: dict[str, Any]) -> str | None:
    """What emrctl asked for and the inference process has not applied yet (None when applied)."""
    c = snap["cache"]
    policy, cap = c.get("target_policy", c["policy"]), c.get("target_capacity_bytes", c["capacity_bytes"])
    if policy == c["policy"] and (cap == c["capacity_bytes"] or policy == "off"):
        return None
    return f"cache target: {policy} {human_bytes(cap)} (applied by the inference process between batches)"


def tables_line(snap: dict[str, Any]) -> str:
    parts = [f"{t} {_pct(d['hit_rate'])}" for t, d in snap.get("tables", {}).items()]
    return "table hit rates: " + ("  ".join(parts) if parts else "-")


def model_line(snap: dict[str, Any]) -> str:
    """``model: version 2 active (previous 1); loading 3 (delta): 1/2 servers live``."""
    m = snap.get("model") or {}
    text = f"model: version {m.get('active', 1)} active"
    if m.get("previous") is not None:
        text += f" (previous {m['previous']})"
    job = m.get("loading")
    if job:
        text += (f"; loading {job['version']} ({'delta' if job.get('delta') else 'full'}, {job.get('state')}): "
                 f"{job.get('servers_live', 0)}/{job.get('servers_total', 0)} servers live")
    elif m.get("last_error"):
        text += f"; last push failed: {m['last_error']}"
    elif m.get("history"):
        h = m["history"][-1]
        text += f"; live after {h['live_after_s']:.2f} s, switched after {h['switched_after_s']:.2f} s"
    return text


def render_status(snap: dict[str, Any], width: int = WIDTH) -> str:
    """The whole ``emrctl status`` screen, every line at most ``width`` columns."""
    lines = [header_line(snap), ""]
    lines += engine_lines(snap)
    lines.append("")
    lines.append(f"connections: owner epoch {snap.get('epoch', 0)}, "
                 f"rebalance {'on' if snap.get('rebalance') else 'off'}")
    lines += connection_lines(snap)
    lines.append("")
    if snap.get("servers"):
        lines.append("embedding servers")
        lines += server_lines(snap)
        lines.append(shards_line(snap))
        lines.append(failover_line(snap))
        lines.append("")
    lines.append(cache_line(snap))
    target = cache_target_line(snap)
    if target:
        lines.append(target)
    lines.append(tables_line(snap))
    lines.append(model_line(snap))
    return "\n".join(_cut(line, width) for line in lines)


# ---------------------------------------------------------------------- embedding host


def embedding_header_line(snap: dict[str, Any]) -> str:
    servers = snap.get("servers", [])
    rankers = {r["token"] for s in servers for r in s.get("rankers", [])}
    return (f"flexemr {snap['instance']!r} embedding host  up {human_duration(snap['uptime_s'])}  "
            f"{len(servers)} server{'s' if len(servers) != 1 else ''}  {len(rankers)} "
            f"ranker{'s' if len(rankers) != 1 else ''}  supervisor pid {snap.get('supervisor_pid', '-')}")


def embedding_server_line(s: dict[str, Any]) -> str:
    if s.get("state") == "starting":
        return f"server slot {s['slot']}: starting (not published yet)"
    age = s.get("updated_age_s", 0.0)
    return (f"server {s.get('index', s['slot'])} on {s.get('address', '-')}  pid {s.get('pid', '-')}  {s['state']}"
            f"{'' if s['state'] == 'serving' else f' ({age:.0f}s old)'}  lookups {_count(s.get('lookups', 0))}  "
            f"errors {_count(s.get('errors', 0))}  in {human_bytes(s.get('bytes_in', 0))}  "
            f"out {human_bytes(s.get('bytes_out', 0))}")


def _cut_middle(text: str, width: int, tail: int = 15) -> str:
    """Keep both ends: a ranker token (``<instance>.<pid>.<run>``) ends in what tells two runs apart."""
    if len(text) <= width:
        return text
    tail = min(tail, width - 2)
    return text[:width - 1 - tail] + "…" + text[len(text) - tail:]


def ranker_lines(s: dict[str, Any], now_unix: float) -> list[str]:
    """One row per ranker this server serves: its connections/channels, traffic and credits outstanding."""
    headers = [("RANKER", 26), ("ADDRESS", 15), ("CN/CH", 5), ("UP", 5), ("LOOKUP", 6), ("IN", 9), ("OUT", 9),
               ("CRED", 5), ("SEEN", 4)]
    rows = []
    for r in s.get("rankers", []):
        rows.append([_cut_middle(r["token"], 26), r["address"], f"{r['connections']}/{r['channels']}",
                     human_duration(now_unix - r["since_unix"]), _count(r["lookups"]), human_bytes(r["bytes_in"]),
                     human_bytes(r["bytes_out"]), _count(r["credits"]), f"{r['last_seen_s']:.0f}s"])
    if not rows:
        return ["  (no rankers connected)"]
    return _table(headers, rows)


def render_embedding_status(snap: dict[str, Any], width: int = WIDTH) -> str:
    """``emrctl status`` on an embedding host: its servers and, under each, the rankers it serves."""
    import time

    now = time.time()
    lines = [embedding_header_line(snap)]
    for s in snap.get("servers", []):
        lines.append("")
        lines.append(embedding_server_line(s))
        if s.get("state") != "starting":
            lines += ranker_lines(s, now)
    return "\n".join(_cut(line, width) for line in lines)
