//! Computers' environment variables, and the copy a snapshot keeps of them.

use chrono::{SecondsFormat, Utc};
use sqlx::Row;
use stasis_types::{ComputerId, EnvVar, SnapshotId};

use super::{parse_time, Db};

fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn var_from_row(row: &sqlx::any::AnyRow) -> Option<EnvVar> {
    Some(EnvVar {
        name: row.try_get("name").ok()?,
        value: row.try_get("value").ok()?,
        created_at: parse_time(&row.try_get::<String, _>("created_at").ok()?),
        updated_at: parse_time(&row.try_get::<String, _>("updated_at").ok()?),
    })
}

impl Db {
    /// A computer's variables, by name.
    pub async fn env_vars(&self, computer: ComputerId) -> Result<Vec<EnvVar>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT name, value, created_at, updated_at FROM computer_env WHERE computer_id = $1 ORDER BY name",
        )
        .bind(computer.to_string())
        .fetch_all(self.pool())
        .await?;
        Ok(rows.iter().filter_map(var_from_row).collect())
    }

    /// One variable of a computer's.
    pub async fn env_var(&self, computer: ComputerId, name: &str) -> Result<Option<EnvVar>, sqlx::Error> {
        let row = sqlx::query(
            "SELECT name, value, created_at, updated_at FROM computer_env WHERE computer_id = $1 AND name = $2",
        )
        .bind(computer.to_string())
        .bind(name)
        .fetch_optional(self.pool())
        .await?;
        Ok(row.as_ref().and_then(var_from_row))
    }

    /// Adds a variable; `None` if the computer has one of that name already.
    pub async fn insert_env_var(
        &self,
        computer: ComputerId,
        name: &str,
        value: &str,
    ) -> Result<Option<EnvVar>, sqlx::Error> {
        let done = sqlx::query(
            "INSERT INTO computer_env (computer_id, name, value, created_at, updated_at) VALUES ($1, $2, $3, $4, $4) \
             ON CONFLICT (computer_id, name) DO NOTHING",
        )
        .bind(computer.to_string())
        .bind(name)
        .bind(value)
        .bind(now())
        .execute(self.pool())
        .await?;
        if done.rows_affected() == 0 {
            return Ok(None);
        }
        self.env_var(computer, name).await
    }

    /// Changes a variable's value; `None` if the computer has none of that name.
    pub async fn update_env_var(
        &self,
        computer: ComputerId,
        name: &str,
        value: &str,
    ) -> Result<Option<EnvVar>, sqlx::Error> {
        let done =
            sqlx::query("UPDATE computer_env SET value = $3, updated_at = $4 WHERE computer_id = $1 AND name = $2")
                .bind(computer.to_string())
                .bind(name)
                .bind(value)
                .bind(now())
                .execute(self.pool())
                .await?;
        if done.rows_affected() == 0 {
            return Ok(None);
        }
        self.env_var(computer, name).await
    }

    /// Sets each of `vars` (adding or replacing), all or none.
    pub async fn set_env_vars(&self, computer: ComputerId, vars: &[(String, String)]) -> Result<(), sqlx::Error> {
        let mut tx = self.pool().begin().await?;
        let at = now();
        for (name, value) in vars {
            sqlx::query(
                "INSERT INTO computer_env (computer_id, name, value, created_at, updated_at) VALUES ($1, $2, $3, $4, $4) \
                 ON CONFLICT (computer_id, name) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
            )
            .bind(computer.to_string())
            .bind(name)
            .bind(value)
            .bind(&at)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await
    }

    /// Removes a variable (true if there was one).
    pub async fn delete_env_var(&self, computer: ComputerId, name: &str) -> Result<bool, sqlx::Error> {
        let done = sqlx::query("DELETE FROM computer_env WHERE computer_id = $1 AND name = $2")
            .bind(computer.to_string())
            .bind(name)
            .execute(self.pool())
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Removes all of a destroyed computer's variables.
    pub async fn delete_env(&self, computer: ComputerId) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM computer_env WHERE computer_id = $1")
            .bind(computer.to_string())
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// Keeps, with a snapshot being taken of `computer`, its variables as they are now.
    pub async fn snapshot_env(&self, computer: ComputerId, snapshot: SnapshotId) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO snapshot_env (snapshot_id, name, value) \
             SELECT $2, name, value FROM computer_env WHERE computer_id = $1 \
             ON CONFLICT (snapshot_id, name) DO NOTHING",
        )
        .bind(computer.to_string())
        .bind(snapshot.to_string())
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Gives a computer restored from `snapshot` the variables the snapshot kept.
    pub async fn restore_env(&self, snapshot: SnapshotId, computer: ComputerId) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO computer_env (computer_id, name, value, created_at, updated_at) \
             SELECT $2, name, value, $3, $3 FROM snapshot_env WHERE snapshot_id = $1 \
             ON CONFLICT (computer_id, name) DO NOTHING",
        )
        .bind(snapshot.to_string())
        .bind(computer.to_string())
        .bind(now())
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Forgets the variables a deleted snapshot kept.
    pub async fn delete_snapshot_env(&self, snapshot: SnapshotId) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM snapshot_env WHERE snapshot_id = $1")
            .bind(snapshot.to_string())
            .execute(self.pool())
            .await?;
        Ok(())
    }
}
