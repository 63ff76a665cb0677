//! Tenants' data keys for encryption at rest, as wrapped by the master key.

use super::{now, Db};

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
}
