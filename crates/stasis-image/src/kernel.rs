//! The guest kernel: the Debian cloud kernel package, fetched with `apt-get download` and
//! extracted (never installed on the host); only `vmlinuz` and the modules the initramfs loads
//! are kept.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::{io_err, run, ImageError, ImageSpec, Progress, GUEST_MODULES};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Kernel {
    /// `<package>_<version>`, e.g. `linux-image-6.1.0-57-cloud-amd64_6.1.192-3`.
    pub key: String,
    /// `uname -r` inside the guest.
    pub release: String,
    pub vmlinuz: PathBuf,
    /// In load order.
    pub modules: Vec<PathBuf>,
}

/// Asks apt which versioned package the flavour's meta package points at, and its version.
fn resolve(meta: &str) -> Result<(String, String), ImageError> {
    let deps = run(Command::new("apt-cache").args(["depends", "--no-recommends", "--no-suggests", meta]))?;
    let package = deps
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-"))
        .ok_or_else(|| {
            ImageError::Invalid(format!(
                "apt does not know {meta}; run `apt-get update` (the guest kernel comes from Debian's archive)"
            ))
        })?
        .to_string();
    let show = run(Command::new("apt-cache").args(["show", "--no-all-versions", &package]))?;
    let version = show
        .lines()
        .find_map(|l| l.strip_prefix("Version:"))
        .map(|v| v.trim().to_string())
        .ok_or_else(|| ImageError::Invalid(format!("apt shows no version of {package}")))?;
    Ok((package, version))
}

pub fn ensure(cache: &Path, spec: &ImageSpec, progress: &dyn Progress) -> Result<Kernel, ImageError> {
    let (package, version) = resolve(&spec.kernel_package)?;
    let key = format!("{package}_{version}");
    let dir = cache.join("kernel").join(&key);
    if let Ok(bytes) = std::fs::read(dir.join("kernel.json")) {
        if let Ok(k) = serde_json::from_slice::<Kernel>(&bytes) {
            // Kept only if it holds the modules the guest loads now (the list grows with the
            // devices machines get).
            let names: Vec<String> = k
                .modules
                .iter()
                .filter_map(|m| m.file_name().map(|f| f.to_string_lossy().into_owned()))
                .collect();
            let wanted: Vec<String> = GUEST_MODULES.iter().map(|m| format!("{m}.ko")).collect();
            if names == wanted {
                return Ok(k);
            }
        }
    }

    progress.step(&format!("downloading kernel {key}"));
    let tmp = cache.join("kernel").join(format!(".{key}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io_err("creating the kernel directory"))?;
    // apt, run as root, drops privileges to _apt for downloads: the directory is handed to
    // that user alone (never opened to everyone), or, where there is no such user, apt is
    // told to stay root.
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o700));
    let mut download = Command::new("apt-get");
    download
        .args(["download", "-q", &format!("{package}={version}")])
        .current_dir(&tmp);
    if is_root() {
        match system_user("_apt") {
            Some(uid) => std::os::unix::fs::chown(&tmp, Some(uid), None)
                .map_err(io_err("handing the download directory to _apt"))?,
            None => {
                download.args(["-o", "APT::Sandbox::User=root"]);
            }
        }
    }
    run(&mut download)?;
    let deb = std::fs::read_dir(&tmp)
        .map_err(io_err("listing the download"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .ok_or_else(|| ImageError::Invalid(format!("apt-get download {package} produced no .deb")))?;
    let extracted = tmp.join("x");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&extracted))?;

    let modules_root = extracted.join("lib/modules");
    let release = std::fs::read_dir(&modules_root)
        .map_err(io_err("reading lib/modules of the kernel package"))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .ok_or_else(|| ImageError::Invalid("the kernel package has no lib/modules".into()))?;

    let out = tmp.join("out");
    std::fs::create_dir_all(out.join("modules")).map_err(io_err("creating modules/"))?;
    std::fs::copy(extracted.join(format!("boot/vmlinuz-{release}")), out.join("vmlinuz"))
        .map_err(io_err("copying vmlinuz out of the package"))?;
    let all = find_files(&modules_root.join(&release).join("kernel"));
    let mut modules = Vec::new();
    for name in GUEST_MODULES {
        let file = format!("{name}.ko");
        let src = all
            .iter()
            .find(|p| p.file_name().is_some_and(|f| f.to_string_lossy() == file))
            .ok_or_else(|| ImageError::Invalid(format!("module {file} is not in {package}")))?;
        std::fs::copy(src, out.join("modules").join(&file)).map_err(io_err(format!("copying {file}")))?;
        modules.push(dir.join("modules").join(&file));
    }
    let kernel = Kernel {
        key: key.clone(),
        release,
        vmlinuz: dir.join("vmlinuz"),
        modules,
    };
    std::fs::write(out.join("kernel.json"), serde_json::to_vec_pretty(&kernel).unwrap())
        .map_err(io_err("writing kernel.json"))?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&out, &dir).map_err(io_err("publishing the kernel"))?;
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(kernel)
}

fn find_files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            match entry.file_type() {
                Ok(t) if t.is_dir() => stack.push(path),
                Ok(_) => out.push(path),
                Err(_) => {}
            }
        }
    }
    out
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// The uid of a system user, from /etc/passwd.
fn system_user(name: &str) -> Option<u32> {
    std::fs::read_to_string("/etc/passwd").ok()?.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == name).then(|| f.nth(1)?.parse().ok())?
    })
}
