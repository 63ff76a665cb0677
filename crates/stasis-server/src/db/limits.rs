//! Tenants' limits (operator overrides) and what each tenant holds against them.

use sqlx::Row;
use stasis_types::TenantId;

use super::Db;
use crate::limits::TenantLimits;

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
