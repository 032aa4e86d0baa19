//! Helpers for ferry's integration tests and demo.
//!
//! * [`guest`]: the test guest's boot files ([`guest_artifacts`]) and the kernel command
//!   line of its workload ([`workload_cmdline`]).
//! * [`console`]: the workload's line protocol on the serial console ([`GuestConsole`],
//!   [`wait_for_log_line`], reply parsers).
//! * [`agent`]: real `ferryd` processes for tests ([`TestAgent`], [`TestPki`]).
//! * [`metrics`]: an agent's Prometheus endpoint read as Prometheus does ([`scrape_metrics`]).
//! * [`tmpfs`]: a tmpfs of a chosen size mounted for a test ([`Tmpfs`]), and what a file
//!   holds of it ([`allocated_bytes`]).
//!
//! The console and agent helpers are async (tokio), to sit beside tonic clients in
//! `#[tokio::test]`s.

#![warn(missing_docs)]

pub mod agent;
pub mod console;
pub mod guest;
pub mod metrics;
pub mod tmpfs;

pub use agent::{
    connect_control, watch_to_end, QemuObserved, TestAgent, TestPki, AGENT_START_TIMEOUT,
    TEST_OPERATOR,
};
pub use console::{
    parse_check, parse_digest, parse_heartbeat, parse_pong, parse_ready, reply_prefix_for,
    wait_for_log_line, CheckResult, GuestConsole, Ready,
};
pub use guest::{
    find_workspace_root, guest_artifacts, repo_root, workload_cmdline, GuestArtifacts,
};
pub use metrics::{metric_sum, scrape_metrics};
pub use tmpfs::{allocated_bytes, Tmpfs};
