/**
 * Where the agent's JWT comes from. The SDK asks its token provider on every connect and
 * again before the current token expires (in-band `refresh`), so a provider that fetches
 * short-lived tokens from the customer's identity service keeps a session alive.
 */

import { createHmac } from 'node:crypto';
import { readFile } from 'node:fs/promises';

/** Produces a currently valid token for the next connect or refresh. */
export type TokenProvider = () => string | Promise<string>;

/** A fixed token (demos, tests, tokens that never expire). */
export function staticToken(token: string): TokenProvider {
  return () => token;
}

/** Re-reads a file on every call, so a sidecar or a mounted Secret can rotate it. */
export function tokenFile(file: string): TokenProvider {
  return async () => (await readFile(file, 'utf8')).trim();
}

/** Claims of a locally minted development token. */
export interface Hs256Options {
  /** The gateway's HS256 secret (trailing whitespace is trimmed, as the gateway trims its file). */
  secret: string | Buffer;
  /** The `sub` claim. */
  agentId: string;
  /** Lifetime in seconds (default 3600). */
  ttlSeconds?: number;
  groups?: string[];
  tenant?: string;
  audience?: string;
  issuer?: string;
  /** Clock (Unix seconds), for tests. */
  now?: () => number;
}

function base64url(data: Buffer | string): string {
  return Buffer.from(data).toString('base64url');
}

/**
 * Mints HS256 tokens locally from the gateway's shared secret. For development, demos,
 * tests and benchmarks only: a production agent must not hold the signing secret.
 */
export function hs256Minter(options: Hs256Options): TokenProvider {
  const secret = typeof options.secret === 'string' ? Buffer.from(options.secret.trimEnd(), 'utf8') : options.secret;
  return () => mintHs256(secret, options);
}

/** One HS256 token with the claims of `options`. */
export function mintHs256(secret: Buffer, options: Omit<Hs256Options, 'secret'>): string {
  const now = options.now?.() ?? Math.floor(Date.now() / 1000);
  const claims: Record<string, unknown> = {
    sub: options.agentId,
    exp: now + (options.ttlSeconds ?? 3600),
    iat: now,
  };
  if (options.groups && options.groups.length > 0) claims.groups = options.groups;
  if (options.tenant !== undefined) claims.tenant = options.tenant;
  if (options.audience !== undefined) claims.aud = options.audience;
  if (options.issuer !== undefined) claims.iss = options.issuer;
  const signingInput = `${base64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }))}.${base64url(JSON.stringify(claims))}`;
  const signature = createHmac('sha256', secret).update(signingInput).digest();
  return `${signingInput}.${base64url(signature)}`;
}
