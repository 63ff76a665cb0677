//! What machine a snapshot was taken on, written into its manifest: enough to start that same
//! machine again (its own kernel and initrd, by content hash), and to tell before any QEMU
//! starts whether a host can. A saved device state loads only into the machine that saved it:
//! the same QEMU release, machine type, accelerator, CPU model and device line. Anything else
//! is refused with a message naming the difference, never tried.

use serde::{Deserialize, Serialize};

use crate::accel::Accel;
use crate::vm::MachineConfig;

/// Bumped on any change to this description's meaning; readers refuse formats they do not know.
pub const FORMAT: u32 = 1;
/// The machine type every computer runs.
pub const MACHINE_TYPE: &str = "microvm";
/// Version of the device line `vm::qemu_args` builds: the devices, their ids and the
/// options a saved device state records. Bump it with any change a saved state would notice.
pub const DEVICE_LINE: u32 = 2;
/// Every device line this platform builds: 1 had no network card, 2 adds a virtio-net card.
pub const DEVICE_LINES: std::ops::RangeInclusive<u32> = 1..=DEVICE_LINE;

/// A boot file (kernel, initrd) by content: BLAKE3 of the whole file, and its length.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BootFile {
    pub blake3: String,
    pub bytes: u64,
}

impl BootFile {
    /// Hashes a file (blocking: call off the async runtime).
    pub fn of(path: &std::path::Path) -> std::io::Result<BootFile> {
        let mut hasher = blake3::Hasher::new();
        let bytes = std::io::copy(&mut std::fs::File::open(path)?, &mut hasher)?;
        Ok(BootFile {
            blake3: hasher.finalize().to_hex().to_string(),
            bytes,
        })
    }

    /// [`BootFile::of`], remembered per file while its length and modification time stay the
    /// same (the same kernel is described at every snapshot).
    pub fn of_remembered(path: &std::path::Path) -> std::io::Result<BootFile> {
        type Key = (std::path::PathBuf, u64, std::time::SystemTime);
        static SEEN: std::sync::Mutex<Vec<(Key, BootFile)>> = std::sync::Mutex::new(Vec::new());
        let meta = std::fs::metadata(path)?;
        let key = (path.to_path_buf(), meta.len(), meta.modified()?);
        if let Some((_, f)) = SEEN
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|(k, _)| *k == key)
        {
            return Ok(f.clone());
        }
        let f = BootFile::of(path)?;
        let mut seen = SEEN.lock().unwrap_or_else(|p| p.into_inner());
        seen.retain(|(k, _)| k.0 != key.0);
        seen.push((key, f.clone()));
        Ok(f)
    }

    /// Whether `blake3` is a well-formed hash (64 lower-case hex digits), so it can name a file.
    pub fn is_well_formed(&self) -> bool {
        self.blake3.len() == 64
            && self
                .blake3
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    }
}

/// A QEMU release, major and minor: a saved state is loaded only by the release that wrote
/// it (patch releases of one stable series keep the migration format).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct QemuRelease {
    pub major: u32,
    pub minor: u32,
}

impl std::fmt::Display for QemuRelease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

impl From<(u32, u32)> for QemuRelease {
    fn from((major, minor): (u32, u32)) -> Self {
        QemuRelease { major, minor }
    }
}

/// The machine a snapshot was taken on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineDescription {
    pub format: u32,
    pub qemu: QemuRelease,
    pub machine_type: String,
    pub accel: Accel,
    pub cpu_model: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub device_line: u32,
    /// The TSC frequency the guest was booted with (it keeps it across restores).
    pub tsc_khz: Option<u64>,
    /// The image the computer was first booted from (its root disk is in the snapshot).
    pub image_id: String,
    pub kernel: BootFile,
    pub initrd: BootFile,
}

