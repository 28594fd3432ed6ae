/** The README's example (examples/agent.mjs) runs against a gateway with a tenant, as the local platform's. */

import { strict as assert } from 'node:assert';
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { test } from 'node:test';

import { Gateway, SECRET, tempDir, waitFor, within } from './support';

test('examples/agent.mjs connects with a minted tenant token, prints a push and answers a request', async () => {
  const dir = tempDir();
  const gateway = await Gateway.start(dir, { extraYaml: 'tenant: acme' });
  const example = spawn(process.execPath, [path.resolve(__dirname, '../../examples/agent.mjs')], {
    env: { ...process.env, TETHER_URL: gateway.url, TETHER_HS256_SECRET: SECRET, TETHER_TENANT: 'acme', TETHER_AGENT_ID: 'ex1' },
  });
  let out = '';
  let err = '';
  example.stdout.on('data', (c: Buffer) => (out += c.toString()));
  example.stderr.on('data', (c: Buffer) => (err += c.toString()));
  const exited = new Promise((resolve) => example.once('exit', resolve));
  try {
    await waitFor(`the example to connect (stderr: ${err})`, () => gateway.connected('ex1'));
    await waitFor('the connected line on stderr', () => /connected as ex1/.test(err));
    assert.equal((await gateway.push('ex1', { hello: 'agent' })).status, 202);
    await waitFor('the push line', () => out.includes('"hello"'));
    assert.deepEqual(JSON.parse(out.trim().split('\n')[0]).data, { hello: 'agent' });
    const answer = await gateway.api('POST', '/v1/agents/ex1/requests?timeout_ms=5000', { q: 'uptime' });
    assert.equal(answer.status, 200);
    assert.equal(typeof answer.body.uptime, 'number');
    example.kill('SIGTERM');
    assert.equal(await within('the example to exit', exited), 0);
  } finally {
    example.kill('SIGKILL');
    await gateway.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
