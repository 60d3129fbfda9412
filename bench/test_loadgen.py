"""The bench's load generator keeps its connections usable: a connection idle for long enough
that the server would close it mid-step is reopened before the step, not lost in it."""

from __future__ import annotations

import asyncio

from bench.loadgen import LoadGenerator

RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


async def test_refresh_reopens_only_the_connections_idle_too_long_and_keeps_the_count():
    accepted = 0

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        try:
            while await reader.readuntil(b"\r\n\r\n"):  # GETs: no body
                writer.write(RESPONSE)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    gen = LoadGenerator(f"http://127.0.0.1:{port}/", connections=4)
    try:
        assert (await gen.connect())["connections_open"] == 4
        step = await gen.run_step(80, 0.1)
        assert (step.completed, step.errors) == (8, 0)

        assert (await gen.refresh(60.0))["connections_reopened"] == 0  # all answered just now
        for conn in gen.live()[:2]:
            conn.active -= 100  # as if these two had sat idle for 100 s more
        opened = await gen.refresh(60.0)

        assert (opened["connections_reopened"], opened["connections_open"]) == (2, 4)
        assert accepted == 6
        step = await gen.run_step(80, 0.1)
        assert (step.completed, step.errors) == (8, 0)
    finally:
        gen.close()
        server.close()
        await server.wait_closed()
