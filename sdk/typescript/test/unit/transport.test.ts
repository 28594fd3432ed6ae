import { strict as assert } from 'node:assert';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { test } from 'node:test';

import {
  TransportError,
  certificateFailure,
  noProxyMatches,
  parseConnectHead,
  parseProxyUrl,
  proxyFor,
  redactProxyUrl,
} from '../../dist/index';
import { Transport, tunnel } from '../../dist/transport';

test('NO_PROXY matches hosts, suffixes, star, ports and IPs', () => {
  const list =
    'localhost, .internal.example, corp.example,*.svc.local, gw.test:8443, 10.1.2.3, 192.168.0.0/16, [::1]:9000, fd00::/8';
  // Exact host, any port; case and a trailing dot do not matter.
  assert.ok(noProxyMatches(list, 'localhost', 80));
  assert.ok(noProxyMatches(list, 'LOCALHOST.', 443));
  // Leading dot, no dot and `*.`: the domain and every name under it.
  assert.ok(noProxyMatches(list, 'a.internal.example', 443));
  assert.ok(noProxyMatches(list, 'internal.example', 443));
  assert.ok(noProxyMatches(list, 'corp.example', 443));
  assert.ok(noProxyMatches(list, 'deep.gw.corp.example', 443));
  assert.ok(noProxyMatches(list, 'x.svc.local', 443));
  // A suffix matches only at a dot.
  assert.ok(!noProxyMatches(list, 'notcorp.example', 443));
  assert.ok(!noProxyMatches(list, 'example', 443));
  // host:port matches only that port.
  assert.ok(noProxyMatches(list, 'gw.test', 8443));
  assert.ok(!noProxyMatches(list, 'gw.test', 443));
  // IP addresses and CIDR blocks.
  assert.ok(noProxyMatches(list, '10.1.2.3', 443));
  assert.ok(!noProxyMatches(list, '10.1.2.4', 443));
  assert.ok(noProxyMatches(list, '192.168.44.5', 443));
  assert.ok(!noProxyMatches(list, '192.169.0.1', 443));
  assert.ok(noProxyMatches(list, '[::1]', 9000));
  assert.ok(!noProxyMatches(list, '::1', 9001));
  assert.ok(noProxyMatches(list, 'fd00::5', 1));
  assert.ok(noProxyMatches('::1', '0:0:0:0:0:0:0:1', 1), 'IPv6 compares as addresses');
  // An IP entry does not match a name, nor a name an IP.
  assert.ok(!noProxyMatches('10.1.2.3', 'gateway', 443));
  assert.ok(!noProxyMatches('example.com', '10.0.0.1', 443));
  // `*` matches everything; an empty list nothing.
  assert.ok(noProxyMatches('*', 'anything.example', 1));
  assert.ok(!noProxyMatches('', 'anything.example', 1));
  assert.ok(!noProxyMatches(' , ,', 'anything.example', 1));
});

function env(vars: Record<string, string>) {
  return (name: string) => vars[name];
}

test('proxyFor picks the variable of the scheme and honours NO_PROXY', () => {
  const vars = { HTTPS_PROXY: 'http://secure:3128', HTTP_PROXY: 'http://plain:3128', NO_PROXY: 'direct.example' };
  assert.deepEqual(proxyFor(true, 'gw.example', 443, env(vars)), { variable: 'HTTPS_PROXY', url: 'http://secure:3128' });
  assert.deepEqual(proxyFor(false, 'gw.example', 80, env(vars)), { variable: 'HTTP_PROXY', url: 'http://plain:3128' });
  assert.equal(proxyFor(true, 'a.direct.example', 443, env(vars)), undefined);
  // Lowercase wins; empty counts as unset.
  const both = { https_proxy: 'http://lower:1', HTTPS_PROXY: 'http://upper:1', no_proxy: '', NO_PROXY: 'gw.example' };
  assert.equal(proxyFor(true, 'gw.example', 443, env(both)), undefined, 'empty no_proxy falls through to NO_PROXY');
  assert.deepEqual(proxyFor(true, 'other.example', 443, env(both)), { variable: 'https_proxy', url: 'http://lower:1' });
  // A ws:// URL ignores HTTPS_PROXY.
  assert.equal(proxyFor(false, 'gw.example', 80, env({ HTTPS_PROXY: 'http://secure:3128' })), undefined);
});

test('proxy URLs parse with credentials and refuse other schemes without leaking the password', () => {
  const proxy = parseProxyUrl('http://us%40er:p%3Ass@proxy.corp:3128');
  assert.equal(proxy.host, 'proxy.corp');
  assert.equal(proxy.port, 3128);
  assert.equal(proxy.authorization, `Basic ${Buffer.from('us@er:p:ss').toString('base64')}`);
  const bare = parseProxyUrl('proxy.corp');
  assert.deepEqual([bare.port, bare.authorization], [80, undefined]);
  assert.equal(parseProxyUrl('http://[::1]:3128').host, '::1');
  assert.throws(
    () => parseProxyUrl('https://user:secret@proxy:443'),
    (err: Error) => err instanceof TransportError && err.message.includes('http://') && !err.message.includes('secret'),
  );
  assert.throws(() => parseProxyUrl('http://'), TransportError);
  assert.equal(redactProxyUrl('http://u:secret@p:1'), 'http://***@p:1');
});

