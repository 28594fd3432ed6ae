/**
 * How the agent reaches the gateway's socket: directly or through an HTTP proxy's
 * `CONNECT` tunnel (basic auth from the proxy URL), then TLS for `wss://` (Node's
 * bundled roots with `NODE_EXTRA_CA_CERTS`, or `SSL_CERT_FILE`/`SSL_CERT_DIR` in their
 * place; an extra CA file; a client certificate for mTLS). The finished socket is handed
 * to `ws`, which speaks HTTP and WebSocket over it. `NODE_EXTRA_CA_CERTS` always adds.
 *
 * Everything that can be checked without the network (certificate files, proxy URLs, the
 * proxy environment) is checked once, when the [[Transport]] is made at agent start, so
 * a wrong path or URL is an error to the caller, not a reconnect loop. Which proxy a URL
 * uses ([[proxyFor]], [[noProxyMatches]]) and how a proxy's answer reads
 * ([[parseConnectHead]]) are pure and unit-tested.
 */

import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import * as tls from 'node:tls';

import type { Ended } from './policy';

/** TLS settings for `wss://` URLs (ignored for `ws://`). */
export interface TlsOptions {
  /** A PEM file of CA certificates trusted in addition to the system roots. */
  caFile?: string;
  /** A client certificate for a gateway (or its load balancer) that requires mTLS. */
  clientCert?: { certFile: string; keyFile: string };
}

/**
 * Which HTTP proxy to tunnel through: `'fromEnv'` (default: `https_proxy`/`HTTPS_PROXY`
 * for `wss://`, `http_proxy`/`HTTP_PROXY` for `ws://`, unless `no_proxy`/`NO_PROXY`
 * names the host), `'direct'` (none, whatever the environment says), or `{ url }`
 * (always that proxy, `http://[user:password@]host:port`, the environment ignored).
 */
export type ProxyOption = 'fromEnv' | 'direct' | { url: string };

/** A proxy resolved for one gateway URL. */
export interface ProxyTarget {
  host: string;
  port: number;
  /** `Basic …` from the URL's userinfo. */
  authorization?: string;
}

/** An environment lookup (the process environment in production). */
export type Env = (name: string) => string | undefined;

export const processEnv: Env = (name) => process.env[name];

/** TLS or proxy settings that cannot work (checked at start, before any attempt). */
export class TransportError extends Error {
  override name = 'TransportError';
}

// === which proxy ===

/**
 * The proxy variable and its value that apply to a gateway at `host:port`: the lowercase
 * name wins when both are set (as curl does), an empty value counts as unset, and
 * `no_proxy`/`NO_PROXY` exempts the host.
 */
export function proxyFor(
  secure: boolean,
  host: string,
  port: number,
  env: Env,
): { variable: string; url: string } | undefined {
  const first = (names: string[]) => {
    for (const name of names) {
      const value = env(name)?.trim();
      if (value) return { variable: name, url: value };
    }
    return undefined;
  };
  const proxy = secure ? first(['https_proxy', 'HTTPS_PROXY']) : first(['http_proxy', 'HTTP_PROXY']);
  if (!proxy) return undefined;
  const noProxy = first(['no_proxy', 'NO_PROXY']);
  if (noProxy && noProxyMatches(noProxy.url, host, port)) return undefined;
  return proxy;
}

/**
 * Whether a `NO_PROXY` list exempts `host:port`. Entries are separated by commas or
 * spaces: `*` matches everything; `example.com`, `.example.com` and `*.example.com`
 * match that domain and every name under it (at a dot); `host:port` only that port; an
 * IP (`10.1.2.3`, `::1`, `[::1]:8080`) that address and a CIDR block (`10.0.0.0/8`,
 * `fd00::/8`) every address in it. Names compare without case and trailing dot.
 */
