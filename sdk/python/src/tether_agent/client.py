"""The :class:`Agent`: one asyncio task owns the connection loop and the socket.

```text
 Agent.send/request --register + wake--> outbox / requests --flush--> WebSocket --> gateway
                                               ^                         |
   push dispatcher task <--bounded queue-------+-- reader (per session) -+
   request handler tasks (one per request) --> response frames
```

The loop connects, runs a session until it ends, asks the pure policy
(:mod:`tether_agent.policy`) whether and when to reconnect, and waits. A ``send`` stays
in the outbox until the gateway acks it, and everything unacknowledged is written again
on the next session, with the same id (at-least-once). Pushes run one at a time in
arrival order on the dispatcher task, which remembers handled ids in a bounded window:
a redelivered push (a durable push whose ack was lost with the connection) is
acknowledged without reaching the handler twice. Requests each run on their own task so
a slow answer does not hold up pushes. Pings and dead-peer detection are the
``websockets`` library's keepalive.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import random
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Awaitable, Callable, Optional, Union
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from . import frames
from .frames import ErrorBody, RawJSON
from .policy import (
    ClosedByApplication,
    Closed,
    DedupWindow,
    Ended,
    Lost,
    Reconnect,
    ReconnectPolicy,
    Rejected,
    StopReason,
    TokenUnavailable,
    Unreachable,
    decide,
    describe,
    nack_is_retryable,
    refresh_delay,
    resend_delay,
)
from .tokens import TokenProvider, fetch
from .transport import ConnectFailed, FromEnv, Proxy, TlsOptions, Transport, certificate_failure

log = logging.getLogger("tether_agent")

SUBPROTOCOL = "tether.v1"


# === errors ===


class TetherError(Exception):
    """Base of the errors the agent's calls raise."""


class InvalidUrl(TetherError, ValueError):
    """The URL is not a ``ws://`` or ``wss://`` URL with a host."""


class SendRejected(TetherError):
    """The gateway or upstream refused the message for good (bad shape, too large, or
    ``unavailable`` when ``retry_unavailable`` is off)."""

    def __init__(self, error: ErrorBody) -> None:
        super().__init__(f"refused by the gateway ({error.code}): {error.message}")
        self.error = error


class UpstreamError(TetherError):
    """The upstream answered the agent's request with an error."""

    def __init__(self, error: ErrorBody) -> None:
        super().__init__(f"the upstream answered with an error ({error.code}): {error.message}")
        self.error = error


class RequestTimeout(TetherError, TimeoutError):
    """No ``response`` arrived before the timeout."""


class AgentStopped(TetherError):
    """The agent stopped (closed, or a terminal refusal) before the call completed."""

    def __init__(self, reason: StopReason) -> None:
        super().__init__(f"agent stopped: {reason}")
        self.reason = reason


# === public data ===


@dataclass
class Options:
    """Tuning of the connection loop; the defaults suit a production agent. Durations are
    seconds."""

    reconnect: ReconnectPolicy = field(default_factory=ReconnectPolicy)
    connect_timeout: float = 10.0
    """Deadline for TCP connect, proxy tunnel, TLS, upgrade and ``welcome``."""
    ping_interval: float = 20.0
    pong_timeout: float = 10.0
    """A ping unanswered for this long means the gateway is dead (also the deadline of
    one write)."""
    ack_timeout: float = 30.0
    """A ``send`` with neither ``ack`` nor ``nack`` after this long is sent again."""
    refresh_margin: float = 60.0
    """Refresh the token this long before it expires (at most half its remaining life)."""
    request_timeout: float = 10.0
    stable_after: float = 5.0
    """A session shorter than this does not reset the back-off (a gateway that accepts
    and closes at once must not cause a tight loop)."""
    push_queue: int = 64
    """Pushes waiting for the handler; a full queue slows reading (back-pressure)."""
    dedup_window: int = 4096
    """Ids of recently handled pushes remembered for de-duplication (0: off)."""
    max_message_bytes: int = 16 * 1024 * 1024
    """Largest inbound message accepted (the gateway's own limit is usually smaller)."""
    retry_unavailable: bool = True
    """Whether a ``send`` refused with ``unavailable`` (nothing upstream) is retried; a
    one-shot tool sets ``False`` to fail at once with the gateway's reason."""
    tls: TlsOptions = field(default_factory=TlsOptions)
    proxy: Proxy = field(default_factory=FromEnv)


