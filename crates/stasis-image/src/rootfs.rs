//! The root disk's tree: `debootstrap --variant=minbase` of the suite plus the image's packages,
//! trimmed of documentation and package caches.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::{io_err, ImageError, ImageSpec, Progress, RECIPE_VERSION};

pub struct Rootfs {
    pub key: String,
    pub tree: PathBuf,
}

pub fn ensure(cache: &Path, spec: &ImageSpec, progress: &dyn Progress) -> Result<Rootfs, ImageError> {
    let input = serde_json::json!({
        "recipe": RECIPE_VERSION,
        "suite": spec.suite,
        "mirror": spec.mirror,
        "packages": spec.packages,
    });
    let key = blake3::hash(input.to_string().as_bytes()).to_hex()[..16].to_string();
    let dir = cache.join("rootfs").join(&key);
    let tree = dir.join("tree");
    if dir.join("rootfs.json").exists() {
        return Ok(Rootfs { key, tree });
    }
    if !rustix::process::geteuid().is_root() {
        return Err(ImageError::Invalid(
            "building the guest root file system runs debootstrap, which needs root".into(),
        ));
    }

    progress.step(&format!("debootstrap {} ({})", spec.suite, spec.packages.join(", ")));
    let tmp = cache.join("rootfs").join(format!(".{key}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io_err("creating the rootfs directory"))?;
    let mut child = crate::spawn(
        Command::new("debootstrap")
            .arg("--variant=minbase")
            .arg(format!("--include={}", spec.packages.join(",")))
            .arg(&spec.suite)
            .arg(tmp.join("tree"))
            .arg(&spec.mirror)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )
    .map_err(io_err("starting debootstrap (apt-get install debootstrap)"))?;
    let stderr = child.stderr.take().unwrap();
    let stderr_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut s);
        s
    });
    for line in BufReader::new(child.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok)
    {
        if let Some(msg) = line.strip_prefix("I: ") {
            progress.step(&format!("debootstrap: {msg}"));
        }
    }
    let status = child.wait().map_err(io_err("waiting for debootstrap"))?;
    let stderr = stderr_reader.join().unwrap_or_default();
    if !status.success() {
        let log = std::fs::read_to_string(tmp.join("tree/debootstrap/debootstrap.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(10).collect();
        return Err(ImageError::Command {
            command: "debootstrap".into(),
            status: status.to_string(),
            stderr: format!("{stderr}\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n")),
        });
    }

    let t = tmp.join("tree");
    for junk in [
        "usr/share/doc",
        "usr/share/man",
        "usr/share/info",
        "usr/share/locale",
        "var/cache/apt",
        "var/lib/apt/lists",
    ] {
        let p = t.join(junk);
        let _ = std::fs::remove_dir_all(&p);
        let _ = std::fs::create_dir_all(&p);
    }
    let files: [(&str, &str); 3] = [
        ("etc/hostname", "stasis\n"),
        ("etc/hosts", "127.0.0.1\tlocalhost\n::1\tlocalhost\n127.0.1.1\tstasis\n"),
        ("etc/fstab", "# mounts are made by the stasis agent (PID 1)\n"),
    ];
    for (path, content) in files {
        std::fs::write(t.join(path), content).map_err(io_err(format!("writing {path}")))?;
    }
    std::fs::write(tmp.join("rootfs.json"), input.to_string()).map_err(io_err("writing rootfs.json"))?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir).map_err(io_err("publishing the rootfs"))?;
    Ok(Rootfs { key, tree })
}

/// Puts the agent in the tree as `/sbin/stasis-agent` with `/sbin/init` pointing at it.
pub fn install_agent(tree: &Path, agent: &[u8]) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    let sbin = tree.join("sbin");
    let bin = sbin.join("stasis-agent");
    let _ = std::fs::remove_file(&bin);
    std::fs::write(&bin, agent).map_err(io_err("writing the agent into the tree"))?;
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).map_err(io_err("chmod agent"))?;
    let init = sbin.join("init");
    let _ = std::fs::remove_file(&init);
    std::os::unix::fs::symlink("stasis-agent", &init).map_err(io_err("linking /sbin/init"))?;
    Ok(())
}
