//! One computer's virtual machine: a QEMU process (microvm, RAM in a shared file, a qcow2
//! overlay over the read-only base disk), its QMP monitor and its guest agent.
//!
//! There are three ways to get a [`Vm`]: [`Vm::boot`] starts a fresh QEMU from the image
//! (`boot.rs`), [`Vm::restore`] starts one from a snapshot (`restore.rs`), and [`Vm::attach`]
//! takes over one that an earlier platform process left running (here). This file holds the
//! machine's configuration, its files, the QEMU command line and process, and its logs.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use stasis_agent_proto::{ExecRequest, ExecResult, Op, Reply};

use crate::accel::Accel;
use crate::agent::{AgentClient, AgentError};
use crate::jail::{JailPlan, JailSettings, Limits, Visible};
use crate::process::{Exit, Process, Signal};
use crate::qmp::{Qmp, QmpError};
use crate::untrusted::{log_tail, rotate_log};

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QEMU {exit} {phase}{log}")]
    Exited {
        exit: Exit,
        phase: &'static str,
        log: String,
    },
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error("the guest did not come up within {0:?}{1}")]
    BootTimeout(Duration, String),
    #[error("{0}")]
    Invalid(String),
    /// The machine's network could not be made.
    #[error("its network: {0}")]
    Network(String),
}

pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmError {
    let context = context.into();
    move |source| VmError::Io { context, source }
}

/// A ceiling on a machine's disk traffic, kept by its QEMU (`block_set_io_throttle` on the
/// root disk, set again at every start, restore and re-attach): one computer cannot take
/// the host's disk from the others. 0 means no ceiling for that measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskLimits {
    /// Bytes per second, reads and writes together.
    pub bytes_per_sec: u64,
    /// Operations per second, reads and writes together.
    pub iops: u64,
}

impl DiskLimits {
    /// What `stasis serve` applies unless told otherwise: 256 MiB/s and 4000 operations/s.
    pub const DEFAULT: DiskLimits = DiskLimits {
        bytes_per_sec: 256 << 20,
        iops: 4000,
    };
}

/// What every guest sees of its network, whichever way it reaches the host
/// (`stasis.net=ADDRESS/PREFIX,GATEWAY,DNS` on its kernel command line): the same in every
/// computer and every clone, so a restore needs no re-addressing.
pub const GUEST_NET: &str = "172.31.0.2/24,172.31.0.1,172.31.0.3";
/// The guest's own address (the same in every computer: each has a namespace of its own).
pub const GUEST_ADDR: std::net::Ipv4Addr = std::net::Ipv4Addr::new(172, 31, 0, 2);
/// The guest's network card's MAC address (the same everywhere, like its address).
pub const GUEST_MAC: &str = "52:54:00:5a:00:02";
/// The guest's gateway's MAC address, the same in every namespace (and the one QEMU's user
/// networking gives its gateway, 172.31.0.1): a restored guest's neighbour entry for its
/// gateway stays right in every clone, on either backend.
pub const GATEWAY_MAC: &str = "52:55:ac:1f:00:01";
/// The tap a machine's QEMU attaches to, inside the machine's network namespace.
pub const TAP_NAME: &str = "tap0";

/// How a machine's network card reaches the world.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Nic {
    /// The tap [`TAP_NAME`] in the network namespace `/run/netns/<netns>`, which the
    /// platform made and its confined QEMU joins.
    Tap { netns: String },
    /// QEMU's own user networking (QEMUs that are not confined).
    User,
    /// A card with no link (a computer created without a network, a capture's twin).
    Unplugged,
}

/// Everything needed to start (or restart, or restore) the same machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfig {
    /// The computer this machine belongs to; also its hostname.
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub accel: Accel,
    pub qemu_binary: PathBuf,
    pub image_id: String,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Read-only raw base disk at the bottom of the disk chain (the image's root disk, or a
    /// snapshot's materialized disk for a restored machine).
    pub base_disk: PathBuf,
    /// The top (writable) qcow2 overlay; its backing chain is read from the qcow2 headers.
    /// A snapshot freezes it and puts a new overlay on top.
    pub disk: PathBuf,
    /// Guest RAM file, if any: empty for anonymous RAM (booted machines); a restored machine
    /// maps its snapshot's RAM file; a capture's twin writes its RAM into one.
    pub ram_path: PathBuf,
    /// Map `ram_path` shared (the twin, whose writes must land in the file) or as a private
    /// copy-on-write mapping (restored machines: pages are read on demand and stay shared by
    /// every clone of the snapshot until written).
    #[serde(default = "shared_by_default")]
    pub ram_shared: bool,
    pub tsc_khz: Option<u64>,
    /// Confinement of its QEMU (its own user, namespaces, cgroups); None: QEMU runs as the
    /// platform's user, as before confinement existed.
    #[serde(default)]
    pub jail: Option<JailSettings>,
    /// Its disk's ceiling; None: none.
    #[serde(default)]
    pub disk_limits: Option<DiskLimits>,
    /// The `-cpu` model; None: the accelerator's default (`max` under TCG, `host` under KVM).
    /// A restored machine gets the model its snapshot was taken with.
    #[serde(default)]
    pub cpu_model: Option<String>,
    /// Which devices it has (see [`crate::description::DEVICE_LINE`]): a saved machine loads
    /// only into the devices that saved it, so a restore keeps its snapshot's line.
    #[serde(default = "first_device_line")]
    pub device_line: u32,
    /// Where its network card (device line 2 and later) is plugged in; None: unplugged.
    #[serde(default)]
    pub nic: Option<Nic>,
}

impl MachineConfig {
    /// The `-cpu` model this machine runs with.
    pub fn cpu_model(&self) -> String {
        match &self.cpu_model {
            Some(model) => model.clone(),
            None => crate::cpu::default_cpu_model(self.accel).into(),
        }
    }
}

fn shared_by_default() -> bool {
    true
}

/// Machines recorded before device lines were: the first line, with no network card.
fn first_device_line() -> u32 {
    1
}

/// How a QEMU is started besides its machine config.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Launch {
    /// Paused, waiting for a migration stream (`-S -incoming defer`).
    pub incoming: bool,
    /// A disk that reads as zeros (a capture's twin never runs the guest); the size must
    /// match the real disk's for the device state to load.
    pub null_disk_bytes: Option<u64>,
}

