import { randomUUID } from 'node:crypto';

import {
  ConnectionError,
  MiosaError,
  NotFoundError,
  PermissionDeniedError,
  SnapshotFailedError,
  TimeoutError,
  ValidationError,
  errorFromResponse,
} from './errors.js';
import { sleep, type Transport } from './http.js';
import { readEventStream } from './sse.js';
import type {
  CreateSnapshotParams,
  DeletedSnapshot,
  RestoredComputer,
  Computer,
  Snapshot,
  SnapshotEvent,
  SnapshotEventData,
  SnapshotEventType,
  SnapshotPage,
  SnapshotStatus,
  SseTicket,
} from './types.js';

const enc = encodeURIComponent;

/** Statuses after which a snapshot's event stream ends. */
const FINAL: ReadonlySet<SnapshotStatus> = new Set<SnapshotStatus>(['ready', 'failed', 'deleted']);
/** Statuses in which a snapshot can be restored (a `restoring` one is ready and being read). */
const USABLE: ReadonlySet<SnapshotStatus> = new Set<SnapshotStatus>(['ready', 'restoring']);

export interface SnapshotEventsOptions {
  /** Stops the stream: the iterator then rejects with the signal's reason. */
  signal?: AbortSignal;
  /** Resume after this event id (sent as `Last-Event-ID`) instead of starting with the current state. */
  lastEventId?: string;
  /** How many times in a row a dropped connection is re-opened before giving up (default 5). */
  maxReconnects?: number;
  /**
   * A connection that sends nothing for this long (not even a keep-alive; the server sends one
   * every 15 s) is dropped and re-opened (default 45 000 ms).
   */
  idleTimeoutMs?: number;
}

export interface WaitOptions {
  /** Give up after this long (default 300 000 ms) with a `TimeoutError`. */
  timeoutMs?: number;
  /**
   * Called with every progress event (`snapshot_creating`, `snapshot_uploading` with
   * `progress`, ...). While polling, with an event made from each new status seen.
   */
  onProgress?: (event: SnapshotEvent) => void;
  signal?: AbortSignal;
  /** How often to poll when the event stream is unavailable (default 1 000 ms). */
  pollIntervalMs?: number;
}

export interface RestoreOptions {
  /** Sent as `Idempotency-Key`; generated when absent, so a retried restore makes one computer. */
  idempotencyKey?: string;
  signal?: AbortSignal;
}

/** `client.snapshots`: the Snapshots API. */
export class Snapshots {
  constructor(private readonly http: Transport) {}

  /** Starts a snapshot of a running computer; answers at once with status `creating`. */
  async create(computerId: string, params: CreateSnapshotParams = {}, opts: { signal?: AbortSignal } = {}): Promise<Snapshot> {
    const body: Record<string, unknown> = {};
    if (params.comment !== undefined) body.comment = params.comment;
    const r = await this.http.request<{ data: Snapshot }>('POST', `/computers/${enc(computerId)}/snapshots`, {
      body,
      headers: { 'Idempotency-Key': params.idempotencyKey ?? randomUUID() },
      retry: true,
      signal: opts.signal,
    });
    return r.data;
  }

  async get(computerId: string, snapshotId: string, opts: { signal?: AbortSignal } = {}): Promise<Snapshot> {
    const r = await this.http.request<{ data: Snapshot }>(
      'GET',
      `/computers/${enc(computerId)}/snapshots/${enc(snapshotId)}`,
      { retry: true, signal: opts.signal },
    );
    return r.data;
  }

  /** The computer's snapshots (not the deleted ones). For the server's `total` too, use `listPage`. */
  async list(computerId: string, opts: { signal?: AbortSignal } = {}): Promise<Snapshot[]> {
    return (await this.listPage(computerId, opts)).data;
  }

  /** The list as the server sends it: `{ data: Snapshot[], total }`. */
  listPage(computerId: string, opts: { signal?: AbortSignal } = {}): Promise<SnapshotPage> {
    return this.http.request<SnapshotPage>('GET', `/computers/${enc(computerId)}/snapshots`, {
      retry: true,
      signal: opts.signal,
    });
  }

  /** Soft-deletes the snapshot; its stored objects are cleaned up in the background. */
  async delete(computerId: string, snapshotId: string, opts: { signal?: AbortSignal } = {}): Promise<DeletedSnapshot> {
    const r = await this.http.request<{ data: DeletedSnapshot }>(
      'DELETE',
      `/computers/${enc(computerId)}/snapshots/${enc(snapshotId)}`,
      { retry: true, signal: opts.signal },
    );
    return r.data;
  }

