/**
 * `wss://` and HTTP proxies against a real gateway. A CA made at test time (openssl)
 * signs the gateway's own TLS listener (`listen.tls`), an expired certificate and a
 * client certificate; TLS fronts written here stand in for a load balancer (an expired
 * certificate, mutual TLS). A CONNECT proxy written here resolves `gateway.test` itself,
 * so an agent that reaches the gateway by that name provably went through the tunnel.
 */

import { strict as assert } from 'node:assert';
import * as fs from 'node:fs';
import { after, before, test } from 'node:test';

import { Agent, AgentOptions, StopReason } from '../../dist/index';
import { Cli, Gateway, Pki, connectProxy, makePki, tempDir, tlsFront, token, waitFor, within } from './support';

const fast: Partial<AgentOptions> = { reconnect: { backoff: { baseMs: 50, capMs: 200 }, overloadFloorMs: 50 } };

let pki: Pki;
let dir: string;
/** Terminates TLS itself, with a certificate for `localhost` and `gateway.test`. */
let secure: Gateway;
/** Plain, behind the TLS fronts. */
let plain: Gateway;
const cleanups: (() => unknown)[] = [];

before(async () => {
  pki = makePki();
  dir = tempDir();
  secure = await Gateway.start(dir, { tls: { certFile: pki.serverCert, keyFile: pki.serverKey } });
  plain = await Gateway.start(dir);
});

after(async () => {
  for (const cleanup of cleanups.reverse()) await cleanup();
  await secure.stop();
  await plain.stop();
  fs.rmSync(dir, { recursive: true, force: true });
  fs.rmSync(pki.dir, { recursive: true, force: true });
});

/** Starts an agent with no proxy environment of the test runner's own. */
function agent(options: Partial<AgentOptions> & { url: string }): Agent & { reasons: string[] } {
  const a = new Agent({ token: token('t1'), env: () => undefined, ...fast, ...options });
  const reasons: string[] = [];
  a.on('reconnecting', ({ reason }) => reasons.push(reason));
  a.start();
  cleanups.push(() => a.close());
  return Object.assign(a, { reasons });
}

async function stopReason(a: Agent): Promise<StopReason> {
  return within('the agent to stop', a.stopped());
}

test('wss with the extra CA connects to the gateway TLS listener and receives a push', async () => {
  const pushes: unknown[] = [];
  const a = agent({
    url: `wss://localhost:${secure.publicPort}/v1/connect`,
    token: token('tls1'),
    tls: { caFile: pki.caFile },
    onPush: (push) => void pushes.push(push.data),
  });
  await within('a session', a.connected());
  assert.equal((await secure.push('tls1', { over: 'tls' })).status, 202);
  await waitFor('the push', () => pushes.length === 1);
  assert.deepEqual(pushes[0], { over: 'tls' });
});

test('SSL_CERT_FILE replaces the system roots', async () => {
  const a = agent({
    url: `wss://localhost:${secure.publicPort}/v1/connect`,
    token: token('tls2'),
    env: (name) => (name === 'SSL_CERT_FILE' ? pki.caFile : undefined),
  });
  await within('a session', a.connected());
});

test('an untrusted CA, a name the certificate does not cover, an expired certificate: each stops after one attempt', async () => {
  const unknown = agent({ url: `wss://localhost:${secure.publicPort}/v1/connect`, tls: { caFile: pki.otherCaFile } });
  const reason = await stopReason(unknown);
  assert.equal(reason.kind, 'tls');
  assert.ok(reason.kind === 'tls' && /certificate was refused/.test(reason.message), JSON.stringify(reason));
  assert.deepEqual(unknown.reasons, [], 'no retry');

  const wrongName = agent({ url: `wss://127.0.0.1:${secure.publicPort}/v1/connect`, tls: { caFile: pki.caFile } });
  const nameReason = await stopReason(wrongName);
  assert.ok(nameReason.kind === 'tls' && /ERR_TLS_CERT_ALTNAME_INVALID/.test(nameReason.message), JSON.stringify(nameReason));

  const front = await tlsFront(pki.expiredCert, pki.expiredKey, plain.publicPort);
  cleanups.push(front.close);
  const expired = agent({ url: `wss://localhost:${front.port}/v1/connect`, tls: { caFile: pki.caFile } });
  const expiredReason = await stopReason(expired);
  assert.ok(expiredReason.kind === 'tls' && /CERT_HAS_EXPIRED/.test(expiredReason.message), JSON.stringify(expiredReason));
  assert.equal(front.connections, 1, 'one attempt');
});

test('a mutual-TLS front admits the client certificate and refuses its absence', async () => {
  const front = await tlsFront(pki.serverCert, pki.serverKey, plain.publicPort, pki.caFile);
  cleanups.push(front.close);
  const url = `wss://localhost:${front.port}/v1/connect`;
  const admitted = agent({
    url,
    token: token('mtls1'),
    tls: { caFile: pki.caFile, clientCert: { certFile: pki.clientCert, keyFile: pki.clientKey } },
  });
  await within('a session', admitted.connected());
  assert.ok(await plain.connected('mtls1'));
  const refused = agent({ url, token: token('mtls2'), tls: { caFile: pki.caFile } });
  const reason = await stopReason(refused);
  assert.ok(reason.kind === 'tls' && /client certificate/.test(reason.message), JSON.stringify(reason));
  // A certificate and a key that do not pair are refused before any attempt.
  assert.throws(
    () =>
      new Agent({
        url,
        token: 't',
        tls: { caFile: pki.caFile, clientCert: { certFile: pki.clientCert, keyFile: pki.serverKey } },
      }),
    /do not make a usable pair/,
  );
});

