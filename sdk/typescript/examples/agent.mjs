// An agent against the local platform (scripts/local-platform prints the URL and the
// secret): prints pushes, answers requests, sends one event when an upstream takes it.
//
//   TETHER_URL=ws://127.0.0.1:PORT/v1/connect TETHER_HS256_SECRET=... TETHER_TENANT=acme \
//     node examples/agent.mjs
import { Agent, HandlerError, hs256Minter } from '@tether/agent';

const agent = new Agent({
  url: process.env.TETHER_URL ?? 'ws://127.0.0.1:8080/v1/connect',
  // Development only: tokens minted from the pool's secret, refreshed in band before
  // they expire. A production agent asks its identity service (any function returning
  // a token or a promise of one).
  token: hs256Minter({
    secret: process.env.TETHER_HS256_SECRET ?? '',
    agentId: process.env.TETHER_AGENT_ID ?? 'ts-agent',
    tenant: process.env.TETHER_TENANT || undefined,
    ttlSeconds: 300,
  }),
  onPush: async (push) => {
    // A push that asked for an ack is acknowledged once this returns.
    console.log(JSON.stringify({ pushed: push.id, data: push.data }));
  },
  onRequest: async (request) => {
    if (request.data?.fail) throw new HandlerError('refused on purpose');
    return { uptime: process.uptime() }; // the backend's 200 body
  },
  logger: { debug() {}, info: console.error, warn: console.error },
});

agent.on('connected', (s) => console.error(`connected as ${s.agentId} (connection ${s.connectionId})`));
agent.start();
await agent.connected();
process.on('SIGINT', () => agent.close());
process.on('SIGTERM', () => agent.close());
const reason = await agent.stopped();
if (reason.kind !== 'closed') {
  console.error(`stopped: ${reason.kind}`);
  process.exitCode = 1;
}
