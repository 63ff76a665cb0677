//! Which CPU model machines get (`-cpu`). A snapshot's device state holds its CPU's features,
//! so it loads only where the same model runs. Under TCG every machine gets `max` (TCG runs
//! it anywhere). Under KVM `host` would tie a snapshot to one exact CPU; by default machines
//! get instead the newest named model of the host's CPU vendor that this host runs with no
//! feature missing (asked of QEMU itself), so snapshots move between hosts of one CPU
//! generation. `--cpu-model host` keeps `-cpu host`; any other name is taken as given, once
//! QEMU says this host runs it.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::accel::Accel;

/// The CPU model every TCG machine gets.
pub const TCG_CPU_MODEL: &str = "max";

/// The CPU model a machine gets under `accel` unless its config names one.
pub fn default_cpu_model(accel: Accel) -> &'static str {
    match accel {
        Accel::Tcg => TCG_CPU_MODEL,
        Accel::Kvm => "host",
    }
}

/// One of QEMU's CPU models, as `query-cpu-definitions` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuModel {
    pub name: String,
    /// Features this host (under the accelerator asked about) cannot give a guest.
    pub unavailable: Vec<String>,
}

impl CpuModel {
    pub fn runnable(&self) -> bool {
        self.unavailable.is_empty()
    }
}

/// Named models, newest family first, per vendor (`vendor_id` in /proc/cpuinfo).
const INTEL: &[&str] = &[
    "GraniteRapids",
    "SapphireRapids",
    "Cooperlake",
    "Icelake-Server",
    "Cascadelake-Server",
    "Skylake-Server",
    "Skylake-Client",
    "Broadwell",
    "Haswell",
    "IvyBridge",
    "SandyBridge",
    "Westmere",
    "Nehalem",
    "Penryn",
    "Conroe",
];
const AMD: &[&str] = &[
    "EPYC-Genoa",
    "EPYC-Milan",
    "EPYC-Rome",
    "EPYC",
    "Opteron_G5",
    "Opteron_G4",
    "Opteron_G3",
    "Opteron_G2",
    "Opteron_G1",
];
/// What every x86-64 host runs.
const FALLBACK: &str = "qemu64";

/// Asks `binary` which CPU models it offers under `accel` on this host, and which features of
/// each this host lacks.
pub fn models(binary: &Path, accel: Accel) -> Result<Vec<CpuModel>, String> {
    let mut child = Command::new(binary)
        .args([
            "-machine",
            "none",
            "-accel",
            accel.as_str(),
            "-nodefaults",
            "-display",
            "none",
        ])
        .args(["-qmp", "stdio"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running {}: {e}", binary.display()))?;
    let mut stdin = child.stdin.take().expect("piped");
    let stdout = child.stdout.take().expect("piped");
    // A QEMU that hangs must not hang the platform's start.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut found = None;
        for line in BufReader::new(stdout).lines().take(64) {
            let Ok(line) = line else { break };
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                if let Some(list) = v.get("return").and_then(|r| r.as_array()) {
                    found = Some(list.clone());
                    break;
                }
            }
        }
        let _ = tx.send(found);
    });
    let _ = stdin.write_all(
        b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"query-cpu-definitions\"}\n{\"execute\":\"quit\"}\n",
    );
    drop(stdin);
    let list = rx.recv_timeout(Duration::from_secs(30));
    let _ = child.kill();
    let output = child.wait_with_output();
    let list = match list {
        Ok(Some(list)) => list,
        _ => {
            let stderr = output
                .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
                .unwrap_or_default();
            return Err(format!(
                "{} did not list its CPU models under {}: {}",
                binary.display(),
                accel.as_str(),
                stderr.trim()
            ));
        }
    };
    Ok(list
        .iter()
        .filter_map(|d| {
            Some(CpuModel {
                name: d.get("name")?.as_str()?.to_string(),
                unavailable: d
                    .get("unavailable-features")
                    .and_then(|u| u.as_array())
                    .map(|u| u.iter().filter_map(|f| f.as_str().map(String::from)).collect())
                    .unwrap_or_default(),
            })
        })
        .collect())
}

