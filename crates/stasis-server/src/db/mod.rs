//! Metadata in SQL: tenants, API keys, computers. Written against sqlx's `Any` driver with
//! portable SQL, so the same queries serve SQLite (the embedded default) and PostgreSQL.

mod env;
mod history;
mod hosts;
mod jobs;
mod keys;
pub mod limits;
mod policies;
mod ports;
mod snapshots;

pub use history::{ComputerNow, HistoryFilter, NameConflict, NameRecord};
pub use hosts::{HostRecord, HostStatus};
pub use jobs::{JobEnd, JobKind, JobRecord};
pub use keys::WrappedKey;
pub use ports::PortRecord;
pub use snapshots::{Idempotency, SnapshotRecord};

use chrono::{DateTime, SecondsFormat, Utc};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};
use stasis_types::{Computer, ComputerId, ComputerStatus, HostId, Size, SnapshotId, TenantId};

/// Schema migrations, in order: `migrations/NNNN_name.sql`, applied by sqlx (each once, inside a
/// transaction, recorded with its checksum in `_sqlx_migrations`). They are written in the SQL
/// that SQLite and PostgreSQL share (TEXT, BIGINT, `ON CONFLICT`), so one set serves both.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The advisory lock PostgreSQL processes take while they bring the schema up to date.
const MIGRATION_LOCK: i64 = 7355608;

/// Which database a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Clone)]
pub struct Db {
    pool: AnyPool,
    backend: Backend,
}

pub fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true)
}

pub(crate) fn parse_time(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or_default()
}

impl Db {
    /// Opens the database a URL names: `sqlite://PATH` or `postgres://USER@HOST:PORT/DB`
    /// (`postgresql://` too), and brings its schema up to date.
    pub async fn open(url: &str) -> Result<Db, sqlx::Error> {
        if let Some(path) = url.strip_prefix("sqlite://") {
            let path = path.split('?').next().unwrap_or(path);
            return Db::open_sqlite(std::path::Path::new(path)).await;
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Db::open_postgres(url).await;
        }
        Err(sqlx::Error::Configuration(
            format!(
                "unsupported database URL {:?}: use sqlite://PATH or postgres://USER@HOST:PORT/DB",
                redact(url)
            )
            .into(),
        ))
    }

    /// Opens (creating if needed) the SQLite database at `path` and brings its schema up to date.
    pub async fn open_sqlite(path: &std::path::Path) -> Result<Db, sqlx::Error> {
        sqlx::any::install_default_drivers();
        let url = format!("sqlite://{}?mode=rwc", path.display());
        let pool = AnyPoolOptions::new()
            .max_connections(8)
            .after_connect(|conn, _| {
                Box::pin(async move {
                    // Concurrent writers wait instead of failing; WAL lets readers go on.
                    sqlx::query("PRAGMA busy_timeout = 10000").execute(&mut *conn).await?;
                    sqlx::query("PRAGMA journal_mode = WAL").execute(&mut *conn).await?;
                    sqlx::query("PRAGMA synchronous = NORMAL").execute(&mut *conn).await?;
                    sqlx::query("PRAGMA foreign_keys = ON").execute(&mut *conn).await?;
                    Ok(())
                })
            })
            .connect(&url)
            .await?;
        let db = Db {
            pool,
            backend: Backend::Sqlite,
        };
        let mut conn = db.pool.acquire().await?;
        db.migrate(&mut conn).await?;
        Ok(db)
    }

