"""Tether agent SDK for Python (asyncio): a resilient ``tether.v1`` client.

```python
from tether_agent import Agent, TokenFile

async def on_push(push):
    print(push.id, push.data)

async with Agent("wss://gw.example/v1/connect", TokenFile("/run/token"), on_push=on_push) as agent:
    await agent.connected()
    await agent.send({"temp": 21})
```

The protocol is docs/protocol.md; the semantics are the Rust SDK's (``agent/``): token
provider with in-band refresh, jittered reconnect honouring close codes and reconnect
hints, push/request handlers, upstream send with ack, durable acks de-duplicated by a
bounded window, groups (claims of the token), TLS and HTTP CONNECT proxies.
"""

from .client import (
    Agent,
    AgentStopped,
    Connected,
    Connecting,
    HandlerError,
    InvalidUrl,
    Options,
    Push,
    Request,
    RequestTimeout,
    SendRejected,
    Session,
    State,
    Stopped,
    TetherError,
    UpstreamError,
    Waiting,
)
from .frames import ErrorBody, RawJSON
from .policy import Backoff, ReconnectPolicy, StopReason
from .tokens import StaticToken, TokenError, TokenFile, TokenProvider
from .transport import ClientCert, Direct, FromEnv, Proxy, TlsOptions, TransportError

__all__ = [
    "Agent",
    "AgentStopped",
    "Backoff",
    "ClientCert",
    "Connected",
    "Connecting",
    "Direct",
    "ErrorBody",
    "FromEnv",
    "HandlerError",
    "InvalidUrl",
    "Options",
    "Proxy",
    "Push",
    "RawJSON",
    "ReconnectPolicy",
    "Request",
    "RequestTimeout",
    "SendRejected",
    "Session",
    "State",
    "StaticToken",
    "StopReason",
    "Stopped",
    "TetherError",
    "TlsOptions",
    "TokenError",
    "TokenFile",
    "TokenProvider",
    "TransportError",
    "UpstreamError",
    "Waiting",
]
