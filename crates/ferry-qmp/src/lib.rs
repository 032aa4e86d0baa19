//! An async client for QEMU's QMP (QEMU Machine Protocol) over a unix socket.
//!
//! One [`QmpClient`] owns one QMP connection. It is cheap to clone (an `Arc`
//! inside) and any number of tasks may issue commands at once: each command
//! carries a numeric `id`, and a reader task matches replies to callers by it.
//! Asynchronous events (STOP, RESUME, MIGRATION, ...) are fanned out through a
//! [`tokio::sync::broadcast`] channel, see [`QmpClient::subscribe`].
//!
//! Replies are decoded into tolerant structs: every field is optional or
//! defaulted and unknown fields are ignored, because reply shapes differ
//! between QEMU versions (7.2 vs 10.0 dropped and added fields).
//!
//! ```no_run
//! # async fn demo() -> Result<(), ferry_qmp::QmpError> {
//! use std::time::Duration;
//! let qmp = ferry_qmp::QmpClient::connect_retry("/run/vm/qmp.sock", Duration::from_secs(5)).await?;
//! let mut events = qmp.subscribe(); // before the command whose events we want
//! qmp.migrate_set_capabilities(&[("events", true), ("return-path", true)]).await?;
//! qmp.migrate("unix:/run/vm/mig.sock").await?;
//! let ev = ferry_qmp::wait_migration_status(&mut events, Duration::from_secs(60),
//!     &["completed", "failed", "cancelled"]).await?;
//! println!("migration ended: {:?}", ev.migration_status());
//! # Ok(()) }
//! ```

mod block;
mod client;
mod error;
mod events;
mod types;

pub use block::{BlockJobInfo, MirrorCopyMode};
pub use client::{QmpClient, DEFAULT_COMMAND_TIMEOUT};
pub use error::QmpError;
pub use events::{wait_for_event, wait_migration_status, QmpEvent};
pub use types::{AnnounceParams, DirtyRateInfo, MigrationInfo, QemuVersion, RamStats, RunStatus};
