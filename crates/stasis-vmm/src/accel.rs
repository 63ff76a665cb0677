//! Choosing the accelerator: KVM only where `/dev/kvm` opens and the CPU really has hardware
//! virtualization (`vmx`/`svm`). Some hosts expose a `/dev/kvm` (PVM) that cannot run ordinary
//! guests; those get TCG.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

/// An accelerator setting that is not `auto`, `kvm` or `tcg`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown accelerator {0:?}: use auto, kvm or tcg")]
pub struct UnknownAccel(pub String);

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }

    /// `auto`, `kvm` or `tcg`.
    pub fn choose(setting: &str) -> Result<Accel, UnknownAccel> {
        match setting {
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            "auto" | "" => Ok(Self::detect()),
            other => Err(UnknownAccel(other.to_string())),
        }
    }

    pub fn detect() -> Accel {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let kvm_opens = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        if kvm_opens && has_hw_virt(&cpuinfo) {
            Accel::Kvm
        } else {
            Accel::Tcg
        }
    }
}

fn has_hw_virt(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

/// The host's TSC frequency in kHz, passed to the guest as `tsc_early_khz` (without it the
/// guest sometimes hangs calibrating the TSC under TCG).
pub fn host_tsc_khz() -> Option<u64> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1000.0).round() as u64)
}

/// The version (major, minor) of a QEMU binary, from `--version`; asked once per binary per
/// process.
pub fn qemu_version(binary: &std::path::Path) -> Option<(u32, u32)> {
    type Seen = Vec<(std::path::PathBuf, Option<(u32, u32)>)>;
    static SEEN: std::sync::Mutex<Seen> = std::sync::Mutex::new(Vec::new());
    let mut seen = SEEN.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, v)) = seen.iter().find(|(b, _)| b == binary) {
        return *v;
    }
    let v = std::process::Command::new(binary)
        .arg("--version")
        .output()
        .ok()
        .and_then(|out| parse_qemu_version(&String::from_utf8_lossy(&out.stdout)));
    seen.push((binary.to_path_buf(), v));
    v
}

/// Whether this QEMU can map a RAM file privately without opening it for writing
/// (`memory-backend-file,readonly=on,rom=off`, QEMU 8.2 and later).
pub fn maps_private_ram_read_only(binary: &std::path::Path) -> bool {
    qemu_version(binary).is_some_and(|v| v >= (8, 2))
}

/// Whether this QEMU restarts a guest it found paused once a background snapshot has set up
/// write protection (QEMU 7; later versions restore the run state they found).
pub fn restarts_guest_after_background_setup(binary: &std::path::Path) -> bool {
    qemu_version(binary).is_some_and(|v| v < (8, 0))
}

fn parse_qemu_version(text: &str) -> Option<(u32, u32)> {
    let rest = text.split("version ").nth(1)?;
    let mut parts = rest.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_qemu_version_is_read_from_its_banner() {
        assert_eq!(
            parse_qemu_version("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\n"),
            Some((7, 2))
        );
        assert_eq!(
            parse_qemu_version("QEMU emulator version 10.0.2 (Debian)"),
            Some((10, 0))
        );
        assert_eq!(parse_qemu_version("something else"), None);
    }

    #[test]
    fn hardware_virtualization_is_read_from_the_flags() {
        assert!(has_hw_virt("processor: 0\nflags\t\t: fpu vme vmx sse\n"));
        assert!(has_hw_virt("flags\t: fpu svm\n"));
        assert!(!has_hw_virt("flags\t: fpu vme sse hypervisor\n"));
        assert!(!has_hw_virt("model name: vmx in the name only\n"));
    }

    #[test]
    fn settings_are_validated() {
        assert_eq!(Accel::choose("tcg"), Ok(Accel::Tcg));
        assert_eq!(Accel::choose("kvm"), Ok(Accel::Kvm));
        assert!(Accel::choose("xen").unwrap_err().to_string().contains("xen"));
    }
}