@dataclass(frozen=True)
class Push:
    """A backend's message: JSON (``raw``, decoded by :attr:`data`) or a binary frame."""

    id: Optional[str]
    raw: Optional[RawJSON]
    binary: Optional[bytes] = None
    ack: bool = False

    @property
    def data(self) -> Any:
        if self.raw is not None:
            return self.raw.value()
        return json.loads(self.binary or b"null")


@dataclass(frozen=True)
class Request:
    """A backend's request; the handler's return value becomes the ``response``."""

    id: str
    raw: RawJSON
    timeout: float

    @property
    def data(self) -> Any:
        return self.raw.value()


class HandlerError(Exception):
    """Raise from a request handler to answer with this error code and message."""

    def __init__(self, message: str, code: str = "handler_error") -> None:
        super().__init__(message)
        self.body = ErrorBody(code, message)


@dataclass(frozen=True)
class Session:
    """The current session, from the gateway's ``welcome`` (and ``refreshed``)."""

    agent_id: str
    connection_id: str
    expires_at: Optional[int]
    number: int


@dataclass(frozen=True)
class Connecting:
    attempt: int


@dataclass(frozen=True)
class Connected:
    session: Session


@dataclass(frozen=True)
class Waiting:
    delay: float


@dataclass(frozen=True)
class Stopped:
    reason: StopReason


State = Union[Connecting, Connected, Waiting, Stopped]

PushHandler = Callable[[Push], Union[None, Awaitable[None]]]
RequestHandler = Callable[[Request], Any]


async def _call(fn: Callable[..., Any], *args: Any) -> Any:
    result = fn(*args)
    if inspect.isawaitable(result):
        result = await result
    return result


def check_url(url: str) -> None:
    """Refuses, before any attempt, a URL no attempt could use."""
    shape = "agents connect at ws://HOST:PORT/v1/connect"
    try:
        parts = urlsplit(url)
        parts.port
    except ValueError as err:
        raise InvalidUrl(f"invalid gateway url `{url}`: {err}; {shape}") from None
    if not parts.scheme:
        raise InvalidUrl(f"invalid gateway url `{url}`: no scheme; {shape}")
    if parts.scheme not in ("ws", "wss"):
        raise InvalidUrl(
            f"invalid gateway url `{url}`: the scheme must be ws:// or wss:// (got {parts.scheme}://); {shape}"
        )
    if not parts.hostname:
        raise InvalidUrl(f"invalid gateway url `{url}`: no host; {shape}")


def refusal_message(body: Optional[Union[bytes, bytearray]]) -> str:
    """The gateway's reason from a refused upgrade's body: its error ``message``, else
    the body's text cut to a readable length."""
    if not body:
        return ""
    try:
        value = json.loads(body)
        if isinstance(value, dict):
            error = value.get("error")
            message = error.get("message") if isinstance(error, dict) else value.get("message")
            if isinstance(message, str):
                return message
    except ValueError:
        pass
    text = bytes(body).decode("utf-8", "replace").strip()
    return text if len(text) <= 300 else text[:300] + "…"


# === the core ===


@dataclass
class _PendingSend:
    data: RawJSON
    waiters: list["asyncio.Future[None]"]
    due: float
    in_flight: bool = False
    nacks: int = 0


@dataclass
class _PendingRequest:
    data: RawJSON
    timeout: float
    deadline: float
    future: "asyncio.Future[Any]"
    written: bool = False


@dataclass
class _PushJob:
    epoch: int
    push: Push


class _Ended(Exception):
    def __init__(self, ended: Ended) -> None:
        super().__init__(describe(ended))
        self.ended = ended


