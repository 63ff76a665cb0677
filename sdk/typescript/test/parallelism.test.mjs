// The seed's "Snapshot-based parallelism" recipe (examples/parallelism.mjs): five computers
// restored from one baseline snapshot.
//
// The recipe as published restores the baseline right after creating it, without waiting for
// it to be ready. stasis accepts such a restore: each answers 201 with a new computer in
// `provisioning`, whose restore starts as soon as the snapshot is ready. Run verbatim, the
// recipe makes five workers, and each comes up running with the baseline's state.
// (A restore of a ready snapshot is the Quick Start's, in quickstart.test.mjs.)

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';

import { Miosa, NotFoundError } from '@stasis/sdk';
import { startServer } from '../testlib/server.mjs';

let server;
let client;
let setup;
const marker = `baseline-${randomUUID()}`;

before(async () => {
  server = await startServer();
  process.env.MIOSA_API_KEY = server.key;
  process.env.MIOSA_BASE_URL = server.baseUrl;
  client = new Miosa();
  setup = await client.computers.create({ name: 'setup', size: 'xs' });
  await client.computers.waitUntilRunning(setup.id, { timeoutMs: 90_000 });
  const w = await client.computers.exec(setup.id, `echo ${marker} > /root/env.txt && sync`);
  assert.equal(w.exit_code, 0, w.stderr);
});

after(async () => {
  if (client) {
    const all = await client.computers.list().catch(() => []);
    for (const c of all) await client.computers.delete(c.id).catch(() => {});
  }
  await server?.stop();
});

test('verbatim, the recipe restores the baseline before it is ready: five workers, all running the baseline', { timeout: 240_000 }, async (t) => {
  const t0 = Date.now();
  const lap = (what) => t.diagnostic(`${what} at ${((Date.now() - t0) / 1000).toFixed(1)} s`);
  globalThis.setupComputerId = setup.id;
  const { baseline, workers } = await import('../examples/parallelism.mjs');
  lap('the recipe answered');

  // The baseline was still being taken when the restores were asked for.
  assert.equal(baseline.status, 'creating');
  assert.equal(baseline.comment, 'baseline-env');
  assert.equal(baseline.computer_id, setup.id);

  // Five restores, each accepted (201): a new computer of its own, provisioning.
  assert.equal(workers.length, 5);
  assert.equal(new Set(workers.map((w) => w.id)).size, 5);
  for (const w of workers) {
    assert.notEqual(w.id, setup.id);
    assert.equal(w.status, 'provisioning');
    assert.equal(w.source_snapshot_id, baseline.id);
    assert.deepEqual(w.snapshot, { id: baseline.id, status: 'restoring' });
  }
  const listed = await client.computers.list();
  assert.deepEqual(new Set(listed.map((c) => c.id)), new Set([setup.id, ...workers.map((w) => w.id)]));

  // Each restore starts once the baseline is ready; all five run.
  const running = await Promise.all(workers.map((w) => client.computers.waitUntilRunning(w.id, { timeoutMs: 120_000 })));
  assert.deepEqual(running.map((c) => c.status), Array(5).fill('running'));
  lap('all five running');

  // Each is the baseline environment, and each is its own machine.
  const seen = await Promise.all(workers.map((w) => client.computers.exec(w.id, 'cat /root/env.txt; hostname')));
  for (const r of seen) assert.equal(r.exit_code, 0, r.stderr);
  assert.deepEqual(seen.map((r) => r.output.split('\n')[0]), Array(5).fill(marker));
  // Each took its own identity on resume: the hostname is its computer's slug, not the setup's.
  assert.deepEqual(seen.map((r) => r.output.split('\n')[1]), running.map((c) => c.slug));
  for (const c of running) assert.notEqual(c.slug, setup.slug);
  await Promise.all(workers.map((w, i) => client.computers.exec(w.id, `echo ${i} > /root/job.txt`)));
  const jobs = await Promise.all(workers.map((w) => client.computers.exec(w.id, 'cat /root/job.txt')));
  assert.deepEqual(jobs.map((r) => r.output.trim()), ['0', '1', '2', '3', '4']);

  // The baseline is ready once the restores are done, and the setup computer runs on.
  let status;
  for (let i = 0; i < 50 && status !== 'ready'; i++) {
    if (i) await new Promise((r) => setTimeout(r, 200));
    status = (await client.snapshots.get(setup.id, baseline.id)).status;
  }
  assert.equal(status, 'ready');
  assert.equal((await client.computers.get(setup.id)).status, 'running');
  assert.equal((await client.computers.list()).length, 6);

  // A deleted snapshot cannot be restored: it is gone (404), and no computer is made.
  await client.snapshots.delete(setup.id, baseline.id);
  await assert.rejects(client.snapshots.restore(setup.id, baseline.id), (e) => {
    assert.ok(e instanceof NotFoundError, `${e.constructor.name}: ${e.message}`);
    assert.equal(e.message, 'snapshot not found');
    return true;
  });
  assert.equal((await client.computers.list()).length, 6);
});
