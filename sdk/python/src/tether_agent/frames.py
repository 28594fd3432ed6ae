"""The tether.v1 envelopes (docs/protocol.md): decoding what the gateway sends and
encoding what the agent sends. Pure: no I/O.

``data`` is passed through byte for byte, as the protocol asks: the decoder keeps the
raw JSON text of every top-level value (:func:`raw_members`), so a push's data reaches
the application (and the CLI's output) exactly as the backend wrote it, and a reply given
as :class:`RawJSON` is sent without re-encoding.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional, Union

_DECODER = json.JSONDecoder()
_WS = " \t\n\r"


class FrameError(ValueError):
    """A text frame that is not a tether.v1 envelope."""


@dataclass(frozen=True)
class RawJSON:
    """JSON text sent as is (no re-encoding). Build it with :meth:`parse` to check it."""

    text: str

    @classmethod
    def parse(cls, text: str) -> "RawJSON":
        """Checks that ``text`` is one JSON value; raises ``ValueError`` otherwise."""
        json.loads(text)
        return cls(text.strip())

    def value(self) -> Any:
        """The decoded value."""
        return json.loads(self.text)


@dataclass(frozen=True)
class ErrorBody:
    """``{"code", "message"}``: ``code`` for programs (unknown codes are kept), ``message``
    for people."""

    code: str
    message: str

    def to_json(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


def _skip(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def raw_members(text: str) -> dict[str, str]:
    """The top-level members of a JSON object, each value as its raw JSON text.

    Raises :class:`FrameError` if ``text`` is not exactly one JSON object."""
    try:
        i = _skip(text, 0)
        if i >= len(text) or text[i] != "{":
            raise FrameError("an envelope is a JSON object")
        i = _skip(text, i + 1)
        members: dict[str, str] = {}
        if i < len(text) and text[i] == "}":
            i += 1
        else:
            while True:
                key, i = _DECODER.raw_decode(text, i)
                if not isinstance(key, str):
                    raise FrameError("object keys are strings")
                i = _skip(text, i)
                if i >= len(text) or text[i] != ":":
                    raise FrameError("expected `:`")
                i = _skip(text, i + 1)
                _, end = _DECODER.raw_decode(text, i)
                members[key] = text[i:end]
                i = _skip(text, end)
                if i < len(text) and text[i] == ",":
                    i = _skip(text, i + 1)
                    continue
                if i < len(text) and text[i] == "}":
                    i += 1
                    break
                raise FrameError("expected `,` or `}`")
        if _skip(text, i) != len(text):
            raise FrameError("trailing characters after the envelope")
        return members
    except json.JSONDecodeError as err:
        raise FrameError(f"not JSON: {err}") from err


# === gateway -> agent ===


@dataclass(frozen=True)
class Welcome:
    agent_id: str
    connection_id: str
    expires_at: Optional[int]
    max_message_bytes: int
    messages_per_second: int


@dataclass(frozen=True)
class PushFrame:
    id: str
    data: RawJSON
    ack: bool


@dataclass(frozen=True)
class RequestFrame:
    id: str
    data: RawJSON
    timeout_ms: int


@dataclass(frozen=True)
class ResponseFrame:
    id: str
    data: Optional[RawJSON]
    error: Optional[ErrorBody]


@dataclass(frozen=True)
class AckFrame:
    id: str


@dataclass(frozen=True)
class NackFrame:
    id: str
    error: ErrorBody
    retry_after_ms: Optional[int]


@dataclass(frozen=True)
class RefreshedFrame:
    expires_at: Optional[int]


@dataclass(frozen=True)
class ReconnectFrame:
    after_ms: int
    reason: str


@dataclass(frozen=True)
class ErrorFrame:
    id: Optional[str]
    error: ErrorBody


GatewayMessage = Union[
    Welcome,
    PushFrame,
    RequestFrame,
    ResponseFrame,
    AckFrame,
    NackFrame,
    RefreshedFrame,
    ReconnectFrame,
    ErrorFrame,
]

_NULL = RawJSON("null")


def _error(value: Any) -> ErrorBody:
    if not isinstance(value, dict):
        raise FrameError("`error` is an object")
    code, message = value.get("code"), value.get("message", "")
    if not isinstance(code, str) or not isinstance(message, str):
        raise FrameError("`error` has a string `code` and `message`")
    return ErrorBody(code, message)


def _str(obj: dict[str, Any], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise FrameError(f"`{key}` is a string")
    return value


def _int(obj: dict[str, Any], key: str, default: Optional[int] = None) -> int:
    value = obj.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise FrameError(f"`{key}` is an integer")
    return value


def _opt_int(obj: dict[str, Any], key: str) -> Optional[int]:
    return None if obj.get(key) is None else _int(obj, key)


def decode(text: str) -> GatewayMessage:
    """Decodes one text frame from the gateway. Unknown fields are ignored; an unknown
    ``type`` is a :class:`FrameError`."""
    raw = raw_members(text)
    obj = {k: json.loads(v) for k, v in raw.items() if k != "data"}
    kind = obj.get("type")
    data = RawJSON(raw["data"]) if "data" in raw else _NULL
    if kind == "welcome":
        return Welcome(
            agent_id=_str(obj, "agent_id"),
            connection_id=_str(obj, "connection_id"),
            expires_at=_opt_int(obj, "expires_at"),
            max_message_bytes=_int(obj, "max_message_bytes", 0),
            messages_per_second=_int(obj, "messages_per_second", 0),
        )
    if kind == "push":
        return PushFrame(id=_str(obj, "id"), data=data, ack=obj.get("ack") is True)
    if kind == "request":
        return RequestFrame(id=_str(obj, "id"), data=data, timeout_ms=_int(obj, "timeout_ms"))
    if kind == "response":
        error = obj.get("error")
        if error is not None:
            return ResponseFrame(id=_str(obj, "id"), data=None, error=_error(error))
        return ResponseFrame(id=_str(obj, "id"), data=data, error=None)
    if kind == "ack":
        return AckFrame(id=_str(obj, "id"))
    if kind == "nack":
        return NackFrame(
            id=_str(obj, "id"),
            error=_error(obj.get("error")),
            retry_after_ms=_opt_int(obj, "retry_after_ms"),
        )
    if kind == "refreshed":
        return RefreshedFrame(expires_at=_opt_int(obj, "expires_at"))
    if kind == "reconnect":
        return ReconnectFrame(after_ms=_int(obj, "after_ms"), reason=str(obj.get("reason", "")))
    if kind == "error":
        ident = obj.get("id")
        return ErrorFrame(id=ident if isinstance(ident, str) else None, error=_error(obj.get("error")))
    raise FrameError(f"unknown envelope type {kind!r}")


# === agent -> gateway ===


def _envelope(kind: str, fields: dict[str, Any], data: Optional[RawJSON] = None) -> str:
    head = json.dumps({"type": kind, **fields}, separators=(",", ":"))
    if data is None:
        return head
    return head[:-1] + ',"data":' + data.text + "}"


def encode_send(id: str, data: RawJSON) -> str:
    return _envelope("send", {"id": id}, data)


def encode_request(id: str, data: RawJSON, timeout_ms: Optional[int]) -> str:
    fields: dict[str, Any] = {"id": id}
    if timeout_ms is not None:
        fields["timeout_ms"] = timeout_ms
    return _envelope("request", fields, data)


def encode_response(id: str, result: Union[RawJSON, ErrorBody]) -> str:
    if isinstance(result, ErrorBody):
        return _envelope("response", {"id": id, "error": result.to_json()})
    return _envelope("response", {"id": id}, result)


def encode_ack(id: str) -> str:
    return _envelope("ack", {"id": id})


def encode_refresh(token: str) -> str:
    return _envelope("refresh", {"token": token})


def to_raw(value: Any) -> RawJSON:
    """A value as JSON: :class:`RawJSON` as is, anything else through ``json.dumps``."""
    if isinstance(value, RawJSON):
        return value
    return RawJSON(json.dumps(value, separators=(",", ":")))


__all__ = [
    "AckFrame",
    "ErrorBody",
    "ErrorFrame",
    "FrameError",
    "GatewayMessage",
    "NackFrame",
    "PushFrame",
    "RawJSON",
    "ReconnectFrame",
    "RefreshedFrame",
    "RequestFrame",
    "ResponseFrame",
    "Welcome",
    "decode",
    "raw_members",
    "to_raw",
]
