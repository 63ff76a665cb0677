//! Named snapshots: a name, unique per tenant, that pins one snapshot. A named snapshot is
//! kept until the name is removed (it does not expire and is not in the history), and can be
//! deployed into a new computer by its name, whether its computer still exists or not.

use std::sync::Arc;

use stasis_types::{
    CreateNamedSnapshotRequest, NameAllowance, NameOutcome, NameRemoved, NamedSnapshot, NamedSnapshotDetail,
    NamedSnapshotList, NamedStatus,
};

use super::restore::Fork;
use super::*;
use crate::db::{NameConflict, NameRecord};

/// Longest name.
pub const MAX_NAME_CHARS: usize = 64;

/// A name as given: 1 to 64 of letters, digits, `.`, `_` and `-`, starting with a letter or
/// digit (it goes in URL paths as it is).
pub fn check_name(raw: &str) -> Result<String> {
    let ok = !raw.is_empty()
        && raw.len() <= MAX_NAME_CHARS
        && raw.starts_with(|c: char| c.is_ascii_alphanumeric())
        && raw
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !ok {
        return Err(Error::invalid(
            "name",
            format!(
                "name must be 1 to {MAX_NAME_CHARS} letters, digits, '.', '_' or '-', starting with a letter or digit \
                 (got {raw:?})"
            ),
        ));
    }
    Ok(raw.to_string())
}

/// Where the snapshot a name pins is.
fn named_status(status: SnapshotStatus) -> NamedStatus {
    match status {
        SnapshotStatus::Creating | SnapshotStatus::Uploading => NamedStatus::Saving,
        SnapshotStatus::Ready | SnapshotStatus::Restoring => NamedStatus::Ready,
        SnapshotStatus::Failed | SnapshotStatus::Deleted => NamedStatus::Failed,
    }
}

/// The one source a create names.
enum Source {
    Snapshot(SnapshotId),
    Computer(ComputerId),
}

impl Snapshots {
    async fn named(&self, name: NameRecord) -> Result<NamedSnapshot> {
        let record =
            self.db.get_snapshot(name.snapshot_id).await?.ok_or_else(|| {
                Error::internal(format!("the name {:?} pins a snapshot that is not recorded", name.name))
            })?;
        let status = named_status(record.snapshot.status);
        let full = self.with_resource(record).await?;
        Ok(NamedSnapshot {
            name: name.name,
            snapshot_id: name.snapshot_id,
            status,
            resource: full.resource,
            created_at: name.created_at,
            snapshot: full.snapshot,
        })
    }

    async fn find_name(&self, tenant: TenantId, name: &str) -> Result<NameRecord> {
        self.db
            .get_name(tenant, name)
            .await?
            .ok_or_else(|| Error::not_found(Resource::NamedSnapshot, name))
    }

    /// `GET /named-snapshots`: the tenant's names, newest first.
    pub async fn list_named(&self, tenant: TenantId) -> Result<NamedSnapshotList> {
        let mut data = Vec::new();
        for name in self.db.list_names(tenant).await? {
            data.push(self.named(name).await?);
        }
        Ok(NamedSnapshotList {
            data,
            allowance: NameAllowance {
                per_name_cents: 0,
                free_names: None,
            },
        })
    }

    /// `GET /named-snapshots/{name}`.
    pub async fn get_named(&self, tenant: TenantId, name: &str) -> Result<NamedSnapshotDetail> {
        let found = self.find_name(tenant, name).await?;
        let data = self.named(found).await?;
        let record = self.find_any(tenant, data.snapshot_id).await?;
        Ok(NamedSnapshotDetail {
            dependents: self.dependents(&record).await?,
            data,
        })
    }

