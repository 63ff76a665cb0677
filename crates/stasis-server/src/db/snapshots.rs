//! Snapshot rows, their event log, SSE tickets and idempotency records; what the store's
//! objects are checked against (tenant, sealed, manifest hash), and tenants' chunk salts.

use chrono::{DateTime, SecondsFormat, Utc};
use sqlx::any::AnyRow;
use sqlx::Row;
use stasis_store::{ManifestHash, Recorded};
use stasis_types::{ComputerId, HostId, Size, Snapshot, SnapshotId, SnapshotStatus, TenantId};

use super::{now, parse_time, Db};

/// A snapshot row: the API object plus what the platform keeps for itself.
#[derive(Debug, Clone)]
pub struct SnapshotRecord {
    pub snapshot: Snapshot,
    /// How many restores are reading it right now.
    pub restores_active: i64,
    /// The source computer's size and name at capture (what a restore recreates).
    pub size: Size,
    pub computer_name: String,
    /// The description of the machine it was taken on, once it is ready (the copy in its
    /// manifest is the one a restore starts from; this one lets a restore be refused at once).
    pub description: Option<serde_json::Value>,
}

const SELECT_SNAPSHOT: &str =
    "SELECT id, computer_id, tenant_id, comment, status, state_size_bytes, memory_size_bytes, \
     rootfs_size_bytes, compressed_size_bytes, uploaded_bytes, pause_ms, s3_bucket, s3_prefix, parent_snapshot_id, \
     error, restores_active, machine, created_at, updated_at, expires_at, \
     (SELECT n.name FROM named_snapshots n WHERE n.snapshot_id = snapshots.id) AS pinned_name FROM snapshots";

/// The same columns, of `snapshots s` (for queries that join other tables).
pub(super) const SNAPSHOT_COLUMNS_S: &str =
    "s.id, s.computer_id, s.tenant_id, s.comment, s.status, s.state_size_bytes, s.memory_size_bytes, \
     s.rootfs_size_bytes, s.compressed_size_bytes, s.uploaded_bytes, s.pause_ms, s.s3_bucket, s.s3_prefix, \
     s.parent_snapshot_id, s.error, s.restores_active, s.machine, s.created_at, s.updated_at, s.expires_at, \
     (SELECT n.name FROM named_snapshots n WHERE n.snapshot_id = s.id) AS pinned_name";

fn opt_u64(row: &AnyRow, col: &str) -> Option<u64> {
    row.try_get::<Option<i64>, _>(col)
        .ok()
        .flatten()
        .map(|v| v.max(0) as u64)
}

fn opt_text(row: &AnyRow, col: &str) -> Option<String> {
    row.try_get::<Option<String>, _>(col).ok().flatten()
}

pub(super) fn record_from_row(row: &AnyRow) -> Option<SnapshotRecord> {
    let text = |c: &str| row.try_get::<String, _>(c).ok();
    let machine: serde_json::Value = opt_text(row, "machine")
        .and_then(|m| serde_json::from_str(&m).ok())
        .unwrap_or_default();
    Some(SnapshotRecord {
        snapshot: Snapshot {
            id: text("id")?.parse().ok()?,
            computer_id: text("computer_id")?.parse().ok()?,
            tenant_id: text("tenant_id")?.parse().ok()?,
            comment: opt_text(row, "comment"),
            status: SnapshotStatus::parse(&text("status")?)?,
            state_size_bytes: opt_u64(row, "state_size_bytes"),
            memory_size_bytes: opt_u64(row, "memory_size_bytes"),
            rootfs_size_bytes: opt_u64(row, "rootfs_size_bytes"),
            compressed_size_bytes: opt_u64(row, "compressed_size_bytes"),
            uploaded_bytes: opt_u64(row, "uploaded_bytes"),
            pause_ms: opt_u64(row, "pause_ms"),
            s3_bucket: opt_text(row, "s3_bucket"),
            s3_prefix: opt_text(row, "s3_prefix"),
            parent_snapshot_id: opt_text(row, "parent_snapshot_id").and_then(|s| s.parse().ok()),
            error: opt_text(row, "error"),
            created_at: parse_time(&text("created_at")?),
            updated_at: parse_time(&text("updated_at")?),
            expires_at: opt_text(row, "expires_at").map(|t| parse_time(&t)),
            name: opt_text(row, "pinned_name"),
        },
        restores_active: row.try_get::<i64, _>("restores_active").unwrap_or(0),
        size: machine
            .get("size")
            .and_then(|s| s.as_str())
            .and_then(Size::parse)
            .unwrap_or(Size::Small),
        computer_name: machine
            .get("name")
            .and_then(|s| s.as_str())
            .unwrap_or("computer")
            .to_string(),
        description: machine.get("description").cloned(),
    })
}

