#!/usr/bin/env node
/**
 * `tether-agent`: the same small agent as the Rust CLI (agent/src/main.rs), with its
 * flags. `connect` prints one JSON line per event on stdout (conformance/README.md: a
 * `welcome` per session, `refreshed`, each push as its `push` envelope with `data` byte
 * for byte, `binary`, `request`, the `ack` of each `--send`) and answers requests with
 * `--reply` or `--exec`. Logs and the reason of a stop go to stderr.
 *
 * Exit status: 0 after SIGINT/SIGTERM (closed with 1000) or `--exit-after-send`; 1 when
 * the agent stops for good or an argument's value is unusable; 2 for bad usage.
 */

import { spawn } from 'node:child_process';
import * as readline from 'node:readline';

import { Agent, HandlerError, IncomingRequest, Logger, Push, RawJson, StoppedError } from './agent';
import { describeStop } from './policy';
import { TokenProvider, hs256Minter, staticToken, tokenFile } from './token';
import { ProxyOption } from './transport';

const USAGE = `Usage:
  tether-agent connect [--url URL] (--token T | --token-file F | --hs256-secret-file F | --hs256-secret S)
                       [--agent-id ID] [--groups A,B] [--ttl-seconds N] [--tenant T]
                       [--reply JSON | --exec CMD] [--send JSON]... [--exit-after-send]
                       [--ca-file F] [--client-cert F --client-key F] [--proxy URL | --direct]
                       [--ack-on-stdin]
  tether-agent token (--hs256-secret-file F | --hs256-secret S) [--agent-id ID] [--groups A,B]
                     [--ttl-seconds N] [--tenant T]

Environment: TETHER_URL, TETHER_TOKEN, TETHER_TOKEN_FILE, TETHER_HS256_SECRET_FILE,
TETHER_HS256_SECRET, TETHER_AGENT_ID, TETHER_CA_FILE, TETHER_CLIENT_CERT, TETHER_CLIENT_KEY,
TETHER_PROXY; HTTPS_PROXY/HTTP_PROXY/NO_PROXY; SSL_CERT_FILE/SSL_CERT_DIR,
NODE_EXTRA_CA_CERTS; TETHER_LOG=debug for more logs.`;

/** Bad usage: exit 2 (as clap does). */
class UsageError extends Error {}

/** A usable command line whose values cannot be used: exit 1. */
class ValueError extends Error {}

interface FlagSpec {
  /** Takes a value (else a switch). */
  value: boolean;
  /** May repeat (values collected). */
  repeat?: boolean;
  /** Environment variable read when the flag is absent. */
  env?: string;
}

const MINT_FLAGS: Record<string, FlagSpec> = {
  'hs256-secret-file': { value: true, env: 'TETHER_HS256_SECRET_FILE' },
  'hs256-secret': { value: true, env: 'TETHER_HS256_SECRET' },
  'agent-id': { value: true, env: 'TETHER_AGENT_ID' },
  groups: { value: true, repeat: true },
  'ttl-seconds': { value: true },
  tenant: { value: true },
};

const CONNECT_FLAGS: Record<string, FlagSpec> = {
  url: { value: true, env: 'TETHER_URL' },
  token: { value: true, env: 'TETHER_TOKEN' },
  'token-file': { value: true, env: 'TETHER_TOKEN_FILE' },
  ...MINT_FLAGS,
  reply: { value: true },
  exec: { value: true },
  send: { value: true, repeat: true },
  'exit-after-send': { value: false },
  'ca-file': { value: true, env: 'TETHER_CA_FILE' },
  'client-cert': { value: true, env: 'TETHER_CLIENT_CERT' },
  'client-key': { value: true, env: 'TETHER_CLIENT_KEY' },
  proxy: { value: true, env: 'TETHER_PROXY' },
  direct: { value: false },
  'ack-on-stdin': { value: false },
};

type Parsed = Map<string, string[]>;

/** Parses `--flag value`, `--flag=value` and switches; then fills absent flags from the environment. */
export function parseFlags(
  args: string[],
  specs: Record<string, FlagSpec>,
  env: (name: string) => string | undefined,
): Parsed {
  const parsed: Parsed = new Map();
  for (let i = 0; i < args.length; i++) {
    const arg = args[i];
    if (!arg.startsWith('--')) throw new UsageError(`unexpected argument \`${arg}\``);
    const eq = arg.indexOf('=');
    const name = arg.slice(2, eq < 0 ? undefined : eq);
    const spec = specs[name];
    if (!spec) throw new UsageError(`unknown flag \`--${name}\``);
    let value = '';
    if (spec.value) {
      if (eq >= 0) value = arg.slice(eq + 1);
      else if (i + 1 < args.length) value = args[++i];
      else throw new UsageError(`\`--${name}\` needs a value`);
    } else if (eq >= 0) {
      throw new UsageError(`\`--${name}\` takes no value`);
    }
    const values = parsed.get(name) ?? [];
    if (values.length > 0 && !spec.repeat) throw new UsageError(`\`--${name}\` given more than once`);
    parsed.set(name, [...values, value]);
  }
  for (const [name, spec] of Object.entries(specs)) {
    const fromEnv = spec.env ? env(spec.env) : undefined;
    if (!parsed.has(name) && fromEnv !== undefined && fromEnv !== '') parsed.set(name, [fromEnv]);
  }
  return parsed;
}

