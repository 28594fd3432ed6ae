/**
 * The `tether-agent` CLI as a user (and the conformance suite) runs it, against a real
 * gateway: one JSON line per event on stdout, the reason of a stop on stderr, exit codes
 * 0 / 1 / 2 (conformance/README.md).
 */

import { strict as assert } from 'node:assert';
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { after, before, test } from 'node:test';

import { CLI, Cli, Gateway, tempDir, token, upstream, upstreamYaml, waitFor } from './support';

let dir: string;
let gateway: Gateway;
const clis: Cli[] = [];

function cli(args: string[], env: Record<string, string | undefined> = {}): Cli {
  const c = new Cli(args, env);
  clis.push(c);
  return c;
}

before(async () => {
  dir = tempDir();
  gateway = await Gateway.start(dir);
});

after(async () => {
  clis.forEach((c) => c.kill());
  await gateway.stop();
  fs.rmSync(dir, { recursive: true, force: true });
});

test('connect prints the welcome, each push as its envelope byte for byte, and answers requests with --reply', async () => {
  const c = cli(['connect', '--url', gateway.url, '--token', token('c1'), '--reply', '{"ok":true}']);
  const welcome = await c.line('welcome');
  assert.equal(welcome.agent_id, 'c1');
  assert.equal(typeof welcome.connection_id, 'string');
  assert.ok(welcome.expires_at > 0);
  assert.deepEqual(Object.keys(welcome).sort(), ['agent_id', 'connection_id', 'expires_at', 'type']);
  // Raw bytes: a big integer and a number spelling JSON.parse would change.
  const body = '{"big":12345678901234567890,"f":1.50}';
  const pushed = await gateway.push('c1', body);
  assert.equal(pushed.status, 202);
  await c.line('push');
  const raw = await waitFor('the raw push line', () => c.lines.length >= 2 && c.lines[1]);
  assert.equal(raw.id, pushed.body.id);
  assert.match(JSON.stringify(raw), /"type":"push"/);
  const answered = await gateway.api('POST', '/v1/agents/c1/requests?timeout_ms=5000', { q: 'status' });
  assert.equal(answered.status, 200);
  assert.deepEqual(answered.body, { ok: true });
  const request = await c.line('request');
  assert.deepEqual(request.data, { q: 'status' });
  assert.ok(request.timeout_ms > 0);
  c.signal('SIGTERM');
  assert.equal(await c.exit(), 0);
});

test('the push line carries data exactly as the backend sent it', async () => {
  // Read stdout as text (not parsed) to compare bytes.
  const child = spawn(process.execPath, [CLI, 'connect', '--url', gateway.url, '--token', token('c2'), '--direct']);
  let out = '';
  child.stdout.on('data', (chunk: Buffer) => (out += chunk.toString()));
  try {
    await waitFor('the welcome', () => out.includes('"welcome"'));
    const body = '{"big":12345678901234567890, "f":1.50,"s":"a\\u00e9"}';
    const pushed = await gateway.push('c2', body);
    await waitFor('the push line', () => out.includes('"push"'));
    const line = out.split('\n').find((l) => l.includes('"push"'))!;
    assert.equal(line, `{"type":"push","id":${JSON.stringify(pushed.body.id)},"data":${body}}`);
  } finally {
    child.kill('SIGKILL');
  }
});