const SELECT_RECORDED: &str = "SELECT id, tenant_id, sealed, manifest_blake3 FROM snapshots";

fn recorded_from_row(row: &AnyRow) -> Result<Recorded, sqlx::Error> {
    let hash = opt_text(row, "manifest_blake3");
    let manifest_hash =
        match hash {
            None => None,
            // A hash that does not parse must not read as "none recorded" (that would accept
            // any manifest): the read fails instead.
            Some(h) => Some(ManifestHash::from_hex(&h).ok_or_else(|| {
                sqlx::Error::Decode(format!("snapshot manifest hash {h:?} is not 64 hex digits").into())
            })?),
        };
    let id = |col: &str| -> Result<String, sqlx::Error> { row.try_get(col) };
    let decode = |col: &str, e: uuid::Error| sqlx::Error::ColumnDecode {
        index: col.into(),
        source: Box::new(e),
    };
    Ok(Recorded {
        snapshot_id: id("id")?.parse().map_err(|e| decode("id", e))?,
        tenant_id: id("tenant_id")?.parse().map_err(|e| decode("tenant_id", e))?,
        sealed: row.try_get::<i64, _>("sealed")? != 0,
        manifest_hash,
    })
}

pub(super) fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Outcome of claiming an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Idempotency {
    /// First time: do the work, then record the answer.
    Proceed,
    /// Seen before with this request: here is the first answer.
    Replay { status: u16, body: String },
    /// Seen before and still being worked on.
    InProgress,
    /// Seen before with a different request.
    Mismatch,
}

impl Db {
    pub async fn insert_snapshot(&self, s: &Snapshot, size: Size, computer_name: &str) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO snapshots (id, computer_id, tenant_id, comment, status, parent_snapshot_id, machine, \
             created_at, updated_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(s.id.to_string())
        .bind(s.computer_id.to_string())
        .bind(s.tenant_id.to_string())
        .bind(s.comment.clone())
        .bind(s.status.as_str())
        .bind(s.parent_snapshot_id.map(|p| p.to_string()))
        .bind(serde_json::json!({"size": size.as_str(), "name": computer_name}).to_string())
        .bind(ts(s.created_at))
        .bind(ts(s.updated_at))
        .bind(s.expires_at.map(ts))
        .execute(self.pool())
        .await?;
        Ok(())
    }

    pub async fn get_snapshot(&self, id: SnapshotId) -> Result<Option<SnapshotRecord>, sqlx::Error> {
        let row = sqlx::query(&format!("{SELECT_SNAPSHOT} WHERE id = $1"))
            .bind(id.to_string())
            .fetch_optional(self.pool())
            .await?;
        Ok(row.as_ref().and_then(record_from_row))
    }

    /// A computer's snapshots, oldest first, without the deleted ones.
    pub async fn list_snapshots(&self, computer: ComputerId) -> Result<Vec<SnapshotRecord>, sqlx::Error> {
        let rows = sqlx::query(&format!(
            "{SELECT_SNAPSHOT} WHERE computer_id = $1 AND status <> 'deleted' AND kind = 'snapshot' ORDER BY created_at, id"
        ))
        .bind(computer.to_string())
        .fetch_all(self.pool())
        .await?;
        Ok(rows.iter().filter_map(record_from_row).collect())
    }

