// End-to-end test of the web dashboard: a real `stasis serve`, headless Chromium driven by
// playwright-core, and everything done through the page (the API is only used to assert).
//
//   cd tests/web && npm ci && STASIS_BIN=../../target/release/stasis node --test
//
// STASIS_BIN (relative to the working directory) defaults to ../../target/release/stasis
// beside this file; CHROMIUM_BIN to /usr/bin/chromium. The test takes about 30-60 s.
// STASIS_WEB_DIR, when set here, reaches the server (it then serves the page from disk).

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const here = path.dirname(fileURLToPath(import.meta.url));
const BIN = process.env.STASIS_BIN
  ? path.resolve(process.env.STASIS_BIN)
  : path.resolve(here, '../../target/release/stasis');
const CHROMIUM = process.env.CHROMIUM_BIN || '/usr/bin/chromium';
const SCREENSHOT = '/tmp/dashboard.png';
const FAILURE_SCREENSHOT = '/tmp/dashboard-failure.png';

const MARKER = 'hello-from-web';
const NAME = 'web-e2e';
const COMMENT = 'before-restore (web e2e)';

// ---------------------------------------------------------------------------------------
// The server

const server = {
  proc: null,
  dataDir: null,
  key: null,
  api: null, // http://127.0.0.1:PORT/api/v1
  origin: null, // http://127.0.0.1:PORT
  log: [], // last lines of stderr
};

function stopServerNow() {
  if (server.proc && server.proc.exitCode === null && server.proc.signalCode === null) {
    server.proc.kill('SIGTERM');
  }
}

// If the test process is told to stop, the server (and so its VMs) stops too.
process.once('exit', stopServerNow);
for (const sig of ['SIGINT', 'SIGTERM']) {
  process.once(sig, () => {
    stopServerNow();
    process.exit(130);
  });
}

async function startServer() {
  server.dataDir = mkdtempSync('/tmp/stasis-web-test-');
  const out = execFileSync(BIN, ['keys', 'create', '--tenant', 'web', '--data-dir', server.dataDir], {
    encoding: 'utf8',
  });
  server.key = out.trim().split('\n').at(-1).trim();
  assert.match(server.key, /^\S+$/, 'keys create printed a key on its last line');

  const proc = spawn(BIN, ['serve', '--listen', '127.0.0.1:0', '--data-dir', server.dataDir], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, NO_COLOR: '1' },
  });
  server.proc = proc;
  readline.createInterface({ input: proc.stderr }).on('line', (line) => {
    server.log.push(line);
    if (server.log.length > 300) server.log.shift();
  });
  const lines = readline.createInterface({ input: proc.stdout });
  const first = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('the server printed nothing for 30 s')), 30_000);
    lines.once('line', (line) => {
      clearTimeout(timer);
      resolve(line);
    });
    proc.once('exit', (code, sig) => {
      clearTimeout(timer);
      reject(new Error(`the server exited at start (${code ?? sig}):\n${server.log.join('\n')}`));
    });
  });
  // Keep draining stdout so the server never blocks on a full pipe.
  lines.on('line', () => {});
  const url = first.split(/\s+/).find((w) => w.startsWith('http://'));
  assert.ok(url, `a base URL in the first line: ${first}`);
  server.api = url.replace(/\/+$/, '');
  server.origin = new URL(server.api).origin;

  const deadline = Date.now() + 30_000;
  for (;;) {
    try {
      const r = await fetch(`${server.api}/health`);
      if (r.ok) break;
    } catch {
      // not listening yet
    }
    if (Date.now() > deadline) throw new Error('the server did not answer /health within 30 s');
    await sleep(100);
  }
}

async function stopServer() {
  const proc = server.proc;
  if (!proc) return;
  if (proc.exitCode === null && proc.signalCode === null) {
    const exited = new Promise((resolve) => proc.once('exit', resolve));
    proc.kill('SIGTERM');
    const timer = setTimeout(() => proc.kill('SIGKILL'), 60_000);
    await exited;
    clearTimeout(timer);
  }
  server.proc = null;
  if (server.dataDir) rmSync(server.dataDir, { recursive: true, force: true });
}

