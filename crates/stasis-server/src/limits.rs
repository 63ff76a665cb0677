//! Tenant limits: a request rate per tenant (a token bucket, answered with 429 and
//! `Retry-After`), and quotas on what a tenant holds — computers running, snapshots kept, bytes
//! stored — answered with 403 `QUOTA_EXCEEDED` naming the quota. The platform's defaults come
//! from `stasis serve` flags (a control plane passes them to its hosts); the operator can set
//! a tenant's own with `stasis tenant limits`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use stasis_types::TenantId;

use crate::db::Db;
use crate::error::{Error, Result};

/// Limits of one tenant (kept with their table).
pub use crate::db::limits::TenantLimits;

/// What a tenant is about to add.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// One more computer holding memory (create, restore, clone, start).
    Computer,
    /// One more snapshot (snapshot create, clone).
    Snapshot,
}

pub struct Limits {
    db: Db,
    defaults: TenantLimits,
    /// tokens, last refill.
    buckets: Mutex<HashMap<TenantId, (f64, Instant)>>,
    /// Overrides read from the database, kept briefly so the rate check costs no query.
    overrides: Mutex<HashMap<TenantId, (TenantLimits, Instant)>>,
}

pub const OVERRIDES_FOR: Duration = Duration::from_secs(5);

impl Limits {
    pub fn new(db: Db, defaults: TenantLimits) -> Limits {
        Limits {
            db,
            defaults,
            buckets: Mutex::new(HashMap::new()),
            overrides: Mutex::new(HashMap::new()),
        }
    }

    pub fn defaults(&self) -> TenantLimits {
        self.defaults
    }

    /// The limits that apply to `tenant` now.
    pub async fn of(&self, tenant: TenantId) -> Result<TenantLimits> {
        if let Some((l, at)) = self.overrides.lock().unwrap_or_else(|p| p.into_inner()).get(&tenant) {
            if at.elapsed() < OVERRIDES_FOR {
                return Ok(l.over(self.defaults));
            }
        }
        let own = self.db.tenant_limits(tenant).await?;
        self.overrides
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(tenant, (own, Instant::now()));
        Ok(own.over(self.defaults))
    }

    /// Takes one request from the tenant's bucket, or says how long to wait.
    pub async fn admit_request(&self, tenant: TenantId) -> Result<()> {
        let Some(rate) = self.of(tenant).await?.rate_per_sec.filter(|r| *r > 0) else {
            return Ok(());
        };
        let rate = rate as f64;
        let burst = rate * 2.0;
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let (tokens, last) = buckets.entry(tenant).or_insert((burst, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * rate).min(burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            return Ok(());
        }
        let wait = ((1.0 - *tokens) / rate).ceil().max(1.0) as u64;
        Err(Error::Throttled {
            retry_after_secs: wait,
            limit: rate as u64,
        })
    }

    /// Refuses what would take the tenant past a quota; otherwise returns the lock that keeps
    /// every other admission of this tenant (on any host) waiting until the caller has recorded
    /// what it admits (drop it after the insert).
    pub async fn admit(&self, tenant: TenantId, want: Want) -> Result<crate::db::limits::QuotaLock> {
        let lock = self.db.lock_quota(tenant).await?;
        self.check(tenant, want).await?;
        Ok(lock)
    }

    /// The bytes-stored quota once a snapshot's size is known: refuses (with the message
    /// naming it) when `adding` more would pass it; otherwise returns the lock to hold until
    /// the snapshot is recorded, so two finishing at once cannot both pass.
    pub async fn admit_stored(&self, tenant: TenantId, adding: u64) -> Result<crate::db::limits::QuotaLock> {
        let lock = self.db.lock_quota(tenant).await?;
        if let Some(max) = self.of(tenant).await?.max_stored_bytes {
            let used = self.db.tenant_usage(tenant).await?.stored_bytes;
            let with = used.saturating_add(adding);
            if with > max {
                return Err(Error::Quota(format!(
                    "quota exceeded: bytes stored ({used} stored and this snapshot's {adding} would be {with}, \
                     of {max}); delete snapshots first"
                )));
            }
        }
        Ok(lock)
    }

    /// Refuses what would take the tenant past a quota (an early answer; [`Limits::admit`]
    /// is the check that holds).
    pub async fn check(&self, tenant: TenantId, want: Want) -> Result<()> {
        let limits = self.of(tenant).await?;
        if limits.max_computers.is_none() && limits.max_snapshots.is_none() && limits.max_stored_bytes.is_none() {
            return Ok(());
        }
        let usage = self.db.tenant_usage(tenant).await?;
        let within = |used: u64, max: Option<u64>, what: &str, fix: &str| match max {
            Some(max) if used >= max => Err(Error::Quota(format!("quota exceeded: {what} ({used} of {max}); {fix}"))),
            _ => Ok(()),
        };
        match want {
            Want::Computer => within(
                usage.computers,
                limits.max_computers,
                "computers running",
                "stop or delete one first",
            ),
            Want::Snapshot => {
                within(
                    usage.snapshots,
                    limits.max_snapshots,
                    "snapshots kept",
                    "delete one first",
                )?;
                within(
                    usage.stored_bytes,
                    limits.max_stored_bytes,
                    "bytes stored",
                    "delete snapshots first",
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_win_over_defaults_field_by_field() {
        let defaults = TenantLimits {
            max_computers: Some(10),
            max_snapshots: Some(100),
            max_stored_bytes: None,
            rate_per_sec: Some(50),
        };
        let own = TenantLimits {
            max_computers: Some(2),
            rate_per_sec: Some(0),
            ..Default::default()
        };
        let l = own.over(defaults);
        assert_eq!(l.max_computers, Some(2));
        assert_eq!(l.max_snapshots, Some(100));
        assert_eq!(l.max_stored_bytes, None);
        assert_eq!(l.rate_per_sec, Some(0), "0 turns the rate limit off for this tenant");
    }
}
