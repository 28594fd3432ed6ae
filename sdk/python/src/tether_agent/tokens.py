"""Where the agent's JWT comes from. The agent asks its token provider on every connect
and again before the current token expires (the in-band ``refresh``), so a provider that
fetches short-lived tokens from an identity service keeps a session alive indefinitely.

A provider is any zero-argument callable returning a token or an awaitable of one.
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Awaitable, Callable, Union

TokenProvider = Callable[[], Union[str, Awaitable[str]]]


class TokenError(Exception):
    """The provider could not produce a token."""


class StaticToken:
    """A fixed token (demos, tests)."""

    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self) -> str:
        return self._token

    def __repr__(self) -> str:
        return "StaticToken(***)"


class TokenFile:
    """Re-reads a file on every call, so a sidecar or a mounted Secret can rotate it."""

    def __init__(self, path: str) -> None:
        self.path = path

    async def __call__(self) -> str:
        try:
            text = await asyncio.to_thread(_read, self.path)
        except OSError as err:
            raise TokenError(f"reading {self.path}: {err}") from None
        return text.strip()

    def __repr__(self) -> str:
        return f"TokenFile({self.path!r})"


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


async def fetch(provider: TokenProvider) -> str:
    """Calls ``provider``, awaiting its result when it is awaitable."""
    token = provider()
    if inspect.isawaitable(token):
        token = await token
    if not isinstance(token, str) or not token:
        raise TokenError("the token provider returned no token")
    return token
