/**
 * Pure decisions of the connection loop: when to reconnect, when to refresh the token,
 * whether a refused `send` is worth retrying, which push ids were already handled. No
 * I/O and no clocks of their own (callers pass `now` and a random source), so every rule
 * is unit-tested. The same rules as the Rust SDK's `agent/src/policy.rs`.
 */

import { TERMINAL_CLOSE_CODES } from './protocol';

/** A random source in [0, 1), like `Math.random`. */
export type Random = () => number;

/**
 * Exponential back-off with full jitter: retry `n` waits a uniformly random time in
 * `[0, min(capMs, baseMs * 2^n)]`. Full jitter spreads a reconnect storm over the whole
 * window instead of synchronising clients on the same exponential steps.
 */
export interface Backoff {
  /** Window of the first retry. */
  baseMs: number;
  /** Largest window. */
  capMs: number;
}

export const DEFAULT_BACKOFF: Backoff = { baseMs: 250, capMs: 30_000 };

/** The upper bound of the window for retry number `attempt` (0-based). */
export function backoffWindow(backoff: Backoff, attempt: number): number {
  const factor = 2 ** Math.min(Math.max(attempt, 0), 31);
  return Math.min(backoff.capMs, backoff.baseMs * factor);
}

/** A random delay in `[0, window(attempt)]`, whole milliseconds. */
export function backoffDelay(backoff: Backoff, attempt: number, random: Random = Math.random): number {
  const window = Math.floor(backoffWindow(backoff, attempt));
  return Math.min(window, Math.floor(random() * (window + 1)));
}

/** How one connection attempt or session ended, as far as reconnecting cares. */
export type Ended =
  /** The gateway answered the upgrade with an HTTP error (`message`: its reason). */
  | { kind: 'rejected'; status: number; message: string }
  /** No HTTP answer: refused TCP connect, DNS, a TLS handshake cut short, no welcome. */
  | { kind: 'unreachable'; cause: string }
  /** The gateway closed the session with a close frame (after a hint, if any). */
  | { kind: 'closed'; code: number; hintMs?: number }
  /** The transport failed without a close frame (reset, EOF, dead peer). */
  | { kind: 'lost'; hintMs?: number }
  /** The token provider failed. */
  | { kind: 'token_unavailable'; cause: string }
  /** A certificate was refused: the gateway's (untrusted, wrong name, expired) or ours. */
  | { kind: 'certificate_rejected'; cause: string }
  /** The HTTP proxy answered `CONNECT` with an error status. */
  | { kind: 'proxy_refused'; status: number; line: string };

/** Why the agent stopped for good. */
export type StopReason =
  | { kind: 'closed' }
  | { kind: 'auth_rejected'; status: number; message: string }
  | { kind: 'http_rejected'; status: number; message: string }
  | { kind: 'tls'; message: string }
  | { kind: 'proxy_rejected'; status: number; line: string }
  | { kind: 'refused'; code: number };

function reason(message: string): string {
  return message ? `: ${message}` : '';
}

/** An [[Ended]] in words, for logs and the `reconnecting` event. */
export function describeEnded(ended: Ended): string {
  switch (ended.kind) {
    case 'rejected':
      return `the gateway answered HTTP ${ended.status}${reason(ended.message)}`;
    case 'unreachable':
      return `could not reach the gateway: ${ended.cause}`;
    case 'closed':
      return (
        `the gateway closed the session with code ${ended.code}` +
        (ended.hintMs === undefined ? '' : ` after asking to reconnect in ${ended.hintMs} ms`)
      );
    case 'lost':
      return 'the connection was lost';
    case 'token_unavailable':
      return `the token provider failed: ${ended.cause}`;
    case 'certificate_rejected':
      return `TLS: ${ended.cause}`;
    case 'proxy_refused':
      return `the proxy refused the tunnel with HTTP ${ended.status}: ${ended.line}`;
  }
}

/** A [[StopReason]] in words (the same texts as the Rust SDK's). */
export function describeStop(stop: StopReason): string {
  switch (stop.kind) {
    case 'closed':
      return 'closed by the application';
    case 'auth_rejected':
      return `authentication rejected with HTTP ${stop.status}${reason(stop.message)}`;
    case 'http_rejected':
      return `the gateway refused the connection with HTTP ${stop.status}${reason(stop.message)}`;
    case 'tls':
      return `TLS: ${stop.message}`;
    case 'proxy_rejected':
      return `the proxy refused the tunnel with HTTP ${stop.status}: ${stop.line}`;
    case 'refused':
      return `closed by the gateway with code ${stop.code}, which forbids reconnecting`;
  }
}

/**
 * Whether an HTTP refusal may succeed later. Server errors, 408 and 429 are moments;
 * every other status (4xx, a redirect, a 200 from something that is not a gateway) says
 * the URL, the credentials or the client are wrong, and would repeat forever.
 */
