/**
 * The [[Agent]]: one connection loop that owns the socket, with the same semantics as the
 * Rust SDK (`agent/src/client.rs`) and docs/protocol.md.
 *
 * ```text
 *  agent.send()/request() --> outbox / pending requests --+
 *                                                         v
 *   run(): connect (token, proxy tunnel, TLS, upgrade, welcome) -> session -> decide()
 *                                                         |          (policy.ts)
 *   session: ws events ---> frames: push  -> push queue -> onPush (one at a time) -> ack
 *                                   request -> onRequest (concurrently)         -> response
 *                                   ack/nack/response -> outbox / pending requests
 *            one timer ---> ping, dead peer, token refresh, due sends
 * ```
 *
 * Node runs all of this on one thread, so the maps need no locks; every entry of the
 * outbox is written again on the next session until the gateway acknowledges it.
 * Replies (acks, responses) carry the session's epoch: one produced for a session that
 * has ended is dropped, as that connection is gone.
 */

import { EventEmitter } from 'node:events';
import type * as net from 'node:net';
import { randomUUID } from 'node:crypto';
import WebSocket from 'ws';

import {
  AgentMessage,
  ErrorBody,
  GatewayMessage,
  ProtocolError,
  SUBPROTOCOL,
  Welcome,
  decodeGatewayMessage,
  encodeAgentMessage,
  jsonText,
} from './protocol';
import {
  DEFAULT_BACKOFF,
  DedupWindow,
  Ended,
  ReconnectPolicy,
  StopReason,
  decide,
  describeEnded,
  describeStop,
  nackIsRetryable,
  refreshDelayMs,
  resendDelayMs,
} from './policy';
import { TokenProvider, staticToken } from './token';
import { Env, ProxyOption, TlsOptions, Transport, TransportError, certificateFailure, processEnv } from './transport';

// === errors ===

/** The gateway URL cannot work (not `ws://`/`wss://`, no host): thrown by the constructor. */
export class InvalidUrlError extends Error {
  override name = 'InvalidUrlError';
}

/** No `response` arrived before the request's timeout. */
export class TimeoutError extends Error {
  override name = 'TimeoutError';
  constructor() {
    super('request timed out');
  }
}

/** The gateway or upstream refused the message for good (bad shape, too large, ...). */
export class RejectedError extends Error {
  override name = 'RejectedError';
  constructor(readonly body: ErrorBody) {
    super(`refused by the gateway (${body.code}): ${body.message}`);
  }
}

/** The upstream answered the request with an error. */
export class UpstreamError extends Error {
  override name = 'UpstreamError';
  constructor(readonly body: ErrorBody) {
    super(`the upstream answered with an error (${body.code}): ${body.message}`);
  }
}

/** The agent stopped (closed, or refused for good) before the call completed. */
export class StoppedError extends Error {
  override name = 'StoppedError';
  constructor(readonly reason: StopReason) {
    super(`agent stopped: ${describeStop(reason)}`);
  }
}

/**
 * Thrown by a request handler to answer with this error `code` (default
 * `handler_error`); any other thrown error answers `handler_error` with its message.
 */
export class HandlerError extends Error {
  override name = 'HandlerError';
  constructor(
    message: string,
    readonly code: string = 'handler_error',
  ) {
    super(message);
  }
}

/** JSON text a handler returns (or a caller sends) verbatim, without re-encoding. */
export class RawJson {
  constructor(readonly text: string) {
    JSON.parse(text); // refuse what the gateway would refuse
  }
}

// === public types ===

/** A message pushed by a backend. */
export interface Push {
  /** The message id (`undefined` for a binary frame, which has no envelope). */
  id?: string;
  /** The `data`, parsed; for a binary frame the bytes. */
  data: unknown;
  /** The exact JSON text of `data` (text frames only). */
  rawData?: string;
  /** The bytes of a binary frame. */
  binary?: Buffer;
  /** Whether the backend asked for an `ack` (sent once the handler returns). */
  ack: boolean;
}

/** A request from a backend; the handler's return value becomes the `response`. */
export interface IncomingRequest {
  id: string;
  data: unknown;
  /** The exact JSON text of `data`. */
  rawData: string;
  /** How long the backend waits for the answer. */
  timeoutMs: number;
}

/** The facts of the current session, from the gateway's `welcome` (and `refreshed`). */
export interface Session {
  agentId: string;
  connectionId: string;
  /** When the current token expires (Unix seconds), if it does. */
  expiresAt?: number;
  /** How many sessions this agent has had (1 for the first). */
  number: number;
}

/** Where the connection loop is. */
export type State =
  | { kind: 'connecting'; attempt: number }
  | { kind: 'connected'; session: Session }
  | { kind: 'waiting'; delayMs: number; reason: string }
  | { kind: 'stopped'; reason: StopReason };

