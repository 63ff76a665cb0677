//! The machines of one host: which are running, watching them for unexpected exits, stopping
//! them, and cleaning up after QEMUs an earlier platform process left behind.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use crate::network::Networks;
use crate::vm::{is_machine_qemu, MachineConfig, Nic, Vm, VmError, VmPaths};

/// How this host reaches one TCP port of a guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestPort {
    pub addr: std::net::SocketAddr,
    /// The guest's own kernel answers there (a tap), and it takes a request's first bytes in
    /// its SYN (TCP Fast Open without a cookie; the guest agent sets that up at boot). QEMU's
    /// user networking accepts for the guest and takes none.
    pub fast_open: bool,
}

/// Something that happened to a machine without being asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostEvent {
    /// QEMU ended on its own (crash, kill, guest power-off).
    Exited { name: String, reason: String },
}

struct Entry {
    vm: Arc<Vm>,
    /// Set before a requested stop, so the exit that follows is not reported as a crash.
    stopping: AtomicBool,
}

pub struct Host {
    /// Machines' disks directories (each its QEMU's to write): `root/<name>/`.
    root: PathBuf,
    /// Machines' control directories (the platform's own): `control_root/<name>/`.
    control_root: PathBuf,
    machines: Mutex<HashMap<String, Arc<Entry>>>,
    events: mpsc::UnboundedSender<HostEvent>,
    /// Computers' networks (set once, where the platform can make namespaces).
    networks: std::sync::OnceLock<Arc<Networks>>,
}

impl Host {
    /// Machines' disks live in `root/<name>/`, what the platform keeps of them in
    /// `control_root/<name>/` (see [`VmPaths`]).
    pub fn new(
        root: impl Into<PathBuf>,
        control_root: impl Into<PathBuf>,
    ) -> (Arc<Host>, mpsc::UnboundedReceiver<HostEvent>) {
        let (events, rx) = mpsc::unbounded_channel();
        let root = root.into();
        let host = Arc::new(Host {
            root,
            control_root: control_root.into(),
            machines: Mutex::new(HashMap::new()),
            events,
            networks: std::sync::OnceLock::new(),
        });
        (host, rx)
    }

    /// Gives machines networks of their own (see [`Networks`]); set once, before any boots.
    pub fn set_networks(&self, networks: Arc<Networks>) {
        let _ = self.networks.set(networks);
    }

    pub fn networks(&self) -> Option<&Arc<Networks>> {
        self.networks.get()
    }

    /// Makes the network a machine's config asks for ([`Nic::Tap`]: its namespace, named
    /// after the machine) before its QEMU starts.
    async fn plug(&self, name: &str, mut config: MachineConfig) -> Result<MachineConfig, VmError> {
        if let Some(Nic::Tap { netns }) = &mut config.nic {
            let Some(networks) = self.networks.get().cloned() else {
                return Err(VmError::Network(
                    "this host makes no networks (not root, or --confine off)".into(),
                ));
            };
            let machine = name.to_string();
            let made = tokio::task::spawn_blocking(move || networks.ensure(&machine))
                .await
                .map_err(|e| VmError::Network(e.to_string()))?
                .map_err(|e| VmError::Network(e.to_string()))?;
            *netns = made.netns;
        }
        Ok(config)
    }

    /// Ties `name`'s network to its running QEMU (see [`Networks::release`]).
    async fn release(&self, name: &str) {
        if let Some(networks) = self.networks.get().cloned() {
            let machine = name.to_string();
            let _ = tokio::task::spawn_blocking(move || networks.release(&machine)).await;
        }
    }

    /// Where this host reaches TCP port `port` of `name`'s guest: its namespace's address
    /// (passed on to the guest there), or with user networking a forwarded loopback port.
    pub async fn guest_port(&self, name: &str, port: u16) -> Result<GuestPort, VmError> {
        let vm = self
            .get(name)
            .ok_or_else(|| VmError::Invalid(format!("machine {name} is not running on this host")))?;
        match vm.config().nic {
            Some(Nic::Tap { .. }) => self
                .networks
                .get()
                .and_then(|n| n.get(name))
                .map(|a| GuestPort {
                    addr: std::net::SocketAddr::from((a.ip_address, port)),
                    fast_open: true,
                })
                .ok_or_else(|| VmError::Network(format!("machine {name} has no network on this host"))),
            Some(Nic::User) => vm
                .user_forward(port)
                .await
                .map(|addr| GuestPort { addr, fast_open: false }),
            Some(Nic::Unplugged) | None => Err(VmError::Network(format!("machine {name} has no network"))),
        }
    }