    /// How many snapshots, on any host, are in any of `statuses`.
    pub async fn count_snapshots_in(&self, statuses: &[SnapshotStatus]) -> Result<i64, sqlx::Error> {
        let placeholders: Vec<String> = (1..=statuses.len()).map(|i| format!("${i}")).collect();
        let sql = format!(
            "SELECT COUNT(*) FROM snapshots WHERE status IN ({})",
            placeholders.join(", ")
        );
        let mut q = sqlx::query_scalar(&sql);
        for s in statuses {
            q = q.bind(s.as_str());
        }
        q.fetch_one(self.pool()).await
    }

    /// Snapshots in any of `statuses` of computers run by `host` (None: this platform).
    pub async fn snapshots_in(
        &self,
        statuses: &[SnapshotStatus],
        host: Option<&HostId>,
    ) -> Result<Vec<SnapshotRecord>, sqlx::Error> {
        let placeholders: Vec<String> = (1..=statuses.len()).map(|i| format!("${i}")).collect();
        let scope = match host {
            Some(_) => format!("host_id = ${}", statuses.len() + 1),
            None => "host_id IS NULL".to_string(),
        };
        let sql = format!(
            "{SELECT_SNAPSHOT} WHERE status IN ({}) AND computer_id IN (SELECT id FROM computers WHERE {scope}) \
             ORDER BY created_at",
            placeholders.join(", ")
        );
        let mut q = sqlx::query(&sql);
        for s in statuses {
            q = q.bind(s.as_str());
        }
        if let Some(h) = host {
            q = q.bind(h.to_string());
        }
        Ok(q.fetch_all(self.pool())
            .await?
            .iter()
            .filter_map(record_from_row)
            .collect())
    }

    /// The newest snapshot of a computer that did not fail (deleted ones too: lineage outlives
    /// a deletion): the parent of its next.
    pub async fn latest_snapshot(&self, computer: ComputerId) -> Result<Option<SnapshotId>, sqlx::Error> {
        let id: Option<String> = sqlx::query_scalar(
            "SELECT id FROM snapshots WHERE computer_id = $1 AND status <> 'failed' \
             ORDER BY created_at DESC, id DESC LIMIT 1",
        )
        .bind(computer.to_string())
        .fetch_optional(self.pool())
        .await?;
        Ok(id.and_then(|s| s.parse().ok()))
    }

    /// Moves a snapshot to `to` if it is in one of `from`; returns whether it moved.
    pub async fn transition_snapshot(
        &self,
        id: SnapshotId,
        from: &[SnapshotStatus],
        to: SnapshotStatus,
        error: Option<&str>,
    ) -> Result<bool, sqlx::Error> {
        let placeholders: Vec<String> = (4..4 + from.len()).map(|i| format!("${i}")).collect();
        let sql = format!(
            "UPDATE snapshots SET status = $1, error = COALESCE($2, error), updated_at = $3 \
             WHERE id = ${} AND status IN ({})",
            4 + from.len(),
            placeholders.join(", ")
        );
        let mut q = sqlx::query(&sql)
            .bind(to.as_str())
            .bind(error.map(str::to_string))
            .bind(now());
        for f in from {
            q = q.bind(f.as_str());
        }
        let done = q.bind(id.to_string()).execute(self.pool()).await?;
        Ok(done.rows_affected() > 0)
    }