/// Files of one machine, in two directories that never meet:
///
/// - `disks`: the only directory its (confined) QEMU may write, holding nothing but the qcow2
///   overlays of its disk. Everything in it is the QEMU's to change, so the platform never
///   reads, parses or follows anything there (see [`crate::jail::take_tree`]).
/// - `control`: the platform's own, which the QEMU never sees: the machine's config, pid file,
///   QMP and agent sockets (bound here by the platform and handed to QEMU as descriptors),
///   console and QEMU logs (opened here by the platform, QEMU gets only a descriptor to
///   write to), timings.
#[derive(Debug, Clone)]
pub struct VmPaths {
    pub control: PathBuf,
    pub disks: PathBuf,
}

/// A log the platform keeps is cut back once it passes this size (the older part is kept in a
/// `.1` file of the same size at most), whatever the guest prints.
pub const LOG_CAP_BYTES: u64 = 2 << 20;

/// Files versions before the control directory kept in a machine's (QEMU-writable) directory.
const LEGACY_FILES: [&str; 9] = [
    "machine.json",
    "machine.json.tmp",
    "qemu.pid",
    "qemu.log",
    "console.log",
    "restore-timings.json",
    "qmp.sock",
    "agent.sock",
    "overlay.tmp.qcow2",
];

impl VmPaths {
    pub fn new(control: impl Into<PathBuf>, disks: impl Into<PathBuf>) -> Self {
        VmPaths {
            control: control.into(),
            disks: disks.into(),
        }
    }
    /// The first overlay of a machine's disk chain.
    pub fn disk(&self) -> PathBuf {
        self.disks.join("disk.qcow2")
    }
    pub fn qmp(&self) -> PathBuf {
        self.control.join("qmp.sock")
    }
    pub fn agent(&self) -> PathBuf {
        self.control.join("agent.sock")
    }
    pub fn console(&self) -> PathBuf {
        self.control.join("console.log")
    }
    pub fn qemu_log(&self) -> PathBuf {
        self.control.join("qemu.log")
    }
    pub fn pidfile(&self) -> PathBuf {
        self.control.join("qemu.pid")
    }
    pub fn config(&self) -> PathBuf {
        self.control.join("machine.json")
    }
    pub fn timings(&self) -> PathBuf {
        self.control.join("restore-timings.json")
    }

    /// Makes the control directory (root's, owner-only) and the disks directory.
    pub(crate) fn create(&self) -> Result<(), VmError> {
        use std::os::unix::fs::PermissionsExt;
        for d in [&self.control, &self.disks] {
            std::fs::create_dir_all(d).map_err(io(format!("creating {}", d.display())))?;
        }
        std::fs::set_permissions(&self.control, std::fs::Permissions::from_mode(0o700))
            .map_err(io(format!("securing {}", self.control.display())))?;
        // What older versions kept among the disks, where the QEMU could change it: the
        // platform's own copies live in the control directory now. (unlink follows no link.)
        for legacy in LEGACY_FILES {
            let _ = std::fs::remove_file(self.disks.join(legacy));
        }
        Ok(())
    }

    /// Whether `disk` is a plain file directly inside the disks directory, as every overlay
    /// the platform or QEMU makes is.
    pub fn holds_disk(&self, disk: &Path) -> bool {
        disk.parent() == Some(self.disks.as_path())
            && disk
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("disk") && n.ends_with(".qcow2"))
            && std::fs::symlink_metadata(disk).is_ok_and(|m| m.file_type().is_file())
    }
}

/// Longest unix socket path the kernel accepts (`sun_path` is 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Descriptors QEMU inherits: its monitor's and the agent's listening sockets, and its console.
const QMP_FD: i32 = 3;
/// The qdev id of the root disk's device.
const ROOT_DISK_ID: &str = "rootdisk";
const AGENT_FD: i32 = 4;
const CONSOLE_FD: i32 = 5;
const CONSOLE_FD_SET: i32 = 1;

/// What `-name` says: the machine's directory (unique on the host, unlike the computer's name),
/// and which process of it (a capture's twin has its own), so a pid can be checked to be this
/// machine's QEMU.
fn process_name(paths: &VmPaths, launch: Launch) -> String {
    if launch.null_disk_bytes.is_some() {
        // The twin's control directory is `<staging>/twin`: named after the staging directory.
        let staging = paths.control.parent().unwrap_or(&paths.control);
        format!("stasis-{}-twin", dir_name(staging))
    } else {
        format!("stasis-{}", dir_name(&paths.control))
    }
}

