// Ports, preview URLs and a computer's egress policy through the TypeScript SDK, against a real
// server and a real running computer serving HTTP (python3 -m http.server). Requests go only to
// the server this file started, on loopback: a preview host `*.localhost` is sent there with its
// Host header, as a browser resolving *.localhost to loopback would.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import { randomBytes } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';

import { Miosa, ValidationError } from '@stasis/sdk';
import { startServer } from '../testlib/server.mjs';

let server;
let client;
const created = [];

before(async () => {
  server = await startServer();
  client = new Miosa({ apiKey: server.key, baseUrl: server.baseUrl });
});

after(async () => {
  for (const id of created) await client?.computers.delete(id).catch(() => {});
  await server?.stop();
});

/** GET `url` from the platform's listener on loopback: { status, body }. */
function fetchPreview(url) {
  const u = new URL(url);
  return new Promise((resolve, reject) => {
    const req = http.get(
      { host: '127.0.0.1', port: Number(u.port), path: u.pathname + u.search, headers: { Host: u.host }, timeout: 30_000 },
      (res) => {
        let body = '';
        res.setEncoding('utf8');
        res.on('data', (c) => (body += c));
        res.on('end', () => resolve({ status: res.statusCode, body }));
      },
    );
    req.on('error', reject);
    req.on('timeout', () => req.destroy(new Error('timed out')));
  });
}

test('a guest server is reached through its preview URL; ports and policies through the SDK', { timeout: 150_000 }, async () => {
  const c = await client.computers.create({ name: 'ts-web', size: 'xs' });
  created.push(c.id);
  await client.computers.waitUntilRunning(c.id, { timeoutMs: 90_000 });
  const up = await client.computers.exec(
    c.id,
    `mkdir -p /srv && echo ${c.id} > /srv/who.txt && cd /srv && (setsid nohup python3 -m http.server 8000 >/dev/null 2>&1 &) && ` +
      'for i in $(seq 100); do (echo > /dev/tcp/127.0.0.1/8000) 2>/dev/null && echo up && break; sleep 0.1; done',
  );
  assert.equal(up.output.trim(), 'up', up.stderr);

  const port = await client.computers.exposePort(c.id, 8000, { name: 'web' });
  assert.equal(port.visibility, 'private');
  assert.match(port.url, /^http:\/\/8000-[a-z0-9-]+\.sandbox\.localhost:\d+\/$/);
  assert.equal((await fetchPreview(port.url + 'who.txt')).status, 401);
  const signed = new URL(port.signed_url);
  const viaLink = await fetchPreview(port.url + 'who.txt' + signed.search);
  assert.deepEqual([viaLink.status, viaLink.body.trim()], [200, c.id]);

  const pub = await client.computers.updatePort(c.id, 8000, { visibility: 'public' });
  assert.equal(pub.public, true);
  const open = await fetchPreview(pub.url + 'who.txt');
  assert.deepEqual([open.status, open.body.trim()], [200, c.id]);
  assert.deepEqual((await client.computers.ports(c.id)).map((p) => p.port), [8000]);
  assert.deepEqual((await client.computers.urls(c.id)).map((u) => u.port), [8000]);
  await client.computers.unexposePort(c.id, 8000);
  assert.deepEqual(await client.computers.ports(c.id), []);

  const none = await client.computers.networkPolicy(c.id);
  assert.deepEqual([none.default_effect, none.rules], ['allow', []]);
  if (process.getuid?.() === 0) {
    const set = await client.computers.setNetworkPolicy(c.id, [{ effect: 'deny', destination: '192.0.2.0/24', ports: '80,443' }], 'allow');
    assert.equal(set.rules[0].ports, '80,443');
    assert.ok(set.updated_at);
    await assert.rejects(
      client.computers.setNetworkPolicy(c.id, [{ effect: 'deny', destination: 'example.com' }]),
      (e) => e instanceof ValidationError && /not an IPv4 address/.test(e.message),
    );
    await client.computers.resetNetworkPolicy(c.id);
    assert.deepEqual((await client.computers.networkPolicy(c.id)).rules, []);
  }
});