export function noProxyMatches(list: string, host: string, port: number): boolean {
  const name = host.replace(/^\[/, '').replace(/\]$/, '').replace(/\.+$/, '').toLowerCase();
  const hostFamily = net.isIP(name);
  return list
    .split(/[,\s]+/)
    .map((entry) => entry.trim())
    .filter((entry) => entry.length > 0)
    .some((entry) => {
      if (entry === '*') return true;
      const [entryName, entryPort] = splitEntry(entry);
      if (entryPort !== undefined && entryPort !== port) return false;
      const pattern = entryName.replace(/\.+$/, '').toLowerCase();
      const slash = pattern.indexOf('/');
      if (slash >= 0) {
        const network = pattern.slice(0, slash);
        const bits = Number(pattern.slice(slash + 1));
        const family = net.isIP(network);
        if (!family || family !== hostFamily || !Number.isInteger(bits)) return false;
        if (bits < 0 || bits > (family === 4 ? 32 : 128)) return false;
        const block = new net.BlockList();
        block.addSubnet(network, bits, family === 4 ? 'ipv4' : 'ipv6');
        return block.check(name, family === 4 ? 'ipv4' : 'ipv6');
      }
      const patternFamily = net.isIP(pattern);
      if (patternFamily || hostFamily) {
        if (patternFamily !== hostFamily) return false;
        const block = new net.BlockList();
        block.addAddress(pattern, patternFamily === 4 ? 'ipv4' : 'ipv6');
        return block.check(name, hostFamily === 4 ? 'ipv4' : 'ipv6');
      }
      const domain = pattern.replace(/^\*/, '').replace(/^\./, '');
      return domain.length > 0 && (name === domain || name.endsWith(`.${domain}`));
    });
}

/** `host`, `host:port`, `[v6]`, `[v6]:port` or a bare IPv6 address (several colons). */
function splitEntry(entry: string): [string, number | undefined] {
  if (entry.startsWith('[')) {
    const close = entry.indexOf(']');
    if (close < 0) return [entry.slice(1), undefined];
    const tail = entry.slice(close + 1);
    const port = tail.startsWith(':') ? parsePort(tail.slice(1)) : undefined;
    return [entry.slice(1, close), port];
  }
  const colon = entry.lastIndexOf(':');
  if (colon > 0 && !entry.slice(0, colon).includes(':')) {
    const port = parsePort(entry.slice(colon + 1));
    if (port !== undefined) return [entry.slice(0, colon), port];
  }
  return [entry, undefined];
}

function parsePort(text: string): number | undefined {
  if (!/^\d{1,5}$/.test(text)) return undefined;
  const port = Number(text);
  return port <= 65535 ? port : undefined;
}

/** The URL with its userinfo replaced, for error messages (a password never prints). */
export function redactProxyUrl(url: string): string {
  const schemeEnd = url.indexOf('://');
  const scheme = schemeEnd >= 0 ? url.slice(0, schemeEnd + 3) : '';
  const rest = schemeEnd >= 0 ? url.slice(schemeEnd + 3) : url;
  const at = rest.lastIndexOf('@');
  return at >= 0 ? `${scheme}***@${rest.slice(at + 1)}` : url;
}

/**
 * Parses `http://[user[:password]@]host[:port]` (no scheme means `http://`, the port
 * defaults to 80, the userinfo may be %-encoded). `https://` proxies are refused.
 */
export function parseProxyUrl(url: string): ProxyTarget {
  const invalid = (why: string) => new TransportError(`invalid proxy URL \`${redactProxyUrl(url)}\`: ${why}`);
  const withScheme = url.includes('://') ? url : `http://${url}`;
  const scheme = withScheme.slice(0, withScheme.indexOf('://')).toLowerCase();
  if (scheme !== 'http') {
    throw invalid(`the scheme must be http:// (got ${scheme}://; TLS to the proxy itself is not supported)`);
  }
  let parsed: URL;
  try {
    parsed = new URL(withScheme);
  } catch {
    throw invalid('does not parse');
  }
  const host = parsed.hostname.replace(/^\[/, '').replace(/\]$/, '');
  if (!host) throw invalid('no host');
  let authorization: string | undefined;
  if (withScheme.slice(withScheme.indexOf('://') + 3).includes('@')) {
    let user: string;
    let password: string;
    try {
      user = decodeURIComponent(parsed.username);
      password = decodeURIComponent(parsed.password);
    } catch {
      throw invalid('bad %-escape in the userinfo');
    }
    authorization = `Basic ${Buffer.from(`${user}:${password}`, 'utf8').toString('base64')}`;
  }
  return { host, port: parsed.port ? Number(parsed.port) : 80, authorization };
}

/** The `CONNECT` request for a tunnel to `host:port`. */
export function connectRequest(proxy: ProxyTarget, host: string, port: number): string {
  const target = host.includes(':') ? `[${host}]:${port}` : `${host}:${port}`;
  let request = `CONNECT ${target} HTTP/1.1\r\nHost: ${target}\r\n`;
  if (proxy.authorization) request += `Proxy-Authorization: ${proxy.authorization}\r\n`;
  return `${request}\r\n`;
}

