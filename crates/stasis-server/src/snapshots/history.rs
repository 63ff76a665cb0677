//! The account-wide snapshot surface, as the official SDK's `snapshot_history` calls it:
//! history with paging and search (and grouped by computer), one snapshot by id alone with
//! what depends on it and what descends from it, deletes one at a time or in bulk, forks by
//! snapshot id; and the expiry sweep.

use std::sync::Arc;

use stasis_types::{
    BulkDeleteItem, BulkDeleteRequest, BulkDeleteResponse, DeleteOutcome, Dependent, ForkRequest, HistoryGroup,
    HistoryGroups, HistoryList, HistorySnapshot, SnapshotDetail, SnapshotResource,
};

use super::restore::Fork;
use super::*;
use crate::db::{ComputerNow, HistoryFilter};

/// `limit` when none is given, and the most one page holds.
pub const DEFAULT_PAGE: u64 = 50;
pub const MAX_PAGE: u64 = 200;
/// The most ids one bulk delete names.
pub const MAX_BULK: usize = 200;

/// A page as a query asks for it: `limit` defaults to 50 and is capped at 200.
pub fn page(limit: Option<u64>, offset: Option<u64>) -> Result<(u64, u64)> {
    let limit = match limit {
        None => DEFAULT_PAGE,
        Some(0) => return Err(Error::invalid("limit", "limit must be at least 1")),
        Some(n) => n.min(MAX_PAGE),
    };
    Ok((limit, offset.unwrap_or(0)))
}

/// A search string: at most 200 characters, no control characters.
pub fn search(q: Option<String>) -> Result<Option<String>> {
    let Some(q) = q.map(|q| q.trim().to_string()).filter(|q| !q.is_empty()) else {
        return Ok(None);
    };
    if q.chars().count() > 200 || q.chars().any(char::is_control) {
        return Err(Error::invalid(
            "q",
            "q must be at most 200 characters without control characters",
        ));
    }
    Ok(Some(q))
}

fn resource(record: &SnapshotRecord, now: Option<ComputerNow>) -> SnapshotResource {
    SnapshotResource {
        kind: "computer".into(),
        id: record.snapshot.computer_id,
        name: now
            .as_ref()
            .map_or_else(|| record.computer_name.clone(), |c| c.name.clone()),
        status: now.map(|c| c.status),
    }
}

impl Snapshots {
    /// A snapshot by its id alone: `404 snapshot not found` unless it is this tenant's and
    /// not deleted (another tenant's answers the same).
    pub async fn find_any(&self, tenant: TenantId, id: SnapshotId) -> Result<SnapshotRecord> {
        match self.db.get_snapshot(id).await? {
            Some(r) if r.snapshot.tenant_id == tenant && r.snapshot.status != SnapshotStatus::Deleted => Ok(r),
            _ => Err(Error::not_found(Resource::Snapshot, id)),
        }
    }

    /// A snapshot with the computer it was taken of, as it is now.
    pub async fn with_resource(&self, record: SnapshotRecord) -> Result<HistorySnapshot> {
        let now = self.db.computer_now(record.snapshot.computer_id).await?;
        Ok(HistorySnapshot {
            resource: resource(&record, now),
            snapshot: record.snapshot,
        })
    }

    /// The history: the tenant's snapshots that are neither deleted nor named, newest first.
    pub async fn history(&self, tenant: TenantId, filter: &HistoryFilter) -> Result<HistoryList> {
        let (rows, total) = self.db.history(tenant, filter).await?;
        Ok(HistoryList {
            data: rows
                .into_iter()
                .map(|(record, now)| HistorySnapshot {
                    resource: resource(&record, now),
                    snapshot: record.snapshot,
                })
                .collect(),
            total,
            limit: filter.limit,
            offset: filter.offset,
        })
    }

    /// The history by computer, the one with the newest snapshot first.
    pub async fn history_groups(&self, tenant: TenantId, filter: &HistoryFilter) -> Result<HistoryGroups> {
        let (rows, total) = self.db.history_groups(tenant, filter).await?;
        Ok(HistoryGroups {
            data: rows
                .into_iter()
                .map(|(newest, now, count)| HistoryGroup {
                    resource: resource(&newest, now),
                    snapshot_count: count,
                    latest_snapshot_id: newest.snapshot.id,
                    latest_snapshot_at: newest.snapshot.created_at,
                })
                .collect(),
            total,
            limit: filter.limit,
            offset: filter.offset,
        })
    }

