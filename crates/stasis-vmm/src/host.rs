//! The machines of one host: which are running, watching them for unexpected exits, stopping
//! them, and cleaning up after QEMUs an earlier platform process left behind.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use crate::process::cmdline_contains;
use crate::vm::{MachineConfig, Vm, VmError, VmPaths};

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
    root: PathBuf,
    machines: Mutex<HashMap<String, Arc<Entry>>>,
    events: mpsc::UnboundedSender<HostEvent>,
}

impl Host {
    /// Machines live in `root/<name>/`.
    pub fn new(root: impl Into<PathBuf>) -> (Arc<Host>, mpsc::UnboundedReceiver<HostEvent>) {
        let (events, rx) = mpsc::unbounded_channel();
        let root = root.into();
        let host = Arc::new(Host {
            root,
            machines: Mutex::new(HashMap::new()),
            events,
        });
        (host, rx)
    }

    pub fn dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
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
        let paths = VmPaths::new(self.dir(name));
        // Anonymous RAM: a snapshot streams it out (see `snapshot`), and unlike shared file
        // memory, pages the guest never touched cost nothing, before a snapshot or after.
        config.ram_path = PathBuf::new();
        config.ram_shared = false;
        config.disk = std::fs::read(paths.config())
            .ok()
            .and_then(|b| serde_json::from_slice::<MachineConfig>(&b).ok())
            .map(|previous| previous.disk)
            .filter(|d| d.exists())
            .unwrap_or_else(|| paths.disk());
        config
    }

    /// Cold-boots `name` (the disk chain is kept if it exists).
    pub async fn boot(self: &Arc<Self>, name: &str, config: MachineConfig) -> Result<Arc<Vm>, VmError> {
        let config = self.place(name, config);
        let vm = Vm::boot(config, &self.dir(name)).await?;
        Ok(self.adopt(name, vm))
    }

    /// Restores `name` from captured (or materialized) snapshot files: the restore path.
    pub async fn restore(
        self: &Arc<Self>,
        name: &str,
        config: MachineConfig,
        state: &Path,
        memory: &Path,
    ) -> Result<Arc<Vm>, VmError> {
        let vm = Vm::restore(config, &self.dir(name), state, memory).await?;
        Ok(self.adopt(name, vm))
    }

    /// Re-attaches to a QEMU left running by an earlier platform process.
    pub async fn attach(self: &Arc<Self>, name: &str) -> Result<Arc<Vm>, VmError> {
        let vm = Vm::attach(&self.dir(name)).await?;
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
            let how = loop {
                if let Some(e) = *exit.borrow_and_update() {
                    break e;
                }
                if exit.changed().await.is_err() {
                    return;
                }
            };
            let Some(host) = host.upgrade() else { return };
            let mut machines = host.lock();
            // Only forget the machine if the map still holds this very entry (a restart may
            // already have replaced it).
            if machines.get(&name).is_some_and(|e| Arc::ptr_eq(e, &entry)) {
                machines.remove(&name);
            }
            drop(machines);
            if !entry.stopping.load(Ordering::SeqCst) {
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
        let entry = self.lock().remove(name);
        match entry {
            Some(entry) => {
                entry.stopping.store(true, Ordering::SeqCst);
                entry.vm.shutdown().await;
            }
            None => self.kill_stray(name),
        }
    }

    /// Stops `name` and deletes everything it had on this host.
    pub async fn destroy(&self, name: &str) -> std::io::Result<()> {
        self.stop(name).await;
        match std::fs::remove_dir_all(self.dir(name)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Stops every machine (platform shutdown).
    pub async fn stop_all(&self) {
        let names = self.running();
        futures::future::join_all(names.iter().map(|n| self.stop(n))).await;
    }

    /// Kills a QEMU of `name` that is running without being tracked (left by a crashed
    /// platform process for a computer that should not be running).
    pub fn kill_stray(&self, name: &str) {
        let paths = VmPaths::new(self.dir(name));
        kill_stray_at(&paths);
    }
}

fn kill_stray_at(paths: &VmPaths) {
    let Ok(pid) = std::fs::read_to_string(paths.pidfile()) else {
        return;
    };
    let Ok(pid) = pid.trim().parse::<u32>() else {
        return;
    };
    if cmdline_contains(pid, &paths.qmp().to_string_lossy()) {
        tracing::warn!(pid, dir = %paths.dir.display(), "killing a QEMU nobody tracks");
        // SAFETY: kill takes no pointers; the pid's command line names this machine's socket.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
    let _ = std::fs::remove_file(paths.pidfile());
    if let Some(config) = std::fs::read(paths.config())
        .ok()
        .and_then(|b| serde_json::from_slice::<MachineConfig>(&b).ok())
    {
        // Only a machine's own RAM file; a restored machine maps its snapshot's, shared.
        if config.ram_shared && !config.ram_path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(config.ram_path);
        }
    }
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
