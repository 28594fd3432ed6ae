"""``tether-agent connect``: the same small CLI as the Rust SDK's (conformance/README.md
is its contract). It connects, prints every event as one JSON line on stdout (the
protocol's envelopes: ``welcome``, ``refreshed``, ``push``, ``binary``, ``request``,
``ack``), answers requests with ``--reply``, and sends ``--send`` messages. Logs go to
stderr. Exit codes: 0 on SIGINT/SIGTERM or after ``--exit-after-send``, 1 when the agent
stopped for good, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from typing import Any, Optional, Sequence

from . import Agent, AgentStopped, ClientCert, Connected, Direct, FromEnv, Options, Push, RawJSON, Request
from . import SendRejected, State, Stopped, TlsOptions, TokenFile, StaticToken
from .client import HandlerError, InvalidUrl
from .policy import ClosedByApplication
from .transport import TransportError


def parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The root parser and its ``connect`` subcommand's (for usage errors)."""
    env = os.environ.get
    root = argparse.ArgumentParser(prog="tether-agent", description="Connect to a Tether gateway as an agent")
    commands = root.add_subparsers(dest="command", required=True)
    p = commands.add_parser("connect", help="connect, print pushes, answer requests; runs until Ctrl-C or a terminal close")
    p.add_argument("--url", default=env("TETHER_URL", "ws://127.0.0.1:8080/v1/connect"), help="gateway URL [TETHER_URL]")
    p.add_argument("--token", default=env("TETHER_TOKEN"), help="a bearer token [TETHER_TOKEN]")
    p.add_argument(
        "--token-file",
        default=env("TETHER_TOKEN_FILE"),
        help="a file holding the token, re-read on every connect and refresh [TETHER_TOKEN_FILE]",
    )
    p.add_argument("--reply", help="answer every request with this JSON")
    p.add_argument("--send", action="append", default=[], help="send this JSON to the upstream once connected (repeatable); waits for each ack")
    p.add_argument("--exit-after-send", action="store_true", help="exit after the --send messages are acknowledged")
    p.add_argument("--ca-file", default=env("TETHER_CA_FILE"), help="PEM CA certificates trusted in addition to the system roots [TETHER_CA_FILE]")
    p.add_argument("--client-cert", default=env("TETHER_CLIENT_CERT"), help="PEM client certificate for mutual TLS [TETHER_CLIENT_CERT]")
    p.add_argument("--client-key", default=env("TETHER_CLIENT_KEY"), help="PEM private key of --client-cert [TETHER_CLIENT_KEY]")
    p.add_argument(
        "--proxy",
        default=env("TETHER_PROXY"),
        help="HTTP proxy http://[user:password@]host:port; overrides HTTPS_PROXY/HTTP_PROXY/NO_PROXY [TETHER_PROXY]",
    )
    p.add_argument("--direct", action="store_true", help="connect directly, ignoring HTTPS_PROXY/HTTP_PROXY")
    p.add_argument(
        "--ack-on-stdin",
        action="store_true",
        help="acknowledge each push only after reading one line from stdin (step through pushes by hand)",
    )
    return root, p


