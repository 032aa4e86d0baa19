//! Live migration: the source-side state machine ([`source`]), the target side
//! ([`target`]), and the page movers both use ([`pages`]).
//!
//! Cold (offline) migration of a stopped VM's images and definition is [`cold`].
//!
//! Phases follow DESIGN.md: Preparing → Connecting → Precopy → Switchover → Verifying →
//! Committing → Completed; any failure before the commit rolls back to the source.

pub mod auto_codec;
pub mod cold;
pub mod disks;
pub mod job;
pub mod pages;
pub mod path_trace;
pub mod progress;
pub mod relay;
pub mod source;
pub mod target;

use crate::journal::{Journal, JournalError, MigrationRecord, Op, Role};
use ferry_api::v1 as pb;
use ferry_handoff::SourceMark;
use prost::Message;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What every Prepare (live or cold) checks first: a protocol version this host speaks,
/// a UUID for the migration, a VM spec that parses.
pub fn check_prepare(
    host: &str,
    protocol_version: u32,
    migration_id: &str,
    spec: Option<&pb::VmSpec>,
) -> Result<ferry_qemu::VmSpec, tonic::Status> {
    use tonic::Status;
    if !ferry_wire::version_supported(protocol_version.min(255) as u8) {
        return Err(Status::failed_precondition(format!(
            "protocol version {protocol_version} not supported by host {host} (speaks {})",
            ferry_wire::PROTOCOL_VERSION
        )));
    }
    if uuid::Uuid::parse_str(migration_id).is_err() {
        return Err(Status::invalid_argument("migration_id must be a UUID"));
    }
    crate::convert::spec_from_pb(spec.ok_or_else(|| Status::invalid_argument("spec is missing"))?)
}

/// The target agent's address in a migration's shown target: "host (address)" once the
/// target answered Prepare, the address alone before. Pure.
pub fn target_address(shown: &str) -> &str {
    shown
        .split_once(" (")
        .map(|(_, a)| a.trim_end_matches(')'))
        .unwrap_or(shown)
}

/// Whether a phase is final. IN_DOUBT is not: the source settles it (COMPLETED or
/// FAILED) once the target answers, and watchers see that end.
pub fn is_terminal(phase: i32) -> bool {
    use pb::MigrationPhase as P;
    matches!(
        P::try_from(phase),
        Ok(P::Completed | P::Failed | P::Cancelled)
    )
}

/// A host's migration slots (`max_outgoing` or `max_incoming`). Taking one checks the
/// limit and counts it under one lock, so concurrent requests cannot all slip under it.
#[derive(Default)]
pub struct Slots {
    used: std::sync::Mutex<usize>,
}

impl Slots {
    /// Takes a slot if fewer than `limit` are taken; it is given back when the guard drops.
    pub fn try_take(self: &Arc<Self>, limit: usize) -> Option<SlotGuard> {
        let mut used = self.used.lock().ok()?;
        if *used >= limit {
            return None;
        }
        *used += 1;
        Some(SlotGuard {
            slots: self.clone(),
        })
    }

    /// Takes a slot whatever the limit (a migration settled after a restart).
    pub fn take(self: &Arc<Self>) -> SlotGuard {
        if let Ok(mut used) = self.used.lock() {
            *used += 1;
        }
        SlotGuard {
            slots: self.clone(),
        }
    }

    /// Slots taken now.
    pub fn used(&self) -> usize {
        self.used.lock().map(|u| *u).unwrap_or(0)
    }
}

