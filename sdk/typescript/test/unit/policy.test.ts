import { strict as assert } from 'node:assert';
import { test } from 'node:test';

import {
  Backoff,
  DEFAULT_RECONNECT,
  DedupWindow,
  Ended,
  backoffDelay,
  backoffWindow,
  decide,
  describeEnded,
  describeStop,
  nackIsRetryable,
  refreshDelayMs,
  resendDelayMs,
} from '../../dist/index';

/** A seeded random source (mulberry32), so the jitter tests are repeatable. */
function seeded(seed: number): () => number {
  let a = seed;
  return () => {
    a = (a + 0x6d2b79f5) | 0;
    let t = Math.imul(a ^ (a >>> 15), 1 | a);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

test('the back-off window doubles up to the cap', () => {
  const b: Backoff = { baseMs: 100, capMs: 1000 };
  assert.equal(backoffWindow(b, 0), 100);
  assert.equal(backoffWindow(b, 1), 200);
  assert.equal(backoffWindow(b, 3), 800);
  assert.equal(backoffWindow(b, 4), 1000);
  assert.equal(backoffWindow(b, 200), 1000);
});

test('full jitter covers the whole window', () => {
  const b: Backoff = { baseMs: 100, capMs: 10_000 };
  const random = seeded(7);
  const delays = Array.from({ length: 2000 }, () => backoffDelay(b, 3, random));
  assert.ok(delays.every((d) => d >= 0 && d <= 800 && Number.isInteger(d)));
  // Both ends of the window are used, not only the upper half.
  assert.ok(delays.some((d) => d < 100));
  assert.ok(delays.some((d) => d > 700));
  // The extremes of the random source stay inside the window.
  assert.equal(backoffDelay(b, 3, () => 0), 0);
  assert.equal(backoffDelay(b, 3, () => 0.999999999), 800);
});

test('auth failures and terminal close codes stop with the reason', () => {
  for (const status of [401, 403]) {
    const message = 'forbidden: token has no tenant claim';
    assert.deepEqual(decide({ kind: 'rejected', status, message }, 0, DEFAULT_RECONNECT), {
      kind: 'stop',
      reason: { kind: 'auth_rejected', status, message },
    });
  }
  for (const code of [4002, 4003, 4005]) {
    // Even after a hint: these codes forbid reconnecting.
    assert.deepEqual(decide({ kind: 'closed', code, hintMs: 1000 }, 0, DEFAULT_RECONNECT), {
      kind: 'stop',
      reason: { kind: 'refused', code },
    });
  }
  assert.equal(
    describeStop({ kind: 'refused', code: 4005 }),
    'closed by the gateway with code 4005, which forbids reconnecting',
  );
});

test('certificate failures and final proxy refusals stop, transient ones retry', () => {
  const cause = 'the gateway certificate was refused';
  assert.deepEqual(decide({ kind: 'certificate_rejected', cause }, 0, DEFAULT_RECONNECT), {
    kind: 'stop',
    reason: { kind: 'tls', message: cause },
  });
  for (const status of [407, 403, 400]) {
    const line = `proxy:3128 answered CONNECT gw:443 with \`HTTP/1.1 ${status} x\``;
    assert.deepEqual(decide({ kind: 'proxy_refused', status, line }, 0, DEFAULT_RECONNECT), {
      kind: 'stop',
      reason: { kind: 'proxy_rejected', status, line },
    });
  }
  for (const status of [502, 503, 504, 408, 429]) {
    assert.equal(decide({ kind: 'proxy_refused', status, line: '' }, 0, DEFAULT_RECONNECT).kind, 'reconnect');
  }
});

test('a wrong URL or client stops with the gateway reason', () => {
  for (const status of [400, 404, 405, 426, 200, 301]) {
    const message = `reason ${status}`;
    assert.deepEqual(decide({ kind: 'rejected', status, message }, 0, DEFAULT_RECONNECT), {
      kind: 'stop',
      reason: { kind: 'http_rejected', status, message },
    });
  }
  assert.equal(
    describeStop({ kind: 'http_rejected', status: 404, message: 'agents connect at GET /v1/connect' }),
    'the gateway refused the connection with HTTP 404: agents connect at GET /v1/connect',
  );
  assert.equal(describeStop({ kind: 'auth_rejected', status: 401, message: '' }), 'authentication rejected with HTTP 401');
});

test('a reconnect hint is honoured exactly, whatever the attempt', () => {
  for (const ended of [
    { kind: 'closed', code: 1012, hintMs: 1234 },
    { kind: 'closed', code: 1001, hintMs: 1234 },
    { kind: 'lost', hintMs: 1234 },
  ] as Ended[]) {
    assert.deepEqual(decide(ended, 5, DEFAULT_RECONNECT), { kind: 'reconnect', delayMs: 1234 });
  }
});

test('overload backs off above the floor', () => {
  const policy = { backoff: { baseMs: 100, capMs: 5000 }, overloadFloorMs: 2000 };
  const random = seeded(3);
  for (const ended of [
    { kind: 'closed', code: 1013 },
    { kind: 'rejected', status: 503, message: '' },
    { kind: 'rejected', status: 429, message: '' },
  ] as Ended[]) {
    for (let attempt = 0; attempt < 4; attempt++) {
      const d = decide(ended, attempt, policy, random);
      assert.equal(d.kind, 'reconnect');
      if (d.kind === 'reconnect') {
        assert.ok(d.delayMs >= 2000 && d.delayMs <= 2000 + backoffWindow(policy.backoff, attempt), `${d.delayMs}`);
      }
    }
  }
});

test('transient failures use the growing back-off', () => {
  const random = seeded(11);
  for (const ended of [
    { kind: 'lost' },
    { kind: 'closed', code: 1006 },
    { kind: 'closed', code: 4007 },
    { kind: 'closed', code: 4006 },
    { kind: 'closed', code: 4004 },
    { kind: 'rejected', status: 502, message: '' },
    { kind: 'rejected', status: 500, message: '' },
    { kind: 'rejected', status: 408, message: '' },
    { kind: 'unreachable', cause: 'connect ECONNREFUSED 127.0.0.1:1' },
    { kind: 'token_unavailable', cause: 'no file' },
  ] as Ended[]) {
    const d = decide(ended, 6, DEFAULT_RECONNECT, random);
    assert.equal(d.kind, 'reconnect', describeEnded(ended));
    if (d.kind === 'reconnect') assert.ok(d.delayMs <= backoffWindow(DEFAULT_RECONNECT.backoff, 6));
  }
});

test('token expiry (4001) reconnects within the first window', () => {
  for (let i = 0; i < 100; i++) {
    const d = decide({ kind: 'closed', code: 4001 }, 9, DEFAULT_RECONNECT);
    assert.ok(d.kind === 'reconnect' && d.delayMs <= DEFAULT_RECONNECT.backoff.baseMs);
  }
});

test('ended says why in words', () => {
  assert.equal(
    describeEnded({ kind: 'rejected', status: 503, message: 'gateway is draining' }),
    'the gateway answered HTTP 503: gateway is draining',
  );
  assert.equal(describeEnded({ kind: 'unreachable', cause: 'refused' }), 'could not reach the gateway: refused');
  assert.equal(describeEnded({ kind: 'rejected', status: 502, message: '' }), 'the gateway answered HTTP 502');
});

test('refresh happens before expiry', () => {
  // Long-lived token: one margin before expiry.
  assert.equal(refreshDelayMs(1000, 4600, 60_000), 3_540_000);
  // Short-lived token: halfway through its remaining life.
  assert.equal(refreshDelayMs(1000, 1010, 60_000), 5_000);
  // Already expired: at once.
  assert.equal(refreshDelayMs(2000, 1000, 60_000), 0);
});

test('only transient nacks are retried, after the gateway hint when it gives one', () => {
  assert.ok(!nackIsRetryable('bad_request'));
  assert.ok(!nackIsRetryable('too_large'));
  for (const code of ['upstream_error', 'timeout', 'rate_limited', 'unavailable', 'internal', 'overloaded', 'new_code']) {
    assert.ok(nackIsRetryable(code), code);
  }
  assert.equal(resendDelayMs(700, 3, DEFAULT_RECONNECT.backoff), 700);
  assert.ok(resendDelayMs(undefined, 0, DEFAULT_RECONNECT.backoff) <= DEFAULT_RECONNECT.backoff.baseMs);
});

test('the dedup window forgets the oldest id first', () => {
  const w = new DedupWindow(2);
  w.add('a');
  w.add('b');
  w.add('a'); // already there: no reordering, no growth
  assert.ok(w.has('a') && w.has('b'));
  w.add('c');
  assert.ok(!w.has('a'), 'the oldest is forgotten');
  assert.ok(w.has('b') && w.has('c'));
  assert.equal(w.size, 2);
  const off = new DedupWindow(0);
  off.add('a');
  assert.ok(!off.has('a') && off.size === 0);
});