fn dir_name(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Whether `pid` is a live QEMU of the machine whose control directory is `control` (not its
/// twin, not a process that took over a recycled pid). QEMUs started before `-name` named the
/// directory carry the machine's hostname instead: `legacy_name`, from the platform's own
/// machine.json.
pub fn is_machine_qemu(pid: u32, control: &Path, legacy_name: Option<&str>) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let wants: Vec<String> = std::iter::once(dir_name(control))
        .chain(legacy_name.map(str::to_string))
        .map(|n| format!("stasis-{n}"))
        .collect();
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    args.windows(2)
        .any(|w| w[0] == b"-name" && wants.iter().any(|want| w[1] == want.as_bytes()))
}

/// The QEMU command line for `cfg`. `incoming` prepares a restore (`-S -incoming defer`).
/// The QMP and agent sockets and the console are descriptors [`spawn_qemu`] hands over.
pub fn qemu_args(cfg: &MachineConfig, paths: &VmPaths, launch: Launch) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |s: &str| a.push(s.into());
    let p = |path: PathBuf| path.to_string_lossy().into_owned();
    let mem = format!("{}M", cfg.memory_mib);
    let mut cmdline = String::from("console=ttyS0 root=/dev/vda rootfstype=ext4 rw quiet panic=-1 pci=off");
    if let Some(khz) = cfg.tsc_khz {
        cmdline.push_str(&format!(" tsc_early_khz={khz}"));
    }
    cmdline.push_str(&format!(" stasis.hostname={}", cfg.name));
    // A guest whose card has no link gets no address: its connections fail at once.
    if cfg.device_line >= 2 && matches!(cfg.nic, Some(Nic::Tap { .. } | Nic::User)) {
        cmdline.push_str(&format!(" stasis.net={GUEST_NET}"));
    }

    push("-name");
    push(&process_name(paths, launch));
    push("-M");
    push("microvm,acpi=on,x-option-roms=off,rtc=on,memory-backend=mem");
    push("-bios");
    push("/usr/share/qemu/qboot.rom");
    push("-accel");
    push(cfg.accel.as_str());
    push("-cpu");
    push(&cfg.cpu_model());
    push("-smp");
    push(&cfg.vcpus.to_string());
    push("-m");
    push(&mem);
    push("-object");
    if cfg.ram_path.as_os_str().is_empty() {
        push(&format!("memory-backend-ram,id=mem,size={mem}"));
    } else {
        push(&format!(
            "memory-backend-file,id=mem,size={mem},mem-path={},share={},align=2M{}",
            p(cfg.ram_path.clone()),
            if cfg.ram_shared { "on" } else { "off" },
            // A restored machine's writes stay in its private copy: its QEMU need not (and,
            // where it can say so, does not) open its snapshot's file for writing.
            if private_ram_read_only(cfg) {
                ",readonly=on,rom=off"
            } else {
                ""
            }
        ));
    }
    push("-kernel");
    push(&p(cfg.kernel.clone()));
    push("-initrd");
    push(&p(cfg.initrd.clone()));
    push("-append");
    push(&cmdline);
    for s in ["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"] {
        push(s);
    }
    // seccomp: no obsolete system calls, no setuid/setgid, no fork/exec, no scheduler or
    // affinity changes; a QEMU that tries is killed. (Migration files are passed to it as
    // descriptors over QMP, so it never needs a helper process.)
    push("-sandbox");
    push("on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny");
    // The console goes to a file the platform opened in its own directory: QEMU holds only
    // a descriptor to write to (through an fd set), never the name.
    push("-add-fd");
    push(&format!("fd={CONSOLE_FD},set={CONSOLE_FD_SET}"));
    push("-chardev");
    push(&format!("file,id=console,path=/dev/fdset/{CONSOLE_FD_SET},append=on"));
    push("-serial");
    push("chardev:console");
    match launch.null_disk_bytes {
        Some(size) => {
            push("-blockdev");
            push(&format!("driver=null-co,node-name=disk,size={size},read-zeroes=on"));
        }
        None => {
            // The backing chain (frozen overlays, then the base) comes from the qcow2 headers.
            push("-blockdev");
            push(&format!(
                "driver=file,filename={},node-name=disk-file",
                p(cfg.disk.clone())
            ));
            push("-blockdev");
            push("driver=qcow2,file=disk-file,node-name=disk");
        }
    }
    push("-device");
    push(&format!("virtio-blk-device,drive=disk,id={ROOT_DISK_ID}"));
    push("-device");
    push("virtio-serial-device,id=serial0");
    // Both sockets are bound by the platform in its own directory and handed over listening.
    push("-chardev");
    push(&format!("socket,id=agent,fd={AGENT_FD},server=on,wait=off"));
    push("-device");
    push(&format!(
        "virtserialport,chardev=agent,name={}",
        stasis_agent_proto::PORT_NAME
    ));
    push("-device");
    push("virtio-rng-device");
    if cfg.device_line >= 2 {
        // A capture's twin has the card (its state loads into it) but never a link.
        let nic = match launch.null_disk_bytes {
            Some(_) => None,
            None => cfg.nic.as_ref(),
        };
        let netdev = match nic {
            Some(Nic::Tap { .. }) => Some(format!(
                "tap,id=net0,ifname={TAP_NAME},script=no,downscript=no,vnet_hdr=off"
            )),
            // The guest's addresses as with a tap: gateway .1, resolver .3.
            Some(Nic::User) => {
                Some("user,id=net0,net=172.31.0.0/24,host=172.31.0.1,dns=172.31.0.3,dhcpstart=172.31.0.2".into())
            }
            Some(Nic::Unplugged) | None => None,
        };
        // No offloads and no virtio-net header on the tap (`vnet_hdr=off`): both depend on
        // the backend (a tap offers them, user networking and a card with no link do not),
        // and a saved card loads only where the same features and header are, so with them
        // a machine could not move between backends (a capture's twin has none).
        let mut device = format!(
            "virtio-net-device,id=nic0,mac={GUEST_MAC},csum=off,gso=off,host_tso4=off,host_tso6=off,host_ecn=off,\
             host_ufo=off,guest_csum=off,guest_tso4=off,guest_tso6=off,guest_ecn=off,guest_ufo=off"
        );
        if crate::accel::qemu_version(&cfg.qemu_binary).is_some_and(|v| v >= (8, 2)) {
            device.push_str(",host_uso=off,guest_uso4=off,guest_uso6=off");
        }
        if let Some(netdev) = netdev {
            push("-netdev");
            push(&netdev);
            device.push_str(",netdev=net0");
        }
        push("-device");
        push(&device);
    }
    push("-chardev");
    push(&format!("socket,id=qmp,fd={QMP_FD},server=on,wait=off"));
    push("-mon");
    push("chardev=qmp,mode=control");
    if launch.incoming {
        push("-S");
        push("-incoming");
        push("defer");
    }
    a
}

pub struct Vm {
    config: std::sync::Mutex<MachineConfig>,
    /// Serializes snapshot operations on this machine.
    ops: tokio::sync::Mutex<()>,
    pub paths: VmPaths,
    process: Process,
    qmp: Arc<Qmp>,
    agent: Arc<AgentClient>,
    /// With user networking: guest ports forwarded so far, to their port on the host's
    /// loopback.
    forwards: tokio::sync::Mutex<std::collections::HashMap<u16, u16>>,
    /// What its QEMU used, sampled now and then (the newest last; an hour's worth kept).
    samples: std::sync::Mutex<std::collections::VecDeque<Sample>>,
}

/// What a machine's QEMU had used at one moment, as the host's kernel counts it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub at: std::time::SystemTime,
    /// CPU time (user and system), seconds since QEMU started.
    pub cpu_secs: f64,
    /// Resident memory, bytes.
    pub rss_bytes: u64,
}