    /// What keeps a snapshot from being deleted now: its name, a capture or restores in
    /// flight.
    pub async fn dependents(&self, record: &SnapshotRecord) -> Result<Vec<Dependent>> {
        let mut out = Vec::new();
        if let Some(name) = &record.snapshot.name {
            out.push(Dependent::NamedSnapshot { name: name.clone() });
        }
        match record.snapshot.status {
            SnapshotStatus::Creating | SnapshotStatus::Uploading => out.push(Dependent::Capture),
            SnapshotStatus::Restoring => {
                for computer_id in self.db.restoring_from(record.snapshot.id).await? {
                    out.push(Dependent::Restore { computer_id });
                }
            }
            _ => {}
        }
        Ok(out)
    }

    /// `GET /snapshots/{id}`: the snapshot, what depends on it, what descends from it.
    pub async fn detail(&self, tenant: TenantId, id: SnapshotId) -> Result<SnapshotDetail> {
        let record = self.find_any(tenant, id).await?;
        let dependents = self.dependents(&record).await?;
        Ok(SnapshotDetail {
            dependents,
            children: self.db.snapshot_children(id).await?,
            computers: self.db.computers_from(id).await?,
            data: self.with_resource(record).await?,
        })
    }

    /// `DELETE /snapshots/{id}`.
    pub async fn delete_any(self: &Arc<Self>, tenant: TenantId, id: SnapshotId) -> Result<Snapshot> {
        let record = self.find_any(tenant, id).await?;
        self.delete_record(record, Deletion::Asked).await
    }

    /// `POST /snapshots/delete`: each snapshot judged on its own, so one that cannot go never
    /// keeps the others.
    pub async fn bulk_delete(self: &Arc<Self>, tenant: TenantId, req: BulkDeleteRequest) -> Result<BulkDeleteResponse> {
        let ids: Vec<String> = match (req.ids, req.resource_id) {
            (Some(_), Some(_)) => {
                return Err(Error::invalid("ids", "give ids or resource_id, not both"));
            }
            (None, None) => {
                return Err(Error::invalid(
                    "ids",
                    "give ids (the snapshots to delete) or resource_id with all: true and confirm (a computer's whole history)",
                ))
            }
            (Some(ids), None) => {
                if ids.is_empty() || ids.len() > MAX_BULK {
                    return Err(Error::invalid(
                        "ids",
                        format!("ids must name 1 to {MAX_BULK} snapshots (got {})", ids.len()),
                    ));
                }
                if req.all.is_some() || req.confirm.is_some() {
                    return Err(Error::invalid(
                        "all",
                        "all and confirm go with resource_id (a computer's whole history), not with ids",
                    ));
                }
                ids
            }
            (None, Some(resource)) => {
                if req.all != Some(true) {
                    return Err(Error::invalid(
                        "all",
                        "deleting a computer's whole history needs all: true",
                    ));
                }
                if req.confirm.as_deref() != Some(resource.as_str()) {
                    return Err(Error::invalid(
                        "confirm",
                        format!("confirm must equal resource_id ({resource:?}) to delete its whole history"),
                    ));
                }
                let computer: ComputerId = resource
                    .parse()
                    .map_err(|_| Error::not_found(Resource::Computer, &resource))?;
                match self.db.get_computer_any(computer).await? {
                    Some(c) if c.tenant_id == tenant => {}
                    _ => return Err(Error::not_found(Resource::Computer, computer)),
                }
                // The history only: named snapshots are not in it.
                let filter = HistoryFilter {
                    computer: Some(computer),
                    q: None,
                    limit: i64::MAX as u64,
                    offset: 0,
                };
                let (rows, _) = self.db.history(tenant, &filter).await?;
                rows.into_iter().map(|(r, _)| r.snapshot.id.to_string()).collect()
            }
        };
        let mut data = Vec::with_capacity(ids.len());
        let mut deleted = 0;
        for raw in ids {
            let item = |outcome, error: Option<String>, dependents| BulkDeleteItem {
                id: raw.clone(),
                outcome,
                error,
                dependents,
            };
            let Ok(id) = raw.parse::<SnapshotId>() else {
                data.push(item(
                    DeleteOutcome::NotFound,
                    Some(format!("snapshot {raw} not found")),
                    vec![],
                ));
                continue;
            };
            let record = match self.find_any(tenant, id).await {
                Ok(r) => r,
                Err(e @ Error::NotFound { .. }) => {
                    data.push(item(DeleteOutcome::NotFound, Some(e.to_string()), vec![]));
                    continue;
                }
                Err(e) => return Err(e),
            };
            let dependents = self.dependents(&record).await?;
            match self.delete_record(record, Deletion::Asked).await {
                Ok(_) => {
                    deleted += 1;
                    data.push(item(DeleteOutcome::Deleted, None, vec![]));
                }
                Err(e @ Error::Conflict { .. }) => {
                    data.push(item(DeleteOutcome::InUse, Some(e.to_string()), dependents))
                }
                Err(e @ Error::NotFound { .. }) => {
                    data.push(item(DeleteOutcome::NotFound, Some(e.to_string()), vec![]))
                }
                Err(e) => return Err(e),
            }
        }
        Ok(BulkDeleteResponse { data, deleted })
    }

