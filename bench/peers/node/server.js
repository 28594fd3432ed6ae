// Node peer: the `ws` package (npm) with its defaults, speaking the bench's peer contract
// (docs/benchmarks.md): GET /ws?id=ID, POST /push/ID, POST /request/ID?timeout_ms=N,
// POST /broadcast, GET /stats. Prints "listening ws=ADDR control=ADDR".
'use strict';
const http = require('http');
const { WebSocketServer } = require('ws');

const conns = new Map();
const pending = new Map();
let nextId = 0;

function readBody(req) {
  return new Promise((resolve) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
  });
}

function envelope(kind, id, data) {
  return `{"type":"${kind}","id":"${id}","data":${data}}`;
}

const server = http.createServer(async (req, res) => {
  const url = new URL(req.url, 'http://peer');
  const parts = url.pathname.split('/');
  if (req.method === 'GET' && url.pathname === '/stats') {
    res.end(JSON.stringify({ connections: conns.size }));
    return;
  }
  if (req.method !== 'POST') { res.writeHead(404).end(); return; }
  const body = await readBody(req);
  if (parts[1] === 'push') {
    const ws = conns.get(decodeURIComponent(parts[2]));
    if (!ws) { res.writeHead(404).end(); return; }
    ws.send(envelope('push', nextId++, body));
    res.writeHead(202).end();
  } else if (parts[1] === 'broadcast') {
    const text = envelope('push', nextId++, body);
    let delivered = 0;
    for (const ws of conns.values()) { ws.send(text); delivered++; }
    res.writeHead(202).end(JSON.stringify({ delivered }));
  } else if (parts[1] === 'request') {
    const ws = conns.get(decodeURIComponent(parts[2]));
    if (!ws) { res.writeHead(404).end(); return; }
    const id = String(nextId++);
    const timeoutMs = Number(url.searchParams.get('timeout_ms') || 5000);
    const timer = setTimeout(() => { pending.delete(id); res.writeHead(504).end(); }, timeoutMs);
    pending.set(id, (data) => { clearTimeout(timer); res.writeHead(200).end(data); });
    ws.send(`{"type":"request","id":"${id}","data":${body},"timeout_ms":${timeoutMs}}`);
  } else {
    res.writeHead(404).end();
  }
});

const wss = new WebSocketServer({ noServer: true });
server.on('upgrade', (req, socket, head) => {
  const url = new URL(req.url, 'http://peer');
  if (url.pathname !== '/ws') { socket.destroy(); return; }
  wss.handleUpgrade(req, socket, head, (ws) => {
    const id = url.searchParams.get('id') || '';
    conns.set(id, ws);
    ws.send(`{"type":"welcome","agent_id":"${id}"}`);
    ws.on('message', (data, isBinary) => {
      if (isBinary) return;
      let env;
      try { env = JSON.parse(data.toString('utf8')); } catch { return; }
      if (env.type === 'response' && pending.has(env.id)) {
        const done = pending.get(env.id);
        pending.delete(env.id);
        done(JSON.stringify(env.data === undefined ? null : env.data));
      }
    });
    ws.on('close', () => { if (conns.get(id) === ws) conns.delete(id); });
    ws.on('error', () => {});
  });
});

server.listen(Number(process.env.PORT || 0), '127.0.0.1', 4096, () => {
  const { address, port } = server.address();
  console.log(`listening ws=${address}:${port} control=${address}:${port}`);
});