/// Samples kept a machine: an hour's at [`SAMPLE_EVERY`].
pub const SAMPLES_KEPT: usize = 1800;
/// How often a running machine is sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(2);

/// The CPU time and resident memory of process `pid` (from `/proc`, the kernel's).
pub fn process_usage(pid: u32) -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the name.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf takes no pointers.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let rss_pages: u64 = fields.get(21)?.parse().ok()?;
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    Some((ticks as f64 / hz, rss_pages * page))
}

impl Vm {
    /// Takes a sample of its QEMU's use (called now and then while it runs).
    pub fn sample(&self) {
        if let Some((cpu_secs, rss_bytes)) = process_usage(self.pid()) {
            let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
            samples.push_back(Sample {
                at: std::time::SystemTime::now(),
                cpu_secs,
                rss_bytes,
            });
            while samples.len() > SAMPLES_KEPT {
                samples.pop_front();
            }
        }
    }

    /// The samples taken since `since`, oldest first.
    pub fn samples_since(&self, since: std::time::SystemTime) -> Vec<Sample> {
        let samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        samples.iter().filter(|s| s.at >= since).copied().collect()
    }
}

impl Vm {
    /// Takes over a QEMU started by an earlier platform process, if it is still ours and alive.
    pub async fn attach(paths: VmPaths) -> Result<Vm, VmError> {
        // The platform's own file, in a directory no QEMU can write.
        let config: MachineConfig =
            serde_json::from_slice(&std::fs::read(paths.config()).map_err(io("reading machine.json"))?)
                .map_err(|e| VmError::Invalid(format!("machine.json: {e}")))?;
        let pid: u32 = std::fs::read_to_string(paths.pidfile())
            .map_err(io("reading qemu.pid"))?
            .trim()
            .parse()
            .map_err(|_| VmError::Invalid("qemu.pid does not hold a pid".into()))?;
        if !is_machine_qemu(pid, &paths.control, Some(&config.name)) {
            return Err(VmError::Invalid(format!("process {pid} is not this machine's QEMU")));
        }
        // A confined QEMU's cgroups go when it does, as if this process had started it.
        let cleanup = config.jail.as_ref().map(|j| {
            let dirs = j.cgroups.dirs(&cgroup_name(&paths.control));
            Box::new(move || JailPlan::remove_cgroups(&dirs)) as Box<dyn FnOnce() + Send>
        });
        let process = Process::attach_then(pid, cleanup).map_err(io(format!("watching QEMU pid {pid}")))?;
        let vm = match Self::connect(config, paths, process, Duration::from_secs(5)).await {
            Ok(vm) => vm,
            Err(e) => {
                // A QEMU we cannot drive is of no use to anyone: do not leave it behind.
                // The pid was verified to be this machine's QEMU.
                if let Some(pid) = crate::process::pid_of(pid) {
                    let _ = rustix::process::kill_process(pid, Signal::KILL);
                }
                return Err(e);
            }
        };
        let status = vm.qmp.status().await?;
        if status != "running" {
            vm.kill();
            return Err(VmError::Invalid(format!("QEMU was {status}, not running")));
        }
        if let Err(e) = vm.agent.wait_ready(Duration::from_secs(10)).await {
            vm.kill();
            return Err(e.into());
        }
        Ok(vm)
    }

    pub(crate) async fn connect(
        config: MachineConfig,
        paths: VmPaths,
        process: Process,
        wait: Duration,
    ) -> Result<Vm, VmError> {
        let qmp = connect_qmp(&process, &paths, wait).await?;
        Self::connect_agent(config, paths, process, qmp, wait).await
    }

    pub(crate) async fn connect_agent(
        config: MachineConfig,
        paths: VmPaths,
        process: Process,
        qmp: Arc<Qmp>,
        wait: Duration,
    ) -> Result<Vm, VmError> {
        // The throttle is not part of the migrated state: every start, restore and re-attach
        // sets it. It goes to QMP while the agent connects, so a restore does not wait for both
        // one after the other.
        let throttle = async {
            let Some(limits) = config.disk_limits else {
                return Ok(());
            };
            qmp.execute(
                "block_set_io_throttle",
                serde_json::json!({
                    "id": ROOT_DISK_ID,
                    "bps": limits.bytes_per_sec, "bps_rd": 0, "bps_wr": 0,
                    "iops": limits.iops, "iops_rd": 0, "iops_wr": 0,
                }),
            )
            .await
            .map(|_| ())
            .map_err(|e| VmError::Invalid(format!("limiting the machine's disk traffic: {e}")))
        };
        let socket = paths.agent();
        let connect = race_exit(&process, &paths, "while starting", AgentClient::connect(&socket, wait));
        let agent = match tokio::join!(throttle, connect) {
            (Ok(()), Ok(a)) => a,
            (Err(e), _) | (_, Err(e)) => {
                process.signal(Signal::KILL);
                return Err(e);
            }
        };
        Ok(Vm {
            config: std::sync::Mutex::new(config),
            ops: tokio::sync::Mutex::new(()),
            paths,
            process,
            qmp,
            agent,
            forwards: Default::default(),
            samples: Default::default(),
        })
    }

