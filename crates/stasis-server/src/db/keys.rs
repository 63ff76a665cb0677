//! Tenants' data keys for encryption at rest, as wrapped by the master key; revoking API
//! keys; SSE tickets bound to a snapshot; idempotency claims that outlive their request; and
//! pruning the rows that are no use any more.

use chrono::{DateTime, Utc};
use sqlx::Row;
use stasis_types::{SnapshotId, TenantId};

use super::{now, Db};

/// How long an idempotency record is kept (a retry after that does the work again).
pub const IDEMPOTENCY_TTL: chrono::Duration = chrono::Duration::hours(24);
/// How long a deleted snapshot's events are kept (a stream resuming after its final event).
pub const DELETED_EVENTS_TTL: chrono::Duration = chrono::Duration::hours(1);

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// What `consume_bound_ticket` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TicketGrant {
    pub tenant: TenantId,
    /// The snapshot it opens; None: any of its tenant's.
    pub snapshot: Option<SnapshotId>,
}

/// A tenant's data key as kept: wrapped (see `stasis_store::seal`), and which master key did it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrappedKey {
    pub wrapped: Vec<u8>,
    pub master_key_id: String,
}

impl Db {
    pub async fn tenant_data_key(&self, tenant: &str) -> Result<Option<WrappedKey>, sqlx::Error> {
        let row: Option<(String, String)> =
            sqlx::query_as("SELECT wrapped_key, master_key_id FROM tenant_keys WHERE tenant_id = $1")
                .bind(tenant)
                .fetch_optional(self.pool())
                .await?;
        Ok(row.map(|(wrapped, master_key_id)| WrappedKey {
            wrapped: hex::decode(wrapped).unwrap_or_default(),
            master_key_id,
        }))
    }

