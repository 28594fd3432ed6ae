/**
 * What the integration suites share: a real `tether-gateway` process on 127.0.0.1 (the
 * workspace's debug binary, as the Rust suites' `tests/common` configures it: an HS256
 * secret and an API key in files), the push API over HTTP, a CA made at test time with
 * the `openssl` CLI, a small CONNECT proxy, a TLS front and a TCP forwarder.
 */

import { ChildProcess, execFileSync, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import * as readline from 'node:readline';
import * as tls from 'node:tls';

import { mintHs256 } from '../../dist/index';

/** The HS256 secret agents' tokens are signed with (agent/tests/common). */
export const SECRET = 'integration-secret-of-at-least-32-bytes';
/** The push API's key (at least 16 bytes). */
export const API_KEY = 'integration-key-0123456789';

export const REPO = path.resolve(__dirname, '../../../..');

/** The gateway binary: `TETHER_GATEWAY_BIN`, else the workspace's debug build. */
export function gatewayBin(): string {
  const bin =
    process.env.TETHER_GATEWAY_BIN ??
    path.join(process.env.CARGO_TARGET_DIR ?? path.join(REPO, 'target'), 'debug', 'tether-gateway');
  if (!fs.existsSync(bin)) {
    // Fail, never skip: a missing gateway must not pass as green.
    throw new Error(`no gateway binary at ${bin}: run \`cargo build -p tether-gateway\` (or set TETHER_GATEWAY_BIN)`);
  }
  return bin;
}

export function tempDir(): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), 'tether-ts-'));
}

export function token(agentId: string, extra: { groups?: string[]; ttlSeconds?: number; secret?: string } = {}): string {
  return mintHs256(Buffer.from(extra.secret ?? SECRET), { agentId, ...extra });
}

/** Waits for `check` to return a truthy value, polling; fails after `ms`. */
export async function waitFor<T>(what: string, check: () => T | Promise<T>, ms = 15_000): Promise<T> {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 25));
  }
}

/** Resolves with `promise`, or fails after `ms` naming `what`. */
export function within<T>(what: string, promise: Promise<T>, ms = 15_000): Promise<T> {
  let timer: NodeJS.Timeout;
  return Promise.race([
    promise.finally(() => clearTimeout(timer)),
    new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), ms);
    }),
  ]);
}

// === the gateway ===

export interface GatewayOptions {
  /** `listen.public` (default a free port). */
  public?: string;
  /** YAML lines added at the top level (indented blocks allowed). */
  extraYaml?: string;
  /** `listen.tls`: PEM chain and key. */
  tls?: { certFile: string; keyFile: string };
  /** `limits` lines. */
  limits?: Record<string, number>;
}

export class Gateway {
  publicAddr = '';
  internalAddr = '';
  private exited: Promise<number | null>;

  private constructor(private readonly child: ChildProcess) {
    this.exited = new Promise((resolve) => child.once('exit', (code) => resolve(code)));
  }

