//! Capturing a running machine: device state, RAM and disk frozen at one instant, with the
//! guest paused for as short a time as possible.
//!
//! The machine is streamed into a *twin*: a second QEMU with the same devices, started waiting
//! for a migration stream, whose RAM is a file in the staging directory and whose disk reads as
//! zeros. The stream is a background snapshot: the guest is paused only while its disk's top
//! overlay is frozen (`blockdev-snapshot-sync` puts a new overlay on top to go on writing to)
//! and its device state is saved; it then runs on while RAM is written out as it was at the
//! pause (userfaultfd write protection). The twin, holding RAM and device state exactly as at
//! the pause, writes its device state (without RAM, `x-ignore-shared`) to a file and quits.
//! Compressing and uploading happen afterwards from these files.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::broadcast;

use crate::process::{Process, Signal};
use crate::qmp::{Migration, Qmp};
use crate::vm::{connect_qmp, spawn_qemu_off_runtime, Launch, MachineConfig, Vm, VmError, VmPaths};

/// What a capture leaves in the staging directory.
#[derive(Debug, Clone)]
pub struct Capture {
    /// Device state: QEMU's migration stream without RAM.
    pub state: PathBuf,
    /// Guest RAM (sparse).
    pub memory: PathBuf,
    /// The guest-visible disk as it was at the pause: one raw file (sparse), read from the
    /// frozen chain inside the machine's confinement.
    pub disk: PathBuf,
    /// Top of the frozen disk chain (in the machine's disks directory); nothing writes to it
    /// any more.
    pub frozen: PathBuf,
    /// The machine as it was captured (what a restore must rebuild).
    pub machine: MachineConfig,
    /// How long the guest was paused (QEMU's own STOP → RESUME timestamps).
    pub paused: Duration,
}

/// What a capture of a restored machine's changes leaves in the staging directory (see
/// [`Vm::capture_changes`]): its RAM is `base_memory` with the `runs` of `changes` over it.
#[derive(Debug, Clone)]
pub struct ChangesCapture {
    /// Device state: every section of QEMU's migration stream but RAM's.
    pub state: PathBuf,
    /// The RAM file the machine was restored from (and maps).
    pub base_memory: PathBuf,
    /// The pages the machine has written since its restore, each at its offset in RAM, the
    /// rest a hole: host memory in proportion to what changed, not to the RAM.
    pub changes: PathBuf,
    /// Which pages `changes` holds.
    pub runs: crate::changes::Runs,
    /// As in [`Capture`].
    pub disk: PathBuf,
    pub frozen: PathBuf,
    pub machine: MachineConfig,
    pub paused: Duration,
}

/// What the guest does once it is captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Then {
    /// Runs on (a snapshot).
    RunOn,
    /// Stays paused for good (hibernation: its QEMU is halted next).
    StayPaused,
}

/// The head of a QEMU migration stream: its magic and version, then the configuration section
/// (the machine type, and the capabilities that must match on both ends: `x-ignore-shared`,
/// which restores set) as QEMU writes it (`vmstate_configuration` and its capabilities
/// subsection). A capture of changes saves device state alone, which lacks the section.
fn stream_head() -> Vec<u8> {
    let mut out = b"QEVM\0\0\0\x03".to_vec();
    out.push(0x07); // QEMU_VM_CONFIGURATION
    let name = crate::description::MACHINE_TYPE.as_bytes();
    out.extend((name.len() as u32).to_be_bytes());
    out.extend(name);
    let sub = b"configuration/capabilities";
    out.push(0x05); // QEMU_VM_SUBSECTION
    out.push(sub.len() as u8);
    out.extend(sub);
    out.extend(1u32.to_be_bytes()); // its version
    let caps: [&[u8]; 1] = [b"x-ignore-shared"];
    out.extend((caps.len() as u32).to_be_bytes());
    for cap in caps {
        out.push(cap.len() as u8);
        out.extend(cap);
    }
    out
}

/// Writes `to`: the stream head, then the sections of the device state QEMU saved in `from`
/// (which opens with the magic and version alone).
fn with_stream_head(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let mut src = std::fs::File::open(from)?;
    let mut magic = [0u8; 8];
    src.read_exact(&mut magic)?;
    if magic != *b"QEVM\0\0\0\x03" {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the saved device state is not a QEMU migration stream of version 3",
        ));
    }
    let mut out = std::fs::File::create(to)?;
    out.write_all(&stream_head())?;
    std::io::copy(&mut src, &mut out)?;
    out.sync_all()
}

/// Give up on a copy that has not finished by then.
const COPY_LIMIT: Duration = Duration::from_secs(300);

