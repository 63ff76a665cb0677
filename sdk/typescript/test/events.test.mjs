// Snapshot progress through the SDK against a real server: the async iterator over the SSE
// stream (ticket auth, creating → uploading with rising progress → ready), replay with
// Last-Event-ID, `wait` resolving ready with onProgress, and `wait` timing out; list/delete.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';

import { Miosa, TimeoutError, NotFoundError } from '@stasis/sdk';
import { startServer } from '../testlib/server.mjs';

let server;
let client;
let computer;

before(async () => {
  server = await startServer();
  client = new Miosa({ apiKey: server.key, baseUrl: server.baseUrl });
  computer = await client.computers.create({ name: 'events', size: 'xs' });
  await client.computers.waitUntilRunning(computer.id, { timeoutMs: 90_000 });
});

after(async () => {
  if (computer) await client.computers.delete(computer.id).catch(() => {});
  await server?.stop();
});

let first; // the snapshot followed by the first test
let firstEvents;

test('events() yields creating, uploading progress to 1, and ends with snapshot_ready', { timeout: 90_000 }, async () => {
  first = await client.snapshots.create(computer.id, { comment: 'events' });
  assert.equal(first.status, 'creating');
  assert.equal(first.comment, 'events');
  assert.equal(first.computer_id, computer.id);

  const events = [];
  for await (const ev of client.snapshots.events(computer.id, first.id)) events.push(ev);
  firstEvents = events;
  const names = events.map((e) => e.event);

  assert.equal(names.at(-1), 'snapshot_ready', names.join(','));
  assert.equal(events.at(-1).data.status, 'ready');
  assert.equal(names.filter((n) => n === 'snapshot_ready').length, 1);
  assert.ok(names.includes('snapshot_creating'), names.join(','));
  assert.ok(names.indexOf('snapshot_creating') < names.indexOf('snapshot_uploading'), names.join(','));
  for (const e of events) {
    assert.equal(e.data.snapshot_id, first.id);
    assert.equal(e.data.status, e.event.replace('snapshot_', ''));
    assert.match(e.id, /^\d+$/);
  }
  // Sequence numbers rise.
  const ids = events.map((e) => Number(e.id));
  for (let i = 1; i < ids.length; i++) assert.ok(ids[i] > ids[i - 1], `ids rise: ${ids}`);

  const uploading = events.filter((e) => e.event === 'snapshot_uploading' && typeof e.data.progress === 'number');
  assert.ok(uploading.length >= 2, `progress events: ${uploading.length}`);
  const progress = uploading.map((e) => e.data.progress);
  for (let i = 1; i < progress.length; i++) assert.ok(progress[i] >= progress[i - 1], `progress rises: ${progress}`);
  assert.ok(progress[0] < 1, `starts below 1: ${progress}`);
  assert.equal(progress.at(-1), 1);
  const withBytes = uploading.filter((e) => typeof e.data.bytes_done === 'number' && typeof e.data.bytes_total === 'number');
  assert.ok(withBytes.length > 0, 'bytes_done/bytes_total are reported');
  const lastBytes = withBytes.at(-1).data;
  assert.ok(lastBytes.bytes_total > 0);
  assert.equal(lastBytes.bytes_done, lastBytes.bytes_total);
});

test('a finished stream replays from Last-Event-ID, and answers the final state at once', { timeout: 30_000 }, async () => {
  assert.ok(first && firstEvents, 'needs the first test');
  const replay = [];
  for await (const ev of client.snapshots.events(computer.id, first.id, { lastEventId: firstEvents[0].id })) replay.push(ev);
  assert.deepEqual(
    replay.map((e) => [e.id, e.event]),
    firstEvents.slice(1).map((e) => [e.id, e.event]),
  );

  const now = [];
  for await (const ev of client.snapshots.events(computer.id, first.id)) now.push(ev);
  assert.equal(now.length, 1);
  assert.equal(now[0].event, 'snapshot_ready');
  assert.equal(now[0].data.progress, 1);

  const ready = await client.snapshots.wait(computer.id, first.id);
  assert.equal(ready.status, 'ready');
  assert.equal(ready.id, first.id);
});

test('wait times out with TimeoutError, then resolves ready with progress', { timeout: 90_000 }, async () => {
  const snap = await client.snapshots.create(computer.id, { comment: 'waited' });
  const t0 = Date.now();
  await assert.rejects(client.snapshots.wait(computer.id, snap.id, { timeoutMs: 50 }), (e) => {
    assert.ok(e instanceof TimeoutError, e.constructor.name);
    assert.match(e.message, new RegExp(snap.id));
    return true;
  });
  assert.ok(Date.now() - t0 < 2_000, 'the timeout is prompt');

  const seen = [];
  const ready = await client.snapshots.wait(computer.id, snap.id, { timeoutMs: 60_000, onProgress: (e) => seen.push(e) });
  assert.equal(ready.status, 'ready');
  assert.equal(ready.id, snap.id);
  assert.equal(ready.error, null);
  for (const k of ['state_size_bytes', 'memory_size_bytes', 'rootfs_size_bytes', 'compressed_size_bytes']) {
    assert.equal(typeof ready[k], 'number', k);
    assert.ok(ready[k] > 0, k);
  }
  assert.equal(ready.parent_snapshot_id, first.id, 'the second snapshot of a computer builds on the first');
  assert.ok(seen.length >= 1);
  assert.equal(seen.at(-1).event, 'snapshot_ready');

  // list / listPage / delete.
  const page = await client.snapshots.listPage(computer.id);
  assert.equal(page.total, 2);
  assert.deepEqual(new Set(page.data.map((s) => s.id)), new Set([first.id, snap.id]));
  const deleted = await client.snapshots.delete(computer.id, snap.id);
  assert.equal(deleted.id, snap.id);
  assert.equal(deleted.status, 'deleted');
  const left = await client.snapshots.list(computer.id);
  assert.deepEqual(left.map((s) => s.id), [first.id]);
  await assert.rejects(client.snapshots.get(computer.id, snap.id), (e) => e instanceof NotFoundError && e.message === 'snapshot not found');
});

test('exec, execPython and clone', { timeout: 90_000 }, async () => {
  const py = await client.computers.execPython(computer.id, 'import sys; print(6 * 7); sys.exit(3)');
  assert.equal(py.output.trim(), '42');
  assert.equal(py.exit_code, 3);
  assert.equal(py.success, false);
  const slow = await client.computers.exec(computer.id, 'echo started; sleep 30', { timeout: 1 });
  assert.equal(slow.exit_code, 124);
  assert.equal(slow.timed_out, true);
  assert.equal(slow.output.trim(), 'started');
  const err = await client.computers.exec(computer.id, 'echo oops >&2; exit 7');
  assert.deepEqual([err.exit_code, err.stderr.trim(), err.success], [7, 'oops', false]);

  await client.computers.exec(computer.id, 'echo cloned-state > /root/state.txt && sync');
  const clone = await client.computers.clone(computer.id, { name: 'events-clone' });
  try {
    assert.equal(clone.name, 'events-clone');
    assert.notEqual(clone.id, computer.id);
    const running = await client.computers.waitUntilRunning(clone.id, { timeoutMs: 60_000 });
    assert.equal(running.status, 'running');
    const r = await client.computers.exec(clone.id, 'cat /root/state.txt');
    assert.equal(r.output.trim(), 'cloned-state');
  } finally {
    await client.computers.delete(clone.id);
  }
  await assert.rejects(client.computers.get(clone.id), NotFoundError);
});
