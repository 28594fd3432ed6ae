import { strict as assert } from 'node:assert';
import { test } from 'node:test';

import { ProtocolError, decodeGatewayMessage, encodeAgentMessage, rawMember } from '../../dist/index';

test('every gateway envelope of docs/protocol.md decodes', () => {
  assert.deepEqual(
    decodeGatewayMessage(
      '{"type":"welcome","agent_id":"agent-1","connection_id":"17","expires_at":1900000000,"max_message_bytes":65536,"messages_per_second":50}',
    ),
    {
      type: 'welcome',
      agent_id: 'agent-1',
      connection_id: '17',
      expires_at: 1900000000,
      max_message_bytes: 65536,
      messages_per_second: 50,
    },
  );
  assert.deepEqual(decodeGatewayMessage('{"type":"push","id":"01J","data":{"cmd":"scan"}}'), {
    type: 'push',
    id: '01J',
    data: { cmd: 'scan' },
    rawData: '{"cmd":"scan"}',
    ack: false,
  });
  const acked = decodeGatewayMessage('{"type":"push","id":"01J","data":1,"ack":true}');
  assert.ok(acked.type === 'push' && acked.ack && acked.data === 1);
  const missing = decodeGatewayMessage('{"type":"push","id":"x"}');
  assert.ok(missing.type === 'push' && missing.data === null && missing.rawData === 'null');
  assert.deepEqual(decodeGatewayMessage('{"type":"request","id":"r1","data":{"q":"uptime"},"timeout_ms":5000}'), {
    type: 'request',
    id: 'r1',
    data: { q: 'uptime' },
    rawData: '{"q":"uptime"}',
    timeout_ms: 5000,
  });
  assert.deepEqual(decodeGatewayMessage('{"type":"response","id":"r2","error":{"code":"handler_error","message":"disk on fire"}}'), {
    type: 'response',
    id: 'r2',
    error: { code: 'handler_error', message: 'disk on fire' },
  });
  assert.deepEqual(
    decodeGatewayMessage(
      '{"type":"nack","id":"m-1","error":{"code":"upstream_error","message":"upstream answered 503"},"retry_after_ms":2000}',
    ),
    { type: 'nack', id: 'm-1', error: { code: 'upstream_error', message: 'upstream answered 503' }, retry_after_ms: 2000 },
  );
  assert.deepEqual(decodeGatewayMessage('{"type":"reconnect","after_ms":740,"reason":"drain"}'), {
    type: 'reconnect',
    after_ms: 740,
    reason: 'drain',
  });
  assert.deepEqual(decodeGatewayMessage('{"type":"refreshed","expires_at":5}'), { type: 'refreshed', expires_at: 5 });
  assert.deepEqual(decodeGatewayMessage('{"type":"ack","id":"m-1"}'), { type: 'ack', id: 'm-1' });
  const error = decodeGatewayMessage('{"type":"error","id":"x1","error":{"code":"bad_request","message":"no"}}');
  assert.deepEqual(error, { type: 'error', id: 'x1', error: { code: 'bad_request', message: 'no' } });
  // Unknown error codes are tolerated.
  const future = decodeGatewayMessage('{"type":"nack","id":"m","error":{"code":"brand_new","message":"m"}}');
  assert.ok(future.type === 'nack' && future.error.code === 'brand_new');
});

test('malformed envelopes are refused with a ProtocolError', () => {
  for (const text of [
    'not json',
    '[1,2]',
    '{"type":"launch","id":"x"}',
    '{"type":"push","data":1}',
    '{"type":"push","id":"","data":1}',
    `{"type":"push","id":"${'x'.repeat(129)}","data":1}`,
    '{"type":"ack","id":"a\\u0007b"}',
    '{"type":"welcome"}',
  ]) {
    assert.throws(() => decodeGatewayMessage(text), ProtocolError, text);
  }
});

test('data is kept byte for byte: big integers, number spellings, key order, spacing', () => {
  const data = '{ "z" : 12345678901234567890123, "a":[1.50, 1e3, {"k":"}]\\"{"}], "n":null }';
  const text = `{"type":"push","data": ${data} ,"id":"p1","ack":true}`;
  const push = decodeGatewayMessage(text);
  assert.ok(push.type === 'push');
  assert.equal(push.rawData, data);
  assert.equal(rawMember('{"a":"data","data":"x\\"y"}', 'data'), '"x\\"y"');
  assert.equal(rawMember('{"nested":{"data":1},"data":true}', 'data'), 'true');
  assert.equal(rawMember('{"nested":{"data":1}}', 'data'), undefined);
  assert.equal(rawMember('{}', 'data'), undefined);
});

test('agent envelopes encode with data verbatim', () => {
  assert.equal(
    encodeAgentMessage({ type: 'send', id: 'm-1', data: '{"temp":21}' }),
    '{"type":"send","id":"m-1","data":{"temp":21}}',
  );
  assert.equal(
    encodeAgentMessage({ type: 'request', id: 'r', data: '1', timeout_ms: 5000 }),
    '{"type":"request","id":"r","data":1,"timeout_ms":5000}',
  );
  assert.equal(encodeAgentMessage({ type: 'response', id: 'r1', data: '{"uptime":42}' }), '{"type":"response","id":"r1","data":{"uptime":42}}');
  assert.deepEqual(JSON.parse(encodeAgentMessage({ type: 'response', id: 'r2', error: { code: 'handler_error', message: 'x' } })), {
    type: 'response',
    id: 'r2',
    error: { code: 'handler_error', message: 'x' },
  });
  assert.equal(encodeAgentMessage({ type: 'ack', id: '01J' }), '{"type":"ack","id":"01J"}');
  assert.equal(encodeAgentMessage({ type: 'refresh', token: 'eyJ' }), '{"type":"refresh","token":"eyJ"}');
});
