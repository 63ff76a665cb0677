// Client behaviour that needs no VM: URL normalisation, the missing key, error mapping, retries,
// the SSE parser, and the event stream's reconnects, against small fake servers.

import { test, describe, after } from 'node:test';
import assert from 'node:assert/strict';
import { createServer } from 'node:http';

import {
  Miosa,
  MiosaError,
  MissingApiKeyError,
  AuthenticationError,
  NotFoundError,
  ConflictError,
  ValidationError,
  RateLimitError,
  ServerError,
  ConnectionError,
  TimeoutError,
  SnapshotFailedError,
  PermissionDeniedError,
  SseParser,
  normalizeBaseUrl,
} from '@stasis/sdk';

/** A fake API: `handler(req, res, body)`; resolves with `{ url, close, requests }`. */
async function fakeServer(handler) {
  const requests = [];
  const sockets = new Set();
  const server = createServer(async (req, res) => {
    let body = '';
    for await (const chunk of req) body += chunk;
    requests.push({ method: req.method, url: req.url, headers: req.headers, body });
    handler(req, res, body);
  });
  server.on('connection', (s) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  const { port } = server.address();
  return {
    url: `http://127.0.0.1:${port}/api/v1`,
    requests,
    close: () =>
      new Promise((r) => {
        for (const s of sockets) s.destroy();
        server.close(r);
      }),
  };
}

function json(res, status, body, headers = {}) {
  res.writeHead(status, { 'content-type': 'application/json', 'x-request-id': 'req-fake', ...headers });
  res.end(JSON.stringify(body));
}

const SNAP = '11111111-1111-4111-8111-111111111111';
const COMP = '22222222-2222-4222-8222-222222222222';
function snapshot(status, extra = {}) {
  return {
    id: SNAP,
    computer_id: COMP,
    tenant_id: '33333333-3333-4333-8333-333333333333',
    comment: null,
    status,
    state_size_bytes: null,
    memory_size_bytes: null,
    rootfs_size_bytes: null,
    compressed_size_bytes: null,
    uploaded_bytes: null,
    pause_ms: null,
    s3_bucket: null,
    s3_prefix: null,
    parent_snapshot_id: null,
    error: null,
    created_at: '2026-01-01T00:00:00Z',
    updated_at: '2026-01-01T00:00:00Z',
    ...extra,
  };
}

describe('configuration', () => {
  test('base URLs are normalised like the Python SDK', () => {
    assert.equal(normalizeBaseUrl('http://h:8080'), 'http://h:8080/api/v1');
    assert.equal(normalizeBaseUrl('http://h:8080/'), 'http://h:8080/api/v1');
    assert.equal(normalizeBaseUrl(' http://h:8080/api/v1/ '), 'http://h:8080/api/v1');
    assert.equal(normalizeBaseUrl('http://h/custom/v2'), 'http://h/custom/v2');
    assert.equal(normalizeBaseUrl('http://h/prefix'), 'http://h/prefix/api/v1');
  });

  test('defaults come from MIOSA_API_KEY and MIOSA_BASE_URL', () => {
    const saved = { key: process.env.MIOSA_API_KEY, url: process.env.MIOSA_BASE_URL };
    try {
      process.env.MIOSA_API_KEY = 'stasis_fromenv';
      process.env.MIOSA_BASE_URL = 'http://10.0.0.1:9000';
      assert.equal(new Miosa().baseUrl, 'http://10.0.0.1:9000/api/v1');
      delete process.env.MIOSA_BASE_URL;
      assert.equal(new Miosa().baseUrl, 'http://127.0.0.1:8080/api/v1');
      assert.equal(new Miosa({ baseUrl: 'http://x:1' }).baseUrl, 'http://x:1/api/v1');
    } finally {
      if (saved.key === undefined) delete process.env.MIOSA_API_KEY;
      else process.env.MIOSA_API_KEY = saved.key;
      if (saved.url === undefined) delete process.env.MIOSA_BASE_URL;
      else process.env.MIOSA_BASE_URL = saved.url;
    }
  });

  test('a missing key is a typed error naming MIOSA_API_KEY', () => {
    const saved = process.env.MIOSA_API_KEY;
    delete process.env.MIOSA_API_KEY;
    try {
      assert.throws(
        () => new Miosa(),
        (e) => e instanceof MissingApiKeyError && e instanceof MiosaError && /MIOSA_API_KEY/.test(e.message),
      );
    } finally {
      if (saved !== undefined) process.env.MIOSA_API_KEY = saved;
    }
  });
});

describe('errors and retries', () => {
  let api;
  let script = [];
  const start = async () => {
    api = await fakeServer((req, res) => {
      const next = script.shift();
      if (!next) return json(res, 500, { error: { code: 'internal', message: 'script ran out', request_id: 'r' } });
      next(req, res);
    });
  };
  after(() => api?.close());

  test('statuses map to typed errors carrying the server message, code and request id', async () => {
    await start();
    const client = new Miosa({ apiKey: 'k', baseUrl: api.url, maxRetries: 0 });
    const cases = [
      [400, 'invalid_json', ValidationError],
      [401, 'unauthorized', AuthenticationError],
      [403, 'forbidden', PermissionDeniedError],
      [404, 'computer_not_found', NotFoundError],
      [409, 'computer_not_running', ConflictError],
      [422, 'validation_failed', ValidationError],
      [429, 'rate_limited', RateLimitError],
      [500, 'internal', ServerError],
    ];
    for (const [status, code, Cls] of cases) {
      script.push((req, res) =>
        json(res, status, { error: { code, message: `message ${status}`, request_id: `rid-${status}`, field: 'comment' } }),
      );
      await assert.rejects(client.computers.get(COMP), (e) => {
        assert.ok(e instanceof Cls, `${status} gives ${Cls.name}, not ${e.constructor.name}`);
        assert.ok(e instanceof MiosaError);
        assert.equal(e.status, status);
        assert.equal(e.code, code);
        assert.equal(e.message, `message ${status}`);
        assert.equal(e.requestId, `rid-${status}`);
        assert.equal(e.field, 'comment');
        return true;
      });
    }
    // No request id in the body: the header's.
    script.push((req, res) => json(res, 404, { error: { code: 'snapshot_not_found', message: 'snapshot not found' } }));
    await assert.rejects(client.snapshots.get(COMP, SNAP), (e) => e instanceof NotFoundError && e.requestId === 'req-fake');
    assert.equal(api.requests.at(-1).headers.authorization, 'Bearer k');
  });

  test('429 and 503 are retried on safe calls, honouring Retry-After', async () => {
    const client = new Miosa({ apiKey: 'k', baseUrl: api.url, maxRetries: 2 });
    const t0 = Date.now();
    script.push((req, res) =>
      json(res, 429, { error: { code: 'rate_limited', message: 'slow down', request_id: 'a' } }, { 'retry-after': '1' }),
    );
    script.push((req, res) => json(res, 503, { error: { code: 'unavailable', message: 'busy', request_id: 'b' } }, { 'retry-after': '0' }));
    script.push((req, res) => json(res, 200, { total: 0, computers: [] }));
    const list = await client.computers.list();
    assert.deepEqual(list, []);
    assert.ok(Date.now() - t0 >= 950, 'waited for Retry-After: 1');

    // Only maxRetries retries: the third 503 is thrown.
    for (let i = 0; i < 3; i++) {
      script.push((req, res) => json(res, 503, { error: { code: 'unavailable', message: 'busy', request_id: `c${i}` } }, { 'retry-after': '0' }));
    }
    await assert.rejects(client.computers.list(), (e) => e instanceof ServerError && e.status === 503 && e.requestId === 'c2');
    assert.equal(script.length, 0);

    // A non-idempotent call (exec) is not retried.
    script.push((req, res) => json(res, 503, { error: { code: 'unavailable', message: 'busy', request_id: 'd' } }, { 'retry-after': '0' }));
    script.push((req, res) => json(res, 200, { exit_code: 0, output: '', stderr: '', success: true }));
    await assert.rejects(client.computers.exec(COMP, 'true'), ServerError);
    script.length = 0;
  });

  test('creating POSTs carry one Idempotency-Key across their retries', async () => {
    const client = new Miosa({ apiKey: 'k', baseUrl: api.url, maxRetries: 1 });
    const before = api.requests.length;
    script.push((req, res) => json(res, 503, { error: { code: 'unavailable', message: 'busy', request_id: 'e' } }, { 'retry-after': '0' }));
    script.push((req, res) => json(res, 201, { data: snapshot('creating', { comment: 'c' }) }));
    const s = await client.snapshots.create(COMP, { comment: 'c' });
    assert.equal(s.status, 'creating');
    const [a, b] = api.requests.slice(before);
    assert.equal(a.url, `/api/v1/computers/${COMP}/snapshots`);
    assert.deepEqual(JSON.parse(a.body), { comment: 'c' });
    assert.ok(a.headers['idempotency-key']);
    assert.equal(a.headers['idempotency-key'], b.headers['idempotency-key']);
  });

  test('an unreachable server is a ConnectionError; a slow one a TimeoutError', async () => {
    const dead = await fakeServer(() => {});
    const url = dead.url;
    await dead.close();
    const client = new Miosa({ apiKey: 'k', baseUrl: url, maxRetries: 1 });
    await assert.rejects(client.computers.list(), (e) => e instanceof ConnectionError && /ECONNREFUSED/.test(e.message));

    script.push(() => {}); // never answers
    const slow = new Miosa({ apiKey: 'k', baseUrl: api.url, timeoutMs: 200, maxRetries: 0 });
    await assert.rejects(slow.computers.list(), TimeoutError);
    script.length = 0;
  });
});

describe('SSE parser', () => {
  test('handles CRLF/CR/LF, split chunks, comments, multi-line data and ids', () => {
    const p = new SseParser();
    const text =
      ':keep-alive\r\n\r\nid: 1\r\nevent: snapshot_creating\r\ndata: {"a":\r\ndata: 1}\r\n\r\n' +
      'id:2\revent:snapshot_ready\rdata:{"b":2}\r\r' +
      ': comment\n\nretry: 3000\nunknown: x\ndata: plain\n\n' +
      'data: unterminated';
    const events = [];
    for (let i = 0; i < text.length; i += 3) events.push(...p.push(text.slice(i, i + 3)));
    events.push(...p.end());
    assert.deepEqual(events, [
      { event: 'snapshot_creating', data: '{"a":\n1}', id: '1', retry: null },
      { event: 'snapshot_ready', data: '{"b":2}', id: '2', retry: null },
      { event: 'message', data: 'plain', id: null, retry: 3000 },
    ]);
  });
});

describe('event stream', () => {
  test('reconnects with a fresh ticket and Last-Event-ID after a drop, yielding each event once', async () => {
    let tickets = 0;
    let streams = 0;
    const api = await fakeServer((req, res) => {
      if (req.url === '/api/v1/sse/ticket') return json(res, 201, { ticket: `t${++tickets}`, expires_at: '2099-01-01T00:00:00Z' });
      if (req.url.startsWith(`/api/v1/computers/${COMP}/snapshots/${SNAP}/events`)) {
        streams++;
        res.writeHead(200, { 'content-type': 'text/event-stream' });
        const ev = (id, status, extra = {}) =>
          `id: ${id}\nevent: snapshot_${status}\ndata: ${JSON.stringify({ snapshot_id: SNAP, status, ...extra })}\n\n`;
        if (streams === 1) {
          res.write(ev(1, 'creating'));
          res.write(ev(2, 'uploading', { progress: 0.5, bytes_done: 5, bytes_total: 10 }));
          setTimeout(() => res.socket.destroy(), 50); // drop before the end
        } else {
          res.write(':keep-alive\n\n');
          res.write(ev(3, 'uploading', { progress: 1, bytes_done: 10, bytes_total: 10 }));
          res.write(ev(4, 'ready', { progress: 1 }));
          res.write(ev(5, 'ready'));
          res.end();
        }
        return;
      }
      json(res, 404, { error: { code: 'not_found', message: 'no route', request_id: 'x' } });
    });
    try {
      const client = new Miosa({ apiKey: 'k', baseUrl: api.url });
      const got = [];
      for await (const ev of client.snapshots.events(COMP, SNAP)) got.push(ev);
      assert.deepEqual(
        got.map((e) => [e.id, e.event, e.data.progress ?? null]),
        [
          ['1', 'snapshot_creating', null],
          ['2', 'snapshot_uploading', 0.5],
          ['3', 'snapshot_uploading', 1],
          ['4', 'snapshot_ready', 1],
        ],
      );
      const evReqs = api.requests.filter((r) => r.url.includes('/events'));
      assert.equal(evReqs.length, 2);
      assert.equal(evReqs[0].url.split('?')[1], 'ticket=t1');
      assert.equal(evReqs[1].url.split('?')[1], 'ticket=t2');
      assert.equal(evReqs[0].headers['last-event-id'], undefined);
      assert.equal(evReqs[1].headers['last-event-id'], '2');
      assert.equal(evReqs[0].headers.authorization, undefined, 'the ticket, not the key, authenticates the stream');
      const ticketReq = api.requests.find((r) => r.url === '/api/v1/sse/ticket');
      assert.equal(ticketReq.method, 'POST');
      assert.equal(ticketReq.headers.authorization, 'Bearer k');
    } finally {
      await api.close();
    }
  });

  test('wait falls back to polling when there is no event stream, and reports failure typed', async () => {
    let gets = 0;
    let finalStatus = 'ready';
    const api = await fakeServer((req, res) => {
      if (req.url === '/api/v1/sse/ticket') return json(res, 404, { error: { code: 'not_found', message: 'no route', request_id: 'x' } });
      if (req.url === `/api/v1/computers/${COMP}/snapshots/${SNAP}`) {
        gets++;
        const status = gets < 3 ? 'uploading' : finalStatus;
        return json(res, 200, { data: snapshot(status, status === 'failed' ? { error: 'disk full' } : {}) });
      }
      json(res, 404, { error: { code: 'not_found', message: 'no route', request_id: 'x' } });
    });
    try {
      const client = new Miosa({ apiKey: 'k', baseUrl: api.url });
      const seen = [];
      const s = await client.snapshots.wait(COMP, SNAP, { pollIntervalMs: 20, onProgress: (e) => seen.push(e.event) });
      assert.equal(s.status, 'ready');
      assert.deepEqual(seen, ['snapshot_uploading', 'snapshot_ready']);

      gets = 0;
      finalStatus = 'failed';
      await assert.rejects(client.snapshots.wait(COMP, SNAP, { pollIntervalMs: 20 }), (e) => {
        assert.ok(e instanceof SnapshotFailedError);
        assert.equal(e.snapshot.status, 'failed');
        assert.equal(e.snapshotError, 'disk full');
        assert.match(e.message, /disk full/);
        return true;
      });

      gets = 0;
      finalStatus = 'uploading';
      await assert.rejects(client.snapshots.wait(COMP, SNAP, { pollIntervalMs: 20, timeoutMs: 150 }), TimeoutError);
    } finally {
      await api.close();
    }
  });
});
