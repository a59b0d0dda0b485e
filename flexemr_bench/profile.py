"""Where the CPU goes, by role and by kind of work: ``perf`` (and ``py-spy``) under the ranker benchmark's load.

    python -m flexemr_bench.profile --out DIR [--rows-cap 250000] [--seconds 8] [--system flexemr|monolithic]
                                    [--kind lookup|predict|both] [--model DIR] [--no-py-spy] [--no-limit]

It starts the daemon and the closed-loop clients exactly as
``flexemr_bench.ranker`` does (its ``Daemon``, ``SYSTEMS``, ``bench_requests``
and ``measure``: 4 clients, batches of 2048, 20 Zipf ids per bag), and while
the load runs it records every process of every role (embedding servers,
engines, the inference process, the supervisor, the clients) with one
``perf record -e cpu-clock -F 250 -g -p PIDS`` (attached before the load
starts, to the daemon's processes and to this one, so the clients it forks
are inherited), keeping the samples of a ``--seconds`` window in the middle
of the load.  The in-process limit (``ranker``'s ``kernel-4/t1``: as many
caller threads as clients, one torch thread each) runs afterwards in a child
process recorded the same way, from the moment it is warm.  With py-spy
present, one ``py-spy record --gil --nonblocking --subprocesses`` over the
same window gives the Python share by function (the top 10 GIL holders per
role); it samples on the same cores (``--no-py-spy`` to leave it out).

Each sample is put in one category by its leaf frame (symbol and DSO) and,
for the kernel and the gather, by the frames above it; the first rule that
matches wins:

    kernel_page_faults  a kernel frame under a page fault or an unmap: asm_exc_page_fault,
                        exc_page_fault, handle_mm_fault, do_anonymous_page, __x64_sys_munmap,
                        __x64_sys_madvise, unmap_region, zap_page_range, tlb_finish_mmu
    kernel_sched        a kernel frame under scheduling, futexes or wake-ups: schedule,
                        __schedule, finish_task_switch, futex_*, __x64_sys_futex, try_to_wake_up,
                        wake_up_q, ep_poll, do_select, do_sys_poll, do_nanosleep, sched_yield,
                        the reschedule IPI, a socket waking its reader (sock_def_readable);
                        sem_post/sem_wait doorbells end here too
    kernel_socket       a kernel frame under a socket send or receive: unix_stream_*msg,
                        unix_stream_read_generic, tcp_sendmsg, tcp_recvmsg, sock_*msg,
                        skb_copy_datagram_*, __sys_sendto/recvfrom/sendmsg/recvmsg
    kernel_other        any other kernel frame (other syscalls, interrupts, timers)
    gather              the pooling kernel: a leaf in JIT'd code (perf names its DSO
                        /tmp/perf-PID.map or [unknown]: fbgemm emits the embedding_bag kernel at
                        run time) under an ``embedding_bag``/fbgemm frame, or a leaf that is a
                        pooling kernel itself (EmbeddingSpMDM*, index_select_add, embedding_bag_cpu_max);
                        torch's dispatcher frames named after embedding_bag are numpy_torch
    memcpy              libc's memmove/memcpy/memset family (user space copies and fills)
    python              the interpreter: libpython, the python binary, the stdlib's C modules
                        (lib-dynload, *.cpython-*.so outside numpy/torch)
    numpy_torch         numpy, torch (libtorch*, libc10, libgomp), BLAS, fbgemm outside the gather:
                        for predict() this holds the NN's forward (its GEMMs run in libtorch_cpu)
    other               everything else (libc's malloc/free, posix_ipc, unresolved frames)

Each role's share of the samples in a category is multiplied by that role's
CPU ms per 1,000 samples, measured over the same load by ``ranker.measure``
(psutil, user+system of every process of the role): the figures are ms of
CPU per 1,000 samples, as in docs/PERFORMANCE.md "Where the time goes".
Writes ``DIR/profile.json``, ``DIR/profile.png`` (stacked bars) and the
``perf.data`` files; prints a markdown table per kind.  Without perf (missing,
or not permitted) it says so and still writes the CPU per role and the py-spy
part.  Runs as root on the developer machines; keep it short (one daemon, a
few seconds per kind).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

CATEGORIES: tuple[tuple[str, str], ...] = (
    ("gather", "gather: embedding_bag kernel"),
    ("python", "Python interpreter"),
    ("memcpy", "memcpy/memset in user space"),
    ("numpy_torch", "numpy / torch outside the gather (the NN's matmuls too)"),
    ("kernel_socket", "kernel: socket copies"),
    ("kernel_sched", "kernel: scheduling, futex, wake-ups"),
    ("kernel_page_faults", "kernel: page faults and unmaps"),
    ("kernel_other", "kernel: other syscalls"),
    ("other", "other"),
)
CATEGORY_KEYS = tuple(k for k, _ in CATEGORIES)
LIMIT_ROLE = "in-process limit"
CLIENT_ROLE = "clients"
KINDS = ("lookup", "predict")
PERF = "/usr/bin/perf"
LEAD_IN_S = 1.0    # load before recording starts (clients connect, start_at) and after it stops
FREQ_HZ = 250

_PAGE_FAULT = frozenset({"asm_exc_page_fault", "exc_page_fault", "handle_mm_fault", "__handle_mm_fault",
                         "do_anonymous_page", "__x64_sys_munmap", "__x64_sys_madvise", "unmap_region",
                         "zap_page_range", "zap_page_range_single", "tlb_finish_mmu", "do_user_addr_fault"})
_SCHED = frozenset({"schedule", "__schedule", "finish_task_switch", "finish_task_switch.isra.0", "__x64_sys_futex",
                    "do_futex", "try_to_wake_up", "wake_up_q", "ep_poll", "do_epoll_wait", "do_select",
                    "do_sys_poll", "do_nanosleep", "__x64_sys_sched_yield", "do_sched_yield",
                    "asm_sysvec_reschedule_ipi", "schedule_hrtimeout_range", "schedule_timeout",
                    "__wake_up_common", "__wake_up_common_lock", "__wake_up_sync_key", "wake_up_process",
                    "sock_def_readable", "unix_write_space"})
_SCHED_PREFIX = ("futex_", "__futex", "schedule_")
_SOCKET = frozenset({"unix_stream_sendmsg", "unix_stream_recvmsg", "unix_stream_read_generic", "tcp_sendmsg",
                     "tcp_recvmsg", "sock_sendmsg", "sock_recvmsg", "sock_read_iter", "sock_write_iter",
                     "__sys_sendto", "__sys_recvfrom", "__sys_sendmsg", "__sys_recvmsg", "___sys_sendmsg",
                     "___sys_recvmsg", "skb_copy_datagram_iter", "__skb_datagram_iter", "skb_copy_datagram_from_iter",
                     "tcp_sendmsg_locked", "tcp_recvmsg_locked", "unix_dgram_sendmsg", "unix_dgram_recvmsg"})
_GATHER_FRAME = re.compile(r"embedding_bag|EmbeddingSpMDM|fbgemm", re.IGNORECASE)
# The kernels themselves, not the dispatcher frames named after them (at::_ops::embedding_bag::call).
_GATHER_LEAF = re.compile(r"EmbeddingSpMDM|index_select_add|index_select_scale_add|embedding_bag_cpu_max")
_MEMCPY = re.compile(r"^(__)?(memmove|memcpy|memset|mempcpy)|^__memmove_|^__memcpy_|^__memset_")
_NUMPY_TORCH = re.compile(r"/numpy/|numpy\.libs|/torch/|libtorch|libc10|libgomp|libiomp|openblas|libmkl|fbgemm|"
                          r"libsleef")
_PYTHON = re.compile(r"libpython|/bin/python|lib-dynload/|\.cpython-\d+")


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame of a sample's call chain: symbol (``[unknown]`` when perf has none) and DSO."""

    sym: str
    dso: str

    @property
    def kernel(self) -> bool:
        return self.dso.startswith("[kernel") or self.dso.endswith(".ko")

    @property
    def jit(self) -> bool:
        return self.dso.startswith("/tmp/perf-") or self.dso in ("[unknown]", "[JIT]") or self.dso.startswith("//anon")


