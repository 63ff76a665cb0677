//! Builds the guest agent as a static binary and hands it to this crate to embed, so that the
//! `stasis` binary alone can build a guest image on any host.
//!
//! The agent is compiled by a nested cargo with its own target directory (the outer build holds
//! the lock on the main one) and with `crt-static`, which cannot be set for the host build
//! without breaking proc-macros.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let workspace = manifest.parent().and_then(|p| p.parent()).unwrap().to_path_buf();
    for input in [
        "crates/stasis-agent/src",
        "crates/stasis-agent/Cargo.toml",
        "crates/stasis-agent-proto/src",
        "crates/stasis-agent-proto/Cargo.toml",
        "Cargo.lock",
    ] {
        println!("cargo:rerun-if-changed={}", workspace.join(input).display());
    }
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");

    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"))
        .join("guest-agent");
    let triple = "x86_64-unknown-linux-gnu";
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&workspace)
        .args(["build", "--release", "-p", "stasis-agent", "--target", triple])
        .arg("--target-dir")
        .arg(&target_dir);
    // Nothing of the outer build's flags or wrappers (clippy, coverage) applies to the agent.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        if key.starts_with("CARGO_") && key != "CARGO_HOME"
            || [
                "RUSTFLAGS",
                "RUSTC_WRAPPER",
                "RUSTC_WORKSPACE_WRAPPER",
                "MAKEFLAGS",
                "MFLAGS",
                "RUSTDOCFLAGS",
            ]
            .contains(&key.as_str())
        {
            cmd.env_remove(&key);
        }
    }
    cmd.env("CARGO_ENCODED_RUSTFLAGS", "-Ctarget-feature=+crt-static")
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .env("CARGO_PROFILE_RELEASE_STRIP", "symbols")
        .env("CARGO_PROFILE_RELEASE_OPT_LEVEL", "s");
    let status = cmd.status().expect("running cargo to build the guest agent");
    assert!(status.success(), "building the guest agent failed");

    let built = target_dir.join(triple).join("release").join("stasis-agent");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("stasis-agent");
    // A new file, not an overwrite: a build directory shared through hard links must not
    // change under another checkout's build.
    let _ = std::fs::remove_file(&out);
    std::fs::copy(&built, &out).expect("copying the guest agent");
}