/// One taken slot; dropping it gives it back.
pub struct SlotGuard {
    slots: Arc<Slots>,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        if let Ok(mut used) = self.slots.used.lock() {
            *used = used.saturating_sub(1);
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// What the source journals about a migration besides its status.
#[derive(Debug, Clone)]
pub struct SourceMeta {
    /// The last irreversible step journaled.
    pub mark: SourceMark,
    /// Whether the guest ran before the migration (a rollback leaves a suspended guest
    /// suspended).
    pub was_running: bool,
    /// The device-state capture (whole once the source QEMU completed).
    pub capture: Option<PathBuf>,
    /// The target's token from Prepare: every later peer call of the migration carries
    /// it, also after a restart of this agent.
    pub token: Option<String>,
    /// A cold migration: whether the definition goes from this host once the target has
    /// the VM (`None`: live).
    pub cold_undefine: Option<bool>,
    /// The operator's verdict took the VM back here; the target has not heard it yet
    /// ([`crate::journal::MigrationRecord::taken_back`]).
    pub taken_back: bool,
}

impl SourceMeta {
    /// Whether the device state was captured whole (the `.part` file is renamed to the
    /// capture's name only once the source QEMU completed).
    pub fn capture_whole(&self) -> bool {
        self.capture.as_ref().is_some_and(|p| p.exists())
    }

    /// Removes the capture, whole or partial.
    pub fn remove_capture(&self) {
        if let Some(c) = &self.capture {
            let _ = std::fs::remove_file(c);
            let _ = std::fs::remove_file(c.with_extension("part"));
        }
    }
}

/// A migration this host is the source of: its live status and its cancel switch.
pub struct OutgoingHandle {
    pub id: String,
    pub status: watch::Sender<pb::MigrationStatus>,
    pub cancel: CancellationToken,
    /// The operator's word that the target is gone for good (`ResolveMigration`).
    pub verdict: OperatorVerdict,
    pub meta: std::sync::Mutex<SourceMeta>,
}

impl OutgoingHandle {
    /// The journaled facts.
    pub fn meta(&self) -> SourceMeta {
        self.meta.lock().map(|m| m.clone()).unwrap_or(SourceMeta {
            mark: SourceMark::CommitSent,
            was_running: true,
            capture: None,
            token: None,
            cold_undefine: None,
            taken_back: false,
        })
    }

    /// Changes the journaled facts (written with the next persist).
    pub fn set_meta(&self, f: impl FnOnce(&mut SourceMeta)) {
        if let Ok(mut m) = self.meta.lock() {
            f(&mut m);
        }
    }

    /// Changes the published status.
    pub fn update(&self, f: impl FnOnce(&mut pb::MigrationStatus)) {
        self.status.send_modify(f);
    }

    /// The current status.
    pub fn snapshot(&self) -> pb::MigrationStatus {
        self.status.borrow().clone()
    }
}

/// The operator's declaration, while a migration is IN_DOUBT, that its target is gone for
/// good (`ResolveMigration`). Settling asks the target once more after it; only if that
/// question does not reach the target does the verdict decide (the VM comes back here,
/// [`ferry_handoff::answer_with_verdict`]); a target reached then is believed, and the
/// verdict is spent — until the operator declares it again (a target that answered once
/// and then went for good). Not journaled: after a restart of this agent it is asked again.
#[derive(Default)]
pub struct OperatorVerdict {
    declared: CancellationToken,
    /// Declarations so far: a settling loop spends one, and a later one counts afresh.
    declarations: std::sync::atomic::AtomicU64,
    by: std::sync::Mutex<String>,
    applied: std::sync::atomic::AtomicBool,
}

impl OperatorVerdict {
    /// Records the declaration by operator `by` and wakes the settling loop.
    pub fn declare(&self, by: &str) {
        if let Ok(mut b) = self.by.lock() {
            *b = by.to_string();
        }
        self.declarations
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        self.declared.cancel();
    }

    /// Whether it was declared.
    pub fn declared(&self) -> bool {
        self.declared.is_cancelled()
    }

    /// Which declaration stands (0: none yet): a settling loop that spent this one on a
    /// target that answered acts on the verdict again only once this number changes.
    pub fn declaration(&self) -> u64 {
        self.declarations.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Resolves once declared.
    pub async fn wait(&self) {
        self.declared.cancelled().await
    }

    /// Marks it as what settled the migration (the target stayed unreached).
    pub fn apply(&self) {
        self.applied
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// What settled the migration, if the verdict did: "the operator (NAME) declared the
    /// target gone for good and it did not answer".
    pub fn settled_note(&self) -> Option<String> {
        self.applied
            .load(std::sync::atomic::Ordering::Acquire)
            .then(|| {
                let by = self.by.lock().map(|b| b.clone()).unwrap_or_default();
                format!(
                    "the operator ({by}) declared the target gone for good and it did not answer"
                )
            })
    }
}

/// Outgoing migrations, live and past (history comes from the journal).
pub struct Outgoing {
    live: std::sync::Mutex<HashMap<String, Arc<OutgoingHandle>>>,
    /// Slots of live outgoing migrations (`max_outgoing`).
    pub slots: Arc<Slots>,
    journal: Arc<Journal>,
}

impl Outgoing {
    /// Moves a migration to `phase` with a message: logged, published and journaled.
    pub fn set_phase(&self, h: &OutgoingHandle, phase: pb::MigrationPhase, message: String) {
        let vm = h.status.borrow().vm.clone();
        tracing::info!(migration = %h.id, vm = %vm, ?phase, "{message}");
        h.update(|s| {
            s.phase = phase as i32;
            s.message = message;
        });
        self.persist(h);
    }

    /// Ends a migration that completed (the target owns the VM): records when, counts
    /// it, moves it to COMPLETED with `message`, journals that together with `ops` (e.g.
    /// the VM record it removes) in one transaction, and forgets the live handle.
    pub fn end_completed(
        &self,
        h: &OutgoingHandle,
        metrics: &crate::metrics::Metrics,
        message: String,
        ops: Vec<Op>,
    ) {
        tracing::info!(migration = %h.id, vm = %h.status.borrow().vm, "{message}");
        // Counted before the status says it ended: whoever sees COMPLETED and then reads
        // the metrics finds it there.
        metrics
            .migrations
            .with_label_values(&["source", "completed"])
            .inc();
        metrics.active.dec();
        h.set_meta(|m| m.mark = SourceMark::Settled);
        h.update(|s| {
            s.phase = pb::MigrationPhase::Completed as i32;
            s.message = message;
            s.finished_unix_ms = now_ms();
        });
        if let Err(e) = self.persist_with(h, ops) {
            tracing::error!(migration = %h.id, "journal: {e}");
        }
        self.release(&h.id);
    }

    /// Ends a migration that did not complete (failed, or cancelled on request): records
    /// why and when, counts it, moves it to its final phase with `message`, and journals
    /// that together with `ops` (e.g. the VM record it frees) in one transaction.
    #[allow(clippy::too_many_arguments)]
    pub fn end_unsuccessful(
        &self,
        h: &OutgoingHandle,
        metrics: &crate::metrics::Metrics,
        reason: &str,
        cancelled: bool,
        elapsed_ms: u64,
        message: String,
        ops: Vec<Op>,
    ) {
        let (result, phase) = if cancelled {
            ("cancelled", pb::MigrationPhase::Cancelled)
        } else {
            ("failed", pb::MigrationPhase::Failed)
        };
        tracing::info!(migration = %h.id, vm = %h.status.borrow().vm, ?phase, "{message}");
        // Counted before the status says it ended (see `end_completed`).
        metrics
            .migrations
            .with_label_values(&["source", result])
            .inc();
        metrics.active.dec();
        h.update(|s| {
            s.error = reason.to_string();
            s.finished_unix_ms = now_ms();
            s.stats.get_or_insert_with(Default::default).elapsed_ms = elapsed_ms;
            s.phase = phase as i32;
            s.message = message;
        });
        h.set_meta(|m| m.mark = SourceMark::Settled);
        if let Err(e) = self.persist_with(h, ops) {
            tracing::error!(migration = %h.id, "journal: {e}");
        }
        self.release(&h.id);
    }

    pub fn new(journal: Arc<Journal>) -> Arc<Self> {
        Arc::new(Outgoing {
            live: std::sync::Mutex::new(HashMap::new()),
            journal,
            slots: Arc::default(),
        })
    }

    /// Registers a new migration with its initial status.
    pub fn register(&self, status: pb::MigrationStatus, meta: SourceMeta) -> Arc<OutgoingHandle> {
        let (tx, _rx) = watch::channel(status.clone());
        let h = Arc::new(OutgoingHandle {
            id: status.id.clone(),
            status: tx,
            cancel: CancellationToken::new(),
            verdict: OperatorVerdict::default(),
            meta: std::sync::Mutex::new(meta),
        });
        if let Ok(mut live) = self.live.lock() {
            live.insert(status.id.clone(), h.clone());
        }
        self.persist(&h);
        h
    }

    /// Writes the current status to the journal.
    pub fn persist(&self, h: &OutgoingHandle) {
        if let Err(e) = self.persist_with(h, vec![]) {
            tracing::error!(migration = %h.id, "journal: {e}");
        }
    }

    /// Writes the current status and facts to the journal together with `ops`, in one
    /// durable transaction (an irreversible step and the VM record it changes).
    pub fn persist_with(&self, h: &OutgoingHandle, mut ops: Vec<Op>) -> Result<(), JournalError> {
        let s = h.snapshot();
        let meta = h.meta();
        let mut rec = MigrationRecord::new(
            &s.id,
            Role::Source,
            &s.vm,
            &s.target,
            pb::MigrationPhase::try_from(s.phase)
                .map(|p| p.as_str_name())
                .unwrap_or_default(),
        );
        rec.status = Some(s.encode_to_vec());
        rec.mark = Some(meta.mark);
        rec.was_running = meta.was_running;
        rec.capture = meta.capture;
        rec.token = meta.token;
        rec.cold_undefine = meta.cold_undefine;
        rec.taken_back = meta.taken_back;
        ops.insert(0, Op::PutMigration(rec));
        self.journal.apply(&ops)
    }

    /// Forgets a live handle (its record stays in the journal as history).
    pub fn release(&self, id: &str) {
        if let Ok(mut live) = self.live.lock() {
            live.remove(id);
        }
    }

    pub fn get(&self, id: &str) -> Option<Arc<OutgoingHandle>> {
        self.live.lock().ok()?.get(id).cloned()
    }

    /// Status of a live or past migration.
    pub fn status(&self, id: &str) -> Option<pb::MigrationStatus> {
        if let Some(h) = self.get(id) {
            return Some(h.snapshot());
        }
        self.history().into_iter().find(|s| s.id == id)
    }

    /// Past migrations from the journal (source side).
    pub fn history(&self) -> Vec<pb::MigrationStatus> {
        let recs = self.journal.migrations().unwrap_or_default();
        recs.into_iter()
            .filter(|r| r.role == Role::Source)
            .filter_map(|r| {
                r.status
                    .and_then(|b| pb::MigrationStatus::decode(b.as_slice()).ok())
            })
            .collect()
    }

    /// Every migration, live ones with their current status, newest first.
    pub fn list(&self) -> Vec<pb::MigrationStatus> {
        let mut by_id: HashMap<String, pb::MigrationStatus> = self
            .history()
            .into_iter()
            .map(|s| (s.id.clone(), s))
            .collect();
        if let Ok(live) = self.live.lock() {
            for h in live.values() {
                by_id.insert(h.id.clone(), h.snapshot());
            }
        }
        let mut v: Vec<_> = by_id.into_values().collect();
        v.sort_by_key(|s| std::cmp::Reverse(s.started_unix_ms));
        v
    }

    /// Source migrations journaled as not settled (in flight or IN_DOUBT when the agent
    /// stopped), with their records.
    pub fn unsettled(&self) -> Vec<(MigrationRecord, pb::MigrationStatus)> {
        let recs = self.journal.migrations().unwrap_or_default();
        recs.into_iter()
            .filter(|r| r.role == Role::Source)
            .filter_map(|r| {
                let s = r
                    .status
                    .as_ref()
                    .and_then(|b| pb::MigrationStatus::decode(b.as_slice()).ok())?;
                // Records from before marks existed: settled when their phase is final.
                let settled = match r.mark {
                    Some(m) => m == SourceMark::Settled,
                    None => is_terminal(s.phase),
                };
                (!settled).then_some((r, s))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_address_is_read_from_the_shown_target() {
        assert_eq!(target_address("host-b (10.0.0.2:7000)"), "10.0.0.2:7000");
        assert_eq!(target_address("10.0.0.2:7000"), "10.0.0.2:7000");
        assert_eq!(target_address("[::1]:7000"), "[::1]:7000");
    }
}