  /** Starts a gateway process and waits for its listening line. */
  static async start(dir: string, options: GatewayOptions = {}): Promise<Gateway> {
    fs.writeFileSync(path.join(dir, 'jwt-secret'), SECRET);
    fs.writeFileSync(path.join(dir, 'api-keys'), `${API_KEY}\n`);
    const limits = Object.entries(options.limits ?? {})
      .map(([k, v]) => `  ${k}: ${v}\n`)
      .join('');
    const tlsYaml = options.tls
      ? `  tls:\n    certFile: ${options.tls.certFile}\n    keyFile: ${options.tls.keyFile}\n`
      : '';
    const config = [
      'listen:',
      `  public: ${options.public ?? '127.0.0.1:0'}`,
      '  internal: 127.0.0.1:0',
      tlsYaml.trimEnd(),
      limits ? `limits:\n${limits.trimEnd()}` : '',
      'auth:',
      '  jwt:',
      `    hs256SecretFile: ${path.join(dir, 'jwt-secret')}`,
      '    leewaySeconds: 0',
      `  apiKeysFile: ${path.join(dir, 'api-keys')}`,
      'drain:',
      '  reconnectJitterMs: 0',
      '  deadlineSeconds: 5',
      options.extraYaml ?? '',
    ]
      .filter((line) => line !== '')
      .join('\n');
    const file = path.join(dir, `gateway-${Date.now()}-${Math.random()}.yaml`);
    fs.writeFileSync(file, `${config}\n`);
    const child = spawn(gatewayBin(), ['--config', file], {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, RUST_LOG: process.env.RUST_LOG ?? 'warn' },
    });
    const gateway = new Gateway(child);
    let stderr = '';
    child.stderr!.on('data', (chunk: Buffer) => {
      stderr += chunk.toString();
      if (process.env.TETHER_TEST_GATEWAY_LOGS) process.stderr.write(chunk);
    });
    await within(
      'the gateway to listen',
      new Promise<void>((resolve, reject) => {
        let out = '';
        child.stdout!.on('data', (chunk: Buffer) => {
          out += chunk.toString();
          const m = /listening public=(\S+) internal=(\S+)/.exec(out);
          if (m) {
            gateway.publicAddr = m[1];
            gateway.internalAddr = m[2];
            resolve();
          }
        });
        child.once('exit', (code) => reject(new Error(`gateway exited with ${code}: ${stderr}`)));
      }),
    );
    return gateway;
  }

  get publicPort(): number {
    return Number(this.publicAddr.slice(this.publicAddr.lastIndexOf(':') + 1));
  }

  /** `ws://…/v1/connect` of this gateway. */
  get url(): string {
    return `ws://${this.publicAddr}/v1/connect`;
  }

  /** A push API call; resolves with status and parsed body. */
  async api(method: string, route: string, body?: unknown, headers: Record<string, string> = {}) {
    const response = await fetch(`http://${this.internalAddr}${route}`, {
      method,
      headers: { Authorization: `Bearer ${API_KEY}`, 'Content-Type': 'application/json', ...headers },
      body: body === undefined ? undefined : typeof body === 'string' ? body : JSON.stringify(body),
    });
    const text = await response.text();
    let json: any;
    try {
      json = text ? JSON.parse(text) : undefined;
    } catch {
      json = text;
    }
    return { status: response.status, body: json, text };
  }

  push(agent: string, body: unknown, query = '', headers: Record<string, string> = {}) {
    return this.api('POST', `/v1/agents/${agent}/messages${query}`, body, headers);
  }

  /** Is `agent` connected to this gateway? */
  async connected(agent: string): Promise<boolean> {
    return (await this.api('GET', `/v1/agents/${agent}`)).status === 200;
  }

  /** Drains (as SIGTERM does) and waits for the process to exit. */
  async drain(): Promise<void> {
    this.child.kill('SIGTERM');
    await within('the gateway to exit', this.exited);
  }

  async stop(): Promise<void> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return;
    this.child.kill('SIGKILL');
    await this.exited;
  }
}

// === an upstream (agents' sends and requests) ===

export interface UpstreamCall {
  body: any;
  idempotencyKey?: string;
}

/** An HTTP server standing in for the tenant's backend; `answer` picks each answer. */
export async function upstream(
  answer: (call: UpstreamCall, n: number) => { status: number; body?: unknown },
): Promise<{ url: string; calls: UpstreamCall[]; close: () => void }> {
  const calls: UpstreamCall[] = [];
  const server = http.createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      const call = {
        body: JSON.parse(Buffer.concat(chunks).toString() || 'null'),
        idempotencyKey: req.headers['idempotency-key'] as string | undefined,
      };
      calls.push(call);
      const { status, body } = answer(call, calls.length);
      res.writeHead(status, { 'Content-Type': 'application/json' });
      res.end(body === undefined ? '' : JSON.stringify(body));
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as net.AddressInfo).port;
  return { url: `http://127.0.0.1:${port}/events`, calls, close: () => server.close() };
}

/** `upstream:` YAML for a gateway config (the HMAC secret written into `dir`). */
export function upstreamYaml(dir: string, url: string): string {
  const secret = path.join(dir, 'upstream-secret');
  fs.writeFileSync(secret, 'upstream-hmac-secret-of-at-least-32-bytes');
  return `upstream:\n  url: ${url}\n  secretFile: ${secret}\n  timeoutMs: 2000`;
}

// === sockets in the middle ===

export interface Listener {
  port: number;
  close: () => void;
}

async function listen(server: net.Server): Promise<number> {
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return (server.address() as net.AddressInfo).port;
}

function pipeBoth(a: net.Socket, b: net.Socket): void {
  a.on('error', () => b.destroy());
  b.on('error', () => a.destroy());
  a.pipe(b);
  b.pipe(a);
}

/** Forwards TCP to `target()` (read per connection: the test can switch it, as a Service's endpoints change). */
export async function forwarder(target: () => number): Promise<Listener> {
  const sockets = new Set<net.Socket>();
  const server = net.createServer((client) => {
    const upstreamSocket = net.connect(target(), '127.0.0.1');
    sockets.add(client).add(upstreamSocket);
    pipeBoth(client, upstreamSocket);
  });
  const port = await listen(server);
  return {
    port,
    close: () => {
      server.close();
      sockets.forEach((s) => s.destroy());
    },
  };
}

