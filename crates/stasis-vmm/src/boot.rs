//! The boot path: a fresh QEMU from the machine's image, on its disk overlay (made when it
//! has none yet).

use std::time::{Duration, Instant};

use crate::agent::AgentError;
use crate::vm::{
    check_socket_paths, create_overlay, log_suffix, place_disk, spawn_qemu_off_runtime, write_config, Launch,
    MachineConfig, Vm, VmError, VmPaths,
};

/// How long a cold boot may take before it is declared failed. TCG boots take ~4 s alone and
/// several boots share two cores in the tests.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

impl Vm {
    /// The boot path: a new QEMU from the image, on the machine's overlay (created if missing,
    /// so a stopped computer boots again with its disk as it left it).
    pub async fn boot(config: MachineConfig, paths: VmPaths) -> Result<Vm, VmError> {
        paths.create()?;
        check_socket_paths(&paths)?;
        if !config.ram_path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&config.ram_path);
        }
        if !paths.holds_disk(&config.disk) {
            let tmp = paths.control.join("overlay.tmp.qcow2");
            let _ = std::fs::remove_file(&tmp);
            create_overlay(&config.base_disk, &tmp).await?;
            place_disk(&tmp, &paths, &config.disk)?;
        }
        write_config(&paths, &config)?;

        let process = spawn_qemu_off_runtime(&config, &paths, Launch::default()).await?;
        let started = Instant::now();
        let vm = Self::connect(config, paths, process, BOOT_TIMEOUT).await?;
        let remaining = BOOT_TIMEOUT.saturating_sub(started.elapsed());
        vm.until_exit("while booting", async {
            vm.agent().wait_ready(remaining).await.map_err(|e| match e {
                AgentError::Timeout(d) => VmError::BootTimeout(d, vm.console_tail_suffix()),
                other => other.into(),
            })
        })
        .await?;
        Ok(vm)
    }

    fn console_tail_suffix(&self) -> String {
        log_suffix(&self.paths)
    }
}
