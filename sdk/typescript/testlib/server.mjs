// Starts a real `stasis serve` (temporary data dir, ephemeral port) for one test file, the way
// tests/sdk/conftest.py does for the Python SDK: keys first, then serve; the base URL is read
// from serve's first stdout line; then /health is awaited. stop() sends SIGTERM and waits for
// the exit (a clean shutdown stops every computer), then removes what is left of ours.
//
// This file lives outside test/ on purpose: `node --test test/` runs every .mjs under test/.

import { execFile, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, readFileSync, readdirSync } from 'node:fs';
import { mkdir, mkdtemp, open, rm } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

const run = promisify(execFile);
const sdkDir = resolve(dirname(fileURLToPath(import.meta.url)), '..');

/** The binary: `STASIS_BIN`, else the release build of this repo. */
export const BIN = process.env.STASIS_BIN
  ? resolve(process.env.STASIS_BIN)
  : resolve(sdkDir, '../../target/release/stasis');

async function createKey(dataDir, tenant) {
  const { stdout } = await run(BIN, ['keys', 'create', '--tenant', tenant, '--data-dir', dataDir]);
  const lines = stdout.trim().split('\n');
  return lines[lines.length - 1].trim();
}

/** Pids of QEMU processes whose command line names `dir` (our own temp dir, so only ours). */
function qemuPidsUnder(dir) {
  const pids = [];
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    try {
      const args = readFileSync(`/proc/${name}/cmdline`, 'utf8').split('\0');
      if (args[0]?.includes('qemu-system') && args.some((a) => a.includes(dir))) pids.push(Number(name));
    } catch {
      // gone already
    }
  }
  return pids;
}

async function firstLine(proc, exited, root) {
  const lines = createInterface({ input: proc.stdout });
  let timer;
  try {
    return await Promise.race([
      new Promise((res) => lines.once('line', res)),
      exited.then(({ code, signal }) => {
        throw new Error(`stasis serve exited (${code ?? signal}) before printing its URL; see ${root}/server.log`);
      }),
      new Promise((_, rej) => {
        timer = setTimeout(() => rej(new Error('stasis serve printed nothing for 60 s')), 60_000);
      }),
    ]);
  } finally {
    clearTimeout(timer);
    lines.on('line', () => {}); // keep draining stdout
  }
}

async function waitForHealth(baseUrl) {
  const deadline = Date.now() + 30_000;
  for (;;) {
    try {
      const r = await fetch(`${baseUrl}/health`);
      await r.body?.cancel();
      if (r.ok) return;
    } catch {
      // not listening yet
    }
    if (Date.now() > deadline) throw new Error(`${baseUrl}/health did not answer in 30 s`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/**
 * Starts a server. Each of `tenants` gets an API key (created before `serve`, as conftest.py
 * does). Resolves with `{ baseUrl, key (the first tenant's), keys, dataDir, root, stop }`.
 */
export async function startServer({ tenants = ['sdk'] } = {}) {
  if (!existsSync(BIN)) {
    throw new Error(`no stasis binary at ${BIN}: build it (cargo build --release) or set STASIS_BIN`);
  }
  const root = await mkdtemp('/tmp/stasis-sdk-ts-');
  const dataDir = join(root, 'data');
  await mkdir(dataDir, { mode: 0o700 });
  const keys = {};
  for (const t of tenants) keys[t] = await createKey(dataDir, t);

  const log = await open(join(root, 'server.log'), 'a');
  const proc = spawn(BIN, ['serve', '--listen', '127.0.0.1:0', '--data-dir', dataDir], {
    stdio: ['ignore', 'pipe', log.fd],
  });
  const exited = new Promise((res) => proc.once('exit', (code, signal) => res({ code, signal })));
  // Should this test process end without stop() (a crash), the server goes with it.
  const orphanGuard = () => proc.kill('SIGTERM');
  process.once('exit', orphanGuard);

  let stopped = false;
  async function stop() {
    if (stopped) return;
    stopped = true;
    process.removeListener('exit', orphanGuard);
    if (proc.exitCode === null && proc.signalCode === null) {
      proc.kill('SIGTERM');
      const killer = setTimeout(() => proc.kill('SIGKILL'), 60_000);
      await exited;
      clearTimeout(killer);
    }
    await log.close();
    // Anything still running that names our data dir is ours.
    for (const pid of qemuPidsUnder(root)) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // gone
      }
    }
    // The machines' RAM files live in /dev/shm/stasis-<hash of the data dir>; the server removes
    // them when it stops cleanly, this is in case it did not.
    const tag = createHash('sha256').update(dataDir).digest('hex').slice(0, 16);
    await rm(`/dev/shm/stasis-${tag}`, { recursive: true, force: true });
    if (!process.env.STASIS_SDK_KEEP) await rm(root, { recursive: true, force: true });
  }

  try {
    const line = await firstLine(proc, exited, root);
    const baseUrl = line.split(/\s+/).find((w) => w.startsWith('http://'));
    if (!baseUrl) throw new Error(`no URL in the first line of stasis serve: ${line}`);
    await waitForHealth(baseUrl);
    return { baseUrl, key: keys[tenants[0]], keys, dataDir, root, stop };
  } catch (e) {
    await stop();
    throw e;
  }
}