/** The API, for assertions only. */
async function api(method, p) {
  const r = await fetch(server.api + p, { method, headers: { Authorization: `Bearer ${server.key}` } });
  const text = await r.text();
  return { status: r.status, body: text ? JSON.parse(text) : null };
}

// ---------------------------------------------------------------------------------------
// Helpers

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Polls `fn` until it answers something truthy. */
async function until(what, fn, timeout = 30_000, every = 100) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    try {
      last = await fn();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) throw new Error(`timed out after ${timeout} ms waiting for ${what} (last: ${last})`);
    await sleep(every);
  }
}

let browser;
let page;
const eventStreams = []; // URLs of EventSource requests the page made
const pageProblems = []; // uncaught errors and CSP violations

const computerRow = (id) => page.locator(`#computers-body tr[data-id="${id}"]`);
const snapshotRow = (id) => page.locator(`#snapshots-body tr[data-id="${id}"]`);

async function computerIds() {
  return page.locator('#computers-body tr[data-id]').evaluateAll((rows) => rows.map((r) => r.dataset.id));
}

/** The id of a computer row that appears and is not among `known`. */
async function newComputer(known) {
  return until('a new computer row', async () => (await computerIds()).find((id) => !known.includes(id)));
}

async function waitRunning(id, timeout = 90_000) {
  await computerRow(id).and(page.locator('[data-status="running"]')).waitFor({ timeout });
  assert.equal(await computerRow(id).locator('[data-testid="computer-status"]').textContent(), 'running');
}

async function openComputer(id) {
  await computerRow(id).locator('[data-testid="computer-name"]').click();
  await page.locator(`#computer-panel[data-computer-id="${id}"]`).waitFor();
}

/** Runs a command in the open computer through the page; answers {exit, output}. */
async function runCommand(command) {
  await page.fill('#exec-command', command);
  await page.click('#exec-submit');
  await until(`the result of ${command}`, async () => {
    const stateNow = await page.getAttribute('#exec-result', 'data-state');
    if (stateNow === 'error') throw new Error(await page.textContent('#error-banner'));
    return stateNow === 'done' && (await page.textContent('#exec-duration')).includes(command);
  }, 60_000);
  return {
    exit: await page.textContent('#exec-exit'),
    output: await page.textContent('#exec-output'),
  };
}

async function confirm() {
  await page.locator('#confirm-dialog[open]').waitFor();
  await page.click('#confirm-ok');
}

// ---------------------------------------------------------------------------------------

let failed = false;

before(async () => {
  await startServer();
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 }, acceptDownloads: true });
  page = await context.newPage();
  page.setDefaultTimeout(30_000);
  page.on('request', (req) => {
    if (/\/snapshots\/[^/]+\/events\?ticket=/.test(req.url())) eventStreams.push(req.url());
  });
  page.on('pageerror', (e) => pageProblems.push(`page error: ${e.message}`));
  page.on('console', (m) => {
    if (/Content.Security.Policy/i.test(m.text())) pageProblems.push(`CSP: ${m.text()}`);
  });
});

after(async () => {
  try {
    if (failed && page) {
      await page.screenshot({ path: FAILURE_SCREENSHOT, fullPage: true }).catch(() => {});
      console.error(`screenshot of the failure: ${FAILURE_SCREENSHOT}`);
      if (pageProblems.length) console.error(`the page reported:\n${pageProblems.join('\n')}`);
      console.error('server log (last lines):');
      console.error(server.log.slice(-40).join('\n'));
    }
    if (browser) await browser.close();
  } finally {
    await stopServer();
  }
});

