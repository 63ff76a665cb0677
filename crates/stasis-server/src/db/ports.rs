//! Ports a computer's owner exposed, and the platform's own secrets.

use chrono::{DateTime, SecondsFormat, Utc};
use sqlx::Row;
use stasis_types::ComputerId;

use super::{parse_time, Db};

/// One exposed port of a computer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortRecord {
    pub computer_id: ComputerId,
    pub port: u16,
    /// Anyone with the URL may reach it (otherwise the key or a signed link).
    pub public: bool,
    pub name: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

fn visibility(public: bool) -> &'static str {
    if public {
        "public"
    } else {
        "private"
    }
}

fn port_from_row(row: &sqlx::any::AnyRow) -> Option<PortRecord> {
    Some(PortRecord {
        computer_id: row.try_get::<String, _>("computer_id").ok()?.parse().ok()?,
        port: u16::try_from(row.try_get::<i64, _>("port").ok()?).ok()?,
        public: row.try_get::<String, _>("visibility").ok()? == "public",
        name: row.try_get::<Option<String>, _>("name").ok().flatten(),
        created_at: parse_time(&row.try_get::<String, _>("created_at").ok()?),
        updated_at: parse_time(&row.try_get::<String, _>("updated_at").ok()?),
    })
}

const SELECT_PORT: &str = "SELECT computer_id, port, visibility, name, created_at, updated_at FROM ports";

impl Db {
    /// A computer's exposed ports, by number.
    pub async fn ports(&self, computer: ComputerId) -> Result<Vec<PortRecord>, sqlx::Error> {
        let rows = sqlx::query(&format!("{SELECT_PORT} WHERE computer_id = $1 ORDER BY port"))
            .bind(computer.to_string())
            .fetch_all(self.pool())
            .await?;
        Ok(rows.iter().filter_map(port_from_row).collect())
    }

    pub async fn port(&self, computer: ComputerId, port: u16) -> Result<Option<PortRecord>, sqlx::Error> {
        let row = sqlx::query(&format!("{SELECT_PORT} WHERE computer_id = $1 AND port = $2"))
            .bind(computer.to_string())
            .bind(i64::from(port))
            .fetch_optional(self.pool())
            .await?;
        Ok(row.as_ref().and_then(port_from_row))
    }

    /// Exposes a port; false if it was exposed already (nothing changes).
    pub async fn insert_port(&self, p: &PortRecord) -> Result<bool, sqlx::Error> {
        let done = sqlx::query(
            "INSERT INTO ports (computer_id, port, visibility, name, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (computer_id, port) DO NOTHING",
        )
        .bind(p.computer_id.to_string())
        .bind(i64::from(p.port))
        .bind(visibility(p.public))
        .bind(p.name.clone())
        .bind(p.created_at.to_rfc3339_opts(SecondsFormat::Millis, true))
        .bind(p.updated_at.to_rfc3339_opts(SecondsFormat::Millis, true))
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Changes a port's visibility and name; false if it is not exposed.
    pub async fn update_port(&self, p: &PortRecord) -> Result<bool, sqlx::Error> {
        let done = sqlx::query(
            "UPDATE ports SET visibility = $3, name = $4, updated_at = $5 WHERE computer_id = $1 AND port = $2",
        )
        .bind(p.computer_id.to_string())
        .bind(i64::from(p.port))
        .bind(visibility(p.public))
        .bind(p.name.clone())
        .bind(p.updated_at.to_rfc3339_opts(SecondsFormat::Millis, true))
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Stops exposing a port; false if it was not.
    pub async fn delete_port(&self, computer: ComputerId, port: u16) -> Result<bool, sqlx::Error> {
        let done = sqlx::query("DELETE FROM ports WHERE computer_id = $1 AND port = $2")
            .bind(computer.to_string())
            .bind(i64::from(port))
            .execute(self.pool())
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Forgets every port of a computer (it is destroyed).
    pub async fn delete_ports(&self, computer: ComputerId) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM ports WHERE computer_id = $1")
            .bind(computer.to_string())
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// Gives a new computer the ports of the one it was restored or cloned from.
    pub async fn copy_ports(&self, from: ComputerId, to: ComputerId) -> Result<(), sqlx::Error> {
        let now = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
        sqlx::query(
            "INSERT INTO ports (computer_id, port, visibility, name, created_at, updated_at) \
             SELECT $2, port, visibility, name, $3, $3 FROM ports WHERE computer_id = $1 \
             ON CONFLICT (computer_id, port) DO NOTHING",
        )
        .bind(from.to_string())
        .bind(to.to_string())
        .bind(now)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// The platform secret called `name`: the one stored, or `made` stored now (the first of
    /// several processes to store one wins, and all of them use it).
    pub async fn platform_secret(&self, name: &str, made: &str) -> Result<String, sqlx::Error> {
        sqlx::query("INSERT INTO platform_secrets (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING")
            .bind(name)
            .bind(made)
            .execute(self.pool())
            .await?;
        sqlx::query_scalar("SELECT value FROM platform_secrets WHERE name = $1")
            .bind(name)
            .fetch_one(self.pool())
            .await
    }
}
