//! Boots a real guest from the default image and drives its agent.

use std::time::{Duration, Instant};

use stasis_agent_proto::ExecRequest;
use stasis_vmm::{Accel, MachineConfig, Vm, VmPaths};

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

fn paths(dir: &std::path::Path) -> VmPaths {
    VmPaths::new(dir.join("control"), dir.join("disks"))
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
async fn boots_runs_commands_and_keeps_its_disk_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = machine(dir.path(), "boot-test", 256);
    let t = Instant::now();
    let vm = Vm::boot(config.clone(), paths(dir.path()))
        .await
        .expect("the guest boots");
    eprintln!("boot to agent ready: {:?}", t.elapsed());

    let r = vm
        .exec(bash("uname -r; python3 -c 'print(6*7)'; hostname", 10_000))
        .await
        .unwrap();
    assert_eq!(r.exit_code, 0, "{r:?}");
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert!(
        lines[0].ends_with("-cloud-amd64"),
        "guest kernel, not the host's: {lines:?}"
    );
    assert_eq!(lines[1], "42");
    assert_eq!(lines[2], "boot-test");

    let t = Instant::now();
    let r = vm.exec(bash("sleep 30", 1_000)).await.unwrap();
    assert_eq!(r.exit_code, 124);
    assert!(r.timed_out);
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "timeout honoured: {:?}",
        t.elapsed()
    );
    let r = vm
        .exec(bash("echo still here > /root/mark; echo ok", 5_000))
        .await
        .unwrap();
    assert_eq!(r.stdout, "ok\n");

    vm.shutdown().await;
    assert!(vm.exited().is_some());
    assert!(!vm.config().ram_path.exists(), "the RAM file goes with the machine");

    let vm = Vm::boot(config, paths(dir.path()))
        .await
        .expect("boots again on the same disk");
    let r = vm.exec(bash("cat /root/mark", 5_000)).await.unwrap();
    assert_eq!(r.stdout, "still here\n", "the disk survived the stop");
    vm.shutdown().await;
}

#[tokio::test]
async fn a_killed_qemu_is_reported_with_its_signal() {
    let dir = tempfile::tempdir().unwrap();
    let vm = Vm::boot(machine(dir.path(), "kill-test", 256), paths(dir.path()))
        .await
        .expect("the guest boots");
    let _ = rustix::process::kill_process(
        stasis_vmm::process::pid_of(vm.pid()).expect("a live pid"),
        rustix::process::Signal::KILL,
    );
    let err = vm.exec(bash("sleep 5", 10_000)).await.unwrap_err();
    assert!(err.to_string().contains("SIGKILL"), "{err}");
}
