/**
 * The JSON shapes the server sends, field for field (see `crates/stasis-types/src/lib.rs`).
 * Timestamps are RFC 3339 strings; ids are UUID strings; sizes in bytes are numbers.
 */

/** Machine sizes: xs 1 vCPU/256 MiB, small 1/512 MiB, medium 2/1 GiB, large 2/2 GiB, xl 4/4 GiB. */
export type ComputerSize = 'xs' | 'small' | 'medium' | 'large' | 'xl';

export type ComputerStatus =
  | 'creating'
  | 'provisioning'
  | 'starting'
  | 'running'
  | 'paused'
  | 'stopping'
  | 'stopped'
  | 'error'
  | 'destroying'
  | 'destroyed';

/** A computer (a Linux VM), as the API returns it. */
export interface Computer {
  id: string;
  name: string;
  slug: string;
  status: ComputerStatus;
  template_type: string;
  size: ComputerSize;
  ip_address: string | null;
  tenant_id: string;
  created_at: string;
  updated_at: string;
  metadata: Record<string, unknown>;
  /** Why the computer is in `error` (or was stopped by the platform); null otherwise. */
  error: string | null;
  /** The snapshot this computer was restored from, if any. */
  source_snapshot_id: string | null;
  /** Whether it has a network (created with `network: false`, it has none). */
  network: boolean;
  /** What its preview URLs end in: port P is `http://P-{slug}.sandbox.{preview_domain}/`. */
  preview_domain?: string;
  /** Its preview URL without a port (the lowest port it exposes). */
  sandbox_url?: string;
}

/** `GET /computers`. */
export interface ComputerList {
  total: number;
  computers: Computer[];
}

export interface CreateComputerParams {
  name: string;
  size?: ComputerSize;
  /** `debian-bookworm` (aliases `default`, `debian`, `miosa-desktop`). */
  template_type?: string;
  metadata?: Record<string, unknown>;
  /** `false`: no network at all (default: outbound access under the egress policy). */
  network?: boolean;
  /** Environment variables every exec in the computer sees. */
  env?: Record<string, string>;
}

/** `computers.update`: what changes (absent fields stay). The slug, and so preview URLs, stay. */
export interface UpdateComputerParams {
  name?: string;
  /** Replaces the metadata whole. */
  metadata?: Record<string, unknown>;
}

/** One entry of a directory in a computer. */
export interface FileInfo {
  name: string;
  path: string;
  size: number;
  is_dir: boolean;
  modified_at: string | null;
}

/** What a path in a computer is (`lstat`: a symlink is described, not followed). */
export interface FileStat {
  path: string;
  size: number;
  /** The whole `st_mode` (type and permission bits). */
  mode: number;
  is_dir: boolean;
  is_symlink: boolean;
  symlink_target: string | null;
  modified_at: string | null;
}

/** One environment variable of a computer's. */
export interface EnvVar {
  name: string;
  value: string;
  created_at: string;
  updated_at: string;
}

/** Answer of start / stop / restart / delete. */
export interface ActionResult {
  success: boolean;
  status: string;
  message: string;
}

/** Answer of `exec` and `execPython`. */
export interface ExecResult {
  exit_code: number;
  output: string;
  stderr: string;
  success: boolean;
  /** The command was killed by its timeout (exit code 124). */
  timed_out: boolean;
  /** Output beyond the agent's cap was dropped. */
  truncated: boolean;
  duration_ms: number;
}

/**
 * `creating → uploading → ready`, `ready ⇄ restoring` while restores read it (a `restoring`
 * snapshot is usable), `ready → deleted`, any → `failed`.
 */
export type SnapshotStatus = 'creating' | 'uploading' | 'ready' | 'restoring' | 'failed' | 'deleted';

/** A snapshot of a running computer: device state, RAM and root disk. */
export interface Snapshot {
  id: string;
  computer_id: string;
  tenant_id: string;
  comment: string | null;
  status: SnapshotStatus;
  /** Raw size of the VM device state (null until ready). */
  state_size_bytes: number | null;
  /** Raw size of the guest RAM captured. */
  memory_size_bytes: number | null;
  /** Raw (virtual) size of the root disk captured. */
  rootfs_size_bytes: number | null;
  /** What the snapshot occupies in the store, compressed. */
  compressed_size_bytes: number | null;
  /** What this snapshot added to the store. */
  uploaded_bytes: number | null;
  /** How long the guest was paused for the capture. */
  pause_ms: number | null;
  s3_bucket: string | null;
  s3_prefix: string | null;
  parent_snapshot_id: string | null;
  error: string | null;
  created_at: string;
  updated_at: string;
}

