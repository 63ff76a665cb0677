export { Miosa, type MiosaOptions } from './client.js';
export { Computers, type ExecOptions, type WaitUntilRunningOptions, type CloneOptions } from './computers.js';
export { Snapshots, type SnapshotEventsOptions, type WaitOptions, type RestoreOptions } from './snapshots.js';
export {
  MiosaError,
  MissingApiKeyError,
  AuthenticationError,
  PermissionDeniedError,
  NotFoundError,
  ConflictError,
  ValidationError,
  RateLimitError,
  ServerError,
  ConnectionError,
  TimeoutError,
  SnapshotFailedError,
  ComputerFailedError,
  type MiosaErrorInit,
} from './errors.js';
export { normalizeBaseUrl, DEFAULT_BASE_URL, SDK_VERSION } from './http.js';
export { SseParser, type RawSseEvent } from './sse.js';
export { SpawnedProcess, type OutputChunk, type SpawnOptions, type WebSocketConstructor } from './process.js';
export type * from './types.js';