    /// Connects to a PostgreSQL server and brings the schema up to date. Several processes may
    /// start at once: an advisory lock lets one migrate while the others wait.
    pub async fn open_postgres(url: &str) -> Result<Db, sqlx::Error> {
        sqlx::any::install_default_drivers();
        let pool = AnyPoolOptions::new()
            .max_connections(32)
            .acquire_timeout(std::time::Duration::from_secs(10))
            .connect(url)
            .await?;
        let db = Db {
            pool,
            backend: Backend::Postgres,
        };
        let mut conn = db.pool.acquire().await?;
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(MIGRATION_LOCK)
            .execute(&mut *conn)
            .await?;
        let migrated = db.migrate(&mut conn).await;
        sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(MIGRATION_LOCK)
            .execute(&mut *conn)
            .await?;
        migrated?;
        Ok(db)
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Brings the schema up to date on `conn` (under the caller's lock on PostgreSQL).
    async fn migrate(&self, conn: &mut sqlx::AnyConnection) -> Result<(), sqlx::Error> {
        self.adopt_old_migrations(conn).await?;
        MIGRATOR.run(&mut *conn).await?;
        Ok(())
    }

    /// The bridge from the runner before sqlx's: it recorded the versions it applied in
    /// `schema_migrations (version, applied_at)`. Each version found there and not yet in
    /// `_sqlx_migrations` is entered there as applied, with the checksum of today's file, so
    /// sqlx neither runs it again nor takes it for a changed migration. `schema_migrations` is
    /// left as it is (an older binary still finds its own record). Versions this build does not
    /// know are left out, as the old runner ignored them too. Idempotent.
    async fn adopt_old_migrations(&self, conn: &mut sqlx::AnyConnection) -> Result<(), sqlx::Error> {
        use sqlx::migrate::Migrate;
        let exists = match self.backend {
            Backend::Sqlite => "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'",
            Backend::Postgres => {
                "SELECT COUNT(*) FROM information_schema.tables \
                 WHERE table_schema = current_schema() AND table_name = 'schema_migrations'"
            }
        };
        let n: i64 = sqlx::query_scalar(exists).fetch_one(&mut *conn).await?;
        if n == 0 {
            return Ok(());
        }
        conn.ensure_migrations_table().await?;
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        let old: Vec<i64> = sqlx::query_scalar(
            "SELECT version FROM schema_migrations WHERE version NOT IN (SELECT version FROM _sqlx_migrations) \
             ORDER BY version",
        )
        .fetch_all(&mut *tx)
        .await?;
        for version in old {
            let Some(m) = MIGRATOR.iter().find(|m| m.version == version) else {
                continue;
            };
            sqlx::query(
                "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
                 VALUES ($1, $2, TRUE, $3, 0)",
            )
            .bind(m.version)
            .bind(m.description.to_string())
            .bind(m.checksum.to_vec())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await
    }

    // ---- tenants and keys ----

    /// Returns the tenant called `name`, creating it if needed.
    pub async fn ensure_tenant(&self, name: &str) -> Result<TenantId, sqlx::Error> {
        if let Some(id) = self.tenant_by_name(name).await? {
            return Ok(id);
        }
        let id = TenantId::new();
        sqlx::query("INSERT INTO tenants (id, name, created_at) VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING")
            .bind(id.to_string())
            .bind(name)
            .bind(now())
            .execute(&self.pool)
            .await?;
        Ok(self.tenant_by_name(name).await?.unwrap_or(id))
    }

    pub async fn tenant_by_name(&self, name: &str) -> Result<Option<TenantId>, sqlx::Error> {
        let id: Option<String> = sqlx::query_scalar("SELECT id FROM tenants WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(id.and_then(|s| s.parse().ok()))
    }

    pub async fn insert_key(&self, tenant: TenantId, key_hash: &str, prefix: &str) -> Result<(), sqlx::Error> {
        sqlx::query("INSERT INTO api_keys (id, tenant_id, key_hash, prefix, created_at) VALUES ($1, $2, $3, $4, $5)")
            .bind(uuid::Uuid::new_v4().to_string())
            .bind(tenant.to_string())
            .bind(key_hash)
            .bind(prefix)
            .bind(now())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn count_keys(&self, tenant: TenantId) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar("SELECT COUNT(*) FROM api_keys WHERE tenant_id = $1")
            .bind(tenant.to_string())
            .fetch_one(&self.pool)
            .await
    }

    pub async fn tenant_by_key_hash(&self, key_hash: &str) -> Result<Option<TenantId>, sqlx::Error> {
        let id: Option<String> = sqlx::query_scalar("SELECT tenant_id FROM api_keys WHERE key_hash = $1")
            .bind(key_hash)
            .fetch_optional(&self.pool)
            .await?;
        Ok(id.and_then(|s| s.parse().ok()))
    }

    // ---- computers ----

    /// Records a new computer, run by `host` (None: this platform itself).
    /// Records a new computer. Its slug names it in preview URLs, so live computers' slugs are
    /// unique: when `c.slug` is taken, the id's first eight characters are appended. Returns
    /// the slug it got.
    pub async fn insert_computer(&self, c: &Computer, host: Option<&HostId>) -> Result<String, sqlx::Error> {
        let suffixed = || {
            let id = c.id.to_string();
            let base: String = c.slug.chars().take(63 - 9).collect();
            format!("{}-{}", base.trim_end_matches('-'), &id[..8])
        };
        let taken = self.slug_taken(&c.slug).await?;
        let first = if taken { suffixed() } else { c.slug.clone() };
        match self.insert_computer_as(c, host, &first).await {
            Ok(()) => Ok(first),
            // Taken between the check and the insert.
            Err(_) if !taken => {
                let slug = suffixed();
                self.insert_computer_as(c, host, &slug).await?;
                Ok(slug)
            }
            Err(e) => Err(e),
        }
    }

    async fn slug_taken(&self, slug: &str) -> Result<bool, sqlx::Error> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM computers WHERE slug = $1 AND status <> 'destroyed'")
            .bind(slug)
            .fetch_one(&self.pool)
            .await?;
        Ok(n > 0)
    }

    /// A live computer by its slug, whatever its tenant (preview URLs carry no tenant).
    pub async fn computer_by_slug(&self, slug: &str) -> Result<Option<Computer>, sqlx::Error> {
        let row = sqlx::query(&format!("{SELECT_COMPUTER} WHERE slug = $1 AND status <> 'destroyed'"))
            .bind(slug)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().and_then(computer_from_row))
    }

    async fn insert_computer_as(&self, c: &Computer, host: Option<&HostId>, slug: &str) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO computers (id, tenant_id, name, slug, status, template_type, size, metadata, error, \
             source_snapshot_id, created_at, updated_at, host_id, network) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
        )
        .bind(c.id.to_string())
        .bind(c.tenant_id.to_string())
        .bind(&c.name)
        .bind(slug)
        .bind(c.status.as_str())
        .bind(&c.template_type)
        .bind(c.size.as_str())
        .bind(serde_json::Value::Object(c.metadata.clone()).to_string())
        .bind(c.error.clone())
        .bind(c.source_snapshot_id.map(|s| s.to_string()))
        .bind(c.created_at.to_rfc3339_opts(SecondsFormat::Millis, true))
        .bind(c.updated_at.to_rfc3339_opts(SecondsFormat::Millis, true))
        .bind(host.map(|h| h.as_str().to_string()))
        .bind(i64::from(c.network))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Whether the database records `id` as destroyed (a computer it has never heard of is
    /// not: its files may be another database's).
    pub async fn computer_destroyed(&self, id: ComputerId) -> Result<bool, sqlx::Error> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM computers WHERE id = $1 AND status = 'destroyed'")
            .bind(id.to_string())
            .fetch_one(&self.pool)
            .await?;
        Ok(n > 0)
    }

    /// A computer that is not destroyed, whatever its tenant.
    pub async fn get_computer(&self, id: ComputerId) -> Result<Option<Computer>, sqlx::Error> {
        let row = sqlx::query(&format!("{SELECT_COMPUTER} WHERE id = $1 AND status <> 'destroyed'"))
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().and_then(computer_from_row))
    }

