//! Computers: their lifecycle (provisioning → starting → running → stopped, error when QEMU
//! dies), kept true to what the host runtime really runs, and exec in the guest.

mod hibernate;
pub mod routes;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use chrono::{SubsecRound, Utc};
use serde_json::{Map, Value};
use stasis_agent_proto::ExecRequest;
use stasis_types::{
    ActionResponse, Computer, ComputerId, ComputerStatus, CreateComputerRequest, ExecResponse, Size, SnapshotId,
    TenantId, DEFAULT_TEMPLATE,
};
use stasis_vmm::description::{Described, HostMachine};
use stasis_vmm::vm::Nic;
use stasis_vmm::{Accel, Host, HostEvent, MachineConfig};

use crate::db::Db;
use crate::error::{Error, Resource, Result};
use crate::images::Images;
use crate::snapshots::boot_files::BootFiles;
use crate::snapshots::events::EventBus;
use stasis_store::{Materialized, Materializer};

/// Default and largest exec timeouts, in seconds.
pub const DEFAULT_EXEC_TIMEOUT_SECS: u64 = 60;
pub const MAX_EXEC_TIMEOUT_SECS: u64 = 3600;

/// How QEMU is run on this host.
#[derive(Debug, Clone)]
pub struct RuntimeSettings {
    pub accel: Accel,
    pub qemu_binary: PathBuf,
    pub tsc_khz: Option<u64>,
    /// How QEMUs are confined (None: not at all).
    pub jail: Option<stasis_vmm::jail::JailSettings>,
    /// Each computer's disk ceiling (None: none).
    pub disk_limits: Option<stasis_vmm::vm::DiskLimits>,
    /// The `-cpu` model machines get (None: the accelerator's default).
    pub cpu_model: Option<String>,
    /// Memory (MiB) this platform lends to computers; creates, restores and starts beyond it
    /// are refused (409 `INSUFFICIENT_CAPACITY`). None: no limit.
    pub capacity_mib: Option<u64>,
    /// This host's id when it is one of a control plane's hosts; None for the embedded platform.
    pub host_id: Option<stasis_types::HostId>,
}

/// This host's copies of what restores read: snapshots' materialized files, and the boot
/// files snapshots were taken with.
pub struct LocalCopies {
    pub materializer: Arc<Materializer>,
    pub boot_files: Arc<BootFiles>,
}

/// A validated create request.
#[derive(Debug, Clone)]
pub struct NewComputer {
    pub name: String,
    pub size: Size,
    pub template_type: String,
    pub metadata: Map<String, Value>,
    pub network: bool,
    /// Variables it starts with (a restore or clone has its snapshot's instead, unless
    /// `env_from_snapshot` is off).
    pub env: Vec<(String, String)>,
    /// A computer made from a snapshot starts with the variables the snapshot kept.
    pub env_from_snapshot: bool,
}

/// A command for [`Computers::exec`].
pub struct Run {
    pub program: String,
    pub args: Vec<String>,
    pub timeout_secs: u64,
    /// Default `/root`.
    pub cwd: Option<String>,
    /// Default: none (`/dev/null`).
    pub stdin: Option<String>,
}

impl Run {
    /// `program args...` with no stdin, in `/root`.
    pub fn new(program: &str, args: Vec<String>, timeout_secs: u64) -> Run {
        Run {
            program: program.into(),
            args,
            timeout_secs,
            cwd: None,
            stdin: None,
        }
    }
}

pub struct Computers {
    pub(crate) db: Db,
    pub(crate) host: Arc<Host>,
    images: Arc<Images>,
    settings: RuntimeSettings,
    pub(crate) materializer: Arc<Materializer>,
    boot_files: Arc<BootFiles>,
    pub(crate) events: Arc<EventBus>,
    /// Bumped on every status change, for callers waiting for one.
    changes: tokio::sync::watch::Sender<u64>,
    /// Serializes lifecycle operations (boot, stop, destroy, capture) per computer.
    locks: Mutex<HashMap<ComputerId, Arc<tokio::sync::Mutex<()>>>>,
    /// This host's id when it is one of a control plane's hosts; None for the embedded
    /// platform. Computers are recorded under it, and only its own are reconciled.
    host_id: Option<stasis_types::HostId>,
    /// Held while a computer is admitted (memory checked, then recorded), so two requests
    /// cannot both take the last free memory.
    admission: tokio::sync::Mutex<()>,
    limits: Arc<crate::limits::Limits>,
    /// When each computer was last asked something, and how many requests to it are open
    /// (what its idle timeout goes by).
    pub(crate) activity: hibernate::Activity,
}

const LIVE: &[ComputerStatus] = &[
    ComputerStatus::Creating,
    ComputerStatus::Provisioning,
    ComputerStatus::Starting,
    ComputerStatus::Running,
    ComputerStatus::Paused,
    ComputerStatus::Stopping,
    ComputerStatus::Destroying,
];

