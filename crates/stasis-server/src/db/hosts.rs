//! Hosts that joined a control plane, and which computers each runs.

use sqlx::Row;
use stasis_types::{ComputerId, ComputerStatus, HostId, Size, SnapshotStatus};

use stasis_vmm::description::HostMachine;

use super::{now, parse_time, Db};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRecord {
    pub id: HostId,
    pub url: String,
    pub capacity_mib: i64,
    pub vcpus: i64,
    pub status: HostStatus,
    pub last_seen: chrono::DateTime<chrono::Utc>,
    /// What it runs, as its heartbeats say (None from a host that does not say).
    pub machine: Option<HostMachine>,
}

/// Whether a host is heard from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostStatus {
    /// Heartbeating.
    Alive,
    /// Silent past the host timeout: its computers turned `error`.
    Lost,
}

impl HostStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            HostStatus::Alive => "alive",
            HostStatus::Lost => "lost",
        }
    }

    pub fn parse(s: &str) -> Option<HostStatus> {
        match s {
            "alive" => Some(HostStatus::Alive),
            "lost" => Some(HostStatus::Lost),
            _ => None,
        }
    }
}

/// Statuses in which a computer holds its host's memory (a paused computer is hibernated:
/// its memory is in its snapshot).
const HOLDING: &str = "('creating', 'provisioning', 'starting', 'running', 'stopping')";

impl Db {
    /// Records a heartbeat: inserts the host or refreshes it (and brings a lost host back).
    pub async fn heartbeat_host(
        &self,
        id: &HostId,
        url: &str,
        capacity_mib: i64,
        vcpus: i64,
        machine: Option<&HostMachine>,
    ) -> Result<(), sqlx::Error> {
        let t = now();
        let machine = machine.and_then(|m| serde_json::to_string(m).ok());
        sqlx::query(
            "INSERT INTO hosts (id, url, capacity_mib, vcpus, status, last_seen, joined_at, machine) \
             VALUES ($1, $2, $3, $4, 'alive', $5, $6, $7) \
             ON CONFLICT (id) DO UPDATE SET url = $2, capacity_mib = $3, vcpus = $4, status = 'alive', last_seen = $5, \
             machine = COALESCE($7, hosts.machine)",
        )
        .bind(id.as_str())
        .bind(url)
        .bind(capacity_mib)
        .bind(vcpus)
        .bind(t.clone())
        .bind(t)
        .bind(machine)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    pub async fn hosts(&self) -> Result<Vec<HostRecord>, sqlx::Error> {
        let rows =
            sqlx::query("SELECT id, url, capacity_mib, vcpus, status, last_seen, machine FROM hosts ORDER BY id")
                .fetch_all(self.pool())
                .await?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                Some(HostRecord {
                    id: r.try_get::<String, _>("id").ok()?.parse().ok()?,
                    url: r.try_get("url").ok()?,
                    capacity_mib: r.try_get("capacity_mib").ok()?,
                    vcpus: r.try_get("vcpus").ok()?,
                    status: HostStatus::parse(&r.try_get::<String, _>("status").ok()?)?,
                    last_seen: parse_time(&r.try_get::<String, _>("last_seen").ok()?),
                    machine: r
                        .try_get::<Option<String>, _>("machine")
                        .ok()
                        .flatten()
                        .and_then(|m| serde_json::from_str(&m).ok()),
                })
            })
            .collect())
    }

    /// Memory (MiB) held by each host's computers, from their sizes.
    pub async fn host_sizes(&self) -> Result<Vec<(HostId, String)>, sqlx::Error> {
        let rows = sqlx::query(&format!(
            "SELECT host_id, size FROM computers WHERE host_id IS NOT NULL AND status IN {HOLDING}"
        ))
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                let host: String = r.try_get("host_id").ok()?;
                Some((host.parse().ok()?, r.try_get("size").ok()?))
            })
            .collect())
    }

    /// Memory (MiB) held by the computers of one host (None: the embedded platform's).
    pub async fn memory_held_mib(&self, host: Option<&HostId>) -> Result<u64, sqlx::Error> {
        let rows = sqlx::query(&format!(
            "SELECT size FROM computers WHERE status IN {HOLDING} AND \
             (host_id = $1 OR ($1 IS NULL AND host_id IS NULL))"
        ))
        .bind(host.map(HostId::as_str))
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .iter()
            .filter_map(|r| r.try_get::<String, _>("size").ok())
            .filter_map(|s| Size::parse(&s))
            .map(Size::memory_mib)
            .sum())
    }

    /// The host a computer runs on: None if there is no such computer, Some(None) if it
    /// runs on none.
    pub async fn computer_host(&self, computer: ComputerId) -> Result<Option<Option<HostId>>, sqlx::Error> {
        let host: Option<Option<String>> = sqlx::query_scalar("SELECT host_id FROM computers WHERE id = $1")
            .bind(computer.to_string())
            .fetch_optional(self.pool())
            .await?;
        host.map(|h| {
            h.map(|h| h.parse().map_err(|e| sqlx::Error::Decode(Box::new(e))))
                .transpose()
        })
        .transpose()
    }

    pub async fn host_of(&self, computer: ComputerId) -> Result<Option<HostId>, sqlx::Error> {
        Ok(self.computer_host(computer).await?.flatten())
    }

    /// Marks a host lost (if it was alive); then its computers turn `error`, and its
    /// unfinished snapshots and jobs `failed`. Returns whether the host was alive.
    pub async fn lose_host(&self, id: &HostId, reason: &str) -> Result<bool, sqlx::Error> {
        let changed = sqlx::query("UPDATE hosts SET status = 'lost' WHERE id = $1 AND status = 'alive'")
            .bind(id.as_str())
            .execute(self.pool())
            .await?
            .rows_affected();
        if changed == 0 {
            return Ok(false);
        }
        let t = now();
        sqlx::query(&format!(
            "UPDATE snapshots SET status = 'failed', error = $1, updated_at = $2 \
             WHERE status IN ('{}', '{}') AND computer_id IN (SELECT id FROM computers WHERE host_id = $3)",
            SnapshotStatus::Creating.as_str(),
            SnapshotStatus::Uploading.as_str()
        ))
        .bind(format!("{reason} before the snapshot was stored"))
        .bind(t.clone())
        .bind(id.as_str())
        .execute(self.pool())
        .await?;
        sqlx::query(&format!(
            "UPDATE computers SET status = '{}', error = $1, updated_at = $2 \
             WHERE host_id = $3 AND status IN {HOLDING}",
            ComputerStatus::Error.as_str()
        ))
        .bind(reason)
        .bind(t)
        .bind(id.as_str())
        .execute(self.pool())
        .await?;
        self.fail_jobs_of_host(id, reason).await?;
        Ok(true)
    }
}