    /// A computer whatever its state, destroyed included (snapshots outlive their computer).
    pub async fn get_computer_any(&self, id: ComputerId) -> Result<Option<Computer>, sqlx::Error> {
        let row = sqlx::query(&format!("{SELECT_COMPUTER} WHERE id = $1"))
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().and_then(computer_from_row))
    }

    pub async fn list_computers(&self, tenant: TenantId) -> Result<Vec<Computer>, sqlx::Error> {
        let rows = sqlx::query(&format!(
            "{SELECT_COMPUTER} WHERE tenant_id = $1 AND status <> 'destroyed' ORDER BY created_at, id"
        ))
        .bind(tenant.to_string())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().filter_map(computer_from_row).collect())
    }

    /// Computers in any of `statuses` run by `host` (None: this platform itself), across
    /// tenants (for reconciliation).
    pub async fn computers_in(
        &self,
        statuses: &[ComputerStatus],
        host: Option<&HostId>,
    ) -> Result<Vec<Computer>, sqlx::Error> {
        if statuses.is_empty() {
            return Ok(Vec::new());
        }
        let placeholders: Vec<String> = (1..=statuses.len()).map(|i| format!("${i}")).collect();
        let scope = match host {
            Some(_) => format!("host_id = ${}", statuses.len() + 1),
            None => "host_id IS NULL".to_string(),
        };
        let sql = format!(
            "{SELECT_COMPUTER} WHERE status IN ({}) AND {scope} ORDER BY created_at",
            placeholders.join(", ")
        );
        let mut query = sqlx::query(&sql);
        for s in statuses {
            query = query.bind(s.as_str());
        }
        if let Some(h) = host {
            query = query.bind(h.to_string());
        }
        let rows = query.fetch_all(&self.pool).await?;
        Ok(rows.iter().filter_map(computer_from_row).collect())
    }

    /// Sets status and error (the error is cleared unless given). A destroyed computer stays
    /// destroyed. Returns whether a row changed.
    pub async fn set_status(
        &self,
        id: ComputerId,
        status: ComputerStatus,
        error: Option<&str>,
    ) -> Result<bool, sqlx::Error> {
        // Only a running computer has an address.
        let done = sqlx::query(
            "UPDATE computers SET status = $1, error = $2, updated_at = $3, \
             ip_address = CASE WHEN $1 = 'running' THEN ip_address ELSE NULL END \
             WHERE id = $4 AND status <> 'destroyed'",
        )
        .bind(status.as_str())
        .bind(error.map(str::to_string))
        .bind(now())
        .bind(id.to_string())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Gives a (stopped) computer another size, for its next start.
    pub async fn set_size(&self, id: ComputerId, size: stasis_types::Size) -> Result<(), sqlx::Error> {
        let now = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
        sqlx::query("UPDATE computers SET size = $1, updated_at = $2 WHERE id = $3")
            .bind(size.as_str())
            .bind(now)
            .bind(id.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Renames a computer and/or replaces its metadata (what is `None` stays).
    pub async fn update_computer(
        &self,
        id: ComputerId,
        name: Option<&str>,
        metadata: Option<&serde_json::Map<String, serde_json::Value>>,
    ) -> Result<(), sqlx::Error> {
        let now = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
        sqlx::query(
            "UPDATE computers SET name = COALESCE($1, name), metadata = COALESCE($2, metadata), updated_at = $3 \
             WHERE id = $4",
        )
        .bind(name.map(str::to_string))
        .bind(metadata.map(|m| serde_json::Value::Object(m.clone()).to_string()))
        .bind(now)
        .bind(id.to_string())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records the address a computer's network has on its host (None: it has none).
    pub async fn set_ip_address(&self, id: ComputerId, address: Option<&str>) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE computers SET ip_address = $1 WHERE id = $2")
            .bind(address.map(str::to_string))
            .bind(id.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }
}

/// A database URL fit for messages: the password, if any, replaced.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

const SELECT_COMPUTER: &str = "SELECT id, tenant_id, name, slug, status, template_type, size, metadata, error, \
     source_snapshot_id, ip_address, network, created_at, updated_at FROM computers";

fn computer_from_row(row: &AnyRow) -> Option<Computer> {
    let text = |col: &str| row.try_get::<String, _>(col).ok();
    let metadata = text("metadata")
        .and_then(|m| serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&m).ok())
        .unwrap_or_default();
    Some(Computer {
        id: text("id")?.parse().ok()?,
        tenant_id: text("tenant_id")?.parse().ok()?,
        name: text("name")?,
        slug: text("slug")?,
        status: ComputerStatus::parse(&text("status")?)?,
        template_type: text("template_type")?,
        size: Size::parse(&text("size")?)?,
        ip_address: row.try_get::<Option<String>, _>("ip_address").ok().flatten(),
        metadata,
        error: row.try_get::<Option<String>, _>("error").ok().flatten(),
        source_snapshot_id: row
            .try_get::<Option<String>, _>("source_snapshot_id")
            .ok()
            .flatten()
            .and_then(|s| s.parse::<SnapshotId>().ok()),
        created_at: parse_time(&text("created_at")?),
        updated_at: parse_time(&text("updated_at")?),
        network: row.try_get::<i64, _>("network").map_or(true, |n| n != 0),
        preview_domain: None,
        sandbox_url: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn computer(tenant: TenantId, name: &str) -> Computer {
        let now = Utc::now();
        Computer {
            id: ComputerId::new(),
            name: name.into(),
            slug: name.into(),
            status: ComputerStatus::Provisioning,
            template_type: "debian-bookworm".into(),
            size: Size::Xs,
            ip_address: None,
            tenant_id: tenant,
            created_at: now,
            updated_at: now,
            metadata: serde_json::Map::from_iter([("team".to_string(), serde_json::json!("a"))]),
            error: None,
            source_snapshot_id: None,
            network: true,
            preview_domain: None,
            sandbox_url: None,
        }
    }

    #[tokio::test]
    async fn tenants_keys_and_computers_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open_sqlite(&dir.path().join("m.db")).await.unwrap();
        let t = db.ensure_tenant("default").await.unwrap();
        assert_eq!(db.ensure_tenant("default").await.unwrap(), t, "idempotent");
        let other = db.ensure_tenant("other").await.unwrap();
        assert_ne!(t, other);

        db.insert_key(t, "hash-1", "stasis_ab").await.unwrap();
        assert_eq!(db.tenant_by_key_hash("hash-1").await.unwrap(), Some(t));
        assert_eq!(db.tenant_by_key_hash("nope").await.unwrap(), None);
        assert_eq!(db.count_keys(t).await.unwrap(), 1);

        let c = computer(t, "dev");
        db.insert_computer(&c, None).await.unwrap();
        db.insert_computer(&computer(other, "theirs"), Some(&"host-b".parse().unwrap()))
            .await
            .unwrap();
        assert_eq!(db.host_of(c.id).await.unwrap(), None);
        assert_eq!(
            db.computers_in(&[ComputerStatus::Provisioning], None)
                .await
                .unwrap()
                .len(),
            1,
            "reconciliation sees only its own host's computers"
        );
        assert_eq!(
            db.computers_in(&[ComputerStatus::Provisioning], Some(&"host-b".parse().unwrap()))
                .await
                .unwrap()[0]
                .name,
            "theirs"
        );
        let got = db.get_computer(c.id).await.unwrap().unwrap();
        assert_eq!(got.name, "dev");
        assert_eq!(got.metadata["team"], "a");
        assert_eq!(db.list_computers(t).await.unwrap().len(), 1);

        assert!(db.set_status(c.id, ComputerStatus::Error, Some("boom")).await.unwrap());
        let got = db.get_computer(c.id).await.unwrap().unwrap();
        assert_eq!(
            (got.status, got.error.as_deref()),
            (ComputerStatus::Error, Some("boom"))
        );

        db.set_status(c.id, ComputerStatus::Destroyed, None).await.unwrap();
        assert!(
            db.get_computer(c.id).await.unwrap().is_none(),
            "destroyed computers are gone"
        );
        assert!(
            !db.set_status(c.id, ComputerStatus::Running, None).await.unwrap(),
            "and stay gone"
        );
    }

    #[test]
    fn passwords_do_not_reach_messages() {
        assert_eq!(redact("postgres://u:secret@h:5432/d"), "postgres://u:***@h:5432/d");
        assert_eq!(redact("postgres://u@h/d"), "postgres://u@h/d");
        assert_eq!(redact("sqlite:///x.db"), "sqlite:///x.db");
    }

    #[tokio::test]
    async fn unknown_database_urls_are_named() {
        let err = Db::open("mysql://u:pw@h/d").await.err().unwrap().to_string();
        assert!(
            err.contains("unsupported database URL") && err.contains("mysql://u:***@h/d"),
            "{err}"
        );
    }

    /// What the runner before sqlx's left behind: the schema of migrations 1-8 applied one by
    /// one, their versions in `schema_migrations`, and some data.
    async fn make_old_runner_database(url: &str) {
        sqlx::any::install_default_drivers();
        let pool = AnyPoolOptions::new().max_connections(1).connect(url).await.unwrap();
        sqlx::query("CREATE TABLE schema_migrations (version BIGINT PRIMARY KEY, applied_at TEXT NOT NULL)")
            .execute(&pool)
            .await
            .unwrap();
        let old = [
            include_str!("../../migrations/0001_init.sql"),
            include_str!("../../migrations/0002_snapshots.sql"),
            include_str!("../../migrations/0003_hosts.sql"),
            include_str!("../../migrations/0004_jobs.sql"),
            include_str!("../../migrations/0005_limits.sql"),
            include_str!("../../migrations/0006_tenant_keys.sql"),
            include_str!("../../migrations/0007_store.sql"),
            include_str!("../../migrations/0008_http.sql"),
        ];
        for (i, sql) in old.iter().enumerate() {
            sqlx::raw_sql(sql).execute(&pool).await.unwrap();
            sqlx::query("INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)")
                .bind(i as i64 + 1)
                .bind(now())
                .execute(&pool)
                .await
                .unwrap();
        }
        sqlx::query("INSERT INTO tenants (id, name, created_at) VALUES ($1, 'old', $2)")
            .bind(TenantId::new().to_string())
            .bind(now())
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
    }

    /// `_sqlx_migrations` as (version, applied successfully), in order.
    async fn applied(db: &Db) -> Vec<(i64, bool)> {
        sqlx::query("SELECT version, CASE WHEN success THEN 1 ELSE 0 END AS ok FROM _sqlx_migrations ORDER BY version")
            .fetch_all(db.pool())
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get::<i64, _>(0), r.get::<i32, _>(1) == 1))
            .collect()
    }

    fn all_migrations() -> Vec<(i64, bool)> {
        MIGRATOR.iter().map(|m| (m.version, true)).collect()
    }

    /// Checks a database the old runner made, opened by today's code (twice), and a fresh one.
    async fn check_migrations(old_url: &str, fresh_url: &str) {
        make_old_runner_database(old_url).await;
        let db = Db::open(old_url).await.expect("an old runner's database opens");
        let old = db.tenant_by_name("old").await.unwrap();
        assert!(old.is_some(), "its data is kept");
        assert_eq!(applied(&db).await, all_migrations(), "1-8 adopted, later ones applied");
        let kept: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM schema_migrations")
            .fetch_one(db.pool())
            .await
            .unwrap();
        assert_eq!(kept, 8, "the old record is left for older binaries");
        db.pool().close().await;
        let db = Db::open(old_url).await.expect("and opens again");
        assert_eq!(db.tenant_by_name("old").await.unwrap(), old);
        assert_eq!(applied(&db).await, all_migrations());
        db.pool().close().await;

        let db = Db::open(fresh_url).await.expect("a fresh database migrates");
        assert_eq!(applied(&db).await, all_migrations());
        let t = db.ensure_tenant("new").await.unwrap();
        db.insert_key(t, "h", "p").await.unwrap();
        assert_eq!(db.count_keys(t).await.unwrap(), 1, "the schema is all there");
        db.pool().close().await;
    }

    #[tokio::test]
    async fn sqlite_databases_of_the_old_runner_upgrade_and_fresh_ones_migrate() {
        let dir = tempfile::tempdir().unwrap();
        let old = format!("sqlite://{}?mode=rwc", dir.path().join("old.db").display());
        let fresh = format!("sqlite://{}", dir.path().join("fresh.db").display());
        check_migrations(&old, &fresh).await;
    }

    /// The same on a real PostgreSQL when the e2e services run (`eval "$(scripts/services
    /// start)"` sets STASIS_TEST_POSTGRES, an admin URL); two scratch databases, dropped after.
    #[tokio::test]
    async fn postgres_databases_of_the_old_runner_upgrade_and_fresh_ones_migrate() {
        let Some(admin) = std::env::var("STASIS_TEST_POSTGRES").ok().filter(|v| !v.is_empty()) else {
            eprintln!("STASIS_TEST_POSTGRES is not set: skipped");
            return;
        };
        sqlx::any::install_default_drivers();
        let pool = AnyPoolOptions::new().max_connections(1).connect(&admin).await.unwrap();
        let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap();
        let tag = uuid::Uuid::new_v4().simple().to_string();
        let names = [format!("stasis_old_{tag}"), format!("stasis_fresh_{tag}")];
        for n in &names {
            sqlx::query(&format!("CREATE DATABASE {n}"))
                .execute(&pool)
                .await
                .unwrap();
        }
        check_migrations(&format!("{base}/{}", names[0]), &format!("{base}/{}", names[1])).await;
        for n in &names {
            sqlx::query(&format!("DROP DATABASE {n} WITH (FORCE)"))
                .execute(&pool)
                .await
                .unwrap();
        }
    }

    #[tokio::test]
    async fn reopening_keeps_data_and_does_not_rerun_migrations() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        let t = Db::open_sqlite(&path).await.unwrap().ensure_tenant("x").await.unwrap();
        let db = Db::open_sqlite(&path).await.unwrap();
        assert_eq!(db.tenant_by_name("x").await.unwrap(), Some(t));
    }
}
