/**
 * `@tether/agent`: what a customer's agent embeds to stay reachable through a Tether
 * gateway (`tether.v1`, docs/protocol.md; the Rust SDK's semantics, docs/agent-sdk.md).
 *
 * - `agent.ts`: the [[Agent]] (EventEmitter) and its connection loop.
 * - `policy.ts`: the pure rules: back-off with full jitter, what each close code and HTTP
 *   status means, when to refresh the token, which `nack`s to retry, the de-dup window.
 * - `transport.ts`: direct or through an HTTP proxy's `CONNECT` tunnel, TLS for `wss://`.
 * - `protocol.ts`: the envelopes, decoded and encoded (`data` kept byte for byte).
 * - `token.ts`: where tokens come from (static, file, local HS256 minting for development).
 */

export {
  Agent,
  AgentEvents,
  AgentOptions,
  HandlerError,
  IncomingRequest,
  InvalidUrlError,
  Logger,
  Push,
  RawJson,
  RejectedError,
  Session,
  State,
  StoppedError,
  TimeoutError,
  UpstreamError,
  checkUrl,
  refusalMessage,
} from './agent';
export {
  Backoff,
  DEFAULT_BACKOFF,
  DEFAULT_RECONNECT,
  Decision,
  DedupWindow,
  Ended,
  ReconnectPolicy,
  StopReason,
  backoffDelay,
  backoffWindow,
  decide,
  describeEnded,
  describeStop,
  nackIsRetryable,
  refreshDelayMs,
  resendDelayMs,
  statusIsRetryable,
} from './policy';
export {
  AgentMessage,
  ErrorBody,
  ErrorCode,
  GatewayMessage,
  ProtocolError,
  SUBPROTOCOL,
  Welcome,
  decodeGatewayMessage,
  encodeAgentMessage,
  rawMember,
} from './protocol';
export { Hs256Options, TokenProvider, hs256Minter, mintHs256, staticToken, tokenFile } from './token';
export {
  Env,
  ProxyOption,
  ProxyTarget,
  TlsOptions,
  TransportError,
  certificateFailure,
  noProxyMatches,
  parseConnectHead,
  parseProxyUrl,
  proxyFor,
  redactProxyUrl,
} from './transport';
