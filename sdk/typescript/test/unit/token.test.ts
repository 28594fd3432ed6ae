import { strict as assert } from 'node:assert';
import { createHmac } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { test } from 'node:test';

import { checkUrl, hs256Minter, refusalMessage, tokenFile } from '../../dist/index';

test('minted HS256 tokens carry the claims and verify with the secret', async () => {
  const token = (await hs256Minter({
    secret: 'secret-of-the-gateway\n',
    agentId: 'a1',
    groups: ['g1', 'g2'],
    tenant: 'acme',
    ttlSeconds: 60,
    now: () => 1000,
  })()) as string;
  const [header, claims, signature] = token.split('.');
  assert.deepEqual(JSON.parse(Buffer.from(header, 'base64url').toString()), { alg: 'HS256', typ: 'JWT' });
  assert.deepEqual(JSON.parse(Buffer.from(claims, 'base64url').toString()), {
    sub: 'a1',
    exp: 1060,
    iat: 1000,
    groups: ['g1', 'g2'],
    tenant: 'acme',
  });
  // The secret is trimmed as the gateway trims its file.
  const expected = createHmac('sha256', 'secret-of-the-gateway').update(`${header}.${claims}`).digest('base64url');
  assert.equal(signature, expected);
});

test('a token file is re-read on every call', async () => {
  const file = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'tether-ts-')), 'token');
  const provider = tokenFile(file);
  fs.writeFileSync(file, 'one\n');
  assert.equal(await provider(), 'one');
  fs.writeFileSync(file, 'two');
  assert.equal(await provider(), 'two');
});

test('URLs no attempt could use are refused before connecting', () => {
  for (const [url, why] of [
    ['http://127.0.0.1:8080/v1/connect', 'the scheme must be ws:// or wss:// (got http://)'],
    ['127.0.0.1:8080/v1/connect', 'no scheme'],
    ['no scheme at all', 'no scheme'],
    ['ws:///v1/connect', 'no host'],
    ['ws://:8080/v1/connect', 'it does not parse'],
  ]) {
    assert.throws(() => checkUrl(url), (err: Error) => err.name === 'InvalidUrlError' && err.message.includes(why), url);
  }
  assert.equal(checkUrl('wss://gw.example/v1/connect').port, '');
});

test('the reason of a refused upgrade is the message of its JSON body, else its text', () => {
  assert.equal(refusalMessage('{"error":{"code":"not_found","message":"agents connect at GET /v1/connect"}}'), 'agents connect at GET /v1/connect');
  assert.equal(refusalMessage('plain words\n'), 'plain words');
  assert.equal(refusalMessage(''), '');
  assert.equal([...refusalMessage('x'.repeat(1000))].length, 301);
});
