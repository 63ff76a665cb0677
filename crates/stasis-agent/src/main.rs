//! The guest agent: the first process of every computer.
//!
//! The same static binary plays two parts. As `/init` of the initramfs it loads the virtio
//! modules, mounts the root disk and switches to it. As `/sbin/init` of the root disk it mounts
//! the usual file systems, reaps orphans, and serves the host's requests on a virtio-serial port.
//! Run by hand (not as PID 1) with `--stdio` it serves stdin/stdout, which is how the tests drive
//! it on the host.

mod boot;
mod connections;
mod exec;
mod fs;
mod hooks;
mod identity;
mod net;
mod reaper;
mod serve;
mod sessions;

use std::path::PathBuf;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let pid1 = std::process::id() == 1;

    if pid1 && std::path::Path::new(boot::INITRAMFS_MARKER).exists() {
        // Never returns on success: it execs the root disk's init.
        let err = boot::initramfs_stage();
        fatal(&format!("initramfs: {err}"));
    }

    if pid1 {
        if let Err(e) = boot::root_stage() {
            log(&format!("setting up the root file system: {e}"));
        }
        reaper::start();
        let port = match boot::find_port(stasis_agent_proto::PORT_NAME) {
            Ok(p) => p,
            Err(e) => fatal(&format!("agent port: {e}")),
        };
        // The console is the computer's log (`GET /computers/{id}/logs`): say it is up.
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let uptime = std::fs::read_to_string("/proc/uptime").unwrap_or_default();
        log(&format!(
            "booted: kernel {}, up {} s; serving the host (protocol {}) on {}",
            kernel.trim(),
            uptime.split_whitespace().next().unwrap_or("?"),
            stasis_agent_proto::PROTOCOL_VERSION,
            port.display()
        ));
        serve::serve_port(&port);
        fatal("agent port closed");
    }

    // Not PID 1: serve a given port, or stdin/stdout (development and tests on the host).
    reaper::start();
    match args.iter().position(|a| a == "--port") {
        Some(i) if i + 1 < args.len() => serve::serve_port(&PathBuf::from(&args[i + 1])),
        _ if args.iter().any(|a| a == "--stdio") => serve::serve_stdio(),
        _ => {
            eprintln!("usage: stasis-agent --stdio | --port PATH   (as PID 1 it finds its port itself)");
            std::process::exit(2);
        }
    }
}

pub(crate) fn log(msg: &str) {
    eprintln!("stasis-agent: {msg}");
}

/// PID 1 must never exit (the kernel would panic); power off instead so the host sees the
/// machine end and can report why from the console log.
pub(crate) fn fatal(msg: &str) -> ! {
    log(msg);
    if std::process::id() == 1 {
        // SAFETY: sync and reboot take no pointers; powering off is the intended outcome.
        unsafe {
            libc::sync();
            libc::reboot(libc::RB_POWER_OFF);
        }
        loop {
            std::thread::sleep(std::time::Duration::from_secs(60));
        }
    }
    std::process::exit(1);
}