export interface ProxyLog {
  /** `CONNECT` targets, in order. */
  tunnels: string[];
  /** Every `CONNECT` seen, tunnelled or refused. */
  attempts: number;
}

/**
 * A CONNECT proxy on 127.0.0.1. With `credentials` ("user:password") it answers 407 to
 * any other `Proxy-Authorization`. It resolves `gateway.test` itself (to 127.0.0.1), so
 * an agent that reaches the gateway by that name provably went through it; a target it
 * cannot reach is answered 502.
 */
export async function connectProxy(credentials?: string): Promise<Listener & ProxyLog> {
  const log: ProxyLog = { tunnels: [], attempts: 0 };
  const sockets = new Set<net.Socket>();
  const server = net.createServer((client) => {
    sockets.add(client);
    client.on('error', () => {});
    let head = Buffer.alloc(0);
    const onData = (chunk: Buffer) => {
      head = Buffer.concat([head, chunk]);
      const end = head.indexOf('\r\n\r\n');
      if (end < 0) return;
      client.off('data', onData);
      client.pause();
      log.attempts++;
      const lines = head.subarray(0, end).toString('latin1').split('\r\n');
      const [method, target] = lines[0].split(' ');
      const auth = lines.find((l) => l.toLowerCase().startsWith('proxy-authorization:'));
      const expected = credentials && `Basic ${Buffer.from(credentials).toString('base64')}`;
      if (method !== 'CONNECT') return void client.end('HTTP/1.1 405 Method Not Allowed\r\n\r\n');
      if (expected && auth?.slice(auth.indexOf(':') + 1).trim() !== expected) {
        return void client.end('HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\n\r\n');
      }
      const colon = target.lastIndexOf(':');
      const host = target.slice(0, colon);
      const port = Number(target.slice(colon + 1));
      const address = host === 'gateway.test' || host === 'localhost' ? '127.0.0.1' : host;
      const server = net.connect(port, address);
      sockets.add(server);
      server.once('error', () => client.end('HTTP/1.1 502 Bad Gateway\r\n\r\n'));
      server.once('connect', () => {
        log.tunnels.push(target);
        client.write('HTTP/1.1 200 Connection established\r\n\r\n');
        const rest = head.subarray(end + 4);
        if (rest.length > 0) server.write(rest);
        pipeBoth(client, server);
        client.resume();
      });
    };
    client.on('data', onData);
  });
  const port = await listen(server);
  return Object.assign(log, {
    port,
    close: () => {
      server.close();
      sockets.forEach((s) => s.destroy());
    },
  });
}

/**
 * A TLS-terminating front (as a load balancer) forwarding to `targetPort`; with `ca` it
 * requires a client certificate signed by it. Counts handshakes begun.
 */
export async function tlsFront(
  certFile: string,
  keyFile: string,
  targetPort: number,
  clientCa?: string,
): Promise<Listener & { connections: number }> {
  const sockets = new Set<net.Socket>();
  const state = { connections: 0 };
  const server = tls.createServer(
    {
      cert: fs.readFileSync(certFile),
      key: fs.readFileSync(keyFile),
      requestCert: clientCa !== undefined,
      rejectUnauthorized: clientCa !== undefined,
      ca: clientCa === undefined ? undefined : fs.readFileSync(clientCa),
    },
    (client) => {
      const target = net.connect(targetPort, '127.0.0.1');
      sockets.add(client).add(target);
      pipeBoth(client, target);
    },
  );
  server.on('connection', (socket: net.Socket) => {
    state.connections++;
    sockets.add(socket);
  });
  server.on('tlsClientError', () => {});
  const port = await listen(server);
  return Object.assign(state, {
    port,
    close: () => {
      server.close();
      sockets.forEach((s) => s.destroy());
    },
  });
}

// === a CA made at test time ===

export interface Pki {
  dir: string;
  caFile: string;
  /** Valid for `localhost` and `gateway.test` (not for 127.0.0.1). */
  serverCert: string;
  serverKey: string;
  /** Expired yesterday, for the same names. */
  expiredCert: string;
  expiredKey: string;
  clientCert: string;
  clientKey: string;
  /** A second CA that signed nothing here. */
  otherCaFile: string;
}

function openssl(cwd: string, ...args: string[]): void {
  execFileSync('openssl', args, { cwd, stdio: ['ignore', 'ignore', 'pipe'] });
}

