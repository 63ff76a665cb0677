/**
 * Typed errors. Every error the SDK throws (apart from an `AbortError` when the caller's own
 * `AbortSignal` fires) is a {@link MiosaError}; HTTP failures are mapped by status to a
 * subclass, so callers can `catch (e) { if (e instanceof NotFoundError) ... }`.
 */

import type { Computer, Snapshot } from './types.js';

export interface MiosaErrorInit {
  /** HTTP status, when the error is an answer from the server. */
  status?: number | undefined;
  /** The server's stable error code (`computer_not_found`, `snapshot_not_ready`, ...). */
  code?: string | undefined;
  /** The request id: `error.request_id` of the body, or the `x-request-id` header. */
  requestId?: string | undefined;
  /** On a validation error: the field the server names. */
  field?: string | undefined;
  /** The parsed error body, as sent. */
  body?: unknown;
  /** Seconds the server asked us to wait (`Retry-After`), if it said. */
  retryAfterSeconds?: number | undefined;
  /** The error that caused this one (a network failure, ...). */
  cause?: unknown;
}

/** Base class of every SDK error. `message` is the server's message when there is one. */
export class MiosaError extends Error {
  readonly status: number | undefined;
  readonly code: string | undefined;
  readonly requestId: string | undefined;
  readonly field: string | undefined;
  readonly body: unknown;
  /** Seconds the server asked us to wait before trying again (`Retry-After`), if it said. */
  readonly retryAfterSeconds: number | undefined;

  constructor(message: string, init: MiosaErrorInit = {}) {
    super(message, init.cause === undefined ? undefined : { cause: init.cause });
    this.name = new.target.name;
    this.status = init.status;
    this.code = init.code;
    this.requestId = init.requestId;
    this.field = init.field;
    this.body = init.body;
    this.retryAfterSeconds = init.retryAfterSeconds;
  }
}

/** No API key was given and `MIOSA_API_KEY` is not set. */
export class MissingApiKeyError extends MiosaError {
  constructor() {
    super('no API key: pass { apiKey } to new Miosa() or set the MIOSA_API_KEY environment variable', {
      code: 'missing_api_key',
    });
  }
}

/** 401: the API key is missing or not valid. */
export class AuthenticationError extends MiosaError {}
/** 403: the resource belongs to another tenant. */
export class PermissionDeniedError extends MiosaError {}
/** 404: no such computer, snapshot or route. */
export class NotFoundError extends MiosaError {}
/** 409: the resource is not in a state that allows the call (`computer is not running`, ...). */
export class ConflictError extends MiosaError {}
/** 400 or 422: the request was malformed or a field was out of range; see `field`. */
export class ValidationError extends MiosaError {}
/** 429: too many requests (retried automatically where safe, honouring `Retry-After`). */
export class RateLimitError extends MiosaError {}
/** 5xx: the server failed. */
export class ServerError extends MiosaError {}
/** The server could not be reached (refused, reset, DNS, ...). */
export class ConnectionError extends MiosaError {}
/** A request, or a wait (`snapshots.wait`, `computers.waitUntilRunning`), took too long. */
export class TimeoutError extends MiosaError {}

/** `snapshots.wait` saw the snapshot fail (or get deleted) instead of becoming ready. */
export class SnapshotFailedError extends MiosaError {
  /** The snapshot as last seen (status `failed` or `deleted`), when it could be read. */
  readonly snapshot: Snapshot | undefined;
  /** The snapshot's `error`, as the server reported it. */
  readonly snapshotError: string | null;

  constructor(snapshotId: string, snapshot: Snapshot | undefined, snapshotError: string | null, status = 'failed') {
    super(
      status === 'deleted'
        ? `snapshot ${snapshotId} was deleted before it became ready`
        : `snapshot ${snapshotId} failed: ${snapshotError ?? 'no reason given'}`,
      { code: status === 'deleted' ? 'snapshot_deleted' : 'snapshot_failed' },
    );
    this.snapshot = snapshot;
    this.snapshotError = snapshotError;
  }
}

/** `computers.waitUntilRunning` saw the computer end in `error`, `stopped` or `destroyed`. */
export class ComputerFailedError extends MiosaError {
  readonly computer: Computer;
  constructor(computer: Computer) {
    super(
      `computer ${computer.id} is ${computer.status}` + (computer.error ? `: ${computer.error}` : ''),
      { code: `computer_${computer.status}` },
    );
    this.computer = computer;
  }
}

/** Reads `Retry-After` (seconds or an HTTP date) as seconds; undefined when absent or unreadable. */
export function parseRetryAfter(value: string | null | undefined, now = Date.now()): number | undefined {
  if (value == null || value.trim() === '') return undefined;
  const v = value.trim();
  if (/^\d+(\.\d+)?$/.test(v)) return Number(v);
  const at = Date.parse(v);
  if (Number.isNaN(at)) return undefined;
  return Math.max(0, (at - now) / 1000);
}

/** Builds the typed error for a non-2xx answer. */
export function errorFromResponse(status: number, headers: Headers, body: unknown, rawText: string): MiosaError {
  let code: string | undefined;
  let message: string | undefined;
  let requestId: string | undefined;
  let field: string | undefined;
  if (body && typeof body === 'object') {
    const err = (body as { error?: unknown }).error;
    if (err && typeof err === 'object') {
      const e = err as Record<string, unknown>;
      if (typeof e.code === 'string') code = e.code;
      if (typeof e.message === 'string') message = e.message;
      if (typeof e.request_id === 'string' && e.request_id !== '') requestId = e.request_id;
      if (typeof e.field === 'string') field = e.field;
    } else if (typeof err === 'string') {
      message = err;
    } else if (typeof (body as { message?: unknown }).message === 'string') {
      message = (body as { message: string }).message;
    }
  }
  requestId ??= headers.get('x-request-id') ?? undefined;
  message ??= rawText.trim() !== '' && rawText.length <= 500 ? rawText.trim() : `HTTP ${status}`;
  const retryAfterSeconds = parseRetryAfter(headers.get('retry-after'));
  const init: MiosaErrorInit = { status, code, requestId, field, body, retryAfterSeconds };
  switch (true) {
    case status === 400 || status === 422:
      return new ValidationError(message, init);
    case status === 401:
      return new AuthenticationError(message, init);
    case status === 403:
      return new PermissionDeniedError(message, init);
    case status === 404:
      return new NotFoundError(message, init);
    case status === 409:
      return new ConflictError(message, init);
    case status === 429:
      return new RateLimitError(message, init);
    case status >= 500:
      return new ServerError(message, init);
    default:
      return new MiosaError(message, init);
  }
}