impl Vm {
    /// Captures the machine into `staging` (which must exist), its RAM into `memory` (best on
    /// a tmpfs: a machine restored from the snapshot maps that file, and only shared memory
    /// can be write-protected for its own later snapshots).
    pub async fn capture(&self, staging: &Path, memory: &Path) -> Result<Capture, VmError> {
        self.capture_as(staging, memory, Then::RunOn).await
    }

    /// Captures the machine for good (hibernation): the guest is paused for the capture and
    /// stays paused (whatever it would do next is not run); the caller then halts the QEMU.
    pub async fn capture_final(&self, staging: &Path, memory: &Path) -> Result<Capture, VmError> {
        self.capture_as(staging, memory, Then::StayPaused).await
    }

    async fn capture_as(&self, staging: &Path, memory: &Path, then: Then) -> Result<Capture, VmError> {
        let _one_at_a_time = self.ops().lock().await;
        self.sync_guest().await;
        let qmp = self.qmp().clone();
        let config = self.config();
        let disk_bytes = disk_size(&qmp).await?;

        // The twin writes no file of its own (its RAM file is bound in, its disk reads as
        // zeros): it gets a control directory and no disks directory at all.
        let twin_paths = VmPaths::new(staging.join("twin"), staging.join("twin").join("no-disks"));
        std::fs::create_dir_all(&twin_paths.control).map_err(|source| VmError::Io {
            context: "creating the twin's directory".into(),
            source,
        })?;
        let memory = memory.to_path_buf();
        let state = staging.join("state");
        let mut twin_config = config.clone();
        twin_config.ram_path = memory.clone();
        twin_config.ram_shared = true;
        let launch = Launch {
            incoming: true,
            null_disk_bytes: Some(disk_bytes),
        };
        let twin = spawn_qemu_off_runtime(&twin_config, &twin_paths, launch).await?;
        let result = async {
            let twin_qmp = connect_qmp(&twin, &twin_paths, Duration::from_secs(30)).await?;
            // The stream runs through a socket pair handed to both QEMUs as descriptors: a
            // confined QEMU sees no path of the other's.
            let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(|source| VmError::Io {
                context: "creating the migration socket pair".into(),
                source,
            })?;
            twin_qmp.send_fd("stasis-incoming", &theirs).await?;
            twin_qmp
                .execute("migrate-incoming", json!({ "uri": "fd:stasis-incoming" }))
                .await?;
            drop(theirs);
            // A restored machine's RAM is a private mapping of its snapshot's file (on tmpfs,
            // in huge pages where the host has them): userfaultfd write-protects it as it
            // does anonymous memory (kernels with uffd-wp PTE markers, 5.19 and later). Where
            // QEMU cannot (an older kernel; a confined QEMU on a host with
            // vm.unprivileged_userfaultfd=0), RAM is copied with the guest paused instead.
            let background = then == Then::RunOn
                && match qmp
                    .set_migration(Migration {
                        background_snapshot: true,
                        outgoing: true,
                        ..Default::default()
                    })
                    .await
                {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!(error = %e, "no background snapshot here; copying RAM with the guest paused");
                        false
                    }
                };
            qmp.send_fd("stasis-outgoing", &ours).await?;
            drop(ours);
            let uri = "fd:stasis-outgoing";
            let (frozen, paused) = if background {
                self.background_copy(&qmp, uri).await?
            } else {
                self.paused_copy(&qmp, uri, then).await?
            };
            wait_migration(&twin_qmp, Duration::from_secs(60)).await?;
            // The twin's query-migrate still says `completed` (its incoming stream) until the
            // outgoing one starts: wait for the outgoing one's own completion event instead.
            let mut twin_events = twin_qmp.events();
            twin_qmp
                .set_migration(Migration {
                    ignore_shared: true,
                    outgoing: true,
                    ..Default::default()
                })
                .await?;
            twin_qmp.migrate_out_to_file(&state).await?;
            wait_migration_event(&mut twin_events, "completed", Duration::from_secs(60)).await?;
            let _ = twin_qmp
                .execute_timeout("quit", json!({}), Duration::from_secs(2))
                .await;
            Ok::<_, VmError>((frozen, paused))
        }
        .await;
        stop_twin(&twin).await;
        let twin_control = twin_paths.control.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(twin_control)).await {
            tracing::warn!(error = %e, "removing the twin's directory: the removing task failed");
        }
        let (frozen, paused) = result?;
        let (machine, disk) = self.flatten_frozen(&frozen, staging, disk_bytes).await?;
        Ok(Capture {
            state,
            memory,
            disk,
            frozen,
            machine,
            paused,
        })
    }

    /// Captures a restored machine as the changes it made to its RAM since the restore: no
    /// twin and no copy of the whole RAM. With the guest paused, its disk is frozen, the pages
    /// it has written (its own pages in the private mapping of its snapshot's RAM file, as the
    /// kernel's pagemap tells) are copied into `changes`, and its device state is saved
    /// without RAM; then it runs on. The pause grows with the pages changed, not with the RAM.
    ///
    /// QEMU saves device state alone without the configuration section a migration stream
    /// opens with, which a restore requires; stasis writes that section itself (the machine
    /// type and the capabilities a restore sets), and checks first that it is, byte for byte,
    /// what this QEMU wrote at the head of `reference` (a whole capture's state of the same
    /// machine: the snapshot the changes are over). Where it is not, nothing is paused and
    /// the caller captures the machine whole.
    ///
    /// Where the kernel tracks soft-dirty pages, the changed pages are copied with the guest
    /// running and the pause copies only what it wrote meanwhile. Where it does not (this
    /// host's kernel, without `CONFIG_MEM_SOFT_DIRTY`), the pause copies them all, so a
    /// machine that changed more than `max_paused_copy` bytes is not captured this way: the
    /// error says so before anything is paused, and the caller captures it whole.
    pub async fn capture_changes(
        &self,
        staging: &Path,
        changes: &Path,
        reference: &Path,
        max_paused_copy: u64,
    ) -> Result<ChangesCapture, VmError> {
        let head = stream_head();
        let same = std::fs::File::open(reference)
            .and_then(|f| {
                use std::io::Read;
                let mut got = Vec::with_capacity(head.len());
                f.take(head.len() as u64).read_to_end(&mut got)?;
                Ok(got == head)
            })
            .map_err(|source| VmError::Io {
                context: format!("reading the head of {}", reference.display()),
                source,
            })?;
        if !same {
            return Err(VmError::Invalid(
                "this QEMU opens its migration streams otherwise than stasis writes them for captures of changes"
                    .into(),
            ));
        }
        let _one_at_a_time = self.ops().lock().await;
        let config = self.config();
        if config.ram_shared || config.ram_path.as_os_str().is_empty() {
            return Err(VmError::Invalid(
                "only a restored machine (its RAM a private mapping of its snapshot's file) is captured as changes"
                    .into(),
            ));
        }
        self.sync_guest().await;
        let qmp = self.qmp().clone();
        let disk_bytes = disk_size(&qmp).await?;
        let ram_bytes = config.memory_mib << 20;
        let pid = self.pid();
        let base = std::fs::File::open(&config.ram_path).map_err(|source| VmError::Io {
            context: format!("opening the RAM file {}", config.ram_path.display()),
            source,
        })?;
        let addr = crate::changes::mapping_of(pid, &base, ram_bytes).map_err(|source| VmError::Io {
            context: "finding the machine's RAM".into(),
            source,
        })?;
        // (Left by an earlier try of this capture, if any: the staging is the platform's own.)
        let _ = std::fs::remove_file(changes);
        let _ = std::fs::remove_file(staging.join("state"));
        let out = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(changes)
            .map_err(|source| VmError::Io {
                context: format!("creating {}", changes.display()),
                source,
            })?;
        out.set_len(ram_bytes).map_err(|source| VmError::Io {
            context: format!("sizing {}", changes.display()),
            source,
        })?;
        let state = staging.join("state");
        let devices = staging.join("state.devices");
        let _ = std::fs::remove_file(&devices);
        // With the guest running, its changed pages are copied once, soft-dirty tracking on
        // (where the kernel has it); the pause then copies only what it wrote meanwhile.
        if !crate::changes::soft_dirty_works() {
            let written = tokio::task::spawn_blocking(move || {
                let now = crate::changes::entries(pid, addr, ram_bytes)?;
                Ok::<_, std::io::Error>(now.iter().filter(|e| crate::changes::is_written(**e)).count() as u64)
            })
            .await
            .map_err(|e| VmError::Invalid(format!("counting the changed pages: the counting task failed: {e}")))?
            .map_err(|source| VmError::Io {
                context: "counting the changed pages".into(),
                source,
            })? * crate::changes::PAGE;
            if written > max_paused_copy {
                return Err(VmError::Invalid(format!(
                    "{} MiB changed since the restore, more than the {} MiB a pause copies",
                    written >> 20,
                    max_paused_copy >> 20
                )));
            }
        }
        let copied_before = if crate::changes::soft_dirty_works() {
            let out = out.try_clone().map_err(|source| VmError::Io {
                context: "sharing the changes file".into(),
                source,
            })?;
            let before = tokio::task::spawn_blocking(move || {
                crate::changes::clear_soft_dirty(pid)?;
                let before = crate::changes::entries(pid, addr, ram_bytes)?;
                let runs = crate::changes::runs_where(&before, |_, e| crate::changes::is_written(e));
                crate::changes::copy_pages(pid, addr, &runs, &out)?;
                Ok::<_, std::io::Error>(before)
            })
            .await
            .map_err(|e| VmError::Invalid(format!("copying the changed pages: the copying task failed: {e}")))?
            .map_err(|source| VmError::Io {
                context: "copying the changed pages ahead of the pause".into(),
                source,
            })?;
            Some(before)
        } else {
            None
        };
        let mut run_state = qmp.events();
        flush_disk(&qmp).await;
        qmp.execute("stop", json!({})).await?;
        let captured = async {
            let frozen = self.freeze_disk(&qmp).await?;
            let out = out.try_clone().map_err(|source| VmError::Io {
                context: "sharing the changes file".into(),
                source,
            })?;
            let runs = tokio::task::spawn_blocking(move || {
                use crate::changes::{is_soft_dirty, is_written, runs_where};
                let now = crate::changes::entries(pid, addr, ram_bytes)?;
                let runs = runs_where(&now, |_, e| is_written(e));
                match &copied_before {
                    None => {
                        crate::changes::copy_pages(pid, addr, &runs, &out)?;
                    }
                    Some(before) => {
                        // Written since the copy, or first written since; and any page that is
                        // no longer the machine's own reads as the base again.
                        let again = runs_where(&now, |i, e| {
                            is_written(e) && (is_soft_dirty(e) || !is_written(before[i]))
                        });
                        crate::changes::copy_pages(pid, addr, &again, &out)?;
                        let gone = runs_where(&now, |i, e| !is_written(e) && is_written(before[i]));
                        crate::changes::punch(&out, &gone)?;
                    }
                }
                Ok::<_, std::io::Error>(runs)
            })
            .await
            .map_err(|e| VmError::Invalid(format!("copying the changed pages: the copying task failed: {e}")))?
            .map_err(|source| VmError::Io {
                context: "copying the changed pages".into(),
                source,
            })?;
            qmp.save_device_state(&devices).await?;
            Ok::<_, VmError>((frozen, runs))
        }
        .await;
        // Whatever happened, the guest runs on.
        let resumed = qmp.execute("cont", json!({})).await;
        let (frozen, runs) = captured?;
        resumed?;
        let paused = pause_from_events(&mut run_state).await;
        let (from, to) = (devices.clone(), state.clone());
        tokio::task::spawn_blocking(move || with_stream_head(&from, &to))
            .await
            .map_err(|e| VmError::Invalid(format!("writing the device state: the writing task failed: {e}")))?
            .map_err(|source| VmError::Io {
                context: "writing the device state".into(),
                source,
            })?;
        let _ = std::fs::remove_file(&devices);
        let (machine, disk) = self.flatten_frozen(&frozen, staging, disk_bytes).await?;
        Ok(ChangesCapture {
            state,
            base_memory: config.ram_path.clone(),
            changes: changes.to_path_buf(),
            runs,
            disk,
            frozen,
            machine,
            paused,
        })
    }

    /// Has the guest flush its file systems (before the pause, not in it): the disk then holds
    /// what the guest wrote, so the snapshot's files can be read from its disk alone
    /// (`/snapshots/{id}/files`). A guest whose agent does not answer is captured as it is.
    async fn sync_guest(&self) {
        if let Err(e) = self
            .agent()
            .call(stasis_agent_proto::Op::Sync, Duration::from_secs(10))
            .await
        {
            tracing::debug!(error = %e, "the guest did not flush its file systems before the capture");
        }
    }

    /// The machine as captured (its disk the `frozen` overlay) and that disk flattened into
    /// `staging`'s `disk.raw`, inside the machine's confinement.
    async fn flatten_frozen(
        &self,
        frozen: &Path,
        staging: &Path,
        disk_bytes: u64,
    ) -> Result<(MachineConfig, PathBuf), VmError> {
        let mut machine = self.config();
        machine.disk = frozen.to_path_buf();
        let disk = staging.join("disk.raw");
        flatten_disk(&machine, &self.paths.disks, frozen, &disk, disk_bytes).await?;
        Ok((machine, disk))
    }

    /// Streams the machine into the twin listening at `uri` as a *background snapshot*: the
    /// guest is paused only while its disk is frozen and its device state is saved; then it
    /// runs on while RAM is written out as it was at that instant (pages the guest writes are
    /// write-protected with userfaultfd and sent before the write goes ahead), so no dirty
    /// tracking and no second pass are involved. Returns the frozen top overlay and the pause.
    async fn background_copy(&self, qmp: &Qmp, uri: &str) -> Result<(PathBuf, Duration), VmError> {
        let mut events = qmp.events();
        let mut run_state = qmp.events();
        flush_disk(qmp).await;
        qmp.execute("stop", json!({})).await?;
        let started = async {
            // Paused: freeze the disk at this very instant.
            let frozen = self.freeze_disk(qmp).await?;
            // The migration saves the device state and restarts the guest by itself.
            qmp.execute("migrate", json!({ "uri": uri })).await?;
            Ok::<_, VmError>(frozen)
        }
        .await;
        let frozen = match started {
            Ok(f) => f,
            Err(e) => {
                let _ = qmp.execute("cont", json!({})).await;
                return Err(e);
            }
        };
        // QEMU 7.2 restarts the guest itself once RAM is write-protected; later versions
        // restore the run state it found, which is paused (ours, for the disk), so the guest
        // would wait out the whole copy. Resume it as soon as RAM pages flow: they are sent
        // only after the device state is saved and write protection is on, so from then on
        // whatever the guest writes is copied as it was first.
        let resumed = if crate::accel::restarts_guest_after_background_setup(&self.config().qemu_binary) {
            Ok(())
        } else {
            resume_once_protected(qmp).await
        };
        let finished = match resumed {
            Err(e) => Err(e),
            Ok(()) => wait_migration_event(&mut events, "completed", COPY_LIMIT).await,
        };
        if finished.is_err() {
            let _ = qmp.execute("migrate_cancel", json!({})).await;
        }
        // Whatever happened, the guest must be running again.
        if qmp.status().await.is_ok_and(|s| s != "running") {
            let _ = qmp.execute("cont", json!({})).await;
        }
        finished?;
        let paused = pause_from_events(&mut run_state).await;
        Ok((frozen, paused))
    }
}

