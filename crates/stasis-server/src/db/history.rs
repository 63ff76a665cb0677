//! The account-wide snapshot history (paging, search, groups by computer), lineage (children,
//! computers restored from a snapshot), names that pin snapshots, and expiry.

use chrono::{DateTime, Utc};
use sqlx::Row;
use stasis_types::{ComputerId, ComputerStatus, SnapshotId, TenantId};

use super::snapshots::{record_from_row, ts, SNAPSHOT_COLUMNS_S};
use super::{now, parse_time, Db, SnapshotRecord};

/// Which snapshots a history query is about.
#[derive(Debug, Clone, Default)]
pub struct HistoryFilter {
    /// Only this computer's.
    pub computer: Option<ComputerId>,
    /// A substring of the computer's name, the computer's id or the snapshot's id (any case).
    pub q: Option<String>,
    pub limit: u64,
    pub offset: u64,
}

/// The computer a snapshot was taken of, as it is now (None: no row, which a computer keeps
/// even once destroyed, so only for rows older than that).
#[derive(Debug, Clone)]
pub struct ComputerNow {
    pub name: String,
    pub status: ComputerStatus,
}

/// A name that pins a snapshot.
#[derive(Debug, Clone)]
pub struct NameRecord {
    pub name: String,
    pub snapshot_id: SnapshotId,
    pub created_at: DateTime<Utc>,
}

/// `LIKE` pattern of a substring, its wildcards escaped (with `\`).
fn contains_pattern(q: &str) -> String {
    let mut out = String::from("%");
    for c in q.to_lowercase().chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('%');
    out
}

/// The history's rows: this tenant's snapshots that are neither deleted nor named.
const HISTORY_FROM: &str = "FROM snapshots s LEFT JOIN computers c ON c.id = s.computer_id \
     WHERE s.tenant_id = $1 AND s.status <> 'deleted' AND s.kind = 'snapshot' \
     AND NOT EXISTS (SELECT 1 FROM named_snapshots n WHERE n.snapshot_id = s.id) \
     AND ($2 = '' OR s.computer_id = $2) \
     AND ($3 = '' OR LOWER(COALESCE(c.name, '')) LIKE $3 ESCAPE '\\' OR LOWER(s.computer_id) LIKE $3 ESCAPE '\\' \
          OR LOWER(s.id) LIKE $3 ESCAPE '\\')";

fn computer_now(row: &sqlx::any::AnyRow) -> Option<ComputerNow> {
    let name: Option<String> = row.try_get("r_name").ok().flatten();
    let status: Option<String> = row.try_get("r_status").ok().flatten();
    Some(ComputerNow {
        name: name?,
        status: ComputerStatus::parse(&status?)?,
    })
}