@dataclass(slots=True)
class Sample:
    """One ``perf script`` sample: process, thread, time (s, perf's clock), weight (ns of CPU with cpu-clock)
    and frames, leaf first."""

    pid: int
    tid: int
    time: float
    period: int
    frames: list[Frame] = field(default_factory=list)


_HEADER = re.compile(r"(\d+)/(\d+)\s+(?:(\d+\.\d+):\s+)?(\d+)\s*(?:\S+:\s*)?$")
_FRAME = re.compile(r"^\s+[0-9a-f]+\s+(.*?)\s+\(([^()]*)\)\s*$")
_OFFSET = re.compile(r"\+0x[0-9a-f]+$")


def parse_perf_script(lines: Iterable[str]) -> Iterator[Sample]:
    """Samples of ``perf script -F pid,tid,time,period,ip,sym,dso`` output (a comm or event column is tolerated)."""
    cur: Sample | None = None
    for line in lines:
        line = line.rstrip("\n")
        if not line.strip():
            if cur is not None:
                yield cur
            cur = None
            continue
        if line[0].isspace():
            m = _FRAME.match(line)
            if cur is not None and m:
                cur.frames.append(Frame(_OFFSET.sub("", m.group(1)), m.group(2)))
            continue
        if cur is not None:
            yield cur
        m = _HEADER.search(line)
        cur = Sample(int(m.group(1)), int(m.group(2)), float(m.group(3) or 0.0), int(m.group(4))) if m else None
    if cur is not None:
        yield cur


