//! The default guest image: a Debian cloud kernel, an initramfs whose `/init` is the guest agent
//! (it loads the virtio modules and switches to the root disk), and an ext4 root disk holding a
//! debootstrapped Debian userspace with the agent as `/sbin/init`.
//!
//! Each part is cached under the cache directory by a key derived from its inputs, so a change
//! of kernel package, package list, agent binary or recipe rebuilds exactly what depends on it:
//!
//! ```text
//! <cache>/kernel/<package>_<version>/    vmlinuz, modules/
//! <cache>/rootfs/<key>/                  the debootstrap tree
//! <cache>/images/<key>/                  vmlinuz, initrd.img, rootfs.ext4, image.json
//! ```

mod cpio;
mod kernel;
mod rootfs;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

/// Bumped whenever the recipe below changes in a way the inputs do not capture.
const RECIPE_VERSION: u32 = 1;

/// The guest agent, built static for x86_64 by this crate's build script.
pub static AGENT_BINARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/stasis-agent"));

/// Modules the initramfs loads, dependencies first (found in the kernel package by name).
pub const GUEST_MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_mmio",
    "virtio_blk",
    "virtio_console",
    "virtio-rng",
    "failover",
    "net_failover",
    "virtio_net",
    // Socket diagnostics: after a restore the agent resets the TCP connections the snapshot
    // caught open (SOCK_DESTROY), whose peers are gone or belong to the source.
    "inet_diag",
    "tcp_diag",
];

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("{0}")]
    Invalid(String),
}

pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ImageError {
    let context = context.into();
    move |source| ImageError::Io { context, source }
}

/// What the default image is made of.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageSpec {
    /// Template name users pass as `template_type`.
    pub name: String,
    pub suite: String,
    pub mirror: String,
    /// The Debian meta package naming the kernel flavour.
    pub kernel_package: String,
    pub packages: Vec<String>,
    pub disk_size_mib: u64,
}

impl Default for ImageSpec {
    fn default() -> Self {
        ImageSpec {
            name: "debian-bookworm".into(),
            suite: "bookworm".into(),
            mirror: "http://deb.debian.org/debian".into(),
            kernel_package: "linux-image-cloud-amd64".into(),
            packages: ["bash", "coreutils", "procps", "python3"].map(String::from).to_vec(),
            disk_size_mib: 2048,
        }
    }
}

/// A built image on local disk.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Image {
    /// Content key: changes whenever any input changes.
    pub id: String,
    pub name: String,
    pub kernel_release: String,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Raw ext4 base disk; computers get qcow2 overlays above it and never write it.
    pub rootfs: PathBuf,
}

/// Progress of a build, for people watching it.
pub trait Progress: Send + Sync {
    fn step(&self, message: &str);
}

impl<F: Fn(&str) + Send + Sync> Progress for F {
    fn step(&self, message: &str) {
        self(message)
    }
}

/// Default cache directory: `$XDG_CACHE_HOME/stasis` or `~/.cache/stasis`.
pub fn default_cache_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("stasis");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/root".into());
    home.join(".cache").join("stasis")
}

/// Hex BLAKE3 of the embedded agent; part of the image key.
pub fn agent_hash() -> String {
    blake3::hash(AGENT_BINARY).to_hex()[..16].to_string()
}

/// Returns the cached image for `spec`, building whatever part is missing or stale.
pub fn ensure(cache: &Path, spec: &ImageSpec, progress: &dyn Progress) -> Result<Image, ImageError> {
    std::fs::create_dir_all(cache).map_err(io_err(format!("creating {}", cache.display())))?;
    // One builder at a time per cache (several servers or test processes may start together).
    let _lock = FileLock::exclusive(&cache.join(".lock"))?;

    let kernel = kernel::ensure(cache, spec, progress)?;
    let rootfs = rootfs::ensure(cache, spec, progress)?;
    let key_input = serde_json::json!({
        "recipe": RECIPE_VERSION,
        "kernel": kernel.key,
        "rootfs": rootfs.key,
        "agent": agent_hash(),
        "disk_size_mib": spec.disk_size_mib,
        "modules": GUEST_MODULES,
    });
    let id = blake3::hash(key_input.to_string().as_bytes()).to_hex()[..16].to_string();
    let dir = cache.join("images").join(&id);
    let meta_path = dir.join("image.json");
    if let Ok(bytes) = std::fs::read(&meta_path) {
        if let Ok(image) = serde_json::from_slice::<Image>(&bytes) {
            return Ok(image);
        }
    }

    progress.step(&format!("assembling image {id}"));
    let tmp = cache.join("images").join(format!(".{id}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io_err("creating the image directory"))?;

    std::fs::copy(&kernel.vmlinuz, tmp.join("vmlinuz")).map_err(io_err("copying the kernel"))?;

    let mut initrd = cpio::Writer::new();
    initrd.dir("dev", 0o755);
    initrd.dir("proc", 0o755);
    initrd.dir("sys", 0o755);
    initrd.dir("newroot", 0o755);
    initrd.dir("modules", 0o755);
    initrd.file("init", 0o755, AGENT_BINARY);
    initrd.file("stasis-initramfs", 0o644, b"");
    let mut order = String::new();
    for m in &kernel.modules {
        let name = m.file_name().unwrap().to_string_lossy().into_owned();
        let bytes = std::fs::read(m).map_err(io_err(format!("reading {}", m.display())))?;
        initrd.file(&format!("modules/{name}"), 0o644, &bytes);
        order.push_str(&name);
        order.push('\n');
    }
    initrd.file("modules/order", 0o644, order.as_bytes());
    std::fs::write(tmp.join("initrd.img"), initrd.finish()).map_err(io_err("writing initrd.img"))?;

    progress.step("making the ext4 root disk");
    rootfs::install_agent(&rootfs.tree, AGENT_BINARY)?;
    let disk = tmp.join("rootfs.ext4");
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "stasis-root", "-E", "root_owner=0:0", "-d"])
        .arg(&rootfs.tree)
        .arg(&disk)
        .arg(format!("{}M", spec.disk_size_mib)))?;

    let image = Image {
        id: id.clone(),
        name: spec.name.clone(),
        kernel_release: kernel.release.clone(),
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initrd.img"),
        rootfs: dir.join("rootfs.ext4"),
    };
    std::fs::write(tmp.join("image.json"), serde_json::to_vec_pretty(&image).unwrap())
        .map_err(io_err("writing image.json"))?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir).map_err(io_err("publishing the image"))?;
    progress.step(&format!("image {id} ready"));
    Ok(image)
}