/** A proxy's answer to `CONNECT` (its head, up to the blank line): status and first line. */
export function parseConnectHead(head: string): { status?: number; line: string } {
  const line = head.split('\r\n', 1)[0].trim();
  const match = /^HTTP\/1\.[01] (\d{3})(?: |$)/.exec(line);
  return { status: match ? Number(match[1]) : undefined, line };
}

/** Largest proxy answer head read before giving up on it. */
const MAX_PROXY_HEAD = 16 * 1024;

/**
 * Asks the proxy for a tunnel and reads its answer up to the end of its head. Resolves
 * when the tunnel is open (any bytes after the head are put back on the socket);
 * rejects with an [[Ended]].
 */
export function tunnel(socket: net.Socket, proxy: ProxyTarget, host: string, port: number): Promise<void> {
  const proxyName = `${proxy.host}:${proxy.port}`;
  const target = host.includes(':') ? `[${host}]:${port}` : `${host}:${port}`;
  const lost = (what: string): Ended => ({ kind: 'unreachable', cause: `the proxy ${proxyName} ${what}` });
  return new Promise((resolve, reject) => {
    let head = Buffer.alloc(0);
    const cleanup = () => {
      socket.off('data', onData);
      socket.off('end', onEnd);
      socket.off('close', onEnd);
      socket.off('error', onError);
    };
    const onData = (chunk: Buffer) => {
      head = Buffer.concat([head, chunk]);
      const end = head.indexOf('\r\n\r\n');
      if (end < 0) {
        if (head.length >= MAX_PROXY_HEAD) {
          cleanup();
          reject(lost(`sent more than ${MAX_PROXY_HEAD} bytes of header in answer to CONNECT`));
        }
        return;
      }
      cleanup();
      socket.pause();
      const rest = head.subarray(end + 4);
      if (rest.length > 0) socket.unshift(rest);
      const { status, line } = parseConnectHead(head.subarray(0, end).toString('latin1'));
      if (status === undefined) {
        reject(lost(`answered CONNECT with something that is not HTTP: \`${line}\``));
      } else if (status >= 200 && status < 300) {
        resolve();
      } else {
        reject({ kind: 'proxy_refused', status, line: `${proxyName} answered CONNECT ${target} with \`${line}\`` });
      }
    };
    const onEnd = () => {
      cleanup();
      reject(lost(`closed the connection during the CONNECT handshake (after ${head.length} bytes of answer)`));
    };
    const onError = (err: Error) => {
      cleanup();
      reject(lost(`failed during the CONNECT handshake: ${err.message}`));
    };
    socket.on('data', onData);
    socket.on('end', onEnd);
    socket.on('close', onEnd);
    socket.on('error', onError);
    socket.write(connectRequest(proxy, host, port));
  });
}

// === TLS ===

const CERT_BLOCK = /-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g;

/** The PEM certificates in `text`. */
export function pemCertificates(text: string): string[] {
  return text.match(CERT_BLOCK) ?? [];
}

function readFile(file: string, what: string): string {
  try {
    return fs.readFileSync(file, 'utf8');
  } catch (err) {
    throw new TransportError(`${what} ${file}: ${(err as Error).message}`);
  }
}

function readCertificates(file: string, what: string): string[] {
  const certs = pemCertificates(readFile(file, what));
  if (certs.length === 0) throw new TransportError(`${what} ${file}: no PEM certificate in it`);
  return certs;
}

/**
 * The CA certificates to trust, or `undefined` for Node's default store (its bundled
 * roots plus `NODE_EXTRA_CA_CERTS`, which Node reads itself). `SSL_CERT_FILE` (a PEM
 * bundle) and `SSL_CERT_DIR` replace the bundled roots, as OpenSSL and the Rust SDK read
 * them; `NODE_EXTRA_CA_CERTS` and an extra CA file add to whichever applies.
 */
