/**
 * The SDK against a real gateway process on 127.0.0.1: pushes with and without acks,
 * de-duplication, requests both ways, in-band refresh with new groups, a drain hint
 * honoured over a ten-minute back-off, at-least-once send across upstream failures, and
 * the refusals that stop the agent.
 */

import { strict as assert } from 'node:assert';
import { once } from 'node:events';
import * as fs from 'node:fs';
import { after, before, test } from 'node:test';

import { Agent, AgentOptions, HandlerError, Push, Session, StopReason, StoppedError } from '../../dist/index';
import { Gateway, forwarder, tempDir, token, upstream, upstreamYaml, waitFor, within } from './support';

const fast: Partial<AgentOptions> = { reconnect: { backoff: { baseMs: 50, capMs: 400 }, overloadFloorMs: 100 } };

let dir: string;
let gateway: Gateway;
const cleanups: (() => unknown)[] = [];

before(async () => {
  dir = tempDir();
  gateway = await Gateway.start(dir);
});

after(async () => {
  for (const cleanup of cleanups.reverse()) await cleanup();
  await gateway.stop();
  fs.rmSync(dir, { recursive: true, force: true });
});

function agent(options: Partial<AgentOptions> & { token: AgentOptions['token'] }): Agent {
  const a = new Agent({ url: gateway.url, proxy: 'direct', ...fast, ...options }).start();
  cleanups.push(() => a.close());
  return a;
}

test('pushes reach the handler in order; an acked push answers 200 once the handler returned; binary frames arrive as bytes', async () => {
  const pushes: Push[] = [];
  let release!: () => void;
  const held = new Promise<void>((resolve) => (release = resolve));
  const a = agent({
    token: token('p1'),
    onPush: async (push) => {
      pushes.push(push);
      if ((push.data as { hold?: boolean })?.hold) await held;
    },
  });
  const session = await within('a session', a.connected());
  assert.equal(session.agentId, 'p1');
  assert.equal((await gateway.push('p1', { n: 1 })).status, 202);
  await waitFor('the first push', () => pushes.length === 1);
  assert.deepEqual(pushes[0].data, { n: 1 });
  assert.equal(pushes[0].rawData, '{"n":1}');
  assert.equal(pushes[0].ack, false);

  // The ack waits for the handler: the backend's 200 comes only after it returned.
  let answered = false;
  const acked = gateway.push('p1', { hold: true }, '?ack=true&timeout_ms=10000').then((r) => {
    answered = true;
    return r;
  });
  await waitFor('the held push', () => pushes.length === 2);
  assert.equal(pushes[1].ack, true);
  await new Promise((resolve) => setTimeout(resolve, 200));
  assert.equal(answered, false, 'acknowledged before the handler returned');
  release();
  assert.equal((await acked).status, 200);

  const binary = await fetch(`http://${gateway.internalAddr}/v1/agents/p1/messages`, {
    method: 'POST',
    headers: { Authorization: `Bearer integration-key-0123456789`, 'Content-Type': 'application/octet-stream' },
    body: Buffer.from([1, 2, 3, 4]),
  });
  assert.equal(binary.status, 202);
  await waitFor('the binary push', () => pushes.length === 3);
  assert.deepEqual(pushes[2].binary, Buffer.from([1, 2, 3, 4]));
  assert.equal(pushes[2].id, undefined);
});

test('a push repeated with the same id is acknowledged without reaching the handler twice', async () => {
  const handled: unknown[] = [];
  const a = agent({ token: token('dd1'), onPush: (push) => void handled.push(push.data) });
  await within('a session', a.connected());
  const key = { 'Idempotency-Key': 'dup-1' };
  assert.equal((await gateway.push('dd1', { copy: 1 }, '?ack=true&timeout_ms=5000', key)).status, 200);
  // The backend's retry with the same key: acknowledged (200), not handled again.
  assert.equal((await gateway.push('dd1', { copy: 2 }, '?ack=true&timeout_ms=5000', key)).status, 200);
  assert.equal((await gateway.push('dd1', { other: true }, '?ack=true&timeout_ms=5000')).status, 200);
  assert.deepEqual(handled, [{ copy: 1 }, { other: true }]);
});

test('a backend request is answered by the handler, and a throwing handler answers its error', async () => {
  const a = agent({
    token: token('q1'),
    onRequest: async (request) => {
      const data = request.data as { fail?: boolean };
      if (data.fail) throw new HandlerError('disk on fire');
      return { echo: request.data, timeoutMs: request.timeoutMs };
    },
  });
  await within('a session', a.connected());
  const ok = await gateway.api('POST', '/v1/agents/q1/requests?timeout_ms=5000', { x: 1 });
  assert.equal(ok.status, 200);
  assert.deepEqual(ok.body.echo, { x: 1 });
  assert.ok(ok.body.timeoutMs > 0 && ok.body.timeoutMs <= 5000);
  const failed = await gateway.api('POST', '/v1/agents/q1/requests?timeout_ms=5000', { fail: true });
  assert.equal(failed.status, 502);
  assert.match(failed.text, /disk on fire/);
});

