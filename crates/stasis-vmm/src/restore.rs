//! The restore path: a new QEMU started paused on a snapshot's device state, mapping its RAM
//! file, on a new overlay over its disk; then resumed and given an identity of its own.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use stasis_agent_proto::{Op, Reply};

use crate::agent::AgentError;
use crate::process::Signal;
use crate::vm::{
    check_socket_paths, connect_qmp, create_overlay, io, place_disk, race_exit, spawn_qemu_off_runtime, write_config,
    Launch, MachineConfig, Vm, VmError, VmPaths,
};

/// Where the time of a restore went (also left in the machine's `restore-timings.json`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct RestoreTimings {
    /// Overlay and config files.
    pub prepare_ms: f64,
    /// QEMU process start until its monitor answers.
    pub qemu_start_ms: f64,
    /// Loading the device state (RAM is mapped, not loaded).
    pub state_load_ms: f64,
    /// `cont`.
    pub resume_ms: f64,
    /// Writing the snapshot's changed pages over its base's RAM (a snapshot kept as changes).
    #[serde(default)]
    pub changes_ms: f64,
    /// Connecting to the guest agent and its first answer (clock, RNG, hostname): the
    /// guest's first page faults on the mapped RAM happen here.
    pub agent_ms: f64,
    pub total_ms: f64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl Vm {
    /// The restore path: a new QEMU started paused on captured device state, with a copy of
    /// the captured RAM and a new overlay over the snapshot's disk (`config.base_disk`), then
    /// resumed and given its own identity (clock, RNG seed, hostname).
    pub async fn restore(config: MachineConfig, paths: VmPaths, state: &Path, memory: &Path) -> Result<Vm, VmError> {
        Self::restore_changed(config, paths, state, memory, None).await
    }

    /// [`Vm::restore`] of a snapshot captured as changes ([`Vm::capture_changes`]): `memory`
    /// is the RAM file of the snapshot the changes are over, mapped as always, and the pages of
    /// `changes` (the data of a sparse file as long as the RAM) are written over it, the guest
    /// still paused, before its device state loads: the restored machine's own pages from the
    /// start.
    pub async fn restore_changed(
        config: MachineConfig,
        paths: VmPaths,
        state: &Path,
        memory: &Path,
        changes: Option<&Path>,
    ) -> Result<Vm, VmError> {
        paths.create()?;
        check_socket_paths(&paths)?;
        let t0 = Instant::now();
        let mut timings = RestoreTimings::default();
        let mut config = config;
        // RAM: a private copy-on-write mapping of the snapshot's RAM file. Nothing is copied;
        // pages are read when the guest touches them, and pages no clone has written stay
        // shared between all clones in the page cache.
        config.ram_path = memory.to_path_buf();
        config.ram_shared = false;
        config.disk = paths.disk();
        new_overlay_from_template(&config.base_disk, &paths).await?;
        write_config(&paths, &config)?;
        timings.prepare_ms = ms(t0.elapsed());

        let t = Instant::now();
        let process = spawn_qemu_off_runtime(
            &config,
            &paths,
            Launch {
                incoming: true,
                null_disk_bytes: None,
            },
        )
        .await?;
        let qmp = connect_qmp(&process, &paths, Duration::from_secs(30)).await?;
        timings.qemu_start_ms = ms(t.elapsed());
        let incoming = async {
            // The changed pages go in first: loading the device state reads guest memory
            // (virtio checks its rings' indices there against its own).
            if let Some(changes) = changes {
                let t = Instant::now();
                write_changes(process.pid(), &config, memory, changes).await?;
                timings.changes_ms = ms(t.elapsed());
            }
            let t = Instant::now();
            // RAM is not in the stream: it is in the snapshot's file.
            qmp.set_migration(crate::qmp::Migration {
                ignore_shared: true,
                ..Default::default()
            })
            .await?;
            qmp.migrate_in_from_file(state).await?;
            crate::snapshot::wait_migration(&qmp, Duration::from_secs(120)).await?;
            timings.state_load_ms = ms(t.elapsed());
            let t = Instant::now();
            qmp.execute("cont", serde_json::json!({})).await?;
            timings.resume_ms = ms(t.elapsed());
            Ok::<_, VmError>(())
        };
        if let Err(e) = race_exit(&process, &paths, "while restoring", incoming).await {
            process.signal(Signal::KILL);
            return Err(e);
        }
        // Only now: a host connecting to the agent port while the device state is still
        // being loaded leaves the port throttled after the load.
        let t = Instant::now();
        let vm = Self::connect_agent(config, paths, process, qmp, Duration::from_secs(30)).await?;
        vm.until_exit("while restoring", vm.take_identity()).await?;
        timings.agent_ms = ms(t.elapsed());
        timings.total_ms = ms(t0.elapsed());
        tracing::info!(?timings, "restored");
        let _ = std::fs::write(vm.paths.timings(), serde_json::to_vec(&timings).unwrap_or_default());
        Ok(vm)
    }

    /// Makes a restored guest its own machine: steps its clock to now, reseeds its kernel RNG
    /// with fresh host entropy, sets its hostname and a machine-id of its own; the agent also
    /// resets the TCP connections the snapshot caught open (their peers never see this guest).
    pub async fn take_identity(&self) -> Result<(), VmError> {
        let mut entropy = [0u8; 64];
        rand::Rng::fill(&mut rand::thread_rng(), &mut entropy[..]);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let op = Op::Identity(stasis_agent_proto::IdentityRequest {
            unix_time_ns: now.as_nanos() as u64,
            entropy_hex: hex::encode(entropy),
            hostname: Some(self.config().name),
            machine_id: Some(hex::encode(rand::random::<[u8; 16]>())),
        });
        match self.agent().call(op, Duration::from_secs(30)).await? {
            Reply::Done => Ok(()),
            other => Err(AgentError::Unexpected(Box::new(other)).into()),
        }
    }
}

