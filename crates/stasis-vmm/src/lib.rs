//! The host's VM runtime. One QEMU process per computer ([`vm::Vm`]), driven over QMP
//! ([`qmp::Qmp`]), with the guest agent reached over virtio-serial ([`agent::AgentClient`]).

pub mod accel;
pub mod agent;
pub mod cpu;
pub mod description;
pub mod host;
pub mod jail;
pub mod process;
pub mod qmp;
pub mod snapshot;
pub mod vm;

pub use accel::Accel;
pub use host::{Host, HostEvent};
pub use vm::{MachineConfig, Vm, VmError, VmPaths};