impl Vm {
    /// The fallback: pause, freeze the disk, stream everything (RAM included) into the twin,
    /// resume (unless `then` says the guest stays paused). The pause grows with the RAM the
    /// guest uses.
    async fn paused_copy(&self, qmp: &Qmp, uri: &str, then: Then) -> Result<(PathBuf, Duration), VmError> {
        let mut events = qmp.events();
        let mut run_state = qmp.events();
        qmp.set_migration(Migration {
            outgoing: true,
            ..Default::default()
        })
        .await?;
        flush_disk(qmp).await;
        qmp.execute("stop", json!({})).await?;
        let copied = async {
            let frozen = self.freeze_disk(qmp).await?;
            qmp.execute("migrate", json!({ "uri": uri })).await?;
            wait_migration_event(&mut events, "completed", COPY_LIMIT).await?;
            Ok::<_, VmError>(frozen)
        }
        .await;
        if copied.is_err() {
            let _ = qmp.execute("migrate_cancel", json!({})).await;
        }
        // QEMU reports `completed` a moment before it leaves `finish-migrate`, when `cont`
        // is still refused.
        let settle = Instant::now();
        while settle.elapsed() < Duration::from_secs(5) {
            match qmp.status().await {
                Ok(s) if s == "finish-migrate" => tokio::time::sleep(Duration::from_millis(1)).await,
                _ => break,
            }
        }
        if then == Then::StayPaused {
            if copied.is_err() {
                // Not captured: the guest runs on as it was.
                let _ = qmp.execute("cont", json!({})).await;
            }
            // It stays paused until its QEMU is halted: the pause is the rest of its run.
            return Ok((copied?, Duration::ZERO));
        }
        let resumed = qmp.execute("cont", json!({})).await;
        let frozen = copied?;
        resumed?;
        Ok((frozen, pause_from_events(&mut run_state).await))
    }

