"""The agent against a scripted in-test WebSocket server (behaviour against the real
gateway is the conformance suite's, conformance/tests/sdk.rs)."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Awaitable, Callable

import pytest
from websockets.asyncio.server import ServerConnection, serve

from tether_agent import Agent, AgentStopped, Backoff, Connected, Options, ReconnectPolicy, SendRejected, StaticToken, Stopped
from tether_agent.policy import AuthRejected, Refused


def fast() -> Options:
    return Options(reconnect=ReconnectPolicy(backoff=Backoff(base=0.02, cap=0.1), overload_floor=0.05), connect_timeout=2)


WELCOME = '{"type":"welcome","agent_id":"a1","connection_id":"%s","expires_at":null,"max_message_bytes":65536,"messages_per_second":100}'


class Server:
    """Hands each accepted connection (after an optional refusal) to the test."""

    def __init__(self) -> None:
        self.conns: asyncio.Queue[ServerConnection] = asyncio.Queue()
        self.auths: list[str] = []

    async def handler(self, ws: ServerConnection) -> None:
        self.auths.append(ws.request.headers.get("Authorization", ""))
        await self.conns.put(ws)
        await ws.wait_closed()

    async def next(self) -> ServerConnection:
        return await asyncio.wait_for(self.conns.get(), 10)


def run(test: Callable[[str, Server], Awaitable[Any]], process_request: Any = None) -> None:
    async def main() -> None:
        server = Server()
        async with serve(server.handler, "127.0.0.1", 0, subprotocols=["tether.v1"], process_request=process_request) as s:
            port = s.sockets[0].getsockname()[1]
            await asyncio.wait_for(test(f"ws://127.0.0.1:{port}/v1/connect", server), 20)

    asyncio.run(main())


async def envelope(ws: ServerConnection) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), 10))


def test_send_retries_after_a_nack_with_the_same_id_until_acked():
    async def test(url: str, server: Server) -> None:
        async with Agent(url, StaticToken("tok"), options=fast()) as agent:
            ws = await server.next()
            assert server.auths == ["Bearer tok"]
            await ws.send(WELCOME % "c1")
            send = asyncio.ensure_future(agent.send({"n": 1}))
            first = await envelope(ws)
            assert first["type"] == "send" and first["data"] == {"n": 1}
            await ws.send(json.dumps({"type": "nack", "id": first["id"], "error": {"code": "upstream_error", "message": "503"}, "retry_after_ms": 10}))
            again = await envelope(ws)
            assert again["id"] == first["id"], "a retry reuses the idempotency id"
            assert not send.done()
            await ws.send(json.dumps({"type": "ack", "id": first["id"]}))
            assert await send == first["id"]

    run(test)


def test_an_unacked_send_is_resent_on_the_next_session():
    async def test(url: str, server: Server) -> None:
        async with Agent(url, StaticToken("tok"), options=fast()) as agent:
            ws = await server.next()
            await ws.send(WELCOME % "c1")
            send = asyncio.ensure_future(agent.send("hello"))
            first = await envelope(ws)
            await ws.close(1011)
            ws2 = await server.next()
            await ws2.send(WELCOME % "c2")
            again = await envelope(ws2)
            assert again["id"] == first["id"]
            await ws2.send(json.dumps({"type": "ack", "id": first["id"]}))
            await send

    run(test)


def test_a_permanent_nack_fails_the_send():
    async def test(url: str, server: Server) -> None:
        async with Agent(url, StaticToken("tok"), options=fast()) as agent:
            ws = await server.next()
            await ws.send(WELCOME % "c1")
            send = asyncio.ensure_future(agent.send("x"))
            first = await envelope(ws)
            await ws.send(json.dumps({"type": "nack", "id": first["id"], "error": {"code": "too_large", "message": "big"}}))
            with pytest.raises(SendRejected):
                await send

    run(test)


def test_a_redelivered_push_is_acked_without_reaching_the_handler_twice():
    async def test(url: str, server: Server) -> None:
        seen: list[Any] = []
        async with Agent(url, StaticToken("tok"), options=fast(), on_push=lambda p: seen.append(p.data)) as agent:
            push = lambda id, n: json.dumps({"type": "push", "id": id, "data": n, "ack": True})  # noqa: E731
            ws = await server.next()
            await ws.send(WELCOME % "c1")
            await ws.send(push("d1", 1))
            assert (await envelope(ws)) == {"type": "ack", "id": "d1"}
            await ws.close(1011)
            ws2 = await server.next()
            await ws2.send(WELCOME % "c2")
            await ws2.send(push("d1", 1))
            await ws2.send(push("d2", 2))
            assert (await envelope(ws2))["id"] == "d1"
            assert (await envelope(ws2))["id"] == "d2"
            assert seen == [1, 2], "d1 was not handled again"
            assert isinstance(agent.state, Connected)

    run(test)


def test_requests_are_answered_with_data_or_an_error():
    async def test(url: str, server: Server) -> None:
        def answer(request):
            if request.data == "fail":
                raise RuntimeError("disk on fire")
            return request.data * 2

        async with Agent(url, StaticToken("tok"), options=fast(), on_request=answer):
            ws = await server.next()
            await ws.send(WELCOME % "c1")
            await ws.send('{"type":"request","id":"r1","data":21,"timeout_ms":1000}')
            assert await envelope(ws) == {"type": "response", "id": "r1", "data": 42}
            await ws.send('{"type":"request","id":"r2","data":"fail","timeout_ms":1000}')
            assert await envelope(ws) == {"type": "response", "id": "r2", "error": {"code": "handler_error", "message": "disk on fire"}}

    run(test)


def test_refusing_close_codes_stop_the_agent():
    async def test(url: str, server: Server) -> None:
        agent = await Agent(url, StaticToken("tok"), options=fast()).start()
        ws = await server.next()
        await ws.send(WELCOME % "c1")
        await agent.connected()
        await ws.close(4003, "replaced")
        state = await asyncio.wait_for(agent.wait_for(lambda s: isinstance(s, Stopped)), 10)
        assert isinstance(state, Stopped) and isinstance(state.reason, Refused) and state.reason.code == 4003
        with pytest.raises(AgentStopped):
            await agent.send("x")
        await agent.close()

    run(test)


def test_an_auth_refusal_stops_without_retrying():
    from websockets.http11 import Response
    from websockets.datastructures import Headers

    def refuse(connection, request):
        return Response(401, "Unauthorized", Headers(), b'{"error":{"code":"unauthorized","message":"token expired"}}')

    async def test(url: str, server: Server) -> None:
        agent = await Agent(url, StaticToken("bad"), options=fast()).start()
        with pytest.raises(AgentStopped) as err:
            await asyncio.wait_for(agent.connected(), 10)
        assert isinstance(err.value.reason, AuthRejected)
        assert "401" in str(err.value) and "token expired" in str(err.value)
        await agent.close()

    run(test, process_request=refuse)
