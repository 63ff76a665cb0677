/**
 * The transport: URLs, auth, JSON, timeouts, error mapping and retries. Uses the global `fetch`
 * (Node 20+), no dependencies.
 */

import {
  ConnectionError,
  MiosaError,
  TimeoutError,
  errorFromResponse,
} from './errors.js';

export const DEFAULT_BASE_URL = 'http://127.0.0.1:8080/api/v1';
export const SDK_VERSION = '0.1.0';

/**
 * Normalises a base URL as the official Python SDK does: surrounding space and trailing `/`
 * go, and `/api/v1` is appended unless the last path segment already names a version (`v1`,
 * `v2`, ...). So `http://host:8080` and `http://host:8080/api/v1/` both give
 * `http://host:8080/api/v1`.
 */
export function normalizeBaseUrl(raw: string): string {
  const trimmed = raw.trim().replace(/\/+$/, '');
  return /\/v\d+$/.test(trimmed) ? trimmed : `${trimmed}/api/v1`;
}

export interface RequestOptions {
  body?: unknown;
  query?: Record<string, string | number | undefined>;
  headers?: Record<string, string>;
  /** Whether the call may be repeated after a 429, 503 or connection failure. */
  retry?: boolean;
  /** Overrides the client's per-request timeout. */
  timeoutMs?: number;
  signal?: AbortSignal | undefined;
}

export interface TransportOptions {
  apiKey: string;
  baseUrl: string;
  timeoutMs: number;
  maxRetries: number;
}

const sleep = (ms: number, signal?: AbortSignal): Promise<void> =>
  new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason);
    const t = setTimeout(done, ms);
    function done() {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }
    function onAbort() {
      clearTimeout(t);
      reject(signal!.reason);
    }
    signal?.addEventListener('abort', onAbort, { once: true });
  });

export { sleep };

/** Whether `e` is the rejection of an aborted signal (the caller's, not ours). */
export function isAbort(e: unknown, signal?: AbortSignal): boolean {
  if (signal?.aborted) return true;
  return e instanceof Error && e.name === 'AbortError';
}

/** Describes a network failure from `fetch` ("fetch failed", with the real cause inside). */
function describeNetworkError(e: unknown): string {
  const cause = (e as { cause?: unknown })?.cause;
  const parts: string[] = [];
  if (cause && typeof cause === 'object') {
    const c = cause as { code?: unknown; message?: unknown };
    if (typeof c.code === 'string') parts.push(c.code);
    if (typeof c.message === 'string') parts.push(c.message);
  }
  if (parts.length === 0 && e instanceof Error) parts.push(e.message);
  return parts.join(': ');
}

export class Transport {
  readonly baseUrl: string;
  readonly timeoutMs: number;
  readonly maxRetries: number;
  private readonly apiKey: string;

  constructor(opts: TransportOptions) {
    this.apiKey = opts.apiKey;
    this.baseUrl = normalizeBaseUrl(opts.baseUrl);
    this.timeoutMs = opts.timeoutMs;
    this.maxRetries = opts.maxRetries;
  }

  url(path: string, query?: Record<string, string | number | undefined>): string {
    let u = this.baseUrl + (path.startsWith('/') ? path : `/${path}`);
    if (query) {
      const q = new URLSearchParams();
      for (const [k, v] of Object.entries(query)) if (v !== undefined) q.set(k, String(v));
      const s = q.toString();
      if (s) u += `?${s}`;
    }
    return u;
  }

  headers(extra?: Record<string, string>): Record<string, string> {
    return {
      Authorization: `Bearer ${this.apiKey}`,
      Accept: 'application/json',
      'User-Agent': `stasis-sdk-typescript/${SDK_VERSION} node/${typeof process !== 'undefined' ? process.version : '?'}`,
      ...extra,
    };
  }

  /** The delay before retry number `attempt` (0-based): exponential with jitter, or `Retry-After`. */
  backoffMs(attempt: number, retryAfterSeconds?: number): number {
    if (retryAfterSeconds !== undefined) return Math.min(retryAfterSeconds * 1000, 60_000);
    const base = Math.min(500 * 2 ** attempt, 8_000);
    return base / 2 + Math.random() * (base / 2);
  }