    /// With the guest paused: puts a new overlay on top of the disk for the guest to go on
    /// writing to, and returns the one now frozen.
    async fn freeze_disk(&self, qmp: &Qmp) -> Result<PathBuf, VmError> {
        let mut config = self.config();
        let frozen = config.disk.clone();
        let top = top_node(qmp).await?;
        let suffix = format!(
            "{:x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos()
        );
        let next = self.paths.disks.join(format!("disk-{suffix}.qcow2"));
        qmp.execute(
            "blockdev-snapshot-sync",
            json!({
                "node-name": top,
                "snapshot-file": next.to_string_lossy(),
                "snapshot-node-name": format!("disk-{suffix}"),
                "format": "qcow2",
            }),
        )
        .await?;
        // From here on the guest writes to the new overlay, whatever happens next.
        config.disk = next;
        self.set_config(config)?;
        Ok(frozen)
    }
}

/// How long folding the frozen overlays into the top one may take.
const COMPACT_LIMIT: Duration = Duration::from_secs(900);

impl Vm {
    /// Folds the frozen overlays of earlier snapshots into the top one (`block-stream` down to
    /// the base disk) while the guest runs, then deletes them: each snapshot would otherwise
    /// leave one more overlay on the host for good. A snapshot no longer needs its frozen
    /// overlay once captured (the capture flattened it). Returns how many files went.
    pub async fn compact_disk(&self) -> Result<usize, VmError> {
        let _one_at_a_time = self.ops().lock().await;
        let config = self.config();
        let stale: Vec<PathBuf> = std::fs::read_dir(&self.paths.disks)
            .map_err(|source| VmError::Io {
                context: format!("listing {}", self.paths.disks.display()),
                source,
            })?
            .flatten()
            .map(|e| e.path())
            .filter(|p| *p != config.disk && self.paths.holds_disk(p))
            .collect();
        if stale.is_empty() {
            return Ok(0);
        }
        let qmp = self.qmp().clone();
        let top = top_node(&qmp).await?;
        let base = base_node(&qmp, &config.base_disk).await?;
        let mut events = qmp.events();
        let job = "stasis-compact";
        qmp.execute(
            "block-stream",
            json!({ "job-id": job, "device": top, "base-node": base }),
        )
        .await?;
        let done = async {
            loop {
                match events.recv().await {
                    Ok(e)
                        if e.get("event").and_then(Value::as_str) == Some("BLOCK_JOB_COMPLETED")
                            && e.pointer("/data/device").and_then(Value::as_str) == Some(job) =>
                    {
                        return match e.pointer("/data/error").and_then(Value::as_str) {
                            Some(err) => Err(VmError::Invalid(format!("folding the disk's overlays failed: {err}"))),
                            None => Ok(()),
                        };
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return Err(VmError::Invalid("QMP closed".into())),
                }
            }
        };
        match tokio::time::timeout(COMPACT_LIMIT, done).await {
            Ok(r) => r?,
            Err(_) => {
                let _ = qmp.execute("block-job-cancel", json!({ "device": job })).await;
                return Err(VmError::Invalid(format!(
                    "folding the disk's overlays did not finish within {COMPACT_LIMIT:?}"
                )));
            }
        }
        // The chain is now the top overlay over the base; the rest is nobody's.
        let count = stale.len();
        tokio::task::spawn_blocking(move || {
            for f in &stale {
                let _ = std::fs::remove_file(f);
            }
        })
        .await
        .map_err(|e| VmError::Invalid(format!("deleting the folded overlays: the deleting task failed: {e}")))?;
        Ok(count)
    }
}

/// The node of the raw base disk at the bottom of the root disk's chain.
async fn base_node(qmp: &Qmp, base: &Path) -> Result<String, VmError> {
    let nodes = qmp.execute("query-named-block-nodes", json!({ "flat": true })).await?;
    let base = base.to_string_lossy();
    nodes
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| {
            n.get("drv").and_then(Value::as_str) == Some("raw") && n.get("file").and_then(Value::as_str) == Some(&base)
        })
        .and_then(|n| n.get("node-name").and_then(Value::as_str))
        .map(str::to_string)
        .ok_or_else(|| VmError::Invalid(format!("the base disk {base} is not in the disk chain")))
}

