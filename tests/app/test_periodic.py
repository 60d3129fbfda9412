"""A housekeeping task survives its job's failures: it logs them and runs again next round."""

from __future__ import annotations

import asyncio
import logging

from app.periodic import every


async def test_a_failing_round_is_logged_and_the_next_one_runs(caplog):
    rounds: list[int] = []
    third = asyncio.Event()

    async def job() -> None:
        rounds.append(len(rounds))
        if len(rounds) == 1:
            raise RuntimeError("the database blinked")
        if len(rounds) == 3:
            third.set()

    with caplog.at_level(logging.ERROR, logger="app.periodic"):
        task = asyncio.create_task(every(0.001, job, "test sweep"))
        await asyncio.wait_for(third.wait(), 5)
        task.cancel()
    assert len(rounds) >= 3
    assert [r.getMessage() for r in caplog.records] == ["test sweep failed; the next round retries"]
