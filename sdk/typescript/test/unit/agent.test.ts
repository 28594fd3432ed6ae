/**
 * Narrow tests of the connection loop against a scripted WebSocket server in the test
 * (the `ws` package's server): what the real gateway rarely does on demand — a peer that
 * stops answering, a nack and a lost session in the middle of a send, a 503 before the
 * upgrade. Behaviour against the real gateway is in test/integration.
 */

import { strict as assert } from 'node:assert';
import * as http from 'node:http';
import type { AddressInfo } from 'node:net';
import { after, test } from 'node:test';
import { WebSocket, WebSocketServer } from 'ws';

import { Agent, AgentOptions, RejectedError } from '../../dist/index';

const fast: Partial<AgentOptions> = {
  reconnect: { backoff: { baseMs: 20, capMs: 100 }, overloadFloorMs: 20 },
  proxy: 'direct',
  env: () => undefined,
};

interface Scripted {
  url: string;
  /** Sockets accepted, in order, each with the text frames it received. */
  sockets: { ws: WebSocket; frames: any[] }[];
  /** Upgrade attempts, including refused ones. */
  attempts: number;
  close: () => void;
}

const servers: Scripted[] = [];
after(() => servers.forEach((s) => s.close()));

/** A server that welcomes every connection unless `refuse(attempt)` gives a status. */
async function scripted(refuse: (attempt: number) => number | undefined = () => undefined): Promise<Scripted> {
  const server = http.createServer();
  const wss = new WebSocketServer({ noServer: true, handleProtocols: (protocols) => (protocols.has('tether.v1') ? 'tether.v1' : false) });
  const state: Scripted = { url: '', sockets: [], attempts: 0, close: () => {} };
  server.on('upgrade', (req, socket, head) => {
    state.attempts++;
    const status = refuse(state.attempts);
    if (status !== undefined) {
      const body = JSON.stringify({ error: { code: 'unavailable', message: 'gateway is draining' } });
      socket.end(`HTTP/1.1 ${status} Refused\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\nConnection: close\r\n\r\n${body}`);
      return;
    }
    assert.equal(req.headers.authorization, 'Bearer t0k3n');
    wss.handleUpgrade(req, socket, head, (ws) => {
      const entry = { ws, frames: [] as any[] };
      state.sockets.push(entry);
      ws.on('message', (data, isBinary) => {
        if (!isBinary) entry.frames.push(JSON.parse(data.toString()));
      });
      ws.send(JSON.stringify({ type: 'welcome', agent_id: 'a1', connection_id: String(state.sockets.length), max_message_bytes: 65536, messages_per_second: 50 }));
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  state.url = `ws://127.0.0.1:${(server.address() as AddressInfo).port}/v1/connect`;
  state.close = () => {
    wss.clients.forEach((c) => c.terminate());
    server.close();
  };
  servers.push(state);
  return state;
}

async function until<T>(what: string, check: () => T, ms = 5000): Promise<T> {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

function start(server: Scripted, options: Partial<AgentOptions> = {}): Agent {
  const agent = new Agent({ url: server.url, token: 't0k3n', ...fast, ...options }).start();
  after(() => agent.close());
  return agent;
}

test('a send is retried after a nack with its hint and re-sent on the next session with the same id until acked', async () => {
  const server = await scripted();
  const agent = start(server);
  const sent = agent.send({ temp: 21 });
  const first = await until('the first send', () => server.sockets[0]?.frames.find((f) => f.type === 'send'));
  assert.deepEqual(first.data, { temp: 21 });
  server.sockets[0].ws.send(JSON.stringify({ type: 'nack', id: first.id, error: { code: 'upstream_error', message: 'upstream answered 503' }, retry_after_ms: 10 }));
  await until('the retry', () => server.sockets[0].frames.filter((f) => f.type === 'send').length === 2);
  // The session ends before the ack: the next session writes the same id again.
  server.sockets[0].ws.close(1011);
  const again = await until('the resend', () => server.sockets[1]?.frames.find((f) => f.type === 'send'));
  assert.equal(again.id, first.id);
  server.sockets[1].ws.send(JSON.stringify({ type: 'ack', id: first.id }));
  await sent;
});

test('a permanent nack fails the send; with retryUnavailable false so does unavailable', async () => {
  const server = await scripted();
  const agent = start(server, { retryUnavailable: false });
  const tooBig = agent.send({ big: true });
  const unavailable = agent.send({ nobody: true });
  const frames = (await until('two sends', () => {
    const sends = server.sockets[0]?.frames.filter((f) => f.type === 'send') ?? [];
    return sends.length === 2 ? sends : undefined;
  })) as any[];
  const ws = server.sockets[0].ws;
  ws.send(JSON.stringify({ type: 'nack', id: frames[0].id, error: { code: 'too_large', message: 'too large' } }));
  ws.send(JSON.stringify({ type: 'nack', id: frames[1].id, error: { code: 'unavailable', message: 'no upstream receives agent messages' } }));
  await assert.rejects(tooBig, (err: Error) => err instanceof RejectedError && err.body.code === 'too_large');
  await assert.rejects(unavailable, /no upstream receives agent messages/);
});

test('a gateway that stops answering pings counts as dead and is replaced', async () => {
  const server = await scripted();
  const agent = start(server, { pingIntervalMs: 50, pongTimeoutMs: 50 });
  await agent.connected();
  // The server stops reading: no pong, no frame.
  (server.sockets[0].ws as any)._socket.pause();
  const reasons: string[] = [];
  agent.on('reconnecting', ({ reason }) => reasons.push(reason));
  await until('a second session', () => server.sockets.length === 2 && agent.state.kind === 'connected');
  assert.deepEqual(reasons, ['the connection was lost']);
});

test('HTTP 503 before the upgrade is retried with its reason; requests are answered, pushes acked after the handler', async () => {
  const server = await scripted((attempt) => (attempt <= 2 ? 503 : undefined));
  const handled: string[] = [];
  const agent = start(server, {
    onPush: (push) => void handled.push(push.id!),
    onRequest: (request) => ({ echo: request.data }),
  });
  const reasons: string[] = [];
  agent.on('reconnecting', ({ reason }) => reasons.push(reason));
  await agent.connected();
  assert.deepEqual(reasons, ['the gateway answered HTTP 503: gateway is draining', 'the gateway answered HTTP 503: gateway is draining']);
  const ws = server.sockets[0].ws;
  ws.send('{"type":"push","id":"p1","data":{"n":1},"ack":true}');
  ws.send('{"type":"push","id":"p1","data":{"n":1},"ack":true}'); // a redelivery
  ws.send('{"type":"request","id":"r1","data":[1,2],"timeout_ms":1000}');
  ws.send('{"type":"launch","id":"x"}'); // unknown: ignored, the session stays
  await until('two acks and a response', () => server.sockets[0].frames.length === 3);
  const frames = server.sockets[0].frames;
  assert.deepEqual(frames.filter((f) => f.type === 'ack'), [{ type: 'ack', id: 'p1' }, { type: 'ack', id: 'p1' }]);
  assert.deepEqual(frames.find((f) => f.type === 'response'), { type: 'response', id: 'r1', data: { echo: [1, 2] } });
  assert.deepEqual(handled, ['p1']);
  assert.equal(agent.state.kind, 'connected');
});

test('close codes 4002, 4003 and 4005 stop the agent; close() ends it with 1000', async () => {
  for (const code of [4002, 4003, 4005]) {
    const server = await scripted();
    const agent = start(server);
    await agent.connected();
    const pending = agent.request({ q: 1 }, { timeoutMs: 5000 });
    server.sockets[0].ws.close(code);
    assert.deepEqual(await agent.stopped(), { kind: 'refused', code });
    await assert.rejects(pending, /closed by the gateway with code/);
  }
  const server = await scripted();
  const agent = start(server);
  await agent.connected();
  const closed = new Promise<number>((resolve) => server.sockets[0].ws.once('close', resolve));
  await agent.close();
  assert.equal(await closed, 1000);
  assert.deepEqual(agent.state, { kind: 'stopped', reason: { kind: 'closed' } });
});

test('pushes() yields each push and acknowledges it when the loop asks for the next one', async () => {
  const server = await scripted();
  const agent = start(server);
  await agent.connected();
  const ws = server.sockets[0].ws;
  ws.send('{"type":"push","id":"i1","data":1,"ack":true}');
  ws.send('{"type":"push","id":"i2","data":2,"ack":true}');
  const seen: unknown[] = [];
  for await (const push of agent.pushes()) {
    seen.push(push.data);
    // While the body runs, this push is not acknowledged yet.
    await new Promise((resolve) => setTimeout(resolve, 50));
    assert.equal(server.sockets[0].frames.filter((f) => f.id === push.id).length, 0);
    if (seen.length === 2) break;
  }
  assert.deepEqual(seen, [1, 2]);
  await until('both acks', () => server.sockets[0].frames.length === 2);
  assert.deepEqual(server.sockets[0].frames.map((f) => f.id), ['i1', 'i2']);
  assert.throws(() => agent.pushes(), /one consumer/);
});

test('a request is written again on the next session within its deadline, and resolves with the answer', async () => {
  const server = await scripted();
  const agent = start(server);
  const answer = agent.request({ q: 'config' }, { timeoutMs: 5000 });
  const first = await until('the request', () => server.sockets[0]?.frames.find((f) => f.type === 'request'));
  assert.deepEqual(first.data, { q: 'config' });
  assert.ok(first.timeout_ms > 0 && first.timeout_ms <= 5000);
  server.sockets[0].ws.close(1012);
  const again = await until('the request again', () => server.sockets[1]?.frames.find((f) => f.type === 'request'));
  assert.equal(again.id, first.id);
  assert.ok(again.timeout_ms <= first.timeout_ms, 'what is left of the deadline');
  server.sockets[1].ws.send(JSON.stringify({ type: 'response', id: first.id, data: { answer: 42 } }));
  assert.deepEqual(await answer, { answer: 42 });
  const failing = agent.request({ q: 'x' }, { timeoutMs: 5000 });
  const second = await until('the second request', () => server.sockets[1].frames.filter((f) => f.type === 'request')[1]);
  server.sockets[1].ws.send(JSON.stringify({ type: 'response', id: second.id, error: { code: 'upstream_error', message: 'upstream answered 503' } }));
  await assert.rejects(failing, /the upstream answered with an error \(upstream_error\): upstream answered 503/);
});