    /// Forgets `name`'s network once its QEMU is gone.
    async fn unplug(&self, name: &str) {
        if let Some(networks) = self.networks.get().cloned() {
            let machine = name.to_string();
            let _ = tokio::task::spawn_blocking(move || networks.remove(&machine)).await;
        }
    }

    pub fn dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    pub fn paths(&self, name: &str) -> VmPaths {
        VmPaths::new(self.control_root.join(name), self.root.join(name))
    }

    /// Names of every machine with a directory on this host (for reconciliation).
    pub fn machine_names(&self) -> Vec<String> {
        let mut names = machine_dirs(&self.root);
        for n in machine_dirs(&self.control_root) {
            if !names.contains(&n) {
                names.push(n);
            }
        }
        names
    }

    pub fn get(&self, name: &str) -> Option<Arc<Vm>> {
        self.lock().get(name).map(|e| e.vm.clone())
    }

    pub fn running(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Entry>>> {
        self.machines.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fills in where a machine's RAM and top disk overlay are: the overlay a previous run
    /// left on top of the chain (after snapshots) if there is one, else a fresh one.
    pub fn place(&self, name: &str, mut config: MachineConfig) -> MachineConfig {
        let paths = self.paths(name);
        // Anonymous RAM: a snapshot streams it out (see `snapshot`), and unlike shared file
        // memory, pages the guest never touched cost nothing, before a snapshot or after.
        config.ram_path = PathBuf::new();
        config.ram_shared = false;
        let previous = std::fs::read(paths.config())
            .ok()
            .and_then(|b| serde_json::from_slice::<MachineConfig>(&b).ok())
            .map(|previous| previous.disk)
            .or_else(|| legacy_top_disk(&paths));
        config.disk = previous.filter(|d| paths.holds_disk(d)).unwrap_or_else(|| paths.disk());
        config
    }

    /// Cold-boots `name` (the disk chain is kept if it exists).
    pub async fn boot(self: &Arc<Self>, name: &str, config: MachineConfig) -> Result<Arc<Vm>, VmError> {
        let config = self.plug(name, self.place(name, config)).await?;
        let started = Vm::boot(config, self.paths(name)).await;
        self.started(name, started).await
    }

    /// Takes a machine that started (its network then lasts as long as its QEMU), or undoes
    /// its network if it did not.
    async fn started(self: &Arc<Self>, name: &str, started: Result<Vm, VmError>) -> Result<Arc<Vm>, VmError> {
        match started {
            Ok(vm) => {
                self.release(name).await;
                Ok(self.adopt(name, vm))
            }
            Err(e) => {
                self.unplug(name).await;
                Err(e)
            }
        }
    }

    /// Restores `name` from captured (or materialized) snapshot files: the restore path.
    pub async fn restore(
        self: &Arc<Self>,
        name: &str,
        config: MachineConfig,
        state: &Path,
        memory: &Path,
    ) -> Result<Arc<Vm>, VmError> {
        self.restore_changed(name, config, state, memory, None).await
    }

    /// [`Host::restore`] of a snapshot captured as changes (see [`Vm::restore_changed`]).
    pub async fn restore_changed(
        self: &Arc<Self>,
        name: &str,
        config: MachineConfig,
        state: &Path,
        memory: &Path,
        changes: Option<&Path>,
    ) -> Result<Arc<Vm>, VmError> {
        let config = self.plug(name, config).await?;
        let started = Vm::restore_changed(config, self.paths(name), state, memory, changes).await;
        self.started(name, started).await
    }

    /// Captures the disk of a machine that is not running (its chain as its last run left
    /// it) into `staging`: a disk-only capture, with empty device state and RAM and no pause.
    /// The machine's config is the platform's own copy (its control directory); the chain's
    /// headers are read only by a confined `qemu-img` (see [`crate::snapshot::flatten_disk`]).
    pub async fn capture_stopped(
        &self,
        name: &str,
        staging: &Path,
        memory: &Path,
    ) -> Result<crate::snapshot::Capture, VmError> {
        if self.get(name).is_some() {
            return Err(VmError::Invalid(format!(
                "machine {name} is running: capture it running"
            )));
        }
        let paths = self.paths(name);
        let machine = std::fs::read(paths.config())
            .ok()
            .and_then(|b| serde_json::from_slice::<MachineConfig>(&b).ok())
            .ok_or_else(|| VmError::Invalid(format!("machine {name} has no disk on this host (it never ran here)")))?;
        let top = machine.disk.clone();
        if !paths.holds_disk(&top) {
            return Err(VmError::Invalid(format!(
                "machine {name}'s disk {} is not one of its own overlays",
                top.display()
            )));
        }
        // The chain's virtual size is its base's: a raw file the platform made (the image's
        // root disk, or a snapshot's disk in the cache), never one the machine can write.
        let size = std::fs::metadata(&machine.base_disk)
            .map_err(crate::vm::io(format!("reading {}", machine.base_disk.display())))?
            .len();
        let (state, memory, disk) = (staging.join("state"), memory.to_path_buf(), staging.join("disk.raw"));
        for empty in [&state, &memory] {
            std::fs::write(empty, b"").map_err(crate::vm::io(format!("creating {}", empty.display())))?;
        }
        crate::snapshot::flatten_disk(&machine, &paths.disks, &top, &disk, size).await?;
        Ok(crate::snapshot::Capture {
            state,
            memory,
            disk,
            frozen: top,
            machine,
            paused: std::time::Duration::ZERO,
        })
    }

    /// Re-attaches to a QEMU left running by an earlier platform process.
    pub async fn attach(self: &Arc<Self>, name: &str) -> Result<Arc<Vm>, VmError> {
        let vm = Vm::attach(self.paths(name)).await?;
        // Its network too: the namespace its QEMU joined names its slot.
        if let (Some(Nic::Tap { netns }), Some(networks)) = (&vm.config().nic, self.networks.get()) {
            if networks.adopt(name, netns).is_none() {
                tracing::warn!(
                    machine = name,
                    netns,
                    "a re-attached machine's network is not on this host"
                );
            }
        }
        Ok(self.adopt(name, vm))
    }

    /// Starts tracking a running machine and watching for its exit.
    pub fn adopt(self: &Arc<Self>, name: &str, vm: Vm) -> Arc<Vm> {
        let entry = Arc::new(Entry {
            vm: Arc::new(vm),
            stopping: AtomicBool::new(false),
        });
        let vm = entry.vm.clone();
        self.lock().insert(name.to_string(), entry.clone());
        let host = Arc::downgrade(self);
        let name = name.to_string();
        let mut exit = vm.exit_watch();
        tokio::spawn(async move {
            let mut rotate = tokio::time::interval(LOG_CHECK);
            let how = loop {
                if let Some(e) = *exit.borrow_and_update() {
                    break e;
                }
                tokio::select! {
                    changed = exit.changed() => if changed.is_err() {
                        return;
                    },
                    _ = rotate.tick() => {
                        entry.vm.rotate_logs();
                        entry.vm.sample();
                    }
                }
            };
            let Some(host) = host.upgrade() else { return };
            // Only forget the machine if the map still holds this very entry (a restart may
            // already have replaced it).
            let ours = {
                let mut machines = host.lock();
                let ours = machines.get(&name).is_some_and(|e| Arc::ptr_eq(e, &entry));
                if ours {
                    machines.remove(&name);
                }
                ours
            };
            if !entry.stopping.load(Ordering::SeqCst) {
                // A stop removes the network itself; a machine that ended by itself leaves it.
                if ours {
                    host.unplug(&name).await;
                }
                let mut reason = format!("QEMU {how}");
                // A guest that ended by itself (panic, power-off) says why on its console; a
                // QEMU killed from outside does not, and old boot messages would mislead.
                let tail = match how {
                    crate::process::Exit::Signal(_) => String::new(),
                    _ => entry.vm.console_tail(3),
                };
                if !tail.trim().is_empty() {
                    reason.push_str(&format!("; console: {}", tail.trim().replace('\n', " | ")));
                }
                let _ = host.events.send(HostEvent::Exited { name, reason });
            }
        });
        vm
    }

    /// Stops `name` if it runs (flush, quit, kill if needed). Its disk stays.
    pub async fn stop(&self, name: &str) {
        self.end(name, true).await
    }

    /// Ends `name` after it was captured for good (hibernation): quit at once, no flush. Its
    /// disks stay until a resume no longer needs them (see [`Host::drop_stale_disks`]).
    pub async fn halt(&self, name: &str) {
        self.end(name, false).await
    }

    /// Removes the overlays of `name` that are not in its running chain (what a machine
    /// resumed from its hibernation snapshot no longer rests on).
    pub async fn drop_stale_disks(&self, name: &str) {
        let Some(vm) = self.get(name) else { return };
        let (paths, top) = (self.paths(name), vm.config().disk);
        let _ = tokio::task::spawn_blocking(move || {
            for entry in std::fs::read_dir(&paths.disks).into_iter().flatten().flatten() {
                let path = entry.path();
                if path != top && paths.holds_disk(&path) {
                    let _ = std::fs::remove_file(&path);
                }
            }
        })
        .await;
    }

    async fn end(&self, name: &str, flush: bool) {
        let entry = self.lock().remove(name);
        match entry {
            Some(entry) => {
                entry.stopping.store(true, Ordering::SeqCst);
                match flush {
                    true => entry.vm.shutdown().await,
                    false => entry.vm.halt().await,
                }
                self.unplug(name).await;
            }
            None => {
                // Reading its files, then killing and waiting (up to KILL_WAIT) for it to go:
                // not on the async runtime's threads.
                let paths = self.paths(name);
                if let Err(e) = tokio::task::spawn_blocking(move || kill_stray_at(&paths)).await {
                    tracing::error!(name, error = %e, "stopping an untracked QEMU: the stopping task failed");
                }
                self.unplug(name).await;
            }
        }
    }

    /// Stops `name` and deletes everything it had on this host.
    pub async fn destroy(&self, name: &str) -> std::io::Result<()> {
        self.stop(name).await;
        let paths = self.paths(name);
        tokio::task::spawn_blocking(move || {
            // remove_dir_all follows no link inside.
            for d in [paths.disks, paths.control] {
                match std::fs::remove_dir_all(d) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            Ok(())
        })
        .await
        .map_err(std::io::Error::other)?
    }

    /// Stops every machine (platform shutdown).
    pub async fn stop_all(&self) {
        let names = self.running();
        futures::future::join_all(names.iter().map(|n| self.stop(n))).await;
    }

    /// Kills a QEMU of `name` that is running without being tracked (left by a crashed
    /// platform process for a computer that should not be running).
    /// Returns once that QEMU is gone, so nothing of it can touch the machine's files after.
    pub fn kill_stray(&self, name: &str) {
        kill_stray_at(&self.paths(name));
        if let Some(networks) = self.networks.get() {
            networks.remove(name);
        }
    }
}

/// How often a running machine's logs are checked against their cap (and its use sampled).
const LOG_CHECK: std::time::Duration = crate::vm::SAMPLE_EVERY;

/// How long a killed QEMU may take to be gone.
const KILL_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

fn kill_stray_at(paths: &VmPaths) {
    // Everything read here is the platform's own (the control directory); a QEMU of an older
    // version kept its pid file among its disks, and is killed only if that pid is its QEMU.
    let config = std::fs::read(paths.config())
        .ok()
        .and_then(|b| serde_json::from_slice::<MachineConfig>(&b).ok());
    let legacy_name = config.as_ref().map(|c| c.name.as_str());
    for pidfile in [paths.pidfile(), paths.disks.join("qemu.pid")] {
        let Some(pid) = crate::untrusted::read_small_file(&pidfile).and_then(|s| s.trim().parse::<u32>().ok()) else {
            continue;
        };
        let legacy_qmp = paths.disks.join("qmp.sock");
        if is_machine_qemu(pid, &paths.control, legacy_name)
            || crate::process::cmdline_contains(pid, &legacy_qmp.to_string_lossy())
        {
            tracing::warn!(pid, dir = %paths.control.display(), "killing a QEMU nobody tracks");
            if !crate::process::kill_and_wait(pid, KILL_WAIT) {
                tracing::error!(pid, "a killed QEMU is still there after {KILL_WAIT:?}");
            }
        }
        if pidfile == paths.pidfile() {
            let _ = std::fs::remove_file(&pidfile);
        }
    }
    if let Some(config) = config {
        // Only a machine's own RAM file; a restored machine maps its snapshot's, shared.
        if config.ram_shared && !config.ram_path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(config.ram_path);
        }
        // And its cgroups, which nobody else removes now that no process watches its QEMU
        // (only empty ones go: a QEMU still there keeps them).
        if let Some(jail) = &config.jail {
            crate::jail::JailPlan::remove_cgroups(&jail.cgroups.dirs(&crate::vm::cgroup_name(&paths.control)));
        }
    }
}

/// The top overlay of a machine last run by a version that kept its `machine.json` among its
/// disks. That file was its QEMU's to write, so only the name of a disk is taken from it,
/// and only if it names a plain file in the disks directory ([`VmPaths::holds_disk`]).
fn legacy_top_disk(paths: &VmPaths) -> Option<PathBuf> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(paths.disks.join("machine.json"))
        .ok()?;
    if !f.metadata().ok()?.file_type().is_file() {
        return None;
    }
    let mut bytes = Vec::new();
    f.take(64 * 1024).read_to_end(&mut bytes).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let disk = PathBuf::from(v.get("disk")?.as_str()?);
    paths.holds_disk(&disk).then_some(disk)
}

/// Names of the machine directories under `root` (for reconciliation).
pub fn machine_dirs(root: &Path) -> Vec<String> {
    std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// Puts the RAM directory `dir` (made and checked by the caller: a real directory of this
/// platform's, owner-only) on a tmpfs of its own with transparent huge pages, unless it is a
/// mount already. Restored machines map their snapshot's RAM file privately: in 2 MiB pages,
/// the page tables a background snapshot must fill before it can write-protect RAM take
/// 512 times fewer entries (a 512 MiB machine's take under a millisecond instead of ~100 ms,
/// all of it inside the guest's pause). Answers whether `dir` is such a mount now; a
/// `size_bytes` is the most it may hold (the host's RAM, as /dev/shm). A
/// directory that already holds files (an earlier platform's, perhaps mapped by QEMUs that
/// still run) is left as it is, and so is one where mounting is not allowed.
pub fn huge_ram_dir(dir: &Path, size_bytes: u64) -> std::io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let parent = dir.parent().unwrap_or(Path::new("/"));
    if std::fs::symlink_metadata(dir)?.dev() != std::fs::metadata(parent)?.dev() {
        return Ok(true); // mounted already (by an earlier run of this platform)
    }
    if std::fs::read_dir(dir)?.next().is_some() {
        return Ok(false);
    }
    let options = format!("mode=0700,huge=within_size,size={size_bytes}");
    let c = |s: &str| std::ffi::CString::new(s).map_err(std::io::Error::other);
    let (source, target, fstype, data) = (c("stasis-ram")?, c(&dir.to_string_lossy())?, c("tmpfs")?, c(&options)?);
    // SAFETY: every pointer is a NUL-terminated string that outlives the call.
    let done = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            data.as_ptr().cast(),
        )
    };
    if done != 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) => Ok(false),
            _ => Err(e),
        };
    }
    Ok(true)
}

/// Undoes [`huge_ram_dir`] at a clean shutdown, once its files are gone: the mount is
/// detached and the directory removed (nothing maps its files any more).
pub fn release_huge_ram_dir(dir: &Path) {
    use std::os::unix::fs::MetadataExt;
    let parent = dir.parent().unwrap_or(Path::new("/"));
    let mounted = match (std::fs::symlink_metadata(dir), std::fs::metadata(parent)) {
        (Ok(d), Ok(p)) => d.file_type().is_dir() && d.dev() != p.dev(),
        _ => false,
    };
    if mounted {
        if let Ok(target) = std::ffi::CString::new(dir.to_string_lossy().as_bytes()) {
            // SAFETY: a NUL-terminated path that outlives the call.
            if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
                tracing::warn!(dir = %dir.display(), error = %std::io::Error::last_os_error(), "unmounting the RAM directory");
                return;
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}
