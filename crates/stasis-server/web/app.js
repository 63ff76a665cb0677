// The stasis dashboard: plain JavaScript speaking the public API (/api/v1) of the server
// that serves it. No framework, no build step; the page's Content-Security-Policy allows
// nothing but this file and style.css, so everything here builds DOM nodes itself.
'use strict';

const API = '/api/v1';
const KEY_STORAGE = 'stasis.apiKey';
const SELECTED_STORAGE = 'stasis.selectedComputer';
const REFRESH_MS = 2000;
const POLL_MS = 2000;
const MAX_STREAM_RETRIES = 3;
const MAX_LOG_LINES = 200;
const COMMENT_MAX = 500;
const NOTICE_MS = 12000;

/** Snapshot statuses after which nothing more happens (an event stream ends there). */
const FINAL = new Set(['ready', 'failed', 'deleted']);
/** Snapshot statuses worth watching live. */
const BUSY = new Set(['creating', 'uploading', 'restoring']);
/** Named events of a snapshot's SSE stream. */
const STREAM_EVENTS = [
  'snapshot_creating',
  'snapshot_uploading',
  'snapshot_ready',
  'snapshot_failed',
  'snapshot_restoring',
  'snapshot_deleted',
];

// ---------------------------------------------------------------------------------------
// Small helpers

const $ = (id) => document.getElementById(id);

/** Builds an element: h('td', {class: 'x', dataset: {id}}, 'text', child, ...). */
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') el.className = v;
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else if (k === 'text') el.textContent = v;
    else if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (v === true) el.setAttribute(k, '');
    else el.setAttribute(k, String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function setText(el, text) {
  const t = text ?? '';
  if (el.textContent !== t) el.textContent = t;
}

const UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];

/** 1536 → "1.5 KiB". */
function fmtBytes(n) {
  if (n === null || n === undefined || Number.isNaN(n)) return '—';
  let v = Number(n);
  let i = 0;
  while (Math.abs(v) >= 1024 && i < UNITS.length - 1) {
    v /= 1024;
    i += 1;
  }
  const digits = i === 0 ? 0 : v < 10 ? 2 : v < 100 ? 1 : 0;
  // "2.00 GiB" reads better as "2 GiB"; "58.90 MiB" as "58.9 MiB".
  const text = v.toFixed(digits).replace(/\.0+$|(\.\d*?)0+$/, '$1');
  return `${text} ${UNITS[i]}`;
}

function fmtDuration(seconds) {
  if (!Number.isFinite(seconds) || seconds < 0) return '—';
  if (seconds < 1) return '< 1 s';
  if (seconds < 60) return `${Math.round(seconds)} s`;
  const m = Math.floor(seconds / 60);
  const s = Math.round(seconds % 60);
  if (m < 60) return `${m} min ${s} s`;
  return `${Math.floor(m / 60)} h ${m % 60} min`;
}

const pad = (n) => String(n).padStart(2, '0');