/// Writes the pages of `changes` into the RAM of the QEMU `pid`, which maps `memory`.
async fn write_changes(pid: u32, config: &MachineConfig, memory: &Path, changes: &Path) -> Result<(), VmError> {
    let (memory, changes) = (memory.to_path_buf(), changes.to_path_buf());
    let bytes = config.memory_mib << 20;
    tokio::task::spawn_blocking(move || {
        let base = std::fs::File::open(&memory)?;
        let addr = crate::changes::mapping_of(pid, &base, bytes)?;
        let changes = std::fs::File::open(&changes)?;
        crate::changes::write_pages(pid, addr, &changes, bytes)
    })
    .await
    .map_err(|e| {
        VmError::Invalid(format!(
            "writing the snapshot's changed pages: the writing task failed: {e}"
        ))
    })?
    .map_err(|source| VmError::Io {
        context: "writing the snapshot's changed pages into the machine's RAM".into(),
        source,
    })?;
    Ok(())
}

/// A new empty overlay over `base` as the machine's first disk, copied from a template kept
/// beside the base (creating a qcow2 file costs a `qemu-img` run; copying a small one costs
/// nothing).
pub(crate) async fn new_overlay_from_template(base: &Path, paths: &VmPaths) -> Result<(), VmError> {
    let template = base.with_extension("overlay-template.qcow2");
    if !template.exists() {
        // Concurrent restores may race to make it: each writes its own, the last rename wins.
        let tmp = base.with_extension(format!("overlay-template.{:016x}.tmp", rand::random::<u64>()));
        create_overlay(base, &tmp).await?;
        std::fs::rename(&tmp, &template).map_err(io("publishing the overlay template"))?;
    }
    let tmp = paths.control.join("overlay.tmp.qcow2");
    let (from, to) = (template.clone(), tmp.clone());
    tokio::task::spawn_blocking(move || {
        let _ = std::fs::remove_file(&to);
        std::fs::copy(&from, &to)
    })
    .await
    .map_err(|e| VmError::Invalid(format!("copying the overlay template: {e}")))?
    .map_err(io("copying the overlay template"))?;
    place_disk(&tmp, paths, &paths.disk())
}