impl Computers {
    pub fn new(
        db: Db,
        host: Arc<Host>,
        images: Arc<Images>,
        settings: RuntimeSettings,
        copies: LocalCopies,
        events: Arc<EventBus>,
        limits: Arc<crate::limits::Limits>,
    ) -> Arc<Computers> {
        let LocalCopies {
            materializer,
            boot_files,
        } = copies;
        let host_id = settings.host_id.clone();
        Arc::new(Computers {
            db,
            host,
            images,
            settings,
            materializer,
            boot_files,
            events,
            changes: tokio::sync::watch::channel(0).0,
            locks: Mutex::new(HashMap::new()),
            host_id,
            admission: tokio::sync::Mutex::new(()),
            limits,
            activity: Default::default(),
        })
    }

    pub fn limits(&self) -> &crate::limits::Limits {
        &self.limits
    }

    pub fn host(&self) -> &Arc<Host> {
        &self.host
    }

    /// Wakes callers waiting for a status change (after one made elsewhere).
    pub fn notify_changed(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    /// Refuses a computer of `size` that would take more memory than the platform lends.
    async fn check_capacity(&self, size: Size) -> Result<()> {
        let Some(capacity) = self.settings.capacity_mib else {
            return Ok(());
        };
        let held = self.db.memory_held_mib(self.host_id.as_ref()).await?;
        let need = size.memory_mib();
        if held + need > capacity {
            return Err(Error::conflict(
                crate::error::Conflict::InsufficientCapacity,
                format!(
                    "not enough memory for a {} computer ({need} MiB): {held} of {capacity} MiB are in use; \
                     stop or delete a computer first",
                    size.as_str()
                ),
            ));
        }
        Ok(())
    }

    /// Whether this host's computers get networks of their own (and so egress policies).
    pub fn has_networks(&self) -> bool {
        self.host.networks().is_some()
    }

    /// Applies computer `id`'s stored egress policy (or none) to its network on this host:
    /// at once if it runs here, else when its network is next made.
    pub(crate) async fn enforce_policy(&self, id: ComputerId) -> Result<()> {
        let Some(networks) = self.host.networks().cloned() else {
            return Ok(());
        };
        let policy = match self.db.network_policy(id).await? {
            Some(p) => Some(crate::network_policy::compile(&p)?),
            None => None,
        };
        let name = id.to_string();
        tokio::task::spawn_blocking(move || networks.set_policy(&name, policy))
            .await
            .map_err(|e| Error::Internal(e.to_string()))?
            .map_err(|e| Error::Internal(format!("applying the egress policy: {e}")))
    }

    /// This host's id among a control plane's hosts (None: the embedded platform).
    pub fn host_id(&self) -> Option<&stasis_types::HostId> {
        self.host_id.as_ref()
    }

    pub(crate) async fn set_status(
        &self,
        id: ComputerId,
        status: ComputerStatus,
        error: Option<&str>,
    ) -> Result<bool, sqlx::Error> {
        let changed = self.db.set_status(id, status, error).await;
        if status == ComputerStatus::Running {
            // Its idle time counts from now (a resumed computer is not idle since its pause).
            self.activity.reset(id);
            // Its address on this host: the host end of its network, if it has one here.
            // (A machine re-attached after a restart keeps the address recorded.)
            let address = self
                .host
                .networks()
                .and_then(|n| n.get(&id.to_string()))
                .map(|a| a.ip_address.to_string());
            if let Some(address) = address {
                if let Err(e) = self.db.set_ip_address(id, Some(&address)).await {
                    tracing::warn!(%id, error = %e, "recording a computer's address");
                }
            }
        }
        self.changes.send_modify(|n| *n += 1);
        changed
    }

    /// Waits (up to `limit`) while the computer is on its way up (`provisioning`,
    /// `starting`), so that an exec sent right after a create or restore runs as soon as the
    /// machine does instead of failing.
    async fn settled(&self, tenant: TenantId, id: ComputerId, limit: std::time::Duration) -> Result<Computer> {
        let mut changes = self.changes.subscribe();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let c = self.get(tenant, id).await?;
            if !matches!(c.status, ComputerStatus::Provisioning | ComputerStatus::Starting) {
                return Ok(c);
            }
            if tokio::time::timeout_at(deadline, changes.changed()).await.is_err() {
                return Ok(c);
            }
        }
    }

    /// This host's kept kernels and initrds of snapshots.
    pub(crate) fn boot_files(&self) -> &BootFiles {
        &self.boot_files
    }

    /// Holds off other lifecycle operations on `id` (a snapshot capture takes it).
    pub async fn lifecycle_lock(&self, id: ComputerId) -> tokio::sync::OwnedMutexGuard<()> {
        self.lock_for(id).lock_owned().await
    }