    /// What a fork or deploy asks for, checked: environments are not a part of this platform.
    pub fn validate_fork(req: ForkRequest, suffix: &'static str) -> Result<Fork> {
        if req.environment.is_some() || req.environment_id.is_some() {
            let field = if req.environment.is_some() {
                "environment"
            } else {
                "environment_id"
            };
            return Err(Error::invalid(
                field,
                "this platform has no environments: a fork starts with the snapshot's own environment variables \
                 (or none, with no_env: true)",
            ));
        }
        let name = req.name.as_deref().map(crate::computers::check_name).transpose()?;
        Ok(Fork {
            name,
            suffix,
            env_from_snapshot: !req.no_env.unwrap_or(false),
            wait_until_ready: false,
        })
    }

    /// `POST /snapshots/{id}/fork`: the snapshot restored into a new computer, by its id alone
    /// (its computer may be gone).
    pub async fn fork(self: &Arc<Self>, tenant: TenantId, id: SnapshotId, fork: Fork) -> Result<Computer> {
        let record = self.find_any(tenant, id).await?;
        self.restore_record(tenant, record, fork).await
    }

    /// Deletes the snapshots whose time is up (not named ones, not while they are being
    /// taken or restored from); returns how many went.
    pub async fn expire(self: &Arc<Self>) -> Result<usize> {
        let mut gone = 0;
        for id in self.db.expired_snapshots(Utc::now()).await? {
            let Some(record) = self.db.get_snapshot(id).await? else {
                continue;
            };
            match self.delete_record(record, Deletion::Expired).await {
                Ok(_) => {
                    tracing::info!(%id, "snapshot expired and deleted");
                    gone += 1;
                }
                // Named or restored from meanwhile: it goes at a later sweep, if still due.
                Err(Error::Conflict { message, .. }) => tracing::debug!(%id, message, "expired snapshot kept for now"),
                Err(e) => tracing::warn!(%id, error = %e, "deleting an expired snapshot"),
            }
        }
        Ok(gone)
    }

    /// Sweeps expired snapshots every `every` for as long as the platform runs (where
    /// collection runs: the embedded platform or the control plane).
    pub fn spawn_expiry(self: &Arc<Self>, every: std::time::Duration) -> tokio::task::JoinHandle<()> {
        self.every(every, "sweeping expired snapshots", |s| {
            Box::pin(async move { s.expire().await.map(drop) })
        })
    }

    /// Runs `work` every `period` for as long as the platform runs (it holds the platform
    /// only while it works), logging its failures as `what`.
    pub(crate) fn every(
        self: &Arc<Self>,
        period: std::time::Duration,
        what: &'static str,
        work: fn(Arc<Self>) -> futures::future::BoxFuture<'static, Result<()>>,
    ) -> tokio::task::JoinHandle<()> {
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(this) = this.upgrade() else { return };
                if let Err(e) = work(this).await {
                    tracing::warn!(error = %e, "{what}");
                }
            }
        })
    }
}
