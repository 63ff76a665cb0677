//! Confinement of a computer's QEMU, in the spirit of Firecracker's jailer: each QEMU runs
//!
//! - as a user of its own (a fresh uid and gid per launch, never root, no capabilities, no
//!   new privileges), with one shared supplementary group that may read the shared read-only
//!   files (kernel, initrd, base disks, snapshot RAM files);
//! - as the first process of a PID namespace of its own (no other process of the host is
//!   there to signal or probe; see [`crate::process::spawn_child`]);
//! - in new mount, network, IPC and UTS namespaces, with a root that is an empty read-only
//!   tmpfs holding only `/usr` (read-only: QEMU, its libraries and firmware), a few device
//!   nodes, and the files of its own machine bound at their host paths (its directory
//!   read-write; the kernel, initrd, base disk and RAM file). No `/proc`, no `/sys`, no other
//!   computer's directory, no data directory, no home directory;
//! - inside cgroups sized from the computer (CPU quota = its vCPUs, memory = its RAM plus
//!   QEMU's own overhead), cgroup v2 where the host has it and v1 where it has not;
//! - with QEMU's own seccomp filter (`-sandbox on,...`, see `vm::qemu_args`).
//!
//! The namespaces, mounts and identity change are made in the forked child just before it
//! executes QEMU, from a plan computed in the parent ([`JailPlan`]): the child only makes
//! system calls on prepared strings, nothing that allocates or locks.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Confinement settings of the host, decided once when the platform starts and carried in
/// each machine's config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JailSettings {
    /// The group allowed to read the shared read-only files.
    pub shared_gid: u32,
    pub cgroups: Cgroups,
    /// Where the jail's root is assembled (an empty directory; each jail mounts its own tmpfs
    /// over it in its own mount namespace, so one directory serves them all).
    pub root_dir: PathBuf,
    /// The host's `/dev/userfaultfd` (major, minor), when QEMU can use it: each jail gets a
    /// node of its own for the shared group, so no host-wide setting has to change.
    #[serde(default)]
    pub userfaultfd: Option<(u32, u32)>,
}

/// Which cgroup hierarchy limits QEMU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Cgroups {
    /// The unified hierarchy with the `cpu` and `memory` controllers: `<parent>/<machine>`.
    V2 { parent: PathBuf },
    /// The legacy hierarchies: `<cpu>/<machine>` and `<memory>/<machine>` (and
    /// `<pids>/<machine>` where the pids controller is mounted).
    V1 {
        cpu: PathBuf,
        memory: PathBuf,
        #[serde(default)]
        pids: Option<PathBuf>,
    },
    /// No usable controllers: no limits (said once at start-up).
    None,
}

/// Users of confined QEMUs are drawn at random from this range (no names, no home): two
/// QEMUs sharing a uid would need a 1-in-100-million draw, and even then each sees only its
/// own files.
pub const UID_RANGE: std::ops::Range<u32> = 2_000_000_000..2_100_000_000;
/// The default shared group of confined QEMUs.
pub const SHARED_GID: u32 = 1_999_999_999;

/// Threads a confined QEMU may have (vCPUs, I/O workers, migration): far above what it uses,
/// low enough that a runaway one cannot exhaust the host's process table.
pub const PIDS_MAX: u32 = 512;

/// QEMU's own memory beyond the guest's RAM (TCG's translation cache, device buffers, the
/// migration stream); the memory limit is the guest's RAM plus this.
pub const QEMU_OVERHEAD_MIB: u64 = 512;

impl JailSettings {
    /// The settings for this host: the cgroup hierarchy found under `/sys/fs/cgroup`, with
    /// the platform's cgroups named after `tag` (one per data directory).
    /// `qemu_opens_userfaultfd_device`: whether this host's QEMU opens `/dev/userfaultfd`
    /// (8.1 and later) rather than calling `userfaultfd(2)`.
    pub fn detect(tag: &str, qemu_opens_userfaultfd_device: bool) -> std::io::Result<JailSettings> {
        let root_dir = PathBuf::from("/run/stasis/jail-root");
        std::fs::create_dir_all(&root_dir)?;
        // The lease first, so that no other platform's sweep takes the cgroups made next for
        // those of a platform that is gone.
        let leases = Path::new(CGROUP_LEASES);
        if let Err(e) = take_lease(leases, &cgroup_parent_name(tag)) {
            tracing::warn!("other platforms starting may remove this one's empty cgroups: {e}");
        }
        let cgroups = Cgroups::detect(Path::new("/sys/fs/cgroup"), tag);
        cgroups.sweep();
        let others = cgroups.sweep_others(leases);
        if others > 0 {
            tracing::info!(removed = others, "removed the empty cgroups of platforms that are gone");
        }
        let userfaultfd = if qemu_opens_userfaultfd_device {
            char_device_numbers(Path::new("/dev/userfaultfd"))
        } else {
            None
        };
        Ok(JailSettings {
            shared_gid: SHARED_GID,
            cgroups,
            root_dir,
            userfaultfd,
        })
    }
}

/// The (major, minor) of a character device node.
fn char_device_numbers(path: &Path) -> Option<(u32, u32)> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let meta = std::fs::symlink_metadata(path).ok()?;
    if !meta.file_type().is_char_device() {
        return None;
    }
    let dev = meta.rdev();
    Some((libc::major(dev), libc::minor(dev)))
}

/// Lets unprivileged processes call `userfaultfd(2)` (`vm.unprivileged_userfaultfd=1`, for
/// every user of the host), which a confined QEMU older than 8.1 needs for background
/// snapshots; a newer one opens the jail's own `/dev/userfaultfd` and needs no such setting.
/// Returns whether the setting was changed; an error if it is off and cannot be changed.
pub fn allow_unprivileged_userfaultfd() -> std::io::Result<bool> {
    let knob = Path::new("/proc/sys/vm/unprivileged_userfaultfd");
    if std::fs::read_to_string(knob)?.trim() == "1" {
        return Ok(false);
    }
    std::fs::write(knob, "1")?;
    Ok(true)
}