impl Db {
    /// A page of the history, newest first, and how many match in all.
    pub async fn history(
        &self,
        tenant: TenantId,
        filter: &HistoryFilter,
    ) -> Result<(Vec<(SnapshotRecord, Option<ComputerNow>)>, u64), sqlx::Error> {
        let computer = filter.computer.map(|c| c.to_string()).unwrap_or_default();
        let q = filter.q.as_deref().map(contains_pattern).unwrap_or_default();
        let total: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) {HISTORY_FROM}"))
            .bind(tenant.to_string())
            .bind(&computer)
            .bind(&q)
            .fetch_one(self.pool())
            .await?;
        let rows = sqlx::query(&format!(
            "SELECT {SNAPSHOT_COLUMNS_S}, c.name AS r_name, c.status AS r_status {HISTORY_FROM} \
             ORDER BY s.created_at DESC, s.id DESC LIMIT $4 OFFSET $5"
        ))
        .bind(tenant.to_string())
        .bind(&computer)
        .bind(&q)
        .bind(filter.limit as i64)
        .bind(filter.offset as i64)
        .fetch_all(self.pool())
        .await?;
        let page = rows
            .iter()
            .filter_map(|r| Some((record_from_row(r)?, computer_now(r))))
            .collect();
        Ok((page, total.max(0) as u64))
    }

    /// The history grouped by computer, the one with the newest snapshot first: each group's
    /// computer, how many snapshots it has, its newest; and how many groups match in all.
    pub async fn history_groups(
        &self,
        tenant: TenantId,
        filter: &HistoryFilter,
    ) -> Result<(Vec<(SnapshotRecord, Option<ComputerNow>, u64)>, u64), sqlx::Error> {
        let q = filter.q.as_deref().map(contains_pattern).unwrap_or_default();
        let total: i64 = sqlx::query_scalar(&format!(
            "SELECT COUNT(*) FROM (SELECT s.computer_id {HISTORY_FROM} GROUP BY s.computer_id) g"
        ))
        .bind(tenant.to_string())
        .bind("")
        .bind(&q)
        .fetch_one(self.pool())
        .await?;
        let groups = sqlx::query(&format!(
            "SELECT s.computer_id AS computer_id, COUNT(*) AS n, MAX(s.created_at) AS latest {HISTORY_FROM} \
             GROUP BY s.computer_id ORDER BY latest DESC, computer_id LIMIT $4 OFFSET $5"
        ))
        .bind(tenant.to_string())
        .bind("")
        .bind(&q)
        .bind(filter.limit as i64)
        .bind(filter.offset as i64)
        .fetch_all(self.pool())
        .await?;
        let mut out = Vec::new();
        for g in groups {
            let computer: String = g.try_get("computer_id")?;
            let n: i64 = g.try_get("n")?;
            let Ok(computer) = computer.parse::<ComputerId>() else {
                continue;
            };
            let newest = self
                .history(
                    tenant,
                    &HistoryFilter {
                        computer: Some(computer),
                        q: None,
                        limit: 1,
                        offset: 0,
                    },
                )
                .await?
                .0
                .into_iter()
                .next();
            if let Some((record, now)) = newest {
                out.push((record, now, n.max(0) as u64));
            }
        }
        Ok((out, total.max(0) as u64))
    }

    /// The computer a snapshot was taken of, as it is now.
    pub async fn computer_now(&self, id: ComputerId) -> Result<Option<ComputerNow>, sqlx::Error> {
        let row = sqlx::query("SELECT name AS r_name, status AS r_status FROM computers WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(self.pool())
            .await?;
        Ok(row.as_ref().and_then(computer_now))
    }

    /// Snapshots whose parent `id` is (not deleted), oldest first.
    pub async fn snapshot_children(&self, id: SnapshotId) -> Result<Vec<SnapshotId>, sqlx::Error> {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM snapshots WHERE parent_snapshot_id = $1 AND status <> 'deleted' ORDER BY created_at, id",
        )
        .bind(id.to_string())
        .fetch_all(self.pool())
        .await?;
        Ok(ids.iter().filter_map(|s| s.parse().ok()).collect())
    }

    /// Computers restored or cloned from `id` that still exist, oldest first.
    pub async fn computers_from(&self, id: SnapshotId) -> Result<Vec<ComputerId>, sqlx::Error> {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM computers WHERE source_snapshot_id = $1 AND status <> 'destroyed' ORDER BY created_at, id",
        )
        .bind(id.to_string())
        .fetch_all(self.pool())
        .await?;
        Ok(ids.iter().filter_map(|s| s.parse().ok()).collect())
    }

    /// Computers being restored from `id` right now (`provisioning`, made from it).
    pub async fn restoring_from(&self, id: SnapshotId) -> Result<Vec<ComputerId>, sqlx::Error> {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM computers WHERE source_snapshot_id = $1 AND status = 'provisioning' ORDER BY created_at, id",
        )
        .bind(id.to_string())
        .fetch_all(self.pool())
        .await?;
        Ok(ids.iter().filter_map(|s| s.parse().ok()).collect())
    }

    // ---- names ----

    /// Pins `snapshot` under `name`; `Err(Some(which))` when the name is taken
    /// (`NameConflict::Name`) or the snapshot named already (`NameConflict::Snapshot`).
    pub async fn insert_name(
        &self,
        tenant: TenantId,
        name: &str,
        snapshot: SnapshotId,
    ) -> Result<Result<NameRecord, NameConflict>, sqlx::Error> {
        let created = now();
        let inserted = sqlx::query(
            "INSERT INTO named_snapshots (tenant_id, name, snapshot_id, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT DO NOTHING",
        )
        .bind(tenant.to_string())
        .bind(name)
        .bind(snapshot.to_string())
        .bind(&created)
        .execute(self.pool())
        .await?;
        if inserted.rows_affected() > 0 {
            return Ok(Ok(NameRecord {
                name: name.to_string(),
                snapshot_id: snapshot,
                created_at: parse_time(&created),
            }));
        }
        Ok(Err(match self.get_name(tenant, name).await? {
            Some(_) => NameConflict::Name,
            None => NameConflict::Snapshot,
        }))
    }

    pub async fn get_name(&self, tenant: TenantId, name: &str) -> Result<Option<NameRecord>, sqlx::Error> {
        let row =
            sqlx::query("SELECT name, snapshot_id, created_at FROM named_snapshots WHERE tenant_id = $1 AND name = $2")
                .bind(tenant.to_string())
                .bind(name)
                .fetch_optional(self.pool())
                .await?;
        Ok(row.as_ref().and_then(name_from_row))
    }

    /// The tenant's names, newest first.
    pub async fn list_names(&self, tenant: TenantId) -> Result<Vec<NameRecord>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT name, snapshot_id, created_at FROM named_snapshots WHERE tenant_id = $1 \
             ORDER BY created_at DESC, name",
        )
        .bind(tenant.to_string())
        .fetch_all(self.pool())
        .await?;
        Ok(rows.iter().filter_map(name_from_row).collect())
    }

    /// Removes a name; whether it was there.
    pub async fn delete_name(&self, tenant: TenantId, name: &str) -> Result<bool, sqlx::Error> {
        let done = sqlx::query("DELETE FROM named_snapshots WHERE tenant_id = $1 AND name = $2")
            .bind(tenant.to_string())
            .bind(name)
            .execute(self.pool())
            .await?;
        Ok(done.rows_affected() > 0)
    }

    // ---- hibernation ----

    /// Marks a snapshot as a paused computer's (out of the history and the computer's list).
    pub async fn mark_hibernation(&self, snapshot: SnapshotId) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE snapshots SET kind = 'hibernation' WHERE id = $1")
            .bind(snapshot.to_string())
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// Records (or clears) the snapshot a paused computer resumes from.
    pub async fn set_hibernation(&self, computer: ComputerId, snapshot: Option<SnapshotId>) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE computers SET hibernation_snapshot_id = $1, updated_at = $2 WHERE id = $3")
            .bind(snapshot.map(|s| s.to_string()))
            .bind(now())
            .bind(computer.to_string())
            .execute(self.pool())
            .await?;
        Ok(())
    }

    pub async fn hibernation_of(&self, computer: ComputerId) -> Result<Option<SnapshotId>, sqlx::Error> {
        let id: Option<Option<String>> =
            sqlx::query_scalar("SELECT hibernation_snapshot_id FROM computers WHERE id = $1")
                .bind(computer.to_string())
                .fetch_optional(self.pool())
                .await?;
        Ok(id.flatten().and_then(|s| s.parse().ok()))
    }

    /// The snapshot a computer's disk rests on from now on (a resume from hibernation).
    pub async fn set_source_snapshot(&self, computer: ComputerId, snapshot: SnapshotId) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE computers SET source_snapshot_id = $1, updated_at = $2 WHERE id = $3")
            .bind(snapshot.to_string())
            .bind(now())
            .bind(computer.to_string())
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// A computer's idle time before it is paused by itself (0: never).
    pub async fn auto_stop_seconds(&self, computer: ComputerId) -> Result<u64, sqlx::Error> {
        let n: Option<i64> = sqlx::query_scalar("SELECT auto_stop_seconds FROM computers WHERE id = $1")
            .bind(computer.to_string())
            .fetch_optional(self.pool())
            .await?;
        Ok(n.unwrap_or(0).max(0) as u64)
    }

    pub async fn set_auto_stop_seconds(&self, computer: ComputerId, seconds: u64) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE computers SET auto_stop_seconds = $1 WHERE id = $2")
            .bind(seconds as i64)
            .bind(computer.to_string())
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// Running computers of this platform (`host`: None, embedded) that pause when idle:
    /// `(id, seconds)`.
    pub async fn auto_stopping(
        &self,
        host: Option<&stasis_types::HostId>,
    ) -> Result<Vec<(ComputerId, u64)>, sqlx::Error> {
        let rows =
            match host {
                Some(h) => sqlx::query(
                    "SELECT id, auto_stop_seconds FROM computers WHERE status = 'running' AND auto_stop_seconds > 0 \
                 AND host_id = $1",
                )
                .bind(h.to_string())
                .fetch_all(self.pool())
                .await?,
                None => sqlx::query(
                    "SELECT id, auto_stop_seconds FROM computers WHERE status = 'running' AND auto_stop_seconds > 0 \
                 AND host_id IS NULL",
                )
                .fetch_all(self.pool())
                .await?,
            };
        Ok(rows
            .iter()
            .filter_map(|r| {
                let id: String = r.try_get("id").ok()?;
                let n: i64 = r.try_get("auto_stop_seconds").ok()?;
                Some((id.parse().ok()?, n.max(0) as u64))
            })
            .collect())
    }

    // ---- expiry ----

    /// Snapshots whose time is up at `at`: ready or failed (not while being taken or restored
    /// from), not pinned by a name.
    pub async fn expired_snapshots(&self, at: DateTime<Utc>) -> Result<Vec<SnapshotId>, sqlx::Error> {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM snapshots WHERE status IN ('ready', 'failed') AND expires_at IS NOT NULL \
             AND expires_at <= $1 AND NOT EXISTS (SELECT 1 FROM named_snapshots n WHERE n.snapshot_id = snapshots.id) \
             ORDER BY expires_at",
        )
        .bind(ts(at))
        .fetch_all(self.pool())
        .await?;
        Ok(ids.iter().filter_map(|s| s.parse().ok()).collect())
    }
}