async fn stop_twin(twin: &Process) {
    if tokio::time::timeout(Duration::from_secs(3), twin.wait()).await.is_err() {
        twin.signal(Signal::KILL);
        let _ = tokio::time::timeout(Duration::from_secs(5), twin.wait()).await;
    }
}

/// The root disk's virtual size.
async fn disk_size(qmp: &Qmp) -> Result<u64, VmError> {
    let blocks = qmp.execute("query-block", json!({})).await?;
    root_disk(&blocks)
        .and_then(|b| b.pointer("/inserted/image/virtual-size"))
        .and_then(Value::as_u64)
        .ok_or_else(|| VmError::Invalid("the root disk's size is not in query-block".into()))
}

fn root_disk(blocks: &Value) -> Option<&Value> {
    blocks.as_array()?.iter().find(|b| {
        b.get("qdev")
            .and_then(Value::as_str)
            .is_some_and(|q| q.contains("rootdisk"))
    })
}

/// Waits for a MIGRATION event with `status` (the stream's own, not an earlier one's).
async fn wait_migration_event(
    events: &mut broadcast::Receiver<Value>,
    status: &str,
    limit: Duration,
) -> Result<(), VmError> {
    let wait = async {
        loop {
            match events.recv().await {
                Ok(e) if e.get("event").and_then(Value::as_str) == Some("MIGRATION") => {
                    match e.pointer("/data/status").and_then(Value::as_str) {
                        Some(s) if s == status => return Ok(()),
                        Some(s @ ("failed" | "cancelled")) => {
                            return Err(VmError::Invalid(format!("migration {s}")));
                        }
                        _ => {}
                    }
                }
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return Err(VmError::Invalid("QMP closed".into())),
            }
        }
    };
    tokio::time::timeout(limit, wait)
        .await
        .map_err(|_| VmError::Invalid(format!("migration did not reach {status} within {limit:?}")))?
}

