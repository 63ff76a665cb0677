import { randomUUID } from 'node:crypto';

import { ComputerFailedError, ConnectionError, MiosaError, TimeoutError } from './errors.js';
import { sleep, type Transport } from './http.js';
import { openSocket, SpawnedProcess, type SpawnOptions } from './process.js';
import { readEventStream } from './sse.js';
import type {
  ActionResult,
  Computer,
  ComputerList,
  CreateComputerParams,
  ExecResult,
  EnvVar,
  ExposePortParams,
  FileInfo,
  LogLine,
  LogPage,
  FileStat,
  NetworkPolicy,
  NetworkPolicyRule,
  Port,
  PreviewUrl,
  UpdateComputerParams,
} from './types.js';

export interface ExecOptions {
  /** Seconds the command may run (server default 60, max 3600); then it is killed (exit 124). */
  timeout?: number;
  signal?: AbortSignal;
}

export interface WaitUntilRunningOptions {
  /** Give up after this long (default 120 000 ms) with a `TimeoutError`. */
  timeoutMs?: number;
  /** How often to look (default 500 ms). */
  intervalMs?: number;
  signal?: AbortSignal;
}

export interface CloneOptions {
  /** The new computer's name (default `<name>-clone`). */
  name?: string;
  /** Sent as `Idempotency-Key`; generated when absent. */
  idempotencyKey?: string;
}

const enc = encodeURIComponent;

/** How long the HTTP request of an exec may take: the command's own timeout plus a margin. */
function execRequestTimeoutMs(clientTimeoutMs: number, timeoutSeconds: number | undefined): number {
  return Math.max(clientTimeoutMs, ((timeoutSeconds ?? 60) + 30) * 1000);
}

/** `client.computers`: the computers API. */
export class Computers {
  constructor(private readonly http: Transport) {}

  /**
   * Creates a computer; it starts at once (status `provisioning`, then `running`). Not retried:
   * `POST /computers` ignores `Idempotency-Key`, so a retry could make a second computer.
   */
  create(params: CreateComputerParams, opts: { signal?: AbortSignal } = {}): Promise<Computer> {
    return this.http.request<Computer>('POST', '/computers', { body: params, signal: opts.signal });
  }

  /** Every computer of the tenant. */
  async list(opts: { signal?: AbortSignal } = {}): Promise<Computer[]> {
    return (await this.listPage(opts)).computers;
  }

  /** The list as the server sends it: `{ total, computers }`. */
  listPage(opts: { signal?: AbortSignal } = {}): Promise<ComputerList> {
    return this.http.request<ComputerList>('GET', '/computers', { retry: true, signal: opts.signal });
  }

  get(id: string, opts: { signal?: AbortSignal } = {}): Promise<Computer> {
    return this.http.request<Computer>('GET', `/computers/${enc(id)}`, { retry: true, signal: opts.signal });
  }

  /** Destroys the computer (its VM and disks). */
  async delete(id: string, opts: { signal?: AbortSignal } = {}): Promise<ActionResult> {
    const r = await this.http.request<ActionResult | undefined>('DELETE', `/computers/${enc(id)}`, {
      retry: true,
      signal: opts.signal,
    });
    return r ?? { success: true, status: 'destroyed', message: 'computer deleted' };
  }

  /** Boots a stopped computer; answers at once with `starting` (see `waitUntilRunning`). */
  /** Starts a stopped computer; `env` variables are set first (added or replaced, and kept). */
  start(id: string, opts: { env?: Record<string, string>; signal?: AbortSignal } = {}): Promise<ActionResult> {
    const body = opts.env ? { env: opts.env } : {};
    return this.http.request<ActionResult>('POST', `/computers/${enc(id)}/start`, { body, signal: opts.signal });
  }

  /** Renames a computer and/or replaces its metadata. */
  update(id: string, params: UpdateComputerParams, opts: { signal?: AbortSignal } = {}): Promise<Computer> {
    return this.http.request<Computer>('PATCH', `/computers/${enc(id)}`, { body: params, retry: true, signal: opts.signal });
  }

  /** Writes a whole file (text as UTF-8), making missing parent directories. Up to 12 MiB; larger: `upload`. */
  async writeFile(id: string, path: string, content: string | Uint8Array, opts: { signal?: AbortSignal } = {}): Promise<void> {
    const bytes = typeof content === 'string' ? Buffer.from(content, 'utf8') : Buffer.from(content);
    await this.http.request<unknown>('POST', `/computers/${enc(id)}/files/write`, {
      body: { path, content_base64: bytes.toString('base64') },
      signal: opts.signal,
    });
  }

