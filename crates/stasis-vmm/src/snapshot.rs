//! Capturing a running machine: device state, RAM and disk frozen at one instant.
//!
//! The guest is paused only while three cheap things happen: the disk's top overlay is frozen
//! (`blockdev-snapshot-sync` puts a new overlay on top for the guest to go on writing to),
//! the device state is streamed out without RAM (`x-ignore-shared`: RAM lives in a shared
//! file), and the RAM file is copied. Then the guest resumes; compressing and uploading happen
//! afterwards from the captured files.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::qmp::Qmp;
use crate::vm::{MachineConfig, Vm, VmError};

/// What a capture leaves in the staging directory.
#[derive(Debug, Clone)]
pub struct Capture {
    /// Device state: QEMU's migration stream without RAM.
    pub state: PathBuf,
    /// A copy of guest RAM (sparse).
    pub memory: PathBuf,
    /// Top of the frozen disk chain; nothing writes to it any more.
    pub disk: PathBuf,
    /// The machine as it was captured (what a restore must rebuild).
    pub machine: MachineConfig,
    /// How long the guest was paused.
    pub paused: Duration,
}

/// Capabilities every machine's migration uses, on both ends.
pub(crate) async fn set_migration_caps(qmp: &Qmp) -> Result<(), VmError> {
    qmp.execute(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]}),
    )
    .await?;
    Ok(())
}

impl Vm {
    /// Captures the machine into `staging` (which must exist).
    pub async fn capture(&self, staging: &Path) -> Result<Capture, VmError> {
        let _one_at_a_time = self.ops().lock().await;
        let qmp = self.qmp().clone();
        set_migration_caps(&qmp).await?;
        // The default cap of 128 MiB/s would throttle even the small state stream.
        qmp.execute("migrate-set-parameters", json!({"max-bandwidth": 1u64 << 40}))
            .await?;
        let mut config = self.config();
        let top = top_node(&qmp).await?;
        let suffix = format!(
            "{:x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos()
        );
        let next_disk = self.paths.dir.join(format!("disk-{suffix}.qcow2"));
        let state = staging.join("state");
        let memory = staging.join("memory");
        let frozen = config.disk.clone();

        let paused_at = Instant::now();
        qmp.execute("stop", json!({})).await?;
        let frozen_result: Result<(), VmError> = async {
            qmp.execute(
                "blockdev-snapshot-sync",
                json!({
                    "node-name": top,
                    "snapshot-file": next_disk.to_string_lossy(),
                    "snapshot-node-name": format!("disk-{suffix}"),
                    "format": "qcow2",
                }),
            )
            .await?;
            // From here on the guest writes to the new overlay, even if what follows fails.
            config.disk = next_disk.clone();
            self.set_config(config.clone())?;
            let uri = format!("exec:cat > {}", shell_quote(&state));
            qmp.execute("migrate", json!({"uri": uri})).await?;
            wait_migration(&qmp, Duration::from_secs(120)).await?;
            let ram = config.ram_path.clone();
            let mem = memory.clone();
            tokio::task::spawn_blocking(move || sparse_copy(&ram, &mem))
                .await
                .expect("copy does not panic")
                .map_err(|source| VmError::Io {
                    context: "copying guest RAM".into(),
                    source,
                })?;
            Ok(())
        }
        .await;
        let resumed = qmp.execute("cont", json!({})).await;
        let paused = paused_at.elapsed();
        frozen_result?;
        resumed?;
        config.disk = frozen.clone();
        Ok(Capture {
            state,
            memory,
            disk: frozen,
            machine: config,
            paused,
        })
    }
}

/// The node name at the top of the root disk's chain.
async fn top_node(qmp: &Qmp) -> Result<String, VmError> {
    let blocks = qmp.execute("query-block", json!({})).await?;
    blocks
        .as_array()
        .into_iter()
        .flatten()
        .find(|b| {
            b.get("qdev")
                .and_then(Value::as_str)
                .is_some_and(|q| q.contains("rootdisk"))
        })
        .and_then(|b| b.pointer("/inserted/node-name"))
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| VmError::Invalid("the root disk is not in query-block".into()))
}

/// Polls `query-migrate` until the outgoing (or incoming) migration completes.
pub(crate) async fn wait_migration(qmp: &Qmp, limit: Duration) -> Result<(), VmError> {
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

pub(crate) fn shell_quote(path: &Path) -> String {
    format!("'{}'", path.to_string_lossy().replace('\'', "'\\''"))
}

/// Copies a file keeping holes (and skipping all-zero blocks) so sparse RAM stays sparse.
pub fn sparse_copy(src: &Path, dst: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let input = std::fs::File::open(src)?;
    let size = input.metadata()?.len();
    let output = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(dst)?;
    output.set_len(size)?;
    let fd = input.as_raw_fd();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos: u64 = 0;
    while pos < size {
        // SAFETY: lseek on a descriptor we hold open; no pointers.
        let data = unsafe { libc::lseek(fd, pos as i64, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: only a hole remains
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let end = if hole < 0 { size } else { hole as u64 };
        let mut at = data as u64;
        while at < end {
            let n = ((end - at) as usize).min(buf.len());
            input.read_exact_at(&mut buf[..n], at)?;
            if buf[..n].iter().any(|&b| b != 0) {
                output.write_all_at(&buf[..n], at)?;
            }
            at += n as u64;
        }
        pos = end;
    }
    Ok(())
}

/// The guest-visible disk of a frozen chain as one raw file (sparse).
pub async fn flatten_disk(top: &Path, out: &Path) -> Result<(), VmError> {
    let result = tokio::process::Command::new("qemu-img")
        .args(["convert", "-U", "-f", "qcow2", "-O", "raw"])
        .arg(top)
        .arg(out)
        .output()
        .await
        .map_err(|source| VmError::Io {
            context: "running qemu-img convert".into(),
            source,
        })?;
    if !result.status.success() {
        return Err(VmError::Invalid(format!(
            "qemu-img convert failed: {}",
            String::from_utf8_lossy(&result.stderr).trim()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_copy_keeps_content_and_holes() {
        use std::os::unix::fs::{FileExt, MetadataExt};
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let f = std::fs::File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(b"start", 0).unwrap();
        f.write_all_at(&[0u8; 1 << 20], 8 << 20).unwrap(); // written zeros
        f.write_all_at(b"end", (64 << 20) - 3).unwrap();
        let dst = dir.path().join("dst");
        sparse_copy(&src, &dst).unwrap();
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        let blocks = std::fs::metadata(&dst).unwrap().blocks() * 512;
        assert!(blocks < 4 << 20, "the copy stays sparse ({blocks} bytes allocated)");
    }

    #[test]
    fn shell_quoting_survives_quotes() {
        assert_eq!(shell_quote(Path::new("/a b/it's")), "'/a b/it'\\''s'");
    }
}
