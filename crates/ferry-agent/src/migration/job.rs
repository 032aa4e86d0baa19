//! What the source side of a live and of a cold migration share: the caller's
//! parameters, errors typed by the phase they happened in, the guard that settles a job
//! whose task panicked, and how a job ends in its status ([`super::Outgoing`]).
//!
//! Each kind of job names its own phases (live: [`ferry_handoff::Phase`], cold:
//! [`ColdPhase`]) and runs them as one function each, in order; an error carries the
//! phase, so the final status says where a migration stopped without a string table.

use ferry_wire::Codec;
use serde::{Deserialize, Serialize};
use std::future::Future;

/// What the caller asked for, common to live and cold migrations.
#[derive(Debug, Clone)]
pub struct JobParams {
    /// The migration's id (a UUID).
    pub id: String,
    /// The VM's name.
    pub vm: String,
    /// The target agent's gRPC address.
    pub target: String,
    /// What the operator asked for (`auto` or a codec).
    pub compression: super::auto_codec::Compression,
    /// How image chunks and disk blocks travel, and pages unless `auto` chooses.
    pub codec: Codec,
    /// Data-plane cap in bytes per second (0: none).
    pub bandwidth: u64,
}

impl JobParams {
    /// The first 8 characters of the id, for file names beside the VM's.
    pub fn short_id(&self) -> &str {
        &self.id[..8.min(self.id.len())]
    }
}

/// A failed job: the phase it failed in and why. Serialisable, like Propolis's
/// `MigrateError`, so it can be journaled or sent as it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobError<P> {
    /// Where it happened.
    pub phase: P,
    /// What happened (names VM, hosts and files where it can).
    pub message: String,
    /// The operator cancelled it (not a failure).
    pub cancelled: bool,
}

impl<P> JobError<P> {
    /// A failure in `phase`.
    pub fn new(phase: P, message: impl Into<String>) -> Self {
        JobError {
            phase,
            message: message.into(),
            cancelled: false,
        }
    }

    /// The operator's cancel, seen in `phase`.
    pub fn cancelled(phase: P) -> Self {
        JobError {
            phase,
            message: "cancelled by request".into(),
            cancelled: true,
        }
    }
}

impl<P: std::fmt::Display> std::fmt::Display for JobError<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "failed at {}: {}", self.phase, self.message)
    }
}

impl<P: std::fmt::Debug + std::fmt::Display> std::error::Error for JobError<P> {}

/// A peer's gRPC refusal as text: its message and code.
pub fn status_msg(s: &tonic::Status) -> String {
    format!("{} ({:?})", s.message(), s.code())
}

/// Maps an error of step `what` (empty: none worth naming) to a failure in `phase`.
pub fn fail<P, E: std::fmt::Display>(
    phase: P,
    what: &'static str,
) -> impl FnOnce(E) -> JobError<P> {
    move |e| {
        let message = if what.is_empty() {
            e.to_string()
        } else {
            format!("{what}: {e}")
        };
        JobError::new(phase, message)
    }
}

/// The phases of a cold migration's source side, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ColdPhase {
    /// Stop the VM if asked; confine, inspect and hash every image (nothing sent yet).
    Inspect,
    /// The target checks everything, reserves the name and says what it already has.
    Prepare,
    /// QUIC data plane to the target.
    Connect,
    /// The missing images travel, one stream each.
    Copy,
    /// The target verifies and defines (optionally starts) the VM; not cancellable.
    Define,
}

impl ColdPhase {
    /// Lower-case name for messages and logs.
    pub fn name(self) -> &'static str {
        match self {
            ColdPhase::Inspect => "inspect",
            ColdPhase::Prepare => "prepare",
            ColdPhase::Connect => "connect",
            ColdPhase::Copy => "copy",
            ColdPhase::Define => "define",
        }
    }
}

impl std::fmt::Display for ColdPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Runs a job's task and, should it panic (a bug), hands the panic's text to `settle`,
/// which must leave the VM owned by exactly one host and end the status.
pub async fn run_guarded<S, SF>(
    id: &str,
    task: impl Future<Output = ()> + Send + 'static,
    settle: S,
) where
    S: FnOnce(String) -> SF,
    SF: Future<Output = ()>,
{
    let Err(panic) = tokio::spawn(task).await else {
        return;
    };
    tracing::error!(migration = %id, "migration task panicked: {panic}");
    settle(panic.to_string()).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_handoff::Phase;

    #[test]
    fn errors_name_their_phase_and_step() {
        let e = fail(Phase::Precopy, "send pages")("stream reset");
        assert_eq!(e.to_string(), "failed at precopy: send pages: stream reset");
        assert!(!e.cancelled);
        let e = fail(ColdPhase::Copy, "")("disk full");
        assert_eq!(e.to_string(), "failed at copy: disk full");
        let c = JobError::cancelled(Phase::Disks);
        assert!(c.cancelled && c.to_string().contains("cancelled by request"));
        // Serialisable as it is (journal, peer messages).
        let json = serde_json::to_string(&e).expect("serialise");
        let back: JobError<ColdPhase> = serde_json::from_str(&json).expect("parse");
        assert_eq!(back, e);
    }

    #[tokio::test]
    async fn a_panicking_task_is_settled() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        run_guarded("m", async { panic!("boom") }, |why| async move {
            let _ = tx.send(why);
        })
        .await;
        assert!(rx.await.expect("settled").contains("boom"));
        // A task that ends normally is not settled again.
        run_guarded("m", async {}, |_| async { panic!("must not run") }).await;
    }
}