  /**
   * Creates a new computer from a snapshot (the original is unchanged). Resolves with the new
   * computer (status `provisioning`) and, under `snapshot`, the snapshot part of the answer
   * (`{ id, status: 'restoring' }`). A `ready` snapshot is restored at once (the computer runs
   * about a second later); one still being taken (`creating`, `uploading`) is accepted too, and
   * its restore starts as soon as it is ready, so there is no need to `wait` first. Should that
   * snapshot fail, the new computer turns `error` (its `error` says the snapshot failed;
   * `computers.waitUntilRunning` rejects with `ComputerFailedError`). A failed snapshot answers
   * `ConflictError` (`snapshot is not ready`), a deleted one `NotFoundError`.
   */
  async restore(computerId: string, snapshotId: string, opts: RestoreOptions = {}): Promise<RestoredComputer> {
    const r = await this.http.request<{ data: Computer; snapshot: RestoredComputer['snapshot'] }>(
      'POST',
      `/computers/${enc(computerId)}/restore/${enc(snapshotId)}`,
      {
        body: {},
        headers: { 'Idempotency-Key': opts.idempotencyKey ?? randomUUID() },
        retry: true,
        signal: opts.signal,
      },
    );
    return { ...r.data, snapshot: r.snapshot };
  }

  /** A one-use ticket for opening an event stream without the Authorization header (lives ~60 s). */
  ticket(opts: { signal?: AbortSignal } = {}): Promise<SseTicket> {
    return this.http.request<SseTicket>('POST', '/sse/ticket', { body: {}, retry: true, signal: opts.signal });
  }

  /**
   * The snapshot's progress events, as an async iterator:
   *
   * ```ts
   * for await (const ev of client.snapshots.events(computerId, snap.id)) console.log(ev.event, ev.data.progress);
   * ```
   *
   * The stream starts with the current state, then follows live events, and ends after a final
   * one (`snapshot_ready`, `snapshot_failed`, `snapshot_deleted`). A connection that drops (or
   * closes) before that is re-opened with a fresh ticket and `Last-Event-ID`, so no event is
   * lost or repeated. Breaking out of the loop closes the connection.
   */
  async *events(
    computerId: string,
    snapshotId: string,
    opts: SnapshotEventsOptions = {},
  ): AsyncGenerator<SnapshotEvent, void, undefined> {
    const maxReconnects = opts.maxReconnects ?? 5;
    const idleTimeoutMs = opts.idleTimeoutMs ?? 45_000;
    const url = this.http.url(`/computers/${enc(computerId)}/snapshots/${enc(snapshotId)}/events`);
    let lastEventId: string | null = opts.lastEventId ?? null;
    let failures = 0;
    let lastProblem = 'the stream closed before a final event';
    for (;;) {
      if (failures > 0) {
        if (failures > maxReconnects) {
          throw new ConnectionError(
            `event stream of snapshot ${snapshotId} failed ${failures} times in a row: ${lastProblem}`,
          );
        }
        await sleep(this.http.backoffMs(failures - 1), opts.signal);
      }
      const { ticket } = await this.ticket({ signal: opts.signal });
      const conn = new AbortController();
      const signal = opts.signal ? AbortSignal.any([opts.signal, conn.signal]) : conn.signal;
      let idle: ReturnType<typeof setTimeout> | undefined;
      const resetIdle = () => {
        clearTimeout(idle);
        idle = setTimeout(
          () => conn.abort(new ConnectionError(`no data on the event stream for ${idleTimeoutMs} ms`)),
          idleTimeoutMs,
        );
      };
      let received = 0;
      try {
        resetIdle();
        const headers = this.http.headers({ Accept: 'text/event-stream', 'Cache-Control': 'no-cache' });
        delete headers.Authorization; // the ticket authenticates this request
        if (lastEventId !== null) headers['Last-Event-ID'] = lastEventId;
        const res = await fetch(`${url}?ticket=${enc(ticket)}`, { headers, signal });
        if (!res.ok) {
          const text = await res.text();
          let parsed: unknown;
          try {
            parsed = JSON.parse(text);
          } catch {
            parsed = undefined;
          }
          const err = errorFromResponse(res.status, res.headers, parsed, text);
          if (res.status === 429 || res.status >= 500) {
            lastProblem = err.message;
            failures++;
            continue;
          }
          throw err;
        }
        const type = res.headers.get('content-type') ?? '';
        if (!type.includes('text/event-stream') || res.body === null) {
          await res.body?.cancel();
          throw new MiosaError(`the events endpoint did not answer an event stream (content-type ${type || 'none'})`, {
            status: res.status,
            code: 'not_an_event_stream',
            requestId: res.headers.get('x-request-id') ?? undefined,
          });
        }
        for await (const raw of readEventStream(res.body, resetIdle)) {
          let data: SnapshotEventData;
          try {
            data = JSON.parse(raw.data) as SnapshotEventData;
          } catch {
            continue; // not ours: the snapshot stream's data is always JSON
          }
          if (raw.id !== null) lastEventId = raw.id;
          received++;
          failures = 0;
          const event = (raw.event === 'message' ? `snapshot_${data.status}` : raw.event) as SnapshotEventType;
          yield { event, id: raw.id, data };
          if (FINAL.has(data.status) || event === 'snapshot_ready' || event === 'snapshot_failed' || event === 'snapshot_deleted') {
            return;
          }
        }
        lastProblem = 'the stream closed before a final event';
        // Closed at once with nothing to say: resume from the current state rather than the log.
        if (received === 0) lastEventId = null;
        failures++;
      } catch (e) {
        if (opts.signal?.aborted) throw opts.signal.reason ?? e;
        if (e instanceof MiosaError && !(e instanceof ConnectionError)) throw e;
        lastProblem =
          conn.signal.aborted && conn.signal.reason instanceof ConnectionError
            ? conn.signal.reason.message
            : describe(e);
        failures++;
      } finally {
        clearTimeout(idle);
        conn.abort();
      }
    }
  }

