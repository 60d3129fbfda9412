"""Mediator cost: µs per `await mediator.send(cmd)` with every behaviour (route lookup, bulkhead,
circuit breaker, deadline, conflict-retry loop, latency and outcome metrics, dependency
injection) against `await handler(cmd)` for the same trivial handler, on uvloop. Also each of
asyncio.timeout, aiobreaker and prometheus_client's histogram + counter alone around the same
handler: what each would cost per call, which is why the mediator uses none of them on a healthy
call's path (a deadline sweeper; aiobreaker only on failure or when not closed; plain counters
exported at scrape time).

Each variant runs `iterations` calls in one coroutine; `runs` repetitions, median reported."""

from __future__ import annotations

import asyncio
import statistics
import time
from datetime import timedelta

import aiobreaker
from prometheus_client import CollectorRegistry, Counter, Histogram

from app.mediator import Mediator
from app.messages import Command
from app.wiring import inject

perf = time.perf_counter


class BenchPing(Command):
    n: int


async def handle(cmd: BenchPing) -> int:
    return cmd.n


async def _loop(call, message, iterations: int) -> float:
    started = perf()
    for _ in range(iterations):
        await call(message)
    return (perf() - started) / iterations * 1e6


def _components() -> dict:
    """Each behaviour alone around the same handler: where the mediator's time goes."""
    breaker = aiobreaker.CircuitBreaker(fail_max=5, timeout_duration=timedelta(seconds=30))
    registry = CollectorRegistry()
    latency = Histogram(
        "bench_seconds",
        "",
        ["m"],
        registry=registry,
        buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1, 2.5, 5),
    ).labels("x")
    calls = Counter("bench_calls", "", ["m"], registry=registry).labels("x")

    async def with_timeout(message):
        async with asyncio.timeout(5.0):
            return await handle(message)

    async def with_breaker(message):
        return await breaker.call_async(handle, message)

    async def with_metrics(message):
        started = perf()
        try:
            return await handle(message)
        finally:
            latency.observe(perf() - started)
            calls.inc()

    return {"only_timeout": with_timeout, "only_breaker": with_breaker, "only_metrics": with_metrics}


async def measure(iterations: int = 20_000, runs: int = 7) -> dict:
    injected = inject(handle, {})
    mediator = Mediator({BenchPing: ("bench", injected)})
    message = BenchPing(n=1)
    variants = {"direct": handle, "injected": injected, "mediator": mediator.send, **_components()}
    for call in variants.values():  # warm every path first
        await _loop(call, message, 1000)
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(runs):
        for name, call in variants.items():  # interleaved: machine noise hits all alike
            samples[name].append(await _loop(call, message, iterations))
    med = {name: statistics.median(values) for name, values in samples.items()}
    return {
        "measurement": "mediator_cost",
        "iterations": iterations,
        "runs": runs,
        "direct_us": round(med["direct"], 3),
        "injected_us": round(med["injected"], 3),
        "mediator_us": round(med["mediator"], 3),
        "overhead_us": round(med["mediator"] - med["direct"], 3),
        **{f"{name}_us": round(med[name], 3) for name in ("only_timeout", "only_breaker", "only_metrics")},
        "mediator_us_min": round(min(samples["mediator"]), 3),
        "mediator_us_max": round(max(samples["mediator"]), 3),
    }
