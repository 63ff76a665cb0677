import { Computers } from './computers.js';
import { MissingApiKeyError } from './errors.js';
import { DEFAULT_BASE_URL, Transport } from './http.js';
import { Snapshots } from './snapshots.js';
import type { SseTicket } from './types.js';

export interface MiosaOptions {
  /** The API key (default: the `MIOSA_API_KEY` environment variable). */
  apiKey?: string;
  /**
   * The API's base URL (default: `MIOSA_BASE_URL`, else `http://127.0.0.1:8080/api/v1`).
   * `/api/v1` is appended unless the URL already ends in a version segment such as `/v1`.
   */
  baseUrl?: string;
  /** Per-request timeout (default 60 000 ms; `exec` allows for its command's own timeout). */
  timeoutMs?: number;
  /** Retries of a safe call after a 429, a 503 or a connection failure (default 2). */
  maxRetries?: number;
}

function env(name: string): string | undefined {
  if (typeof process === 'undefined' || !process.env) return undefined;
  const v = process.env[name];
  return v === undefined || v.trim() === '' ? undefined : v.trim();
}

/**
 * The client:
 *
 * ```ts
 * import { Miosa } from '@stasis/sdk';
 * const client = new Miosa(); // MIOSA_API_KEY, MIOSA_BASE_URL
 * const snap = await client.snapshots.create(computerId, { comment: 'before-deploy-v2' });
 * ```
 */
export class Miosa {
  readonly computers: Computers;
  readonly snapshots: Snapshots;
  /** The normalised base URL every path is relative to. */
  readonly baseUrl: string;
  private readonly http: Transport;

  constructor(options: MiosaOptions = {}) {
    const apiKey = options.apiKey ?? env('MIOSA_API_KEY');
    if (!apiKey) throw new MissingApiKeyError();
    this.http = new Transport({
      apiKey,
      baseUrl: options.baseUrl ?? env('MIOSA_BASE_URL') ?? DEFAULT_BASE_URL,
      timeoutMs: options.timeoutMs ?? 60_000,
      maxRetries: Math.max(0, options.maxRetries ?? 2),
    });
    this.baseUrl = this.http.baseUrl;
    this.computers = new Computers(this.http);
    this.snapshots = new Snapshots(this.http);
  }

  /** `GET /health`: resolves when the server answers. */
  health(opts: { signal?: AbortSignal } = {}): Promise<unknown> {
    return this.http.request('GET', '/health', { retry: true, signal: opts.signal });
  }

  /** A one-use SSE ticket (`POST /sse/ticket`), for an `EventSource` that cannot send headers. */
  sseTicket(opts: { signal?: AbortSignal } = {}): Promise<SseTicket> {
    return this.snapshots.ticket(opts);
  }

  toString(): string {
    return `Miosa(${this.baseUrl})`;
  }
}