/** A CA, a server certificate, an expired one and a client certificate (EC P-256), made with `openssl`. */
export function makePki(): Pki {
  const dir = tempDir();
  const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'];
  const ca = (name: string) =>
    openssl(dir, 'req', '-x509', ...ec, '-keyout', `${name}.key`, '-out', `${name}.pem`, '-subj', `/CN=${name}`,
      '-days', '2', '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign');
  ca('test-ca');
  ca('other-ca');
  const names = 'subjectAltName=DNS:localhost,DNS:gateway.test';
  fs.writeFileSync(path.join(dir, 'server.ext'), `${names}\nextendedKeyUsage=serverAuth\n`);
  fs.writeFileSync(path.join(dir, 'client.ext'), 'extendedKeyUsage=clientAuth\n');
  const leaf = (name: string, cn: string, ext: string) => {
    openssl(dir, 'req', ...ec, '-keyout', `${name}.key`, '-out', `${name}.csr`, '-subj', `/CN=${cn}`);
    openssl(dir, 'x509', '-req', '-in', `${name}.csr`, '-CA', 'test-ca.pem', '-CAkey', 'test-ca.key',
      '-CAcreateserial', '-out', `${name}.pem`, '-days', '2', '-extfile', ext);
  };
  leaf('server', 'localhost', 'server.ext');
  leaf('client', 'agent-client', 'client.ext');
  // An expired certificate: `openssl ca` takes explicit dates (OpenSSL 3.0's x509 does not).
  openssl(dir, 'req', ...ec, '-keyout', 'expired.key', '-out', 'expired.csr', '-subj', '/CN=localhost');
  fs.writeFileSync(path.join(dir, 'index.txt'), '');
  fs.writeFileSync(path.join(dir, 'serial'), '1000\n');
  fs.writeFileSync(
    path.join(dir, 'ca.cnf'),
    [
      '[ca]',
      'default_ca = test',
      '[test]',
      `dir = ${dir}`,
      'database = $dir/index.txt',
      'new_certs_dir = $dir',
      'certificate = $dir/test-ca.pem',
      'private_key = $dir/test-ca.key',
      'serial = $dir/serial',
      'default_md = sha256',
      'policy = any',
      'unique_subject = no',
      '[any]',
      'commonName = supplied',
      '[server]',
      names,
      '',
    ].join('\n'),
  );
  openssl(dir, 'ca', '-batch', '-config', 'ca.cnf', '-extensions', 'server', '-in', 'expired.csr', '-out',
    'expired.pem', '-startdate', '20200101000000Z', '-enddate', '20200102000000Z', '-notext');
  const at = (name: string) => path.join(dir, name);
  return {
    dir,
    caFile: at('test-ca.pem'),
    serverCert: at('server.pem'),
    serverKey: at('server.key'),
    expiredCert: at('expired.pem'),
    expiredKey: at('expired.key'),
    clientCert: at('client.pem'),
    clientKey: at('client.key'),
    otherCaFile: at('other-ca.pem'),
  };
}

// === the CLI ===

export const CLI = path.resolve(__dirname, '../../dist/cli.js');

export class Cli {
  readonly lines: any[] = [];
  stderr = '';
  readonly exited: Promise<number | null>;
  private readonly child: ChildProcess;

  constructor(args: string[], env: Record<string, string | undefined> = {}) {
    // No proxy or CA settings from the test runner's own environment (a machine may set
    // SSL_CERT_FILE for every program), unless a test sets them.
    const base = { ...process.env };
    for (const name of [
      'HTTPS_PROXY', 'https_proxy', 'HTTP_PROXY', 'http_proxy', 'NO_PROXY', 'no_proxy',
      'SSL_CERT_FILE', 'SSL_CERT_DIR', 'NODE_EXTRA_CA_CERTS',
    ]) delete base[name];
    this.child = spawn(process.execPath, [CLI, ...args], { stdio: ['pipe', 'pipe', 'pipe'], env: { ...base, ...env } });
    readline.createInterface({ input: this.child.stdout! }).on('line', (line) => this.lines.push(JSON.parse(line)));
    this.child.stderr!.on('data', (chunk: Buffer) => (this.stderr += chunk.toString()));
    this.exited = new Promise((resolve) => this.child.once('exit', (code) => resolve(code)));
  }

  /** Waits for a stdout line of this `type` (the `nth`, 1-based). */
  line(type: string, nth = 1): Promise<any> {
    return waitFor(`a ${type} line (#${nth})`, () => this.lines.filter((l) => l.type === type)[nth - 1]).catch((err: Error) => {
      throw new Error(`${err.message}; stderr: ${this.stderr}`);
    });
  }

  exit(): Promise<number | null> {
    return within('the CLI to exit', this.exited).catch((err: Error) => {
      throw new Error(`${err.message}; stderr: ${this.stderr}`);
    });
  }

  signal(signal: NodeJS.Signals): void {
    this.child.kill(signal);
  }

  writeStdin(text: string): void {
    this.child.stdin!.write(text);
  }

  kill(): void {
    if (this.child.exitCode === null) this.child.kill('SIGKILL');
  }
}