class Agent:
    """A resilient tether.v1 client. Use it as ``async with Agent(...) as agent:``, or
    call :meth:`start` and :meth:`close`.

    ``tokens`` is a token provider (:class:`~tether_agent.StaticToken`,
    :class:`~tether_agent.TokenFile`, or any callable returning a token or an awaitable
    of one). ``on_push`` runs for every push, one at a time, in order; a push that asked
    for an ack is acknowledged when it returns (if it raises, the push is not
    acknowledged, and a durable push comes again on the next connection).
    ``on_request`` answers backend requests: its return value is the ``response`` data
    (:class:`RawJSON` is sent as is); raising :class:`HandlerError` (or any exception)
    answers an error. ``on_state`` is called with every new :data:`State`."""

    def __init__(
        self,
        url: str,
        tokens: TokenProvider,
        *,
        on_push: Optional[PushHandler] = None,
        on_request: Optional[RequestHandler] = None,
        on_state: Optional[Callable[[State], None]] = None,
        options: Optional[Options] = None,
    ) -> None:
        check_url(url)
        self.url = url
        self.options = options or Options()
        self._transport = Transport.create(url, self.options.tls, self.options.proxy)
        self._tokens = tokens
        self._on_push = on_push
        self._on_request = on_request
        self._on_state = on_state
        self._state: State = Connecting(0)
        self._changed: Optional[asyncio.Condition] = None
        self._rng = random.Random()
        self._outbox: dict[str, _PendingSend] = {}
        self._requests: dict[str, _PendingRequest] = {}
        self._epoch = 0
        self._ws: Optional[ClientConnection] = None
        self._wake: Optional[asyncio.Event] = None
        self._pushes: Optional[asyncio.Queue[_PushJob]] = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._handlers: set[asyncio.Task[Any]] = set()
        self._hint: Optional[float] = None
        self._refresh_at: Optional[float] = None
        self._refresh_in_flight = False
        self._closing = False

    # --- lifecycle ---

    async def start(self) -> "Agent":
        """Starts the connection loop on the running event loop."""
        if self._tasks:
            return self
        self._changed = asyncio.Condition()
        self._wake = asyncio.Event()
        self._pushes = asyncio.Queue(max(1, self.options.push_queue))
        self._tasks = [
            asyncio.create_task(self._run(), name="tether-agent"),
            asyncio.create_task(self._dispatch_pushes(), name="tether-agent-pushes"),
        ]
        return self

    async def __aenter__(self) -> "Agent":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the session (close code 1000) and stops. Pending sends and requests
        fail with :class:`AgentStopped`."""
        ws = self._ws
        if ws is not None:
            try:
                await asyncio.wait_for(ws.close(1000, "agent closing"), 1.0)
            except (asyncio.TimeoutError, OSError, ConnectionClosed):
                pass
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
        if not isinstance(self._state, Stopped):
            self._stop(ClosedByApplication())

    # --- state ---

    @property
    def state(self) -> State:
        return self._state

    async def wait_for(self, predicate: Callable[[State], bool]) -> State:
        """Waits until the state satisfies ``predicate`` (checked now and on each change)."""
        assert self._changed is not None, "start the agent first"
        async with self._changed:
            await self._changed.wait_for(lambda: predicate(self._state))
            return self._state

    async def connected(self) -> Session:
        """Waits until a session is open (returns it); raises :class:`AgentStopped` if the
        agent stops first."""
        state = await self.wait_for(lambda s: isinstance(s, (Connected, Stopped)))
        if isinstance(state, Connected):
            return state.session
        assert isinstance(state, Stopped)
        raise AgentStopped(state.reason)

    def _set_state(self, state: State) -> None:
        self._state = state
        if self._on_state is not None:
            try:
                self._on_state(state)
            except Exception:  # a status callback must not break the loop
                log.exception("on_state callback failed")
        if self._changed is not None:
            changed = self._changed

            async def notify() -> None:
                async with changed:
                    changed.notify_all()

            asyncio.get_running_loop().create_task(notify())

    # --- calls ---

    def _check_running(self) -> None:
        if isinstance(self._state, Stopped):
            raise AgentStopped(self._state.reason)
        if not self._tasks:
            raise TetherError("start the agent first")

    async def send(self, data: Any, id: Optional[str] = None) -> str:
        """Sends ``data`` to the upstream and waits for its ``ack``; returns the message id
        (the upstream's ``Idempotency-Key``). At-least-once: re-sent with the same id across
        reconnects and transient ``nack``\\ s; a permanent refusal raises
        :class:`SendRejected`."""
        self._check_running()
        ident = id or uuid.uuid4().hex
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = self._outbox.get(ident)
        if entry is not None:
            entry.waiters.append(future)
        else:
            self._outbox[ident] = _PendingSend(frames.to_raw(data), [future], due=_now())
        self._kick()
        await future
        return ident

    async def request(self, data: Any, timeout: Optional[float] = None) -> Any:
        """Asks the upstream and returns its answer's data (decoded), or raises
        :class:`UpstreamError` / :class:`RequestTimeout`."""
        self._check_running()
        limit = self.options.request_timeout if timeout is None else timeout
        ident = uuid.uuid4().hex
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._requests[ident] = _PendingRequest(frames.to_raw(data), limit, _now() + limit, future)
        self._kick()
        try:
            return await future
        finally:
            self._requests.pop(ident, None)

    def _kick(self) -> None:
        if self._wake is not None:
            self._wake.set()

    # --- the connection loop ---

    async def _run(self) -> None:
        attempt = 0
        try:
            while True:
                self._set_state(Connecting(attempt))
                try:
                    ws, welcome = await self._connect()
                    started = _now()
                    ended = await self._session(ws, welcome)
                    if _now() - started >= self.options.stable_after:
                        attempt = 0
                except _Ended as end:
                    ended = end.ended
                except Exception as err:  # a bug must not end the agent silently
                    log.exception("connection attempt failed unexpectedly")
                    ended = Lost() if self._epoch else Unreachable(repr(err))
                if self._closing:
                    break
                decision = decide(ended, attempt, self.options.reconnect, self._rng)
                attempt += 1
                if not isinstance(decision, Reconnect):
                    log.warning("agent stops: %s", decision.reason)
                    self._stop(decision.reason)
                    return
                # At info, in words: with the default log level a user must see why the
                # agent is not connected.
                log.info("reconnecting in %.3fs: %s", decision.delay, describe(ended))
                self._set_state(Waiting(decision.delay))
                await asyncio.sleep(decision.delay)
        except asyncio.CancelledError:
            self._stop(ClosedByApplication())
            raise
        self._stop(ClosedByApplication())

    def _stop(self, reason: StopReason) -> None:
        for entry in self._outbox.values():
            for waiter in entry.waiters:
                if not waiter.done():
                    waiter.set_exception(AgentStopped(reason))
        self._outbox.clear()
        for request in self._requests.values():
            if not request.future.done():
                request.future.set_exception(AgentStopped(reason))
        self._requests.clear()
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()
        for task in self._handlers:
            task.cancel()
        self._set_state(Stopped(reason))

    async def _connect(self) -> tuple[ClientConnection, frames.Welcome]:
        try:
            token = await fetch(self._tokens)
        except Exception as err:
            log.warning("token provider failed: %s", err)
            raise _Ended(TokenUnavailable(str(err))) from None
        try:
            return await asyncio.wait_for(self._open(token), self.options.connect_timeout)
        except asyncio.TimeoutError:
            raise _Ended(
                Unreachable(f"no welcome within the connect timeout ({self.options.connect_timeout}s)")
            ) from None

    async def _open(self, token: str) -> tuple[ClientConnection, frames.Welcome]:
        transport = self._transport
        kwargs: dict[str, Any] = {}
        try:
            if transport.proxy is not None:
                kwargs["sock"] = await transport.tunnel()
                if transport.tls is not None:
                    kwargs["ssl"] = transport.tls
                    kwargs["server_hostname"] = transport.host
            else:
                kwargs.update(transport.connect_kwargs())
            ws = await connect(
                self.url,
                subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
                additional_headers={"Authorization": f"Bearer {token}"},
                compression=None,
                proxy=None,
                open_timeout=None,
                ping_interval=self.options.ping_interval,
                ping_timeout=self.options.pong_timeout,
                close_timeout=1.0,
                max_size=self.options.max_message_bytes,
                user_agent_header="tether-agent-python",
                **kwargs,
            )
        except ConnectFailed as err:
            raise _Ended(err.ended) from None
        except InvalidStatus as err:
            response = err.response
            raise _Ended(Rejected(response.status_code, refusal_message(response.body))) from None
        except (OSError, InvalidHandshake, EOFError) as err:
            raise _Ended(_classify(err)) from None
        try:
            first = await ws.recv()
        except ConnectionClosed as err:
            raise _Ended(Closed(err.rcvd.code) if err.rcvd is not None else Lost()) from None
        message: Optional[frames.GatewayMessage] = None
        if isinstance(first, str):
            try:
                message = frames.decode(first)
            except frames.FrameError:
                message = None
        if not isinstance(message, frames.Welcome):
            log.warning("first frame was not a welcome: %r", first[:200])
            await ws.close(1002, "expected welcome")
            raise _Ended(Lost())
        return ws, message

    async def _session(self, ws: ClientConnection, welcome: frames.Welcome) -> Ended:
        self._epoch += 1
        epoch = self._epoch
        self._ws = ws
        self._hint = None
        self._refresh_in_flight = False
        self._refresh_at = self._refresh_instant(welcome.expires_at)
        for request in self._requests.values():
            request.written = False
        log.info("connected as %s (connection %s)", welcome.agent_id, welcome.connection_id)
        self._set_state(
            Connected(Session(welcome.agent_id, welcome.connection_id, welcome.expires_at, epoch))
        )
        timers = asyncio.create_task(self._timers(ws, epoch))
        try:
            async for message in ws:
                await self._on_frame(ws, message, epoch)
        except ConnectionClosed:
            pass
        finally:
            timers.cancel()
            self._ws = None
            # Whatever was written and not answered goes again on the next session.
            for entry in self._outbox.values():
                if entry.in_flight:
                    entry.in_flight = False
                    entry.due = _now()
        rcvd = ws.protocol.close_rcvd
        if rcvd is not None:
            return Closed(rcvd.code, self._hint)
        return Lost(self._hint)

    def _refresh_instant(self, expires_at: Optional[int]) -> Optional[float]:
        if expires_at is None:
            return None
        import time

        return _now() + refresh_delay(time.time(), expires_at, self.options.refresh_margin)

    async def _write(self, ws: ClientConnection, text: str) -> None:
        try:
            await asyncio.wait_for(ws.send(text), self.options.pong_timeout)
        except asyncio.TimeoutError:
            # The gateway stopped reading: the session counts as lost.
            log.warning("a write did not finish in %ss; dropping the connection", self.options.pong_timeout)
            ws.transport.abort()
        except ConnectionClosed:
            pass

    async def _timers(self, ws: ClientConnection, epoch: int) -> None:
        """Writes due sends and requests, expires requests, refreshes the token."""
        wake = self._wake
        assert wake is not None
        while True:
            now = _now()
            for ident, request in list(self._requests.items()):
                if request.deadline <= now:
                    self._requests.pop(ident, None)
                    if not request.future.done():
                        request.future.set_exception(RequestTimeout("request timed out"))
            if self._refresh_at is not None and self._refresh_at <= now and not self._refresh_in_flight:
                self._refresh_in_flight = True
                self._spawn(self._refresh(ws, epoch))
            for ident, entry in list(self._outbox.items()):
                if entry.due <= now:
                    entry.in_flight = True
                    entry.due = now + self.options.ack_timeout
                    await self._write(ws, frames.encode_send(ident, entry.data))
            for ident, request in list(self._requests.items()):
                if not request.written:
                    request.written = True
                    remaining = max(0.001, min(request.deadline - now, request.timeout))
                    await self._write(ws, frames.encode_request(ident, request.data, int(remaining * 1000)))
            deadlines = [e.due for e in self._outbox.values()] + [r.deadline for r in self._requests.values()]
            if self._refresh_at is not None and not self._refresh_in_flight:
                deadlines.append(self._refresh_at)
            timeout = max(0.0, min(deadlines) - _now()) if deadlines else None
            wake.clear()
            try:
                await asyncio.wait_for(wake.wait(), timeout)
            except asyncio.TimeoutError:
                pass

    async def _refresh(self, ws: ClientConnection, epoch: int) -> None:
        try:
            token = await fetch(self._tokens)
        except Exception as err:
            log.warning("token refresh failed; retrying: %s", err)
            self._refresh_in_flight = False
            self._refresh_at = _now() + max(1.0, self.options.reconnect.backoff.base)
            self._kick()
            return
        if epoch == self._epoch:
            await self._write(ws, frames.encode_refresh(token))

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _on_frame(self, ws: ClientConnection, message: Union[str, bytes], epoch: int) -> None:
        assert self._pushes is not None
        if isinstance(message, bytes):
            # Back-pressure: a slow push handler slows reading.
            await self._pushes.put(_PushJob(epoch, Push(None, None, binary=message)))
            return
        try:
            frame = frames.decode(message)
        except frames.FrameError as err:
            log.warning("ignoring undecodable envelope: %s", err)
            return
        if isinstance(frame, frames.PushFrame):
            await self._pushes.put(_PushJob(epoch, Push(frame.id, frame.data, ack=frame.ack)))
        elif isinstance(frame, frames.RequestFrame):
            request = Request(frame.id, frame.data, frame.timeout_ms / 1000.0)
            self._spawn(self._answer(ws, request, epoch))
        elif isinstance(frame, frames.ResponseFrame):
            pending = self._requests.pop(frame.id, None)
            if pending is not None and not pending.future.done():
                if frame.error is not None:
                    pending.future.set_exception(UpstreamError(frame.error))
                else:
                    pending.future.set_result((frame.data or RawJSON("null")).value())
        elif isinstance(frame, frames.AckFrame):
            entry = self._outbox.pop(frame.id, None)
            if entry is not None:
                for waiter in entry.waiters:
                    if not waiter.done():
                        waiter.set_result(None)
        elif isinstance(frame, frames.NackFrame):
            self._on_refused(frame.id, frame.error, frame.retry_after_ms)
        elif isinstance(frame, frames.RefreshedFrame):
            self._refresh_in_flight = False
            self._refresh_at = self._refresh_instant(frame.expires_at)
            self._kick()
            if isinstance(self._state, Connected):
                session = replace(self._state.session, expires_at=frame.expires_at)
                self._set_state(Connected(session))
            log.debug("token refreshed, expires at %s", frame.expires_at)
        elif isinstance(frame, frames.ReconnectFrame):
            log.info("gateway asked to reconnect in %sms (%s)", frame.after_ms, frame.reason)
            self._hint = frame.after_ms / 1000.0
        elif isinstance(frame, frames.ErrorFrame):
            if frame.id is not None and frame.id in self._requests:
                pending = self._requests.pop(frame.id)
                if not pending.future.done():
                    pending.future.set_exception(SendRejected(frame.error))
            elif frame.id is not None:
                self._on_refused(frame.id, frame.error, None)
            else:
                log.warning("gateway refused an envelope: %s", frame.error)

    def _on_refused(self, ident: str, error: ErrorBody, retry_after_ms: Optional[int]) -> None:
        entry = self._outbox.get(ident)
        if entry is None:
            return
        retryable = nack_is_retryable(error.code) and (
            self.options.retry_unavailable or error.code != "unavailable"
        )
        if retryable:
            delay = resend_delay(retry_after_ms, entry.nacks, self.options.reconnect.backoff, self._rng)
            entry.nacks += 1
            entry.in_flight = False
            entry.due = _now() + delay
            log.info("send %s refused (%s), retrying in %.3fs: %s", ident, error.code, delay, error.message)
            self._kick()
        else:
            self._outbox.pop(ident, None)
            for waiter in entry.waiters:
                if not waiter.done():
                    waiter.set_exception(SendRejected(error))

    async def _answer(self, ws: ClientConnection, request: Request, epoch: int) -> None:
        result: Union[RawJSON, ErrorBody]
        if self._on_request is None:
            result = ErrorBody("handler_error", "this agent has no request handler")
        else:
            try:
                value = await _call(self._on_request, request)
                result = value if isinstance(value, ErrorBody) else frames.to_raw(value)
            except HandlerError as err:
                result = err.body
            except Exception as err:
                result = ErrorBody("handler_error", str(err) or type(err).__name__)
        if epoch == self._epoch:
            await self._write(ws, frames.encode_response(request.id, result))

    async def _dispatch_pushes(self) -> None:
        """Runs the push handler on each push in order, then acks it if asked. A push
        whose id was handled recently (a redelivery) is acked without running the
        handler again; acks go out only here, after every push before it, so a
        redelivered copy is never acked while its first copy's handler still runs."""
        assert self._pushes is not None
        handled = DedupWindow(self.options.dedup_window)
        while True:
            job = await self._pushes.get()
            push = job.push
            if push.id is not None and push.id in handled:
                log.debug("redelivered push %s: acknowledged, not handled again", push.id)
            elif self._on_push is not None:
                try:
                    await _call(self._on_push, push)
                except Exception:
                    log.exception("push handler failed; push %s not acknowledged", push.id)
                    continue
                if push.id is not None:
                    handled.insert(push.id)
            elif push.id is not None:
                handled.insert(push.id)
            ws = self._ws
            if push.ack and push.id is not None and ws is not None and job.epoch == self._epoch:
                await self._write(ws, frames.encode_ack(push.id))


def _now() -> float:
    return asyncio.get_running_loop().time()


def _classify(err: BaseException) -> Ended:
    """A failure before the upgrade's answer: a certificate problem (permanent), or the
    gateway out of reach (transient). TLS errors may arrive wrapped by ``websockets``."""
    seen: Optional[BaseException] = err
    while seen is not None:
        failure = certificate_failure(seen)
        if failure is not None:
            return failure
        seen = seen.__cause__ or seen.__context__
    return Unreachable(str(err) or type(err).__name__)