function one(parsed: Parsed, name: string): string | undefined {
  return parsed.get(name)?.[0];
}

function conflicts(parsed: Parsed, name: string, others: string[]): void {
  if (!parsed.has(name)) return;
  for (const other of others) {
    if (parsed.has(other)) throw new UsageError(`\`--${name}\` cannot be used with \`--${other}\``);
  }
}

function minter(parsed: Parsed): TokenProvider {
  const secretFile = one(parsed, 'hs256-secret-file');
  const secret = one(parsed, 'hs256-secret');
  conflicts(parsed, 'hs256-secret-file', ['hs256-secret']);
  const ttl = one(parsed, 'ttl-seconds');
  const ttlSeconds = ttl === undefined ? 3600 : Number(ttl);
  if (!Number.isInteger(ttlSeconds) || ttlSeconds <= 0) throw new UsageError(`invalid --ttl-seconds \`${ttl}\``);
  const options = {
    agentId: one(parsed, 'agent-id') ?? 'dev-agent',
    groups: (parsed.get('groups') ?? []).flatMap((g) => g.split(',')).filter(Boolean),
    ttlSeconds,
    tenant: one(parsed, 'tenant'),
  };
  if (secretFile !== undefined) {
    // Read once, trimmed as the gateway trims its secret file.
    let text: string;
    try {
      text = require('node:fs').readFileSync(secretFile, 'utf8');
    } catch (err) {
      throw new ValueError(`reading ${secretFile}: ${(err as Error).message}`);
    }
    return hs256Minter({ secret: text, ...options });
  }
  if (secret !== undefined) return hs256Minter({ secret, ...options });
  throw new ValueError('give --token, --token-file, --hs256-secret-file or --hs256-secret');
}

function json(text: string, flag: string): RawJson {
  try {
    return new RawJson(text);
  } catch (err) {
    throw new ValueError(`${flag} must be JSON: ${(err as Error).message}`);
  }
}

/** Raw JSON text on one line: outside strings a line break is only whitespace, and JSON strings hold none. */
function oneLine(rawJson: string): string {
  return rawJson.replace(/[\r\n]/g, '');
}

function print(line: string): void {
  process.stdout.write(`${line}\n`);
}

function stderrLogger(debug: boolean): Logger {
  const log = (message: string) => process.stderr.write(`tether-agent: ${message}\n`);
  return { debug: debug ? log : () => {}, info: log, warn: log };
}

/** Lines of stdin, one per call (for `--ack-on-stdin`). */
function stdinLines(): () => Promise<void> {
  const waiting: (() => void)[] = [];
  let ready = 0;
  let ended = false;
  const rl = readline.createInterface({ input: process.stdin });
  rl.on('line', () => {
    const next = waiting.shift();
    if (next) next();
    else ready++;
  });
  rl.on('close', () => {
    ended = true;
    waiting.splice(0).forEach((w) => w());
  });
  return () => {
    if (ready > 0) {
      ready--;
      return Promise.resolve();
    }
    if (ended) return Promise.resolve();
    return new Promise((resolve) => waiting.push(resolve));
  };
}