test('the token is refreshed in band before it expires, on the same connection, and its new groups apply', async () => {
  let minted = 0;
  const pushes: unknown[] = [];
  const a = agent({
    // Three-second tokens: the refresh comes at half the remaining life.
    token: () => token('r1', { ttlSeconds: 3, groups: minted++ === 0 ? ['old'] : ['new'] }),
    onPush: (push) => void pushes.push(push.data),
  });
  const first = await within('a session', a.connected());
  const refreshed = await within('a refresh', once(a, 'refreshed').then(([s]) => s as Session));
  assert.equal(refreshed.number, first.number);
  assert.equal(refreshed.connectionId, first.connectionId);
  assert.ok(refreshed.expiresAt! >= first.expiresAt!);
  const sent = await gateway.api('POST', '/v1/groups/new/messages', { to: 'new' });
  assert.equal(sent.status, 202);
  assert.equal(sent.body.delivered, 1);
  await waitFor('the group push', () => pushes.length === 1);
  // A second refresh lands past the first token's expiry: still the same session.
  const again = await within('a second refresh', once(a, 'refreshed').then(([s]) => s as Session));
  assert.equal(again.connectionId, first.connectionId);
  assert.ok(again.expiresAt! > first.expiresAt!);
  assert.equal(a.state.kind, 'connected');
});

test('a drain hint is honoured over a ten-minute back-off', async () => {
  const dir2 = tempDir();
  const second = await Gateway.start(dir2);
  cleanups.push(() => second.stop(), () => fs.rmSync(dir2, { recursive: true, force: true }));
  const dir3 = tempDir();
  const first = await Gateway.start(dir3);
  cleanups.push(() => first.stop(), () => fs.rmSync(dir3, { recursive: true, force: true }));
  // A TCP forwarder stands in for the Service: new connections go where it points.
  let target = first.publicPort;
  const service = await forwarder(() => target);
  cleanups.push(service.close);
  const reasons: string[] = [];
  const a = agent({
    url: `ws://127.0.0.1:${service.port}/v1/connect`,
    token: token('h1'),
    reconnect: { backoff: { baseMs: 600_000, capMs: 600_000 }, overloadFloorMs: 0 },
  });
  a.on('reconnecting', ({ reason }) => reasons.push(reason));
  const one = await within('a session', a.connected());
  target = second.publicPort;
  await first.drain();
  await waitFor('a second session', () => a.state.kind === 'connected' && a.state.session.number > one.number);
  assert.ok(await second.connected('h1'));
  assert.match(reasons[0], /code 1012 after asking to reconnect in 0 ms/);
});

test('a send is delivered at least once across two 503s from the upstream, with one idempotency key; requests reach it', async () => {
  const backend = await upstream((call, n) => {
    if (call.body.type === 'request') return { status: 200, body: { answer: call.body.data } };
    return { status: n <= 2 ? 503 : 200 };
  });
  cleanups.push(backend.close);
  const dir2 = tempDir();
  const gw = await Gateway.start(dir2, { extraYaml: upstreamYaml(dir2, backend.url) });
  cleanups.push(() => gw.stop(), () => fs.rmSync(dir2, { recursive: true, force: true }));
  const a = agent({ url: gw.url, token: token('s1') });
  await within('the ack', a.send({ temp: 21 }));
  assert.equal(backend.calls.length, 3);
  const keys = new Set(backend.calls.map((c) => c.idempotencyKey));
  assert.equal(keys.size, 1, 'one idempotency key for every attempt');
  assert.deepEqual(backend.calls[2].body, { type: 'message', agent_id: 's1', id: [...keys][0], data: { temp: 21 } });
  assert.deepEqual(await within('the answer', a.request({ q: 'config' })), { answer: { q: 'config' } });
});

test('refusals stop the agent with the gateway reason: a bad signature (401), a wrong path (404), a backend disconnect (4005)', async () => {
  const attempts = (a: Agent) => {
    const counter = { reconnects: 0 };
    a.on('reconnecting', () => counter.reconnects++);
    return counter;
  };
  const forged = agent({ token: token('x1', { secret: 'another-secret-of-at-least-32-bytes!!' }) });
  const forgedCount = attempts(forged);
  const reason: StopReason = await within('a stop', forged.stopped());
  assert.equal(reason.kind, 'auth_rejected');
  assert.ok(reason.kind === 'auth_rejected' && reason.status === 401);
  assert.equal(forgedCount.reconnects, 0, 'no retry of a refused token');

  const wrongPath = agent({ url: gateway.url.replace('/v1/connect', '/v1/nothing'), token: token('x2') });
  assert.deepEqual(await within('a stop', wrongPath.stopped()), {
    kind: 'http_rejected',
    status: 404,
    message: 'agents connect at GET /v1/connect',
  });

  const gone = agent({ token: token('x3') });
  await within('a session', gone.connected());
  assert.equal((await gateway.api('DELETE', '/v1/agents/x3')).status, 204);
  assert.deepEqual(await within('a stop', gone.stopped()), { kind: 'refused', code: 4005 });
  await assert.rejects(gone.send({ late: true }), StoppedError);
});