export function statusIsRetryable(status: number): boolean {
  return status === 408 || status === 429 || (status >= 500 && status < 600);
}

/** Reconnect rules beyond the plain back-off. */
export interface ReconnectPolicy {
  backoff: Backoff;
  /** Added to the back-off after close 1013 and HTTP 503/429: do not add to an overload. */
  overloadFloorMs: number;
}

export const DEFAULT_RECONNECT: ReconnectPolicy = { backoff: DEFAULT_BACKOFF, overloadFloorMs: 1000 };

/** What to do after a session or attempt ended. */
export type Decision = { kind: 'reconnect'; delayMs: number } | { kind: 'stop'; reason: StopReason };

/**
 * Whether and when to reconnect. `attempt` counts consecutive failures since the last
 * stable session (0 for the first retry).
 */
export function decide(ended: Ended, attempt: number, policy: ReconnectPolicy, random: Random = Math.random): Decision {
  const reconnect = (delayMs: number): Decision => ({ kind: 'reconnect', delayMs });
  const stop = (reason: StopReason): Decision => ({ kind: 'stop', reason });
  const backoff = backoffDelay(policy.backoff, attempt, random);
  switch (ended.kind) {
    case 'rejected':
      if (ended.status === 401 || ended.status === 403) {
        return stop({ kind: 'auth_rejected', status: ended.status, message: ended.message });
      }
      if (ended.status === 503 || ended.status === 429) return reconnect(policy.overloadFloorMs + backoff);
      if (!statusIsRetryable(ended.status)) {
        return stop({ kind: 'http_rejected', status: ended.status, message: ended.message });
      }
      return reconnect(backoff);
    case 'certificate_rejected':
      return stop({ kind: 'tls', message: ended.cause });
    case 'proxy_refused':
      if (!statusIsRetryable(ended.status)) {
        return stop({ kind: 'proxy_rejected', status: ended.status, line: ended.line });
      }
      return reconnect(backoff);
    case 'unreachable':
    case 'token_unavailable':
      return reconnect(backoff);
    case 'closed':
      if (TERMINAL_CLOSE_CODES.has(ended.code)) return stop({ kind: 'refused', code: ended.code });
      // The gateway already jittered its hint across its agents: honour it as is.
      if (ended.hintMs !== undefined) return reconnect(ended.hintMs);
      if (ended.code === 1013) return reconnect(policy.overloadFloorMs + backoff);
      // The token ran out: a fresh one fixes it, so come back within the first window
      // (still jittered: many agents may share an expiry).
      if (ended.code === 4001) return reconnect(backoffDelay(policy.backoff, 0, random));
      return reconnect(backoff);
    case 'lost':
      return reconnect(ended.hintMs ?? backoff);
  }
}

/**
 * How long (ms) to wait before refreshing a token that expires at `expiresAt` (Unix
 * seconds), seen at `nowSeconds`: `marginMs` before expiry, but no later than half the
 * remaining life, so a short-lived token leaves time for a slow provider and a retry.
 */
export function refreshDelayMs(nowSeconds: number, expiresAt: number, marginMs: number): number {
  const remaining = Math.max(0, expiresAt - nowSeconds) * 1000;
  const lead = Math.min(marginMs, remaining / 2);
  return remaining - lead;
}

/** Whether a `nack` with this code may succeed later: size and shape errors never will. */
export function nackIsRetryable(code: string): boolean {
  return code !== 'bad_request' && code !== 'too_large';
}

/** The delay before re-sending a refused `send`: the gateway's hint, else the back-off. */
export function resendDelayMs(
  retryAfterMs: number | undefined,
  attempt: number,
  backoff: Backoff,
  random: Random = Math.random,
): number {
  return retryAfterMs ?? backoffDelay(backoff, attempt, random);
}

/**
 * The ids of the last `capacity` pushes handled, so a redelivered push (a durable push
 * whose `ack` was lost with the connection, or a backend's retry with the same
 * `Idempotency-Key`) is acknowledged without reaching the handler twice. Bounded: the
 * oldest id is forgotten first. Capacity 0 turns it off.
 */
export class DedupWindow {
  // A Set iterates in insertion order, so its first element is the oldest id.
  private readonly seen = new Set<string>();

  constructor(readonly capacity: number) {}

  has(id: string): boolean {
    return this.seen.has(id);
  }

  add(id: string): void {
    if (this.capacity <= 0 || this.seen.has(id)) return;
    this.seen.add(id);
    while (this.seen.size > this.capacity) {
      const oldest = this.seen.values().next().value as string;
      this.seen.delete(oldest);
    }
  }

  get size(): number {
    return this.seen.size;
  }
}
