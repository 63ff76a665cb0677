// Typed errors from a real server: a bad key, unknown computers and snapshots, another tenant's
// snapshot, an over-long comment, snapshots of a stopped computer, and what a restore needs.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';

import {
  Miosa,
  MiosaError,
  AuthenticationError,
  NotFoundError,
  ConflictError,
  ValidationError,
  ConnectionError,
} from '@stasis/sdk';
import { startServer } from '../testlib/server.mjs';

let server;
let client;
let other; // a second tenant
const created = [];

before(async () => {
  server = await startServer({ tenants: ['sdk', 'other'] });
  client = new Miosa({ apiKey: server.keys.sdk, baseUrl: server.baseUrl });
  other = new Miosa({ apiKey: server.keys.other, baseUrl: server.baseUrl });
});

after(async () => {
  for (const id of created) await client?.computers.delete(id).catch(() => {});
  await server?.stop();
});

const isRequestId = (v) => typeof v === 'string' && v.length > 0;

test('a bad key is an AuthenticationError with status 401 and a request id', async () => {
  const bad = new Miosa({ apiKey: 'stasis_not-a-real-key', baseUrl: server.baseUrl });
  await assert.rejects(bad.computers.list(), (e) => {
    assert.ok(e instanceof AuthenticationError, e.constructor.name);
    assert.ok(e instanceof MiosaError);
    assert.equal(e.status, 401);
    assert.equal(e.code, 'UNAUTHORIZED');
    assert.ok(isRequestId(e.requestId), `requestId: ${e.requestId}`);
    assert.ok(e.message.length > 0);
    return true;
  });
  // The event stream's ticket needs the key too.
  await assert.rejects(bad.sseTicket(), AuthenticationError);
});

test('unknown computers and snapshots are NotFoundErrors with the server message', async () => {
  const ghost = randomUUID();
  await assert.rejects(client.computers.get(ghost), (e) => {
    assert.ok(e instanceof NotFoundError, e.constructor.name);
    assert.equal(e.status, 404);
    assert.equal(e.message, 'computer not found');
    assert.equal(e.code, 'COMPUTER_NOT_FOUND');
    assert.ok(isRequestId(e.requestId));
    return true;
  });
  await assert.rejects(client.snapshots.create(ghost, { comment: 'x' }), (e) => e instanceof NotFoundError && e.message === 'computer not found');
  await assert.rejects(client.computers.exec(ghost, 'true'), (e) => e instanceof NotFoundError && e.message === 'computer not found');
  await assert.rejects(client.snapshots.get(ghost, randomUUID()), (e) => e instanceof NotFoundError && e.message === 'snapshot not found');
  // `wait` does not paper over a missing snapshot by polling.
  await assert.rejects(client.snapshots.wait(ghost, randomUUID(), { timeoutMs: 10_000 }), NotFoundError);
});

test('a comment longer than 500 characters is a ValidationError naming comment', async () => {
  await assert.rejects(client.snapshots.create(randomUUID(), { comment: 'x'.repeat(501) }), (e) => {
    assert.ok(e instanceof ValidationError, e.constructor.name);
    assert.ok([400, 422].includes(e.status), String(e.status));
    assert.match(e.message, /comment/);
    assert.equal(e.field, 'comment');
    assert.ok(isRequestId(e.requestId));
    return true;
  });
  await assert.rejects(client.computers.create({ name: 'bad', size: 'huge' }), (e) => e instanceof ValidationError && /size/.test(e.message));
});

test('a stopped computer snapshots its disk; restores need only the snapshot', { timeout: 120_000 }, async () => {
  const c = await client.computers.create({ name: 'errors', size: 'xs' });
  created.push(c.id);
  await client.computers.waitUntilRunning(c.id, { timeoutMs: 90_000 });

  const snap = await client.snapshots.create(c.id, { comment: 'x'.repeat(500) });
  assert.equal(snap.comment.length, 500, 'exactly 500 characters are fine');
  // Another tenant cannot see it: 404 for the snapshot (as if it did not exist) and the computer.
  await assert.rejects(other.snapshots.get(c.id, snap.id), (e) => {
    assert.ok(e instanceof NotFoundError, e.constructor.name);
    assert.equal(e.status, 404);
    assert.equal(e.message, 'snapshot not found');
    return true;
  });
  await assert.rejects(other.computers.get(c.id), (e) => e instanceof NotFoundError && e.message === 'computer not found');
  // Not ready yet.
  await assert.rejects(client.snapshots.delete(c.id, snap.id), (e) => e instanceof ConflictError && e.status === 409);
  await client.snapshots.wait(c.id, snap.id, { timeoutMs: 60_000 });

  const stopped = await client.computers.stop(c.id);
  assert.equal(stopped.success, true);
  assert.equal((await client.computers.get(c.id)).status, 'stopped');
  // A stopped computer's snapshot is its disk alone: no memory, no pause.
  const diskOnly = await client.snapshots.create(c.id, { comment: 'stopped' });
  const settled = await client.snapshots.wait(c.id, diskOnly.id, { timeoutMs: 60_000 });
  assert.equal(settled.memory_size_bytes, 0);
  assert.equal(settled.pause_ms, 0);
  await assert.rejects(client.computers.exec(c.id, 'true'), (e) => {
    assert.ok(e instanceof ConflictError, e.constructor.name);
    assert.equal(e.status, 409);
    assert.equal(e.message, 'computer is not running');
    assert.equal(e.code, 'COMPUTER_NOT_RUNNING');
    assert.ok(isRequestId(e.requestId));
    return true;
  });
  await assert.rejects(client.computers.clone(c.id), (e) => e instanceof ConflictError && e.message === 'computer is not running');

  // The snapshot taken while it ran restores although the original is stopped (the API:
  // "the original computer is unchanged"; a restore reads only the snapshot).
  const restored = await client.snapshots.restore(c.id, snap.id);
  created.push(restored.id);
  assert.equal(restored.status, 'provisioning');
  assert.deepEqual(restored.snapshot, { id: snap.id, status: 'restoring' });
  assert.equal((await client.computers.waitUntilRunning(restored.id, { timeoutMs: 60_000 })).status, 'running');
  assert.equal((await client.computers.get(c.id)).status, 'stopped');

  await client.computers.delete(restored.id);
  await assert.rejects(client.computers.get(restored.id), NotFoundError);
});

test('a server that is gone is a ConnectionError', async () => {
  const gone = new Miosa({ apiKey: server.key, baseUrl: 'http://127.0.0.1:9/api/v1', maxRetries: 0 });
  await assert.rejects(gone.computers.list(), ConnectionError);
});