  /** Uploads bytes to `path` (streamed to the guest; it replaces what was there once complete). */
  async upload(id: string, path: string, data: Blob | Uint8Array, opts: { signal?: AbortSignal; timeoutMs?: number } = {}): Promise<void> {
    const form = new FormData();
    form.set('path', path);
    form.set('file', data instanceof Blob ? data : new Blob([data]), path.split('/').pop() || 'file');
    const res = await this.http.raw('POST', `/computers/${enc(id)}/files/upload`, {
      body: form,
      signal: opts.signal,
      timeoutMs: opts.timeoutMs ?? 600_000,
    });
    await res.arrayBuffer();
  }

  /** A file's bytes. */
  async readFile(id: string, path: string, opts: { signal?: AbortSignal; timeoutMs?: number } = {}): Promise<Uint8Array> {
    const res = await this.http.raw('GET', `/computers/${enc(id)}/files/download`, {
      query: { path },
      signal: opts.signal,
      timeoutMs: opts.timeoutMs,
    });
    return new Uint8Array(await res.arrayBuffer());
  }

  /** A file's bytes as a stream (for large files). */
  async download(id: string, path: string, opts: { signal?: AbortSignal } = {}): Promise<ReadableStream<Uint8Array>> {
    const res = await this.http.raw('GET', `/computers/${enc(id)}/files/download`, { query: { path }, signal: opts.signal });
    if (!res.body) throw new Error('the download has no body');
    return res.body;
  }

  /** A directory's entries, by name (default `/root`). */
  async listFiles(id: string, path?: string, opts: { signal?: AbortSignal } = {}): Promise<FileInfo[]> {
    const r = await this.http.request<{ data: FileInfo[] }>('GET', `/computers/${enc(id)}/files`, {
      query: { path },
      retry: true,
      signal: opts.signal,
    });
    return r.data;
  }

  /** What a path is. */
  stat(id: string, path: string, opts: { signal?: AbortSignal } = {}): Promise<FileStat> {
    return this.http.request<FileStat>('POST', `/computers/${enc(id)}/files/stat`, { body: { path }, signal: opts.signal });
  }

  /** Makes a directory (with missing parents unless `recursive: false`; mode like `'0755'`). */
  async mkdir(id: string, path: string, opts: { recursive?: boolean; mode?: string; signal?: AbortSignal } = {}): Promise<void> {
    await this.http.request<unknown>('POST', `/computers/${enc(id)}/files/mkdir`, {
      body: { path, recursive: opts.recursive ?? true, mode: opts.mode ?? '0755' },
      signal: opts.signal,
    });
  }

  /** Deletes a file, or a directory with all it holds. */
  async deletePath(id: string, path: string, opts: { signal?: AbortSignal } = {}): Promise<void> {
    await this.http.request<unknown>('DELETE', `/computers/${enc(id)}/files`, { body: { path }, signal: opts.signal });
  }

  /** The computer's environment variables, by name. */
  async env(id: string, opts: { signal?: AbortSignal } = {}): Promise<EnvVar[]> {
    const r = await this.http.request<{ data: EnvVar[] }>('GET', `/computers/${enc(id)}/env`, {
      retry: true,
      signal: opts.signal,
    });
    return r.data;
  }

  /** Adds a variable (one of that name already: a 409 `ENV_VAR_EXISTS`; change it with `updateEnv`). */
  async setEnv(id: string, name: string, value: string, opts: { signal?: AbortSignal } = {}): Promise<EnvVar> {
    const r = await this.http.request<{ data: EnvVar }>('POST', `/computers/${enc(id)}/env`, {
      body: { name, value },
      signal: opts.signal,
    });
    return r.data;
  }

  /** Changes a variable's value. */
  async updateEnv(id: string, name: string, value: string, opts: { signal?: AbortSignal } = {}): Promise<EnvVar> {
    const r = await this.http.request<{ data: EnvVar }>('PATCH', `/computers/${enc(id)}/env/${enc(name)}`, {
      body: { value },
      retry: true,
      signal: opts.signal,
    });
    return r.data;
  }

  /** Removes a variable. */
  async deleteEnv(id: string, name: string, opts: { signal?: AbortSignal } = {}): Promise<void> {
    await this.http.request<undefined>('DELETE', `/computers/${enc(id)}/env/${enc(name)}`, { signal: opts.signal });
  }