test('without --reply a request is answered handler_error; permanent refusals exit 1 with the reason; bad usage exits 2', async () => {
  const c = cli(['connect', '--url', gateway.url, '--token', token('c3')]);
  await c.line('welcome');
  const failed = await gateway.api('POST', '/v1/agents/c3/requests?timeout_ms=5000', { q: 1 });
  assert.equal(failed.status, 502);
  assert.match(failed.text, /handler_error|no --reply/);
  c.kill();

  const forged = cli(['connect', '--url', gateway.url, '--token', token('c4', { secret: 'another-secret-of-at-least-32-bytes!!' })]);
  assert.equal(await forged.exit(), 1);
  assert.match(forged.stderr, /authentication rejected with HTTP 401/);

  const wrongPath = cli(['connect', '--url', gateway.url.replace('/v1/connect', '/nope'), '--token', token('c5')]);
  assert.equal(await wrongPath.exit(), 1);
  assert.match(wrongPath.stderr, /HTTP 404: agents connect at GET \/v1\/connect/);

  const httpUrl = cli(['connect', '--url', `http://${gateway.publicAddr}/v1/connect`, '--token', 't']);
  assert.equal(await httpUrl.exit(), 1);
  assert.match(httpUrl.stderr, /the scheme must be ws:\/\/ or wss:\/\//);

  const badJson = cli(['connect', '--url', gateway.url, '--token', 't', '--reply', '{nope']);
  assert.equal(await badJson.exit(), 1);
  assert.match(badJson.stderr, /--reply must be JSON/);

  for (const args of [
    ['connect', '--bogus'],
    ['connect', '--url'],
    ['connect', '--proxy', 'http://p:1', '--direct', '--token', 't'],
    ['connect', '--client-cert', 'c.pem', '--token', 't'],
    ['connect', '--token', 't', '--token-file', 'f'],
    ['launch'],
  ]) {
    const usage = cli(args);
    assert.equal(await usage.exit(), 2, args.join(' '));
    assert.match(usage.stderr, /Usage:/);
  }
});

test('a close that forbids reconnecting exits 1 naming its code; a replaced agent too, the newer stays', async () => {
  const first = cli(['connect', '--url', gateway.url, '--token', token('c6')]);
  await first.line('welcome');
  const second = cli(['connect', '--url', gateway.url, '--token', token('c6')]);
  await second.line('welcome');
  assert.equal(await first.exit(), 1);
  assert.match(first.stderr, /code 4003/);
  assert.equal((await gateway.api('DELETE', '/v1/agents/c6')).status, 204);
  assert.equal(await second.exit(), 1);
  assert.match(second.stderr, /code 4005/);
});

test('--send prints each ack and --exit-after-send exits 0; with nothing upstream it exits 1 with the reason', async () => {
  const backend = await upstream(() => ({ status: 200 }));
  const dir2 = tempDir();
  const gw = await Gateway.start(dir2, { extraYaml: upstreamYaml(dir2, backend.url) });
  try {
    const c = cli(['connect', '--url', gw.url, '--token', token('c7'), '--send', '{"n":1}', '--send', '{"n":2}', '--exit-after-send']);
    assert.equal(await c.exit(), 0, c.stderr);
    const acks = c.lines.filter((l) => l.type === 'ack');
    assert.equal(acks.length, 2);
    assert.deepEqual(
      backend.calls.map((call) => [call.idempotencyKey, call.body.data]),
      [
        [acks[0].id, { n: 1 }],
        [acks[1].id, { n: 2 }],
      ],
    );
  } finally {
    await gw.stop();
    backend.close();
    fs.rmSync(dir2, { recursive: true, force: true });
  }
  const nothing = cli(['connect', '--url', gateway.url, '--token', token('c8'), '--send', '{"n":1}', '--exit-after-send']);
  assert.equal(await nothing.exit(), 1);
  assert.match(nothing.stderr, /no upstream receives agent messages/);
});

test('--token-file is re-read for the in-band refresh: a refreshed line on the same connection', async () => {
  const file = path.join(dir, 'token-c9');
  fs.writeFileSync(file, token('c9', { ttlSeconds: 3 }));
  const c = cli(['connect', '--url', gateway.url, '--token-file', file]);
  const welcome = await c.line('welcome');
  fs.writeFileSync(file, token('c9', { ttlSeconds: 60, groups: ['later'] }));
  const refreshed = await c.line('refreshed');
  assert.ok(refreshed.expires_at > welcome.expires_at);
  assert.equal(c.lines.filter((l) => l.type === 'welcome').length, 1);
  const sent = await gateway.api('POST', '/v1/groups/later/messages', { g: 1 });
  assert.equal(sent.body.delivered, 1);
  await c.line('push');
  c.signal('SIGINT');
  assert.equal(await c.exit(), 0);
});

test('--ack-on-stdin holds the ack until a line arrives on stdin', async () => {
  const c = cli(['connect', '--url', gateway.url, '--token', token('c10'), '--ack-on-stdin']);
  await c.line('welcome');
  let answered = false;
  const acked = gateway.push('c10', { held: true }, '?ack=true&timeout_ms=10000').then((r) => {
    answered = true;
    return r;
  });
  await c.line('push');
  await new Promise((resolve) => setTimeout(resolve, 200));
  assert.equal(answered, false, 'acknowledged before stdin released it');
  c.writeStdin('\n');
  assert.equal((await acked).status, 200);
  c.kill();
});
