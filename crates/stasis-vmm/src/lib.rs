//! The host's VM runtime. One QEMU process per computer ([`vm::Vm`]), driven over QMP
//! ([`qmp::Qmp`]), with the guest agent reached over virtio-serial ([`agent::AgentClient`]).

pub mod accel;
pub mod agent;
mod boot;
pub mod changes;
pub mod console;
pub mod cpu;
pub mod description;
pub mod dns;
pub mod host;
pub mod jail;
pub mod network;
pub mod process;
pub mod qmp;
mod restore;
pub mod snapshot;
mod untrusted;
pub mod vm;

pub use accel::Accel;
pub use boot::BOOT_TIMEOUT;
pub use host::{GuestPort, Host, HostEvent};
pub use restore::RestoreTimings;
pub use vm::{MachineConfig, Vm, VmError, VmPaths};
