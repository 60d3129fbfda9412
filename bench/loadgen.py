"""Open-loop HTTP/1.1 load generator on asyncio + uvloop.

It opens N keep-alive connections, then sends requests on a fixed schedule: request i of a step at
rate R is *scheduled* at t0 + i/R, whatever happened to earlier requests. Each request goes to the
idle connection that has been idle longest (a FIFO of idle connections: load spreads over all of
them); a connection with a request outstanding is never used for a second one (HTTP/1.1, no
pipelining). When no connection is idle the request is not sent and counts as a
`no_idle_connection` error; the schedule does not move.

Latency is measured from the scheduled time, not from the moment the bytes were written, so a
server (or a generator) that falls behind shows up as latency instead of silently lowering the
offered rate: no coordinated omission.

Errors: connections that failed to open, no idle connection, a connection closed with a request
outstanding, a response that could not be parsed, and requests still unanswered `drain_timeout`
after the step's last scheduled send (these also enter the latency sample with the time they had
waited when given up: a lower bound). Non-2xx responses are counted apart from errors.

The generator reports its own CPU (getrusage user+sys of this process over the step's wall time):
it shares the machine with the server it measures.

The response parser is minimal: status line, headers up to the blank line, then `Content-Length`
bytes of body (chunked bodies are skipped by scanning for the last chunk; `Connection: close`
retires the connection). That is all the servers measured here send.

Usage as a command (against any server on this machine):

    uv run --group bench python -m bench.loadgen http://127.0.0.1:8000/health/live --connections 10000 \\
        --rate 1000 --duration 20
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import math
import resource
import socket
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

perf = time.perf_counter

_HEAD_END = b"\r\n\r\n"
# granian (hyper) closes a keep-alive connection that has waited this long for its next request:
# its HTTP/1 header read timeout (30 s by default) also runs while the connection is idle.
SERVER_IDLE_CLOSE_S = 30.0


def raise_nofile(wanted: int) -> dict:
    """Raise the soft RLIMIT_NOFILE to the hard limit. Says whether `wanted` descriptors fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    note = {"nofile_soft_before": soft, "nofile_hard": hard}
    target = hard if hard != resource.RLIM_INFINITY else max(soft, wanted + 1024)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as error:
            note["nofile_error"] = str(error)
    note["nofile_soft"] = soft
    note["nofile_enough"] = soft >= wanted + 64
    if not note["nofile_enough"]:
        note["nofile_warning"] = (
            f"RLIMIT_NOFILE soft={soft} hard={hard} is below the {wanted} connections asked for: "
            "connections beyond it will fail to open (raise the hard limit: ulimit -Hn)"
        )
    return note


