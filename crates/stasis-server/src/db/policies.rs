//! Computers' own egress policies.

use chrono::{SecondsFormat, Utc};
use sqlx::Row;
use stasis_types::{ComputerId, NetworkPolicy, PolicyEffect};

use super::{parse_time, Db};

fn effect_name(e: PolicyEffect) -> &'static str {
    match e {
        PolicyEffect::Allow => "allow",
        PolicyEffect::Deny => "deny",
    }
}

fn policy_from_row(row: &sqlx::any::AnyRow) -> Option<NetworkPolicy> {
    Some(NetworkPolicy {
        computer_id: row.try_get::<String, _>("computer_id").ok()?.parse().ok()?,
        tenant_id: row.try_get::<String, _>("tenant_id").ok()?.parse().ok()?,
        rules: serde_json::from_str(&row.try_get::<String, _>("rules").ok()?).ok()?,
        default_effect: match row.try_get::<String, _>("default_effect").ok()?.as_str() {
            "deny" => PolicyEffect::Deny,
            _ => PolicyEffect::Allow,
        },
        inserted_at: Some(parse_time(&row.try_get::<String, _>("inserted_at").ok()?)),
        updated_at: Some(parse_time(&row.try_get::<String, _>("updated_at").ok()?)),
    })
}

const SELECT_POLICY: &str =
    "SELECT computer_id, tenant_id, rules, default_effect, inserted_at, updated_at FROM network_policies";

impl Db {
    /// A computer's own egress policy, if it has one.
    pub async fn network_policy(&self, computer: ComputerId) -> Result<Option<NetworkPolicy>, sqlx::Error> {
        let row = sqlx::query(&format!("{SELECT_POLICY} WHERE computer_id = $1"))
            .bind(computer.to_string())
            .fetch_optional(self.pool())
            .await?;
        Ok(row.as_ref().and_then(policy_from_row))
    }

    /// Stores `p` as its computer's policy (replacing any), and answers it as stored.
    pub async fn put_network_policy(&self, p: &NetworkPolicy) -> Result<NetworkPolicy, sqlx::Error> {
        let now = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
        let rules = serde_json::to_string(&p.rules).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
        sqlx::query(
            "INSERT INTO network_policies (computer_id, tenant_id, rules, default_effect, inserted_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $5) ON CONFLICT (computer_id) DO UPDATE \
             SET rules = excluded.rules, default_effect = excluded.default_effect, updated_at = excluded.updated_at",
        )
        .bind(p.computer_id.to_string())
        .bind(p.tenant_id.to_string())
        .bind(rules)
        .bind(effect_name(p.default_effect))
        .bind(now)
        .execute(self.pool())
        .await?;
        self.network_policy(p.computer_id)
            .await?
            .ok_or(sqlx::Error::RowNotFound)
    }

    /// Back to the default policy (true if the computer had one of its own).
    pub async fn delete_network_policy(&self, computer: ComputerId) -> Result<bool, sqlx::Error> {
        let done = sqlx::query("DELETE FROM network_policies WHERE computer_id = $1")
            .bind(computer.to_string())
            .execute(self.pool())
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Gives a new computer the policy of the one it was restored or cloned from.
    pub async fn copy_network_policy(&self, from: ComputerId, to: ComputerId) -> Result<(), sqlx::Error> {
        let now = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
        sqlx::query(
            "INSERT INTO network_policies (computer_id, tenant_id, rules, default_effect, inserted_at, updated_at) \
             SELECT $2, tenant_id, rules, default_effect, $3, $3 FROM network_policies WHERE computer_id = $1 \
             ON CONFLICT (computer_id) DO NOTHING",
        )
        .bind(from.to_string())
        .bind(to.to_string())
        .bind(now)
        .execute(self.pool())
        .await?;
        Ok(())
    }
}