    /// `POST /named-snapshots`: a name over a snapshot there is (`snapshot_id`), or over a new
    /// one of a computer (`computer_id`). An existing name is never replaced.
    pub async fn create_named(
        self: &Arc<Self>,
        tenant: TenantId,
        req: CreateNamedSnapshotRequest,
    ) -> Result<NamedSnapshotDetail> {
        let name = check_name(&req.name)?;
        if req.sandbox_id.is_some() {
            return Err(Error::invalid(
                "sandbox_id",
                "this platform has computers, not sandboxes: give computer_id or snapshot_id",
            ));
        }
        let source = match (req.snapshot_id, req.computer_id) {
            (Some(_), Some(_)) => {
                return Err(Error::invalid(
                    "snapshot_id",
                    "give exactly one source: snapshot_id or computer_id, not both",
                ))
            }
            (None, None) => {
                return Err(Error::invalid(
                    "snapshot_id",
                    "give exactly one source: snapshot_id (pin it) or computer_id (take a new snapshot and pin it)",
                ))
            }
            (Some(s), None) => Source::Snapshot(s.parse().map_err(|_| Error::not_found(Resource::Snapshot, &s))?),
            (None, Some(c)) => Source::Computer(c.parse().map_err(|_| Error::not_found(Resource::Computer, &c))?),
        };
        // Refused before a snapshot is taken for it.
        if self.db.get_name(tenant, &name).await?.is_some() {
            return Err(taken(&name));
        }
        let snapshot = match source {
            Source::Snapshot(id) => {
                let record = self.find_any(tenant, id).await?;
                if record.snapshot.status == SnapshotStatus::Failed {
                    return Err(Error::conflict(
                        crate::error::Conflict::SnapshotNotReady,
                        format!("snapshot {id} failed; there is nothing to name"),
                    ));
                }
                id
            }
            Source::Computer(computer) => {
                let comment = Some(format!("named {name}"));
                let new = NewSnapshot {
                    comment,
                    expiry: Expiry::Never,
                };
                self.create(tenant, computer, new).await?.id
            }
        };
        let pinned = match self.db.insert_name(tenant, &name, snapshot).await? {
            Ok(pinned) => pinned,
            Err(NameConflict::Name) => return Err(taken(&name)),
            Err(NameConflict::Snapshot) => {
                let other = self
                    .db
                    .get_snapshot(snapshot)
                    .await?
                    .and_then(|r| r.snapshot.name)
                    .unwrap_or_default();
                return Err(Error::conflict(
                    crate::error::Conflict::SnapshotAlreadyNamed,
                    format!("snapshot {snapshot} is pinned by the name {other:?} already"),
                ));
            }
        };
        let data = self.named(pinned).await?;
        Ok(NamedSnapshotDetail {
            dependents: Vec::new(),
            data,
        })
    }

    /// `DELETE /named-snapshots/{name}`: the name goes; its snapshot goes back to the history
    /// (`released`), or is deleted at once when its expiry passed while it was pinned or it
    /// failed (`deleted`), or stays as it is while a computer is being restored from it
    /// (`kept`: the next expiry sweep takes it if it is due).
    pub async fn delete_named(self: &Arc<Self>, tenant: TenantId, name: &str) -> Result<NameRemoved> {
        let found = self.find_name(tenant, name).await?;
        let data = self.named(found).await?;
        if !self.db.delete_name(tenant, name).await? {
            return Err(Error::not_found(Resource::NamedSnapshot, name));
        }
        let id = data.snapshot_id;
        let record = self.db.get_snapshot(id).await?;
        let due = record.as_ref().is_some_and(|r| {
            r.snapshot.status == SnapshotStatus::Failed || r.snapshot.expires_at.is_some_and(|t| t <= Utc::now())
        });
        let outcome = match record {
            Some(r) if due => match self.delete_record(r, Deletion::Expired).await {
                Ok(_) => NameOutcome::Deleted,
                Err(Error::Conflict { .. }) => NameOutcome::Kept,
                Err(e) => return Err(e),
            },
            Some(r) if r.snapshot.status == SnapshotStatus::Restoring => NameOutcome::Kept,
            _ => NameOutcome::Released,
        };
        Ok(NameRemoved { data, outcome })
    }

    /// `POST /named-snapshots/{name}/deploy`: the named snapshot restored into a new computer.
    pub async fn deploy(self: &Arc<Self>, tenant: TenantId, name: &str, fork: Fork) -> Result<Computer> {
        let found = self.find_name(tenant, name).await?;
        let record = self.find_any(tenant, found.snapshot_id).await?;
        if named_status(record.snapshot.status) == NamedStatus::Saving {
            return Err(Error::conflict(
                crate::error::Conflict::SnapshotNotReady,
                format!("the named snapshot {name:?} is still being saved; retry once it is ready"),
            ));
        }
        self.restore_record(tenant, record, fork).await
    }

    /// The snapshot a name pins (for placing its deploy).
    pub async fn named_record(&self, tenant: TenantId, name: &str) -> Result<SnapshotRecord> {
        let found = self.find_name(tenant, name).await?;
        self.find_any(tenant, found.snapshot_id).await
    }
}

fn taken(name: &str) -> Error {
    Error::conflict(
        crate::error::Conflict::NameTaken,
        format!("the name {name:?} is taken (names are never replaced: delete it first)"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_url_safe_and_bounded() {
        for ok in ["base", "py3.12_env-2", "0"] {
            assert_eq!(check_name(ok).unwrap(), ok);
        }
        let long = "a".repeat(MAX_NAME_CHARS + 1);
        for bad in ["", "-x", ".x", "a b", "a/b", "ü", long.as_str()] {
            let e = check_name(bad).unwrap_err();
            assert!(
                matches!(&e, Error::Invalid { field, .. } if field == "name"),
                "{bad:?}: {e}"
            );
        }
    }
}