    /// Records the result of a finished upload and marks the snapshot ready. `manifest_hash`:
    /// of the manifest object as written, which every later read must match.
    #[allow(clippy::too_many_arguments)]
    pub async fn complete_snapshot(
        &self,
        id: SnapshotId,
        state: u64,
        memory: u64,
        rootfs: u64,
        compressed: u64,
        uploaded: u64,
        pause_ms: u64,
        bucket: &str,
        prefix: &str,
        sealed: bool,
        manifest_hash: ManifestHash,
        machine: (Size, &str, &serde_json::Value),
    ) -> Result<bool, sqlx::Error> {
        let (size, name, description) = machine;
        let machine = serde_json::json!({"size": size.as_str(), "name": name, "description": description});
        let done = sqlx::query(
            "UPDATE snapshots SET status = 'ready', state_size_bytes = $1, memory_size_bytes = $2, \
             rootfs_size_bytes = $3, compressed_size_bytes = $4, uploaded_bytes = $5, pause_ms = $6, \
             s3_bucket = $7, s3_prefix = $8, error = NULL, updated_at = $9, sealed = $11, manifest_blake3 = $12, \
             machine = $13 WHERE id = $10 AND status IN ('creating', 'uploading')",
        )
        .bind(state as i64)
        .bind(memory as i64)
        .bind(rootfs as i64)
        .bind(compressed as i64)
        .bind(uploaded as i64)
        .bind(pause_ms as i64)
        .bind(bucket)
        .bind(prefix)
        .bind(now())
        .bind(id.to_string())
        .bind(i64::from(sealed))
        .bind(manifest_hash.to_hex())
        .bind(machine.to_string())
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// What the store's objects of a snapshot are checked against (None: no such snapshot).
    pub async fn snapshot_recorded(&self, id: SnapshotId) -> Result<Option<Recorded>, sqlx::Error> {
        let row = sqlx::query(&format!("{SELECT_RECORDED} WHERE id = $1"))
            .bind(id.to_string())
            .fetch_optional(self.pool())
            .await?;
        row.as_ref().map(recorded_from_row).transpose()
    }

    /// A restore starts reading the snapshot: `ready`/`restoring` → `restoring`, one more reader.
    pub async fn begin_restore(&self, id: SnapshotId) -> Result<bool, sqlx::Error> {
        let done = sqlx::query(
            "UPDATE snapshots SET status = 'restoring', restores_active = restores_active + 1, updated_at = $1 \
             WHERE id = $2 AND status IN ('ready', 'restoring')",
        )
        .bind(now())
        .bind(id.to_string())
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// A restore is done with the snapshot; the last one out puts it back to `ready`.
    pub async fn end_restore(&self, id: SnapshotId) -> Result<SnapshotStatus, sqlx::Error> {
        sqlx::query(
            "UPDATE snapshots SET restores_active = CASE WHEN restores_active > 0 THEN restores_active - 1 ELSE 0 END, \
             status = CASE WHEN restores_active <= 1 THEN 'ready' ELSE 'restoring' END, updated_at = $1 \
             WHERE id = $2 AND status = 'restoring'",
        )
        .bind(now())
        .bind(id.to_string())
        .execute(self.pool())
        .await?;
        Ok(self
            .get_snapshot(id)
            .await?
            .map(|r| r.snapshot.status)
            .unwrap_or(SnapshotStatus::Deleted))
    }

    /// After a platform restart no restore is in flight: every `restoring` snapshot is `ready`.
    pub async fn reset_restores(&self) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE snapshots SET status = 'ready', restores_active = 0 WHERE status = 'restoring'")
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// Snapshots whose stored objects must be kept, as recorded: all but the deleted, plus
    /// any a live computer still boots from (its disk chain rests on the snapshot's disk).
    pub async fn live_snapshots(&self) -> Result<Vec<Recorded>, sqlx::Error> {
        let rows = sqlx::query(&format!(
            "{SELECT_RECORDED} WHERE status <> 'deleted' OR id IN \
             (SELECT source_snapshot_id FROM computers WHERE status <> 'destroyed') ORDER BY id"
        ))
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(recorded_from_row).collect()
    }

    /// The machine descriptions recorded for the snapshots [`Db::live_snapshots`] lists (those
    /// that have one): what names the boot files a host must keep.
    pub async fn live_descriptions(&self) -> Result<Vec<serde_json::Value>, sqlx::Error> {
        let rows: Vec<Option<String>> = sqlx::query_scalar(
            "SELECT machine FROM snapshots WHERE status <> 'deleted' OR id IN \
             (SELECT source_snapshot_id FROM computers WHERE status <> 'destroyed') ORDER BY id",
        )
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .flatten()
            .filter_map(|m| serde_json::from_str::<serde_json::Value>(&m).ok())
            .filter_map(|mut m| m.get_mut("description").map(serde_json::Value::take))
            .filter(|d| !d.is_null())
            .collect())
    }

    /// Whether a computer that is not destroyed was restored from `id` (its disk chain rests
    /// on the snapshot's disk).
    pub async fn snapshot_booted_from(&self, id: SnapshotId) -> Result<bool, sqlx::Error> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM computers WHERE source_snapshot_id = $1 AND status <> 'destroyed'",
        )
        .bind(id.to_string())
        .fetch_one(self.pool())
        .await?;
        Ok(n > 0)
    }

    /// A tenant's salt for naming its unencrypted chunks.
    pub async fn tenant_chunk_salt(&self, tenant: &str) -> Result<Option<[u8; 32]>, sqlx::Error> {
        let salt: Option<String> = sqlx::query_scalar("SELECT salt FROM tenant_chunk_salts WHERE tenant_id = $1")
            .bind(tenant)
            .fetch_optional(self.pool())
            .await?;
        salt.map(|s| {
            let mut out = [0u8; 32];
            hex::decode_to_slice(&s, &mut out)
                .map(|_| out)
                .map_err(|e| sqlx::Error::Decode(format!("tenant {tenant}'s chunk salt: {e}").into()))
        })
        .transpose()
    }

    /// Keeps a tenant's first chunk salt: one that has a salt keeps it (two processes may race
    /// to make it; both then read back the one that won).
    pub async fn insert_tenant_chunk_salt(&self, tenant: &str, salt: &[u8; 32]) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO tenant_chunk_salts (tenant_id, salt, created_at) VALUES ($1, $2, $3) \
             ON CONFLICT (tenant_id) DO NOTHING",
        )
        .bind(tenant)
        .bind(hex::encode(salt))
        .bind(now())
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// How many tenants have a data key (any: snapshots on this platform are encrypted).
    pub async fn count_data_keys(&self) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar("SELECT COUNT(*) FROM tenant_keys")
            .fetch_one(self.pool())
            .await
    }

    /// Deleted snapshots (whose manifests may go).
    pub async fn deleted_snapshot_ids(&self) -> Result<Vec<String>, sqlx::Error> {
        sqlx::query_scalar("SELECT id FROM snapshots WHERE status = 'deleted'")
            .fetch_all(self.pool())
            .await
    }

    // ---- events ----

    /// Appends an event; returns its sequence number (1, 2, ... per snapshot). One statement
    /// (its number read and written at once): a read-then-write transaction could be refused
    /// outright by SQLite when another writer came between (no busy wait helps there). Two
    /// writers that pick the same number on PostgreSQL meet the key: the loser tries again.
    pub async fn append_event(&self, snapshot: SnapshotId, event: &str, data: &str) -> Result<i64, sqlx::Error> {
        let mut attempt = 0;
        loop {
            let done = sqlx::query_scalar(
                "INSERT INTO snapshot_events (snapshot_id, seq, event, data, created_at) \
                 SELECT $1, COALESCE(MAX(seq), 0) + 1, $2, $3, $4 FROM snapshot_events WHERE snapshot_id = $1 \
                 RETURNING seq",
            )
            .bind(snapshot.to_string())
            .bind(event)
            .bind(data)
            .bind(now())
            .fetch_one(self.pool())
            .await;
            match done {
                Err(sqlx::Error::Database(e)) if e.is_unique_violation() && attempt < 5 => attempt += 1,
                other => return other,
            }
        }
    }

    /// Events after `seq`, in order: `(seq, event, data)`.
    pub async fn events_after(
        &self,
        snapshot: SnapshotId,
        seq: i64,
    ) -> Result<Vec<(i64, String, String)>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT seq, event, data FROM snapshot_events WHERE snapshot_id = $1 AND seq > $2 ORDER BY seq",
        )
        .bind(snapshot.to_string())
        .bind(seq)
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .iter()
            .filter_map(|r| Some((r.try_get(0).ok()?, r.try_get(1).ok()?, r.try_get(2).ok()?)))
            .collect())
    }

    pub async fn last_event_seq(&self, snapshot: SnapshotId) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM snapshot_events WHERE snapshot_id = $1")
            .bind(snapshot.to_string())
            .fetch_one(self.pool())
            .await
    }

    // ---- SSE tickets ----

    pub async fn insert_ticket(
        &self,
        hash: &str,
        tenant: TenantId,
        expires_at: DateTime<Utc>,
    ) -> Result<(), sqlx::Error> {
        sqlx::query("INSERT INTO sse_tickets (ticket_hash, tenant_id, expires_at) VALUES ($1, $2, $3)")
            .bind(hash)
            .bind(tenant.to_string())
            .bind(ts(expires_at))
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// Uses a ticket up: its tenant if it existed, was unused and had not expired.
    pub async fn consume_ticket(&self, hash: &str) -> Result<Option<TenantId>, sqlx::Error> {
        let done =
            sqlx::query("UPDATE sse_tickets SET used = 1 WHERE ticket_hash = $1 AND used = 0 AND expires_at > $2")
                .bind(hash)
                .bind(now())
                .execute(self.pool())
                .await?;
        if done.rows_affected() == 0 {
            return Ok(None);
        }
        let tenant: Option<String> = sqlx::query_scalar("SELECT tenant_id FROM sse_tickets WHERE ticket_hash = $1")
            .bind(hash)
            .fetch_optional(self.pool())
            .await?;
        // Expired and used tickets are worth nothing; forget them.
        sqlx::query("DELETE FROM sse_tickets WHERE expires_at < $1")
            .bind(now())
            .execute(self.pool())
            .await?;
        Ok(tenant.and_then(|t| t.parse().ok()))
    }

    // ---- idempotency ----

    pub async fn claim_idempotency_key(
        &self,
        tenant: TenantId,
        key: &str,
        fingerprint: &str,
    ) -> Result<Idempotency, sqlx::Error> {
        let inserted = sqlx::query(
            "INSERT INTO idempotency_keys (tenant_id, key, fingerprint, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (tenant_id, key) DO NOTHING",
        )
        .bind(tenant.to_string())
        .bind(key)
        .bind(fingerprint)
        .bind(now())
        .execute(self.pool())
        .await?;
        if inserted.rows_affected() > 0 {
            return Ok(Idempotency::Proceed);
        }
        let row =
            sqlx::query("SELECT fingerprint, status, body FROM idempotency_keys WHERE tenant_id = $1 AND key = $2")
                .bind(tenant.to_string())
                .bind(key)
                .fetch_one(self.pool())
                .await?;
        let stored: String = row.try_get(0)?;
        if stored != fingerprint {
            return Ok(Idempotency::Mismatch);
        }
        let status: Option<i64> = row.try_get(1)?;
        let body: Option<String> = row.try_get(2)?;
        Ok(match (status, body) {
            (Some(status), Some(body)) => Idempotency::Replay {
                status: status as u16,
                body,
            },
            _ => Idempotency::InProgress,
        })
    }

    pub async fn record_idempotent_answer(
        &self,
        tenant: TenantId,
        key: &str,
        status: u16,
        body: &str,
    ) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE idempotency_keys SET status = $1, body = $2 WHERE tenant_id = $3 AND key = $4")
            .bind(status as i64)
            .bind(body)
            .bind(tenant.to_string())
            .bind(key)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// Forgets a claim whose request failed, so a retry can do the work.
    pub async fn release_idempotency_key(&self, tenant: TenantId, key: &str) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM idempotency_keys WHERE tenant_id = $1 AND key = $2 AND status IS NULL")
            .bind(tenant.to_string())
            .bind(key)
            .execute(self.pool())
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(tenant: TenantId) -> Snapshot {
        let now = Utc::now();
        Snapshot {
            id: SnapshotId::new(),
            computer_id: ComputerId::new(),
            tenant_id: tenant,
            comment: Some("c".into()),
            status: SnapshotStatus::Creating,
            state_size_bytes: None,
            memory_size_bytes: None,
            rootfs_size_bytes: None,
            compressed_size_bytes: None,
            uploaded_bytes: None,
            pause_ms: None,
            s3_bucket: None,
            s3_prefix: None,
            parent_snapshot_id: None,
            error: None,
            created_at: now,
            updated_at: now,
            expires_at: None,
            name: None,
        }
    }

    async fn db() -> (tempfile::TempDir, Db, TenantId) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open_sqlite(&dir.path().join("m.db")).await.unwrap();
        let t = db.ensure_tenant("t").await.unwrap();
        (dir, db, t)
    }

    #[tokio::test]
    async fn the_status_machine_is_enforced_in_sql() {
        let (_d, db, t) = db().await;
        let s = snapshot(t);
        db.insert_snapshot(&s, Size::Xs, "box").await.unwrap();
        assert!(!db.begin_restore(s.id).await.unwrap(), "not ready yet");
        assert!(db
            .transition_snapshot(s.id, &[SnapshotStatus::Creating], SnapshotStatus::Uploading, None)
            .await
            .unwrap());
        assert!(db
            .complete_snapshot(
                s.id,
                1,
                2,
                3,
                4,
                4,
                5,
                "b",
                "p",
                true,
                ManifestHash::of(b"m"),
                (Size::Xs, "box", &serde_json::json!({"format": 1, "vcpus": 1}))
            )
            .await
            .unwrap());
        let recorded = db.snapshot_recorded(s.id).await.unwrap().unwrap();
        assert_eq!(
            recorded,
            Recorded {
                snapshot_id: s.id,
                tenant_id: t,
                sealed: true,
                manifest_hash: Some(ManifestHash::of(b"m")),
            }
        );
        assert_eq!(db.live_snapshots().await.unwrap(), vec![recorded]);
        assert_eq!(
            db.live_descriptions().await.unwrap(),
            vec![serde_json::json!({"format": 1, "vcpus": 1})]
        );
        assert_eq!(db.snapshot_recorded(SnapshotId::new()).await.unwrap(), None);
        let r = db.get_snapshot(s.id).await.unwrap().unwrap();
        assert_eq!(
            (r.snapshot.status, r.snapshot.compressed_size_bytes),
            (SnapshotStatus::Ready, Some(4))
        );
        // The machine's description is kept beside its size and name.
        assert_eq!(
            (r.size, r.computer_name.as_str(), r.description),
            (Size::Xs, "box", Some(serde_json::json!({"format": 1, "vcpus": 1})))
        );
        assert_eq!((r.size, r.computer_name.as_str()), (Size::Xs, "box"));

        // Two restores at once; the snapshot is ready again when both are done.
        assert!(db.begin_restore(s.id).await.unwrap());
        assert!(db.begin_restore(s.id).await.unwrap());
        assert_eq!(db.end_restore(s.id).await.unwrap(), SnapshotStatus::Restoring);
        assert_eq!(db.end_restore(s.id).await.unwrap(), SnapshotStatus::Ready);

        let deletable = [SnapshotStatus::Ready, SnapshotStatus::Failed];
        assert!(db
            .transition_snapshot(s.id, &deletable, SnapshotStatus::Deleted, None)
            .await
            .unwrap());
        assert!(!db
            .transition_snapshot(s.id, &deletable, SnapshotStatus::Deleted, None)
            .await
            .unwrap());
        assert!(db.list_snapshots(s.computer_id).await.unwrap().is_empty());
        assert!(
            db.live_descriptions().await.unwrap().is_empty(),
            "a deleted snapshot's boot files go"
        );
    }

    #[tokio::test]
    async fn snapshots_taken_before_hashes_were_kept_read_as_legacy_and_salts_are_made_once() {
        let (_d, db, t) = db().await;
        let s = snapshot(t);
        db.insert_snapshot(&s, Size::Xs, "box").await.unwrap();
        let r = db.snapshot_recorded(s.id).await.unwrap().unwrap();
        assert_eq!((r.sealed, r.manifest_hash), (false, None));
        // A damaged hash in the database fails the read rather than skipping the check.
        sqlx::query("UPDATE snapshots SET manifest_blake3 = 'zz' WHERE id = $1")
            .bind(s.id.to_string())
            .execute(db.pool())
            .await
            .unwrap();
        assert!(db.snapshot_recorded(s.id).await.is_err());

        assert_eq!(db.tenant_chunk_salt("t").await.unwrap(), None);
        db.insert_tenant_chunk_salt("t", &[1; 32]).await.unwrap();
        db.insert_tenant_chunk_salt("t", &[2; 32]).await.unwrap();
        assert_eq!(
            db.tenant_chunk_salt("t").await.unwrap(),
            Some([1; 32]),
            "the first one stays"
        );
        assert_eq!(db.count_data_keys().await.unwrap(), 0);
    }

    #[tokio::test]
    async fn events_are_numbered_per_snapshot() {
        let (_d, db, _t) = db().await;
        let (a, b) = (SnapshotId::new(), SnapshotId::new());
        assert_eq!(db.append_event(a, "snapshot_creating", "{}").await.unwrap(), 1);
        assert_eq!(db.append_event(a, "snapshot_uploading", "{}").await.unwrap(), 2);
        assert_eq!(db.append_event(b, "snapshot_creating", "{}").await.unwrap(), 1);
        let after = db.events_after(a, 1).await.unwrap();
        assert_eq!(after.len(), 1);
        assert_eq!(after[0].1, "snapshot_uploading");
        assert_eq!(db.last_event_seq(a).await.unwrap(), 2);
    }

    #[tokio::test]
    async fn tickets_are_single_use_and_expire() {
        let (_d, db, t) = db().await;
        db.insert_ticket("h1", t, Utc::now() + chrono::Duration::seconds(60))
            .await
            .unwrap();
        db.insert_ticket("h2", t, Utc::now() - chrono::Duration::seconds(1))
            .await
            .unwrap();
        assert_eq!(db.consume_ticket("h1").await.unwrap(), Some(t));
        assert_eq!(db.consume_ticket("h1").await.unwrap(), None, "used");
        assert_eq!(db.consume_ticket("h2").await.unwrap(), None, "expired");
        assert_eq!(db.consume_ticket("nope").await.unwrap(), None);
    }

    #[tokio::test]
    async fn idempotency_keys_replay_the_first_answer() {
        let (_d, db, t) = db().await;
        assert_eq!(
            db.claim_idempotency_key(t, "k", "POST /a").await.unwrap(),
            Idempotency::Proceed
        );
        assert_eq!(
            db.claim_idempotency_key(t, "k", "POST /a").await.unwrap(),
            Idempotency::InProgress
        );
        assert_eq!(
            db.claim_idempotency_key(t, "k", "POST /b").await.unwrap(),
            Idempotency::Mismatch
        );
        db.record_idempotent_answer(t, "k", 201, "{\"x\":1}").await.unwrap();
        assert_eq!(
            db.claim_idempotency_key(t, "k", "POST /a").await.unwrap(),
            Idempotency::Replay {
                status: 201,
                body: "{\"x\":1}".into()
            }
        );
        assert_eq!(
            db.claim_idempotency_key(t, "k2", "POST /a").await.unwrap(),
            Idempotency::Proceed
        );
        db.release_idempotency_key(t, "k2").await.unwrap();
        assert_eq!(
            db.claim_idempotency_key(t, "k2", "POST /a").await.unwrap(),
            Idempotency::Proceed
        );
    }
}