/// The newest named model of `vendor`'s families that runs here, at its highest version;
/// `qemu64` if none does.
pub fn newest_runnable(models: &[CpuModel], vendor: &str) -> String {
    let families: &[&str] = match vendor {
        "GenuineIntel" => INTEL,
        "AuthenticAMD" => AMD,
        _ => &[],
    };
    for family in families {
        let best = models
            .iter()
            .filter(|m| m.runnable())
            .filter_map(|m| {
                let rest = m.name.strip_prefix(family)?;
                match rest.strip_prefix("-v") {
                    Some(v) => v.parse::<u32>().ok().map(|v| (v, m)),
                    None if rest.is_empty() => Some((0, m)),
                    None => None,
                }
            })
            .max_by_key(|(v, _)| *v);
        if let Some((_, m)) = best {
            return m.name.clone();
        }
    }
    FALLBACK.into()
}

/// The host CPU's vendor (`GenuineIntel`, `AuthenticAMD`, ...).
pub fn host_vendor() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("vendor_id"))
        .and_then(|l| l.split(':').nth(1))
        .map(|v| v.trim().to_string())
        .unwrap_or_default()
}

/// The CPU model machines get for `setting` (`auto`, `host` or a QEMU model name) under
/// `accel`, checked with QEMU where it matters. None: the accelerator's default (`max` under
/// TCG, `host` under KVM).
pub fn resolve(setting: &str, binary: &Path, accel: Accel) -> Result<Option<String>, String> {
    match (setting, accel) {
        ("auto" | "", Accel::Tcg) => Ok(None),
        ("auto" | "", Accel::Kvm) => {
            let models = models(binary, accel)?;
            Ok(Some(newest_runnable(&models, &host_vendor())))
        }
        ("host", Accel::Kvm) => Ok(None),
        ("host", Accel::Tcg) => Err("--cpu-model host needs KVM; under TCG machines get max".into()),
        (name, _) => {
            let models = models(binary, accel)?;
            match models.iter().find(|m| m.name == name) {
                None => Err(format!(
                    "QEMU has no CPU model {name:?} (see qemu-system-x86_64 -cpu help)"
                )),
                Some(m) if !m.runnable() => Err(format!(
                    "this host cannot run CPU model {name:?} under {}: it lacks {}",
                    accel.as_str(),
                    m.unavailable.join(", ")
                )),
                Some(_) => Ok(Some(name.to_string())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(name: &str, missing: usize) -> CpuModel {
        CpuModel {
            name: name.into(),
            unavailable: (0..missing).map(|i| format!("f{i}")).collect(),
        }
    }

    #[test]
    fn the_newest_runnable_model_of_the_hosts_vendor_is_picked() {
        let models = [
            model("SapphireRapids-v1", 3),
            model("Icelake-Server-v1", 0),
            model("Icelake-Server-v2", 0),
            model("Icelake-Server-v3", 1),
            model("Icelake-Server-noTSX", 0),
            model("Cascadelake-Server-v5", 0),
            model("EPYC-Milan-v1", 0),
            model("EPYC-v4", 0),
            model("qemu64", 0),
        ];
        assert_eq!(newest_runnable(&models, "GenuineIntel"), "Icelake-Server-v2");
        assert_eq!(newest_runnable(&models, "AuthenticAMD"), "EPYC-Milan-v1");
        assert_eq!(newest_runnable(&models, "HygonGenuine"), "qemu64");
        assert_eq!(newest_runnable(&[model("Haswell", 0)], "GenuineIntel"), "Haswell");
        assert_eq!(newest_runnable(&[model("Haswell-v1", 2)], "GenuineIntel"), "qemu64");
    }

    #[test]
    fn qemu_lists_its_models_and_names_are_checked_against_it() {
        // Under TCG (what runs here); the same query answers under KVM.
        let qemu = Path::new("qemu-system-x86_64");
        let models = models(qemu, Accel::Tcg).expect("QEMU lists its CPU models");
        assert!(models.iter().any(|m| m.name == "max" && m.runnable()), "{models:?}");
        assert!(models.iter().any(|m| m.name == "qemu64" && m.runnable()));
        assert_eq!(resolve("auto", qemu, Accel::Tcg), Ok(None));
        assert_eq!(resolve("qemu64", qemu, Accel::Tcg), Ok(Some("qemu64".into())));
        let unknown = resolve("no-such-cpu", qemu, Accel::Tcg).unwrap_err();
        assert!(unknown.contains("no CPU model \"no-such-cpu\""), "{unknown}");
        assert!(resolve("host", qemu, Accel::Tcg).unwrap_err().contains("needs KVM"));
        if let Some(lacking) = models.iter().find(|m| !m.runnable() && m.name.contains("-v")) {
            let e = resolve(&lacking.name, qemu, Accel::Tcg).unwrap_err();
            assert!(
                e.contains("cannot run CPU model") && e.contains(&lacking.unavailable[0]),
                "{e}"
            );
        }
    }
}