/// The guest's pause, from QEMU's STOP and RESUME event timestamps.
async fn pause_from_events(events: &mut broadcast::Receiver<Value>) -> Duration {
    let stamp = |e: &Value| {
        let s = e.pointer("/timestamp/seconds").and_then(Value::as_u64)?;
        let us = e.pointer("/timestamp/microseconds").and_then(Value::as_u64)?;
        Some(Duration::from_secs(s) + Duration::from_micros(us))
    };
    let (mut stop, mut resume) = (None, None);
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while resume.is_none() {
            match events.recv().await {
                Ok(e) => match e.get("event").and_then(Value::as_str) {
                    Some("STOP") => stop = stamp(&e),
                    Some("RESUME") if stop.is_some() => resume = stamp(&e),
                    _ => {}
                },
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => return,
            }
        }
    })
    .await;
    match (stop, resume) {
        (Some(a), Some(b)) if b >= a => b - a,
        _ => Duration::ZERO,
    }
}

impl Vm {
    /// How many images the root disk's chain holds: the top overlay and each backing file
    /// under it, down to the base.
    pub async fn disk_chain_depth(&self) -> Result<usize, VmError> {
        let blocks = self.qmp().execute("query-block", json!({})).await?;
        let mut image = root_disk(&blocks)
            .and_then(|b| b.pointer("/inserted/image"))
            .ok_or_else(|| VmError::Invalid("the root disk is not in query-block".into()))?;
        let mut depth = 1;
        while let Some(next) = image.get("backing-image") {
            depth += 1;
            image = next;
        }
        Ok(depth)
    }
}

