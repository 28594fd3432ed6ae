"""Envelope decoding and encoding: data passes through byte for byte."""

import json

import pytest

from tether_agent import frames
from tether_agent.frames import ErrorBody, FrameError, RawJSON


def test_push_keeps_its_data_byte_for_byte():
    text = '{"type":"push","id":"01J","data":{"b": 2.50, "a":[1, 1e3]},"ack":true}'
    frame = frames.decode(text)
    assert isinstance(frame, frames.PushFrame)
    assert frame.data.text == '{"b": 2.50, "a":[1, 1e3]}'
    assert frame.ack and frame.id == "01J"
    assert frame.data.value() == {"b": 2.5, "a": [1, 1000.0]}


def test_protocol_examples_decode():
    welcome = frames.decode(
        '{"type":"welcome","agent_id":"agent-1","connection_id":"17","expires_at":1900000000,'
        '"max_message_bytes":65536,"messages_per_second":50}'
    )
    assert welcome == frames.Welcome("agent-1", "17", 1900000000, 65536, 50)
    assert frames.decode('{"type":"push","id":"01J","data":1}') == frames.PushFrame("01J", RawJSON("1"), False)
    assert frames.decode('{"type":"request","id":"r1","data":{"q":"uptime"},"timeout_ms":5000}') == (
        frames.RequestFrame("r1", RawJSON('{"q":"uptime"}'), 5000)
    )
    nack = frames.decode(
        '{"type":"nack","id":"m-1","error":{"code":"upstream_error","message":"upstream answered 503"},'
        '"retry_after_ms":2000}'
    )
    assert nack == frames.NackFrame("m-1", ErrorBody("upstream_error", "upstream answered 503"), 2000)
    assert frames.decode('{"type":"reconnect","after_ms":740,"reason":"drain"}') == frames.ReconnectFrame(740, "drain")
    assert frames.decode('{"type":"refreshed","expires_at":5}') == frames.RefreshedFrame(5)
    error = frames.decode('{"type":"error","id":"x1","error":{"code":"bad_request","message":"m"}}')
    assert error == frames.ErrorFrame("x1", ErrorBody("bad_request", "m"))
    response = frames.decode('{"type":"response","id":"r2","error":{"code":"handler_error","message":"disk"}}')
    assert response == frames.ResponseFrame("r2", None, ErrorBody("handler_error", "disk"))
    # A missing data means null; unknown fields and unknown error codes are tolerated.
    assert frames.decode('{"type":"push","id":"p","extra":[1]}') == frames.PushFrame("p", RawJSON("null"), False)
    nack = frames.decode('{"type":"nack","id":"m","error":{"code":"new_code","message":""}}')
    assert isinstance(nack, frames.NackFrame) and nack.error.code == "new_code"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "[]",
        '{"type":"launch"}',
        '{"type":"push"}',
        '{"type":"push","id":1}',
        '{"type":"request","id":"r"}',
        '{"type":"push","id":"p"} trailing',
        '{"type":"push","id":"p",}',
        '{"type":"push" "id":"p"}',
        "{not json}",
    ],
)
def test_malformed_envelopes_are_refused(text):
    with pytest.raises(FrameError):
        frames.decode(text)


def test_raw_members_handles_nesting_strings_and_whitespace():
    text = ' { "a" : "x,}\\"y" , "b":{"c":[1,{"d":"}"}]} ,"e":null } '
    assert frames.raw_members(text) == {"a": '"x,}\\"y"', "b": '{"c":[1,{"d":"}"}]}', "e": "null"}
    assert frames.raw_members("{}") == {}


def test_encodings_are_the_protocols_envelopes():
    assert json.loads(frames.encode_send("m-1", RawJSON('{"temp":21}'))) == {"type": "send", "id": "m-1", "data": {"temp": 21}}
    assert frames.encode_send("m", RawJSON("2.50")).endswith('"data":2.50}')
    assert json.loads(frames.encode_ack("01J")) == {"type": "ack", "id": "01J"}
    assert json.loads(frames.encode_refresh("t")) == {"type": "refresh", "token": "t"}
    assert json.loads(frames.encode_request("r", RawJSON("1"), 500)) == {"type": "request", "id": "r", "timeout_ms": 500, "data": 1}
    assert json.loads(frames.encode_response("r", ErrorBody("handler_error", "no"))) == {
        "type": "response",
        "id": "r",
        "error": {"code": "handler_error", "message": "no"},
    }
    assert json.loads(frames.encode_response("r", frames.to_raw({"ok": True}))) == {"type": "response", "id": "r", "data": {"ok": True}}


def test_raw_json_parse_checks_its_text():
    assert RawJSON.parse(' {"a":1} ').text == '{"a":1}'
    with pytest.raises(ValueError):
        RawJSON.parse("{nope")