test('a proxy answer head gives its status and line', () => {
  assert.deepEqual(parseConnectHead('HTTP/1.1 200 Connection established\r\nVia: x'), {
    status: 200,
    line: 'HTTP/1.1 200 Connection established',
  });
  assert.deepEqual(parseConnectHead('HTTP/1.0 407 Proxy Authentication Required'), {
    status: 407,
    line: 'HTTP/1.0 407 Proxy Authentication Required',
  });
  assert.equal(parseConnectHead('SSH-2.0-OpenSSH').status, undefined);
});

/** A listener that answers the first connection with `answer` and then closes it. */
async function fakeProxy(answer: string): Promise<{ port: number; close: () => void }> {
  const server = net.createServer((socket) => {
    socket.once('data', () => socket.end(answer));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return { port: (server.address() as net.AddressInfo).port, close: () => server.close() };
}

async function connectTo(port: number): Promise<net.Socket> {
  const socket = net.connect(port, '127.0.0.1');
  await new Promise((resolve) => socket.once('connect', resolve));
  return socket;
}

test('a proxy that closes mid-handshake is reported in words', async () => {
  const proxy = await fakeProxy('HTTP/1.1 200 Conn');
  const socket = await connectTo(proxy.port);
  await assert.rejects(tunnel(socket, { host: '127.0.0.1', port: proxy.port }, 'gw.example', 443), (ended: any) => {
    assert.equal(ended.kind, 'unreachable');
    assert.match(ended.cause, /closed the connection during the CONNECT handshake \(after 17 bytes of answer\)/);
    assert.match(ended.cause, new RegExp(`127\\.0\\.0\\.1:${proxy.port}`));
    return true;
  });
  proxy.close();
});

test('a proxy refusal carries its status line, and what follows the head stays on the socket', async () => {
  const refusing = await fakeProxy('HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n');
  const socket = await connectTo(refusing.port);
  await assert.rejects(tunnel(socket, { host: '127.0.0.1', port: refusing.port }, 'gw.example', 443), {
    kind: 'proxy_refused',
    status: 407,
    line: `127.0.0.1:${refusing.port} answered CONNECT gw.example:443 with \`HTTP/1.1 407 Proxy Authentication Required\``,
  });
  refusing.close();
  const open = await fakeProxy('HTTP/1.1 200 OK\r\n\r\nhello');
  const tunnelled = await connectTo(open.port);
  await tunnel(tunnelled, { host: '127.0.0.1', port: open.port }, 'gw.example', 443);
  const first = await new Promise<Buffer>((resolve) => {
    tunnelled.once('data', resolve);
    tunnelled.resume();
  });
  assert.equal(first.toString(), 'hello');
  tunnelled.destroy();
  open.close();
});

test('TLS files that are missing, hold no certificate or do not pair are refused at start with the path', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tether-ts-'));
  const url = new URL('wss://gw.example/v1/connect');
  assert.throws(
    () => new Transport(url, { caFile: '/nonexistent/ca.pem' }, 'direct', env({})),
    (err: Error) => err instanceof TransportError && err.message.includes('/nonexistent/ca.pem'),
  );
  const junk = path.join(dir, 'junk.pem');
  fs.writeFileSync(junk, 'not a certificate');
  assert.throws(() => new Transport(url, { caFile: junk }, 'direct', env({})), /no PEM certificate/);
  assert.throws(() => new Transport(url, {}, 'direct', env({ SSL_CERT_FILE: junk })), /SSL_CERT_FILE .*no PEM certificate/);
  assert.throws(
    () => new Transport(url, {}, 'fromEnv', env({ HTTPS_PROXY: 'https://proxy:443' })),
    /HTTPS_PROXY: invalid proxy URL/,
  );
  // ws:// reads no TLS file at all.
  new Transport(new URL('ws://gw.example/v1/connect'), { caFile: '/nonexistent/ca.pem' }, 'direct', env({}));
  fs.rmSync(dir, { recursive: true });
});

test('certificate errors are permanent, others are not', () => {
  for (const code of ['UNABLE_TO_VERIFY_LEAF_SIGNATURE', 'CERT_HAS_EXPIRED', 'ERR_TLS_CERT_ALTNAME_INVALID', 'SELF_SIGNED_CERT_IN_CHAIN']) {
    const ended = certificateFailure(Object.assign(new Error('x'), { code }));
    assert.equal(ended?.kind, 'certificate_rejected', code);
    assert.ok(ended?.kind === 'certificate_rejected' && ended.cause.includes(code));
  }
  const alert = certificateFailure(Object.assign(new Error('alert'), { code: 'ERR_SSL_TLSV13_ALERT_CERTIFICATE_REQUIRED' }));
  assert.ok(alert?.kind === 'certificate_rejected' && alert.cause.includes('client certificate'));
  assert.equal(certificateFailure(Object.assign(new Error('reset'), { code: 'ECONNRESET' })), undefined);
  assert.equal(certificateFailure(new Error('no code')), undefined);
});