/// Writes what the disk's top overlay holds in the host's cache through to the file, with the
/// guest running: freezing the overlay in the pause flushes it again, and that flush then has
/// next to nothing left to write (a guest that has just written a lot would otherwise wait
/// out the whole write-back, paused). Best effort: the freeze's own flush is what counts.
async fn flush_disk(qmp: &Qmp) {
    let flushed = async {
        let top = top_node(qmp).await?;
        // QMP has no flush of its own; the monitor's block-layer command does just that.
        let line = format!("qemu-io {top} flush");
        let out = qmp
            .execute("human-monitor-command", json!({ "command-line": line }))
            .await?;
        match out.as_str().map(str::trim) {
            Some("") | None => Ok(()),
            Some(said) => Err(VmError::Invalid(format!("flushing the disk: {said}"))),
        }
    };
    if let Err(e) = flushed.await {
        tracing::debug!(error = %e, "the disk was not flushed ahead of the capture's pause");
    }
}

/// The node name at the top of the root disk's chain.
async fn top_node(qmp: &Qmp) -> Result<String, VmError> {
    let blocks = qmp.execute("query-block", json!({})).await?;
    root_disk(&blocks)
        .and_then(|b| b.pointer("/inserted/node-name"))
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| VmError::Invalid("the root disk is not in query-block".into()))
}