/// Whether this process may confine QEMUs (it must be root to make namespaces and change users).
pub fn can_confine() -> bool {
    // SAFETY: geteuid takes nothing and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

impl Cgroups {
    pub fn detect(mount: &Path, tag: &str) -> Cgroups {
        let name = cgroup_parent_name(tag);
        let controllers = std::fs::read_to_string(mount.join("cgroup.controllers")).unwrap_or_default();
        let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
        if has("cpu") && has("memory") {
            let parent = mount.join(&name);
            let wanted: String = ["+cpu", "+memory", "+pids", "+io"]
                .into_iter()
                .filter(|c| matches!(*c, "+cpu" | "+memory") || has(&c[1..]))
                .collect::<Vec<_>>()
                .join(" ");
            let enable = |dir: &Path| std::fs::write(dir.join("cgroup.subtree_control"), &wanted);
            if enable(mount).is_ok() && std::fs::create_dir_all(&parent).is_ok() && enable(&parent).is_ok() {
                return Cgroups::V2 { parent };
            }
        }
        let (cpu, memory) = (mount.join("cpu"), mount.join("memory"));
        if cpu.join("cpu.cfs_quota_us").exists() && memory.join("memory.limit_in_bytes").exists() {
            let (cpu, memory) = (cpu.join(&name), memory.join(&name));
            let pids = Some(mount.join("pids"))
                .filter(|p| p.join("pids.max").exists() || p.join("cgroup.procs").exists())
                .map(|p| p.join(&name))
                .filter(|p| std::fs::create_dir_all(p).is_ok());
            if std::fs::create_dir_all(&cpu).is_ok() && std::fs::create_dir_all(&memory).is_ok() {
                return Cgroups::V1 { cpu, memory, pids };
            }
        }
        Cgroups::None
    }

    pub fn describe(&self) -> String {
        match self {
            Cgroups::V2 { parent } => format!("cgroup v2 under {}", parent.display()),
            Cgroups::V1 { cpu, memory, .. } => format!("cgroup v1 under {} and {}", cpu.display(), memory.display()),
            Cgroups::None => "no cgroup controllers (CPU and memory are not limited)".into(),
        }
    }

    /// Creates the machine's cgroup(s) with its limits; returns the `cgroup.procs` files QEMU
    /// joins and the directories to remove when it is gone.
    pub fn create(&self, machine: &str, limits: Limits) -> std::io::Result<Vec<PathBuf>> {
        let write = |dir: &Path, file: &str, value: String| {
            std::fs::write(dir.join(file), &value).map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("writing {value} to {}: {e}", dir.join(file).display()),
                )
            })
        };
        let fresh = |dir: PathBuf| -> std::io::Result<PathBuf> {
            // A leftover of a QEMU that is gone (removal fails while processes are inside).
            let _ = std::fs::remove_dir(&dir);
            std::fs::create_dir_all(&dir)?;
            Ok(dir)
        };
        match self {
            Cgroups::V2 { parent } => {
                if !parent.exists() {
                    // Removed with the last machine: make it again, delegating the controllers.
                    std::fs::create_dir_all(parent)?;
                    if write(parent, "cgroup.subtree_control", "+cpu +memory +pids +io".into()).is_err()
                        && write(parent, "cgroup.subtree_control", "+cpu +memory +pids".into()).is_err()
                    {
                        write(parent, "cgroup.subtree_control", "+cpu +memory".into())?;
                    }
                }
                let dir = fresh(parent.join(machine))?;
                if dir.join("pids.max").exists() {
                    write(&dir, "pids.max", PIDS_MAX.to_string())?;
                }
                write(
                    &dir,
                    "cpu.max",
                    format!("{} {}", limits.cpu_quota_us(), Limits::PERIOD_US),
                )?;
                write(&dir, "memory.max", limits.memory_bytes().to_string())?;
                write(&dir, "memory.swap.max", "0".into()).ok();
                // The disk ceiling, also for what the QEMU writes through the page cache (v2
                // attributes writeback to the cgroup; v1's blkio cannot see buffered writes,
                // so there QEMU's own throttle is the only one).
                if let (Some(disk), true) = (limits.disk, dir.join("io.max").exists()) {
                    write(&dir, "io.max", disk.io_max())?;
                }
                Ok(vec![dir])
            }
            Cgroups::V1 { cpu, memory, pids } => {
                let c = fresh(cpu.join(machine))?;
                write(&c, "cpu.cfs_period_us", Limits::PERIOD_US.to_string())?;
                write(&c, "cpu.cfs_quota_us", limits.cpu_quota_us().to_string())?;
                let m = fresh(memory.join(machine))?;
                write(&m, "memory.limit_in_bytes", limits.memory_bytes().to_string())?;
                // No swap beyond the memory limit, where the kernel accounts swap at all.
                if m.join("memory.memsw.limit_in_bytes").exists() {
                    write(&m, "memory.memsw.limit_in_bytes", limits.memory_bytes().to_string())?;
                }
                let mut dirs = vec![c, m];
                if let Some(pids) = pids {
                    let p = fresh(pids.join(machine))?;
                    write(&p, "pids.max", PIDS_MAX.to_string())?;
                    dirs.push(p);
                }
                Ok(dirs)
            }
            Cgroups::None => Ok(Vec::new()),
        }
    }

    /// The parents the platform's machine cgroups live in.
    fn parents(&self) -> Vec<&Path> {
        match self {
            Cgroups::V2 { parent } => vec![parent],
            Cgroups::V1 { cpu, memory, pids } => {
                let mut v: Vec<&Path> = vec![cpu, memory];
                v.extend(pids.as_deref());
                v
            }
            Cgroups::None => Vec::new(),
        }
    }

    /// Removes the platform's parent cgroups (only empty ones can go: a live machine keeps
    /// its parent) and gives up its lease on them: for a platform that is stopping.
    pub fn remove_parents(&self) {
        for parent in self.parents() {
            let _ = std::fs::remove_dir(parent);
        }
        if let Some(name) = self.parents().first().and_then(|p| p.file_name()) {
            release_lease(&name.to_string_lossy());
        }
    }

    /// The cgroup directories of a machine (whether they exist or not).
    pub fn dirs(&self, machine: &str) -> Vec<PathBuf> {
        self.parents().into_iter().map(|p| p.join(machine)).collect()
    }

    /// Removes the cgroups of machines whose QEMU is gone (left by a platform that was killed,
    /// or by a QEMU that ended unobserved); removing one with processes inside fails, so live
    /// QEMUs keep theirs. Returns how many were removed.
    pub fn sweep(&self) -> usize {
        let mut removed = 0;
        for parent in self.parents() {
            for entry in std::fs::read_dir(parent).into_iter().flatten().flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) && std::fs::remove_dir(entry.path()).is_ok() {
                    removed += 1;
                }
            }
        }
        removed
    }

    /// Removes what other platforms that are gone left in the hierarchies this platform's
    /// cgroups are in: their parents (`stasis-<tag>`, one per data directory) and the empty
    /// cgroups of their machines. Returns how many directories were removed.
    ///
    /// A platform killed (SIGKILL, a crash, a host lost) keeps its parents, and the cgroups of
    /// its machines that end meanwhile, until a platform on the same data directory starts and
    /// sweeps them; one whose data directory is never used again would keep them for good.
    ///
    /// Only directories are removed, never a process signalled: removing a cgroup that has
    /// processes inside fails (EBUSY), so the QEMUs a killed platform left running keep theirs
    /// (for the platform that re-attaches them). What must not go is the empty cgroup of a
    /// platform that is alive: its parent between machines, or a machine's cgroup made an
    /// instant before its QEMU joins it. So each platform holds a lease on its cgroups for as
    /// long as it lives, an exclusive `flock` on `<leases>/stasis-<tag>` taken before it makes
    /// them ([`take_lease`]); the kernel drops the lock when the process ends, however it ends.
    /// Another platform's cgroups are swept only while the sweeper holds their lease, taken
    /// without waiting (held, it means a live platform: its cgroups are left alone); the lease
    /// file goes with them. A platform starting on that data directory meanwhile waits for the
    /// lease (a sweep takes milliseconds), then makes its cgroups anew. Names other than
    /// `stasis-` and 16 hex digits are never touched.
    pub fn sweep_others(&self, leases: &Path) -> usize {
        let own: Vec<&std::ffi::OsStr> = self.parents().iter().filter_map(|p| p.file_name()).collect();
        let mut roots: Vec<&Path> = self.parents().iter().filter_map(|p| p.parent()).collect();
        roots.dedup();
        let mut names = std::collections::BTreeSet::new();
        for root in &roots {
            for entry in std::fs::read_dir(root).into_iter().flatten().flatten() {
                let name = entry.file_name();
                if is_parent_name(&name.to_string_lossy())
                    && !own.contains(&name.as_os_str())
                    && entry.file_type().is_ok_and(|t| t.is_dir())
                {
                    names.insert(name);
                }
            }
        }
        let mut removed = 0;
        for name in names {
            let name = name.to_string_lossy();
            // Held: its platform is alive (or, for a moment, another one sweeping it).
            let Some(lease) = Lease::try_take(leases, &name) else {
                continue;
            };
            for root in &roots {
                let parent = root.join(&*name);
                for entry in std::fs::read_dir(&parent).into_iter().flatten().flatten() {
                    if entry.file_type().is_ok_and(|t| t.is_dir()) && std::fs::remove_dir(entry.path()).is_ok() {
                        removed += 1;
                    }
                }
                if std::fs::remove_dir(&parent).is_ok() {
                    removed += 1;
                }
            }
            lease.remove();
        }
        removed
    }
}