def http_request(
    method: str, path: str, host: str, body: bytes = b"", headers: Iterable[tuple[str, str]] = ()
) -> bytes:
    """Raw HTTP/1.1 request bytes (keep-alive)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in headers]
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass
class StepResult:
    rate: float
    duration: float
    connections: int  # open at the start of the step
    scheduled: int = 0  # requests the schedule asked for
    sent: int = 0
    completed: int = 0  # responses received (any status)
    ok: int = 0  # 2xx
    non_2xx: int = 0
    errors: int = 0  # every kind below, added up
    error_kinds: dict[str, int] = field(default_factory=dict)
    status_counts: dict[str, int] = field(default_factory=dict)
    non_2xx_samples: dict[str, str] = field(default_factory=dict)  # one response per non-2xx status
    p50_ms: float = float("nan")
    p90_ms: float = float("nan")
    p99_ms: float = float("nan")
    max_ms: float = float("nan")
    mean_ms: float = float("nan")
    achieved_rps: float = 0.0  # responses / (last response - first scheduled)
    send_lag_p99_ms: float = float("nan")  # how late the generator itself wrote (scheduled → written)
    loadgen_cpu: float = 0.0  # cores (user+sys / wall) of this process during the step
    wall_seconds: float = 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, float):
                d[k] = None if math.isnan(v) else round(v, 3)
        return d


class _Conn(asyncio.Protocol):
    __slots__ = (
        "gen",
        "transport",
        "buf",
        "scheduled",
        "head_len",
        "body_len",
        "chunked",
        "status",
        "closing",
        "alive",
        "active",
    )

    def __init__(self, gen: LoadGenerator) -> None:
        self.gen = gen
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.scheduled: float | None = None  # scheduled time of the outstanding request
        self.head_len = -1
        self.body_len = 0
        self.chunked = False
        self.status = 0
        self.closing = False
        self.alive = False
        self.active = perf()  # when it last opened or answered: see LoadGenerator.refresh

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.alive = True
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def connection_lost(self, exc) -> None:
        self.alive = False
        self.gen._lost(self)

    def data_received(self, data: bytes) -> None:
        if self.scheduled is None:
            return  # nothing asked: ignore (a server's unsolicited bytes)
        buf = self.buf + data if self.buf else data
        if self.head_len < 0:
            end = buf.find(_HEAD_END)
            if end < 0:
                self.buf = buf
                return
            self.head_len = end + 4
            head = buf[:end].lower()
            try:
                self.status = int(head[9:12])
            except ValueError:
                self.buf = b""
                self.gen._failed(self, "bad_response")
                return
            i = head.find(b"\ncontent-length:")
            if i >= 0:
                j = head.find(b"\r", i + 16)
                self.body_len = int(head[i + 16 : j if j >= 0 else None])
                self.chunked = False
            else:
                self.body_len = 0
                self.chunked = b"\ntransfer-encoding: chunked" in head
            self.closing = b"\nconnection: close" in head
        if self.chunked:
            end = buf.find(b"\r\n0\r\n\r\n", self.head_len - 2)
            if end < 0:
                self.buf = buf
                return
            total = end + 7
        else:
            total = self.head_len + self.body_len
            if len(buf) < total:
                self.buf = buf
                return
        if not 200 <= self.status < 300 and self.status not in self.gen.samples:
            self.gen.samples[self.status] = buf[:total].decode("latin-1", "replace")[-400:]
        self.buf = buf[total:]
        self.head_len = -1
        self.gen._answered(self, self.status)


class LoadGenerator:
    """Holds the connections; `run_step(rate, duration)` measures one rate."""

    def __init__(
        self,
        url: str,
        make_request: Callable[[], bytes] | None = None,
        *,
        connections: int = 1000,
        connect_concurrency: int = 256,
        connect_timeout: float = 10.0,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http":
            raise ValueError("only http:// URLs")
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        default = http_request("GET", self.path, f"{self.host}:{self.port}")
        self.make_request = make_request or (lambda: default)
        self.target = connections
        self.connect_concurrency = connect_concurrency
        self.connect_timeout = connect_timeout
        self.conns: list[_Conn] = []
        self.idle: collections.deque[_Conn] = collections.deque()
        self.connect_errors: dict[str, int] = {}
        self.samples: dict[int, str] = {}  # the first response of each non-2xx status (its tail)
        self._step: _StepState | None = None

    # -- connections -----------------------------------------------------------------------------

    async def connect(self) -> dict:
        """Open connections up to the target; returns how many are open and what failed."""
        loop = asyncio.get_running_loop()
        limit = asyncio.Semaphore(self.connect_concurrency)
        started = perf()
        before = len(self.live())

        async def one() -> None:
            async with limit:
                try:
                    _, proto = await asyncio.wait_for(
                        loop.create_connection(lambda: _Conn(self), self.host, self.port),
                        self.connect_timeout,
                    )
                except (OSError, TimeoutError) as error:
                    kind = (
                        type(error).__name__
                        if not isinstance(error, OSError) or not error.errno
                        else f"errno_{error.errno}"
                    )
                    self.connect_errors[kind] = self.connect_errors.get(kind, 0) + 1
                    return
                self.conns.append(proto)
                self.idle.append(proto)

        missing = self.target - before
        await asyncio.gather(*(one() for _ in range(max(0, missing))))
        self.conns = [c for c in self.conns if c.alive]
        gc.collect()
        gc.freeze()  # long-lived protocol objects: keep them out of every later collection
        return {
            "connections_open": len(self.conns),
            "connections_target": self.target,
            "connect_errors": dict(self.connect_errors),
            "connect_seconds": round(perf() - started, 3),
        }

    async def refresh(self, idle_seconds: float) -> dict:
        """Reopen the connections that have been idle longer than `idle_seconds`, then top up
        to the target. The server closes a connection idle for SERVER_IDLE_CLOSE_S; a request
        written just as it does so is lost ("connection_lost", an error of the step) though
        the app never saw it. Connections go idle for long between steps (a failed rate waits
        for the server to go quiet), and during a step each waits up to connections / rate
        seconds for its turn: with `idle_seconds` + the step's length below the server's limit,
        no connection reaches it during a step."""
        now = perf()
        stale = [c for c in self.idle if c.alive and c.scheduled is None and now - c.active > idle_seconds]
        for conn in stale:
            conn.alive = False
            if conn.transport is not None:
                conn.transport.close()
        if stale:
            self.idle = collections.deque(c for c in self.idle if c.alive)
            self.conns = [c for c in self.conns if c.alive]
        return {"connections_reopened": len(stale), **await self.connect()}

    def live(self) -> list[_Conn]:
        return [c for c in self.conns if c.alive]

    def close(self) -> None:
        for conn in self.conns:
            if conn.transport is not None:
                conn.transport.close()
        self.conns.clear()
        self.idle.clear()

    # -- callbacks from connections --------------------------------------------------------------

    def _answered(self, conn: _Conn, status: int) -> None:
        now = perf()
        conn.active = now
        state = self._step
        scheduled, conn.scheduled = conn.scheduled, None
        if state is not None and scheduled is not None:
            state.latencies.append(now - scheduled)
            state.last_response = now
            state.statuses[status] = state.statuses.get(status, 0) + 1
            state.done()
        if conn.closing:
            conn.transport.close()
            return
        self.idle.append(conn)

    def _failed(self, conn: _Conn, kind: str) -> None:
        state = self._step
        if conn.scheduled is not None and state is not None:
            state.error(kind)
            state.done()
        conn.scheduled = None
        if conn.transport is not None:
            conn.transport.abort()

    def _lost(self, conn: _Conn) -> None:
        if conn.scheduled is not None:
            self._failed(conn, "connection_lost")
        try:
            self.idle.remove(conn)
        except ValueError:
            pass

    # -- one step --------------------------------------------------------------------------------

    async def run_step(
        self, rate: float, duration: float, *, drain_timeout: float = 10.0, tick: float = 0.001
    ) -> StepResult:
        """Send `rate` req/s for `duration` s on the open connections, then wait (at most
        `drain_timeout` s) for the outstanding answers."""
        result = StepResult(rate=rate, duration=duration, connections=len(self.live()))
        self.samples.clear()
        state = self._step = _StepState()
        make = self.make_request
        idle = self.idle
        n = int(round(rate * duration))
        interval = 1.0 / rate
        send_lags: list[float] = []
        usage0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = perf() + 0.01
        i = 0
        while i < n:
            now = perf()
            due = min(n, int((now - t0) / interval) + 1) if now >= t0 else 0
            while i < due:
                scheduled = t0 + i * interval
                i += 1
                if not idle:
                    state.error("no_idle_connection")
                    continue
                conn = idle.popleft()
                data = make()
                conn.scheduled = scheduled
                state.outstanding += 1
                conn.transport.write(data)
                state.sent += 1
                if not (i & 15):  # a sample is enough to see whether the generator keeps up
                    send_lags.append(perf() - scheduled)
            if i < n:
                # Wake at most once per `tick`: sleeping for less only spins the loop (timers
                # have a 1 ms resolution). Requests due meanwhile go out together, late by at
                # most a tick, and that lateness is in their latency.
                delay = t0 + i * interval - perf()
                await asyncio.sleep(delay if delay > tick else tick)
        last_scheduled = t0 + (n - 1) * interval
        if state.outstanding > 0:
            state.drained = asyncio.Event()
            try:
                await asyncio.wait_for(state.drained.wait(), drain_timeout)
            except TimeoutError:
                pass
        if state.outstanding > 0:  # give up on them: errors, and their wait so far as latency
            now = perf()
            for conn in self.conns:
                if conn.scheduled is not None:
                    state.latencies.append(now - conn.scheduled)
                    state.error("timeout")
                    conn.scheduled = None
                    conn.transport.abort()  # a late answer must not land in the next step
            state.outstanding = 0
        ended = perf()
        usage1 = resource.getrusage(resource.RUSAGE_SELF)
        self._step = None
        cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
        wall = ended - t0
        lat = sorted(state.latencies)
        result.scheduled = n
        result.sent = state.sent
        result.completed = sum(state.statuses.values())
        result.ok = sum(v for k, v in state.statuses.items() if 200 <= k < 300)
        result.non_2xx = result.completed - result.ok
        result.error_kinds = dict(state.errors)
        result.errors = sum(state.errors.values())
        result.status_counts = {str(k): v for k, v in sorted(state.statuses.items())}
        result.non_2xx_samples = {str(k): v for k, v in self.samples.items()}
        if lat:
            result.p50_ms = percentile(lat, 50) * 1000
            result.p90_ms = percentile(lat, 90) * 1000
            result.p99_ms = percentile(lat, 99) * 1000
            result.max_ms = lat[-1] * 1000
            result.mean_ms = sum(lat) / len(lat) * 1000
        if state.last_response and result.completed:
            result.achieved_rps = result.completed / max(state.last_response - t0, last_scheduled - t0, 1e-9)
        if send_lags:
            send_lags.sort()
            result.send_lag_p99_ms = percentile(send_lags, 99) * 1000
        result.loadgen_cpu = cpu / wall if wall > 0 else 0.0
        result.wall_seconds = wall
        return result


class _StepState:
    __slots__ = ("latencies", "statuses", "errors", "outstanding", "sent", "last_response", "drained")

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.statuses: dict[int, int] = {}
        self.errors: dict[str, int] = {}
        self.outstanding = 0
        self.sent = 0
        self.last_response = 0.0
        self.drained: asyncio.Event | None = None  # set when the last outstanding answer is in

    def done(self) -> None:
        self.outstanding -= 1
        if self.outstanding == 0 and self.drained is not None:
            self.drained.set()

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


def run(coro):
    """asyncio.run on a uvloop loop."""
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


async def _main(args: argparse.Namespace) -> int:
    note = raise_nofile(args.connections)
    body = args.body.encode() if args.body else b""
    parts = urlsplit(args.url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    headers = [("Content-Type", "application/json")] if body else []
    raw = http_request(args.method, path, parts.netloc, body, headers)
    gen = LoadGenerator(args.url, lambda: raw, connections=args.connections)
    opened = await gen.connect()
    print(json.dumps({"kind": "connect", **note, **opened}), flush=True)
    for rate in args.rate:
        result = await gen.run_step(rate, args.duration, drain_timeout=args.drain_timeout)
        print(json.dumps({"kind": "step", **result.as_dict()}), flush=True)
    gen.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.split("\n\n")[0])
    p.add_argument("url")
    p.add_argument("--connections", type=int, default=1000)
    p.add_argument("--rate", type=float, nargs="+", default=[1000.0], help="req/s; several = several steps")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--drain-timeout", type=float, default=10.0)
    p.add_argument("--method", default="GET")
    p.add_argument("--body", help="request body (sent as application/json)")
    args = p.parse_args(argv)
    return run(_main(args))


if __name__ == "__main__":
    sys.exit(main())