/** Where the agent reports what it does (default: nowhere; the CLI logs to stderr). */
export interface Logger {
  debug(message: string): void;
  info(message: string): void;
  warn(message: string): void;
}

const SILENT: Logger = { debug() {}, info() {}, warn() {} };

/** Everything an [[Agent]] takes. Only `url` and `token` are required. */
export interface AgentOptions {
  /** `ws://host:port/v1/connect` or `wss://…`. */
  url: string;
  /** A token, or a provider asked on every connect and before expiry (in-band refresh). */
  token: string | TokenProvider;
  /**
   * Called for every push, one at a time, in arrival order; a push that asked for an
   * `ack` is acknowledged when the returned promise resolves. A handler that throws is
   * not acknowledged (a durable push comes back on the next connection) and its id is
   * not remembered as handled.
   */
  onPush?: (push: Push) => void | Promise<void>;
  /**
   * Called for every request, concurrently. The resolved value (JSON-encoded, or a
   * [[RawJson]] verbatim) is the answer; a throw answers an error ([[HandlerError]]
   * picks the code). Without it, requests are answered `handler_error`.
   */
  onRequest?: (request: IncomingRequest) => unknown;
  /** Reconnect back-off and overload floor (defaults: 250 ms base, 30 s cap, 1 s floor). */
  reconnect?: Partial<ReconnectPolicy>;
  /** Deadline for token, TCP, proxy, TLS, upgrade and `welcome` (10 s). */
  connectTimeoutMs?: number;
  /** How often the agent pings the gateway (20 s). */
  pingIntervalMs?: number;
  /** No frame at all for `pingIntervalMs + pongTimeoutMs`: the gateway counts as dead (10 s). */
  pongTimeoutMs?: number;
  /** A `send` with neither `ack` nor `nack` after this long is sent again (30 s). */
  ackTimeoutMs?: number;
  /** Refresh the token this long before it expires, at most half its remaining life (60 s). */
  refreshMarginMs?: number;
  /** Default timeout of [[Agent.request]] (10 s). */
  requestTimeoutMs?: number;
  /** A session shorter than this does not reset the back-off (5 s). */
  stableAfterMs?: number;
  /** Pushes waiting for the handler before the agent stops reading the socket (64). */
  pushQueue?: number;
  /** Ids of recently handled pushes remembered for de-duplication (4096; 0 turns it off). */
  dedupWindow?: number;
  /**
   * Whether a `send` refused with `unavailable` (nothing upstream receives agent
   * messages) is retried (true); a one-shot tool sets false to fail it at once.
   */
  retryUnavailable?: boolean;
  /** `wss://`: an extra CA file and a client certificate. */
  tls?: TlsOptions;
  /** The HTTP proxy (default `'fromEnv'`: HTTPS_PROXY/HTTP_PROXY/NO_PROXY). */
  proxy?: ProxyOption;
  /** Where logs go (default: nowhere). */
  logger?: Logger;
  /** Environment lookup for the proxy and TLS variables (default: `process.env`). */
  env?: Env;
}

interface Settings {
  reconnect: ReconnectPolicy;
  connectTimeoutMs: number;
  pingIntervalMs: number;
  pongTimeoutMs: number;
  ackTimeoutMs: number;
  refreshMarginMs: number;
  requestTimeoutMs: number;
  stableAfterMs: number;
  pushQueue: number;
  retryUnavailable: boolean;
}

/** The events an [[Agent]] emits. */
export interface AgentEvents {
  /** Every change of [[State]]. */
  state: [State];
  /** A session opened (`welcome`). */
  connected: [Session];
  /** The token was refreshed in band (`refreshed`). */
  refreshed: [Session];
  /** The session or attempt ended; the next attempt follows after `delayMs`. */
  reconnecting: [{ delayMs: number; reason: string; ended: Ended }];
  /** The agent stopped for good. */
  stopped: [StopReason];
}

// === internal state ===

interface Waiter<T> {
  resolve: (value: T) => void;
  reject: (err: Error) => void;
}

interface PendingSend {
  id: string;
  data: string;
  waiters: Waiter<void>[];
  /** Written at (or again after) this time: due now, after a nack's delay, or at the ack timeout. */
  at: number;
  inFlight: boolean;
  nacks: number;
}

interface PendingRequest {
  data: string;
  deadline: number;
  timeoutMs: number;
  written: boolean;
  waiter: Waiter<unknown>;
  timer: NodeJS.Timeout;
}

interface PushJob {
  epoch: number;
  push: Push;
}

type WsEvent =
  | { kind: 'message'; data: Buffer; isBinary: boolean }
  | { kind: 'close'; code: number }
  | { kind: 'error'; err: Error }
  | { kind: 'alive' };

/** Routes one WebSocket's events to whoever handles them now, buffering in between. */
class Wire {
  private readonly queue: WsEvent[] = [];
  private handler?: (event: WsEvent) => void;