test('the dashboard drives computers and snapshots end to end', { timeout: 170_000 }, async (t) => {
  const ids = {};
  const step = (name, fn) => t.test(name, { skip: failed && 'an earlier step failed' }, async () => {
    try {
      await fn();
    } catch (e) {
      failed = true;
      throw e;
    }
  });

  await step('/ leads to the dashboard, which asks for a key', async () => {
    await page.goto(`${server.origin}/`);
    assert.equal(new URL(page.url()).pathname, '/dashboard/');
    await page.locator('#login-view').waitFor();
    assert.equal(await page.isVisible('#dashboard-view'), false);
  });

  await step('a wrong key is refused with the server\'s message', async () => {
    await page.fill('#login-key', 'stasis_this-is-not-a-key');
    await page.click('#login-submit');
    await page.locator('#login-error').waitFor();
    const text = await page.textContent('#login-error');
    assert.match(text, /missing or invalid API key/);
    assert.match(text, /request id req_[0-9a-f]+/);
    assert.equal(await page.isVisible('#dashboard-view'), false);
  });

  await step('the right key signs in (kept in session storage)', async () => {
    await page.fill('#login-key', server.key);
    await page.click('#login-submit');
    await page.locator('#dashboard-view').waitFor();
    assert.equal(await page.isVisible('#login-view'), false);
    assert.equal(await page.evaluate(() => sessionStorage.getItem('stasis.apiKey')), server.key);
    await page.locator('#computers-empty').waitFor();
  });

  await step('create a computer and see it running', async () => {
    await page.fill('#create-name', NAME);
    await page.selectOption('#create-size', 'xs');
    await page.click('#create-submit');
    ids.original = await newComputer([]);
    const row = computerRow(ids.original);
    assert.equal(await row.locator('[data-testid="computer-name"]').textContent(), NAME);
    assert.equal(await row.locator('[data-testid="computer-size"]').textContent(), 'xs');
    await waitRunning(ids.original);
    const c = await api('GET', `/computers/${ids.original}`);
    assert.equal(c.body.status, 'running');
    assert.equal(c.body.size, 'xs');
  });

  await step('run a command that writes a marker file', async () => {
    await openComputer(ids.original);
    const r = await runCommand(`echo ${MARKER} > /root/marker`);
    assert.equal(r.exit, 'exit 0');
  });

  await step('a terminal runs a shell in the computer (xterm.js, served as npm publishes it)', async () => {
    const served = await fetch(`${server.origin}/dashboard/vendor/xterm.mjs`).then((r) => r.arrayBuffer());
    const published = readFileSync(path.join(here, 'node_modules/@xterm/xterm/lib/xterm.mjs'));
    assert.ok(Buffer.from(served).equals(published), 'the served terminal is @xterm/xterm 6.0.0 as published');
    await page.click('#terminal-open');
    await page.locator('#terminal[data-state="open"]').waitFor();
    await page.locator('#terminal .xterm-helper-textarea').focus();
    // The arithmetic shows the shell ran it: the echoed input has no 42.
    await page.keyboard.type('echo "term-$((6*7))-$(cat /root/marker)"');
    await page.keyboard.press('Enter');
    await page.waitForFunction(
      () => document.querySelector('#terminal .xterm-rows')?.textContent.includes('term-42-hello-from-web'),
      null,
      { timeout: 60_000 },
    );
    await page.locator('#terminal').screenshot({ path: '/tmp/dashboard-terminal.png' });
    await page.keyboard.type('exit 4');
    await page.keyboard.press('Enter');
    await page.locator('#terminal[data-state="exited"]').waitFor({ timeout: 60_000 });
    assert.equal(await page.textContent('#terminal-status'), 'exited (code 4)');
    await page.click('#terminal-close');
    assert.equal(await page.isVisible('#terminal'), false);
  });

  await step('the file browser lists, opens, uploads, downloads and deletes', async () => {
    const id = ids.original;
    await runCommand('mkdir -p /root/webdir && echo inner > /root/webdir/inner.txt');
    await page.click('#files-refresh');
    await page.locator('#files-body tr[data-path="/root/marker"]').waitFor();
    await page.locator('#files-body tr[data-path="/root/webdir"] [data-action="open"]').click();
    await page.locator('#files-body tr[data-path="/root/webdir/inner.txt"]').waitFor();
    assert.equal(await page.textContent('#files-path'), '/root/webdir');
    await page.click('#files-up');
    await page.locator('#files-body tr[data-path="/root/marker"]').waitFor();
    assert.equal(await page.textContent('#files-path'), '/root');

    const bytes = randomBytes(300_000);
    await page.setInputFiles('#files-upload-input', { name: 'web-upload.bin', mimeType: 'application/octet-stream', buffer: bytes });
    await page.click('#files-upload-submit');
    const row = page.locator('#files-body tr[data-path="/root/web-upload.bin"]');
    await row.waitFor();
    const [download] = await Promise.all([page.waitForEvent('download'), row.locator('[data-action="download"]').click()]);
    assert.equal(download.suggestedFilename(), 'web-upload.bin');
    const got = readFileSync(await download.path());
    assert.equal(createHash('sha256').update(got).digest('hex'), createHash('sha256').update(bytes).digest('hex'));

    await row.locator('[data-action="delete"]').click();
    await row.waitFor({ state: 'detached' });
    const gone = await api('GET', `/computers/${id}/files/download?path=/root/web-upload.bin`);
    assert.equal(gone.status, 404);
    // A path that is not there is named in the browser's error line.
    await page.evaluate(() => loadFiles('/root/no-such-dir'));
    await page.locator('#files-error').waitFor();
    assert.match(await page.textContent('#files-error'), /no-such-dir/);
    await page.click('#files-refresh');
    await page.locator('#files-error').waitFor({ state: 'hidden' });
  });

  await step('take a snapshot and follow its progress live to ready', async () => {
    // Record every state the progress card goes through (each SSE event is its own task,
    // so the observer sees each one).
    await page.evaluate(() => {
      window.__progress = [];
      const area = document.getElementById('progress-area');
      new MutationObserver(() => {
        for (const card of area.querySelectorAll('[data-testid="snapshot-progress"]')) {
          const bar = card.querySelector('progress');
          const q = (s) => card.querySelector(`[data-testid="${s}"]`).textContent;
          const sample = {
            id: card.dataset.snapshotId,
            status: card.dataset.status,
            value: bar.hasAttribute('value') ? bar.value : null,
            percent: q('progress-percent'),
            bytes: q('progress-bytes'),
            rate: q('progress-rate'),
            eta: q('progress-eta'),
          };
          const prev = window.__progress.at(-1);
          if (!prev || JSON.stringify(prev) !== JSON.stringify(sample)) window.__progress.push(sample);
        }
      }).observe(area, { subtree: true, childList: true, attributes: true, characterData: true });
    });
    await page.fill('#snapshot-comment', COMMENT);
    assert.equal(await page.textContent('#snapshot-comment-count'), `${COMMENT.length} / 500`);
    await page.click('#snapshot-submit');
    const card = page.locator('[data-testid="snapshot-progress"][data-mode="snapshot"]').first();
    await card.waitFor();
    ids.snapshot = await card.getAttribute('data-snapshot-id');
    await card.and(page.locator('[data-finished="ready"]')).waitFor({ timeout: 60_000 });

    const samples = (await page.evaluate(() => window.__progress)).filter((s) => s.id === ids.snapshot);
    const uploading = samples.findIndex((s) => s.status === 'uploading' && /^\d+(\.\d)?%$/.test(s.percent) &&
      / of /.test(s.bytes) && s.value !== null && s.value < 100);
    const ready = samples.findIndex((s) => s.status === 'ready');
    assert.ok(uploading >= 0, `an uploading state with percent and bytes was shown: ${JSON.stringify(samples)}`);
    assert.ok(ready > uploading, 'ready came after uploading');
    assert.equal(samples[ready].value, 100);
    assert.equal(samples.at(-1).percent, '100.0%');
    const values = samples.filter((s) => s.value !== null).map((s) => s.value);
    assert.ok(values.every((v, i) => i === 0 || v >= values[i - 1]), `the bar only advances: ${values}`);
    assert.match(await card.locator('[data-testid="progress-eta"]').textContent(), /^done in /);

    // The events log shows upload progress with bytes.
    const logged = await card.locator('[data-testid="progress-log"] li[data-status="uploading"]')
      .evaluateAll((lis) => lis.filter((li) => li.dataset.bytesDone !== '').length);
    assert.ok(logged >= 1, 'uploading events with bytes in the log');

    // The page really used EventSource with a ticket.
    assert.ok(eventStreams.some((u) => u.includes(`/snapshots/${ids.snapshot}/events?ticket=sset_`)),
      `an EventSource request for the snapshot: ${eventStreams}`);
    assert.match(await card.getAttribute('data-channel'), /closed/);

    const row = snapshotRow(ids.snapshot);
    await row.and(page.locator('[data-status="ready"]')).waitFor();
    assert.equal(await row.locator('[data-testid="snapshot-comment"]').textContent(), COMMENT);
    assert.match(await row.locator('[data-testid="snapshot-size"]').textContent(), /\d+(\.\d+)? (KiB|MiB|GiB)/);
    const s = await api('GET', `/computers/${ids.original}/snapshots/${ids.snapshot}`);
    assert.equal(s.body.data.status, 'ready');
    assert.equal(s.body.data.comment, COMMENT);
  });

  await step('restore it: a new computer runs with the marker file', async () => {
    const known = await computerIds();
    await snapshotRow(ids.snapshot).locator('[data-testid="snapshot-restore"]').click();
    ids.restored = await newComputer(known);
    await waitRunning(ids.restored, 30_000);
    const row = computerRow(ids.restored);
    assert.equal(await row.locator('[data-testid="computer-name"]').textContent(), `${NAME}-restored`);
    const c = await api('GET', `/computers/${ids.restored}`);
    assert.equal(c.body.source_snapshot_id, ids.snapshot);
    await openComputer(ids.restored);
    const r = await runCommand('cat /root/marker');
    assert.equal(r.exit, 'exit 0');
    assert.equal(r.output.trim(), MARKER);
  });

  await step('stop the restored computer: a command shows the server\'s error; start it again', async () => {
    const row = computerRow(ids.restored);
    const power = row.locator('[data-testid="computer-power"]');
    assert.equal(await power.textContent(), 'Stop');
    await power.click();
    await row.and(page.locator('[data-status="stopped"]')).waitFor({ timeout: 60_000 });
    await page.fill('#exec-command', 'true');
    await page.click('#exec-submit');
    await page.locator('#error-banner').waitFor();
    assert.match(await page.textContent('#error-message'), /computer is not running/);
    assert.match(await page.textContent('#error-request-id'), /^request id req_[0-9a-f]+$/);
    await page.click('#error-dismiss');
    assert.equal(await power.textContent(), 'Start');
    await power.click();
    await waitRunning(ids.restored, 90_000);
  });

  await step('pause the restored computer and resume it in place: its processes are still running', async () => {
    await openComputer(ids.restored);
    const started = await runCommand('nohup sleep 100000 >/dev/null 2>&1 & echo $!');
    const pid = started.output.trim();
    assert.match(pid, /^[0-9]+$/);
    const row = computerRow(ids.restored);
    const pause = row.locator('[data-testid="computer-pause"]');
    assert.equal(await pause.isDisabled(), false);
    await pause.click();
    await row.and(page.locator('[data-status="paused"]')).waitFor({ timeout: 60_000 });
    const power = row.locator('[data-testid="computer-power"]');
    assert.equal(await power.textContent(), 'Resume');
    assert.equal(await pause.isDisabled(), true);
    await power.click();
    await waitRunning(ids.restored, 90_000);
    const alive = await runCommand(`kill -0 ${pid} && echo alive`);
    assert.equal(alive.output.trim(), 'alive');
  });

  await step('clone the original and see the clone running', async () => {
    const known = await computerIds();
    await computerRow(ids.original).locator('[data-testid="computer-clone"]').click();
    ids.clone = await newComputer(known);
    assert.equal(await computerRow(ids.clone).locator('[data-testid="computer-name"]').textContent(), `${NAME}-clone`);
    await waitRunning(ids.clone, 90_000);
    await openComputer(ids.clone);
    const r = await runCommand('cat /root/marker');
    assert.equal(r.output.trim(), MARKER);
  });

  await step('delete the snapshot', async () => {
    await openComputer(ids.original);
    const row = snapshotRow(ids.snapshot);
    await row.and(page.locator('[data-status="ready"]')).waitFor();
    await row.locator('[data-testid="snapshot-delete"]').click();
    await confirm();
    await until('the snapshot shown deleted or gone', async () =>
      (await row.count()) === 0 || (await row.getAttribute('data-status')) === 'deleted', 10_000);
    await row.waitFor({ state: 'detached', timeout: 10_000 });
    const list = await api('GET', `/computers/${ids.original}/snapshots`);
    assert.ok(!list.body.data.some((s) => s.id === ids.snapshot), 'the snapshot is no longer listed');
  });

  await step('when event streams are refused, progress falls back to polling', async () => {
    const before = await page.locator('[data-testid="snapshot-progress"]')
      .evaluateAll((cards) => cards.map((c) => c.dataset.snapshotId));
    let refused = 0;
    const refuse = (route) => {
      refused += 1;
      return route.fulfill({
        status: 401,
        contentType: 'application/json',
        body: JSON.stringify({ error: { code: 'unauthorized', message: 'ticket refused by the test', request_id: 'req_test' } }),
      });
    };
    await page.route(/\/events\?ticket=/, refuse);
    try {
      await page.fill('#snapshot-comment', 'polled');
      await page.click('#snapshot-submit');
      const id = await until('a new progress card', async () => (await page.locator('[data-testid="snapshot-progress"]')
        .evaluateAll((cards) => cards.map((c) => c.dataset.snapshotId))).find((x) => !before.includes(x)));
      const card = page.locator(`[data-testid="snapshot-progress"][data-snapshot-id="${id}"]`);
      await card.and(page.locator('[data-finished="ready"]')).waitFor({ timeout: 60_000 });
      assert.equal(await card.locator('[data-testid="progress-channel"]').textContent(), 'polled · ready');
      assert.equal(await card.locator('[data-testid="progress-percent"]').textContent(), '100.0%');
      assert.equal(refused, 4, 'one stream and three fresh-ticket retries before polling');
      await snapshotRow(id).and(page.locator('[data-status="ready"]')).waitFor();
    } finally {
      await page.unroute(/\/events\?ticket=/, refuse);
    }
  });

  await step('delete a computer', async () => {
    await computerRow(ids.clone).locator('[data-testid="computer-delete"]').click();
    await confirm();
    await computerRow(ids.clone).waitFor({ state: 'detached', timeout: 30_000 });
    const c = await api('GET', `/computers/${ids.clone}`);
    assert.ok(c.status === 404 || c.body.status === 'destroyed', `the clone is gone: ${c.status}`);
    const left = await computerIds();
    assert.deepEqual(left.sort(), [ids.original, ids.restored].sort());
  });

  await step('the page raised no errors and broke no CSP rule; screenshot', async () => {
    await openComputer(ids.original);
    if (await page.isVisible('#notice')) await page.click('#notice-dismiss');
    await page.screenshot({ path: SCREENSHOT, fullPage: true });
    assert.deepEqual(pageProblems, []);
  });
});
