//! VM specifications, the QEMU command line built from them, and a
//! supervised QEMU process with its QMP connection.
//!
//! - [`VmSpec`] describes a VM (serde, TOML-friendly) and validates itself.
//! - [`QemuLaunch`] adds the host side (accelerator, RAM file, run dir) and
//!   renders the `qemu-system-x86_64` argument vector.
//! - [`QemuProcess`] starts QEMU, connects QMP, and supervises the process;
//!   [`QemuProcess::adopt`] re-attaches to a QEMU left running by a previous
//!   agent.
//! - [`qemu_version`] and [`machine_types`] probe a QEMU binary.

mod error;
mod launch;
mod probe;
mod process;
mod spec;

pub use error::QemuError;
pub use ferry_qmp::{QemuVersion, QmpClient};
pub use launch::{qemu_escape, valid_trace_pattern, QemuLaunch};
pub use probe::{machine_types, qemu_version};
pub use process::{QemuExit, QemuProcess, DEFAULT_QMP_TIMEOUT};
pub use spec::{
    DiskBus, DiskFormat, DiskSpec, NicBackend, NicSpec, SpecError, VmSpec, DEFAULT_CPU_MODEL,
    DEFAULT_MACHINE, MAX_MEMORY_MIB, MAX_VCPUS, MIN_MEMORY_MIB,
};