def classify(frames: Sequence[Frame]) -> str:
    """The category of a sample whose call chain is ``frames`` (leaf first): the rules of the module docstring."""
    if not frames:
        return "other"
    leaf = frames[0]
    if leaf.kernel:
        kernel = [f.sym for f in frames if f.kernel]
        if any(s in _PAGE_FAULT for s in kernel):
            return "kernel_page_faults"
        if any(s in _SCHED or s.startswith(_SCHED_PREFIX) for s in kernel):
            return "kernel_sched"
        if any(s in _SOCKET for s in kernel):
            return "kernel_socket"
        return "kernel_other"
    if _GATHER_LEAF.search(leaf.sym) or (leaf.jit and any(_GATHER_FRAME.search(f.sym) for f in frames[1:])):
        return "gather"
    if _MEMCPY.search(leaf.sym):
        return "memcpy"
    if _NUMPY_TORCH.search(leaf.dso):
        return "numpy_torch"
    if _PYTHON.search(leaf.dso) or leaf.sym.startswith(("_Py", "Py")):
        return "python"
    return "other"


def weights_by_pid(samples: Iterable[Sample], start: float = float("-inf"),
                   end: float = float("inf")) -> dict[int, Counter[str]]:
    """pid -> category -> summed weight (ns of CPU with the cpu-clock event) of the samples taken in [start, end]."""
    out: dict[int, Counter[str]] = defaultdict(Counter)
    for s in samples:
        if start <= s.time <= end:
            out[s.pid][classify(s.frames)] += s.period
    return dict(out)


def breakdown(weights: dict[int, Counter[str]], roles: dict[int, str],
              cpu_ms_per_1k: dict[str, float]) -> dict[str, dict]:
    """Per role: its samples' shares per category, and those shares times its CPU ms per 1,000 samples."""
    per_role: dict[str, Counter[str]] = defaultdict(Counter)
    for pid, w in weights.items():
        if pid in roles:
            per_role[roles[pid]].update(w)
    out: dict[str, dict] = {}
    for role, cpu in cpu_ms_per_1k.items():
        w = per_role.get(role, Counter())
        total = sum(w.values())
        shares = {k: (w[k] / total if total else 0.0) for k in CATEGORY_KEYS}
        out[role] = {"cpu_ms_per_1k_samples": round(cpu, 3), "perf_cpu_s": round(total / 1e9, 3),
                     "shares": {k: round(v, 4) for k, v in shares.items()},
                     "ms_per_1k_samples": {k: round(v * cpu, 3) for k, v in shares.items()}}
    return out


# --- py-spy ---------------------------------------------------------------------------------------

_PROCESS = re.compile(r"^process (\d+):")
_LINE_NO = re.compile(r":\d+\)$")


def gil_holders(raw: Iterable[str], roles: dict[int, str], top: int = 10) -> dict[str, list[dict]]:
    """Top ``top`` GIL-holding functions per role from ``py-spy record --gil --subprocesses -f raw`` lines.

    Each line is ``frame;frame;...;leaf count``, the first frames naming the
    process chain (``process PID:"cmdline"``, the process itself last); a
    function is its leaf frame without the line number.
    """
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for line in raw:
        stack, _, n = line.rstrip("\n").rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = stack.split(";")
        pids = [int(m.group(1)) for f in frames if (m := _PROCESS.match(f))]
        code = [f for f in frames if not _PROCESS.match(f)]
        if not pids or not code or pids[-1] not in roles:
            continue
        counts[roles[pids[-1]]][_LINE_NO.sub(")", code[-1])] += int(n)
    out = {}
    for role, c in counts.items():
        total = sum(c.values())
        out[role] = [{"function": f, "samples": k, "share": round(k / total, 4)} for f, k in c.most_common(top)]
    return out