/// Waits until a background snapshot has begun sending RAM (or has ended), then lets a guest
/// that is still paused run.
async fn resume_once_protected(qmp: &Qmp) -> Result<(), VmError> {
    let start = Instant::now();
    loop {
        let m = qmp.execute("query-migrate", json!({})).await?;
        let status = m.get("status").and_then(Value::as_str).unwrap_or("none");
        let pages = ["normal", "duplicate"]
            .iter()
            .filter_map(|k| m.pointer(&format!("/ram/{k}")).and_then(Value::as_u64))
            .sum::<u64>();
        match status {
            "failed" | "cancelled" => return Ok(()), // the caller sees the end
            "completed" => break,
            _ if pages > 0 => break,
            _ if start.elapsed() > COPY_LIMIT => {
                return Err(VmError::Invalid(format!(
                    "the background snapshot sent no RAM within {COPY_LIMIT:?}"
                )))
            }
            _ => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
    if qmp.status().await.is_ok_and(|s| s == "paused") {
        qmp.execute("cont", json!({})).await?;
    }
    Ok(())
}

/// Polls `query-migrate` until the outgoing (or incoming) migration completes.
pub async fn wait_migration(qmp: &Qmp, limit: Duration) -> Result<(), VmError> {
    let start = Instant::now();
    loop {
        let m = qmp.execute("query-migrate", json!({})).await?;
        match m.get("status").and_then(Value::as_str).unwrap_or("none") {
            "completed" => return Ok(()),
            "failed" | "cancelled" => {
                let why = m.get("error-desc").and_then(Value::as_str).unwrap_or("no reason given");
                return Err(VmError::Invalid(format!("migration failed: {why}")));
            }
            _ if start.elapsed() > limit => {
                return Err(VmError::Invalid(format!("migration did not finish within {limit:?}")))
            }
            _ => tokio::time::sleep(Duration::from_millis(2)).await,
        }
    }
}

/// How long flattening a disk may take before it is given up.
const FLATTEN_LIMIT: Duration = Duration::from_secs(600);

/// The guest-visible disk of a frozen chain (`frozen`, in the machine's `disks` directory) as
/// one raw file `out` of `size` bytes (sparse).
///
/// The chain's qcow2 headers are the machine's QEMU's to write, and may name any file as a
/// backing file (or an NBD server). So the platform never parses them: for a confined
/// machine, `qemu-img` runs confined as the machine's own user, seeing only its disks
/// (read-only), its base disk and the output file, with no network; whatever a header names,
/// it can reach nothing the machine could not already read. The result must be exactly the
/// size the running machine reported for its disk.
pub async fn flatten_disk(
    machine: &MachineConfig,
    disks: &Path,
    frozen: &Path,
    out: &Path,
    size: u64,
) -> Result<(), VmError> {
    use std::os::unix::fs::MetadataExt;
    let invalid = |what: String| VmError::Invalid(format!("the frozen disk {}: {what}", frozen.display()));
    if frozen.parent() != Some(disks) {
        return Err(invalid(format!("not in {}", disks.display())));
    }
    let meta = std::fs::symlink_metadata(frozen).map_err(|e| invalid(e.to_string()))?;
    if !meta.file_type().is_file() {
        return Err(invalid("not a regular file".into()));
    }
    let _ = std::fs::remove_file(out);
    {
        let f = std::fs::File::create(out).map_err(|source| VmError::Io {
            context: format!("creating {}", out.display()),
            source,
        })?;
        f.set_len(size).map_err(|source| VmError::Io {
            context: format!("sizing {}", out.display()),
            source,
        })?;
    }
    let mut cmd = tokio::process::Command::new("qemu-img");
    // -n: into the file made above (its name and size are the platform's); it reads as zeros.
    cmd.args(["convert", "-U", "-n", "--target-is-zero", "-f", "qcow2", "-O", "raw"])
        .arg(frozen)
        .arg(out)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let mut cgroups = Vec::new();
    if let Some(settings) = &machine.jail {
        let uid = meta.uid();
        if !crate::jail::UID_RANGE.contains(&uid) {
            return Err(invalid(format!("owned by uid {uid}, not by a confined machine's user")));
        }
        let control = out.parent().unwrap_or(Path::new("/"));
        let settings = settings.clone();
        let name = format!("{}-flatten", crate::vm::cgroup_name(control));
        let visible = crate::jail::Visible {
            ro_dirs: vec![disks.to_path_buf()],
            ro_files: vec![machine.base_disk.clone()],
            own_files: vec![out.to_path_buf()],
            ..Default::default()
        };
        // Group access to the shared files, the output's owner, cgroups: file system work,
        // kept off the async runtime's threads.
        let plan = tokio::task::spawn_blocking(move || {
            crate::jail::JailPlan::prepare(
                &settings,
                &name,
                &visible,
                crate::jail::Limits {
                    vcpus: 1,
                    memory_mib: 0,
                    disk: None,
                },
                None,
                Some(uid),
            )
        })
        .await
        .map_err(|e| VmError::Invalid(format!("confining qemu-img: the preparing task failed: {e}")))?
        .map_err(|source| VmError::Io {
            context: "confining qemu-img".into(),
            source,
        })?;
        cgroups = plan.cgroup_dirs.clone();
        // SAFETY: `apply` only makes system calls on data prepared above (no allocation,
        // no locks), which is what may run between fork and exec.
        unsafe {
            cmd.pre_exec(move || plan.apply());
        }
    }
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let run = async {
        crate::process::spawn_child(&mut cmd, machine.jail.is_some())?
            .wait_with_output()
            .await
    };
    let result = tokio::time::timeout(FLATTEN_LIMIT, run).await;
    crate::jail::JailPlan::remove_cgroups(&cgroups);
    let result = match result {
        Err(_) => {
            return Err(invalid(format!(
                "qemu-img convert did not finish within {FLATTEN_LIMIT:?}"
            )))
        }
        Ok(r) => r.map_err(|source| VmError::Io {
            context: "running qemu-img convert".into(),
            source,
        })?,
    };
    // Back to the platform, whatever the confined qemu-img did with it.
    std::os::unix::fs::lchown(out, Some(0), Some(0))
        .or_else(|e| if machine.jail.is_none() { Ok(()) } else { Err(e) })
        .map_err(|source| VmError::Io {
            context: format!("taking back {}", out.display()),
            source,
        })?;
    if !result.status.success() {
        return Err(invalid(format!(
            "qemu-img convert failed: {}",
            String::from_utf8_lossy(&result.stderr).trim()
        )));
    }
    let meta = std::fs::symlink_metadata(out).map_err(|source| VmError::Io {
        context: format!("reading {}", out.display()),
        source,
    })?;
    if !meta.file_type().is_file() || meta.len() != size {
        return Err(invalid(format!(
            "flattened to {} bytes, not the disk's {size}",
            meta.len()
        )));
    }
    Ok(())
}