test('environment variables reach every exec; update renames', { timeout: 150_000 }, async () => {
  const c = await client.computers.create({ name: 'ts-env', size: 'xs', env: { GREETING: 'hi there' } });
  created.push(c.id);
  await client.computers.waitUntilRunning(c.id, { timeoutMs: 90_000 });
  const seen = async () => (await client.computers.exec(c.id, 'echo "$GREETING|${TOKEN-unset}"')).output.trim();
  assert.equal(await seen(), 'hi there|unset');
  const made = await client.computers.setEnv(c.id, 'TOKEN', 'a=b');
  assert.deepEqual([made.name, made.value], ['TOKEN', 'a=b']);
  await assert.rejects(client.computers.setEnv(c.id, 'TOKEN', 'again'), (e) => e.status === 409 && e.code === 'ENV_VAR_EXISTS');
  await assert.rejects(client.computers.setEnv(c.id, 'NOT-A-NAME', 'x'), (e) => e instanceof ValidationError);
  assert.equal(await seen(), 'hi there|a=b');
  assert.equal((await client.computers.updateEnv(c.id, 'TOKEN', 'c')).value, 'c');
  await client.computers.deleteEnv(c.id, 'GREETING');
  assert.deepEqual((await client.computers.env(c.id)).map((v) => [v.name, v.value]), [['TOKEN', 'c']]);
  assert.equal(await seen(), '|c');

  const renamed = await client.computers.update(c.id, { name: 'ts-env-2', metadata: { k: 1 } });
  assert.deepEqual([renamed.name, renamed.metadata, renamed.slug], ['ts-env-2', { k: 1 }, c.slug]);

  // Files: bytes in and out unchanged, listed, described, removed; a missing one is a 404.
  await client.computers.writeFile(c.id, '/root/ts/hello.txt', 'héllo');
  assert.equal(Buffer.from(await client.computers.readFile(c.id, '/root/ts/hello.txt')).toString('utf8'), 'héllo');
  const random = randomBytes(3 * 1024 * 1024 + 17);
  await client.computers.upload(c.id, '/root/ts/random.bin', random);
  assert.ok(Buffer.from(await client.computers.readFile(c.id, '/root/ts/random.bin')).equals(random));
  await client.computers.mkdir(c.id, '/root/ts/sub', { mode: '0700' });
  assert.deepEqual((await client.computers.listFiles(c.id, '/root/ts')).map((f) => [f.name, f.is_dir]), [
    ['hello.txt', false],
    ['random.bin', false],
    ['sub', true],
  ]);
  const st = await client.computers.stat(c.id, '/root/ts/random.bin');
  assert.equal(st.size, random.length);
  assert.equal(st.is_dir, false);
  await client.computers.deletePath(c.id, '/root/ts');
  await assert.rejects(client.computers.readFile(c.id, '/root/ts/hello.txt'), (e) => e.status === 404 && /no such file/.test(e.message));

  // spawn: input in, both streams out in order, the exit code; a terminal size; kill.
  const p = await client.computers.spawn(c.id, 'read l; echo "out $l $TOKEN"; echo err >&2; exit 6');
  p.write('typed\n');
  const chunks = [];
  for await (const chunk of p.output()) chunks.push(chunk);
  assert.equal(await p.wait(), 6);
  assert.equal(chunks.filter((x) => x.stream === 'stdout').map((x) => x.data).join(''), 'out typed c\n');
  assert.equal(chunks.filter((x) => x.stream === 'stderr').map((x) => x.data).join(''), 'err\n');
  const tty = await client.computers.spawn(c.id, 'stty size', { rows: 12, cols: 34 });
  let shown = '';
  for await (const chunk of tty.output()) shown += chunk.data;
  assert.match(shown, /12 34/);
  assert.equal(await tty.wait(), 0);
  const sleeper = await client.computers.spawn(c.id, 'sleep', { args: ['600'] });
  sleeper.kill('SIGTERM');
  assert.equal(await sleeper.wait(), 128 + 15);

  // logs: a page with the boot line, then followed while the guest prints to its console.
  const page = await client.computers.logs(c.id, { lines: 100 });
  assert.ok(page.lines.some((l) => l.text.includes('stasis-agent: booted')), JSON.stringify(page.lines.slice(-5)));
  const stop = new AbortController();
  const followed = (async () => {
    for await (const line of client.computers.followLogs(c.id, { since: page.cursor, signal: stop.signal })) {
      if (line.text.includes('ts-console-mark')) return line.text;
    }
  })();
  await client.computers.exec(c.id, 'echo ts-console-mark > /dev/console');
  const mark = await Promise.race([followed, sleep(30_000).then(() => 'timed out')]);
  stop.abort();
  assert.match(mark, /ts-console-mark/);
});