/// Where platforms hold the leases on their cgroups (see [`Cgroups::sweep_others`]).
pub const CGROUP_LEASES: &str = "/run/stasis/cgroups";

/// How long a starting platform waits for its lease (held a moment by another platform
/// sweeping; held longer, by another platform on the same data directory).
const LEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The name of a platform's parent cgroups, from its data directory's tag.
fn cgroup_parent_name(tag: &str) -> String {
    format!("stasis-{tag}")
}

/// Whether `name` is one [`cgroup_parent_name`] makes from a data directory's tag.
fn is_parent_name(name: &str) -> bool {
    name.strip_prefix("stasis-")
        .is_some_and(|t| t.len() == 16 && t.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The leases this process holds, for as long as it runs (or until it gives them up).
static LEASES_HELD: std::sync::Mutex<Vec<Lease>> = std::sync::Mutex::new(Vec::new());

/// An exclusive lock on the lease file `<leases>/<name>`.
struct Lease {
    name: String,
    path: PathBuf,
    _file: std::fs::File,
}

impl Lease {
    /// The lease, if no process holds it now.
    fn try_take(dir: &Path, name: &str) -> Option<Lease> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = dir.join(name);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .ok()?;
        file.try_lock().ok()?;
        // The file may have been removed by the one that held it before (or removed and made
        // anew): a lock on it then guards nothing.
        use std::os::unix::fs::MetadataExt;
        let (held, named) = (file.metadata().ok()?, std::fs::metadata(&path).ok()?);
        (held.dev() == named.dev() && held.ino() == named.ino()).then(|| Lease {
            name: name.to_string(),
            path,
            _file: file,
        })
    }

    /// Removes the lease file, then lets go of it (in that order: whoever opened it meanwhile
    /// finds it is no longer the one at its path).
    fn remove(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Takes the lease on the cgroups named `name` for as long as this process runs, waiting
/// [`LEASE_WAIT`] at most for another process to let go of it.
pub fn take_lease(dir: &Path, name: &str) -> std::io::Result<()> {
    let mut held = LEASES_HELD.lock().unwrap_or_else(|e| e.into_inner());
    if held.iter().any(|l| l.name == name) {
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    let start = std::time::Instant::now();
    loop {
        if let Some(lease) = Lease::try_take(dir, name) {
            held.push(lease);
            return Ok(());
        }
        if start.elapsed() > LEASE_WAIT {
            return Err(std::io::Error::new(
                std::io::ErrorKind::WouldBlock,
                format!(
                    "another process holds the lease {} (another platform on the same data directory?)",
                    dir.join(name).display()
                ),
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Gives up the lease on the cgroups named `name`, if this process holds it.
fn release_lease(name: &str) {
    let mut held = LEASES_HELD.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(i) = held.iter().position(|l| l.name == name) {
        held.swap_remove(i).remove();
    }
}

/// A machine's resource limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    pub vcpus: u32,
    pub memory_mib: u64,
    /// Disk traffic on one block device, where the cgroup can limit it (v2 `io.max`).
    pub disk: Option<DiskCeiling>,
}

/// A ceiling on traffic to one block device (its whole disk), per direction; 0: none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskCeiling {
    pub major: u32,
    pub minor: u32,
    pub bytes_per_sec: u64,
    pub iops: u64,
}

impl DiskCeiling {
    /// The `io.max` line: `MAJ:MIN rbps=.. wbps=.. riops=.. wiops=..` ("max" for none).
    fn io_max(&self) -> String {
        let v = |n: u64| if n == 0 { "max".to_string() } else { n.to_string() };
        format!(
            "{}:{} rbps={} wbps={} riops={} wiops={}",
            self.major,
            self.minor,
            v(self.bytes_per_sec),
            v(self.bytes_per_sec),
            v(self.iops),
            v(self.iops)
        )
    }
}

/// The whole disk (major, minor) holding `path`, as cgroup v2 names devices: a partition's
/// disk; None where the file system is on no block device (tmpfs, overlay).
pub fn whole_disk_of(path: &Path) -> Option<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(path).ok()?.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    if !sys.exists() {
        return None;
    }
    if !sys.join("partition").exists() {
        return Some((major, minor));
    }
    let parent = std::fs::read_to_string(sys.join("../dev")).ok()?;
    let (a, b) = parent.trim().split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

impl Limits {
    pub const PERIOD_US: u64 = 100_000;

    /// As much CPU time per period as the machine has vCPUs.
    pub fn cpu_quota_us(&self) -> u64 {
        Self::PERIOD_US * u64::from(self.vcpus.max(1))
    }

    pub fn memory_bytes(&self) -> u64 {
        (self.memory_mib + QEMU_OVERHEAD_MIB) << 20
    }
}

/// What one confined QEMU may see and who it runs as.
#[derive(Debug, Clone, Default)]
pub struct Visible {
    /// Bound read-write (the machine's own directory of disks), and handed to its user.
    pub rw_dirs: Vec<PathBuf>,
    /// Bound read-only and left as they are (a capture's disks, for the flattener).
    pub ro_dirs: Vec<PathBuf>,
    /// Files bound read-write that belong to this machine alone (created empty if missing,
    /// owned by its user).
    pub own_files: Vec<PathBuf>,
    /// Shared files QEMU opens for writing but never writes (a snapshot's RAM file, mapped
    /// private: QEMU 7.2 opens it read-write); given to the shared group.
    pub shared_rw_files: Vec<PathBuf>,
    /// Shared read-only files (kernel, initrd, base disk), bound read-only and given to the
    /// shared group.
    pub ro_files: Vec<PathBuf>,
    /// Device nodes besides null, zero, random and urandom (`/dev/kvm`).
    pub devices: Vec<PathBuf>,
    /// A network namespace the platform made (`/run/netns/NAME`) to join instead of an empty
    /// one of its own: where the machine's tap is.
    pub netns: Option<PathBuf>,
    /// A `/dev/net/tun` of the jail's own (for the tap in `netns`).
    pub tun: bool,
}

/// A confinement ready to be applied in the child.
pub struct JailPlan {
    pub uid: u32,
    pub gid: u32,
    groups: Vec<libc::gid_t>,
    root: CString,
    steps: Vec<Step>,
    cgroup_procs: Vec<CString>,
    workdir: CString,
    /// Whether the jail's root holds a device node of its own (then it cannot be `nodev`).
    has_nodes: bool,
    /// The network namespace to join (opened by the parent; None: a new, empty one).
    netns: Option<std::os::fd::OwnedFd>,
    /// The cgroup directories to remove once QEMU is gone.
    pub cgroup_dirs: Vec<PathBuf>,
}

enum Step {
    Mkdir(CString),
    Touch(CString),
    Symlink {
        target: CString,
        link: CString,
    },
    /// A character device node for the shared group (`/dev/userfaultfd`).
    CharDevice {
        path: CString,
        dev: libc::dev_t,
        gid: u32,
    },
    Bind {
        src: CString,
        dst: CString,
        kind: Mount,
    },
}

/// What a bind mount holds, which decides its flags (all are nosuid).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mount {
    /// Programs and libraries: read-only, executable.
    System,
    /// A device node: read-write, device access.
    Device,
    /// Data: no devices, nothing executable.
    Data { read_only: bool },
}

impl Mount {
    fn remount_flags(self) -> libc::c_ulong {
        let base = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID;
        match self {
            Mount::System => base | libc::MS_RDONLY | libc::MS_NODEV,
            Mount::Device => base | libc::MS_NOEXEC,
            Mount::Data { read_only: true } => base | libc::MS_RDONLY | libc::MS_NODEV | libc::MS_NOEXEC,
            Mount::Data { read_only: false } => base | libc::MS_NODEV | libc::MS_NOEXEC,
        }
    }
}

fn cstr(p: impl AsRef<std::ffi::OsStr>) -> std::io::Result<CString> {
    CString::new(p.as_ref().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "a path contains a NUL byte"))
}

fn absolute(p: &Path) -> std::io::Result<PathBuf> {
    if !p.is_absolute() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "{} is not an absolute path; a confined QEMU needs absolute paths",
                p.display()
            ),
        ));
    }
    Ok(p.to_path_buf())
}

/// Gives a shared file to the shared group with group read (and write, if `write`) access,
/// leaving its owner as it is.
fn share(path: &Path, gid: u32, write: bool) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::metadata(path)?;
    if meta.gid() != gid {
        std::os::unix::fs::chown(path, None, Some(gid))?;
    }
    let want = meta.mode() & 0o7777 | 0o040 | if write { 0o020 } else { 0 };
    if meta.mode() & 0o7777 != want {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(want))?;
    }
    Ok(())
}

