"""Deadlines of mediator calls: the one in force (a context variable, so nested calls inherit
what is left of their caller's), and the per-loop sweeper that cancels the calls outliving theirs."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from operator import attrgetter

DEADLINE: ContextVar[float | None] = ContextVar("switchboard_deadline", default=None)  # loop time
DEADLINE_MARGIN = 0.05  # seconds a nested call leaves its caller to answer
DEADLINE_RESOLUTION = 0.005  # seconds between sweeps: a call is cancelled at most this late


class Call:
    """One mediator call in flight: its deadline and the task running it."""

    __slots__ = ("deadline", "task", "cancelling", "cancel_requested")

    def __init__(self, deadline: float, task: asyncio.Task) -> None:
        self.deadline = deadline
        self.task = task
        self.cancelling = task.cancelling()  # cancel requests already pending when the call began
        self.cancel_requested = False  # by the sweeper, until the call withdraws it (Task.uncancel)


class Deadlines:
    """Cancels the calls on one event loop that outlive their deadline. A timer per call
    (`asyncio.timeout`) would be scheduled and cancelled on every call, which costs more than the
    rest of the mediator; here a call only joins a set, and one sweeper task, alive while calls
    are in flight, wakes every DEADLINE_RESOLUTION and cancels the tasks whose deadline has passed:
    never early, at most that late. The call turns the cancellation into its timeout error as
    `asyncio.timeout` does."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.calls: set[Call] = set()
        self.sweeper: asyncio.Task | None = None

    def watch(self, deadline: float) -> Call:
        call = Call(deadline, asyncio.current_task(self.loop))  # type: ignore[arg-type]  # always in a task
        self.calls.add(call)
        if self.sweeper is None:
            self.sweeper = self.loop.create_task(self._sweep(), name="mediator-deadlines")
        return call

    async def _sweep(self) -> None:
        try:
            while self.calls:
                await asyncio.sleep(DEADLINE_RESOLUTION)
                now = self.loop.time()
                due = sorted(
                    (call for call in self.calls if call.deadline <= now and not call.cancel_requested),
                    key=attrgetter("deadline"),
                )
                cancelled: set[asyncio.Task] = set()
                for call in due:
                    # Nested calls in one task: cancel only the innermost (earliest deadline), so
                    # the timeout is its own module's; the caller's turn comes at a later sweep.
                    if call.task not in cancelled:
                        cancelled.add(call.task)
                        call.cancel_requested = True
                        call.task.cancel()
        finally:
            self.sweeper = None


def remaining_seconds() -> float | None:
    """Time left before the deadline of the mediator call in progress (None outside any)."""
    deadline = DEADLINE.get()
    return None if deadline is None else deadline - asyncio.get_running_loop().time()


@contextlib.contextmanager
def deadline_in(seconds: float) -> Iterator[None]:
    """Run the calls inside under a caller's deadline (the remote transport's receiving end)."""
    token = DEADLINE.set(asyncio.get_running_loop().time() + seconds)
    try:
        yield
    finally:
        DEADLINE.reset(token)