impl MachineDescription {
    /// Describes the machine `config` runs (hashing its boot files: blocking, call off the
    /// async runtime).
    pub fn describe(config: &MachineConfig) -> Result<MachineDescription, DescribeError> {
        let qemu = crate::accel::qemu_version(&config.qemu_binary).ok_or_else(|| DescribeError::QemuVersion {
            binary: config.qemu_binary.clone(),
        })?;
        let file = |path: &std::path::Path| {
            BootFile::of_remembered(path).map_err(|source| DescribeError::BootFile {
                path: path.to_path_buf(),
                source,
            })
        };
        Ok(MachineDescription::of(
            config,
            qemu.into(),
            file(&config.kernel)?,
            file(&config.initrd)?,
        ))
    }

    /// The description of a machine running `config` on QEMU `qemu`.
    pub fn of(config: &MachineConfig, qemu: QemuRelease, kernel: BootFile, initrd: BootFile) -> MachineDescription {
        MachineDescription {
            format: FORMAT,
            qemu,
            machine_type: MACHINE_TYPE.into(),
            accel: config.accel,
            cpu_model: config.cpu_model(),
            vcpus: config.vcpus,
            memory_mib: config.memory_mib,
            device_line: config.device_line,
            tsc_khz: config.tsc_khz,
            image_id: config.image_id.clone(),
            kernel,
            initrd,
        }
    }

    /// Whether `host` can load this machine's state; the first difference if not.
    pub fn check(&self, host: &HostMachine) -> Result<(), Mismatch> {
        if self.format != FORMAT {
            return Err(Mismatch::Format { found: self.format });
        }
        if self.machine_type != MACHINE_TYPE {
            return Err(Mismatch::MachineType {
                snapshot: self.machine_type.clone(),
            });
        }
        if !DEVICE_LINES.contains(&self.device_line) {
            return Err(Mismatch::DeviceLine {
                snapshot: self.device_line,
            });
        }
        match host.qemu {
            Some(q) if q == self.qemu => {}
            host => {
                return Err(Mismatch::Qemu {
                    snapshot: self.qemu,
                    host,
                })
            }
        }
        if self.accel == Accel::Kvm && !host.kvm {
            return Err(Mismatch::Accel { snapshot: self.accel });
        }
        // TCG emulates whatever model the machine had; under KVM the host's CPU must give
        // the model, so only hosts whose machines get it take the snapshot.
        if self.accel == Accel::Kvm && self.cpu_model != host.kvm_cpu_model {
            return Err(Mismatch::CpuModel {
                snapshot: self.cpu_model.clone(),
                host: host.kvm_cpu_model.clone(),
            });
        }
        if !self.kernel.is_well_formed() || !self.initrd.is_well_formed() {
            return Err(Mismatch::BootFiles);
        }
        Ok(())
    }
}

pub use crate::cpu::{default_cpu_model, TCG_CPU_MODEL};

/// What a host runs: its QEMU release (None: its QEMU did not say), whether it has KVM, and
/// the CPU model its KVM machines get (hosts of a cluster report it in their heartbeats).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostMachine {
    pub qemu: Option<QemuRelease>,
    pub kvm: bool,
    pub kvm_cpu_model: String,
}

impl HostMachine {
    /// A host without KVM running QEMU `qemu`.
    pub fn tcg(qemu: QemuRelease) -> HostMachine {
        HostMachine {
            qemu: Some(qemu),
            kvm: false,
            kvm_cpu_model: default_cpu_model(Accel::Kvm).into(),
        }
    }
}