    pub(crate) async fn until_exit<T, E: Into<VmError>>(
        &self,
        phase: &'static str,
        fut: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, VmError> {
        let result = race_exit(&self.process, &self.paths, phase, fut).await;
        if result.is_err() {
            self.kill();
        }
        result
    }

    pub(crate) fn ops(&self) -> &tokio::sync::Mutex<()> {
        &self.ops
    }

    /// The machine's current configuration (its top disk overlay changes with snapshots).
    pub fn config(&self) -> MachineConfig {
        self.config.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn set_config(&self, config: MachineConfig) -> Result<(), VmError> {
        write_config(&self.paths, &config)?;
        *self.config.lock().unwrap_or_else(|p| p.into_inner()) = config;
        Ok(())
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// With user networking: a port on the host's loopback that QEMU forwards to TCP port
    /// `port` of the guest, set up on first use (`hostfwd_add`; a restored QEMU starts with
    /// none).
    pub async fn user_forward(&self, port: u16) -> Result<std::net::SocketAddr, VmError> {
        let mut forwards = self.forwards.lock().await;
        if let Some(hp) = forwards.get(&port) {
            return Ok(std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, *hp)));
        }
        let mut last = String::new();
        // A free port is chosen here and taken by QEMU a moment later: another process may
        // take it in between, so a few are tried.
        for _ in 0..4 {
            let hp = std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))
                .and_then(|l| l.local_addr())
                .map_err(io("choosing a loopback port to forward"))?
                .port();
            let line = format!("hostfwd_add net0 tcp:127.0.0.1:{hp}-{GUEST_ADDR}:{port}");
            let out = self
                .qmp
                .execute("human-monitor-command", serde_json::json!({ "command-line": line }))
                .await?;
            let text = out.as_str().unwrap_or_default().trim().to_string();
            if text.is_empty() {
                forwards.insert(port, hp);
                return Ok(std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, hp)));
            }
            last = text;
        }
        Err(VmError::Network(format!("forwarding guest port {port}: {last}")))
    }

    pub fn qmp(&self) -> &Arc<Qmp> {
        &self.qmp
    }

    pub fn agent(&self) -> &Arc<AgentClient> {
        &self.agent
    }

    /// Resolves when QEMU exits, with how it ended.
    pub fn exit_watch(&self) -> tokio::sync::watch::Receiver<Option<Exit>> {
        self.process.watch()
    }

    pub fn exited(&self) -> Option<Exit> {
        self.process.exited()
    }

    /// Runs a program in the guest. The agent enforces `timeout_ms`; the host waits a little
    /// longer for the answer to come back.
    pub async fn exec(&self, req: ExecRequest) -> Result<ExecResult, VmError> {
        let limit = Duration::from_millis(req.timeout_ms) + Duration::from_secs(15);
        let reply = self
            .until_exit_keep("during exec", self.agent.call(Op::Exec(req), limit))
            .await?;
        match reply {
            Reply::Exec(r) => Ok(r),
            other => Err(AgentError::Unexpected(Box::new(other)).into()),
        }
    }

    /// The protocol version the guest's agent speaks (older snapshots hold older agents).
    pub async fn agent_version(&self) -> Result<u32, VmError> {
        let reply = self
            .until_exit_keep("asking the agent", self.agent.call(Op::Ping, Duration::from_secs(30)))
            .await?;
        match reply {
            Reply::Pong { version, .. } => Ok(version),
            other => Err(AgentError::Unexpected(Box::new(other)).into()),
        }
    }

    /// One file operation in the guest (its agent must speak
    /// [`stasis_agent_proto::FILES_SINCE`] or later: see [`Vm::agent_version`]).
    pub async fn fs(&self, op: stasis_agent_proto::FsOp) -> Result<stasis_agent_proto::FsReply, VmError> {
        // A chunk is a MiB; a copy or removal of a large tree takes what it takes.
        let limit = match op {
            stasis_agent_proto::FsOp::Copy { .. } | stasis_agent_proto::FsOp::Remove { .. } => Duration::from_secs(600),
            _ => Duration::from_secs(60),
        };
        let reply = self
            .until_exit_keep("during a file operation", self.agent.call(Op::Fs(op), limit))
            .await?;
        match reply {
            Reply::Fs(r) => Ok(r),
            other => Err(AgentError::Unexpected(Box::new(other)).into()),
        }
    }

    /// One session operation in the guest (its agent must speak
    /// [`stasis_agent_proto::SESSIONS_SINCE`] or later: see [`Vm::agent_version`]).
    pub async fn session(
        &self,
        op: stasis_agent_proto::SessionOp,
    ) -> Result<stasis_agent_proto::SessionReply, VmError> {
        use stasis_agent_proto::SessionOp;
        let limit = match &op {
            SessionOp::Read { wait_ms, .. } => Duration::from_millis(*wait_ms as u64) + Duration::from_secs(30),
            // Input waits for as long as the program takes to read it; the caller drops the
            // call when its client goes.
            SessionOp::Write { .. } => Duration::from_secs(24 * 3600),
            _ => Duration::from_secs(30),
        };
        let reply = self
            .until_exit_keep("during a session", self.agent.call(Op::Session(op), limit))
            .await?;
        match reply {
            Reply::Session(r) => Ok(r),
            other => Err(AgentError::Unexpected(Box::new(other)).into()),
        }
    }

    /// Like `until_exit` but leaves the machine alone on failure (an exec timing out is the
    /// user's business, not a reason to kill the machine).
    async fn until_exit_keep<T, E: Into<VmError>>(
        &self,
        phase: &'static str,
        fut: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, VmError> {
        race_exit(&self.process, &self.paths, phase, fut).await
    }

    /// Stops the machine: flush the guest's file systems, ask QEMU to quit, kill it if it does
    /// not. The disk overlay stays; the RAM file goes.
    pub async fn shutdown(&self) {
        self.quit(true).await
    }

    /// Ends a machine captured for good (its guest paused): quit at once, no flush asked of a
    /// guest that will not run again.
    pub async fn halt(&self) {
        self.quit(false).await
    }

    async fn quit(&self, flush: bool) {
        if self.exited().is_none() {
            if flush {
                let _ = self.agent.call(Op::Sync, Duration::from_secs(10)).await;
            }
            let _ = self
                .qmp
                .execute_timeout("quit", serde_json::json!({}), Duration::from_secs(3))
                .await;
            if tokio::time::timeout(Duration::from_secs(5), self.process.wait())
                .await
                .is_err()
            {
                self.kill();
                let _ = tokio::time::timeout(Duration::from_secs(5), self.process.wait()).await;
            }
        }
        let config = self.config();
        if config.ram_shared && !config.ram_path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&config.ram_path);
        }
        for f in [self.paths.qmp(), self.paths.agent(), self.paths.pidfile()] {
            let _ = std::fs::remove_file(f);
        }
    }

    /// Cuts the machine's logs back to [`LOG_CAP_BYTES`] (called now and then while it runs).
    pub fn rotate_logs(&self) {
        if let Err(e) = crate::console::cut(&self.paths.console(), LOG_CAP_BYTES) {
            tracing::debug!(error = %e, "rotating the console log");
        }
        let log = self.paths.qemu_log();
        if let Err(e) = rotate_log(&log, LOG_CAP_BYTES) {
            tracing::debug!(log = %log.display(), error = %e, "rotating a log");
        }
    }

    /// Kills QEMU at once.
    pub fn kill(&self) {
        self.process.signal(Signal::KILL);
    }

    /// The last lines the guest printed on its console, for error reports.
    pub fn console_tail(&self, lines: usize) -> String {
        log_tail(&self.paths.console(), lines)
    }
}