def emit(line: str) -> None:
    """One event, one line, flushed at once (a reader may kill the process any time)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def one_line(raw: RawJSON) -> str:
    # JSON strings cannot hold a raw newline, so any newline is whitespace between tokens.
    return raw.text.replace("\r", " ").replace("\n", " ")


def envelope(kind: str, fields: dict[str, Any], data: Optional[RawJSON] = None) -> str:
    head = json.dumps({"type": kind, **fields}, separators=(",", ":"))
    if data is None:
        return head
    return head[:-1] + ',"data":' + one_line(data) + "}"


def main(argv: Optional[Sequence[str]] = None) -> None:
    root, usage = parser()
    args = root.parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=os.environ.get("TETHER_LOG", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.token and args.token_file:
        usage.error("--token and --token-file exclude each other")
    if not args.token and not args.token_file:
        usage.error("give --token or --token-file")
    if args.proxy and args.direct:
        usage.error("--proxy and --direct exclude each other")
    if bool(args.client_cert) != bool(args.client_key):
        usage.error("--client-cert and --client-key go together")
    try:
        code = asyncio.run(connect(args))
    except KeyboardInterrupt:
        code = 0
    sys.exit(code)


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return 1


async def connect(args: argparse.Namespace) -> int:
    try:
        reply = RawJSON.parse(args.reply) if args.reply is not None else None
        sends = [RawJSON.parse(text) for text in args.send]
    except ValueError as err:
        return fail(f"--reply and --send must be JSON: {err}")
    stdin: Optional[asyncio.StreamReader] = None
    if args.ack_on_stdin:
        stdin = asyncio.StreamReader()
        await asyncio.get_running_loop().connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)

    async def on_push(push: Push) -> None:
        if push.raw is None:
            emit(json.dumps({"type": "binary", "len": len(push.binary or b"")}, separators=(",", ":")))
        else:
            emit(envelope("push", {"id": push.id}, push.raw))
        if stdin is not None:
            await stdin.readline()

    def on_request(request: Request) -> RawJSON:
        emit(envelope("request", {"id": request.id, "timeout_ms": int(request.timeout * 1000)}, request.raw))
        if reply is None:
            raise HandlerError("no --reply given")
        return reply

    sessions = {"last": 0}

    def on_state(state: State) -> None:
        if not isinstance(state, Connected):
            return
        session = state.session
        if session.number != sessions["last"]:
            sessions["last"] = session.number
            emit(
                envelope(
                    "welcome",
                    {"agent_id": session.agent_id, "connection_id": session.connection_id, "expires_at": session.expires_at},
                )
            )
        else:
            emit(envelope("refreshed", {"expires_at": session.expires_at}))

    options = Options(
        # A one-shot send fails at once with the gateway's reason when nothing upstream
        # receives agent messages, instead of retrying until someone presses Ctrl-C.
        retry_unavailable=not args.exit_after_send,
        tls=TlsOptions(
            extra_ca_file=args.ca_file,
            client_cert=ClientCert(args.client_cert, args.client_key) if args.client_cert else None,
        ),
        proxy=args.proxy if args.proxy else (Direct() if args.direct else FromEnv()),
    )
    tokens = StaticToken(args.token) if args.token else TokenFile(args.token_file)
    try:
        agent = Agent(args.url, tokens, on_push=on_push, on_request=on_request, on_state=on_state, options=options)
    except (InvalidUrl, TransportError) as err:
        return fail(str(err))
    interrupted = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, interrupted.set)
    await agent.start()
    work = asyncio.ensure_future(run(agent, args, sends))
    signalled = asyncio.ensure_future(interrupted.wait())
    await asyncio.wait({work, signalled}, return_when=asyncio.FIRST_COMPLETED)
    if work.done():
        signalled.cancel()
        return work.result()
    # SIGINT/SIGTERM: close with 1000 and exit 0.
    work.cancel()
    await agent.close()
    return 0


async def run(agent: Agent, args: argparse.Namespace, sends: list[RawJSON]) -> int:
    try:
        session = await agent.connected()
        print(f"connected as {session.agent_id} (connection {session.connection_id})", file=sys.stderr, flush=True)
        for data in sends:
            ident = await agent.send(data)
            emit(json.dumps({"type": "ack", "id": ident}, separators=(",", ":")))
        if args.exit_after_send:
            await agent.close()
            return 0
        state = await agent.wait_for(lambda s: isinstance(s, Stopped))
        if isinstance(state, Stopped) and not isinstance(state.reason, ClosedByApplication):
            return fail(f"agent stopped: {state.reason}")
        await agent.close()
        return 0
    except (AgentStopped, SendRejected) as err:
        await agent.close()
        return fail(str(err))


if __name__ == "__main__":
    main()