test('wss through a CONNECT proxy from HTTPS_PROXY, with a %-encoded basic-auth password', async () => {
  const proxy = await connectProxy('us@er:p:ss');
  cleanups.push(proxy.close);
  const pushes: unknown[] = [];
  const env: Record<string, string> = {
    HTTPS_PROXY: `http://us%40er:p%3Ass@127.0.0.1:${proxy.port}`,
    HTTP_PROXY: 'http://127.0.0.1:1', // not for wss://
  };
  const a = agent({
    url: `wss://gateway.test:${secure.publicPort}/v1/connect`,
    token: token('px1'),
    tls: { caFile: pki.caFile },
    env: (name) => env[name],
    onPush: (push) => void pushes.push(push.data),
  });
  await within('a session', a.connected());
  assert.deepEqual(proxy.tunnels, [`gateway.test:${secure.publicPort}`]);
  assert.equal((await secure.push('px1', { via: 'proxy' })).status, 202);
  await waitFor('the push', () => pushes.length === 1);
});

test('a proxy refusing the credentials stops the agent with its status line, after one attempt each', async () => {
  const proxy = await connectProxy('user:right');
  cleanups.push(proxy.close);
  for (const credentials of ['user:wrong@', '']) {
    const before = proxy.attempts;
    const a = agent({
      url: `wss://gateway.test:${secure.publicPort}/v1/connect`,
      tls: { caFile: pki.caFile },
      proxy: { url: `http://${credentials}127.0.0.1:${proxy.port}` },
    });
    const reason = await stopReason(a);
    assert.equal(reason.kind, 'proxy_rejected');
    assert.ok(reason.kind === 'proxy_rejected' && reason.status === 407);
    assert.ok(
      reason.kind === 'proxy_rejected' &&
        reason.line === `127.0.0.1:${proxy.port} answered CONNECT gateway.test:${secure.publicPort} with \`HTTP/1.1 407 Proxy Authentication Required\``,
      reason.kind === 'proxy_rejected' ? reason.line : '',
    );
    assert.equal(proxy.attempts - before, 1);
  }
  assert.deepEqual(proxy.tunnels, []);
});

test('a proxy that cannot reach the gateway (502) is retried with its status line', async () => {
  const proxy = await connectProxy();
  cleanups.push(proxy.close);
  const a = agent({ url: 'wss://gateway.test:1/v1/connect', tls: { caFile: pki.caFile }, proxy: { url: `127.0.0.1:${proxy.port}` } });
  await waitFor('two retries', () => a.reasons.length >= 2);
  assert.match(a.reasons[0], /the proxy refused the tunnel with HTTP 502: .*`HTTP\/1\.1 502 Bad Gateway`/);
  assert.equal(a.state.kind === 'waiting' || a.state.kind === 'connecting', true);
});

test('the CLI honours HTTPS_PROXY, NO_PROXY, --proxy, --direct, SSL_CERT_FILE and NODE_EXTRA_CA_CERTS', async () => {
  const proxy = await connectProxy('u:p');
  cleanups.push(proxy.close);
  const url = `wss://localhost:${secure.publicPort}/v1/connect`;
  const viaEnv = `http://u:p@127.0.0.1:${proxy.port}`;
  const run = async (args: string[], env: Record<string, string>) => {
    const c = new Cli(['connect', '--url', url, '--token', token('cli-tls'), ...args], env);
    try {
      await c.line('welcome');
    } finally {
      c.kill();
    }
    await c.exit();
  };
  // HTTPS_PROXY and SSL_CERT_FILE: through the proxy.
  await run([], { HTTPS_PROXY: viaEnv, SSL_CERT_FILE: pki.caFile });
  assert.equal(proxy.tunnels.length, 1);
  // NO_PROXY exempts localhost; --direct ignores the proxy; NODE_EXTRA_CA_CERTS trusted by Node itself.
  await run([], { HTTPS_PROXY: viaEnv, NO_PROXY: 'localhost', NODE_EXTRA_CA_CERTS: pki.caFile });
  await run(['--direct', '--ca-file', pki.caFile], { HTTPS_PROXY: viaEnv });
  // NODE_EXTRA_CA_CERTS stays trusted when an extra CA file is given too.
  await run(['--direct', '--ca-file', pki.otherCaFile], { NODE_EXTRA_CA_CERTS: pki.caFile });
  assert.equal(proxy.tunnels.length, 1);
  // --proxy over the environment's NO_PROXY.
  await run(['--proxy', viaEnv, '--ca-file', pki.caFile], { NO_PROXY: '*' });
  assert.equal(proxy.tunnels.length, 2);
  // Exit 1 with the reason: an untrusted certificate, a proxy refusing credentials.
  const untrusted = new Cli(['connect', '--url', url, '--token', 't', '--direct']);
  assert.equal(await untrusted.exit(), 1);
  assert.match(untrusted.stderr, /TLS: the gateway's certificate was refused/);
  const refused = new Cli(['connect', '--url', url, '--token', 't', '--proxy', `http://u:wrong@127.0.0.1:${proxy.port}`]);
  assert.equal(await refused.exit(), 1);
  assert.match(refused.stderr, /HTTP 407: .*`HTTP\/1\.1 407 Proxy Authentication Required`/);
});