/// Why the machine a capture was taken of could not be described.
#[derive(Debug, thiserror::Error)]
pub enum DescribeError {
    #[error("{} did not report its version", binary.display())]
    QemuVersion { binary: std::path::PathBuf },
    #[error("reading {}: {source}", path.display())]
    BootFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Why a manifest's `machine` does not read.
#[derive(Debug, thiserror::Error)]
#[error("its machine {} does not read: {source}", if *legacy { "record" } else { "description" })]
pub struct Unreadable {
    /// An object from before descriptions (no `format`).
    pub legacy: bool,
    #[source]
    pub source: serde_json::Error,
}

/// Why a host cannot load a snapshot's machine state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Mismatch {
    #[error("its machine description has format {found}, which this platform does not know (it reads format {FORMAT}); upgrade the platform")]
    Format { found: u32 },
    #[error("it was taken on a {snapshot} machine; this platform runs {MACHINE_TYPE} machines only")]
    MachineType { snapshot: String },
    #[error("it was taken with device line {snapshot}; this platform builds device lines 1 to {DEVICE_LINE}, and a saved device state loads only into the devices that saved it")]
    DeviceLine { snapshot: u32 },
    #[error("it was taken on QEMU {snapshot}; this host runs {}, and QEMU loads a saved machine only into the release that saved it (run QEMU {snapshot} here, with --qemu)", host.map_or("a QEMU whose release it does not report".to_string(), |h| format!("QEMU {h}")))]
    Qemu {
        snapshot: QemuRelease,
        host: Option<QemuRelease>,
    },
    #[error("it was taken under {}, which this host does not have", snapshot.as_str())]
    Accel { snapshot: Accel },
    #[error("it was taken with CPU model {snapshot:?}; this host's machines get {host:?} (see --cpu-model)")]
    CpuModel { snapshot: String, host: String },
    #[error("its kernel or initrd is not named by a well-formed hash")]
    BootFiles,
    #[error("it was taken with device model {model:?}, which this platform does not build")]
    DeviceModel { model: String },
    #[error("it predates machine descriptions and was taken on image {taken_on}, whose kernel this host no longer has (its image is {here}); restore it on a host that still has that image")]
    Image { taken_on: String, here: String },
}

/// A manifest's `machine` as written before descriptions existed (manifest versions 1 and 2):
/// the machine's size, accelerator and image, nothing about QEMU or the boot files.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct LegacyMachine {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub accel: Accel,
    pub image_id: String,
    /// "microvm-1": the only device line there was.
    #[serde(default)]
    pub device_model: Option<String>,
}

/// A manifest's `machine`, of either age.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Described {
    Current(MachineDescription),
    /// Written before descriptions existed: restorable on the QEMU and image it was taken on,
    /// which nothing recorded; see [`LegacyMachine::check`].
    Legacy(LegacyMachine),
}

impl Described {
    /// Reads a manifest's `machine` value: a description if it has a `format`, otherwise the
    /// older object.
    pub fn parse(value: &serde_json::Value) -> Result<Described, Unreadable> {
        let legacy = value.get("format").is_none();
        let read = match legacy {
            false => serde_json::from_value(value.clone()).map(Described::Current),
            true => serde_json::from_value(value.clone()).map(Described::Legacy),
        };
        read.map_err(|source| Unreadable { legacy, source })
    }

    pub fn vcpus(&self) -> u32 {
        match self {
            Described::Current(d) => d.vcpus,
            Described::Legacy(l) => l.vcpus,
        }
    }

    pub fn memory_mib(&self) -> u64 {
        match self {
            Described::Current(d) => d.memory_mib,
            Described::Legacy(l) => l.memory_mib,
        }
    }
}

