//! End to end: a restore starts the machine its snapshot was taken on, from the description in
//! its manifest (its own kernel and initrd, whatever image the host has by then), and a host
//! that cannot load that machine refuses the restore with a 409 naming the difference, before
//! any QEMU starts.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{create_key, data_dir, out, restore, running_computer, snapshot, Client, Server, BOOT, SNAP};
use serde_json::Value;

/// The default image, as `stasis image build` reports it (building it if needed).
fn default_image() -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_stasis"))
        .args(["image", "build"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A cache dir of this test's own holding the default image (its kernel and initrd copied,
/// its root disk linked), so the test can change that image's kernel without touching
/// anyone else's. Returns the cache dir's copy of the kernel.
fn private_cache(cache: &Path) -> PathBuf {
    let image = default_image();
    let path = |k: &str| PathBuf::from(image[k].as_str().unwrap());
    let default = path("kernel")
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    // The kernel and rootfs build records (the image is assembled already, so only read).
    for part in ["kernel", "rootfs"] {
        for entry in std::fs::read_dir(default.join(part)).unwrap() {
            let entry = entry.unwrap();
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let to = cache.join(part).join(entry.file_name());
            std::fs::create_dir_all(&to).unwrap();
            for record in ["kernel.json", "rootfs.json"] {
                if entry.path().join(record).exists() {
                    std::fs::copy(entry.path().join(record), to.join(record)).unwrap();
                }
            }
        }
    }
    let id = image["id"].as_str().unwrap();
    let dir = cache.join("images").join(id);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(path("kernel"), dir.join("vmlinuz")).unwrap();
    std::fs::copy(path("initrd"), dir.join("initrd.img")).unwrap();
    std::fs::hard_link(path("rootfs"), dir.join("rootfs.ext4")).unwrap();
    let mut mine = image.clone();
    for (k, file) in [
        ("kernel", "vmlinuz"),
        ("initrd", "initrd.img"),
        ("rootfs", "rootfs.ext4"),
    ] {
        mine[k] = dir.join(file).to_string_lossy().into_owned().into();
    }
    std::fs::write(dir.join("image.json"), serde_json::to_vec_pretty(&mine).unwrap()).unwrap();
    dir.join("vmlinuz")
}

fn machine_json(data: &Path, computer: &str) -> Value {
    serde_json::from_slice(&std::fs::read(data.join("machines").join(computer).join("machine.json")).unwrap()).unwrap()
}

fn qemu_release() -> String {
    let out = Command::new("qemu-system-x86_64").arg("--version").output().unwrap();
    let banner = String::from_utf8_lossy(&out.stdout).into_owned();
    let version = banner.split("version ").nth(1).unwrap();
    let mut parts = version.split(|c: char| !c.is_ascii_digit());
    format!("{}.{}", parts.next().unwrap(), parts.next().unwrap())
}

#[test]
fn a_restore_starts_the_machine_its_snapshot_was_taken_on_or_is_refused_naming_the_difference() {
    let data = data_dir();
    let cache = tempfile::tempdir().unwrap();
    let kernel = private_cache(cache.path());
    let original = std::fs::read(&kernel).unwrap();
    let key = create_key(data.path(), "alice");
    let cache_env = [("STASIS_CACHE_DIR", cache.path().to_str().unwrap())];

    // A snapshot taken on the image as it is.
    let mut server = Server::start_with(data.path(), &cache_env);
    let api = Client::new(&server.base, Some(&key));
    let id = running_computer(&api, "described");
    out(&api, &id, "echo taken-here > /root/marker; sync");
    let snap = snapshot(&api, &id, "before the upgrade");
    let ready = api.wait_snapshot(&id, &snap, "ready", SNAP);
    assert_eq!(ready["status"], "ready");
    server.terminate();

    // The image's kernel changes (an upgrade, a rebuild): what is in the cache now would not
    // even boot. A restore must not care: it starts the snapshot's own kernel, fetched from
    // the store and checked against the hash its manifest records.
    std::fs::write(&kernel, b"not the kernel the snapshot was taken with").unwrap();
    let server = Server::start_with(data.path(), &cache_env);
    let api = Client::new(&server.base, Some(&key));
    let restored = restore(&api, &id, &snap);
    api.wait_status(&restored, "running", BOOT);
    assert_eq!(out(&api, &restored, "cat /root/marker"), "taken-here");
    let hash = blake3::hash(&original).to_hex().to_string();
    let kept = data.path().join("cache/boot").join(&hash);
    let config = machine_json(data.path(), &restored);
    assert_eq!(config["kernel"], kept.to_string_lossy().as_ref(), "{config}");
    assert_eq!(
        std::fs::read(&kept).unwrap(),
        original,
        "the kept kernel is the snapshot's"
    );
    assert_eq!(config["cpu_model"], "max");
    // Cold-booted again (stop, start), it still boots the kernel its disk belongs to.
    let r = api.call("POST", &format!("/computers/{restored}/stop"), None);
    assert_eq!(r.status, 200, "{}", r.body);
    let r = api.call("POST", &format!("/computers/{restored}/start"), None);
    assert_eq!(r.status, 200, "{}", r.body);
    api.wait_status(&restored, "running", BOOT);
    assert_eq!(out(&api, &restored, "cat /root/marker"), "taken-here");
    assert_eq!(
        machine_json(data.path(), &restored)["kernel"],
        kept.to_string_lossy().as_ref()
    );
    drop(server);

    // A host on another QEMU release refuses at once, naming both, and records nothing.
    let wrapper = cache.path().join("qemu-9.9");
    std::fs::write(
        &wrapper,
        "#!/bin/sh\n[ \"$1\" = --version ] && { echo 'QEMU emulator version 9.9.0'; exit 0; }\nexec qemu-system-x86_64 \"$@\"\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let server = Server::start_with(data.path(), &[cache_env[0], ("STASIS_QEMU", wrapper.to_str().unwrap())]);
    let api = Client::new(&server.base, Some(&key));
    let before = api.call("GET", "/computers", None).body["total"].as_u64().unwrap();
    let r = api.call("POST", &format!("/computers/{id}/restore/{snap}"), None);
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(r.body["error"]["code"], "SNAPSHOT_INCOMPATIBLE", "{}", r.body);
    let message = r.body["error"]["message"].as_str().unwrap();
    let release = qemu_release();
    assert!(
        message.contains(&format!("taken on QEMU {release}; this host runs QEMU 9.9")),
        "{message}"
    );
    assert_eq!(
        api.call("GET", "/computers", None).body["total"].as_u64().unwrap(),
        before
    );
    let s = api.call("GET", &format!("/computers/{id}/snapshots/{snap}"), None);
    assert_eq!(
        s.body["data"]["status"], "ready",
        "a refused restore leaves the snapshot as it was"
    );
}