/** An RFC 3339 timestamp as local "YYYY-MM-DD HH:MM:SS". */
function fmtTime(iso) {
  if (!iso) return '—';
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return iso;
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
    `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

function shortId(id) {
  return id ? String(id).slice(0, 8) : '';
}

function chars(s) {
  return [...s].length;
}

// ---------------------------------------------------------------------------------------
// The API

class ApiError extends Error {
  constructor(status, code, message, requestId, field) {
    super(message);
    this.name = 'ApiError';
    this.status = status;
    this.code = code;
    this.requestId = requestId;
    this.field = field;
  }
}

/** Calls the API with the key; answers the parsed JSON body or throws an ApiError. */
async function api(method, path, body, key = state.key) {
  const headers = { Accept: 'application/json' };
  if (key) headers.Authorization = `Bearer ${key}`;
  const init = { method, headers, cache: 'no-store' };
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(API + path, init);
  } catch (e) {
    throw new ApiError(0, 'network_error', `cannot reach the server (${e.message})`, null);
  }
  const requestId = res.headers.get('x-request-id');
  const text = await res.text();
  let json = null;
  if (text) {
    try {
      json = JSON.parse(text);
    } catch {
      json = null;
    }
  }
  if (!res.ok) {
    const e = json && typeof json.error === 'object' && json.error ? json.error : {};
    throw new ApiError(
      res.status,
      e.code || `http_${res.status}`,
      e.message || text || res.statusText || `HTTP ${res.status}`,
      e.request_id || requestId,
      e.field,
    );
  }
  return json;
}

const enc = encodeURIComponent;
const computerPath = (id) => `/computers/${enc(id)}`;
const snapshotPath = (cid, sid) => `/computers/${enc(cid)}/snapshots/${enc(sid)}`;

// ---------------------------------------------------------------------------------------
// State

const state = {
  key: null,
  computers: new Map(), // id → Computer (last list)
  selectedId: null,
  snapshots: new Map(), // id → Snapshot, of the selected computer
  deletedSnapshots: new Set(), // deleted from here; kept out of the table until the list agrees
  refreshTimer: null,
  refreshing: false,
  generation: 0, // bumps at login/logout so late answers of an old session are dropped
  busy: new Set(), // "<id>:<action>" in flight
  trackers: new Map(), // snapshot id → Tracker
  bannerSource: null,
};

// ---------------------------------------------------------------------------------------
// Banners

function showError(err, title = 'Request failed', source = 'action') {
  const banner = $('error-banner');
  setText($('error-title'), title);
  if (err instanceof ApiError) {
    const code = err.code ? ` (${err.code}${err.status ? `, HTTP ${err.status}` : ''})` : '';
    setText($('error-message'), `${err.message}${code}`);
    setText($('error-request-id'), err.requestId ? `request id ${err.requestId}` : '');
    banner.dataset.code = err.code || '';
    banner.dataset.requestId = err.requestId || '';
  } else {
    setText($('error-message'), String(err && err.message ? err.message : err));
    setText($('error-request-id'), '');
    banner.dataset.code = '';
    banner.dataset.requestId = '';
  }
  state.bannerSource = source;
  banner.hidden = false;
}

function clearError(source) {
  if (source && state.bannerSource !== source) return;
  $('error-banner').hidden = true;
  state.bannerSource = null;
}

let noticeTimer = null;

/** Shows a notice for a while; `parts` are strings and nodes. */
function notify(...parts) {
  const body = $('notice-body');
  body.replaceChildren(...parts.flat().map((p) => (p instanceof Node ? p : document.createTextNode(p))));
  delete $('notice').dataset.computerIds;
  $('notice').hidden = false;
  scheduleNoticeHide();
}

function scheduleNoticeHide() {
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(() => {
    // Not while the pointer or focus is on it (it may hold links).
    if ($('notice').matches(':hover, :focus-within')) scheduleNoticeHide();
    else $('notice').hidden = true;
  }, NOTICE_MS);
}

/** A failed action: log out on 401, else the banner. */
function actionFailed(err, title) {
  if (err instanceof ApiError && err.status === 401) {
    logout(`Your API key was refused: ${err.message}`);
    return;
  }
  showError(err, title, 'action');
}

// ---------------------------------------------------------------------------------------
// Login

function maskKey(key) {
  if (key.length <= 14) return '••••';
  return `${key.slice(0, 10)}…${key.slice(-4)}`;
}

async function login(key) {
  const list = await api('GET', '/computers', undefined, key);
  state.key = key;
  state.generation += 1;
  sessionStorage.setItem(KEY_STORAGE, key);
  $('login-view').hidden = true;
  $('dashboard-view').hidden = false;
  $('session').hidden = false;
  setText($('session-info'), `key ${maskKey(key)}`);
  clearError();
  renderComputers(list);
  const remembered = sessionStorage.getItem(SELECTED_STORAGE);
  if (remembered && state.computers.has(remembered)) selectComputer(remembered);
  scheduleRefresh(0);
}

function showLogin(message) {
  $('dashboard-view').hidden = true;
  $('session').hidden = true;
  $('login-view').hidden = false;
  const err = $('login-error');
  if (message) {
    err.replaceChildren(...(Array.isArray(message) ? message : [message]));
    err.hidden = false;
  } else {
    err.hidden = true;
  }
  $('login-key').focus();
}

function logout(message) {
  state.generation += 1;
  state.key = null;
  sessionStorage.removeItem(KEY_STORAGE);
  clearTimeout(state.refreshTimer);
  state.refreshTimer = null;
  for (const t of state.trackers.values()) t.stop();
  state.trackers.clear();
  $('progress-area').replaceChildren();
  deselect();
  state.computers.clear();
  $('computers-body').replaceChildren();
  clearError();
  $('notice').hidden = true;
  $('login-key').value = '';
  showLogin(message);
}

function loginErrorNodes(err) {
  if (err instanceof ApiError) {
    return [
      h('span', { class: 'msg', 'data-testid': 'login-error-message' }, err.message),
      err.requestId ? h('span', { class: 'request-id' }, `request id ${err.requestId}`) : null,
    ].filter(Boolean);
  }
  return [String(err)];
}

async function onLoginSubmit(ev) {
  ev.preventDefault();
  const key = $('login-key').value.trim();
  if (!key) {
    showLogin('Enter an API key.');
    return;
  }
  const button = $('login-submit');
  button.disabled = true;
  button.textContent = 'Checking…';
  try {
    await login(key);
  } catch (err) {
    showLogin(loginErrorNodes(err));
  } finally {
    button.disabled = false;
    button.textContent = 'Sign in';
  }
}

// ---------------------------------------------------------------------------------------
// Refresh loop

function scheduleRefresh(delay = REFRESH_MS) {
  clearTimeout(state.refreshTimer);
  state.refreshTimer = setTimeout(refresh, delay);
}

async function refresh() {
  if (!state.key) return;
  if (state.refreshing) {
    scheduleRefresh(200);
    return;
  }
  state.refreshing = true;
  const gen = state.generation;
  const dot = $('refresh-dot');
  try {
    const list = await api('GET', '/computers');
    if (gen !== state.generation) return;
    renderComputers(list);
    if (state.selectedId) await refreshSnapshots();
    clearError('refresh');
    dot.classList.remove('failed');
    dot.classList.remove('pulse');
    void dot.offsetWidth; // restart the animation
    dot.classList.add('pulse');
  } catch (err) {
    if (gen !== state.generation) return;
    if (err instanceof ApiError && err.status === 401) {
      logout(`Your API key was refused: ${err.message}`);
      return;
    }
    dot.classList.add('failed');
    showError(err, 'Could not refresh', 'refresh');
  } finally {
    state.refreshing = false;
    if (gen === state.generation && state.key) scheduleRefresh();
  }
}

// ---------------------------------------------------------------------------------------
// Computers

const STATUS_BUSY = new Set(['creating', 'provisioning', 'starting', 'stopping', 'destroying']);

function statusBadge(el, status, extra) {
  el.dataset.status = status;
  el.classList.toggle('busy', STATUS_BUSY.has(status) || BUSY.has(status));
  setText(el, extra ? `${status} ${extra}` : status);
}

function buildComputerRow(c) {
  const row = h('tr', { dataset: { id: c.id }, 'data-testid': 'computer-row' });
  const nameCell = h('td', { class: 'name-cell' },
    h('button', { type: 'button', class: 'link', dataset: { action: 'select' }, 'data-testid': 'computer-name' }),
    h('div', { class: 'muted small sub-origin' }),
    h('div', { class: 'form-error small sub-error' }));
  row.append(
    nameCell,
    h('td', {}, h('code', { class: 'id', 'data-testid': 'computer-id' }, c.id)),
    h('td', {}, h('span', { class: 'status', 'data-testid': 'computer-status' })),
    h('td', { 'data-testid': 'computer-size' }),
    h('td', { class: 'nowrap', 'data-testid': 'computer-created' }),
    h('td', { class: 'actions' },
      h('button', { type: 'button', class: 'btn small', dataset: { action: 'power' }, 'data-testid': 'computer-power' }),
      h('button', { type: 'button', class: 'btn small', dataset: { action: 'pause' }, 'data-testid': 'computer-pause' }, 'Pause'),
      h('button', { type: 'button', class: 'btn small', dataset: { action: 'clone' }, 'data-testid': 'computer-clone' }, 'Clone'),
      h('button', { type: 'button', class: 'btn small danger-outline', dataset: { action: 'delete' }, 'data-testid': 'computer-delete' }, 'Delete')),
  );
  return row;
}

function updateComputerRow(row, c) {
  const [nameCell, , statusCell, sizeCell, createdCell, actions] = row.children;
  row.dataset.status = c.status;
  row.classList.toggle('selected', c.id === state.selectedId);
  row.setAttribute('aria-selected', c.id === state.selectedId ? 'true' : 'false');
  const nameBtn = nameCell.querySelector('[data-action="select"]');
  setText(nameBtn, c.name);
  nameBtn.setAttribute('aria-label', `Open computer ${c.name}`);
  const origin = nameCell.querySelector('.sub-origin');
  setText(origin, c.source_snapshot_id ? `from snapshot ${shortId(c.source_snapshot_id)}` : '');
  origin.hidden = !c.source_snapshot_id;
  const error = nameCell.querySelector('.sub-error');
  setText(error, c.error || '');
  error.hidden = !c.error;
  statusBadge(statusCell.firstChild, c.status);
  setText(sizeCell, c.size);
  setText(createdCell, fmtTime(c.created_at));
  createdCell.title = c.created_at;

  const [power, pause, clone, del] = actions.children;
  const running = c.status === 'running';
  const paused = c.status === 'paused';
  const startable = c.status === 'stopped' || c.status === 'error' || paused;
  // A paused (hibernated) computer resumes in place, its processes still running.
  const powerAction = paused ? 'resume' : startable ? 'start' : 'stop';
  const powerLabel = paused ? 'Resume' : startable ? 'Start' : 'Stop';
  power.dataset.op = powerAction;
  setText(power, powerLabel);
  power.setAttribute('aria-label', `${powerLabel} computer ${c.name}`);
  power.disabled = !(running || startable) || state.busy.has(`${c.id}:power`);
  pause.disabled = !running || state.busy.has(`${c.id}:pause`);
  pause.title = running
    ? 'Hibernate: keep its memory in a snapshot and stop it (it holds no memory while paused)'
    : 'The computer must be running';
  pause.setAttribute('aria-label', `Pause computer ${c.name}`);
  clone.disabled = !running || state.busy.has(`${c.id}:clone`);
  clone.title = running ? 'Make a new computer from a fresh snapshot of this one' : 'The computer must be running';
  clone.setAttribute('aria-label', `Clone computer ${c.name}`);
  del.disabled = c.status === 'destroying' || state.busy.has(`${c.id}:delete`);
  del.setAttribute('aria-label', `Delete computer ${c.name}`);
}

/** Updates rows in place (keyed by id) so focus and inputs survive the refresh. */
function reconcile(tbody, items, build, update) {
  const rows = new Map([...tbody.children].map((r) => [r.dataset.id, r]));
  let prev = null;
  for (const item of items) {
    let row = rows.get(item.id);
    if (row) rows.delete(item.id);
    else row = build(item);
    update(row, item);
    const want = prev ? prev.nextSibling : tbody.firstChild;
    if (row !== want) tbody.insertBefore(row, want);
    prev = row;
  }
  for (const stale of rows.values()) stale.remove();
}

function renderComputers(list) {
  const computers = Array.isArray(list && list.computers) ? list.computers : [];
  state.computers = new Map(computers.map((c) => [c.id, c]));
  reconcile($('computers-body'), computers, buildComputerRow, updateComputerRow);
  $('computers-empty').hidden = computers.length > 0;
  const n = list && typeof list.total === 'number' ? list.total : computers.length;
  setText($('computers-count'), `${n} computer${n === 1 ? '' : 's'}`);
  if (state.selectedId) {
    const c = state.computers.get(state.selectedId);
    if (c) updatePanel(c);
    else deselect();
  }
}

function computerName(id) {
  const c = state.computers.get(id);
  return c ? c.name : shortId(id);
}

async function withBusy(key, fn) {
  if (state.busy.has(key)) return;
  state.busy.add(key);
  updateComputerRows();
  try {
    await fn();
  } finally {
    state.busy.delete(key);
    updateComputerRows();
  }
}

function updateComputerRows() {
  for (const row of $('computers-body').children) {
    const c = state.computers.get(row.dataset.id);
    if (c) updateComputerRow(row, c);
  }
}

async function onCreateSubmit(ev) {
  ev.preventDefault();
  const name = $('create-name').value.trim();
  const size = $('create-size').value;
  if (!name) {
    showError(new Error('Give the computer a name.'), 'Cannot create computer');
    $('create-name').focus();
    return;
  }
  const button = $('create-submit');
  button.disabled = true;
  try {
    const c = await api('POST', '/computers', { name, size });
    notify('Creating computer ', h('strong', {}, c.name), ' ', h('code', {}, c.id), ' (', c.size, ').');
    $('create-name').value = '';
    clearError('action');
    scheduleRefresh(0);
  } catch (err) {
    actionFailed(err, `Could not create computer ${name}`);
  } finally {
    button.disabled = false;
  }
}

async function onComputerAction(ev) {
  const button = ev.target.closest('button[data-action]');
  if (!button) return;
  const row = button.closest('tr[data-id]');
  const id = row && row.dataset.id;
  const c = id && state.computers.get(id);
  if (!c) return;
  switch (button.dataset.action) {
    case 'select':
      selectComputer(id);
      break;
    case 'power': {
      const op = button.dataset.op;
      await withBusy(`${id}:power`, async () => {
        try {
          const r = await api('POST', `${computerPath(id)}/${op}`);
          notify(`${c.name}: ${r && r.message ? r.message : `${op} requested`}.`);
        } catch (err) {
          actionFailed(err, `Could not ${op} ${c.name}`);
        }
      });
      scheduleRefresh(0);
      break;
    }
    case 'pause':
      await withBusy(`${id}:pause`, async () => {
        try {
          const r = await api('POST', `${computerPath(id)}/pause`);
          notify(`${c.name}: ${r && r.message ? r.message : 'paused'}.`);
        } catch (err) {
          actionFailed(err, `Could not pause ${c.name}`);
        }
      });
      scheduleRefresh(0);
      break;
    case 'clone':
      await withBusy(`${id}:clone`, async () => {
        try {
          const r = await api('POST', `${computerPath(id)}/clone`);
          const clone = r.data;
          notify('Cloning ', h('strong', {}, c.name), ' into ', openLink(clone), ': a fresh snapshot is taken, then restored.');
          $('notice').dataset.computerIds = clone.id;
          if (clone.source_snapshot_id) {
            watchSnapshot({
              id: clone.source_snapshot_id,
              computer_id: id,
              comment: `clone of ${c.name}`,
              status: 'creating',
            }, 'snapshot', true);
          }
          if (state.selectedId === id) scheduleRefresh(0);
        } catch (err) {
          actionFailed(err, `Could not clone ${c.name}`);
        }
      });
      scheduleRefresh(0);
      break;
    case 'delete': {
      const ok = await confirmDialog(
        `Delete computer “${c.name}”?`,
        'Its machine is stopped and destroyed, with its disk. This cannot be undone.',
        'Delete computer',
      );
      if (!ok) return;
      await withBusy(`${id}:delete`, async () => {
        try {
          await api('DELETE', computerPath(id));
          notify('Deleted computer ', h('strong', {}, c.name), '.');
          if (state.selectedId === id) deselect();
          row.dataset.status = 'destroyed';
          statusBadge(row.querySelector('.status'), 'destroyed');
        } catch (err) {
          actionFailed(err, `Could not delete ${c.name}`);
        }
      });
      scheduleRefresh(0);
      break;
    }
    default:
      break;
  }
}

/** A button that opens a computer (in notices). */
function openLink(c) {
  return h('button', {
    type: 'button',
    class: 'link',
    dataset: { open: c.id },
    'data-testid': 'open-computer',
    onclick: () => selectComputer(c.id),
  }, `${c.name} (${shortId(c.id)})`);
}

// ---------------------------------------------------------------------------------------
// The selected computer

function selectComputer(id) {
  if (!state.computers.has(id)) return;
  const changed = state.selectedId !== id;
  state.selectedId = id;
  sessionStorage.setItem(SELECTED_STORAGE, id);
  if (changed) {
    state.snapshots.clear();
    $('snapshots-body').replaceChildren();
    $('snapshots-empty').hidden = true;
    setText($('snapshots-count'), '');
    $('exec-result').hidden = true;
    $('exec-result').dataset.state = '';
    $('panel-error').hidden = true;
    closeTerminal();
    files.path = '/root';
    $('files-body').replaceChildren();
    showFilesError(null);
  }
  $('computer-panel').hidden = false;
  $('computer-panel').dataset.computerId = id;
  updatePanel(state.computers.get(id));
  updateComputerRows();
  for (const row of $('computers-body').children) {
    row.classList.toggle('selected', row.dataset.id === id);
    row.setAttribute('aria-selected', row.dataset.id === id ? 'true' : 'false');
  }
  showTrackersFor(id);
  if (changed) {
    refreshSnapshots().catch((err) => actionFailed(err, 'Could not list snapshots'));
    if (state.computers.get(id).status === 'running') loadFiles('/root');
    $('computer-panel').scrollIntoView({ behavior: 'smooth', block: 'nearest' });
  }
}

function deselect() {
  closeTerminal();
  state.selectedId = null;
  sessionStorage.removeItem(SELECTED_STORAGE);
  state.snapshots.clear();
  $('computer-panel').hidden = true;
  delete $('computer-panel').dataset.computerId;
  $('snapshots-body').replaceChildren();
  for (const row of $('computers-body').children) {
    row.classList.remove('selected');
    row.setAttribute('aria-selected', 'false');
  }
  showTrackersFor(null);
}

function updatePanel(c) {
  setText($('panel-name'), c.name);
  setText($('panel-id'), c.id);
  statusBadge($('panel-status'), c.status);
  const err = $('panel-error');
  setText(err, c.error || '');
  err.hidden = !c.error;
  $('snapshot-submit').disabled = c.status !== 'running';
  $('snapshot-submit').title = c.status === 'running' ? '' : 'The computer must be running';
}

async function onExecSubmit(ev) {
  ev.preventDefault();
  const id = state.selectedId;
  const command = $('exec-command').value;
  if (!id || !command.trim()) return;
  const button = $('exec-submit');
  const result = $('exec-result');
  button.disabled = true;
  button.textContent = 'Running…';
  result.dataset.state = 'running';
  try {
    const r = await api('POST', `${computerPath(id)}/exec`, { command });
    if (state.selectedId !== id) return;
    result.hidden = false;
    result.dataset.state = 'done';
    result.dataset.exitCode = String(r.exit_code);
    const exit = $('exec-exit');
    exit.className = r.exit_code === 0 ? 'exit ok' : 'exit fail';
    let status = `exit ${r.exit_code}`;
    if (r.timed_out) status += ' · timed out';
    if (r.truncated) status += ' · output truncated';
    setText(exit, status);
    setText($('exec-duration'), typeof r.duration_ms === 'number' ? `${r.duration_ms} ms · $ ${command}` : `$ ${command}`);
    setText($('exec-output'), r.output || '');
    $('exec-output').classList.toggle('empty-output', !r.output);
    if (!r.output) setText($('exec-output'), '(no output)');
    const stderr = $('exec-stderr');
    setText(stderr, r.stderr || '');
    stderr.hidden = !r.stderr;
  } catch (err) {
    result.dataset.state = 'error';
    result.hidden = true; // what it showed was another command's
    actionFailed(err, `Could not run the command on ${computerName(id)}`);
  } finally {
    button.disabled = false;
    button.textContent = 'Run';
  }
}

// ---------------------------------------------------------------------------------------
// Snapshots

async function refreshSnapshots() {
  const id = state.selectedId;
  if (!id) return;
  const gen = state.generation;
  let list;
  try {
    list = await api('GET', `${computerPath(id)}/snapshots`);
  } catch (err) {
    if (err instanceof ApiError && err.status === 404) {
      // The computer is gone; the next list of computers closes the panel.
      return;
    }
    throw err;
  }
  if (gen !== state.generation || state.selectedId !== id) return;
  renderSnapshots(list);
}

function renderSnapshots(list) {
  const all = Array.isArray(list && list.data) ? list.data : [];
  const snaps = all
    .filter((s) => !state.deletedSnapshots.has(s.id))
    .sort((a, b) => (a.created_at < b.created_at ? 1 : a.created_at > b.created_at ? -1 : 0));
  state.snapshots = new Map(snaps.map((s) => [s.id, s]));
  reconcile($('snapshots-body'), snaps, buildSnapshotRow, updateSnapshotRow);
  $('snapshots-empty').hidden = snaps.length > 0;
  const n = snaps.length;
  setText($('snapshots-count'), `${n} snapshot${n === 1 ? '' : 's'}`);
  for (const s of snaps) {
    if (BUSY.has(s.status)) watchSnapshot(s, s.status === 'restoring' ? 'restore' : 'snapshot', false);
    const t = state.trackers.get(s.id);
    if (t) t.noteSnapshot(s);
  }
}

function buildSnapshotRow(s) {
  const row = h('tr', { dataset: { id: s.id }, 'data-testid': 'snapshot-row' });
  const count = h('input', {
    type: 'number', min: 1, max: 20, value: 5, class: 'count',
    'data-testid': 'snapshot-restore-count', 'aria-label': 'Number of parallel restores',
  });
  row.append(
    h('td', { class: 'comment-cell', 'data-testid': 'snapshot-comment' }),
    h('td', {}, h('code', { class: 'id', 'data-testid': 'snapshot-id' }, s.id)),
    h('td', {}, h('span', { class: 'status', 'data-testid': 'snapshot-status' })),
    h('td', { 'data-testid': 'snapshot-size' }, h('div', { class: 'size-main' }), h('div', { class: 'muted small size-detail' })),
    h('td', { class: 'nowrap', 'data-testid': 'snapshot-created' }),
    h('td', { class: 'actions' },
      h('button', { type: 'button', class: 'btn small primary-outline', dataset: { action: 'restore' }, 'data-testid': 'snapshot-restore' }, 'Restore'),
      h('span', { class: 'restore-n' },
        count,
        h('button', { type: 'button', class: 'btn small', dataset: { action: 'restore-n' }, 'data-testid': 'snapshot-restore-n' }, 'Restore ×N')),
      h('button', { type: 'button', class: 'btn small danger-outline', dataset: { action: 'delete' }, 'data-testid': 'snapshot-delete' }, 'Delete')),
  );
  return row;
}

function updateSnapshotRow(row, s) {
  const [commentCell, , statusCell, sizeCell, createdCell, actions] = row.children;
  row.dataset.status = s.status;
  const label = s.comment ? s.comment : '(no comment)';
  setText(commentCell, label);
  commentCell.classList.toggle('muted', !s.comment);
  commentCell.title = s.comment || '';
  const t = state.trackers.get(s.id);
  const pct = t && t.active && typeof t.progress === 'number' && s.status !== 'ready'
    ? `${(t.progress * 100).toFixed(0)}%` : '';
  statusBadge(statusCell.firstChild, s.status, pct);
  statusCell.title = s.error || '';
  setText(sizeCell.children[0], s.compressed_size_bytes != null ? fmtBytes(s.compressed_size_bytes) : '—');
  sizeCell.children[0].title = 'Stored (compressed) size';
  const detail = [];
  if (s.memory_size_bytes != null) detail.push(`RAM ${fmtBytes(s.memory_size_bytes)}`);
  if (s.rootfs_size_bytes != null) detail.push(`disk ${fmtBytes(s.rootfs_size_bytes)}`);
  setText(sizeCell.children[1], detail.join(' · '));
  sizeCell.title = [
    s.compressed_size_bytes != null ? `stored: ${fmtBytes(s.compressed_size_bytes)} (compressed, deduplicated chunks)` : null,
    s.uploaded_bytes != null ? `added to the store by this snapshot: ${fmtBytes(s.uploaded_bytes)}` : null,
    s.state_size_bytes != null ? `device state: ${fmtBytes(s.state_size_bytes)}` : null,
    s.pause_ms != null ? `guest paused for ${s.pause_ms} ms` : null,
  ].filter(Boolean).join('\n');
  setText(createdCell, fmtTime(s.created_at));
  createdCell.title = s.created_at;
  const restorable = s.status === 'ready' || s.status === 'restoring';
  const [restore, restoreN, del] = [actions.children[0], actions.children[1].lastChild, actions.children[2]];
  restore.disabled = !restorable || state.busy.has(`${s.id}:restore`);
  restoreN.disabled = !restorable || state.busy.has(`${s.id}:restore`);
  del.disabled = !(s.status === 'ready' || s.status === 'failed') || state.busy.has(`${s.id}:delete`);
  restore.setAttribute('aria-label', `Restore snapshot ${label}`);
  restoreN.setAttribute('aria-label', `Restore snapshot ${label} several times in parallel`);
  del.setAttribute('aria-label', `Delete snapshot ${label}`);
}

function rerenderSnapshotRow(id) {
  const s = state.snapshots.get(id);
  const row = [...$('snapshots-body').children].find((r) => r.dataset.id === id);
  if (s && row) updateSnapshotRow(row, s);
}

async function onSnapshotSubmit(ev) {
  ev.preventDefault();
  const id = state.selectedId;
  if (!id) return;
  const comment = $('snapshot-comment').value;
  if (chars(comment) > COMMENT_MAX) {
    showError(new Error(`The comment is ${chars(comment)} characters; at most ${COMMENT_MAX} are allowed.`), 'Cannot take snapshot');
    return;
  }
  const button = $('snapshot-submit');
  button.disabled = true;
  try {
    const body = comment.trim() ? { comment } : {};
    const r = await api('POST', `${computerPath(id)}/snapshots`, body);
    const s = r.data;
    $('snapshot-comment').value = '';
    updateCommentCount();
    clearError('action');
    state.snapshots.set(s.id, s);
    watchSnapshot(s, 'snapshot', true);
    if (state.selectedId === id) await refreshSnapshots().catch(() => {});
  } catch (err) {
    actionFailed(err, `Could not snapshot ${computerName(id)}`);
  } finally {
    const c = state.computers.get(id);
    button.disabled = !c || c.status !== 'running';
  }
}

function updateCommentCount() {
  const n = chars($('snapshot-comment').value);
  const el = $('snapshot-comment-count');
  setText(el, `${n} / ${COMMENT_MAX}`);
  el.classList.toggle('over', n > COMMENT_MAX);
}

async function restoreSnapshot(s, n) {
  const cid = s.computer_id;
  const label = s.comment || shortId(s.id);
  await withBusy(`${s.id}:restore`, async () => {
    rerenderSnapshotRow(s.id);
    const calls = Array.from({ length: n }, () => api('POST', `/computers/${enc(cid)}/restore/${enc(s.id)}`));
    const results = await Promise.allSettled(calls);
    const made = results.filter((r) => r.status === 'fulfilled').map((r) => r.value.data);
    const failed = results.filter((r) => r.status === 'rejected').map((r) => r.reason);
    if (made.length) {
      const links = made.flatMap((c, i) => (i ? [', ', openLink(c)] : [openLink(c)]));
      notify(
        n === 1 ? 'Restoring snapshot ' : `Restoring snapshot (${made.length} of ${n} in parallel) `,
        h('strong', {}, label), ' into ', ...links, '.',
      );
      $('notice').dataset.computerIds = made.map((c) => c.id).join(' ');
      const snap = state.snapshots.get(s.id) || s;
      watchSnapshot({ ...snap, status: 'restoring' }, 'restore', true);
    }
    if (failed.length) {
      actionFailed(failed[0], failed.length === n
        ? `Could not restore snapshot ${label}`
        : `${failed.length} of ${n} restores of ${label} failed`);
    } else {
      clearError('action');
    }
  });
  rerenderSnapshotRow(s.id);
  scheduleRefresh(0);
}

async function onSnapshotAction(ev) {
  const button = ev.target.closest('button[data-action]');
  if (!button) return;
  const row = button.closest('tr[data-id]');
  const s = row && state.snapshots.get(row.dataset.id);
  if (!s) return;
  const label = s.comment || shortId(s.id);
  switch (button.dataset.action) {
    case 'restore':
      await restoreSnapshot(s, 1);
      break;
    case 'restore-n': {
      const input = row.querySelector('input.count');
      const n = Math.trunc(Number(input.value));
      if (!Number.isFinite(n) || n < 1 || n > 20) {
        showError(new Error('Choose between 1 and 20 parallel restores.'), 'Cannot restore');
        input.focus();
        return;
      }
      await restoreSnapshot(s, n);
      break;
    }
    case 'delete': {
      const ok = await confirmDialog(
        `Delete snapshot “${label}”?`,
        'Computers already restored from it keep running; it cannot be restored again.',
        'Delete snapshot',
      );
      if (!ok) return;
      await withBusy(`${s.id}:delete`, async () => {
        rerenderSnapshotRow(s.id);
        try {
          const r = await api('DELETE', snapshotPath(s.computer_id, s.id));
          const status = (r && r.data && r.data.status) || 'deleted';
          row.dataset.status = status;
          statusBadge(row.querySelector('.status'), status);
          row.classList.add('gone');
          for (const b of row.querySelectorAll('button, input')) b.disabled = true;
          state.deletedSnapshots.add(s.id);
          const t = state.trackers.get(s.id);
          if (t) t.remove();
          notify('Deleted snapshot ', h('strong', {}, label), '.');
          setTimeout(() => {
            if (row.isConnected && row.dataset.status === 'deleted') row.remove();
            const n = $('snapshots-body').children.length;
            $('snapshots-empty').hidden = n > 0;
            setText($('snapshots-count'), `${n} snapshot${n === 1 ? '' : 's'}`);
          }, 1500);
        } catch (err) {
          actionFailed(err, `Could not delete snapshot ${label}`);
        }
      });
      break;
    }
    default:
      break;
  }
}

// ---------------------------------------------------------------------------------------
// Live progress of a snapshot: EventSource with a one-use ticket, polling as a fallback.

function watchSnapshot(s, mode, explicit) {
  let t = state.trackers.get(s.id);
  if (t && t.active) {
    if (mode === 'restore') t.mode = mode;
    return t;
  }
  // The list may lag behind a stream that just ended: do not reopen at once.
  if (t && !explicit && Date.now() - t.finishedAt < 5000) return t;
  if (!t) {
    t = new Tracker(s);
    state.trackers.set(s.id, t);
  }
  t.start(s, mode);
  return t;
}

function showTrackersFor(computerId) {
  for (const t of state.trackers.values()) t.card.hidden = t.computerId !== computerId;
}

class Tracker {
  constructor(s) {
    this.id = s.id;
    this.computerId = s.computer_id;
    this.comment = s.comment || '';
    this.card = $('progress-template').content.firstElementChild.cloneNode(true);
    this.card.dataset.snapshotId = s.id;
    this.card.dataset.computerId = s.computer_id;
    this.el = {
      title: this.card.querySelector('.progress-title'),
      status: this.card.querySelector('.progress-status'),
      channel: this.card.querySelector('.progress-channel'),
      dismiss: this.card.querySelector('.progress-dismiss'),
      bar: this.card.querySelector('progress'),
      percent: this.card.querySelector('.progress-percent'),
      step: this.card.querySelector('.progress-step'),
      bytes: this.card.querySelector('.progress-bytes'),
      rate: this.card.querySelector('.progress-rate'),
      eta: this.card.querySelector('.progress-eta'),
      error: this.card.querySelector('.progress-error'),
      log: this.card.querySelector('.progress-log'),
    };
    this.el.bar.setAttribute('aria-label', `Progress of snapshot ${this.comment || shortId(s.id)}`);
    this.el.dismiss.addEventListener('click', () => this.remove());
    $('progress-area').prepend(this.card);
    this.card.hidden = this.computerId !== state.selectedId;
    this.active = false;
    this.finishedAt = 0;
  }

  start(s, mode) {
    this.mode = mode;
    this.active = true;
    this.failures = 0;
    this.gen = state.generation;
    this.startedAt = performance.now();
    this.samples = [];
    this.uploadStartedAt = null;
    this.progress = null;
    this.bytesDone = undefined;
    this.bytesTotal = undefined;
    setText(this.el.bytes, '—');
    this.status = s.status;
    this.lastStep = null;
    this.card.dataset.mode = mode;
    this.card.classList.remove('finished');
    this.el.dismiss.hidden = true;
    this.el.error.hidden = true;
    this.el.log.replaceChildren();
    const what = this.comment ? `“${this.comment}”` : shortId(this.id);
    setText(this.el.title, mode === 'restore' ? `Restoring from snapshot ${what}` : `Snapshot ${what}`);
    this.render({ status: s.status, progress: s.status === 'ready' ? 1 : null });
    this.connect();
  }

  setChannel(text, kind) {
    setText(this.el.channel, text);
    this.card.dataset.channel = kind;
  }

  async connect() {
    if (!this.active) return;
    this.setChannel('connecting…', 'connecting');
    let ticket;
    try {
      ticket = (await api('POST', '/sse/ticket', { snapshot_id: this.id })).ticket;
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) {
        logout(`Your API key was refused: ${err.message}`);
        return;
      }
      this.streamFailed();
      return;
    }
    if (!this.active || this.gen !== state.generation) return;
    const url = `${API}${snapshotPath(this.computerId, this.id)}/events?ticket=${encodeURIComponent(ticket)}`;
    const es = new EventSource(url);
    this.es = es;
    es.onopen = () => {
      if (this.es === es) this.setChannel('live · EventSource', 'sse');
    };
    for (const name of STREAM_EVENTS) {
      es.addEventListener(name, (ev) => {
        if (this.es === es) this.onEvent(name, ev);
      });
    }
    es.onerror = () => {
      if (this.es !== es) return;
      // A ticket is good for one stream: never let EventSource retry with it.
      es.close();
      this.es = null;
      if (this.active) this.streamFailed();
    };
  }

  streamFailed() {
    this.failures += 1;
    if (this.failures <= MAX_STREAM_RETRIES) {
      this.setChannel(`reconnecting (${this.failures}/${MAX_STREAM_RETRIES})…`, 'reconnecting');
      this.timer = setTimeout(() => this.connect(), 400 * this.failures);
    } else {
      this.poll();
    }
  }

  async poll() {
    if (!this.active) return;
    this.setChannel('polling every 2 s', 'polling');
    try {
      const r = await api('GET', snapshotPath(this.computerId, this.id));
      if (!this.active) return;
      const s = r.data;
      this.render({ status: s.status, error: s.error, progress: s.status === 'ready' ? 1 : null });
      if (FINAL.has(s.status)) {
        this.finish(s.status);
        return;
      }
    } catch (err) {
      if (err instanceof ApiError && err.status === 404) {
        this.render({ status: 'deleted' });
        this.finish('deleted');
        return;
      }
      if (err instanceof ApiError && err.status === 401) {
        logout(`Your API key was refused: ${err.message}`);
        return;
      }
    }
    this.timer = setTimeout(() => this.poll(), POLL_MS);
  }

  onEvent(name, ev) {
    let data;
    try {
      data = JSON.parse(ev.data);
    } catch {
      return;
    }
    this.failures = 0;
    this.lastEventId = ev.lastEventId;
    if (!data.status) data.status = name.replace(/^snapshot_/, '');
    this.render(data);
    this.log(name, data);
    // Restores end when the snapshot is ready again; snapshots when ready or failed.
    if (FINAL.has(data.status)) this.finish(data.status);
  }

  /** A snapshot from the list: a stream that outlived its usefulness is ended. */
  noteSnapshot(s) {
    if (this.active && this.card.dataset.channel === 'polling' && FINAL.has(s.status)) {
      this.render({ status: s.status, progress: s.status === 'ready' ? 1 : null });
      this.finish(s.status);
    }
  }

  render(d) {
    const now = performance.now();
    this.status = d.status;
    this.card.dataset.status = d.status;
    statusBadge(this.el.status, d.status);
    if (d.step) this.lastStep = d.step;
    const step = d.step || (FINAL.has(d.status) ? 'done' : this.lastStep || '—');
    setText(this.el.step, step);
    this.card.dataset.step = d.step || '';

    let progress = typeof d.progress === 'number' ? Math.min(1, Math.max(0, d.progress)) : null;
    if (d.status === 'ready' && progress === null) progress = 1;
    const bar = this.el.bar;
    if (progress === null && !FINAL.has(d.status)) {
      // Nothing measured yet: an indeterminate bar, unless one was already showing.
      if (this.progress === null) {
        bar.removeAttribute('value');
        setText(this.el.percent, '…');
      }
    } else if (progress !== null) {
      this.progress = progress;
      bar.value = progress * 100;
      setText(this.el.percent, `${(progress * 100).toFixed(1)}%`);
    }
    this.card.dataset.progress = this.progress === null ? '' : String(this.progress);

    if (typeof d.bytes_done === 'number' && typeof d.bytes_total === 'number') {
      this.bytesDone = d.bytes_done;
      this.bytesTotal = d.bytes_total;
      setText(this.el.bytes, `${fmtBytes(d.bytes_done)} of ${fmtBytes(d.bytes_total)}`);
      if (this.uploadStartedAt === null) this.uploadStartedAt = now;
      this.samples.push({ t: now, b: d.bytes_done });
      while (this.samples.length > 2 && now - this.samples[0].t > 5000) this.samples.shift();
    }

    // Rate over the last few seconds; on completion the average of the whole transfer.
    let rate = null;
    if (FINAL.has(d.status) && this.uploadStartedAt !== null && this.bytesTotal) {
      const secs = (now - this.uploadStartedAt) / 1000;
      if (secs > 0.05) rate = this.bytesTotal / secs;
    } else if (this.samples.length >= 2) {
      const a = this.samples[0];
      const b = this.samples[this.samples.length - 1];
      const secs = (b.t - a.t) / 1000;
      if (secs > 0.05 && b.b >= a.b) rate = (b.b - a.b) / secs;
    }
    setText(this.el.rate, rate === null ? '—' : `${fmtBytes(rate)}/s`);
    if (FINAL.has(d.status)) {
      setText(this.el.eta, d.status === 'ready' ? `done in ${fmtDuration((now - this.startedAt) / 1000)}` : '—');
    } else if (rate && this.bytesTotal !== undefined && this.bytesDone !== undefined) {
      setText(this.el.eta, fmtDuration((this.bytesTotal - this.bytesDone) / rate));
    } else {
      setText(this.el.eta, '—');
    }

    if (d.error) {
      setText(this.el.error, d.error);
      this.el.error.hidden = false;
    }
    rerenderSnapshotRow(this.id);
  }

  log(name, d) {
    const secs = ((performance.now() - this.startedAt) / 1000).toFixed(2);
    const parts = [`+${secs}s`, d.status];
    if (d.step) parts.push(d.step);
    if (typeof d.progress === 'number') parts.push(`${(d.progress * 100).toFixed(1)}%`);
    if (typeof d.bytes_done === 'number' && typeof d.bytes_total === 'number') {
      parts.push(`${fmtBytes(d.bytes_done)} / ${fmtBytes(d.bytes_total)}`);
    }
    if (d.computer_id) parts.push(`computer ${shortId(d.computer_id)}`);
    if (d.error) parts.push(d.error);
    const li = h('li', {
      dataset: {
        event: name,
        status: d.status,
        progress: typeof d.progress === 'number' ? String(d.progress) : '',
        bytesDone: typeof d.bytes_done === 'number' ? String(d.bytes_done) : '',
        bytesTotal: typeof d.bytes_total === 'number' ? String(d.bytes_total) : '',
      },
    }, parts.join(' · '));
    this.el.log.append(li);
    while (this.el.log.children.length > MAX_LOG_LINES) this.el.log.firstChild.remove();
  }

  finish(status) {
    this.active = false;
    this.finishedAt = Date.now();
    clearTimeout(this.timer);
    if (this.es) {
      this.es.close();
      this.es = null;
    }
    this.card.classList.add('finished');
    this.card.dataset.finished = status;
    this.el.dismiss.hidden = false;
    const how = this.card.dataset.channel === 'polling' ? 'polled' : 'stream closed';
    this.setChannel(`${how} · ${status}`, 'closed');
    rerenderSnapshotRow(this.id);
    if (this.computerId === state.selectedId) scheduleRefresh(0);
  }

  stop() {
    this.active = false;
    clearTimeout(this.timer);
    if (this.es) {
      this.es.close();
      this.es = null;
    }
  }

  remove() {
    this.stop();
    this.card.remove();
    state.trackers.delete(this.id);
  }
}

// ---------------------------------------------------------------------------------------
// Confirmation dialog

function confirmDialog(title, text, okLabel) {
  const dialog = $('confirm-dialog');
  setText($('confirm-title'), title);
  setText($('confirm-text'), text);
  setText($('confirm-ok'), okLabel);
  dialog.returnValue = '';
  return new Promise((resolve) => {
    dialog.addEventListener('close', () => resolve(dialog.returnValue === 'ok'), { once: true });
    dialog.showModal();
    $('confirm-ok').focus();
  });
}

// ---------------------------------------------------------------------------------------
// Terminal: a login shell in the computer (POST /terminal), attached over a WebSocket with a
// one-use ticket, drawn by xterm.js (served from this page's own files).

const TERMINAL_ROWS = 24;
const TERMINAL_COLS = 100;
const terminal = { term: null, ws: null };

function terminalSend(frame) {
  if (terminal.ws && terminal.ws.readyState === WebSocket.OPEN) terminal.ws.send(JSON.stringify(frame));
}

async function openTerminal() {
  const id = state.selectedId;
  if (!id) return;
  closeTerminal();
  const status = $('terminal-status');
  const host = $('terminal');
  setText(status, 'opening…');
  $('terminal-open').disabled = true;
  try {
    const { Terminal } = await import('./vendor/xterm.mjs');
    const made = await api('POST', `${computerPath(id)}/terminal`, { rows: TERMINAL_ROWS, cols: TERMINAL_COLS });
    const { ticket } = await api('POST', '/sse/ticket', {});
    if (state.selectedId !== id) return;
    host.hidden = false;
    host.replaceChildren();
    const term = new Terminal({ rows: TERMINAL_ROWS, cols: TERMINAL_COLS, fontSize: 13, cursorBlink: true });
    term.open(host);
    const url = new URL(made.stream_url, location.href);
    url.protocol = location.protocol === 'https:' ? 'wss:' : 'ws:';
    url.searchParams.set('ticket', ticket);
    const ws = new WebSocket(url);
    terminal.term = term;
    terminal.ws = ws;
    host.dataset.sessionId = made.session_id;
    ws.addEventListener('open', () => {
      setText(status, 'connected');
      host.dataset.state = 'open';
      term.focus();
    });
    ws.addEventListener('message', (ev) => {
      let f;
      try {
        f = JSON.parse(ev.data);
      } catch {
        return;
      }
      if (f.type === 'stdout' || f.type === 'stderr') term.write(f.data);
      else if (f.type === 'exit') {
        term.write(`\r\n[the shell exited with code ${f.code}]\r\n`);
        setText(status, `exited (code ${f.code})`);
        host.dataset.state = 'exited';
      } else if (f.type === 'error') term.write(`\r\n[${f.message}]\r\n`);
    });
    ws.addEventListener('close', () => {
      if (host.dataset.state !== 'exited') {
        setText(status, 'disconnected');
        host.dataset.state = 'closed';
      }
      $('terminal-open').disabled = false;
    });
    term.onData((data) => terminalSend({ type: 'stdin', data }));
    term.onResize(({ rows, cols }) => terminalSend({ type: 'resize', rows, cols }));
    $('terminal-close').hidden = false;
  } catch (err) {
    setText(status, '');
    $('terminal-open').disabled = false;
    actionFailed(err, 'Could not open a terminal');
  }
}

/** Ends the shell (hang-up, as a closed terminal does) and takes the terminal away. */
function closeTerminal() {
  terminalSend({ type: 'signal', signal: 'SIGHUP' });
  terminal.ws?.close();
  terminal.term?.dispose();
  terminal.ws = null;
  terminal.term = null;
  const host = $('terminal');
  host.hidden = true;
  host.replaceChildren();
  delete host.dataset.state;
  delete host.dataset.sessionId;
  $('terminal-close').hidden = true;
  $('terminal-open').disabled = false;
  setText($('terminal-status'), '');
}

// ---------------------------------------------------------------------------------------
// Files: a directory of the computer, with downloads, uploads (multipart, streamed by the
// server into the guest) and deletes.

const files = { path: '/root' };

function parentOf(p) {
  const trimmed = p.replace(/\/+$/, '');
  const i = trimmed.lastIndexOf('/');
  return i <= 0 ? '/' : trimmed.slice(0, i);
}

const joinPath = (dir, name) => (dir === '/' ? `/${name}` : `${dir}/${name}`);

function showFilesError(err) {
  const el = $('files-error');
  setText(el, err ? `${err.message}${err.requestId ? ` (request id ${err.requestId})` : ''}` : '');
  el.hidden = !err;
}

async function loadFiles(path = files.path) {
  const id = state.selectedId;
  if (!id) return;
  try {
    const r = await api('GET', `${computerPath(id)}/files?path=${enc(path)}`);
    if (state.selectedId !== id) return;
    files.path = path;
    setText($('files-path'), path);
    showFilesError(null);
    $('files-body').replaceChildren(...r.data.map(fileRow));
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) return actionFailed(err);
    showFilesError(err);
  }
}

function fileRow(f) {
  const name = f.is_dir
    ? h('button', { type: 'button', class: 'linkish', dataset: { action: 'open' } }, `${f.name}/`)
    : f.name;
  return h(
    'tr',
    { dataset: { path: f.path, testid: 'file-row', dir: f.is_dir ? 'yes' : 'no' } },
    h('td', { dataset: { testid: 'file-name' } }, name),
    h('td', { class: 'muted small' }, f.is_dir ? '' : fmtBytes(f.size)),
    h(
      'td',
      { class: 'actions-col' },
      f.is_dir ? null : h('button', { type: 'button', class: 'btn ghost small', dataset: { action: 'download' } }, 'Download'),
      h('button', { type: 'button', class: 'btn ghost small danger', dataset: { action: 'delete' } }, 'Delete'),
    ),
  );
}

async function onFileAction(ev) {
  const button = ev.target.closest('button[data-action]');
  const row = ev.target.closest('tr[data-path]');
  const id = state.selectedId;
  if (!button || !row || !id) return;
  const path = row.dataset.path;
  try {
    if (button.dataset.action === 'open') await loadFiles(path);
    else if (button.dataset.action === 'download') await downloadFile(id, path);
    else if (button.dataset.action === 'delete') {
      await api('DELETE', `${computerPath(id)}/files`, { path });
      await loadFiles();
    }
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) return actionFailed(err);
    showFilesError(err);
  }
}

/** Fetches the file with the key (a plain link could not send it) and saves it. */
async function downloadFile(id, path) {
  const res = await fetch(`${API}${computerPath(id)}/files/download?path=${enc(path)}`, {
    headers: { Authorization: `Bearer ${state.key}` },
    cache: 'no-store',
  });
  if (!res.ok) {
    let e = {};
    try {
      e = (await res.json()).error || {};
    } catch {
      e = {};
    }
    throw new ApiError(res.status, e.code || `http_${res.status}`, e.message || res.statusText, e.request_id);
  }
  const url = URL.createObjectURL(await res.blob());
  const a = h('a', { href: url, download: path.split('/').pop() || 'download' });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}

async function onUploadSubmit(ev) {
  ev.preventDefault();
  const id = state.selectedId;
  const input = $('files-upload-input');
  const file = input.files && input.files[0];
  if (!id || !file) return;
  const button = $('files-upload-submit');
  button.disabled = true;
  button.textContent = 'Uploading…';
  try {
    const form = new FormData();
    // The path first: the server streams the file into the guest as it arrives.
    form.append('path', joinPath(files.path, file.name));
    form.append('file', file, file.name);
    const res = await fetch(`${API}${computerPath(id)}/files/upload`, {
      method: 'POST',
      headers: { Authorization: `Bearer ${state.key}` },
      body: form,
    });
    if (!res.ok) {
      const e = (await res.json().catch(() => ({}))).error || {};
      throw new ApiError(res.status, e.code || `http_${res.status}`, e.message || res.statusText, e.request_id);
    }
    input.value = '';
    notify(`Uploaded ${file.name} (${fmtBytes(file.size)}) to ${files.path}`);
    await loadFiles();
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) return actionFailed(err);
    showFilesError(err);
  } finally {
    button.disabled = false;
    button.textContent = 'Upload';
  }
}

// ---------------------------------------------------------------------------------------
// Start

function init() {
  $('login-form').addEventListener('submit', onLoginSubmit);
  $('logout').addEventListener('click', () => logout());
  $('error-dismiss').addEventListener('click', () => clearError());
  $('notice-dismiss').addEventListener('click', () => {
    $('notice').hidden = true;
  });
  $('create-form').addEventListener('submit', onCreateSubmit);
  $('computers-body').addEventListener('click', onComputerAction);
  $('panel-close').addEventListener('click', deselect);
  $('exec-form').addEventListener('submit', onExecSubmit);
  $('snapshot-form').addEventListener('submit', onSnapshotSubmit);
  $('snapshot-comment').addEventListener('input', updateCommentCount);
  $('snapshots-body').addEventListener('click', onSnapshotAction);
  $('terminal-open').addEventListener('click', openTerminal);
  $('terminal-close').addEventListener('click', closeTerminal);
  $('files-body').addEventListener('click', onFileAction);
  $('files-up').addEventListener('click', () => loadFiles(parentOf(files.path)));
  $('files-refresh').addEventListener('click', () => loadFiles());
  $('files-upload-form').addEventListener('submit', onUploadSubmit);
  updateCommentCount();

  const saved = sessionStorage.getItem(KEY_STORAGE);
  if (!saved) {
    showLogin();
    return;
  }
  login(saved).catch((err) => {
    if (err instanceof ApiError && err.status === 401) sessionStorage.removeItem(KEY_STORAGE);
    showLogin(loginErrorNodes(err));
  });
}

init();
