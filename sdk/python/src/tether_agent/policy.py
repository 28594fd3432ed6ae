"""Pure decisions of the connection loop, the same rules as the Rust SDK's
``agent/src/policy.rs``: when to reconnect, when to refresh the token, whether a refused
``send`` is worth retrying, and the window of handled push ids. No I/O and no clock of
their own (callers pass ``now`` and a random source), so each rule is unit-tested.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from typing import Optional, Union

# Close codes after which reconnecting cannot help (docs/protocol.md#close-codes):
# token invalid, replaced by a newer connection, disconnected by a backend.
TERMINAL_CLOSE_CODES = frozenset({4002, 4003, 4005})
TRY_AGAIN_LATER = 1013
TOKEN_EXPIRED = 4001


@dataclass(frozen=True)
class Backoff:
    """Exponential back-off with full jitter: retry ``n`` waits a uniformly random time
    in ``[0, min(cap, base * 2**n)]`` (seconds). Full jitter spreads a reconnect storm
    over the whole window instead of synchronising clients on the same steps."""

    base: float = 0.25
    cap: float = 30.0

    def window(self, attempt: int) -> float:
        return float(min(self.cap, self.base * float(2 ** min(attempt, 31))))

    def delay(self, attempt: int, rng: random.Random) -> float:
        return rng.uniform(0.0, self.window(attempt))


@dataclass(frozen=True)
class ReconnectPolicy:
    """The back-off for ordinary failures, and a floor added when the gateway says it is
    overloaded (close 1013, HTTP 503/429): coming back at once would add to it."""

    backoff: Backoff = field(default_factory=Backoff)
    overload_floor: float = 1.0


# === how a session or attempt ended ===


@dataclass(frozen=True)
class Rejected:
    """The gateway answered the upgrade with an HTTP error."""

    status: int
    message: str


@dataclass(frozen=True)
class Unreachable:
    """No HTTP answer: refused TCP, DNS, TLS I/O, or nothing before the deadline."""

    cause: str


@dataclass(frozen=True)
class Closed:
    """A close frame; ``hint`` is the delay of a ``reconnect`` received before it."""

    code: int
    hint: Optional[float] = None


@dataclass(frozen=True)
class Lost:
    """The transport failed without a close frame (reset, EOF, no pong)."""

    hint: Optional[float] = None


@dataclass(frozen=True)
class TokenUnavailable:
    """The token provider failed."""

    cause: str = ""


@dataclass(frozen=True)
class CertificateRejected:
    """The TLS handshake failed on a certificate (untrusted, wrong name, expired, or a
    client certificate the gateway refused)."""

    cause: str


@dataclass(frozen=True)
class ProxyRefused:
    """The HTTP proxy answered ``CONNECT`` with an error status."""

    status: int
    line: str


Ended = Union[Rejected, Unreachable, Closed, Lost, TokenUnavailable, CertificateRejected, ProxyRefused]


def describe(ended: Ended) -> str:
    """The end in words (logged at info on every reconnect)."""
    if isinstance(ended, Rejected):
        return f"the gateway answered HTTP {ended.status}{_reason(ended.message)}"
    if isinstance(ended, Unreachable):
        return f"could not reach the gateway: {ended.cause}"
    if isinstance(ended, Closed):
        text = f"the gateway closed the session with code {ended.code}"
        if ended.hint is not None:
            text += f" after asking to reconnect in {ended.hint:.3f}s"
        return text
    if isinstance(ended, Lost):
        return "the connection was lost"
    if isinstance(ended, TokenUnavailable):
        return f"the token provider failed{_reason(ended.cause)}"
    if isinstance(ended, CertificateRejected):
        return f"TLS: {ended.cause}"
    return f"the proxy refused the tunnel with HTTP {ended.status}: {ended.line}"


def _reason(message: str) -> str:
    return f": {message}" if message else ""


class StopReason(Exception):
    """Why the agent stopped for good (also the exception pending calls fail with)."""


class ClosedByApplication(StopReason):
    def __init__(self) -> None:
        super().__init__("closed by the application")


class AuthRejected(StopReason):
    def __init__(self, status: int, message: str) -> None:
        self.status, self.message = status, message
        super().__init__(f"authentication rejected with HTTP {status}{_reason(message)}")


class HttpRejected(StopReason):
    def __init__(self, status: int, message: str) -> None:
        self.status, self.message = status, message
        super().__init__(f"the gateway refused the connection with HTTP {status}{_reason(message)}")


class TlsRejected(StopReason):
    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(f"TLS: {message}")


class ProxyRejected(StopReason):
    def __init__(self, status: int, line: str) -> None:
        self.status, self.line = status, line
        super().__init__(f"the proxy refused the tunnel with HTTP {status}: {line}")


class Refused(StopReason):
    def __init__(self, code: int) -> None:
        self.code = code
        super().__init__(f"closed by the gateway with code {code}, which forbids reconnecting")


@dataclass(frozen=True)
class Reconnect:
    """Connect again after ``delay`` seconds."""

    delay: float


@dataclass(frozen=True)
class Stop:
    """Give up."""

    reason: StopReason


Decision = Union[Reconnect, Stop]


def status_is_retryable(status: int) -> bool:
    """Server errors, 408 and 429 are moments; every other status says the URL, the
    credentials or the client are wrong, and retrying would repeat it forever."""
    return status in (408, 429) or 500 <= status < 600


def decide(ended: Ended, attempt: int, policy: ReconnectPolicy, rng: random.Random) -> Decision:
    """Whether and when to reconnect; ``attempt`` counts consecutive failures since the
    last stable session (0 for the first retry)."""
    backoff = policy.backoff.delay(attempt, rng)
    if isinstance(ended, Rejected):
        if ended.status in (401, 403):
            return Stop(AuthRejected(ended.status, ended.message))
        if ended.status in (503, 429):
            return Reconnect(policy.overload_floor + backoff)
        if not status_is_retryable(ended.status):
            return Stop(HttpRejected(ended.status, ended.message))
        return Reconnect(backoff)
    if isinstance(ended, CertificateRejected):
        return Stop(TlsRejected(ended.cause))
    if isinstance(ended, ProxyRefused):
        if not status_is_retryable(ended.status):
            return Stop(ProxyRejected(ended.status, ended.line))
        return Reconnect(backoff)
    if isinstance(ended, Closed):
        if ended.code in TERMINAL_CLOSE_CODES:
            return Stop(Refused(ended.code))
        # The gateway already jittered its hint across its agents: honour it as is.
        if ended.hint is not None:
            return Reconnect(ended.hint)
        if ended.code == TRY_AGAIN_LATER:
            return Reconnect(policy.overload_floor + backoff)
        # A fresh token fixes an expiry: come back without a grown back-off (still
        # jittered, many agents may share an expiry).
        if ended.code == TOKEN_EXPIRED:
            return Reconnect(policy.backoff.delay(0, rng))
        return Reconnect(backoff)
    if isinstance(ended, Lost) and ended.hint is not None:
        return Reconnect(ended.hint)
    return Reconnect(backoff)


def refresh_delay(now: float, expires_at: int, margin: float) -> float:
    """Seconds until refreshing a token that expires at ``expires_at`` (Unix seconds):
    ``margin`` before expiry, but never later than half the remaining life, so a
    short-lived token still leaves time for a slow provider and a retry."""
    remaining = max(0.0, expires_at - now)
    return remaining - min(margin, remaining / 2)


def nack_is_retryable(code: str) -> bool:
    """Size and shape errors never succeed later; everything else is transient."""
    return code not in ("bad_request", "too_large")


def resend_delay(retry_after_ms: Optional[int], attempt: int, backoff: Backoff, rng: random.Random) -> float:
    """The gateway's ``retry_after_ms`` when given, else the back-off for this attempt."""
    if retry_after_ms is not None:
        return retry_after_ms / 1000.0
    return backoff.delay(attempt, rng)


class DedupWindow:
    """The ids of the last ``capacity`` pushes handled, so a redelivered push (a durable
    push whose ack was lost with the connection) is acknowledged without reaching the
    handler twice. Bounded: the oldest id is forgotten first; 0 turns it off."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._order: deque[str] = deque()
        self._seen: set[str] = set()

    def __contains__(self, id: str) -> bool:
        return id in self._seen

    def __len__(self) -> int:
        return len(self._order)

    def insert(self, id: str) -> None:
        if self.capacity == 0 or id in self._seen:
            return
        self._seen.add(id)
        self._order.append(id)
        while len(self._order) > self.capacity:
            self._seen.discard(self._order.popleft())