/** `GET /computers/{id}/snapshots`, as sent. */
export interface SnapshotPage {
  data: Snapshot[];
  total: number;
}

export interface CreateSnapshotParams {
  /** Human-readable label, at most 500 characters. */
  comment?: string;
  /** Sent as `Idempotency-Key`; one is generated when absent, so retries never double-create. */
  idempotencyKey?: string;
}

/**
 * Answer of a snapshot delete (a soft delete): `{ id, status: 'deleted' }` as the API document
 * promises; stasis sends the rest of the snapshot too.
 */
export type DeletedSnapshot = Partial<Omit<Snapshot, 'id' | 'status'>> & { id: string; status: 'deleted' };

/**
 * Answer of a restore: the new computer (status `provisioning`; it runs in about a second),
 * with the snapshot part of the answer under `snapshot`.
 */
export type RestoredComputer = Computer & {
  snapshot: { id: string; status: SnapshotStatus };
};

export type SnapshotEventType =
  | 'snapshot_creating'
  | 'snapshot_uploading'
  | 'snapshot_ready'
  | 'snapshot_restoring'
  | 'snapshot_failed'
  | 'snapshot_deleted';

/** The `data` of a snapshot SSE event. Absent fields are omitted, never null. */
export interface SnapshotEventData {
  snapshot_id: string;
  status: SnapshotStatus;
  step?: string;
  /** 0..1 */
  progress?: number;
  error?: string;
  /** For restores: the computer being restored. */
  computer_id?: string;
  bytes_done?: number;
  bytes_total?: number;
}

/** One parsed event of a snapshot's progress stream. */
export interface SnapshotEvent {
  /** The SSE `event:` field. */
  event: SnapshotEventType;
  /** The SSE `id:` field (a sequence number), or null if the event had none. */
  id: string | null;
  data: SnapshotEventData;
}

/** Answer of `POST /sse/ticket`. */
export interface SseTicket {
  ticket: string;
  expires_at: string;
}

/** Who may reach an exposed port: the key or a signed link (`private`), or anyone (`public`). */
export type PortVisibility = 'private' | 'public';

/** A port of a computer its owner exposed, and where it is served. */
export interface Port {
  port: number;
  visibility: PortVisibility;
  public: boolean;
  name: string | null;
  protocol: string;
  /** `{scheme}://{port}-{slug}.sandbox.{preview_domain}/` */
  url: string;
  /** The same port under the API, for requests with the key. */
  path_url: string;
  signed_url: string | null;
  signed_url_expires_at: string | null;
  created_at: string;
  updated_at: string;
}

export interface ExposePortParams {
  visibility?: PortVisibility;
  public?: boolean;
  name?: string;
}

export interface PreviewUrl {
  port: number;
  url: string;
  visibility: PortVisibility;
  name: string | null;
  signed_url: string | null;
}

export interface NetworkPolicyRule {
  effect: 'allow' | 'deny';
  /** An IPv4 address or network. */
  destination: string;
  /** `443`, `80,443`, `8000-8100` (default every port). */
  ports?: string;
  protocol?: 'tcp' | 'udp' | 'any';
}

export interface NetworkPolicy {
  computer_id: string;
  tenant_id: string;
  rules: NetworkPolicyRule[];
  default_effect: 'allow' | 'deny';
  inserted_at: string | null;
  updated_at: string | null;
}

/** One line of a computer's console. */
export interface LogLine {
  /** Where it starts: pass as `since` for what comes after. */
  cursor: number;
  text: string;
}

/** A page of a computer's console (`GET /computers/{id}/logs`). */
export interface LogPage {
  computer_id: string;
  source: string;
  lines: LogLine[];
  /** Where the page ends: `since` this for what comes next. */
  cursor: number;
  /** The oldest position still kept. */
  first_cursor: number;
  truncated: boolean;
}
