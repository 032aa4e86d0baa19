//! ferryd, the per-host agent: runs VMs as supervised QEMU processes, serves the gRPC
//! control and peer APIs, and migrates VMs to and from other agents over QUIC.
//!
//! Layout: [`config`] (TOML), [`journal`] (redb), [`vms`] (VM registry and supervisor),
//! [`migration`] (the state machine, both sides), [`service`] (gRPC), [`server`]
//! (start-up and wiring).

pub mod access;
pub mod admission;
pub mod config;
pub mod convert;
pub mod cpuid;
pub mod failpoint;
pub mod journal;
pub mod metrics;
pub mod migration;
pub mod preflight;
pub mod server;
pub mod service;
pub mod throttle;
pub mod tls;
pub mod tracker_claims;
pub mod vms;

use std::sync::Arc;

/// Runs `work` as a task of its own and waits for its result. A gRPC handler's future is
/// dropped when its caller's connection goes; work that must not stop halfway (a VM half
/// started, a Prepare with the name reserved and nothing to release it, a commit
/// journaled but never resumed) goes through this. `what` names it in the error should
/// the task panic.
pub async fn to_completion<T: Send + 'static>(
    what: &str,
    work: impl std::future::Future<Output = Result<T, tonic::Status>> + Send + 'static,
) -> Result<T, tonic::Status> {
    tokio::spawn(work)
        .await
        .map_err(|e| tonic::Status::internal(format!("{what}: {e}")))?
}

/// Everything a request handler or a migration task needs from its agent.
pub struct AgentCtx {
    /// Who may call what (roles from certificates, the deny list).
    pub access: Arc<access::Access>,
    pub cfg: Arc<config::AgentConfig>,
    pub identity: ferry_transport::pki::Identity,
    pub journal: Arc<journal::Journal>,
    pub vms: Arc<vms::VmManager>,
    pub outgoing: Arc<migration::Outgoing>,
    pub incoming: Arc<migration::target::IncomingRegistry>,
    pub quic: ferry_transport::QuicEndpoint,
    /// The dirty tracker that passed its self-test at start-up, or why none did.
    pub tracker: Result<ferry_memory::TrackerKind, String>,
    /// This host's QEMU version, e.g. "10.0.2".
    pub qemu_version: String,
    /// Machine types this host's QEMU offers.
    pub machine_types: Vec<String>,
    pub metrics: Arc<metrics::Metrics>,
    /// Where disk images may live on this host.
    pub storage: Arc<ferry_disk::StorageRoots>,
    /// The source QEMU's device-state save as this host's switchovers measured it: the
    /// pause the next predictions assume.
    pub device_save: Arc<preflight::DeviceSaveHistory>,
    /// The pause from Commit sent to the target's resume, per target, as measured.
    pub commit_tail: Arc<preflight::CommitTailHistory>,
    /// What the data plane's paths to peers carried lately (careful resume).
    pub paths: Arc<ferry_transport::resume::PathMemory>,
    /// The codec `auto` ended round 0 with, per target (the next migration starts there).
    pub codecs: Arc<migration::auto_codec::CodecMemory>,
    /// Which VMs' QEMUs have a write tracker attached (one at a time).
    pub trackers: Arc<tracker_claims::TrackerClaims>,
    /// gRPC channels to peer agents, reused across calls and migrations.
    pub peers: Arc<tls::PeerChannels>,
}