/// Why a name could not be given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameConflict {
    /// The tenant has that name already.
    Name,
    /// The snapshot has a name already.
    Snapshot,
}

fn name_from_row(row: &sqlx::any::AnyRow) -> Option<NameRecord> {
    Some(NameRecord {
        name: row.try_get("name").ok()?,
        snapshot_id: row.try_get::<String, _>("snapshot_id").ok()?.parse().ok()?,
        created_at: parse_time(&row.try_get::<String, _>("created_at").ok()?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use stasis_types::{Computer, Size, Snapshot, SnapshotStatus};

    async fn db() -> (tempfile::TempDir, Db, TenantId) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open_sqlite(&dir.path().join("m.db")).await.unwrap();
        let t = db.ensure_tenant("t").await.unwrap();
        (dir, db, t)
    }

    async fn computer(db: &Db, tenant: TenantId, name: &str) -> ComputerId {
        let now = Utc::now();
        let c = Computer {
            id: ComputerId::new(),
            name: name.into(),
            slug: name.into(),
            status: ComputerStatus::Running,
            template_type: "debian-bookworm".into(),
            size: Size::Xs,
            ip_address: None,
            tenant_id: tenant,
            created_at: now,
            updated_at: now,
            metadata: Default::default(),
            error: None,
            source_snapshot_id: None,
            network: true,
            preview_domain: None,
            sandbox_url: None,
        };
        db.insert_computer(&c, None).await.unwrap();
        c.id
    }

    async fn snapshot(
        db: &Db,
        tenant: TenantId,
        computer: ComputerId,
        parent: Option<SnapshotId>,
        age_ms: i64,
        expires_at: Option<DateTime<Utc>>,
    ) -> SnapshotId {
        let at = Utc::now() - chrono::Duration::milliseconds(age_ms);
        let s = Snapshot {
            id: SnapshotId::new(),
            computer_id: computer,
            tenant_id: tenant,
            comment: None,
            status: SnapshotStatus::Ready,
            state_size_bytes: None,
            memory_size_bytes: None,
            rootfs_size_bytes: None,
            compressed_size_bytes: None,
            uploaded_bytes: None,
            pause_ms: None,
            s3_bucket: None,
            s3_prefix: None,
            parent_snapshot_id: parent,
            error: None,
            created_at: at,
            updated_at: at,
            expires_at,
            name: None,
        };
        db.insert_snapshot(&s, Size::Xs, "box").await.unwrap();
        db.transition_snapshot(s.id, &[SnapshotStatus::Creating], SnapshotStatus::Ready, None)
            .await
            .unwrap();
        s.id
    }

    fn filter(computer: Option<ComputerId>, q: Option<&str>, limit: u64, offset: u64) -> HistoryFilter {
        HistoryFilter {
            computer,
            q: q.map(str::to_string),
            limit,
            offset,
        }
    }

    #[tokio::test]
    async fn history_pages_searches_groups_and_leaves_out_named_and_deleted_snapshots() {
        let (_d, db, t) = db().await;
        let other_tenant = db.ensure_tenant("u").await.unwrap();
        let (a, b) = (computer(&db, t, "Alpha_1").await, computer(&db, t, "beta").await);
        let a1 = snapshot(&db, t, a, None, 5000, None).await;
        let a2 = snapshot(&db, t, a, Some(a1), 4000, None).await;
        let b1 = snapshot(&db, t, b, Some(a2), 3000, None).await;
        let named = snapshot(&db, t, b, Some(b1), 2000, None).await;
        let gone = snapshot(&db, t, b, Some(b1), 1000, None).await;
        db.transition_snapshot(gone, &[SnapshotStatus::Ready], SnapshotStatus::Deleted, None)
            .await
            .unwrap();
        let foreign = computer(&db, other_tenant, "alpha_1").await;
        snapshot(&db, other_tenant, foreign, None, 0, None).await;
        let pinned = db.insert_name(t, "keep", named).await.unwrap().unwrap();
        assert_eq!(pinned.snapshot_id, named);
        assert_eq!(
            db.insert_name(t, "keep", a1).await.unwrap().unwrap_err(),
            NameConflict::Name
        );
        assert_eq!(
            db.insert_name(t, "again", named).await.unwrap().unwrap_err(),
            NameConflict::Snapshot
        );
        assert_eq!(
            db.get_snapshot(named).await.unwrap().unwrap().snapshot.name.as_deref(),
            Some("keep")
        );

        let ids = |page: Vec<(SnapshotRecord, Option<ComputerNow>)>| {
            page.into_iter().map(|(r, _)| r.snapshot.id).collect::<Vec<_>>()
        };
        let (all, total) = db.history(t, &filter(None, None, 50, 0)).await.unwrap();
        assert_eq!(total, 3);
        assert_eq!(
            ids(all),
            [b1, a2, a1],
            "newest first; not the named, deleted or other tenant's"
        );
        let (page, total) = db.history(t, &filter(None, None, 1, 1)).await.unwrap();
        assert_eq!((ids(page), total), (vec![a2], 3));
        // A name's substring in any case, with its wildcard taken literally; ids too.
        let (found, _) = db.history(t, &filter(None, Some("ALPHA_"), 50, 0)).await.unwrap();
        assert_eq!(ids(found), [a2, a1]);
        assert_eq!(db.history(t, &filter(None, Some("alpha%"), 50, 0)).await.unwrap().1, 0);
        let part = &b1.to_string()[4..12];
        assert_eq!(
            ids(db.history(t, &filter(None, Some(part), 50, 0)).await.unwrap().0),
            [b1]
        );
        assert_eq!(
            ids(db.history(t, &filter(Some(a), None, 50, 0)).await.unwrap().0),
            [a2, a1]
        );
        let (with_now, _) = db.history(t, &filter(Some(b), None, 50, 0)).await.unwrap();
        assert_eq!(with_now[0].1.as_ref().map(|c| c.name.as_str()), Some("beta"));

        let (groups, total) = db.history_groups(t, &filter(None, None, 50, 0)).await.unwrap();
        assert_eq!(total, 2);
        let summary: Vec<_> = groups
            .iter()
            .map(|(r, _, n)| (r.snapshot.computer_id, r.snapshot.id, *n))
            .collect();
        assert_eq!(summary, [(b, b1, 1), (a, a2, 2)]);

        assert_eq!(db.snapshot_children(b1).await.unwrap(), [named], "not the deleted one");
        assert_eq!(db.snapshot_children(a1).await.unwrap(), [a2]);
        assert_eq!(
            db.list_names(t)
                .await
                .unwrap()
                .iter()
                .map(|n| n.name.as_str())
                .collect::<Vec<_>>(),
            ["keep"]
        );
        assert!(db.delete_name(t, "keep").await.unwrap());
        assert!(!db.delete_name(t, "keep").await.unwrap());
        assert_eq!(
            db.history(t, &filter(None, None, 50, 0)).await.unwrap().1,
            4,
            "released into the history"
        );
    }

    #[tokio::test]
    async fn expired_snapshots_are_the_ready_or_failed_unnamed_ones_whose_time_passed() {
        let (_d, db, t) = db().await;
        let c = computer(&db, t, "c").await;
        let past = Utc::now() - chrono::Duration::seconds(1);
        let future = Some(Utc::now() + chrono::Duration::hours(1));
        let due = snapshot(&db, t, c, None, 0, Some(past)).await;
        let _later = snapshot(&db, t, c, None, 0, future).await;
        let _never = snapshot(&db, t, c, None, 0, None).await;
        let pinned = snapshot(&db, t, c, None, 0, Some(past)).await;
        db.insert_name(t, "pin", pinned).await.unwrap().unwrap();
        let restoring = snapshot(&db, t, c, None, 0, Some(past)).await;
        assert!(db.begin_restore(restoring).await.unwrap());
        assert_eq!(db.expired_snapshots(Utc::now()).await.unwrap(), [due]);
        let expires = db
            .get_snapshot(due)
            .await
            .unwrap()
            .unwrap()
            .snapshot
            .expires_at
            .unwrap();
        assert!((expires - past).num_milliseconds().abs() <= 1);
    }

    #[test]
    fn search_patterns_escape_wildcards() {
        assert_eq!(contains_pattern("AbC"), "%abc%");
        assert_eq!(contains_pattern("50%_x\\"), "%50\\%\\_x\\\\%");
    }
}
