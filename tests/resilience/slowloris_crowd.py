"""A slowloris crowd in its own process (so it never competes with the measuring client for the GIL).

`python -m tests.resilience.slowloris_crowd PORT COUNT`, then on stdin: `open` opens COUNT connections that
each send a partial request and trickle one more header byte every ~2 s; `close` closes them; `quit` ends.
Each command is answered on stdout with `open N` / `closed N`."""

from __future__ import annotations

import asyncio
import random
import sys

HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\nX-Slow: "


async def trickle(writer: asyncio.StreamWriter, rng: random.Random) -> None:
    writer.write(HEAD)
    while True:
        await asyncio.sleep(1.5 + rng.random())
        writer.write(b"a")
        await writer.drain()


async def main(port: int, count: int) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    rng = random.Random(8)
    writers: list[asyncio.StreamWriter] = []
    tasks: list[asyncio.Task[None]] = []
    while line := (await reader.readline()).decode().strip():
        if line == "open":
            for _ in range(count):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writers.append(writer)
                tasks.append(asyncio.create_task(trickle(writer, rng)))
            print(f"open {len(writers)}", flush=True)
        elif line == "close":
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for writer in writers:
                writer.close()
            closed = len(writers)
            writers.clear()
            tasks.clear()
            print(f"closed {closed}", flush=True)
        elif line == "quit":
            break


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