    /// Keeps a tenant's first data key: a tenant that has one already keeps its own (two
    /// processes may race to make it; both then read back the one that won).
    pub async fn insert_tenant_data_key(&self, tenant: &str, key: &WrappedKey) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO tenant_keys (tenant_id, wrapped_key, master_key_id, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (tenant_id) DO NOTHING",
        )
        .bind(tenant)
        .bind(hex::encode(&key.wrapped))
        .bind(&key.master_key_id)
        .bind(now())
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// How many tenants' data keys a master key other than `master_key_id` wrapped.
    pub async fn count_foreign_data_keys(&self, master_key_id: &str) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar("SELECT COUNT(*) FROM tenant_keys WHERE master_key_id <> $1")
            .bind(master_key_id)
            .fetch_one(self.pool())
            .await
    }

    // ---- API keys ----

    /// Revokes every key of a tenant; how many there were.
    pub async fn revoke_tenant_keys(&self, tenant: TenantId) -> Result<u64, sqlx::Error> {
        let done = sqlx::query("DELETE FROM api_keys WHERE tenant_id = $1")
            .bind(tenant.to_string())
            .execute(self.pool())
            .await?;
        Ok(done.rows_affected())
    }

    /// Revokes the key with this hash; whether it existed.
    pub async fn revoke_key_hash(&self, key_hash: &str) -> Result<bool, sqlx::Error> {
        let done = sqlx::query("DELETE FROM api_keys WHERE key_hash = $1")
            .bind(key_hash)
            .execute(self.pool())
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Revokes the keys whose shown prefix (`stasis_` and 4 more characters) is this one,
    /// within a tenant if given; how many.
    pub async fn revoke_key_prefix(&self, prefix: &str, tenant: Option<TenantId>) -> Result<u64, sqlx::Error> {
        let done = match tenant {
            Some(t) => {
                sqlx::query("DELETE FROM api_keys WHERE prefix = $1 AND tenant_id = $2")
                    .bind(prefix)
                    .bind(t.to_string())
                    .execute(self.pool())
                    .await?
            }
            None => {
                sqlx::query("DELETE FROM api_keys WHERE prefix = $1")
                    .bind(prefix)
                    .execute(self.pool())
                    .await?
            }
        };
        Ok(done.rows_affected())
    }

    // ---- SSE tickets bound to a snapshot ----

    pub async fn insert_bound_ticket(
        &self,
        hash: &str,
        tenant: TenantId,
        snapshot: Option<SnapshotId>,
        expires_at: DateTime<Utc>,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO sse_tickets (ticket_hash, tenant_id, snapshot_id, expires_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(hash)
        .bind(tenant.to_string())
        .bind(snapshot.map(|s| s.to_string()))
        .bind(ts(expires_at))
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Uses a ticket up (once, unexpired): whose it is and which snapshot it opens.
    pub async fn consume_bound_ticket(&self, hash: &str) -> Result<Option<TicketGrant>, sqlx::Error> {
        let done =
            sqlx::query("UPDATE sse_tickets SET used = 1 WHERE ticket_hash = $1 AND used = 0 AND expires_at > $2")
                .bind(hash)
                .bind(now())
                .execute(self.pool())
                .await?;
        if done.rows_affected() == 0 {
            return Ok(None);
        }
        let row = sqlx::query("SELECT tenant_id, snapshot_id FROM sse_tickets WHERE ticket_hash = $1")
            .bind(hash)
            .fetch_optional(self.pool())
            .await?;
        // A used ticket is worth nothing.
        sqlx::query("DELETE FROM sse_tickets WHERE ticket_hash = $1")
            .bind(hash)
            .execute(self.pool())
            .await?;
        let Some(row) = row else { return Ok(None) };
        let tenant: String = row.try_get(0)?;
        let snapshot: Option<String> = row.try_get(1)?;
        Ok(tenant.parse().ok().map(|tenant| TicketGrant {
            tenant,
            snapshot: snapshot.and_then(|s| s.parse().ok()),
        }))
    }

    // ---- idempotency claims ----

    /// Takes over a claim still in progress that was made before `stale_before` (its request
    /// died with its process); whether this caller now owns it.
    pub async fn take_over_idempotency_key(
        &self,
        tenant: TenantId,
        key: &str,
        fingerprint: &str,
        stale_before: DateTime<Utc>,
    ) -> Result<bool, sqlx::Error> {
        let done = sqlx::query(
            "UPDATE idempotency_keys SET created_at = $1 WHERE tenant_id = $2 AND key = $3 AND fingerprint = $4 \
             AND status IS NULL AND created_at < $5",
        )
        .bind(now())
        .bind(tenant.to_string())
        .bind(key)
        .bind(fingerprint)
        .bind(ts(stale_before))
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected() > 0)
    }

    // ---- pruning ----

    /// Deletes idempotency records older than [`IDEMPOTENCY_TTL`], expired SSE tickets, and
    /// the events of snapshots deleted more than [`DELETED_EVENTS_TTL`] ago (or gone); how many
    /// rows.
    pub async fn prune_expired(&self, at: DateTime<Utc>) -> Result<u64, sqlx::Error> {
        let mut n = sqlx::query("DELETE FROM idempotency_keys WHERE created_at < $1")
            .bind(ts(at - IDEMPOTENCY_TTL))
            .execute(self.pool())
            .await?
            .rows_affected();
        n += sqlx::query("DELETE FROM sse_tickets WHERE expires_at < $1")
            .bind(ts(at))
            .execute(self.pool())
            .await?
            .rows_affected();
        let cutoff = ts(at - DELETED_EVENTS_TTL);
        n += sqlx::query(
            "DELETE FROM snapshot_events WHERE snapshot_id IN \
             (SELECT id FROM snapshots WHERE status = 'deleted' AND updated_at < $1) \
             OR (created_at < $2 AND snapshot_id NOT IN (SELECT id FROM snapshots))",
        )
        .bind(&cutoff)
        .bind(&cutoff)
        .execute(self.pool())
        .await?
        .rows_affected();
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn db(dir: &std::path::Path) -> Db {
        Db::open_sqlite(&dir.join("t.db")).await.unwrap()
    }

    async fn count(db: &Db, table: &str) -> i64 {
        sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table}"))
            .fetch_one(db.pool())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn prune_forgets_old_idempotency_expired_tickets_and_deleted_snapshots_events() {
        let dir = tempfile::tempdir().unwrap();
        let db = db(dir.path()).await;
        let tenant = db.ensure_tenant("t").await.unwrap();
        let old = ts(Utc::now() - chrono::Duration::hours(25));
        for (key, at) in [("old", old.clone()), ("new", now())] {
            sqlx::query(
                "INSERT INTO idempotency_keys (tenant_id, key, fingerprint, created_at) VALUES ($1, $2, 'f', $3)",
            )
            .bind(tenant.to_string())
            .bind(key)
            .bind(at)
            .execute(db.pool())
            .await
            .unwrap();
        }
        db.insert_bound_ticket("expired", tenant, None, Utc::now() - chrono::Duration::seconds(5))
            .await
            .unwrap();
        db.insert_bound_ticket("live", tenant, None, Utc::now() + chrono::Duration::seconds(60))
            .await
            .unwrap();
        // Events of a snapshot gone long ago, and of one that is still there.
        for (snap, at) in [(SnapshotId::new(), old.clone()), (SnapshotId::new(), now())] {
            sqlx::query(
                "INSERT INTO snapshot_events (snapshot_id, seq, event, data, created_at) VALUES ($1, 1, 'e', '{}', $2)",
            )
            .bind(snap.to_string())
            .bind(at)
            .execute(db.pool())
            .await
            .unwrap();
        }
        let pruned = db.prune_expired(Utc::now()).await.unwrap();
        assert_eq!(pruned, 3);
        assert_eq!(count(&db, "idempotency_keys").await, 1);
        assert_eq!(count(&db, "sse_tickets").await, 1);
        assert_eq!(count(&db, "snapshot_events").await, 1, "a fresh snapshot's events stay");
    }

    #[tokio::test]
    async fn a_bound_ticket_names_its_snapshot_and_works_once() {
        let dir = tempfile::tempdir().unwrap();
        let db = db(dir.path()).await;
        let tenant = db.ensure_tenant("t").await.unwrap();
        let snap = SnapshotId::new();
        db.insert_bound_ticket("h", tenant, Some(snap), Utc::now() + chrono::Duration::seconds(60))
            .await
            .unwrap();
        let grant = db.consume_bound_ticket("h").await.unwrap().unwrap();
        assert_eq!(
            grant,
            TicketGrant {
                tenant,
                snapshot: Some(snap)
            }
        );
        assert!(db.consume_bound_ticket("h").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn revoked_keys_no_longer_name_their_tenant() {
        let dir = tempfile::tempdir().unwrap();
        let db = db(dir.path()).await;
        let a = crate::auth::create_key(&db, "a").await.unwrap();
        let b = crate::auth::create_key(&db, "b").await.unwrap();
        let tenant_a = db.tenant_by_name("a").await.unwrap().unwrap();
        assert_eq!(db.revoke_tenant_keys(tenant_a).await.unwrap(), 1);
        assert!(db
            .tenant_by_key_hash(&crate::auth::hash_key(&a))
            .await
            .unwrap()
            .is_none());
        assert!(db
            .tenant_by_key_hash(&crate::auth::hash_key(&b))
            .await
            .unwrap()
            .is_some());
        assert!(db.revoke_key_hash(&crate::auth::hash_key(&b)).await.unwrap());
        assert!(db
            .tenant_by_key_hash(&crate::auth::hash_key(&b))
            .await
            .unwrap()
            .is_none());
    }
}