    fn lock_for(&self, id: ComputerId) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id)
            .or_default()
            .clone()
    }

    /// Checks what the types cannot say about a create request: the name's length and
    /// characters, the metadata's size.
    pub fn validate(req: CreateComputerRequest) -> Result<NewComputer> {
        let name = check_name(&req.name)?;
        // Every template is the default image.
        let _: Option<stasis_types::Template> = req.template_type;
        let metadata = req.metadata.unwrap_or_default();
        check_metadata(&metadata)?;
        let env = crate::env::validate("env", req.env)?;
        Ok(NewComputer {
            name,
            size: req.size.unwrap_or(Size::Small),
            template_type: DEFAULT_TEMPLATE.to_string(),
            metadata,
            network: req.network.unwrap_or(true),
            env,
            env_from_snapshot: false,
        })
    }

    /// Renames a computer and/or replaces its metadata; answers it as it is now.
    pub async fn update(
        &self,
        tenant: TenantId,
        id: ComputerId,
        req: stasis_types::UpdateComputerRequest,
    ) -> Result<Computer> {
        let name = req.name.as_deref().map(check_name).transpose()?;
        if let Some(m) = &req.metadata {
            check_metadata(m)?;
        }
        self.get(tenant, id).await?;
        self.db
            .update_computer(id, name.as_deref(), req.metadata.as_ref())
            .await?;
        self.get(tenant, id).await
    }

    /// Gives a stopped (or errored) computer another size, which it starts with next time.
    /// A running one answers 409 unless it has that size already (then nothing changes).
    pub async fn resize(&self, tenant: TenantId, id: ComputerId, req: stasis_types::ResizeRequest) -> Result<Computer> {
        let size = size_asked(&req)?;
        let lock = self.lock_for(id);
        let _guard = lock.lock().await;
        let c = self.get(tenant, id).await?;
        if c.size == size {
            return Ok(c);
        }
        match c.status {
            ComputerStatus::Stopped | ComputerStatus::Error => {
                self.db.set_size(id, size).await?;
                self.get(tenant, id).await
            }
            other => Err(Error::conflict(
                crate::error::Conflict::MustBeStopped,
                format!(
                    "computer is {}: stop it to resize it (a stopped computer starts with its new size)",
                    other.as_str()
                ),
            )),
        }
    }

    pub async fn create(self: &Arc<Self>, tenant: TenantId, new: NewComputer) -> Result<Computer> {
        let computer = self.insert(tenant, new, None).await?;
        self.spawn_boot(computer.id);
        Ok(computer)
    }

    /// Records a new computer in `provisioning`; `source` makes it a restore of that snapshot.
    pub async fn insert(&self, tenant: TenantId, new: NewComputer, source: Option<SnapshotId>) -> Result<Computer> {
        // Millisecond precision, as stored: the create answer matches later reads.
        let now = Utc::now().trunc_subsecs(3);
        let new_env_from_snapshot = new.env_from_snapshot;
        let _admitted = self.admission.lock().await;
        let quota = self.limits.admit(tenant, crate::limits::Want::Computer).await?;
        self.check_capacity(new.size).await?;
        let computer = Computer {
            id: ComputerId::new(),
            slug: slugify(&new.name),
            name: new.name,
            status: ComputerStatus::Provisioning,
            template_type: new.template_type,
            size: new.size,
            ip_address: None,
            tenant_id: tenant,
            created_at: now,
            updated_at: now,
            metadata: new.metadata,
            error: None,
            source_snapshot_id: source,
            network: new.network,
            preview_domain: None,
            sandbox_url: None,
        };
        let mut computer = computer;
        computer.slug = self.db.insert_computer(&computer, self.host_id.as_ref()).await?;
        drop(quota);
        self.db.set_env_vars(computer.id, &new.env).await?;
        // A restore or clone exposes the ports its source computer did.
        if let Some(snapshot) = source {
            if let Some(from) = self.db.get_snapshot(snapshot).await?.map(|s| s.snapshot.computer_id) {
                self.db.copy_ports(from, computer.id).await?;
                self.db.copy_network_policy(from, computer.id).await?;
            }
            // The variables as they were when the snapshot was taken.
            if new_env_from_snapshot {
                self.db.restore_env(snapshot, computer.id).await?;
            }
        }
        Ok(computer)
    }

    pub fn spawn_boot(self: &Arc<Self>, id: ComputerId) {
        let this = self.clone();
        tokio::spawn(async move { this.boot(id).await });
    }

    /// Boots a computer that is `provisioning` (new) or `starting` (start/restart).
    pub(crate) async fn boot(self: Arc<Self>, id: ComputerId) {
        let lock = self.lock_for(id);
        let _guard = lock.lock().await;
        let Ok(Some(computer)) = self.db.get_computer(id).await else {
            return;
        };
        if !matches!(computer.status, ComputerStatus::Provisioning | ComputerStatus::Starting) {
            return;
        }
        let started = Instant::now();
        let image = match self.images.get().await {
            Ok(image) => image,
            Err(e) => {
                let _ = self.set_status(id, ComputerStatus::Error, Some(&e.to_string())).await;
                return;
            }
        };
        if let (ComputerStatus::Provisioning, Some(snapshot)) = (computer.status, computer.source_snapshot_id) {
            self.restore_machine(&computer, snapshot, image).await;
            return;
        }
        if computer.status == ComputerStatus::Provisioning {
            let _ = self.set_status(id, ComputerStatus::Starting, None).await;
        }
        let mut config = self.machine_config(&computer, &image);
        if let Some(snapshot) = computer.source_snapshot_id {
            let fetched = match self.recorded(snapshot, &computer).await {
                Ok(recorded) => self
                    .materializer
                    .ensure(snapshot, recorded.clone(), |_, _| {})
                    .await
                    .map(|files| (files, recorded)),
                Err(e) => Err(e),
            };
            // A restored computer's disk chain rests on its snapshot's disk, and it boots the
            // kernel its snapshot was taken with (the one its disk has the modules of).
            match fetched {
                Ok((files, recorded)) => match self
                    .snapshot_machine(&computer, snapshot, &recorded, &image, &files)
                    .await
                {
                    Ok(machine) => config = machine,
                    Err(refused) => {
                        let _ = self
                            .set_status(id, ComputerStatus::Error, Some(&refused.to_string()))
                            .await;
                        return;
                    }
                },
                Err(e) => {
                    let reason = format!("boot failed: the disk of snapshot {snapshot} is not available: {e}");
                    let _ = self.set_status(id, ComputerStatus::Error, Some(&reason)).await;
                    return;
                }
            }
        }
        if let Err(e) = self.enforce_policy(id).await {
            let _ = self.set_status(id, ComputerStatus::Error, Some(&e.to_string())).await;
            return;
        }
        match self.host.boot(&id.to_string(), config).await {
            Ok(_) => {
                tracing::info!(%id, elapsed_ms = started.elapsed().as_millis() as u64, "computer running");
                // If it was destroyed or stopped meanwhile the update matches nothing useful;
                // stop/destroy hold the same lock, so that cannot interleave.
                let _ = self.set_status(id, ComputerStatus::Running, None).await;
            }
            Err(e) => {
                tracing::warn!(%id, error = %e, "boot failed");
                let _ = self
                    .db
                    .set_status(id, ComputerStatus::Error, Some(&format!("boot failed: {e}")))
                    .await;
            }
        }
    }

    /// What the database recorded of a snapshot, which its objects in the store must agree
    /// with: its tenant (whose keys alone open it), whether it was sealed, its manifest's
    /// hash. A computer restores only its own tenant's snapshots. A failed lookup fails the
    /// read (closed), without calling the snapshot damaged.
    pub(crate) async fn recorded(
        &self,
        snapshot: SnapshotId,
        computer: &Computer,
    ) -> Result<stasis_store::Recorded, stasis_store::StoreError> {
        let recorded =
            self.db.snapshot_recorded(snapshot).await.map_err(|e| {
                stasis_store::StoreError::Config(format!("reading the record of snapshot {snapshot}: {e}"))
            })?;
        match recorded {
            Some(r) if r.tenant_id == computer.tenant_id => Ok(r),
            Some(_) => Err(stasis_store::StoreError::Config(format!(
                "snapshot {snapshot} is not of computer {}'s tenant",
                computer.id
            ))),
            None => Err(stasis_store::StoreError::Config(format!(
                "snapshot {snapshot} has no record"
            ))),
        }
    }

    fn machine_config(&self, computer: &Computer, image: &stasis_image::Image) -> MachineConfig {
        MachineConfig {
            name: computer.slug.clone(),
            vcpus: computer.size.vcpus(),
            memory_mib: computer.size.memory_mib(),
            accel: self.settings.accel,
            qemu_binary: self.settings.qemu_binary.clone(),
            image_id: image.id.clone(),
            kernel: image.kernel.clone(),
            initrd: image.initrd.clone(),
            base_disk: image.rootfs.clone(),
            // Placed by the host runtime.
            disk: Default::default(),
            ram_path: Default::default(),
            ram_shared: true,
            tsc_khz: self.settings.tsc_khz,
            jail: self.settings.jail.clone(),
            disk_limits: self.settings.disk_limits,
            cpu_model: self.settings.cpu_model.clone(),
            device_line: stasis_vmm::description::DEVICE_LINE,
            // A namespace and tap of its own where this host makes networks (the host runtime
            // names and makes it); QEMU's user networking otherwise.
            nic: Some(match (computer.network, &self.settings.jail, self.host.networks()) {
                (false, _, _) => Nic::Unplugged,
                (true, Some(_), Some(_)) => Nic::Tap { netns: String::new() },
                (true, _, _) => Nic::User,
            }),
        }
    }

    /// What this host runs, for a snapshot's machine description to be checked against.
    pub fn host_machine(&self) -> HostMachine {
        HostMachine {
            qemu: stasis_vmm::accel::qemu_version(&self.settings.qemu_binary).map(Into::into),
            kvm: self.settings.accel == Accel::Kvm,
            kvm_cpu_model: self
                .settings
                .cpu_model
                .clone()
                .unwrap_or_else(|| stasis_vmm::description::default_cpu_model(Accel::Kvm).into()),
        }
    }

    /// The machine a snapshot was taken on, rebuilt from its manifest for `computer` on this
    /// host: its vCPUs, RAM, accelerator, CPU model and TSC, its own kernel and initrd, its
    /// disk; refused, naming the difference, where this host cannot load its state.
    pub(crate) async fn snapshot_machine(
        &self,
        computer: &Computer,
        snapshot: SnapshotId,
        recorded: &stasis_store::Recorded,
        image: &stasis_image::Image,
        files: &Materialized,
    ) -> Result<MachineConfig> {
        let refused = |why: &dyn std::fmt::Display| {
            Error::conflict(
                crate::error::Conflict::SnapshotIncompatible,
                format!("snapshot {snapshot} cannot be restored on this host: {why}"),
            )
        };
        let manifest = &files.manifest;
        let mut config = self.machine_config(computer, image);
        config.base_disk = files.disk.clone();
        let host = self.host_machine();
        match Described::parse(&manifest.machine).map_err(|e| refused(&e))? {
            Described::Current(d) => {
                d.check(&host).map_err(|m| refused(&m))?;
                let boot = manifest
                    .boot
                    .as_ref()
                    .ok_or_else(|| refused(&"its manifest describes the machine but holds no boot files"))?;
                config.kernel = self
                    .boot_files
                    .ensure(recorded, manifest, "kernel", &d.kernel, &boot.kernel, &image.kernel)
                    .await
                    .map_err(|e| refused(&e))?;
                config.initrd = self
                    .boot_files
                    .ensure(recorded, manifest, "initrd", &d.initrd, &boot.initrd, &image.initrd)
                    .await
                    .map_err(|e| refused(&e))?;
                config.vcpus = d.vcpus;
                config.memory_mib = d.memory_mib;
                config.accel = d.accel;
                config.cpu_model = Some(d.cpu_model);
                config.tsc_khz = d.tsc_khz;
                config.image_id = d.image_id;
                config.device_line = d.device_line;
            }
            Described::Legacy(l) => {
                // Its kernel and initrd are those of the image it was taken on, if this host
                // still has that image.
                let taken_on = match self.images.by_id(&l.image_id).await {
                    Some(earlier) => earlier,
                    None => image.clone(),
                };
                l.check(&host, &taken_on.id).map_err(|m| refused(&m))?;
                config.kernel = taken_on.kernel;
                config.initrd = taken_on.initrd;
                config.image_id = taken_on.id;
                config.vcpus = l.vcpus;
                config.memory_mib = l.memory_mib;
                config.accel = l.accel;
                // Before descriptions there was one device line, without a network card.
                config.device_line = 1;
            }
        }
        Ok(config)
    }

    /// The computer if it exists and belongs to `tenant`; otherwise `404 computer not found`
    /// (another tenant's computer is not acknowledged to exist).
    pub async fn get(&self, tenant: TenantId, id: ComputerId) -> Result<Computer> {
        match self.db.get_computer(id).await? {
            Some(c) if c.tenant_id == tenant => Ok(c),
            _ => Err(Error::not_found(Resource::Computer, id)),
        }
    }

    pub async fn list(&self, tenant: TenantId) -> Result<Vec<Computer>> {
        Ok(self.db.list_computers(tenant).await?)
    }

    /// Starts a stopped (or errored) computer, with `env` set first (added or replaced, and
    /// kept), whatever state it is in.
    pub async fn start(
        self: &Arc<Self>,
        tenant: TenantId,
        id: ComputerId,
        env: Vec<(String, String)>,
    ) -> Result<ActionResponse> {
        let lock = self.lock_for(id);
        let guard = lock.lock().await;
        let c = self.get(tenant, id).await?;
        crate::env::set_all(&self.db, "env", id, &env).await?;
        match c.status {
            ComputerStatus::Running | ComputerStatus::Starting | ComputerStatus::Provisioning => {
                Ok(action(c.status, "computer is already running or starting"))
            }
            ComputerStatus::Paused => {
                drop(guard);
                self.resume(tenant, id).await
            }
            ComputerStatus::Stopped | ComputerStatus::Error => {
                let admitted = self.admission.lock().await;
                let quota = self.limits.admit(tenant, crate::limits::Want::Computer).await?;
                self.check_capacity(c.size).await?;
                // An errored computer may still have a QEMU around (say, a hung one).
                self.host.stop(&id.to_string()).await;
                self.set_status(id, ComputerStatus::Starting, None).await?;
                drop((quota, admitted));
                drop(guard);
                self.spawn_boot(id);
                Ok(action(ComputerStatus::Starting, "computer is starting"))
            }
            other => Err(Error::conflict(
                crate::error::Conflict::ComputerBusy,
                format!("computer is {}; try again when it has settled", other.as_str()),
            )),
        }
    }

    pub async fn stop(&self, tenant: TenantId, id: ComputerId) -> Result<ActionResponse> {
        let lock = self.lock_for(id);
        let _guard = lock.lock().await;
        let c = self.get(tenant, id).await?;
        if c.status == ComputerStatus::Stopped {
            return Ok(action(ComputerStatus::Stopped, "computer is already stopped"));
        }
        self.set_status(id, ComputerStatus::Stopping, None).await?;
        self.host.stop(&id.to_string()).await;
        self.set_status(id, ComputerStatus::Stopped, None).await?;
        Ok(action(ComputerStatus::Stopped, "computer stopped"))
    }

    pub async fn restart(self: &Arc<Self>, tenant: TenantId, id: ComputerId) -> Result<ActionResponse> {
        self.stop(tenant, id).await?;
        let mut r = self.start(tenant, id, Vec::new()).await?;
        r.message = "computer is restarting".into();
        Ok(r)
    }

    pub async fn destroy(&self, tenant: TenantId, id: ComputerId) -> Result<ActionResponse> {
        let lock = self.lock_for(id);
        let _guard = lock.lock().await;
        self.get(tenant, id).await?;
        self.set_status(id, ComputerStatus::Destroying, None).await?;
        if let Err(e) = self.host.destroy(&id.to_string()).await {
            // The machine is stopped; leftover files are only disk space. Report, go on.
            tracing::warn!(%id, error = %e, "removing the computer's files");
        }
        self.set_status(id, ComputerStatus::Destroyed, None).await?;
        self.db.delete_ports(id).await?;
        self.db.delete_network_policy(id).await?;
        self.db.delete_env(id).await?;
        self.locks.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        Ok(action(ComputerStatus::Destroyed, "computer destroyed"))
    }

    /// The machine of a running computer of the tenant's (waiting a while for one that is
    /// starting): a 409 saying why not otherwise.
    pub async fn running_vm(&self, tenant: TenantId, id: ComputerId) -> Result<Arc<stasis_vmm::Vm>> {
        let c = self.settled(tenant, id, std::time::Duration::from_secs(120)).await?;
        match (c.status, self.host.get(&id.to_string())) {
            (ComputerStatus::Running, Some(vm)) => Ok(vm),
            (ComputerStatus::Provisioning | ComputerStatus::Starting, _) => Err(Error::conflict(
                crate::error::Conflict::ComputerStarting,
                "computer is still starting; retry shortly",
            )),
            _ => Err(not_running()),
        }
    }

    /// Runs `run` in the guest, with the computer's variables.
    pub async fn exec(&self, tenant: TenantId, id: ComputerId, run: Run) -> Result<ExecResponse> {
        let Run {
            program,
            args,
            timeout_secs,
            cwd,
            stdin,
        } = run;
        let vm = self.running_vm(tenant, id).await?;
        let env = self
            .db
            .env_vars(id)
            .await?
            .into_iter()
            .map(|v| (v.name, v.value))
            .collect();
        let started = Instant::now();
        let result = vm
            .exec(ExecRequest {
                program,
                args,
                env,
                cwd,
                stdin,
                timeout_ms: timeout_secs * 1000,
            })
            .await;
        match result {
            Ok(r) => Ok(ExecResponse {
                success: r.exit_code == 0,
                exit_code: r.exit_code,
                output: r.stdout,
                stderr: r.stderr,
                timed_out: r.timed_out,
                truncated: r.truncated,
                duration_ms: started.elapsed().as_millis() as u64,
            }),
            Err(e) => Err(crate::error::agent_failure(e)),
        }
    }

    /// Applies what the host runtime reports (a QEMU that died on its own).
    pub async fn on_host_event(&self, event: HostEvent) {
        match event {
            HostEvent::Exited { name, reason } => {
                let Ok(id) = name.parse::<ComputerId>() else {
                    return;
                };
                tracing::warn!(%id, reason, "computer's QEMU exited unexpectedly");
                let lock = self.lock_for(id);
                let _guard = lock.lock().await;
                if let Ok(Some(c)) = self.db.get_computer(id).await {
                    if matches!(c.status, ComputerStatus::Running | ComputerStatus::Starting) {
                        let _ = self.set_status(id, ComputerStatus::Error, Some(&reason)).await;
                    }
                }
            }
        }
    }

    /// After a platform restart: re-attach the QEMUs still running, mark the rest stopped,
    /// finish interrupted deletes, resume interrupted boots, kill any QEMU nobody owns.
    pub async fn reconcile(self: &Arc<Self>) -> Result<(), sqlx::Error> {
        let live = self.db.computers_in(LIVE, self.host_id.as_ref()).await?;
        let mut owned = std::collections::HashSet::new();
        for c in live {
            let name = c.id.to_string();
            owned.insert(name.clone());
            match c.status {
                ComputerStatus::Destroying => {
                    let _ = self.host.destroy(&name).await;
                    self.set_status(c.id, ComputerStatus::Destroyed, None).await?;
                }
                ComputerStatus::Creating | ComputerStatus::Provisioning | ComputerStatus::Starting => {
                    self.host.kill_stray(&name);
                    if c.status == ComputerStatus::Creating {
                        self.set_status(c.id, ComputerStatus::Provisioning, None).await?;
                    }
                    let restoring = self.db.job_pending(crate::db::JobKind::Restore, &name).await?;
                    if let (ComputerStatus::Provisioning | ComputerStatus::Creating, Some(snapshot), None) =
                        (c.status, c.source_snapshot_id, &self.host_id)
                    {
                        // An interrupted restore starts over and reads its snapshot again
                        // (the embedded platform reset the snapshots' restore counts at start;
                        // a host's are still counted).
                        if !self.db.begin_restore(snapshot).await? {
                            let reason = format!("snapshot {snapshot} is no longer available to restore from");
                            self.set_status(c.id, ComputerStatus::Error, Some(&reason)).await?;
                            continue;
                        }
                    }
                    if restoring {
                        continue; // its restore job runs it again
                    }
                    tracing::info!(id = %c.id, "resuming an interrupted boot");
                    self.spawn_boot(c.id);
                }
                // Hibernated: its memory and disk are in its snapshot; no QEMU runs for it.
                ComputerStatus::Paused => self.host.kill_stray(&name),
                ComputerStatus::Running => match self.host.attach(&name).await {
                    Ok(_) => {
                        // The host's table was written anew: its own rules go back in.
                        if let Err(e) = self.enforce_policy(c.id).await {
                            tracing::warn!(id = %c.id, error = %e, "a re-attached computer's egress policy");
                        }
                        tracing::info!(id = %c.id, "re-attached to running computer");
                        self.set_status(c.id, ComputerStatus::Running, None).await?;
                    }
                    Err(e) => {
                        self.host.kill_stray(&name);
                        let reason = format!("the machine was not running after a platform restart ({e})");
                        tracing::info!(id = %c.id, reason, "marking computer stopped");
                        self.set_status(c.id, ComputerStatus::Stopped, Some(&reason)).await?;
                    }
                },
                _ => {
                    self.host.stop(&name).await;
                    self.set_status(c.id, ComputerStatus::Stopped, None).await?;
                }
            }
        }
        for dir in self.host.machine_names() {
            if owned.contains(&dir) {
                continue;
            }
            self.host.kill_stray(&dir);
            // Destroyed while this host was away (the control plane records that alone when
            // the host is lost): nothing needs its files any more.
            let Ok(id) = dir.parse::<ComputerId>() else { continue };
            if self.db.computer_destroyed(id).await? {
                tracing::info!(%id, "removing the files of a computer destroyed while this host was away");
                if let Err(e) = self.host.destroy(&dir).await {
                    tracing::warn!(%id, error = %e, "removing a destroyed computer's files");
                }
            }
        }
        Ok(())
    }

    /// Platform shutdown: stop every machine (none is left without an owner) and record it.
    pub async fn shutdown(&self) {
        self.shutdown_machines().await;
        // Snapshot RAM kept in memory is only a cache, and nothing maps it any more: its
        // files go, and the huge-page tmpfs they were on.
        self.materializer.clear_memory();
        stasis_vmm::host::release_huge_ram_dir(self.materializer.memory_root());
        // The platform's own cgroups go too (every machine's is gone already).
        if let Some(jail) = &self.settings.jail {
            jail.cgroups.sweep();
            jail.cgroups.remove_parents();
        }
        // And the host's egress table (every machine's network is gone already).
        if let Some(networks) = self.host.networks().cloned() {
            let _ = tokio::task::spawn_blocking(move || networks.close()).await;
        }
    }

    async fn shutdown_machines(&self) {
        let running = self.host.running();
        self.host.stop_all().await;
        for name in running {
            if let Ok(id) = name.parse::<ComputerId>() {
                let _ = self
                    .db
                    .set_status(id, ComputerStatus::Stopped, Some("the platform was shut down"))
                    .await;
            }
        }
        // Boots still in flight: their QEMUs are not tracked yet, but their pid files are.
        if let Ok(live) = self.db.computers_in(LIVE, self.host_id.as_ref()).await {
            for c in live {
                self.host.kill_stray(&c.id.to_string());
                if matches!(c.status, ComputerStatus::Provisioning | ComputerStatus::Starting) {
                    let _ = self
                        .db
                        .set_status(c.id, ComputerStatus::Stopped, Some("the platform was shut down"))
                        .await;
                }
            }
        }
    }
}