/// Runs a command, turning a failure into an error that carries its stderr.
pub(crate) fn run(cmd: &mut Command) -> Result<String, ImageError> {
    let shown = format!("{:?}", cmd).replace('"', "");
    let child = spawn(
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped()),
    )
    .map_err(|e| ImageError::Io {
        context: format!("starting {shown}"),
        source: e,
    })?;
    let out = child.wait_with_output().map_err(|e| ImageError::Io {
        context: format!("waiting for {shown}"),
        source: e,
    })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(15).collect();
        return Err(ImageError::Command {
            command: shown,
            status: out.status.to_string(),
            stderr: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Process groups of the build steps running now (each step leads a group of its own, so
/// everything it starts — debootstrap's dpkg and chroot children — is stopped with it).
static RUNNING: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());
/// Set by [`abort_builds`]: no new step starts after it.
static ABORTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A build step started in a process group of its own, known to [`abort_builds`] until it ends.
pub(crate) struct Step {
    pid: u32,
    /// Taken only by [`Step::wait_with_output`], which consumes the step.
    child: Option<std::process::Child>,
}

impl std::ops::Deref for Step {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        self.child
            .as_ref()
            .expect("a step's child is taken only when the step is consumed")
    }
}

impl std::ops::DerefMut for Step {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.child
            .as_mut()
            .expect("a step's child is taken only when the step is consumed")
    }
}

impl Step {
    fn wait_with_output(mut self) -> std::io::Result<std::process::Output> {
        let child = self.child.take().expect("a step's child is taken once");
        child.wait_with_output()
    }
}

impl Drop for Step {
    fn drop(&mut self) {
        RUNNING
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|p| *p != self.pid);
    }
}

/// Starts one build step in its own process group (refused once [`abort_builds`] ran).
pub(crate) fn spawn(cmd: &mut Command) -> std::io::Result<Step> {
    use std::os::unix::process::CommandExt;
    let mut running = RUNNING.lock().unwrap_or_else(|p| p.into_inner());
    if ABORTED.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(std::io::Error::other("the process is shutting down"));
    }
    let child = cmd.process_group(0).spawn()?;
    running.push(child.id());
    Ok(Step {
        pid: child.id(),
        child: Some(child),
    })
}

/// Stops every build step running now and refuses new ones: for a process that is shutting
/// down while the image is still being built. Each step's whole process group gets SIGTERM
/// (debootstrap unmounts what it mounted in the tree when told so); the half-built parts stay
/// in their temporary directories, which the next build removes.
pub fn abort_builds() {
    let running = RUNNING.lock().unwrap_or_else(|p| p.into_inner());
    ABORTED.store(true, std::sync::atomic::Ordering::SeqCst);
    for pid in running.iter() {
        if let Some(group) = rustix::process::Pid::from_raw(*pid as i32) {
            let _ = rustix::process::kill_process_group(group, rustix::process::Signal::TERM);
        }
    }
}

/// Whether [`abort_builds`] was called (a build failing after it was stopped, not broken).
pub fn builds_aborted() -> bool {
    ABORTED.load(std::sync::atomic::Ordering::SeqCst)
}

/// An advisory lock held until dropped.
struct FileLock {
    _file: std::fs::File,
}

impl FileLock {
    fn exclusive(path: &Path) -> Result<Self, ImageError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(io_err(format!("opening {}", path.display())))?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| io_err("locking the image cache")(e.into()))?;
        Ok(FileLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_agent_is_a_static_executable() {
        assert_eq!(&AGENT_BINARY[..4], b"\x7fELF");
        // A static-pie binary has no PT_INTERP program header, so no "/lib64/ld-linux" string.
        let interp = b"/lib64/ld-linux-x86-64.so.2";
        assert!(
            !AGENT_BINARY.windows(interp.len()).any(|w| w == interp),
            "the agent must not need a dynamic loader"
        );
    }
}
