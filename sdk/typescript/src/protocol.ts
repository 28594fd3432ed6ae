/**
 * The `tether.v1` wire format (docs/protocol.md): decoding the gateway's envelopes and
 * encoding the agent's. Pure: no sockets, so every rule is unit-tested.
 *
 * `data` is passed through byte for byte: besides the parsed value, a decoded
 * envelope keeps the exact JSON text of its `data` member (`rawData`), so an agent that
 * forwards or prints a payload does not re-encode it (large integers, key order and
 * number spellings survive).
 */

/** The subprotocol every agent offers. */
export const SUBPROTOCOL = 'tether.v1';

/** `{"code","message"}`: `code` is for programs, `message` for people. */
export interface ErrorBody {
  /** One of the codes below, or a newer one (unknown codes must be tolerated). */
  code: ErrorCode | string;
  message: string;
}

/** The error codes of docs/protocol.md. */
export type ErrorCode =
  | 'bad_request'
  | 'too_large'
  | 'rate_limited'
  | 'timeout'
  | 'upstream_error'
  | 'unavailable'
  | 'handler_error'
  | 'internal'
  | 'overloaded';

/** The first frame of every session. */
export interface Welcome {
  type: 'welcome';
  agent_id: string;
  connection_id: string;
  /** When the token expires (Unix seconds), if it does. */
  expires_at?: number;
  max_message_bytes: number;
  messages_per_second: number;
}

/** What the gateway sends to an agent. */
export type GatewayMessage =
  | Welcome
  | { type: 'push'; id: string; data: unknown; rawData: string; ack: boolean }
  | { type: 'request'; id: string; data: unknown; rawData: string; timeout_ms: number }
  | { type: 'response'; id: string; data?: unknown; rawData?: string; error?: ErrorBody }
  | { type: 'ack'; id: string }
  | { type: 'nack'; id: string; error: ErrorBody; retry_after_ms?: number }
  | { type: 'refreshed'; expires_at?: number }
  | { type: 'reconnect'; after_ms: number; reason: string }
  | { type: 'error'; id?: string; error: ErrorBody };

/** What an agent sends to the gateway. `data` is JSON text, already encoded. */
export type AgentMessage =
  | { type: 'send'; id: string; data: string }
  | { type: 'request'; id: string; data: string; timeout_ms?: number }
  | { type: 'response'; id: string; data: string }
  | { type: 'response'; id: string; error: ErrorBody }
  | { type: 'ack'; id: string }
  | { type: 'refresh'; token: string };

/** A text frame that is not a valid gateway envelope. */
export class ProtocolError extends Error {
  override name = 'ProtocolError';
}

/** Ids are 1–128 bytes without control characters. */
export function validId(id: unknown): id is string {
  return (
    typeof id === 'string' &&
    id.length > 0 &&
    Buffer.byteLength(id, 'utf8') <= 128 &&
    // eslint-disable-next-line no-control-regex
    !/[\u0000-\u001f\u007f-\u009f]/.test(id)
  );
}

function checkedId(kind: string, id: unknown): string {
  if (id === undefined || id === null) throw new ProtocolError(`\`${kind}\` without \`id\``);
  if (!validId(id)) throw new ProtocolError(`\`${kind}\` with an invalid \`id\``);
  return id;
}

function errorBody(value: unknown, fallback: string): ErrorBody {
  if (value && typeof value === 'object') {
    const { code, message } = value as Record<string, unknown>;
    return {
      code: typeof code === 'string' ? code : 'unknown',
      message: typeof message === 'string' ? message : '',
    };
  }
  return { code: 'unknown', message: fallback };
}

function optNumber(value: unknown): number | undefined {
  return typeof value === 'number' && Number.isFinite(value) ? value : undefined;
}