  constructor(readonly ws: WebSocket) {
    ws.on('message', (data: WebSocket.RawData, isBinary: boolean) =>
      this.emit({ kind: 'message', data: toBuffer(data), isBinary }),
    );
    ws.on('close', (code: number) => this.emit({ kind: 'close', code }));
    ws.on('error', (err: Error) => this.emit({ kind: 'error', err }));
    ws.on('ping', () => this.emit({ kind: 'alive' }));
    ws.on('pong', () => this.emit({ kind: 'alive' }));
  }

  private emit(event: WsEvent): void {
    if (this.handler) this.handler(event);
    else this.queue.push(event);
  }

  /** Hands events to `handler` (first those that arrived while nobody listened). */
  listen(handler?: (event: WsEvent) => void): void {
    this.handler = handler;
    while (this.handler && this.queue.length > 0) this.handler(this.queue.shift()!);
  }
}

function toBuffer(data: WebSocket.RawData): Buffer {
  if (Buffer.isBuffer(data)) return data;
  if (Array.isArray(data)) return Buffer.concat(data);
  return Buffer.from(data as ArrayBuffer);
}

/**
 * Refuses, before any attempt, a URL no attempt could use: one that does not parse, has
 * no host, or another scheme than `ws`/`wss`.
 */
export function checkUrl(url: string): URL {
  const shape = 'agents connect at ws://HOST:PORT/v1/connect';
  const invalid = (why: string) => new InvalidUrlError(`invalid gateway url \`${url}\`: ${why}; ${shape}`);
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    throw invalid(url.includes('://') ? 'it does not parse' : 'no scheme');
  }
  if (parsed.protocol !== 'ws:' && parsed.protocol !== 'wss:') {
    throw invalid(`the scheme must be ws:// or wss:// (got ${parsed.protocol}//)`);
  }
  // WHATWG URLs skip empty authorities (`ws:///v1/connect` gets host `v1`): look at the text.
  if (!parsed.hostname || /^wss?:\/\/[/?#]/i.test(url.trim())) throw invalid('no host');
  return parsed;
}

/**
 * The gateway's reason from the body of a refused upgrade: the `message` of its
 * `{"error":{"code","message"}}` body, else the body's text, cut to a readable length.
 */
export function refusalMessage(body: string): string {
  const text = body.trim();
  if (!text) return '';
  try {
    const json = JSON.parse(text);
    const message = json?.error?.message ?? json?.message;
    if (typeof message === 'string') return message;
  } catch {
    // not JSON: the text itself
  }
  const chars = [...text];
  return chars.length > 300 ? `${chars.slice(0, 300).join('')}…` : text;
}

const unixNow = () => Math.floor(Date.now() / 1000);

/**
 * `promise`, marked as handled: when it loses a race (to the connect deadline) and
 * rejects later, that rejection is expected, not an unhandled one that ends the process.
 */
function settleQuietly<T>(promise: Promise<T>): Promise<T> {
  promise.catch(() => {});
  return promise;
}

// === the agent ===

/**
 * An agent connection to a Tether gateway. The constructor checks the URL and the TLS
 * and proxy settings (throwing [[InvalidUrlError]] or [[TransportError]]); [[start]]
 * begins connecting, and the agent keeps a session open until [[close]] or a refusal
 * that no retry can change.
 *
 * ```ts
 * const agent = new Agent({ url, token, onPush: (push) => console.log(push.data) });
 * agent.start();
 * await agent.connected();
 * await agent.send({ event: 'booted' }); // resolves on the upstream's ack
 * ```
 */
export class Agent extends EventEmitter<AgentEvents> {
  private readonly url: URL;
  private readonly transport: Transport;
  private readonly tokens: TokenProvider;
  private onPush: (push: Push) => void | Promise<void>;
  private readonly hasPushHandler: boolean;
  private iterating = false;
  private readonly onRequest: (request: IncomingRequest) => unknown;
  private readonly settings: Settings;
  private readonly logger: Logger;
  private readonly dedup: DedupWindow;

  private current: State = { kind: 'connecting', attempt: 0 };
  private readonly outbox = new Map<string, PendingSend>();
  private readonly requests = new Map<string, PendingRequest>();
  private readonly queuedPushes: PushJob[] = [];
  private dispatching = false;
  private epoch = 0;
  /** The open session's socket and a nudge to re-run its timers, while one is open. */
  private live?: { epoch: number; ws: WebSocket; pump: () => void };
  private readonly shutdown = new AbortController();
  private running?: Promise<void>;

  constructor(options: AgentOptions) {
    super();
    this.url = checkUrl(options.url);
    const env = options.env ?? processEnv;
    this.transport = new Transport(this.url, options.tls ?? {}, options.proxy ?? 'fromEnv', env);
    this.tokens = typeof options.token === 'string' ? staticToken(options.token) : options.token;
    this.onPush = options.onPush ?? (() => {});
    this.hasPushHandler = options.onPush !== undefined;
    this.onRequest =
      options.onRequest ??
      (() => {
        throw new HandlerError('this agent has no request handler');
      });
    this.settings = {
      reconnect: {
        backoff: options.reconnect?.backoff ?? DEFAULT_BACKOFF,
        overloadFloorMs: options.reconnect?.overloadFloorMs ?? 1000,
      },
      connectTimeoutMs: options.connectTimeoutMs ?? 10_000,
      pingIntervalMs: options.pingIntervalMs ?? 20_000,
      pongTimeoutMs: options.pongTimeoutMs ?? 10_000,
      ackTimeoutMs: options.ackTimeoutMs ?? 30_000,
      refreshMarginMs: options.refreshMarginMs ?? 60_000,
      requestTimeoutMs: options.requestTimeoutMs ?? 10_000,
      stableAfterMs: options.stableAfterMs ?? 5_000,
      pushQueue: Math.max(1, options.pushQueue ?? 64),
      retryUnavailable: options.retryUnavailable ?? true,
    };
    this.dedup = new DedupWindow(options.dedupWindow ?? 4096);
    this.logger = options.logger ?? SILENT;
  }

  /** Starts the connection loop (once; later calls return the same agent). */
  start(): this {
    this.running ??= this.run();
    return this;
  }

  /** The current state. */
  get state(): State {
    return this.current;
  }

  /** Resolves with the session once one is open; rejects with [[StoppedError]] if the agent stops first. */
  connected(): Promise<Session> {
    const state = this.current;
    if (state.kind === 'connected') return Promise.resolve(state.session);
    if (state.kind === 'stopped') return Promise.reject(new StoppedError(state.reason));
    return new Promise((resolve, reject) => {
      const onState = (s: State) => {
        if (s.kind === 'connected') resolve(s.session);
        else if (s.kind === 'stopped') reject(new StoppedError(s.reason));
        else return;
        this.off('state', onState);
      };
      this.on('state', onState);
    });
  }

  /** Resolves with the reason once the agent stopped for good. */
  stopped(): Promise<StopReason> {
    const state = this.current;
    if (state.kind === 'stopped') return Promise.resolve(state.reason);
    return new Promise((resolve) => this.once('stopped', resolve));
  }

  /**
   * The pushes as an async iterator, in place of `onPush` (one consumer): a push is
   * handled while the loop body runs, so one that asked for an `ack` is acknowledged
   * when the loop asks for the next push (or leaves). Ends when the agent stops.
   *
   * ```ts
   * for await (const push of agent.pushes()) await handle(push.data);
   * ```
   */
  pushes(): AsyncIterableIterator<Push> {
    if (this.hasPushHandler || this.iterating) {
      throw new Error('pushes() takes the place of onPush and has one consumer');
    }
    this.iterating = true;
    let offered: { push: Push; done: () => void } | undefined;
    let waiting: ((result: IteratorResult<Push>) => void) | undefined;
    let release: (() => void) | undefined;
    let ended = false;
    const end = () => {
      ended = true;
      release?.();
      offered?.done();
      waiting?.({ value: undefined, done: true });
      waiting = undefined;
    };
    this.onPush = (push) =>
      new Promise<void>((done) => {
        if (ended) return done();
        if (waiting) {
          release = done;
          waiting({ value: push, done: false });
          waiting = undefined;
        } else {
          offered = { push, done };
        }
      });
    void this.stopped().then(end);
    const iterator: AsyncIterableIterator<Push> = {
      next: () => {
        // The consumer is back: the push it had is handled, so it may be acknowledged.
        release?.();
        release = undefined;
        if (offered) {
          const { push, done } = offered;
          offered = undefined;
          release = done;
          return Promise.resolve({ value: push, done: false });
        }
        if (ended) return Promise.resolve({ value: undefined, done: true });
        return new Promise((resolve) => (waiting = resolve));
      },
      return: () => {
        end();
        this.onPush = () => {};
        return Promise.resolve({ value: undefined, done: true });
      },
      [Symbol.asyncIterator]: () => iterator,
    };
    return iterator;
  }

  /**
   * Sends `data` to the tenant's upstream; resolves on its `ack`. At-least-once: the
   * message is re-sent with the same id (the upstream's `Idempotency-Key`) across
   * reconnects, after transient `nack`s and after the ack timeout, until acknowledged;
   * only a permanent refusal ([[RejectedError]]) or the agent stopping ends it.
   * A [[RawJson]] goes out verbatim. `id` defaults to a fresh UUID.
   */
  send(data: unknown, options: { id?: string } = {}): Promise<void> {
    const id = options.id ?? randomUUID();
    const text = data instanceof RawJson ? data.text : jsonText(data);
    return new Promise((resolve, reject) => {
      if (this.current.kind === 'stopped') return reject(new StoppedError(this.current.reason));
      const existing = this.outbox.get(id);
      if (existing) {
        // The same id submitted twice: the newer caller waits for the same ack.
        existing.waiters.push({ resolve, reject });
        return;
      }
      this.outbox.set(id, { id, data: text, waiters: [{ resolve, reject }], at: Date.now(), inFlight: false, nacks: 0 });
      this.live?.pump();
    });
  }

  /**
   * Asks the upstream and resolves with its answer's `data` (parsed), within `timeoutMs`
   * (default `requestTimeoutMs`); re-sent on a new session within its deadline. Rejects
   * with [[TimeoutError]], [[UpstreamError]], [[RejectedError]] or [[StoppedError]].
   */
  request(data: unknown, options: { timeoutMs?: number } = {}): Promise<unknown> {
    const timeoutMs = options.timeoutMs ?? this.settings.requestTimeoutMs;
    const text = data instanceof RawJson ? data.text : jsonText(data);
    return new Promise((resolve, reject) => {
      if (this.current.kind === 'stopped') return reject(new StoppedError(this.current.reason));
      const id = randomUUID();
      const timer = setTimeout(() => {
        if (this.requests.delete(id)) reject(new TimeoutError());
      }, timeoutMs);
      this.requests.set(id, {
        data: text,
        deadline: Date.now() + timeoutMs,
        timeoutMs,
        written: false,
        waiter: { resolve, reject },
        timer,
      });
      this.live?.pump();
    });
  }

  /**
   * Closes the session (close code 1000) and resolves once the loop ended. Pending sends
   * and requests reject with [[StoppedError]].
   */
  async close(): Promise<void> {
    this.shutdown.abort();
    if (this.running) await this.running;
    else this.stop({ kind: 'closed' });
  }

  // === the loop ===

  private setState(state: State): void {
    this.current = state;
    this.emit('state', state);
  }

  private async run(): Promise<void> {
    let attempt = 0;
    for (;;) {
      this.setState({ kind: 'connecting', attempt });
      let ended: Ended | 'shutdown';
      const opened = await this.connect();
      if ('wire' in opened) {
        const started = Date.now();
        ended = await this.session(opened.wire, opened.welcome);
        if (Date.now() - started >= this.settings.stableAfterMs) attempt = 0;
      } else {
        ended = opened.ended;
      }
      if (ended === 'shutdown') return this.stop({ kind: 'closed' });
      const decision = decide(ended, attempt, this.settings.reconnect);
      attempt += 1;
      if (decision.kind === 'stop') {
        this.logger.warn(`agent stops: ${describeStop(decision.reason)}`);
        return this.stop(decision.reason);
      }
      const reason = describeEnded(ended);
      // In words at info: someone running with default logging must see why the agent
      // is not connected (a refused port, a 503's reason).
      this.logger.info(`reconnecting in ${decision.delayMs} ms: ${reason}`);
      this.setState({ kind: 'waiting', delayMs: decision.delayMs, reason });
      this.emit('reconnecting', { delayMs: decision.delayMs, reason, ended });
      if (!(await this.sleep(decision.delayMs))) return this.stop({ kind: 'closed' });
    }
  }

  /** Sleeps unless the agent closes first (then false). */
  private sleep(ms: number): Promise<boolean> {
    const signal = this.shutdown.signal;
    if (signal.aborted) return Promise.resolve(false);
    return new Promise((resolve) => {
      const onAbort = () => {
        clearTimeout(timer);
        resolve(false);
      };
      const timer = setTimeout(() => {
        signal.removeEventListener('abort', onAbort);
        resolve(true);
      }, ms);
      signal.addEventListener('abort', onAbort, { once: true });
    });
  }

  private stop(reason: StopReason): void {
    if (this.current.kind === 'stopped') return;
    const err = () => new StoppedError(reason);
    for (const entry of this.outbox.values()) entry.waiters.forEach((w) => w.reject(err()));
    this.outbox.clear();
    for (const request of this.requests.values()) {
      clearTimeout(request.timer);
      request.waiter.reject(err());
    }
    this.requests.clear();
    this.setState({ kind: 'stopped', reason });
    this.emit('stopped', reason);
  }

  /** Token, TCP (through the proxy), TLS, upgrade and `welcome`, all under the connect deadline. */
  private async connect(): Promise<{ wire: Wire; welcome: Welcome } | { ended: Ended | 'shutdown' }> {
    const attempt = new AbortController();
    const limit = this.settings.connectTimeoutMs;
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      attempt.abort();
    }, limit);
    const onShutdown = () => attempt.abort();
    this.shutdown.signal.addEventListener('abort', onShutdown, { once: true });
    const aborted = new Promise<never>((_, reject) =>
      attempt.signal.addEventListener('abort', () => reject(new Error('aborted')), { once: true }),
    );
    aborted.catch(() => {});
    let ws: WebSocket | undefined;
    try {
      if (this.shutdown.signal.aborted) return { ended: 'shutdown' };
      let token: string;
      try {
        token = await Promise.race([settleQuietly(Promise.resolve().then(() => this.tokens())), aborted]);
      } catch (err) {
        if (attempt.signal.aborted) throw err;
        this.logger.warn(`token provider failed: ${(err as Error)?.message ?? err}`);
        return { ended: { kind: 'token_unavailable', cause: String((err as Error)?.message ?? err) } };
      }
      const socket = await this.transport.open(attempt.signal);
      const opened = new WebSocket(this.url, SUBPROTOCOL, {
        createConnection: () => socket as net.Socket,
        headers: { Authorization: `Bearer ${token}` },
        perMessageDeflate: false,
        followRedirects: false,
      });
      ws = opened;
      const wire = new Wire(opened);
      const welcome = await Promise.race([settleQuietly(this.handshake(opened, wire)), aborted]);
      return { wire, welcome };
    } catch (err) {
      ws?.terminate();
      if (this.shutdown.signal.aborted) return { ended: 'shutdown' };
      if (timedOut) {
        return { ended: { kind: 'unreachable', cause: `no welcome within the connect timeout (${limit} ms)` } };
      }
      if (err && typeof err === 'object' && 'kind' in err) return { ended: err as Ended };
      return { ended: { kind: 'unreachable', cause: String((err as Error)?.message ?? err) } };
    } finally {
      clearTimeout(timer);
      this.shutdown.signal.removeEventListener('abort', onShutdown);
    }
  }

  /** Waits for the upgrade and the `welcome`; rejects with an [[Ended]]. */
  private handshake(ws: WebSocket, wire: Wire): Promise<Welcome> {
    return new Promise((resolve, reject) => {
      ws.once('unexpected-response', (req, res) => {
        const chunks: Buffer[] = [];
        let size = 0;
        const done = () => {
          req.destroy();
          const status = res.statusCode ?? 0;
          reject({ kind: 'rejected', status, message: refusalMessage(Buffer.concat(chunks).toString('utf8')) });
        };
        res.on('data', (chunk: Buffer) => {
          // The reason is in the first bytes; a huge body is not read to its end.
          if (size < 16 * 1024) chunks.push(chunk);
          size += chunk.length;
        });
        res.on('end', done);
        res.on('error', done);
        res.on('close', done);
      });
      wire.listen((event) => {
        switch (event.kind) {
          case 'message': {
            wire.listen(undefined); // whatever follows waits for the session
            if (event.isBinary) return reject({ kind: 'lost' });
            try {
              const message = decodeGatewayMessage(event.data.toString('utf8'));
              if (message.type === 'welcome') return resolve(message);
              this.logger.warn(`first frame was not a welcome: ${message.type}`);
            } catch (err) {
              this.logger.warn(`first frame was not a welcome: ${(err as Error).message}`);
            }
            return reject({ kind: 'lost' });
          }
          case 'close':
            return reject(event.code === 1006 ? { kind: 'lost' } : { kind: 'closed', code: event.code });
          case 'error':
            return reject(
              certificateFailure(event.err) ?? { kind: 'unreachable', cause: event.err.message || String(event.err) },
            );
          case 'alive':
            return;
        }
      });
    });
  }

  /** Runs one session until it ends; resolves with how it ended. */
  private session(wire: Wire, welcome: Welcome): Promise<Ended | 'shutdown'> {
    const epoch = ++this.epoch;
    const ws = wire.ws;
    const s = this.settings;
    let lastSeen = Date.now();
    let lastPing = Date.now();
    let hintMs: number | undefined;
    let refreshAt: number | undefined;
    let refreshInFlight = false;
    let timer: NodeJS.Timeout | undefined;
    const session: Session = {
      agentId: welcome.agent_id,
      connectionId: welcome.connection_id,
      expiresAt: welcome.expires_at,
      number: epoch,
    };
    const refreshTime = (expiresAt: number) => Date.now() + refreshDelayMs(unixNow(), expiresAt, s.refreshMarginMs);
    if (welcome.expires_at !== undefined) refreshAt = refreshTime(welcome.expires_at);
    // Everything unanswered from earlier sessions goes out again.
    for (const request of this.requests.values()) request.written = false;

    return new Promise((resolve) => {
      let finished = false;
      const finish = (ended: Ended | 'shutdown') => {
        if (finished) return;
        finished = true;
        clearTimeout(timer);
        this.shutdown.signal.removeEventListener('abort', onShutdown);
        this.live = undefined;
        wire.listen(() => {});
        // Whatever was written and not answered goes again on the next session.
        for (const entry of this.outbox.values()) {
          if (entry.inFlight) {
            entry.inFlight = false;
            entry.at = Date.now();
          }
        }
        if (ended === 'shutdown') {
          // Close politely; a gateway that does not answer within a second is cut off.
          const cut = setTimeout(() => ws.terminate(), 1000);
          ws.once('close', () => {
            clearTimeout(cut);
            resolve(ended);
          });
          if (ws.readyState === WebSocket.CLOSED) {
            clearTimeout(cut);
            resolve(ended);
          } else {
            ws.close(1000, 'agent closing');
          }
          return;
        }
        if (ws.readyState !== WebSocket.CLOSED) ws.terminate();
        resolve(ended);
      };
      const onShutdown = () => finish('shutdown');

      const write = (message: AgentMessage) => {
        if (ws.readyState === WebSocket.OPEN) ws.send(encodeAgentMessage(message));
      };

      const pump = () => {
        if (finished) return;
        const now = Date.now();
        if (now >= lastSeen + s.pingIntervalMs + s.pongTimeoutMs) {
          this.logger.warn('no frame from the gateway in time; it counts as dead');
          return finish({ kind: 'lost', hintMs });
        }
        if (now >= lastPing + s.pingIntervalMs) {
          lastPing = now;
          if (ws.readyState === WebSocket.OPEN) ws.ping();
        }
        if (refreshAt !== undefined && refreshAt <= now && !refreshInFlight) {
          refreshInFlight = true;
          Promise.resolve()
            .then(() => this.tokens())
            .then(
              (token) => {
                if (this.live?.epoch === epoch) write({ type: 'refresh', token });
              },
              (err) => {
                if (this.live?.epoch !== epoch) return;
                this.logger.warn(`token refresh failed; retrying: ${(err as Error)?.message ?? err}`);
                refreshInFlight = false;
                refreshAt = Date.now() + Math.max(s.reconnect.backoff.baseMs, 1000);
                pump();
              },
            );
        }
        // Due sends in submission order, then requests not yet written on this session.
        for (const entry of this.outbox.values()) {
          if (entry.at <= now) {
            write({ type: 'send', id: entry.id, data: entry.data });
            entry.inFlight = true;
            entry.at = now + s.ackTimeoutMs;
          }
        }
        for (const [id, request] of this.requests) {
          if (request.written) continue;
          const remaining = Math.max(1, Math.min(request.deadline - now, request.timeoutMs));
          write({ type: 'request', id, data: request.data, timeout_ms: remaining });
          request.written = true;
        }
        let next = Math.min(lastPing + s.pingIntervalMs, lastSeen + s.pingIntervalMs + s.pongTimeoutMs);
        if (refreshAt !== undefined && !refreshInFlight) next = Math.min(next, refreshAt);
        for (const entry of this.outbox.values()) next = Math.min(next, entry.at);
        clearTimeout(timer);
        timer = setTimeout(pump, Math.max(0, next - Date.now()));
      };

      const onFrame = (text: string) => {
        let message: GatewayMessage;
        try {
          message = decodeGatewayMessage(text);
        } catch (err) {
          if (err instanceof ProtocolError) {
            this.logger.warn(`ignoring undecodable envelope: ${err.message}`);
            return;
          }
          throw err;
        }
        switch (message.type) {
          case 'welcome':
            return;
          case 'push':
            return this.enqueuePush({
              epoch,
              push: { id: message.id, data: message.data, rawData: message.rawData, ack: message.ack },
            });
          case 'request':
            return this.answer(epoch, {
              id: message.id,
              data: message.data,
              rawData: message.rawData,
              timeoutMs: message.timeout_ms,
            });
          case 'response': {
            const request = this.requests.get(message.id);
            if (!request) return;
            this.requests.delete(message.id);
            clearTimeout(request.timer);
            if (message.error) request.waiter.reject(new UpstreamError(message.error));
            else request.waiter.resolve(message.data);
            return;
          }
          case 'ack': {
            const entry = this.outbox.get(message.id);
            if (!entry) return;
            this.outbox.delete(message.id);
            entry.waiters.forEach((w) => w.resolve());
            return;
          }
          case 'nack':
            return this.refused(message.id, message.error, message.retry_after_ms);
          case 'refreshed':
            refreshInFlight = false;
            refreshAt = message.expires_at === undefined ? undefined : refreshTime(message.expires_at);
            session.expiresAt = message.expires_at;
            this.logger.debug(`token refreshed; expires at ${message.expires_at}`);
            this.emit('refreshed', { ...session });
            return;
          case 'reconnect':
            this.logger.info(`gateway asked to reconnect in ${message.after_ms} ms: ${message.reason}`);
            hintMs = message.after_ms;
            return;
          case 'error': {
            const request = message.id === undefined ? undefined : this.requests.get(message.id);
            if (message.id !== undefined && request) {
              this.requests.delete(message.id);
              clearTimeout(request.timer);
              request.waiter.reject(new RejectedError(message.error));
            } else if (message.id !== undefined) {
              this.refused(message.id, message.error, undefined);
            } else {
              this.logger.warn(`gateway refused an envelope: ${message.error.code}: ${message.error.message}`);
            }
            return;
          }
        }
      };

      this.live = { epoch, ws, pump };
      this.shutdown.signal.addEventListener('abort', onShutdown, { once: true });
      this.logger.info(`connected as ${session.agentId} (connection ${session.connectionId})`);
      this.setState({ kind: 'connected', session: { ...session } });
      this.emit('connected', { ...session });
      if (this.shutdown.signal.aborted) return finish('shutdown');
      wire.listen((event) => {
        if (finished) return;
        switch (event.kind) {
          case 'message':
            lastSeen = Date.now();
            if (event.isBinary) {
              this.enqueuePush({ epoch, push: { data: event.data, binary: event.data, ack: false } });
            } else {
              onFrame(event.data.toString('utf8'));
            }
            break;
          case 'alive':
            lastSeen = Date.now();
            break;
          case 'close':
            // 1006: no close frame (reset, EOF): lost, not closed.
            return finish(event.code === 1006 ? { kind: 'lost', hintMs } : { kind: 'closed', code: event.code, hintMs });
          case 'error':
            this.logger.debug(`socket error: ${event.err.message}`);
            return finish({ kind: 'lost', hintMs });
        }
        pump();
      });
      pump();
    });
  }

  /** Writes `message` if session `epoch` is still the open one (else that connection is gone). */
  private reply(epoch: number, message: AgentMessage): void {
    const live = this.live;
    if (live && live.epoch === epoch && live.ws.readyState === WebSocket.OPEN) {
      live.ws.send(encodeAgentMessage(message));
    }
  }

  /** A `nack` (or an `error` naming a send): retry after a delay, or fail the send for good. */
  private refused(id: string, error: ErrorBody, retryAfterMs: number | undefined): void {
    const entry = this.outbox.get(id);
    if (!entry) return;
    const retryable =
      nackIsRetryable(error.code) && (this.settings.retryUnavailable || error.code !== 'unavailable');
    if (retryable) {
      const delay = resendDelayMs(retryAfterMs, entry.nacks, this.settings.reconnect.backoff);
      entry.nacks += 1;
      entry.inFlight = false;
      entry.at = Date.now() + delay;
      this.logger.info(`send ${id} refused by the gateway, retrying in ${delay} ms: ${error.message}`);
      this.live?.pump();
    } else {
      this.outbox.delete(id);
      entry.waiters.forEach((w) => w.reject(new RejectedError(error)));
    }
  }

  // === handlers ===

  private enqueuePush(job: PushJob): void {
    this.queuedPushes.push(job);
    // Back-pressure: a slow push handler slows reading, and the gateway's bounded queue
    // decides what happens to a consumer that stays slow.
    if (this.queuedPushes.length >= this.settings.pushQueue) this.live?.ws.pause();
    void this.dispatchPushes();
  }

  /**
   * Runs the push handler on each push in order, then acks it if asked. A push whose id
   * was handled recently (a redelivery) is acked without running the handler again, and
   * only here, after every push before it, so a redelivered copy is never acknowledged
   * while its first copy's handler still runs.
   */
  private async dispatchPushes(): Promise<void> {
    if (this.dispatching) return;
    this.dispatching = true;
    try {
      for (let job = this.queuedPushes.shift(); job; job = this.queuedPushes.shift()) {
        if (this.queuedPushes.length < this.settings.pushQueue) this.live?.ws.resume();
        const { id, ack } = job.push;
        if (id !== undefined && this.dedup.has(id)) {
          this.logger.debug(`redelivered push ${id}: acknowledged, not handled again`);
        } else {
          try {
            await this.onPush(job.push);
          } catch (err) {
            this.logger.warn(`push handler failed${id ? ` on ${id}` : ''}; not acknowledged: ${(err as Error)?.message ?? err}`);
            continue;
          }
          if (id !== undefined) this.dedup.add(id);
        }
        if (ack && id !== undefined) this.reply(job.epoch, { type: 'ack', id });
      }
    } finally {
      this.dispatching = false;
    }
  }

  /** Runs the request handler (concurrently with everything else) and writes its answer. */
  private answer(epoch: number, request: IncomingRequest): void {
    Promise.resolve()
      .then(() => this.onRequest(request))
      .then(
        (value): AgentMessage => ({
          type: 'response',
          id: request.id,
          data: value instanceof RawJson ? value.text : jsonText(value),
        }),
        (err): AgentMessage => ({
          type: 'response',
          id: request.id,
          error: {
            code: err instanceof HandlerError ? err.code : 'handler_error',
            message: String((err as Error)?.message ?? err),
          },
        }),
      )
      .then((message) => this.reply(epoch, message));
  }
}

export { TransportError };