/// Hands a machine's directory to a new user. Whatever an earlier QEMU left there that is not
/// a plain file (a symbolic link, a directory, a socket, a FIFO, a device node) goes: only
/// disk images belong there, and nothing the platform does later may meet anything else.
/// Nothing follows a link: entries are looked at with `lstat` and removed with `unlink`, and
/// the QEMU that could have raced this is gone (the caller waited for it).
pub fn take_tree(dir: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(dir)?;
    if !meta.is_dir() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} is not a directory", dir.display()),
        ));
    }
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let kind = std::fs::symlink_metadata(&path)?.file_type();
        if kind.is_file() {
            std::os::unix::fs::lchown(&path, Some(uid), Some(gid))?;
        } else if kind.is_dir() {
            // remove_dir_all does not follow links inside either.
            std::fs::remove_dir_all(&path)?;
        } else {
            std::fs::remove_file(&path)?;
        }
    }
    std::os::unix::fs::lchown(dir, Some(uid), Some(gid))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

impl JailPlan {
    /// Prepares the host side (ownership, group access, cgroups) and the list of steps the
    /// child takes. `machine` names the cgroup (unique per machine directory). `uid`: the user
    /// to run as (a fresh one is drawn when None); `workdir`: where the child starts (`/`
    /// when None).
    pub fn prepare(
        settings: &JailSettings,
        machine: &str,
        visible: &Visible,
        limits: Limits,
        workdir: Option<&Path>,
        uid: Option<u32>,
    ) -> std::io::Result<JailPlan> {
        use rand::Rng;
        let uid = uid.unwrap_or_else(|| rand::thread_rng().gen_range(UID_RANGE));
        if !UID_RANGE.contains(&uid) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("uid {uid} is not a confined user's"),
            ));
        }
        let gid = uid;
        let mut groups = vec![settings.shared_gid];
        for dir in &visible.rw_dirs {
            take_tree(&absolute(dir)?, uid, gid)?;
        }
        for f in &visible.own_files {
            let f = absolute(f)?;
            if !f.exists() {
                std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&f)?;
            }
            std::os::unix::fs::lchown(&f, Some(uid), Some(gid))?;
        }
        for f in &visible.shared_rw_files {
            share(&absolute(f)?, settings.shared_gid, true)?;
        }
        for f in &visible.ro_files {
            share(&absolute(f)?, settings.shared_gid, false)?;
        }
        for dev in &visible.devices {
            use std::os::unix::fs::MetadataExt;
            let g = std::fs::metadata(dev)?.gid();
            if g != 0 && !groups.contains(&g) {
                groups.push(g);
            }
        }

        let root = absolute(&settings.root_dir)?;
        let inside = |p: &Path| -> std::io::Result<CString> {
            let rel = p.strip_prefix("/").unwrap_or(p);
            cstr(root.join(rel))
        };
        let mut steps = Vec::new();
        let mut made = std::collections::BTreeSet::new();
        let mut mkdirs = |p: &Path, steps: &mut Vec<Step>| -> std::io::Result<()> {
            let mut acc = PathBuf::from("/");
            for c in p.strip_prefix("/").unwrap_or(p).components() {
                acc.push(c);
                if made.insert(acc.clone()) {
                    steps.push(Step::Mkdir(inside(&acc)?));
                }
            }
            Ok(())
        };
        // The system: /usr read-only, and the top-level links or directories into it.
        mkdirs(Path::new("/usr"), &mut steps)?;
        steps.push(Step::Bind {
            src: cstr("/usr")?,
            dst: inside(Path::new("/usr"))?,
            kind: Mount::System,
        });
        for top in ["bin", "sbin", "lib", "lib64", "lib32", "libx32"] {
            let host = Path::new("/").join(top);
            match std::fs::read_link(&host) {
                Ok(target) => steps.push(Step::Symlink {
                    target: cstr(&target)?,
                    link: inside(&host)?,
                }),
                Err(_) if host.is_dir() => {
                    mkdirs(&host, &mut steps)?;
                    steps.push(Step::Bind {
                        src: cstr(&host)?,
                        dst: inside(&host)?,
                        kind: Mount::System,
                    });
                }
                Err(_) => {}
            }
        }
        // The dynamic loader's cache.
        let mut ro_files: Vec<PathBuf> = vec![PathBuf::from("/etc/ld.so.cache")];
        ro_files.retain(|p| p.exists());
        let rw_dirs = visible
            .rw_dirs
            .iter()
            .map(|d| absolute(d))
            .collect::<std::io::Result<Vec<_>>>()?;
        for d in &rw_dirs {
            mkdirs(d, &mut steps)?;
            steps.push(Step::Bind {
                src: cstr(d)?,
                dst: inside(d)?,
                kind: Mount::Data { read_only: false },
            });
        }
        for d in &visible.ro_dirs {
            let d = absolute(d)?;
            mkdirs(&d, &mut steps)?;
            steps.push(Step::Bind {
                src: cstr(&d)?,
                dst: inside(&d)?,
                kind: Mount::Data { read_only: true },
            });
        }
        let mut bind_file = |src: &Path, kind: Mount, steps: &mut Vec<Step>| -> std::io::Result<()> {
            if rw_dirs.iter().any(|d| src.starts_with(d)) {
                // Already visible through its directory.
                return Ok(());
            }
            if let Some(parent) = src.parent() {
                mkdirs(parent, steps)?;
            }
            let dst = inside(src)?;
            steps.push(Step::Touch(dst.clone()));
            steps.push(Step::Bind {
                src: cstr(src)?,
                dst,
                kind,
            });
            Ok(())
        };
        for dev in ["/dev/null", "/dev/zero", "/dev/random", "/dev/urandom"]
            .iter()
            .map(PathBuf::from)
            .chain(visible.devices.iter().cloned())
        {
            bind_file(&dev, Mount::Device, &mut steps)?;
        }
        for f in ro_files.iter().chain(&visible.ro_files) {
            bind_file(&absolute(f)?, Mount::Data { read_only: true }, &mut steps)?;
        }
        for f in visible.own_files.iter().chain(&visible.shared_rw_files) {
            bind_file(&absolute(f)?, Mount::Data { read_only: false }, &mut steps)?;
        }
        let has_nodes = settings.userfaultfd.is_some() || visible.tun;
        if let Some((major, minor)) = settings.userfaultfd {
            steps.push(Step::CharDevice {
                path: inside(Path::new("/dev/userfaultfd"))?,
                dev: libc::makedev(major, minor),
                gid: settings.shared_gid,
            });
        }
        if visible.tun {
            // The host's node is root's alone; the jail's is the shared group's (the tap in the
            // machine's namespace is that group's to attach to, and only that tap is there).
            mkdirs(Path::new("/dev/net"), &mut steps)?;
            steps.push(Step::CharDevice {
                path: inside(Path::new("/dev/net/tun"))?,
                dev: libc::makedev(10, 200),
                gid: settings.shared_gid,
            });
        }

        // Opened as root, before anything of the machine's can change what the name points at
        // (only root writes /run/netns).
        let netns = match &visible.netns {
            Some(path) => {
                Some(std::os::fd::OwnedFd::from(std::fs::File::open(path).map_err(|e| {
                    std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
                })?))
            }
            None => None,
        };
        let cgroup_dirs = settings.cgroups.create(machine, limits)?;
        let cgroup_procs = cgroup_dirs
            .iter()
            .map(|d| cstr(d.join("cgroup.procs")))
            .collect::<std::io::Result<_>>()?;
        Ok(JailPlan {
            uid,
            gid,
            groups,
            root: cstr(&root)?,
            steps,
            cgroup_procs,
            workdir: cstr(absolute(workdir.unwrap_or(Path::new("/")))?)?,
            has_nodes,
            netns,
            cgroup_dirs,
        })
    }

    /// Removes the machine's cgroups (once its QEMU is gone), and the platform's own when it
    /// was the last (removing a cgroup that still has children fails, harmlessly).
    pub fn remove_cgroups(dirs: &[PathBuf]) {
        for d in dirs {
            let _ = std::fs::remove_dir(d);
            if let Some(parent) = d.parent() {
                let _ = std::fs::remove_dir(parent);
            }
        }
    }

    /// Applies the confinement to the calling process. Runs in the forked child between fork
    /// and exec: system calls on prepared data only. On failure, a line naming the step goes
    /// to standard error (QEMU's log) and the error to the parent, which reports it.
    pub fn apply(&self) -> std::io::Result<()> {
        fn check(r: libc::c_int, step: &'static str) -> std::io::Result<()> {
            if r < 0 {
                let err = std::io::Error::last_os_error();
                let msg = b"stasis jail: failed at: ";
                // SAFETY: write(2) on fd 2 with valid buffers; async-signal-safe.
                unsafe {
                    libc::write(2, msg.as_ptr().cast(), msg.len());
                    libc::write(2, step.as_ptr().cast(), step.len());
                    libc::write(2, b"\n".as_ptr().cast(), 1);
                }
                return Err(err);
            }
            Ok(())
        }
        let null = std::ptr::null::<libc::c_char>();
        // SAFETY: every call below is a plain system call on NUL-terminated strings prepared
        // before the fork, or on constants.
        unsafe {
            // The platform's umask (077) would make the jail's directories unreadable to
            // QEMU's user; QEMU gets it back before it starts.
            rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o022));
            for procs in &self.cgroup_procs {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                check(fd, "joining the cgroup")?;
                // "0" names the writing process itself.
                let r = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                check(r as libc::c_int, "joining the cgroup")?;
            }
            let mut namespaces = libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
            match &self.netns {
                Some(fd) => check(
                    libc::setns(std::os::fd::AsRawFd::as_raw_fd(fd), libc::CLONE_NEWNET),
                    "joining the machine's network namespace",
                )?,
                None => namespaces |= libc::CLONE_NEWNET,
            }
            check(libc::unshare(namespaces), "unshare")?;
            check(
                libc::mount(
                    null,
                    c"/".as_ptr(),
                    null,
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ),
                "making mounts private",
            )?;
            check(
                libc::mount(
                    c"stasis-jail".as_ptr(),
                    self.root.as_ptr(),
                    c"tmpfs".as_ptr(),
                    // A device node of its own needs a root without nodev; it is read-only
                    // before QEMU runs, and QEMU's user could not make nodes anyway.
                    if self.has_nodes {
                        libc::MS_NOSUID
                    } else {
                        libc::MS_NOSUID | libc::MS_NODEV
                    },
                    c"mode=0755,size=1m".as_ptr().cast(),
                ),
                "mounting the jail's root",
            )?;
            for step in &self.steps {
                match step {
                    Step::Mkdir(p) => {
                        let r = libc::mkdir(p.as_ptr(), 0o755);
                        if r < 0 && *libc::__errno_location() != libc::EEXIST {
                            check(r, "mkdir")?;
                        }
                    }
                    Step::Touch(p) => {
                        let fd = libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CREAT | libc::O_CLOEXEC, 0o644);
                        check(fd, "creating a mount point")?;
                        libc::close(fd);
                    }
                    Step::Symlink { target, link } => check(libc::symlink(target.as_ptr(), link.as_ptr()), "symlink")?,
                    Step::CharDevice { path, dev, gid } => {
                        check(libc::mknod(path.as_ptr(), libc::S_IFCHR | 0o660, *dev), "mknod")?;
                        check(libc::chown(path.as_ptr(), 0, *gid), "chown of a device node")?;
                        // mknod's mode went through the umask (022 here).
                        check(libc::chmod(path.as_ptr(), 0o660), "chmod of a device node")?;
                    }
                    Step::Bind { src, dst, kind } => {
                        check(
                            libc::mount(
                                src.as_ptr(),
                                dst.as_ptr(),
                                null,
                                libc::MS_BIND | libc::MS_REC,
                                std::ptr::null(),
                            ),
                            "bind mount",
                        )?;
                        check(
                            libc::mount(null, dst.as_ptr(), null, kind.remount_flags(), std::ptr::null()),
                            "remounting a bind mount",
                        )?;
                    }
                }
            }
            check(libc::chdir(self.root.as_ptr()), "entering the jail's root")?;
            check(
                libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int,
                "pivot_root",
            )?;
            check(
                libc::umount2(c".".as_ptr(), libc::MNT_DETACH),
                "detaching the host's root",
            )?;
            check(libc::chdir(c"/".as_ptr()), "chdir /")?;
            check(
                libc::mount(
                    null,
                    c"/".as_ptr(),
                    null,
                    if self.has_nodes {
                        libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID
                    } else {
                        libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV
                    },
                    std::ptr::null(),
                ),
                "making the jail's root read-only",
            )?;
            check(libc::chdir(self.workdir.as_ptr()), "entering the machine's directory")?;
            check(libc::setgroups(self.groups.len(), self.groups.as_ptr()), "setgroups")?;
            check(libc::setresgid(self.gid, self.gid, self.gid), "setresgid")?;
            check(libc::setresuid(self.uid, self.uid, self.uid), "setresuid")?;
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")?;
        }
        rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_follow_the_machine_size() {
        let l = Limits {
            vcpus: 2,
            memory_mib: 1024,
            disk: None,
        };
        assert_eq!(l.cpu_quota_us(), 200_000);
        assert_eq!(l.memory_bytes(), (1024 + QEMU_OVERHEAD_MIB) << 20);
    }

    #[test]
    fn cgroup_v2_is_chosen_when_it_has_the_controllers_and_limits_are_written() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cgroup.controllers"), "cpuset cpu io memory pids").unwrap();
        let cg = Cgroups::detect(dir.path(), "t1");
        let parent = dir.path().join("stasis-t1");
        assert_eq!(cg, Cgroups::V2 { parent: parent.clone() });
        assert_eq!(
            std::fs::read_to_string(dir.path().join("cgroup.subtree_control")).unwrap(),
            "+cpu +memory +pids +io"
        );
        // On a real cgroupfs the kernel makes the interface files; here, as it would.
        std::fs::create_dir_all(parent.join("m1")).unwrap();
        std::fs::write(parent.join("m1/io.max"), "").unwrap();
        let dirs = cg
            .create(
                "m1",
                Limits {
                    vcpus: 1,
                    memory_mib: 256,
                    disk: Some(DiskCeiling {
                        major: 253,
                        minor: 0,
                        bytes_per_sec: 256 << 20,
                        iops: 0,
                    }),
                },
            )
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(parent.join("m1/io.max")).unwrap(),
            "253:0 rbps=268435456 wbps=268435456 riops=max wiops=max"
        );
        assert_eq!(dirs, vec![parent.join("m1")]);
        assert_eq!(
            std::fs::read_to_string(parent.join("m1/cpu.max")).unwrap(),
            "100000 100000"
        );
        assert_eq!(
            std::fs::read_to_string(parent.join("m1/memory.max")).unwrap(),
            ((256 + QEMU_OVERHEAD_MIB) << 20).to_string()
        );
    }

    #[test]
    fn cgroup_v1_is_the_fallback_and_none_is_said_plainly() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cgroup.controllers"), "").unwrap();
        assert_eq!(Cgroups::detect(dir.path(), "t"), Cgroups::None);
        assert!(Cgroups::None.describe().contains("not limited"));
        std::fs::create_dir_all(dir.path().join("cpu")).unwrap();
        std::fs::create_dir_all(dir.path().join("memory")).unwrap();
        std::fs::write(dir.path().join("cpu/cpu.cfs_quota_us"), "-1").unwrap();
        std::fs::write(dir.path().join("memory/memory.limit_in_bytes"), "0").unwrap();
        let cg = Cgroups::detect(dir.path(), "t");
        assert!(matches!(cg, Cgroups::V1 { .. }), "{cg:?}");
        let dirs = cg
            .create(
                "m",
                Limits {
                    vcpus: 4,
                    memory_mib: 2048,
                    disk: None,
                },
            )
            .unwrap();
        assert_eq!(dirs.len(), 2);
        assert_eq!(cg.dirs("m"), dirs);
        // An empty leftover goes; a cgroup with something inside (here a file, on a real
        // cgroupfs its processes) stays.
        std::fs::create_dir_all(dir.path().join("cpu/stasis-t/gone")).unwrap();
        assert_eq!(cg.sweep(), 1);
        assert!(!dir.path().join("cpu/stasis-t/gone").exists());
        assert!(dirs[0].exists());
        assert_eq!(
            std::fs::read_to_string(dirs[0].join("cpu.cfs_quota_us")).unwrap(),
            "400000"
        );
        assert_eq!(
            std::fs::read_to_string(dirs[1].join("memory.limit_in_bytes")).unwrap(),
            ((2048 + QEMU_OVERHEAD_MIB) << 20).to_string()
        );
    }

    #[test]
    fn a_sweep_removes_what_platforms_that_are_gone_left_and_nothing_of_live_ones() {
        let dir = tempfile::tempdir().unwrap();
        let (mount, leases) = (dir.path().join("cgroup"), dir.path().join("leases"));
        for c in ["cpu", "memory", "pids"] {
            std::fs::create_dir_all(mount.join(c)).unwrap();
        }
        std::fs::write(mount.join("cgroup.controllers"), "").unwrap();
        std::fs::write(mount.join("cpu/cpu.cfs_quota_us"), "-1").unwrap();
        std::fs::write(mount.join("memory/memory.limit_in_bytes"), "0").unwrap();
        std::fs::write(mount.join("pids/pids.max"), "max").unwrap();
        let own = Cgroups::detect(&mount, "00000000000000aa");
        assert!(matches!(own, Cgroups::V1 { pids: Some(_), .. }), "{own:?}");
        // This platform's own cgroups, a machine's among them, empty as one is an instant
        // before its QEMU joins it.
        own.create("machines-mine", Limits::default()).unwrap();
        // A platform that is gone: its parents, an empty machine cgroup (its QEMU ended after
        // the platform was killed), a lease file it left.
        let gone = "stasis-00000000000000bb";
        for c in ["cpu", "memory", "pids"] {
            std::fs::create_dir_all(mount.join(c).join(gone).join("machines-ended")).unwrap();
        }
        std::fs::create_dir_all(&leases).unwrap();
        std::fs::write(leases.join(gone), "").unwrap();
        // A platform gone whose QEMU lives on (on a real cgroupfs its processes keep the
        // cgroup; here a file inside does).
        let survived = "stasis-00000000000000cc";
        std::fs::create_dir_all(mount.join("cpu").join(survived).join("machines-live")).unwrap();
        std::fs::write(mount.join("cpu").join(survived).join("machines-live/qemu"), "").unwrap();
        std::fs::create_dir_all(mount.join("memory").join(survived).join("machines-ended")).unwrap();
        // A platform that is alive, between machines (its parent empty) and making one.
        let live = "stasis-00000000000000dd";
        take_lease(&leases, live).unwrap();
        for c in ["cpu", "memory"] {
            std::fs::create_dir_all(mount.join(c).join(live).join("machines-starting")).unwrap();
        }
        std::fs::create_dir_all(mount.join("pids").join(live)).unwrap();
        // Not a platform's name at all.
        std::fs::create_dir_all(mount.join("cpu/stasis-other")).unwrap();

        assert_eq!(own.sweep_others(&leases), 8);
        for c in ["cpu", "memory", "pids"] {
            assert!(!mount.join(c).join(gone).exists(), "{c}/{gone} left");
            assert!(mount.join(c).join("stasis-00000000000000aa/machines-mine").exists());
        }
        assert!(!leases.join(gone).exists(), "the lease file of a platform that is gone");
        assert!(mount.join("cpu").join(survived).join("machines-live").exists());
        assert!(!mount.join("memory").join(survived).exists());
        for c in ["cpu", "memory"] {
            assert!(mount.join(c).join(live).join("machines-starting").exists());
        }
        assert!(mount.join("pids").join(live).exists());
        assert!(mount.join("cpu/stasis-other").exists());
        assert!(leases.join(live).exists());

        // The live one stops: it removes its parents and gives up its lease; what it left
        // (here its machines' cgroups, which it would have removed) goes with the next sweep.
        let stopped = Cgroups::V1 {
            cpu: mount.join("cpu").join(live),
            memory: mount.join("memory").join(live),
            pids: Some(mount.join("pids").join(live)),
        };
        stopped.remove_parents();
        assert!(!mount.join("pids").join(live).exists());
        assert!(!leases.join(live).exists(), "the lease given up");
        assert_eq!(own.sweep_others(&leases), 4);
        for c in ["cpu", "memory"] {
            assert!(!mount.join(c).join(live).exists());
        }
        // A lease can be taken again (a platform starting on that data directory).
        take_lease(&leases, live).unwrap();
        assert!(Lease::try_take(&leases, live).is_none(), "a lease is exclusive");
        release_lease(live);
        assert!(Lease::try_take(&leases, live).is_some());
    }

    #[test]
    fn taking_a_directory_back_removes_all_but_plain_files() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        std::fs::write(&outside, "untouched").unwrap();
        let disks = dir.path().join("disks");
        std::fs::create_dir(&disks).unwrap();
        std::fs::write(disks.join("disk.qcow2"), "qcow").unwrap();
        std::os::unix::fs::symlink(&outside, disks.join("qemu.log")).unwrap();
        std::fs::create_dir(disks.join("sub")).unwrap();
        std::os::unix::fs::symlink(&outside, disks.join("sub/link")).unwrap();
        // SAFETY: geteuid/getegid take nothing.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        take_tree(&disks, uid, gid).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(&disks)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, vec!["disk.qcow2"]);
        assert_eq!(std::fs::read_to_string(&outside).unwrap(), "untouched");
        // A link in place of the directory itself is refused, not followed.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&disks, &link).unwrap();
        assert!(take_tree(&link, uid, gid).is_err());
    }

    #[test]
    fn relative_paths_are_refused_by_name() {
        let err = absolute(Path::new("data/c1")).unwrap_err();
        assert!(err.to_string().contains("data/c1 is not an absolute path"), "{err}");
    }
}