/** Decodes one text frame from the gateway. Throws [[ProtocolError]]. */
export function decodeGatewayMessage(text: string): GatewayMessage {
  let wire: Record<string, unknown>;
  try {
    wire = JSON.parse(text);
  } catch (err) {
    throw new ProtocolError(`not JSON: ${(err as Error).message}`);
  }
  if (!wire || typeof wire !== 'object' || Array.isArray(wire)) {
    throw new ProtocolError('an envelope is a JSON object');
  }
  const raw = () => rawMember(text, 'data') ?? 'null';
  const data = () => (wire.data === undefined ? null : wire.data);
  switch (wire.type) {
    case 'welcome':
      if (typeof wire.agent_id !== 'string') throw new ProtocolError('`welcome` without `agent_id`');
      return {
        type: 'welcome',
        agent_id: wire.agent_id,
        connection_id: typeof wire.connection_id === 'string' ? wire.connection_id : '',
        expires_at: optNumber(wire.expires_at),
        max_message_bytes: optNumber(wire.max_message_bytes) ?? 0,
        messages_per_second: optNumber(wire.messages_per_second) ?? 0,
      };
    case 'push':
      return { type: 'push', id: checkedId('push', wire.id), data: data(), rawData: raw(), ack: wire.ack === true };
    case 'request':
      return {
        type: 'request',
        id: checkedId('request', wire.id),
        data: data(),
        rawData: raw(),
        timeout_ms: optNumber(wire.timeout_ms) ?? 0,
      };
    case 'response': {
      const id = checkedId('response', wire.id);
      if (wire.error !== undefined && wire.error !== null) {
        return { type: 'response', id, error: errorBody(wire.error, 'response with an error') };
      }
      return { type: 'response', id, data: data(), rawData: raw() };
    }
    case 'ack':
      return { type: 'ack', id: checkedId('ack', wire.id) };
    case 'nack':
      return {
        type: 'nack',
        id: checkedId('nack', wire.id),
        error: errorBody(wire.error, 'nack without error object'),
        retry_after_ms: optNumber(wire.retry_after_ms),
      };
    case 'refreshed':
      return { type: 'refreshed', expires_at: optNumber(wire.expires_at) };
    case 'reconnect':
      return {
        type: 'reconnect',
        after_ms: optNumber(wire.after_ms) ?? 0,
        reason: typeof wire.reason === 'string' ? wire.reason : '',
      };
    case 'error':
      return {
        type: 'error',
        id: validId(wire.id) ? wire.id : undefined,
        error: errorBody(wire.error, 'error without error object'),
      };
    default:
      throw new ProtocolError(`unknown envelope type \`${String(wire.type)}\``);
  }
}

/** Encodes an agent envelope as one text frame; `data` (JSON text) goes in verbatim. */
export function encodeAgentMessage(message: AgentMessage): string {
  switch (message.type) {
    case 'send':
      return `{"type":"send","id":${JSON.stringify(message.id)},"data":${message.data}}`;
    case 'request': {
      const timeout = message.timeout_ms === undefined ? '' : `,"timeout_ms":${Math.floor(message.timeout_ms)}`;
      return `{"type":"request","id":${JSON.stringify(message.id)},"data":${message.data}${timeout}}`;
    }
    case 'response':
      if ('error' in message) {
        return JSON.stringify({ type: 'response', id: message.id, error: message.error });
      }
      return `{"type":"response","id":${JSON.stringify(message.id)},"data":${message.data}}`;
    case 'ack':
      return JSON.stringify({ type: 'ack', id: message.id });
    case 'refresh':
      return JSON.stringify({ type: 'refresh', token: message.token });
  }
}

/** JSON text of a value for `data`: `undefined` becomes `null`. */
export function jsonText(value: unknown): string {
  const text = JSON.stringify(value);
  return text === undefined ? 'null' : text;
}

/**
 * The exact text of the top-level member `name` of the JSON object `text` (which must
 * already be valid JSON), or `undefined` when it has none. The last occurrence wins,
 * as with `JSON.parse`.
 */
export function rawMember(text: string, name: string): string | undefined {
  let i = skipWs(text, 0);
  if (text[i] !== '{') return undefined;
  i = skipWs(text, i + 1);
  let found: string | undefined;
  while (i < text.length && text[i] !== '}') {
    const keyEnd = skipString(text, i);
    const key = JSON.parse(text.slice(i, keyEnd)) as string;
    i = skipWs(text, keyEnd);
    i = skipWs(text, i + 1); // the colon
    const valueEnd = skipValue(text, i);
    if (key === name) found = text.slice(i, valueEnd);
    i = skipWs(text, valueEnd);
    if (text[i] === ',') i = skipWs(text, i + 1);
  }
  return found;
}

function skipWs(text: string, i: number): number {
  while (i < text.length && (text[i] === ' ' || text[i] === '\t' || text[i] === '\n' || text[i] === '\r')) i++;
  return i;
}

/** `i` is at an opening quote; returns the index after the closing one. */
function skipString(text: string, i: number): number {
  i++;
  while (i < text.length) {
    const c = text[i];
    if (c === '\\') i += 2;
    else if (c === '"') return i + 1;
    else i++;
  }
  return i;
}

function skipValue(text: string, i: number): number {
  const c = text[i];
  if (c === '"') return skipString(text, i);
  if (c === '{' || c === '[') {
    let depth = 0;
    while (i < text.length) {
      const d = text[i];
      if (d === '"') {
        i = skipString(text, i);
        continue;
      }
      if (d === '{' || d === '[') depth++;
      else if (d === '}' || d === ']') {
        depth--;
        if (depth === 0) return i + 1;
      }
      i++;
    }
    return i;
  }
  // A number, true, false or null: up to the next delimiter.
  while (i < text.length && !',}] \t\n\r'.includes(text[i])) i++;
  return i;
}

/** Close codes after which the agent must not reconnect (docs/protocol.md). */
export const TERMINAL_CLOSE_CODES: ReadonlySet<number> = new Set([4002, 4003, 4005]);