  /**
   * Runs a program with its streams over a WebSocket (the official SDK's `exec.spawn`):
   * without `args`, `command` is a command line for `bash -c`. Its output arrives as written
   * (`for await (const c of p.output())`), `wait()` gives its exit code, and closing the
   * stream kills it. A computer runs at most 16 sessions at once.
   */
  async spawn(id: string, command: string, opts: SpawnOptions = {}): Promise<SpawnedProcess> {
    const Ctor = opts.WebSocket ?? (globalThis as { WebSocket?: SpawnOptions['WebSocket'] }).WebSocket;
    if (Ctor === undefined) {
      throw new MiosaError('spawn needs a WebSocket: pass { WebSocket } (Node 20: run with --experimental-websocket)');
    }
    // A browser's WebSocket sends no Authorization header: a one-use ticket stands for the key.
    const { ticket } = await this.http.request<{ ticket: string }>('POST', '/sse/ticket', { body: {}, retry: true });
    const url = this.http
      .url(`/computers/${enc(id)}/exec/stream`, {
        command,
        args: opts.args?.join(','),
        cwd: opts.cwd,
        env: opts.env === undefined ? undefined : JSON.stringify(opts.env),
        rows: opts.rows,
        cols: opts.cols,
        ticket,
      })
      .replace(/^http/, 'ws');
    return new SpawnedProcess(await openSocket(Ctor, url, `spawning in computer ${id}`));
  }

  /** A page of the computer's console log: its last `lines` lines, or those after a cursor. */
  logs(id: string, opts: { lines?: number; since?: number; signal?: AbortSignal } = {}): Promise<LogPage> {
    return this.http
      .request<{ data: LogPage }>('GET', `/computers/${enc(id)}/logs`, {
        query: { lines: opts.lines, since: opts.since },
        retry: true,
        signal: opts.signal,
      })
      .then((r) => r.data);
  }

  /**
   * The console log followed as the computer prints it (from the newest line, or after the
   * cursor `since`), until `signal` aborts. Lines cut away before they could be sent are
   * skipped; `gap` says so.
   */
  async *followLogs(
    id: string,
    opts: { since?: number; signal?: AbortSignal; onGap?: (from: number, to: number) => void } = {},
  ): AsyncGenerator<LogLine, void, undefined> {
    const url = this.http.url(`/computers/${enc(id)}/logs/stream`, { since: opts.since });
    const res = await fetch(url, { headers: this.http.headers({ Accept: 'text/event-stream' }), signal: opts.signal });
    if (!res.ok || res.body === null) {
      throw new ConnectionError(`following the logs of computer ${id}: HTTP ${res.status} ${await res.text()}`);
    }
    for await (const raw of readEventStream(res.body)) {
      const data = JSON.parse(raw.data) as LogLine & { from?: number; to?: number };
      if (raw.event === 'gap') opts.onGap?.(data.from ?? 0, data.to ?? 0);
      else if (raw.event === 'log') yield { cursor: data.cursor, text: data.text };
    }
  }

  /** Stops the computer (synchronously: its file systems are synced, the VM quits; the disk stays). */
  stop(id: string, opts: { signal?: AbortSignal } = {}): Promise<ActionResult> {
    return this.http.request<ActionResult>('POST', `/computers/${enc(id)}/stop`, { body: {}, signal: opts.signal });
  }

  restart(id: string, opts: { signal?: AbortSignal } = {}): Promise<ActionResult> {
    return this.http.request<ActionResult>('POST', `/computers/${enc(id)}/restart`, {
      body: {},
      signal: opts.signal,
    });
  }

  /** Runs `command` under bash in the guest (as root, in /root). */
  exec(id: string, command: string, opts: ExecOptions = {}): Promise<ExecResult> {
    const body: Record<string, unknown> = { command };
    if (opts.timeout !== undefined) body.timeout = opts.timeout;
    return this.http.request<ExecResult>('POST', `/computers/${enc(id)}/exec`, {
      body,
      timeoutMs: execRequestTimeoutMs(this.http.timeoutMs, opts.timeout),
      signal: opts.signal,
    });
  }

  /** Runs `code` with python3 in the guest. */
  execPython(id: string, code: string, opts: ExecOptions = {}): Promise<ExecResult> {
    const body: Record<string, unknown> = { code };
    if (opts.timeout !== undefined) body.timeout = opts.timeout;
    return this.http.request<ExecResult>('POST', `/computers/${enc(id)}/exec/python`, {
      body,
      timeoutMs: execRequestTimeoutMs(this.http.timeoutMs, opts.timeout),
      signal: opts.signal,
    });
  }

