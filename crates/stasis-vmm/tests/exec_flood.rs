//! A guest command that floods both output streams with control bytes: the worst case for the
//! JSON encoding of an exec reply (six bytes per input byte).

use std::time::{Duration, Instant};

use stasis_agent_proto::ExecRequest;
use stasis_vmm::{Accel, MachineConfig, Vm, VmPaths};

/// How long QEMU is watched, after the flood, for dying late.
const STAYS_UP_FOR: Duration = Duration::from_secs(2);

fn machine(dir: &std::path::Path, name: &str, memory_mib: u64) -> MachineConfig {
    let progress = |m: &str| eprintln!("image: {m}");
    let image = stasis_image::ensure(&stasis_image::default_cache_dir(), &Default::default(), &progress)
        .expect("the default image builds");
    MachineConfig {
        name: name.into(),
        vcpus: 1,
        memory_mib,
        accel: Accel::detect(),
        qemu_binary: "qemu-system-x86_64".into(),
        image_id: image.id,
        kernel: image.kernel,
        initrd: image.initrd,
        base_disk: image.rootfs,
        disk: dir.join("disks/disk.qcow2"),
        ram_path: dir.join("ram"),
        ram_shared: true,
        tsc_khz: stasis_vmm::accel::host_tsc_khz(),
        jail: None,
        disk_limits: Some(stasis_vmm::vm::DiskLimits::DEFAULT),
        cpu_model: None,
        device_line: stasis_vmm::description::DEVICE_LINE,
        nic: None,
    }
}

fn bash(cmd: &str, timeout_ms: u64) -> ExecRequest {
    ExecRequest {
        program: "/bin/bash".into(),
        args: vec!["-c".into(), cmd.into()],
        env: vec![],
        cwd: None,
        stdin: None,
        timeout_ms,
    }
}

#[tokio::test]
async fn control_byte_output_on_the_smallest_machine_is_truncated_and_the_machine_survives() {
    let dir = tempfile::tempdir().unwrap();
    let vm = Vm::boot(
        machine(dir.path(), "flood-test", 256),
        VmPaths::new(dir.path().join("control"), dir.path().join("disks")),
    )
    .await
    .expect("the guest boots");
    let free = vm.exec(bash("free -m", 10_000)).await.unwrap();
    eprintln!("guest memory before:\n{}", free.stdout);
    let t = Instant::now();
    let r = vm
        .exec(bash(
            "head -c 8M /dev/zero | tr '\\0' '\\1'; head -c 8M /dev/zero | tr '\\0' '\\1' >&2",
            60_000,
        ))
        .await;
    eprintln!("flood exec after {:?}: exited={:?}", t.elapsed(), vm.exited());
    eprintln!("console: {}", vm.console_tail(30));
    let r = r.expect("the flood exec answers");
    assert!(r.truncated, "control bytes past the frame budget are cut");
    assert_eq!(r.exit_code, 0);
    assert!(r.stdout.bytes().all(|b| b == 1) && !r.stdout.is_empty());
    // Still alive and answering afterwards: QEMU is watched for a while (an observation window
    // for something that must not happen, not synchronisation), then the agent asked.
    tokio::time::sleep(STAYS_UP_FOR).await;
    assert!(vm.exited().is_none(), "QEMU still runs: {:?}", vm.exited());
    let r = vm
        .exec(bash("echo ok; grep -E 'VmHWM|VmRSS' /proc/1/status", 10_000))
        .await
        .unwrap();
    eprintln!("the agent afterwards:\n{}", r.stdout);
    assert!(r.stdout.starts_with("ok\n"), "{r:?}");
    // The agent (PID 1) built a ~33 MiB reply; before the fix it needed more than the guest had.
    let hwm_kib: u64 = r
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM of PID 1");
    assert!(hwm_kib < 128 * 1024, "the agent peaked at {hwm_kib} KiB");
    vm.shutdown().await;
}
