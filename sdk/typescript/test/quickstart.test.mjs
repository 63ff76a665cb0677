// The seed's TypeScript Quick Start (examples/quickstart.mjs, unchanged but for its import) against
// a real server and a real running computer: the restored computer runs and continues from the
// snapshot (the file written before it, the process started before it), the original runs on.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';

import { Miosa } from '@stasis/sdk';
import { startServer } from '../testlib/server.mjs';

let server;
let client;
const created = [];

before(async () => {
  server = await startServer();
  process.env.MIOSA_API_KEY = server.key;
  process.env.MIOSA_BASE_URL = server.baseUrl;
  client = new Miosa();
});

after(async () => {
  for (const id of created) await client?.computers.delete(id).catch(() => {});
  await server?.stop();
});

test('the Quick Start snapshots a running computer and restores it into a new one', { timeout: 150_000 }, async () => {
  const original = await client.computers.create({ name: 'quickstart', size: 'xs' });
  created.push(original.id);
  assert.equal(original.name, 'quickstart');
  assert.equal(original.size, 'xs');
  const running = await client.computers.waitUntilRunning(original.id, { timeoutMs: 90_000 });
  assert.equal(running.status, 'running');

  // State to find in the restored computer: a file on disk and a live process in RAM.
  const marker = `marker-${randomUUID()}`;
  const w = await client.computers.exec(
    original.id,
    `echo ${marker} > /root/marker.txt && sync && (setsid sleep 3600 >/dev/null 2>&1 & echo $! > /root/sleeper.pid) && cat /root/sleeper.pid`,
  );
  assert.equal(w.exit_code, 0, w.stderr);
  assert.equal(w.success, true);
  const sleeperPid = w.output.trim();
  assert.match(sleeperPid, /^\d+$/);

  // Run the example as a user would: `computerId` is a global it expects to exist.
  globalThis.computerId = original.id;
  const printed = [];
  const log = console.log;
  console.log = (...args) => printed.push(args.join(' '));
  try {
    await import('../examples/quickstart.mjs');
  } finally {
    console.log = log;
  }
  assert.equal(printed.length, 1, `printed: ${printed.join(' | ')}`);
  const m = /^Restored computer: ([0-9a-f-]{36})$/.exec(printed[0]);
  assert.ok(m, printed[0]);
  const restoredId = m[1];
  created.push(restoredId);
  assert.notEqual(restoredId, original.id);

  const snaps = await client.snapshots.list(original.id);
  assert.equal(snaps.length, 1);
  assert.equal(snaps[0].comment, 'before-deploy-v2');
  assert.ok(['ready', 'restoring'].includes(snaps[0].status), snaps[0].status);

  const restored = await client.computers.waitUntilRunning(restoredId, { timeoutMs: 60_000 });
  assert.equal(restored.status, 'running');
  assert.equal(restored.source_snapshot_id, snaps[0].id);
  assert.equal(restored.size, 'xs');

  const cat = await client.computers.exec(restoredId, 'cat /root/marker.txt');
  assert.equal(cat.exit_code, 0, cat.stderr);
  assert.equal(cat.output.trim(), marker);
  const alive = await client.computers.exec(restoredId, `kill -0 ${sleeperPid} && cat /proc/${sleeperPid}/cmdline | tr '\\0' ' '`);
  assert.equal(alive.exit_code, 0, `the process started before the snapshot runs on: ${alive.stderr}`);
  assert.match(alive.output, /sleep 3600/);

  // Independent machines: a write in the copy does not reach the original, which still runs.
  const copyOnly = await client.computers.exec(restoredId, 'echo copy > /root/only-in-copy.txt && sync');
  assert.equal(copyOnly.exit_code, 0);
  const stillRunning = await client.computers.get(original.id);
  assert.equal(stillRunning.status, 'running');
  const orig = await client.computers.exec(original.id, 'cat /root/marker.txt; test -e /root/only-in-copy.txt; echo $?');
  assert.deepEqual(orig.output.trim().split('\n'), [marker, '1']);

  const all = await client.computers.list();
  assert.deepEqual(new Set(all.map((c) => c.id)), new Set([original.id, restoredId]));
});