export function trustedCas(options: TlsOptions, env: Env): string[] | undefined {
  const certFile = env('SSL_CERT_FILE')?.trim();
  const certDir = env('SSL_CERT_DIR')?.trim();
  const extra = options.caFile ? readCertificates(options.caFile, 'CA file') : [];
  if (!certFile && !certDir && extra.length === 0) return undefined;
  // Passing `ca` replaces Node's whole default store: rebuild it from its parts.
  const all = new Set<string>();
  if (certFile || certDir) {
    if (certFile) readCertificates(certFile, 'SSL_CERT_FILE').forEach((c) => all.add(c));
    for (const dir of (certDir ?? '').split(path.delimiter).filter(Boolean)) {
      let names: string[];
      try {
        names = fs.readdirSync(dir);
      } catch (err) {
        throw new TransportError(`SSL_CERT_DIR ${dir}: ${(err as Error).message}`);
      }
      for (const name of names) {
        try {
          pemCertificates(fs.readFileSync(path.join(dir, name), 'utf8')).forEach((c) => all.add(c));
        } catch {
          // Subdirectories and unreadable entries are skipped, as OpenSSL does.
        }
      }
    }
  } else {
    tls.rootCertificates.forEach((c) => all.add(c));
  }
  const nodeExtra = env('NODE_EXTRA_CA_CERTS')?.trim();
  if (nodeExtra) {
    try {
      pemCertificates(fs.readFileSync(nodeExtra, 'utf8')).forEach((c) => all.add(c));
    } catch {
      // Node itself only warns about an unreadable NODE_EXTRA_CA_CERTS.
    }
  }
  extra.forEach((c) => all.add(c));
  if (all.size === 0) {
    throw new TransportError(
      'no trusted CA certificates: SSL_CERT_FILE/SSL_CERT_DIR hold none; set them to a CA bundle or give an extra CA file',
    );
  }
  return [...all];
}

/** Resolved TLS settings for `tls.connect`. */
export interface TlsContext {
  ca?: string[];
  cert?: string;
  key?: string;
}

/** Reads and checks the TLS files (a certificate and key that do not pair are refused). */
export function tlsContext(options: TlsOptions, env: Env): TlsContext {
  const context: TlsContext = { ca: trustedCas(options, env) };
  if (options.clientCert) {
    const { certFile, keyFile } = options.clientCert;
    const cert = readCertificates(certFile, 'client certificate file').join('\n');
    const key = readFile(keyFile, 'client key file');
    if (!/-----BEGIN [A-Z ]*PRIVATE KEY-----/.test(key)) {
      throw new TransportError(`client key file ${keyFile}: no PEM private key in it`);
    }
    try {
      tls.createSecureContext({ cert, key });
    } catch (err) {
      throw new TransportError(
        `client certificate ${certFile} and key ${keyFile} do not make a usable pair: ${(err as Error).message}`,
      );
    }
    context.cert = cert;
    context.key = key;
  }
  return context;
}

/** OpenSSL's codes for a gateway certificate that is not trusted or not valid. */
const SERVER_CERT_CODES = new Set([
  'UNABLE_TO_VERIFY_LEAF_SIGNATURE',
  'UNABLE_TO_GET_ISSUER_CERT',
  'UNABLE_TO_GET_ISSUER_CERT_LOCALLY',
  'SELF_SIGNED_CERT_IN_CHAIN',
  'DEPTH_ZERO_SELF_SIGNED_CERT',
  'CERT_HAS_EXPIRED',
  'CERT_NOT_YET_VALID',
  'CERT_UNTRUSTED',
  'CERT_REJECTED',
  'CERT_SIGNATURE_FAILURE',
  'CERT_REVOKED',
  'INVALID_CA',
  'ERR_TLS_CERT_ALTNAME_INVALID',
]);

/** TLS alerts by which a gateway refuses the agent's certificate (or its absence). */
const CLIENT_CERT_ALERT =
  /^ERR_SSL_(?:SSLV3|TLSV1|TLSV13)_ALERT_(?:BAD_CERTIFICATE|UNSUPPORTED_CERTIFICATE|CERTIFICATE_REVOKED|CERTIFICATE_EXPIRED|CERTIFICATE_UNKNOWN|UNKNOWN_CA|CERTIFICATE_REQUIRED|ACCESS_DENIED)$/;

/**
 * A certificate failure from a TLS error: permanent (the same certificates fail every
 * retry). `undefined` for anything else (a reset, a timeout). With TLS 1.3 a gateway's
 * refusal of the client certificate arrives after the client's handshake, on the first
 * read of the upgrade, so errors of the upgrade pass through here too.
 */
export function certificateFailure(err: unknown): Ended | undefined {
  const code = (err as { code?: unknown })?.code;
  const message = (err as Error)?.message ?? String(err);
  if (typeof code !== 'string') return undefined;
  if (SERVER_CERT_CODES.has(code)) {
    return {
      kind: 'certificate_rejected',
      cause:
        `the gateway's certificate was refused: ${message} (${code}; trust its CA with the system roots, ` +
        'NODE_EXTRA_CA_CERTS, SSL_CERT_FILE or an extra CA file)',
    };
  }
  if (CLIENT_CERT_ALERT.test(code)) {
    return {
      kind: 'certificate_rejected',
      cause: `the gateway refused the TLS handshake (${code}): it requires a client certificate it trusts`,
    };
  }
  return undefined;
}

