//! Tenants' limits (operator overrides) and what each tenant holds against them.

use sqlx::Row;
use stasis_types::TenantId;

use super::Db;
use serde::{Deserialize, Serialize};

/// Limits of one tenant; None means no limit (or, as an override, the platform default).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantLimits {
    pub max_computers: Option<u64>,
    pub max_snapshots: Option<u64>,
    pub max_stored_bytes: Option<u64>,
    /// Requests per second, sustained; bursts of twice as many are let through.
    pub rate_per_sec: Option<u64>,
}

impl TenantLimits {
    /// These overrides over `defaults`.
    pub fn over(self, defaults: TenantLimits) -> TenantLimits {
        TenantLimits {
            max_computers: self.max_computers.or(defaults.max_computers),
            max_snapshots: self.max_snapshots.or(defaults.max_snapshots),
            max_stored_bytes: self.max_stored_bytes.or(defaults.max_stored_bytes),
            rate_per_sec: self.rate_per_sec.or(defaults.rate_per_sec),
        }
    }
}

/// What a tenant holds now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Computers holding memory (creating … stopping).
    pub computers: u64,
    /// Snapshots kept (not deleted, not failed).
    pub snapshots: u64,
    /// What those snapshots occupy in the store (each one's compressed size).
    pub stored_bytes: u64,
}

impl Db {
    /// The operator's overrides for a tenant (None: the platform default).
    pub async fn tenant_limits(&self, tenant: TenantId) -> Result<TenantLimits, sqlx::Error> {
        let row = sqlx::query(
            "SELECT max_computers, max_snapshots, max_stored_bytes, rate_per_sec FROM tenants WHERE id = $1",
        )
        .bind(tenant.to_string())
        .fetch_optional(self.pool())
        .await?;
        let Some(row) = row else {
            return Ok(TenantLimits::default());
        };
        let get = |col: &str| {
            row.try_get::<Option<i64>, _>(col)
                .ok()
                .flatten()
                .map(|v| v.max(0) as u64)
        };
        Ok(TenantLimits {
            max_computers: get("max_computers"),
            max_snapshots: get("max_snapshots"),
            max_stored_bytes: get("max_stored_bytes"),
            rate_per_sec: get("rate_per_sec"),
        })
    }

    /// Sets the given overrides (fields left None are not changed); false if no such tenant.
    pub async fn set_tenant_limits(&self, name: &str, limits: &TenantLimits) -> Result<bool, sqlx::Error> {
        let mut changed = false;
        for (col, value) in [
            ("max_computers", limits.max_computers),
            ("max_snapshots", limits.max_snapshots),
            ("max_stored_bytes", limits.max_stored_bytes),
            ("rate_per_sec", limits.rate_per_sec),
        ] {
            let Some(v) = value else { continue };
            let done = sqlx::query(&format!("UPDATE tenants SET {col} = $1 WHERE name = $2"))
                .bind(i64::try_from(v).unwrap_or(i64::MAX))
                .bind(name)
                .execute(self.pool())
                .await?;
            changed |= done.rows_affected() > 0;
        }
        Ok(changed || self.tenant_by_name(name).await?.is_some())
    }

    pub async fn tenant_usage(&self, tenant: TenantId) -> Result<Usage, sqlx::Error> {
        let computers: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM computers WHERE tenant_id = $1 AND status IN \
             ('creating', 'provisioning', 'starting', 'running', 'paused', 'stopping')",
        )
        .bind(tenant.to_string())
        .fetch_one(self.pool())
        .await?;
        let row = sqlx::query(
            "SELECT COUNT(*) AS n, CAST(COALESCE(SUM(compressed_size_bytes), 0) AS BIGINT) AS bytes FROM snapshots \
             WHERE tenant_id = $1 AND status NOT IN ('deleted', 'failed')",
        )
        .bind(tenant.to_string())
        .fetch_one(self.pool())
        .await?;
        let snapshots: i64 = row.try_get("n")?;
        let bytes: i64 = row.try_get("bytes")?;
        Ok(Usage {
            computers: computers.max(0) as u64,
            snapshots: snapshots.max(0) as u64,
            stored_bytes: bytes.max(0) as u64,
        })
    }
}

/// Held while one admission checks a tenant's quotas and records what it admits, so that no
/// other admission of that tenant — in this process or in any other on the same database —
/// checks in between. On PostgreSQL a transaction-scoped advisory lock of the tenant, taken on
/// a connection of its own: whoever holds it commits or drops it, and a dropped guard (a
/// cancelled request) is rolled back with the connection, which releases it. SQLite serves one
/// process, whose own admission lock is enough.
pub struct QuotaLock {
    _tx: Option<sqlx::Transaction<'static, sqlx::Any>>,
}

/// The advisory lock key of a tenant's quotas: stable across processes (FNV-1a of a label and
/// the id), so every host computes the same one.
fn quota_key(tenant: TenantId) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in "stasis-quota:".bytes().chain(tenant.to_string().into_bytes()) {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    h as i64
}

impl Db {
    /// Waits until no other admission of `tenant` runs; see [`QuotaLock`].
    pub async fn lock_quota(&self, tenant: TenantId) -> Result<QuotaLock, sqlx::Error> {
        if self.backend() != super::Backend::Postgres {
            return Ok(QuotaLock { _tx: None });
        }
        let mut tx = self.pool().begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(quota_key(tenant))
            .execute(&mut *tx)
            .await?;
        Ok(QuotaLock { _tx: Some(tx) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_keys_are_stable_and_per_tenant() {
        let a: TenantId = "0d3a6b8e-5a4e-4f7b-9a59-3c1c2b2f1e01".parse().unwrap();
        let b: TenantId = "0d3a6b8e-5a4e-4f7b-9a59-3c1c2b2f1e02".parse().unwrap();
        assert_eq!(quota_key(a), quota_key(a));
        assert_ne!(quota_key(a), quota_key(b));
    }
}