impl LegacyMachine {
    /// A snapshot from before machine descriptions restores only with the image it was booted
    /// from still on this host (its kernel is that image's), under the accelerator it ran on,
    /// with the one device line there was. Its QEMU release was not recorded.
    pub fn check(&self, host: &HostMachine, image_id: &str) -> Result<(), Mismatch> {
        if let Some(model) = &self.device_model {
            if model != "microvm-1" {
                return Err(Mismatch::DeviceModel { model: model.clone() });
            }
        }
        if self.accel == Accel::Kvm && !host.kvm {
            return Err(Mismatch::Accel { snapshot: Accel::Kvm });
        }
        if self.image_id != image_id {
            return Err(Mismatch::Image {
                taken_on: self.image_id.clone(),
                here: image_id.to_string(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn description() -> MachineDescription {
        MachineDescription {
            format: FORMAT,
            qemu: QemuRelease { major: 10, minor: 0 },
            machine_type: MACHINE_TYPE.into(),
            accel: Accel::Tcg,
            cpu_model: "max".into(),
            vcpus: 1,
            memory_mib: 512,
            device_line: DEVICE_LINE,
            tsc_khz: Some(2_000_000),
            image_id: "abc".into(),
            kernel: BootFile {
                blake3: "a".repeat(64),
                bytes: 10,
            },
            initrd: BootFile {
                blake3: "b".repeat(64),
                bytes: 20,
            },
        }
    }

    fn host(major: u32, minor: u32) -> HostMachine {
        HostMachine::tcg(QemuRelease { major, minor })
    }

    #[test]
    fn a_description_loads_only_where_qemu_machine_accel_cpu_and_devices_match() {
        let d = description();
        assert_eq!(d.check(&host(10, 0)), Ok(()));
        let e = d.check(&host(7, 2)).unwrap_err();
        assert_eq!(
            e,
            Mismatch::Qemu {
                snapshot: QemuRelease { major: 10, minor: 0 },
                host: Some(QemuRelease { major: 7, minor: 2 })
            }
        );
        assert!(
            e.to_string().contains("taken on QEMU 10.0; this host runs QEMU 7.2"),
            "{e}"
        );
        let unknown = HostMachine {
            qemu: None,
            ..host(10, 0)
        };
        assert!(d.check(&unknown).unwrap_err().to_string().contains("does not report"));

        let kvm = MachineDescription {
            accel: Accel::Kvm,
            cpu_model: "Skylake-Server".into(),
            ..description()
        };
        assert_eq!(kvm.check(&host(10, 0)), Err(Mismatch::Accel { snapshot: Accel::Kvm }));
        let kvm_host = HostMachine {
            kvm: true,
            kvm_cpu_model: "EPYC".into(),
            ..host(10, 0)
        };
        assert!(kvm
            .check(&kvm_host)
            .unwrap_err()
            .to_string()
            .contains("CPU model \"Skylake-Server\""));
        let same_cpu = HostMachine {
            kvm_cpu_model: "Skylake-Server".into(),
            ..kvm_host
        };
        assert_eq!(kvm.check(&same_cpu), Ok(()));

        let newer = MachineDescription {
            format: FORMAT + 1,
            ..description()
        };
        assert!(matches!(newer.check(&host(10, 0)), Err(Mismatch::Format { .. })));
        let devices = MachineDescription {
            device_line: DEVICE_LINE + 1,
            ..description()
        };
        assert!(devices
            .check(&host(10, 0))
            .unwrap_err()
            .to_string()
            .contains("device line"));
        let pc = MachineDescription {
            machine_type: "pc-q35-7.2".into(),
            ..description()
        };
        assert!(matches!(pc.check(&host(10, 0)), Err(Mismatch::MachineType { .. })));
        let bad_hash = MachineDescription {
            kernel: BootFile {
                blake3: "../../etc/shadow".into(),
                bytes: 1,
            },
            ..description()
        };
        assert_eq!(bad_hash.check(&host(10, 0)), Err(Mismatch::BootFiles));
    }

    #[test]
    fn both_ages_of_machine_record_read() {
        let current = serde_json::to_value(description()).unwrap();
        assert_eq!(Described::parse(&current).unwrap(), Described::Current(description()));
        let legacy = serde_json::json!({"vcpus": 1, "memory_mib": 256, "accel": "tcg", "image_id": "img1",
            "size": "xs", "computer_name": "dev", "device_model": "microvm-1"});
        let Ok(Described::Legacy(l)) = Described::parse(&legacy) else {
            panic!("a legacy record reads")
        };
        assert_eq!((l.vcpus, l.memory_mib), (1, 256));
        assert_eq!(l.check(&host(10, 0), "img1"), Ok(()));
        assert!(l
            .check(&host(10, 0), "img2")
            .unwrap_err()
            .to_string()
            .contains("taken on image img1"));
        assert!(!Described::parse(&serde_json::json!({"format": 1})).unwrap_err().legacy);
        let old = Described::parse(&serde_json::json!({"vcpus": 1})).unwrap_err();
        assert!(old.legacy && old.to_string().starts_with("its machine record does not read"));
    }

    #[test]
    fn boot_files_are_named_by_their_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        std::fs::write(&path, b"kernel").unwrap();
        let f = BootFile::of(&path).unwrap();
        assert_eq!(f.bytes, 6);
        assert_eq!(f.blake3, blake3::hash(b"kernel").to_hex().to_string());
        assert!(f.is_well_formed());
    }
}