  /** Sends a JSON request; resolves with the parsed body of a 2xx answer, throws a typed error otherwise. */
  async request<T>(method: string, path: string, opts: RequestOptions = {}): Promise<T> {
    const retries = opts.retry ? this.maxRetries : 0;
    for (let attempt = 0; ; attempt++) {
      try {
        return await this.once<T>(method, path, opts);
      } catch (e) {
        if (attempt >= retries || !(e instanceof MiosaError)) throw e;
        const retryable = e instanceof ConnectionError || e.status === 429 || e.status === 503;
        if (!retryable) throw e;
        await sleep(this.backoffMs(attempt, e.retryAfterSeconds), opts.signal);
      }
    }
  }

  private async once<T>(method: string, path: string, opts: RequestOptions): Promise<T> {
    const timeoutMs = opts.timeoutMs ?? this.timeoutMs;
    const timer = new AbortController();
    const t = setTimeout(() => timer.abort(), timeoutMs);
    const signal = opts.signal ? AbortSignal.any([opts.signal, timer.signal]) : timer.signal;
    const headers = this.headers(opts.headers);
    let body: string | undefined;
    if (opts.body !== undefined) {
      headers['Content-Type'] = 'application/json';
      body = JSON.stringify(opts.body);
    }
    const url = this.url(path, opts.query);
    try {
      let res: Response;
      try {
        res = await fetch(url, { method, headers, body, signal });
      } catch (e) {
        throw this.failure(e, method, url, timeoutMs, opts.signal, timer.signal);
      }
      let text: string;
      try {
        text = await res.text();
      } catch (e) {
        throw this.failure(e, method, url, timeoutMs, opts.signal, timer.signal);
      }
      let parsed: unknown = undefined;
      if (text !== '') {
        try {
          parsed = JSON.parse(text);
        } catch {
          if (res.ok) {
            throw new MiosaError(`${method} ${url}: the answer is not JSON`, {
              status: res.status,
              requestId: res.headers.get('x-request-id') ?? undefined,
            });
          }
        }
      }
      if (!res.ok) {
        throw errorFromResponse(res.status, res.headers, parsed, text);
      }
      return parsed as T;
    } finally {
      clearTimeout(t);
    }
  }

  /**
   * Sends a request with a body of its own (bytes, a form) and resolves with the raw answer of
   * a 2xx (to read as bytes or a stream); throws a typed error otherwise. Not retried.
   */
  async raw(
    method: string,
    path: string,
    opts: { query?: Record<string, string | number | undefined>; body?: FormData | Blob | Uint8Array | string; timeoutMs?: number; signal?: AbortSignal } = {},
  ): Promise<Response> {
    const timeoutMs = opts.timeoutMs ?? this.timeoutMs;
    const timer = new AbortController();
    const t = setTimeout(() => timer.abort(), timeoutMs);
    const signal = opts.signal ? AbortSignal.any([opts.signal, timer.signal]) : timer.signal;
    const url = this.url(path, opts.query);
    let res: Response;
    try {
      res = await fetch(url, { method, headers: this.headers(), body: opts.body, signal, duplex: 'half' } as RequestInit);
    } catch (e) {
      throw this.failure(e, method, url, timeoutMs, opts.signal, timer.signal);
    } finally {
      // The timeout is for the answer's head; its body is the caller's to read (or abort).
      clearTimeout(t);
    }
    if (!res.ok) {
      const text = await res.text().catch(() => '');
      let parsed: unknown = undefined;
      try {
        parsed = JSON.parse(text);
      } catch {
        // not JSON: the status says it
      }
      throw errorFromResponse(res.status, res.headers, parsed, text);
    }
    return res;
  }

  /** Maps a `fetch` failure to a typed error, or passes the caller's own abort through. */
  failure(
    e: unknown,
    method: string,
    url: string,
    timeoutMs: number,
    callerSignal: AbortSignal | undefined,
    timerSignal: AbortSignal,
  ): unknown {
    if (callerSignal?.aborted) return callerSignal.reason ?? e;
    if (timerSignal.aborted) {
      return new TimeoutError(`${method} ${url} timed out after ${timeoutMs} ms`, { cause: e });
    }
    if (e instanceof MiosaError) return e;
    return new ConnectionError(`cannot reach ${url}: ${describeNetworkError(e)}`, { cause: e });
  }
}
