"""Python peer: the `websockets` package (PyPI) with its defaults, speaking the bench's
peer contract (docs/benchmarks.md). websockets serves only GET requests, so the control
endpoints (POST /push/ID, /request/ID, /broadcast, GET /stats) run on a second port with a
minimal asyncio HTTP/1.1 handler. Prints "listening ws=ADDR control=ADDR"."""

import asyncio
import itertools
import json
import os
from urllib.parse import parse_qs, unquote, urlparse

from websockets.asyncio.server import serve

conns = {}
pending = {}
ids = itertools.count()


def envelope(kind, n, body):
    return '{"type":"%s","id":"%d","data":%s}' % (kind, n, body)


async def handler(ws):
    query = parse_qs(urlparse(ws.request.path).query)
    agent = query.get("id", [""])[0]
    conns[agent] = ws
    try:
        await ws.send('{"type":"welcome","agent_id":"%s"}' % agent)
        async for message in ws:
            if isinstance(message, bytes):
                continue
            try:
                env = json.loads(message)
            except ValueError:
                continue
            if env.get("type") == "response":
                fut = pending.pop(env.get("id"), None)
                if fut is not None and not fut.done():
                    fut.set_result(json.dumps(env.get("data")))
    except Exception:
        pass
    finally:
        if conns.get(agent) is ws:
            del conns[agent]


async def control(reader, writer):
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            method, target, _ = line.decode().split(" ", 2)
            length = 0
            while True:
                header = await reader.readline()
                if header in (b"\r\n", b"\n", b""):
                    break
                name, _, value = header.decode().partition(":")
                if name.lower() == "content-length":
                    length = int(value.strip())
            body = (await reader.readexactly(length)).decode() if length else ""
            status, payload = await route(method, target, body)
            writer.write(
                b"HTTP/1.1 %d X\r\ncontent-length: %d\r\n\r\n%s"
                % (status, len(payload), payload.encode())
            )
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, ValueError):
        pass
    finally:
        writer.close()


async def route(method, target, body):
    url = urlparse(target)
    parts = url.path.split("/")
    if method == "GET" and url.path == "/stats":
        return 200, json.dumps({"connections": len(conns)})
    if method != "POST" or len(parts) < 2:
        return 404, ""
    if parts[1] == "push":
        ws = conns.get(unquote(parts[2]))
        if ws is None:
            return 404, ""
        await ws.send(envelope("push", next(ids), body))
        return 202, ""
    if parts[1] == "broadcast":
        text = envelope("push", next(ids), body)
        targets = list(conns.values())
        for ws in targets:
            try:
                await ws.send(text)
            except Exception:
                pass
        return 202, json.dumps({"delivered": len(targets)})
    if parts[1] == "request":
        ws = conns.get(unquote(parts[2]))
        if ws is None:
            return 404, ""
        timeout_ms = int(parse_qs(url.query).get("timeout_ms", ["5000"])[0])
        n = next(ids)
        fut = asyncio.get_running_loop().create_future()
        pending[str(n)] = fut
        await ws.send(
            '{"type":"request","id":"%d","data":%s,"timeout_ms":%d}' % (n, body, timeout_ms)
        )
        try:
            return 200, await asyncio.wait_for(fut, timeout_ms / 1000)
        except asyncio.TimeoutError:
            pending.pop(str(n), None)
            return 504, ""
    return 404, ""


async def main():
    port = int(os.environ.get("PORT", "0"))
    async with serve(handler, "127.0.0.1", port, backlog=4096) as server:
        ctl = await asyncio.start_server(control, "127.0.0.1", 0, backlog=4096)
        ws_addr = "%s:%d" % server.sockets[0].getsockname()[:2]
        ctl_addr = "%s:%d" % ctl.sockets[0].getsockname()[:2]
        print("listening ws=%s control=%s" % (ws_addr, ctl_addr), flush=True)
        await asyncio.Future()


if __name__ == "__main__":
    asyncio.run(main())