// === the transport ===

/** Everything needed to open a socket to the gateway, resolved once at start. */
export class Transport {
  readonly host: string;
  readonly port: number;
  readonly secure: boolean;
  readonly proxy?: ProxyTarget;
  private readonly tls?: TlsContext;

  /** Throws [[TransportError]] for settings that cannot work. `url` is a checked ws/wss URL. */
  constructor(url: URL, tlsOptions: TlsOptions, proxy: ProxyOption, env: Env = processEnv) {
    this.secure = url.protocol === 'wss:';
    this.host = url.hostname.replace(/^\[/, '').replace(/\]$/, '');
    this.port = url.port ? Number(url.port) : this.secure ? 443 : 80;
    if (proxy === 'direct') {
      this.proxy = undefined;
    } else if (proxy === 'fromEnv') {
      const chosen = proxyFor(this.secure, this.host, this.port, env);
      if (chosen) {
        try {
          this.proxy = parseProxyUrl(chosen.url);
        } catch (err) {
          throw new TransportError(`${chosen.variable}: ${(err as Error).message}`);
        }
      }
    } else {
      this.proxy = parseProxyUrl(proxy.url);
    }
    if (this.secure) this.tls = tlsContext(tlsOptions, env);
  }

  /**
   * Opens TCP (through the proxy's tunnel when one applies) and TLS for `wss://`.
   * Rejects with an [[Ended]]. `signal` aborts it (connect timeout, agent closing).
   */
  async open(signal: AbortSignal): Promise<net.Socket> {
    const sockets: net.Socket[] = [];
    const onAbort = () => sockets.forEach((s) => s.destroy());
    signal.addEventListener('abort', onAbort, { once: true });
    try {
      let tcp: net.Socket;
      if (this.proxy) {
        const proxy = this.proxy;
        tcp = await connectTcp(proxy.host, proxy.port, sockets).catch((err: Error): never => {
          throw { kind: 'unreachable', cause: `could not reach the proxy ${proxy.host}:${proxy.port}: ${err.message}` };
        });
        await tunnel(tcp, proxy, this.host, this.port);
      } else {
        tcp = await connectTcp(this.host, this.port, sockets).catch((err: Error): never => {
          throw { kind: 'unreachable', cause: err.message };
        });
      }
      if (!this.tls) return tcp;
      return await this.handshake(tcp, sockets);
    } catch (err) {
      onAbort();
      throw err;
    } finally {
      signal.removeEventListener('abort', onAbort);
    }
  }

  private handshake(tcp: net.Socket, sockets: net.Socket[]): Promise<tls.TLSSocket> {
    return new Promise((resolve, reject) => {
      const secure = tls.connect({
        socket: tcp,
        host: this.host,
        // SNI carries names only (RFC 6066); the certificate check uses `host` for IPs.
        servername: net.isIP(this.host) ? undefined : this.host,
        ca: this.tls?.ca,
        cert: this.tls?.cert,
        key: this.tls?.key,
        ALPNProtocols: ['http/1.1'],
      });
      sockets.push(secure);
      secure.on('error', () => {}); // as in connectTcp: ws listens from the upgrade on
      const onError = (err: Error) => {
        secure.off('secureConnect', onSecure);
        reject(certificateFailure(err) ?? { kind: 'unreachable', cause: `TLS handshake failed: ${err.message}` });
      };
      const onClose = () => onError(new Error('the connection closed during the TLS handshake'));
      const onSecure = () => {
        secure.off('error', onError);
        secure.off('close', onClose);
        resolve(secure);
      };
      secure.once('secureConnect', onSecure);
      secure.once('error', onError);
      secure.once('close', onClose);
    });
  }
}

function connectTcp(host: string, port: number, sockets: net.Socket[]): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    // Happy eyeballs (Node 20's default; explicit for 18): `localhost` may resolve to
    // ::1 first while the gateway listens on 127.0.0.1 only.
    const socket = net.connect({ host, port, autoSelectFamily: true });
    sockets.push(socket);
    // Whoever reads the socket next (the tunnel, TLS, ws) listens for its errors; this
    // keeps an error between two of them from being an uncaught exception.
    socket.on('error', () => {});
    socket.setNoDelay(true);
    const onError = (err: Error) => reject(err);
    socket.once('error', onError);
    socket.once('connect', () => {
      socket.off('error', onError);
      resolve(socket);
    });
  });
}