# --- recording ------------------------------------------------------------------------------------

def perf_problem() -> str | None:
    """None if ``perf record`` works here, else why not (missing, or not permitted)."""
    if not os.access(PERF, os.X_OK):
        return f"{PERF} is missing"
    probe = Path(f"/tmp/flexemr-profile-probe-{os.getpid()}.data")
    try:
        r = subprocess.run([PERF, "record", "-q", "-e", "cpu-clock", "-o", str(probe), "--", "true"],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"perf record failed: {e}"
    finally:
        probe.unlink(missing_ok=True)
    if r.returncode:
        return "perf record is not permitted here: " + (r.stderr.strip().splitlines() or ["?"])[-1]
    return None


class PerfSession:
    """One ``perf record`` over ``pids`` and, by inheritance, every process they fork from now on.

    Attaching to a few processes with torch mapped takes seconds on a loaded
    machine, so perf is started before the load and asked through its
    control fifo (``--control``, command ``ping``) whether it is recording
    yet; samples carry CLOCK_MONOTONIC times (``-k``), and the window the
    caller marks with ``time.monotonic()`` selects them afterwards.  Events
    stay enabled throughout: perf tracks a forked child's memory map only
    if it sees the fork while enabled.  Build-ids are skipped (``-B -N``):
    collecting them at exit takes longer than the recording.
    """

    def __init__(self, path: Path, pids: Sequence[int]) -> None:
        self.path = path
        self._dir = Path(tempfile.mkdtemp(prefix="flexemr-perf-"))
        ctl, ack = self._dir / "ctl", self._dir / "ack"
        os.mkfifo(ctl)
        os.mkfifo(ack)
        # O_RDWR: opening a fifo this way never blocks on the other end (perf opens them the same way).
        self._ctl = os.open(ctl, os.O_RDWR)
        self._ack = os.open(ack, os.O_RDWR)
        self.proc = subprocess.Popen(
            [PERF, "record", "-q", "-e", "cpu-clock", "-F", str(FREQ_HZ), "-g", "-B", "-N", "-k", "CLOCK_MONOTONIC",
             "--control", f"fifo:{ctl},{ack}", "-p", ",".join(map(str, pids)), "-o", str(path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def ready(self, timeout: float = 120.0) -> None:
        """Return once perf records (it answers ``ping`` from its event loop, after attaching)."""
        os.write(self._ctl, b"ping\n")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read() if self.proc.stderr else ""
                raise RuntimeError(f"perf record exited {self.proc.returncode}: {err.strip()[-300:]}")
            ready, _, _ = select.select([self._ack], [], [], 0.2)
            if ready and os.read(self._ack, 64).startswith(b"ack"):
                return
        raise TimeoutError(f"perf record was not recording within {timeout:g} s")

    def stop(self) -> str | None:
        """End perf (SIGINT: it writes the file and exits); None, or what went wrong."""
        problem = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
            problem = "perf record did not finish writing within 120 s"
        if self.proc.returncode not in (0, 130, -signal.SIGINT) and problem is None:
            problem = f"perf record exited {self.proc.returncode}: {err.strip()[-300:]}"
        os.close(self._ctl)
        os.close(self._ack)
        shutil.rmtree(self._dir, ignore_errors=True)
        return problem

    def weights(self, start: float, end: float) -> dict[int, Counter[str]]:
        """pid -> category -> weight of the samples in [start, end] (time.monotonic()), by ``perf script``."""
        if not self.path.exists():
            return {}
        proc = subprocess.Popen([PERF, "script", "-i", str(self.path), "-F", "pid,tid,time,period,ip,sym,dso"],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, errors="replace")
        assert proc.stdout is not None
        w = weights_by_pid(parse_perf_script(proc.stdout), start, end)
        proc.wait()
        return w


class PySpySession:
    """``py-spy record --gil --nonblocking --subprocesses`` of ``root``'s tree for ``seconds`` (raw stacks)."""

    def __init__(self, path: Path, root: int, seconds: float) -> None:
        self.path = path
        self.proc = subprocess.Popen(
            ["py-spy", "record", "--gil", "--nonblocking", "--subprocesses", "-r", "100", "-f", "raw",
             "-d", str(max(1, round(seconds))), "-o", str(path), "-p", str(root)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def finish(self) -> tuple[list[str], str | None]:
        """The raw lines, and None or what went wrong."""
        try:
            _, err = self.proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        lines = self.path.read_text(errors="replace").splitlines() if self.path.exists() else []
        problem = None if self.proc.returncode == 0 else f"py-spy exited {self.proc.returncode}: {err.strip()[-300:]}"
        return lines, problem


@dataclass(slots=True)
class Window:
    """What one recorded window produced: samples' weights per pid, py-spy lines, problems met."""

    start: float = 0.0
    end: float = 0.0
    weights: dict[int, Counter[str]] = field(default_factory=dict)
    pyspy: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class Recording:
    """perf (if usable) attached to this process and ``pids`` before the load starts; py-spy per window.

    Attached to this process, perf inherits into the load generator's client
    processes (and the in-process limit's child) as they are forked, so
    they are recorded from their first instruction without a new attach.
    """

    def __init__(self, out: Path, tag: str, pids: Sequence[int], use_perf: bool, use_pyspy: bool) -> None:
        self.out, self.tag, self.use_pyspy = out, tag, use_pyspy
        self.perf = PerfSession(out / f"perf-{tag}.data", [os.getpid(), *pids]) if use_perf else None
        if self.perf is not None:
            self.perf.ready()

    def window(self, seconds: float, pyspy_root: int) -> Window:
        """The next ``seconds`` (the load must be running); py-spy records them too."""
        spy = PySpySession(self.out / f"pyspy-{self.tag}.txt", pyspy_root, seconds) if self.use_pyspy else None
        w = Window(start=time.monotonic())
        time.sleep(seconds)
        w.end = time.monotonic()
        if spy is not None:
            w.pyspy, problem = spy.finish()
            if problem:
                w.errors.append(problem)
        return w

    def close(self, w: Window) -> None:
        """Stop perf and fill ``w`` with the weights of its samples in the window."""
        if self.perf is None:
            return
        problem = self.perf.stop()
        if problem:
            w.errors.append(problem)
        if w.end > w.start:
            w.weights = self.perf.weights(w.start, w.end)


def _daemon_roles(pid: int) -> dict[int, str]:
    """pid -> role for a ``flexemrd local`` tree (process titles name the roles, as ``ranker.cpu_by_role`` reads)."""
    import psutil

    from flexemr_bench.ranker import ROLES

    root = psutil.Process(pid)
    out = {}
    for p in [root, *root.children(recursive=True)]:
        try:
            name = p.name()
        except psutil.NoSuchProcess:
            continue
        out[p.pid] = next((r for prefix, r in ROLES if name.startswith(prefix)), "supervisor")
    return out


def _new_children(before: set[int], n: int, timeout: float) -> list[int]:
    """Pids of the ``n`` processes this one forked since ``before`` (the load generator's clients)."""
    import psutil

    me = psutil.Process()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = [c.pid for c in me.children() if c.pid not in before]
        if len(new) >= n:
            return new
        time.sleep(0.05)
    raise TimeoutError(f"the load generator started fewer than {n} clients within {timeout:g} s")


def _result(w: Window, roles: dict[int, str], cpu: dict[str, float], load: dict) -> dict:
    return {"load": load, "roles": breakdown(w.weights, roles, cpu), "gil_top": gil_holders(w.pyspy, roles),
            "recorded_s": round(w.end - w.start, 3), "recorder_errors": w.errors}


def profile_daemon(daemon, requests: list, kind: str, clients: int, seconds: float, out: Path,
                   use_perf: bool, use_pyspy: bool) -> dict:
    """Closed-loop load on ``daemon`` (``ranker.measure``) with every role's processes recorded meanwhile."""
    import psutil

    from flexemr_bench.ranker import measure

    roles = _daemon_roles(daemon.proc.pid)
    rec = Recording(out, kind, sorted(roles), use_perf, use_pyspy)
    before = {c.pid for c in psutil.Process().children()}
    result: dict = {}

    def load() -> None:
        try:
            result.update(measure(daemon, requests, kind, clients, seconds + 2 * LEAD_IN_S))
        except BaseException as e:   # reported by the caller, not lost in the thread
            result["error"] = repr(e)

    t = threading.Thread(target=load, name="profile-load")
    t.start()
    w = Window()
    try:
        roles.update({p: CLIENT_ROLE for p in _new_children(before, clients, 60.0)})
        time.sleep(LEAD_IN_S)
        w = rec.window(seconds, os.getpid())
    finally:
        t.join()
        rec.close(w)
    if "error" in result:
        raise RuntimeError(f"the load failed: {result['error']}")
    cpu = result.pop("cpu_ms_per_1k_samples")
    return _result(w, roles, cpu, result)


def _limit_child(model: Path, requests: list, seconds: float, kind: str, callers: int, conn) -> None:
    """In a forked child: the in-process limit, telling the parent when it is warm and what it cost."""
    from flexemr_bench.ranker import _kernel_concurrent

    start = [0.0]

    def started() -> None:
        start[0] = time.process_time()
        conn.send("started")

    try:
        res = _kernel_concurrent(model, requests, seconds, kind, callers, torch_threads=1, on_start=started)
        conn.send(("done", time.process_time() - start[0], res.summary()))
    except BaseException as e:
        conn.send(("error", repr(e), {}))


def profile_limit(model: Path, requests: list, kind: str, callers: int, seconds: float, out: Path,
                  use_perf: bool, use_pyspy: bool) -> dict:
    """The in-process limit (``kernel-4/t1``) in a child process, recorded once warm like the daemon's roles."""
    rec = Recording(out, f"{kind}-limit", [], use_perf, use_pyspy)
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_limit_child, args=(model, requests, seconds + 2 * LEAD_IN_S, kind, callers, child),
                    daemon=True)
    p.start()
    w = Window()
    try:
        if not parent.poll(300):
            raise TimeoutError("the in-process limit did not warm up within 300 s")
        msg = parent.recv()
        if msg != "started":
            raise RuntimeError(f"the in-process limit failed: {msg[1]}")
        time.sleep(LEAD_IN_S)
        w = rec.window(seconds, p.pid)
        status, cpu_s, summary = parent.recv()
        if status != "done":
            raise RuntimeError(f"the in-process limit failed: {cpu_s}")
    finally:
        p.join(30)
        if p.is_alive():
            p.kill()
        rec.close(w)
    cpu = {LIMIT_ROLE: cpu_s * 1e6 / max(1, summary["samples"])}
    return _result(w, {p.pid: LIMIT_ROLE}, cpu, summary)


# --- output ---------------------------------------------------------------------------------------

ROLE_ORDER = ("embedding servers", "engines", "ranker", "supervisor", CLIENT_ROLE, LIMIT_ROLE)


def markdown(run: dict) -> str:
    """One run's table: categories x roles, ms of CPU per 1,000 samples (share of the role in brackets)."""
    roles = [r for r in ROLE_ORDER if r in run["roles"] and run["roles"][r]["cpu_ms_per_1k_samples"] > 0]
    lines = [f"| where the CPU goes, ms per 1,000 samples ({run['system']}, {run['kind']}) | "
             + " | ".join(roles) + " |", "|---" * (len(roles) + 1) + "|"]
    for key, label in CATEGORIES:
        cells = []
        for r in roles:
            d = run["roles"][r]
            cells.append(f"{d['ms_per_1k_samples'][key]:.2f} ({d['shares'][key]:.0%})" if d["perf_cpu_s"] else "–")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| **role total** | " + " | ".join(f"**{run['roles'][r]['cpu_ms_per_1k_samples']:.2f}**"
                                                    for r in roles) + " |")
    return "\n".join(lines)


def gil_markdown(run: dict) -> str:
    """The top GIL holders per role, one line each."""
    out = []
    for role in ROLE_ORDER:
        top = run["gil_top"].get(role)
        if top:
            out.append(f"- GIL, {role}: " + ", ".join(f"`{t['function']}` {t['share']:.0%}" for t in top))
    return "\n".join(out)


def run(out: Path, model: Path | None, rows_cap: int, seconds: float, system: str, kinds: Sequence[str],
        clients: int, use_pyspy: bool, limit: bool) -> dict:
    """Start ``system``, profile each of ``kinds`` under load (then the in-process limit), write the results."""
    from flexemr.model.spec import load_spec
    from flexemr_bench.ranker import SYSTEMS, Daemon, bench_requests, ensure_model

    out.mkdir(parents=True, exist_ok=True)
    model = model or ensure_model(out, rows_cap)
    requests = bench_requests(load_spec(model), 16, 1.05)
    problem = perf_problem()
    if problem:
        print(f"perf unavailable: {problem}; writing the CPU per role and the py-spy part only", file=sys.stderr)
    if use_pyspy and shutil.which("py-spy") is None:
        print("py-spy is not installed: no GIL holders", file=sys.stderr)
        use_pyspy = False
    servers, engines, extra = SYSTEMS[system]
    results: dict = {"system": system, "seconds": seconds, "clients": clients, "model": str(model),
                     "perf": {"available": problem is None, "problem": problem, "event": "cpu-clock",
                              "frequency_hz": FREQ_HZ},
                     "categories": dict(CATEGORIES), "runs": {}}
    tag = f"prof{os.getpid() % 100000}"
    d = Daemon(model, servers, engines, f"/tmp/flexemr-{tag}.sock", tag, extra)
    try:
        for kind in kinds:
            print(f"profiling {system} {kind}: {clients} clients, {seconds:g} s recorded ...", file=sys.stderr)
            _warm(d, requests, kind, clients)
            r = profile_daemon(d, requests, kind, clients, seconds, out, problem is None, use_pyspy)
            results["runs"][kind] = {"system": system, "kind": kind, **r}
    finally:
        d.stop()
    if limit:
        for kind in kinds:
            print(f"profiling the in-process limit, {kind} ...", file=sys.stderr)
            lim = profile_limit(model, requests, kind, clients, seconds, out, problem is None, use_pyspy)
            r = results["runs"][kind]
            r["roles"].update(lim["roles"])
            r["gil_top"].update(lim["gil_top"])
            r["limit_load"] = lim["load"]
            r["limit_recorded_s"] = lim["recorded_s"]
            r["recorder_errors"] += lim["recorder_errors"]
    (out / "profile.json").write_text(json.dumps(results, indent=2))
    from flexemr_bench.plots import cpu_breakdown

    cpu_breakdown(results, out / "profile.png")
    return results


def _warm(daemon, requests: list, kind: str, clients: int) -> None:
    """One short unrecorded load first: the daemon's pools, pages and torch kernels are warm when recording starts."""
    from flexemr_bench.ranker import measure

    measure(daemon, requests, kind, clients, 1.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flexemr_bench.profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", type=Path, default=None, help="an existing bench8 model directory (else written)")
    ap.add_argument("--rows-cap", type=int, default=250_000)
    ap.add_argument("--seconds", type=float, default=8.0, help="seconds recorded per kind")
    ap.add_argument("--system", choices=("flexemr", "monolithic"), default="flexemr")
    ap.add_argument("--kind", choices=(*KINDS, "both"), default="lookup")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--no-py-spy", dest="pyspy", action="store_false", help="skip the GIL holders")
    ap.add_argument("--no-limit", dest="limit", action="store_false", help="skip the in-process limit")
    a = ap.parse_args(argv)
    if a.seconds <= 0 or a.clients < 1:
        ap.error("--seconds must be > 0 and --clients >= 1")
    if a.model is not None and not (a.model / "model.toml").exists():
        ap.error(f"--model {a.model}: no model.toml there")
    kinds = KINDS if a.kind == "both" else (a.kind,)
    r = run(a.out, a.model, a.rows_cap, a.seconds, a.system, kinds, a.clients, a.pyspy, a.limit)
    if not r["perf"]["available"]:
        print(f"(perf unavailable: {r['perf']['problem']}; categories are empty)\n")
    for kind in kinds:
        res = r["runs"][kind]
        print(markdown(res))
        lim = res.get("limit_load")
        print(f"\n{res['load']['samples_per_s']:,.0f} samples/s, {res['recorded_s']:g} s recorded"
              + (f"; in-process limit {lim['samples_per_s']:,.0f} samples/s, {res['limit_recorded_s']:g} s recorded"
                 if lim else ""))
        g = gil_markdown(res)
        if g:
            print("\n" + g)
        for e in res["recorder_errors"]:
            print(f"\n(recorder: {e})")
        print()
    print(f"written: {a.out / 'profile.json'}, {a.out / 'profile.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