  /**
   * Waits until the snapshot is ready and resolves with it. Follows the event stream (calling
   * `onProgress` with each event) and falls back to polling `get` if events are unavailable.
   * Rejects with `SnapshotFailedError` if the snapshot fails or is deleted, with `TimeoutError`
   * after `timeoutMs`. A `restoring` snapshot counts as ready (it is, and a restore is reading it).
   */
  async wait(computerId: string, snapshotId: string, opts: WaitOptions = {}): Promise<Snapshot> {
    const timeoutMs = opts.timeoutMs ?? 300_000;
    const ctl = new AbortController();
    const signal = opts.signal ? AbortSignal.any([opts.signal, ctl.signal]) : ctl.signal;
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timeout = new Promise<never>((_, reject) => {
      if (!Number.isFinite(timeoutMs)) return;
      timer = setTimeout(() => {
        reject(
          new TimeoutError(`snapshot ${snapshotId} was not ready after ${timeoutMs} ms`, { code: 'wait_timeout' }),
        );
        ctl.abort();
      }, Math.max(0, timeoutMs));
    });
    const work = this.follow(computerId, snapshotId, signal, opts);
    work.catch(() => {}); // when the timeout wins, the abandoned work's rejection is expected
    try {
      return await Promise.race([work, timeout]);
    } finally {
      clearTimeout(timer);
      ctl.abort();
    }
  }

  private async follow(computerId: string, snapshotId: string, signal: AbortSignal, opts: WaitOptions): Promise<Snapshot> {
    try {
      for await (const ev of this.events(computerId, snapshotId, { signal })) {
        opts.onProgress?.(ev);
        const status = ev.data.status;
        if (USABLE.has(status)) return await this.get(computerId, snapshotId, { signal });
        if (status === 'failed' || status === 'deleted') {
          throw await this.failure(computerId, snapshotId, status, ev.data.error ?? null, signal);
        }
      }
    } catch (e) {
      if (signal.aborted || !eventsUnavailable(e)) throw e;
    }
    return this.poll(computerId, snapshotId, signal, opts);
  }

  private async poll(computerId: string, snapshotId: string, signal: AbortSignal, opts: WaitOptions): Promise<Snapshot> {
    let seen: SnapshotStatus | undefined;
    for (;;) {
      const s = await this.get(computerId, snapshotId, { signal });
      if (s.status !== seen) {
        seen = s.status;
        const data: SnapshotEventData = { snapshot_id: s.id, status: s.status };
        if (s.error) data.error = s.error;
        if (USABLE.has(s.status)) data.progress = 1;
        opts.onProgress?.({ event: `snapshot_${s.status}` as SnapshotEventType, id: null, data });
      }
      if (USABLE.has(s.status)) return s;
      if (s.status === 'failed' || s.status === 'deleted') {
        throw new SnapshotFailedError(snapshotId, s, s.error, s.status);
      }
      await sleep(opts.pollIntervalMs ?? 1_000, signal);
    }
  }

  private async failure(
    computerId: string,
    snapshotId: string,
    status: SnapshotStatus,
    error: string | null,
    signal: AbortSignal,
  ): Promise<SnapshotFailedError> {
    let snapshot: Snapshot | undefined;
    try {
      snapshot = await this.get(computerId, snapshotId, { signal });
    } catch {
      snapshot = undefined; // a deleted snapshot is not found any more
    }
    return new SnapshotFailedError(snapshotId, snapshot, snapshot?.error ?? error, status);
  }
}

/** Whether `e` means "no usable event stream" (so polling may do), not "no such snapshot". */
function eventsUnavailable(e: unknown): boolean {
  if (!(e instanceof MiosaError)) return false;
  if (e instanceof SnapshotFailedError || e instanceof PermissionDeniedError || e instanceof ValidationError) {
    return false;
  }
  if (e instanceof NotFoundError) {
    // Upper-case since the platform took the official SDK's codes; lower-case before.
    const code = e.code?.toUpperCase();
    return code !== 'COMPUTER_NOT_FOUND' && code !== 'SNAPSHOT_NOT_FOUND';
  }
  return true;
}

function describe(e: unknown): string {
  if (e instanceof Error) {
    const cause = (e as { cause?: { code?: unknown; message?: unknown } }).cause;
    if (cause && typeof cause.message === 'string') return `${e.message}: ${cause.message}`;
    return e.message;
  }
  return String(e);
}