function runCommand(command: string, input: string): Promise<RawJson> {
  return new Promise((resolve, reject) => {
    const child = spawn('sh', ['-c', command], { stdio: ['pipe', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout.on('data', (c: Buffer) => out.push(c));
    child.stderr.on('data', (c: Buffer) => err.push(c));
    child.on('error', (e) => reject(new HandlerError(`spawning command: ${e.message}`)));
    child.on('close', (code, signal) => {
      if (code !== 0) {
        const status = signal ? `signal ${signal}` : `exit status ${code}`;
        return reject(new HandlerError(`command exited with ${status}: ${Buffer.concat(err).toString().trim()}`));
      }
      const text = Buffer.concat(out).toString().trim();
      try {
        resolve(new RawJson(text));
      } catch {
        resolve(new RawJson(JSON.stringify(text)));
      }
    });
    child.stdin.on('error', () => {}); // a command that does not read its input
    child.stdin.end(input);
  });
}

async function connect(args: string[]): Promise<number> {
  const env = (name: string) => process.env[name];
  const parsed = parseFlags(args, CONNECT_FLAGS, env);
  conflicts(parsed, 'token', ['token-file', 'hs256-secret-file', 'hs256-secret']);
  conflicts(parsed, 'token-file', ['hs256-secret-file', 'hs256-secret']);
  conflicts(parsed, 'reply', ['exec']);
  conflicts(parsed, 'proxy', ['direct']);
  if (parsed.has('client-cert') !== parsed.has('client-key')) {
    throw new UsageError('`--client-cert` and `--client-key` each require the other');
  }
  const url = one(parsed, 'url') ?? 'ws://127.0.0.1:8080/v1/connect';
  const token = one(parsed, 'token');
  const file = one(parsed, 'token-file');
  const tokens: TokenProvider =
    token !== undefined ? staticToken(token) : file !== undefined ? tokenFile(file) : minter(parsed);
  const replyText = one(parsed, 'reply');
  const reply = replyText === undefined ? undefined : json(replyText, '--reply');
  const exec = one(parsed, 'exec');
  const sends = (parsed.get('send') ?? []).map((text) => json(text, '--send'));
  const exitAfterSend = parsed.has('exit-after-send');
  const proxyUrl = one(parsed, 'proxy');
  const proxy: ProxyOption = proxyUrl !== undefined ? { url: proxyUrl } : parsed.has('direct') ? 'direct' : 'fromEnv';
  const certFile = one(parsed, 'client-cert');
  const keyFile = one(parsed, 'client-key');
  const nextLine = parsed.has('ack-on-stdin') ? stdinLines() : undefined;

  const onPush = async (push: Push) => {
    if (push.binary) {
      print(JSON.stringify({ type: 'binary', len: push.binary.length }));
      return;
    }
    print(`{"type":"push","id":${JSON.stringify(push.id)},"data":${oneLine(push.rawData ?? 'null')}}`);
    if (nextLine) await nextLine();
  };
  const onRequest = async (request: IncomingRequest) => {
    print(
      `{"type":"request","id":${JSON.stringify(request.id)},"data":${oneLine(request.rawData)},` +
        `"timeout_ms":${request.timeoutMs}}`,
    );
    if (reply) return reply;
    if (exec !== undefined) return runCommand(exec, request.rawData);
    throw new HandlerError('no --reply or --exec given');
  };

  let agent: Agent;
  try {
    agent = new Agent({
      url,
      token: tokens,
      onPush,
      onRequest,
      // A one-shot send fails at once with the gateway's reason when nothing upstream
      // receives agent messages, instead of retrying until someone presses Ctrl-C.
      retryUnavailable: !exitAfterSend,
      tls: {
        caFile: one(parsed, 'ca-file'),
        clientCert: certFile !== undefined && keyFile !== undefined ? { certFile, keyFile } : undefined,
      },
      proxy,
      logger: stderrLogger(process.env.TETHER_LOG === 'debug'),
    });
  } catch (err) {
    throw new ValueError((err as Error).message);
  }
  agent.on('connected', (session) => {
    print(
      JSON.stringify({
        type: 'welcome',
        agent_id: session.agentId,
        connection_id: session.connectionId,
        expires_at: session.expiresAt ?? null,
      }),
    );
  });
  agent.on('refreshed', (session) => {
    print(JSON.stringify({ type: 'refreshed', expires_at: session.expiresAt ?? null }));
  });

  let signalled = false;
  const onSignal = () => {
    if (signalled) process.exit(1); // a second signal: at once
    signalled = true;
    void agent.close();
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  agent.start();

  const stopped = agent.stopped();
  try {
    await agent.connected();
    for (const data of sends) {
      const id = `cli-${process.pid}-${process.hrtime.bigint()}`;
      await agent.send(data, { id });
      print(JSON.stringify({ type: 'ack', id }));
    }
  } catch (err) {
    if (err instanceof StoppedError && err.reason.kind === 'closed') return 0;
    process.stderr.write(`tether-agent: ${(err as Error).message}\n`);
    await agent.close();
    return 1;
  }
  if (exitAfterSend) {
    await agent.close();
    return 0;
  }
  const reason = await stopped;
  if (reason.kind === 'closed') return 0;
  process.stderr.write(`tether-agent: agent stopped: ${describeStop(reason)}\n`);
  return 1;
}

function token(args: string[]): number {
  const parsed = parseFlags(args, MINT_FLAGS, (name) => process.env[name]);
  print(String(minter(parsed)()));
  return 0;
}

async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  try {
    switch (command) {
      case 'connect':
        return await connect(rest);
      case 'token':
        return token(rest);
      case '--help':
      case '-h':
      case 'help':
        print(USAGE);
        return 0;
      default:
        throw new UsageError(command === undefined ? 'no command given' : `unknown command \`${command}\``);
    }
  } catch (err) {
    if (err instanceof UsageError) {
      process.stderr.write(`error: ${err.message}\n\n${USAGE}\n`);
      return 2;
    }
    process.stderr.write(`tether-agent: ${(err as Error).message}\n`);
    return 1;
  }
}

if (require.main === module) {
  main(process.argv.slice(2)).then((code) => {
    // Exit once stdout is written out (a pipe may still hold the last lines).
    process.stdout.write('', () => process.exit(code));
  });
}