fn not_running() -> Error {
    Error::conflict(crate::error::Conflict::ComputerNotRunning, "computer is not running")
}

fn action(status: ComputerStatus, message: &str) -> ActionResponse {
    ActionResponse {
        success: true,
        status: status.as_str().to_string(),
        message: message.to_string(),
    }
}

/// The size a resize asks for: `size`, or the one size with the `cpu_count` and `memory_mb`
/// given (and, with `size` too, that they agree with it).
fn size_asked(req: &stasis_types::ResizeRequest) -> Result<Size> {
    let table = || {
        Size::ALL
            .iter()
            .map(|s| format!("{} ({} vCPU, {} MB)", s.as_str(), s.vcpus(), s.memory_mib()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let fits =
        |s: &Size| req.cpu_count.is_none_or(|c| c == s.vcpus()) && req.memory_mb.is_none_or(|m| m == s.memory_mib());
    if let Some(size) = req.size {
        if !fits(&size) {
            return Err(Error::invalid(
                "size",
                format!(
                    "size {} has {} vCPU and {} MB, not what cpu_count/memory_mb ask; the sizes: {}",
                    size.as_str(),
                    size.vcpus(),
                    size.memory_mib(),
                    table()
                ),
            ));
        }
        return Ok(size);
    }
    if req.cpu_count.is_none() && req.memory_mb.is_none() {
        return Err(Error::invalid("size", format!("say which size: {}", table())));
    }
    let matching: Vec<Size> = Size::ALL.into_iter().filter(fits).collect();
    match matching.as_slice() {
        [one] => Ok(*one),
        _ => Err(Error::invalid(
            if req.memory_mb.is_some() {
                "memory_mb"
            } else {
                "cpu_count"
            },
            format!(
                "{} of the sizes match{}; the sizes: {}",
                if matching.is_empty() {
                    "none".to_string()
                } else {
                    matching.len().to_string()
                },
                if matching.is_empty() {
                    ""
                } else {
                    " (give memory_mb too, or size)"
                },
                table()
            ),
        )),
    }
}

/// A computer's name as given (trimmed): 1 to 128 characters, no control characters.
pub(crate) fn check_name(raw: &str) -> Result<String> {
    let name = raw.trim().to_string();
    if name.is_empty() || name.chars().count() > 128 || name.chars().any(char::is_control) {
        return Err(Error::invalid(
            "name",
            "name must be 1 to 128 characters without control characters",
        ));
    }
    Ok(name)
}

fn check_metadata(metadata: &Map<String, Value>) -> Result<()> {
    if Value::Object(metadata.clone()).to_string().len() > 16 * 1024 {
        return Err(Error::invalid("metadata", "metadata must be at most 16 KiB of JSON"));
    }
    Ok(())
}

/// A hostname-safe slug of a name: lowercase ASCII letters, digits and dashes, at most 63.
pub fn slugify(name: &str) -> String {
    let mut slug = String::new();
    for ch in name.chars() {
        let c = ch.to_ascii_lowercase();
        if c.is_ascii_alphanumeric() {
            slug.push(c);
        } else if !slug.ends_with('-') && !slug.is_empty() {
            slug.push('-');
        }
    }
    let slug: String = slug.trim_end_matches('-').chars().take(63).collect();
    let slug = slug.trim_end_matches('-').to_string();
    if slug.is_empty() {
        "computer".into()
    } else {
        slug
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body::Json;
    use crate::http_error::ApiError;

    #[test]
    fn slugs_are_hostname_safe() {
        assert_eq!(slugify("My Dev Box!"), "my-dev-box");
        assert_eq!(slugify("--x--"), "x");
        assert_eq!(slugify("日本"), "computer");
        assert_eq!(slugify(&"a".repeat(100)).len(), 63);
    }

    fn validate(json: &str) -> Result<NewComputer, ApiError> {
        let Json(req) = Json::<CreateComputerRequest>::parse(json.as_bytes())?;
        Ok(Computers::validate(req)?)
    }

    fn field_of(e: ApiError) -> String {
        match e {
            ApiError::Domain(Error::Invalid { field, .. }) => field,
            other => panic!("expected a 422, got {other:?}"),
        }
    }

    #[test]
    fn create_bodies_are_validated_field_by_field() {
        let ok = validate(r#"{"name":"dev","size":"xs","template_type":"miosa-desktop","metadata":{"a":1}}"#).unwrap();
        assert_eq!((ok.size, ok.template_type.as_str()), (Size::Xs, DEFAULT_TEMPLATE));
        assert_eq!(validate(r#"{"name":"dev"}"#).unwrap().size, Size::Small);
        assert_eq!(validate(r#"{"name":"dev","size":"xlarge"}"#).unwrap().size, Size::Xl);
        assert_eq!(
            validate(r#"{"name":"dev","size":null,"metadata":null}"#).unwrap().size,
            Size::Small
        );
        assert_eq!(field_of(validate(r#"{"name":null}"#).unwrap_err()), "name");
        assert_eq!(field_of(validate(r#"{"size":"xs"}"#).unwrap_err()), "name");
        assert_eq!(field_of(validate(r#"{"name":"  "}"#).unwrap_err()), "name");
        assert_eq!(
            field_of(validate(r#"{"name":"dev","size":"huge"}"#).unwrap_err()),
            "size"
        );
        assert_eq!(field_of(validate(r#"{"name":"dev","size":3}"#).unwrap_err()), "size");
        assert_eq!(
            field_of(validate(r#"{"name":"dev","template_type":"windows"}"#).unwrap_err()),
            "template_type"
        );
        assert_eq!(
            field_of(validate(r#"{"name":"dev","metadata":[1]}"#).unwrap_err()),
            "metadata"
        );
        let ask = |json: &str| size_asked(&serde_json::from_str(json).unwrap());
        assert_eq!(ask(r#"{"size":"large"}"#).unwrap(), Size::Large);
        assert_eq!(ask(r#"{"cpu_count":2,"memory_mb":1024}"#).unwrap(), Size::Medium);
        assert_eq!(ask(r#"{"memory_mb":256}"#).unwrap(), Size::Xs);
        assert!(matches!(ask(r#"{"cpu_count":2}"#), Err(Error::Invalid { field, .. }) if field == "cpu_count"));
        assert!(matches!(ask(r#"{"memory_mb":3}"#), Err(Error::Invalid { field, .. }) if field == "memory_mb"));
        assert!(matches!(ask(r#"{"size":"xs","cpu_count":4}"#), Err(Error::Invalid { field, .. }) if field == "size"));
        assert!(matches!(ask(r#"{}"#), Err(Error::Invalid { field, .. }) if field == "size"));
        let with_env = validate(r#"{"name":"dev","env":{"B":"2","A":"x y"}}"#).unwrap();
        assert_eq!(
            with_env.env,
            vec![("A".to_string(), "x y".to_string()), ("B".to_string(), "2".to_string())]
        );
        assert_eq!(
            field_of(validate(r#"{"name":"dev","env":{"1A":"x"}}"#).unwrap_err()),
            "env.1A"
        );
        assert_eq!(
            field_of(validate(r#"{"name":"dev","env":{"A":1}}"#).unwrap_err()),
            "env.A"
        );
    }
}