pub(crate) fn check_socket_paths(paths: &VmPaths) -> Result<(), VmError> {
    for s in [paths.qmp(), paths.agent()] {
        if s.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(VmError::Invalid(format!(
                "socket path {} is longer than {MAX_SOCKET_PATH} bytes; choose a shorter data directory",
                s.display()
            )));
        }
    }
    Ok(())
}

pub(crate) fn write_config(paths: &VmPaths, config: &MachineConfig) -> Result<(), VmError> {
    // The control directory is the platform's alone: nothing there can be a planted link.
    let tmp = paths.control.join("machine.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(config).expect("config serializes"))
        .map_err(io("writing machine.json"))?;
    std::fs::rename(&tmp, paths.config()).map_err(io("writing machine.json"))
}

/// Moves a new overlay made in the control directory to `disk`, in the disks directory. A
/// rename replaces whatever entry is there (a link an earlier QEMU left, say) without
/// following it.
pub(crate) fn place_disk(tmp: &Path, paths: &VmPaths, disk: &Path) -> Result<(), VmError> {
    if disk.parent() != Some(paths.disks.as_path()) {
        return Err(VmError::Invalid(format!(
            "disk {} is not in {}",
            disk.display(),
            paths.disks.display()
        )));
    }
    std::fs::rename(tmp, disk).map_err(io(format!("placing {}", disk.display())))
}

/// A new qcow2 overlay over a raw base.
pub(crate) async fn create_overlay(base: &Path, disk: &Path) -> Result<(), VmError> {
    let out = tokio::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(base)
        .arg(disk)
        .output()
        .await
        .map_err(io("running qemu-img (apt-get install qemu-utils)"))?;
    if !out.status.success() {
        return Err(VmError::Invalid(format!(
            "qemu-img create failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Opens (creating, emptied) a log in the control directory for QEMU to append to.
fn open_log(path: &Path) -> Result<std::fs::File, VmError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .and_then(|f| f.set_len(0).map(|_| f))
        .map_err(io(format!("opening {}", path.display())))
}

/// Binds a listening socket in the control directory for QEMU to accept on.
fn bind_socket(path: &Path) -> Result<std::os::unix::net::UnixListener, VmError> {
    let _ = std::fs::remove_file(path);
    std::os::unix::net::UnixListener::bind(path).map_err(io(format!("binding {}", path.display())))
}

/// [`spawn_qemu`] on the blocking pool: preparing a confined QEMU's jail hands its whole
/// disks directory to a new user (a walk of the directory, removing whatever is not a plain
/// file) and makes its cgroups, which must not hold up the async runtime's threads.
pub(crate) async fn spawn_qemu_off_runtime(
    config: &MachineConfig,
    paths: &VmPaths,
    launch: Launch,
) -> Result<Process, VmError> {
    let (config, paths) = (config.clone(), paths.clone());
    tokio::task::spawn_blocking(move || spawn_qemu(&config, &paths, launch))
        .await
        .map_err(|e| VmError::Invalid(format!("starting QEMU: the spawning task failed: {e}")))?
}

/// Starts QEMU for `config`. It gets its monitor and agent sockets and its console as
/// descriptors the platform opened in its control directory; confined, it sees only its
/// disks directory (none for a capture's twin) and the files it needs.
pub fn spawn_qemu(config: &MachineConfig, paths: &VmPaths, launch: Launch) -> Result<Process, VmError> {
    let twin = launch.null_disk_bytes.is_some();
    let log = open_log(&paths.qemu_log())?;
    let log2 = log.try_clone().map_err(io("duplicating qemu.log"))?;
    let console = open_log(&paths.console())?;
    crate::console::restart(&paths.console());
    let qmp = bind_socket(&paths.qmp())?;
    let agent = bind_socket(&paths.agent())?;
    let mut fds = crate::process::FdMap::new();
    fds.add(&qmp, QMP_FD)
        .and_then(|_| fds.add(&agent, AGENT_FD))
        .and_then(|_| fds.add(&console, CONSOLE_FD))
        .map_err(io("passing descriptors to QEMU"))?;
    let mut cmd = tokio::process::Command::new(&config.qemu_binary);
    cmd.args(qemu_args(config, paths, launch))
        .current_dir(&paths.control)
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(log2)
        // Its own process group: a Ctrl-C at the platform's terminal must not kill the guests
        // behind the platform's back; the platform stops them itself.
        .process_group(0);
    fds.install(&mut cmd);
    let mut cleanup: Option<Box<dyn FnOnce() + Send>> = None;
    if let Some(settings) = &config.jail {
        let plan = JailPlan::prepare(
            settings,
            &cgroup_name(&paths.control),
            &visible_files(config, paths, launch),
            Limits {
                vcpus: config.vcpus,
                memory_mib: config.memory_mib,
                disk: disk_ceiling(config, paths),
            },
            (!twin).then_some(paths.disks.as_path()),
            None,
        )
        .map_err(io(format!("confining the QEMU of {}", paths.control.display())))?;
        let dirs = plan.cgroup_dirs.clone();
        cleanup = Some(Box::new(move || JailPlan::remove_cgroups(&dirs)));
        // SAFETY: `apply` only makes system calls on data prepared above (no allocation,
        // no locks), which is what may run between fork and exec.
        unsafe {
            cmd.pre_exec(move || plan.apply());
        }
    }
    let process = Process::spawn_then(cmd, config.jail.is_some(), cleanup).map_err(io(format!(
        "starting {} (apt-get install qemu-system-x86)",
        config.qemu_binary.display()
    )))?;
    // QEMU has its own copies now; the sockets stay bound at their paths.
    drop((qmp, agent, console));
    std::fs::write(paths.pidfile(), process.pid().to_string()).map_err(io("writing qemu.pid"))?;
    Ok(process)
}

/// The cgroup's disk ceiling of a machine: its limits, on the disk holding its overlays.
fn disk_ceiling(config: &MachineConfig, paths: &VmPaths) -> Option<crate::jail::DiskCeiling> {
    let limits = config.disk_limits?;
    let (major, minor) = crate::jail::whole_disk_of(&paths.disks)?;
    Some(crate::jail::DiskCeiling {
        major,
        minor,
        bytes_per_sec: limits.bytes_per_sec,
        iops: limits.iops,
    })
}

/// Whether `cfg` maps its RAM file privately and read-only (a restored machine, on a QEMU
/// that can).
fn private_ram_read_only(cfg: &MachineConfig) -> bool {
    !cfg.ram_shared
        && !cfg.ram_path.as_os_str().is_empty()
        && crate::accel::maps_private_ram_read_only(&cfg.qemu_binary)
}

/// What a confined QEMU of this machine sees: its directory, the kernel and initrd, the base
/// disk under its overlays (not for a capture's twin, whose disk reads as zeros), its RAM file.
fn visible_files(config: &MachineConfig, paths: &VmPaths, launch: Launch) -> Visible {
    let mut v = Visible {
        ro_files: vec![config.kernel.clone(), config.initrd.clone()],
        ..Visible::default()
    };
    if launch.null_disk_bytes.is_none() {
        v.rw_dirs.push(paths.disks.clone());
        v.ro_files.push(config.base_disk.clone());
    }
    if !config.ram_path.as_os_str().is_empty() {
        if config.ram_shared {
            v.own_files.push(config.ram_path.clone());
        } else if private_ram_read_only(config) {
            // Bound read-only: no QEMU restored from a snapshot can change what the snapshot's
            // other clones on this host read from the page cache.
            v.ro_files.push(config.ram_path.clone());
        } else {
            v.shared_rw_files.push(config.ram_path.clone());
        }
    }
    if config.accel == Accel::Kvm {
        v.devices.push("/dev/kvm".into());
    }
    if let (None, Some(Nic::Tap { netns })) = (launch.null_disk_bytes, &config.nic) {
        if config.device_line >= 2 {
            v.tun = true;
            v.netns = Some(Path::new("/run/netns").join(netns));
        }
    }
    v
}

/// The cgroup of the QEMU of the control directory `dir`, named after the directory's last two
/// components (`machines-<id>`, `<snapshot>-twin`): unique within a data directory, whose
/// platform has its own parent cgroup, and the same for the platform that re-attaches the
/// QEMU later.
pub(crate) fn cgroup_name(dir: &Path) -> String {
    let mut parts: Vec<String> = dir
        .components()
        .rev()
        .take(2)
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    parts.reverse();
    parts.join("-")
}

pub(crate) async fn connect_qmp(process: &Process, paths: &VmPaths, wait: Duration) -> Result<Arc<Qmp>, VmError> {
    match race_exit(process, paths, "while starting", Qmp::connect(&paths.qmp(), wait)).await {
        Ok(q) => Ok(q),
        Err(e) => {
            process.signal(Signal::KILL);
            Err(e)
        }
    }
}

/// Runs `fut`, but fails as soon as QEMU exits, with its exit status and log tails.
pub(crate) async fn race_exit<T, E: Into<VmError>>(
    process: &Process,
    paths: &VmPaths,
    phase: &'static str,
    fut: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, VmError> {
    let exit = tokio::select! {
        r = fut => match r {
            Ok(v) => return Ok(v),
            // A closed socket is usually the first sign of QEMU dying: prefer the exit status
            // as the explanation when it follows promptly.
            Err(e) => match tokio::time::timeout(Duration::from_millis(500), process.wait()).await {
                Ok(exit) => exit,
                Err(_) => return Err(e.into()),
            },
        },
        exit = process.wait() => exit,
    };
    // Give QEMU's last words a moment to reach the files.
    tokio::time::sleep(Duration::from_millis(50)).await;
    Err(VmError::Exited {
        exit,
        phase,
        log: log_suffix(paths),
    })
}

pub(crate) fn log_suffix(paths: &VmPaths) -> String {
    let qemu = log_tail(&paths.qemu_log(), 5);
    let console = log_tail(&paths.console(), 5);
    let mut s = String::new();
    if !qemu.trim().is_empty() {
        s.push_str(&format!("; qemu: {}", qemu.trim().replace('\n', " | ")));
    }
    if !console.trim().is_empty() {
        s.push_str(&format!("; console: {}", console.trim().replace('\n', " | ")));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::untrusted::rotate_log;

    #[test]
    fn a_qemu_is_known_by_its_machine_directory_not_by_its_hostname() {
        // A stand-in process whose command line carries `-name` as a QEMU's does.
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 30", "-name", "stasis-0d3a6b8e"])
            .spawn()
            .unwrap();
        let pid = child.id();
        // Until it has executed, the child's command line is still this test's.
        let started = std::time::Instant::now();
        while !std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.starts_with(b"sh\0")) {
            assert!(started.elapsed() < Duration::from_secs(10), "sh did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        let control = Path::new("/var/lib/stasis/machines/0d3a6b8e");
        assert!(is_machine_qemu(pid, control, None));
        assert!(!is_machine_qemu(pid, Path::new("/var/lib/stasis/machines/other"), None));
        // Started by an older version, named after the hostname.
        assert!(is_machine_qemu(pid, Path::new("/x/machines/other"), Some("0d3a6b8e")));
        let paths = VmPaths::new(
            control.to_path_buf(),
            PathBuf::from("/var/lib/stasis/computers/0d3a6b8e"),
        );
        assert_eq!(process_name(&paths, Launch::default()), "stasis-0d3a6b8e");
        let twin = VmPaths::new(
            PathBuf::from("/s/snap-1/twin"),
            PathBuf::from("/s/snap-1/twin/no-disks"),
        );
        let launch = Launch {
            null_disk_bytes: Some(1),
            ..Launch::default()
        };
        assert_eq!(process_name(&twin, launch), "stasis-snap-1-twin");
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!is_machine_qemu(pid, control, None), "a process that is gone");
    }

    fn config() -> MachineConfig {
        MachineConfig {
            name: "c1".into(),
            vcpus: 2,
            memory_mib: 1024,
            accel: Accel::Tcg,
            qemu_binary: "qemu-system-x86_64".into(),
            image_id: "img".into(),
            kernel: "/img/vmlinuz".into(),
            initrd: "/img/initrd.img".into(),
            base_disk: "/img/rootfs.ext4".into(),
            disk: "/data/c1/disk.qcow2".into(),
            ram_path: "/dev/shm/c1.ram".into(),
            ram_shared: true,
            tsc_khz: Some(2_100_000),
            jail: None,
            disk_limits: Some(DiskLimits::DEFAULT),
            cpu_model: None,
            device_line: crate::description::DEVICE_LINE,
            nic: None,
        }
    }

    fn joined(args: &[OsString]) -> String {
        args.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn the_command_line_has_shared_file_ram_and_an_overlay() {
        let paths = VmPaths::new("/data/machines/c1", "/data/c1");
        let line = joined(&qemu_args(&config(), &paths, Launch::default()));
        // Sockets and console are descriptors: no path of the platform's is on the line.
        assert!(line.contains("socket,id=qmp,fd=3,server=on,wait=off"), "{line}");
        assert!(line.contains("socket,id=agent,fd=4,server=on,wait=off"), "{line}");
        assert!(line.contains("-add-fd fd=5,set=1"), "{line}");
        assert!(line.contains("file,id=console,path=/dev/fdset/1,append=on"), "{line}");
        assert!(!line.contains("/data/machines"), "{line}");
        assert!(line.contains("-name stasis-c1 "), "{line}");
        assert!(line.contains("-smp 2 -m 1024M"), "{line}");
        assert!(line.contains("memory-backend-file,id=mem,size=1024M,mem-path=/dev/shm/c1.ram,share=on"));
        assert!(line.contains("memory-backend=mem"));
        assert!(line.contains("driver=file,filename=/data/c1/disk.qcow2,node-name=disk-file"));
        assert!(line.contains("driver=qcow2,file=disk-file,node-name=disk"));
        assert!(
            !line.contains("rootfs.ext4"),
            "the base comes from the overlay's header"
        );
        assert!(line.contains("tsc_early_khz=2100000"));
        assert!(line.contains("-accel tcg -cpu max"));
        assert!(line.contains("name=stasis.agent"));
        assert!(!line.contains("-incoming"));
        let mut private = config();
        private.ram_shared = false;
        let restore = joined(&qemu_args(
            &private,
            &paths,
            Launch {
                incoming: true,
                null_disk_bytes: None,
            },
        ));
        assert!(restore.contains("mem-path=/dev/shm/c1.ram,share=off"), "{restore}");
        let twin_paths = VmPaths::new(
            PathBuf::from("/data/staging/s1/twin"),
            PathBuf::from("/data/staging/s1/twin/no-disks"),
        );
        let twin = joined(&qemu_args(
            &config(),
            &twin_paths,
            Launch {
                incoming: true,
                null_disk_bytes: Some(1 << 30),
            },
        ));
        assert!(twin.contains("driver=null-co,node-name=disk,size=1073741824"), "{twin}");
        assert!(twin.contains("-name stasis-s1-twin "), "{twin}");
        assert!(!twin.contains("disk.qcow2"));
        assert!(restore.ends_with("-S -incoming defer"), "{restore}");
    }

    #[test]
    fn overlong_socket_paths_are_refused_with_a_clear_error() {
        let long = format!("/{}", "d".repeat(120));
        let err = check_socket_paths(&VmPaths::new(long, "/d")).unwrap_err();
        assert!(err.to_string().contains("shorter data directory"), "{err}");
        assert!(check_socket_paths(&VmPaths::new("/data/machines/c1", "/data/c1")).is_ok());
    }

    #[test]
    fn log_tails_refuse_links_and_fifos_and_read_only_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "the master key").unwrap();
        let log = dir.path().join("console.log");
        std::os::unix::fs::symlink(&secret, &log).unwrap();
        assert_eq!(log_tail(&log, 3), "", "a link is not followed");
        std::fs::remove_file(&log).unwrap();
        let fifo = std::ffi::CString::new(log.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo on a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        assert_eq!(log_tail(&log, 3), "", "a FIFO neither blocks nor is read");
        std::fs::remove_file(&log).unwrap();
        // A big log: only its end is read.
        let mut text = "x".repeat(10 << 20);
        text.push_str("\nlast-but-one\nlast\n");
        std::fs::write(&log, &text).unwrap();
        assert_eq!(log_tail(&log, 2), "last-but-one\nlast");
    }

    #[test]
    fn logs_are_cut_back_at_their_cap_keeping_the_end() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("qemu.log");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        f.write_all(&vec![b'a'; 3000]).unwrap();
        f.write_all(b"\nthe end\n").unwrap();
        rotate_log(&log, 1024).unwrap();
        assert_eq!(std::fs::metadata(&log).unwrap().len(), 0);
        let rotated = dir.path().join("qemu.log.1");
        assert_eq!(std::fs::metadata(&rotated).unwrap().len(), 512);
        // The writer appends at the new end.
        f.write_all(b"after\n").unwrap();
        assert_eq!(std::fs::read(&log).unwrap(), b"after\n");
        assert_eq!(log_tail(&log, 2), "the end\nafter");
        // Under the cap nothing happens.
        rotate_log(&log, 1024).unwrap();
        assert_eq!(std::fs::read(&log).unwrap(), b"after\n");
    }

    #[test]
    fn only_plain_overlay_files_in_the_disks_directory_count_as_disks() {
        let dir = tempfile::tempdir().unwrap();
        let paths = VmPaths::new(dir.path().join("control"), dir.path().join("disks"));
        paths.create().unwrap();
        std::fs::write(paths.disks.join("disk-1.qcow2"), "").unwrap();
        assert!(paths.holds_disk(&paths.disks.join("disk-1.qcow2")));
        std::os::unix::fs::symlink("/etc/passwd", paths.disks.join("disk-2.qcow2")).unwrap();
        assert!(!paths.holds_disk(&paths.disks.join("disk-2.qcow2")));
        assert!(!paths.holds_disk(Path::new("/etc/passwd")));
        std::fs::write(paths.control.join("disk.qcow2"), "").unwrap();
        assert!(!paths.holds_disk(&paths.control.join("disk.qcow2")));
    }
}