  /**
   * A new computer from a fresh snapshot of this (running) one. The answer comes at once; the
   * clone runs once its snapshot is ready (see `waitUntilRunning`).
   */
  async clone(id: string, opts: CloneOptions = {}): Promise<Computer> {
    const body: Record<string, unknown> = {};
    if (opts.name !== undefined) body.name = opts.name;
    const r = await this.http.request<{ data: Computer }>('POST', `/computers/${enc(id)}/clone`, {
      body,
      headers: { 'Idempotency-Key': opts.idempotencyKey ?? randomUUID() },
      retry: true,
    });
    return r.data;
  }

  /**
   * Polls until the computer is `running` and resolves with it. Rejects with
   * `ComputerFailedError` if it ends in `error`, `stopped` or `destroyed` instead, and with
   * `TimeoutError` after `timeoutMs`.
   */
  async waitUntilRunning(id: string, opts: WaitUntilRunningOptions = {}): Promise<Computer> {
    const timeoutMs = opts.timeoutMs ?? 120_000;
    const intervalMs = opts.intervalMs ?? 500;
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const c = await this.get(id, { signal: opts.signal });
      if (c.status === 'running') return c;
      if (c.status === 'error' || c.status === 'stopped' || c.status === 'destroyed') {
        throw new ComputerFailedError(c);
      }
      const left = deadline - Date.now();
      if (left <= 0) {
        throw new TimeoutError(`computer ${id} was not running after ${timeoutMs} ms (status ${c.status})`, {
          code: 'wait_timeout',
        });
      }
      await sleep(Math.min(intervalMs, left), opts.signal);
    }
  }

  /** The ports the computer exposes, each with its preview URL (and a fresh signed link if private). */
  async ports(id: string, opts: { signal?: AbortSignal } = {}): Promise<Port[]> {
    const r = await this.http.request<{ ports: Port[] }>('GET', `/computers/${enc(id)}/ports`, {
      retry: true,
      signal: opts.signal,
    });
    return r.ports;
  }

  /** Exposes `port` (private unless `visibility: 'public'`); exposing it again changes it. */
  exposePort(id: string, port: number, params: ExposePortParams = {}, opts: { signal?: AbortSignal } = {}): Promise<Port> {
    return this.http.request<Port>('POST', `/computers/${enc(id)}/ports`, {
      body: { port, ...params },
      signal: opts.signal,
    });
  }

  /** Changes an exposed port's visibility or name. */
  updatePort(id: string, port: number, params: ExposePortParams, opts: { signal?: AbortSignal } = {}): Promise<Port> {
    return this.http.request<Port>('PATCH', `/computers/${enc(id)}/ports/${port}`, {
      body: params,
      signal: opts.signal,
    });
  }

  /** Stops exposing `port`. */
  async unexposePort(id: string, port: number, opts: { signal?: AbortSignal } = {}): Promise<void> {
    await this.http.request<undefined>('DELETE', `/computers/${enc(id)}/ports/${port}`, { signal: opts.signal });
  }

  /** The computer's preview URLs. */
  async urls(id: string, opts: { signal?: AbortSignal } = {}): Promise<PreviewUrl[]> {
    const r = await this.http.request<{ urls: PreviewUrl[] }>('GET', `/computers/${enc(id)}/urls`, {
      retry: true,
      signal: opts.signal,
    });
    return r.urls;
  }

  /** The computer's own egress policy (none set: no rules, `allow`). */
  networkPolicy(id: string, opts: { signal?: AbortSignal } = {}): Promise<NetworkPolicy> {
    return this.http.request<NetworkPolicy>('GET', `/computers/${enc(id)}/network-policy`, {
      retry: true,
      signal: opts.signal,
    });
  }

  /**
   * Replaces the computer's egress policy: rules in order (the first that matches decides),
   * then `defaultEffect` (default `allow`). It narrows the platform's policy, never widens it.
   */
  setNetworkPolicy(
    id: string,
    rules: NetworkPolicyRule[],
    defaultEffect?: 'allow' | 'deny',
    opts: { signal?: AbortSignal } = {},
  ): Promise<NetworkPolicy> {
    const body: Record<string, unknown> = { rules };
    if (defaultEffect !== undefined) body.default_effect = defaultEffect;
    return this.http.request<NetworkPolicy>('PUT', `/computers/${enc(id)}/network-policy`, {
      body,
      retry: true,
      signal: opts.signal,
    });
  }

  /** Back to the default policy (everything the platform allows). Idempotent. */
  async resetNetworkPolicy(id: string, opts: { signal?: AbortSignal } = {}): Promise<void> {
    await this.http.request<undefined>('DELETE', `/computers/${enc(id)}/network-policy`, {
      retry: true,
      signal: opts.signal,
    });
  }
}
