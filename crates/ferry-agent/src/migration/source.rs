//! The source side of a live migration: one function per [`Phase`], run in order by
//! [`Migration::drive`] (up to the fence) and [`run`] (commit, settle), each failing with
//! a [`MigrateError`] that names its phase.
//!
//! Ownership rule: until the target has journaled COMMITTED, any failure resumes the
//! guest here and removes everything the target made. Once the commit may have happened
//! (the Commit call was sent), the source never resumes on its own: it asks the target
//! what happened and, if it cannot find out, stays paused IN_DOUBT.

use super::auto_codec::{self, Compression};
use super::job::{fail, status_msg, JobError, JobParams};
use super::pages::{PageCounters, PageError, PageSender, SharedCodec};
use super::progress::{self, RoundProgress};
use super::relay::relay_capturing;
use super::OutgoingHandle;
use crate::convert::spec_to_pb;
use crate::journal::Op;
use crate::AgentCtx;
use ferry_api::v1 as pb;
use ferry_api::v1::ferry_peer_client::FerryPeerClient;
use ferry_handoff::{
    answer_with_verdict, rollback_resume, source_recovery, Phase, Resume, SourceAction, SourceMark,
    SourceQemu, StallDecision, TargetAnswer,
};
use ferry_memory::{
    DirtyBitmap, DirtyTracker, PageSums, RamFile, TrackerAudit, TrackerError, TrackerKind,
    DEFAULT_SHIM_FD, PAGE_SIZE,
};
use ferry_qemu::{QemuProcess, VmSpec};
use ferry_qmp::{wait_for_event, MirrorCopyMode, QmpClient, QmpEvent};
use ferry_transport::{write_stream_header, ControlChannel, FrameWriter};
use ferry_wire::{Codec, ControlMessage, StreamHeader, StreamKind, PROTOCOL_VERSION};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tracing::{debug, error, info, warn};

/// How long into round 0 the guest's write rate is sampled.
const WRITE_RATE_SAMPLE: Duration = Duration::from_millis(500);
/// How often a pre-copy round asks the tracker what the guest wrote meanwhile, so the
/// shards skip pages that will be sent again in the next round anyway.
const SKIP_COLLECT_EVERY: Duration = Duration::from_millis(250);

/// Pacing rate relative to the probed steady rate of the link.
const PACE_HEADROOM: f64 = 0.88;

/// What the caller asked for.
#[derive(Debug, Clone)]
pub struct MigrationParams {
    /// What live and cold migrations share: id, VM, target, codec, bandwidth cap.
    pub job: JobParams,
    pub downtime_ms: u32,
    pub max_rounds: u32,
    pub page_streams: u32,
    /// How the RAM is verified before the commit.
    pub verify: VerifyMode,
    /// Go ahead despite failed soft preflight checks.
    pub force: bool,
    /// Roll back if not committing within this time.
    pub timeout: Option<Duration>,
    pub on_stall: StallPolicy,
    /// Commit but leave the guest paused on the target (`virsh migrate --suspend`).
    pub leave_paused: bool,
    /// Shared storage, copied disks, or detect.
    pub storage: super::disks::StorageMode,
}

pub use ferry_handoff::{StallPolicy, VerifyMode};

/// A failed live migration: the [`Phase`] it failed in and why. Its text names VM, hosts
/// and step.
pub type MigrateError = JobError<Phase>;

type Res<T> = Result<T, MigrateError>;

/// What has to be undone if the migration fails.
#[derive(Default)]
struct Undo {
    peer: Option<FerryPeerClient<Channel>>,
    conn: Option<quinn::Connection>,
    tracker: Option<Box<dyn DirtyTracker>>,
    migrate_issued: bool,
    relay_path: Option<PathBuf>,
    throttle: Option<crate::throttle::CpuThrottle>,
    /// The control stream's send half: dropping it would finish the stream, which the
    /// target rightly takes as the source giving up. Kept open until the commit is done.
    control: Option<FrameWriter>,
    /// Disk mirror jobs still running in the source QEMU (job id = NBD node name).
    mirrors: Vec<String>,
    /// The unix socket the source QEMU's NBD clients connect to.
    nbd_relay_path: Option<PathBuf>,
    /// The task accepting the source QEMU's NBD connections (it would outlive the
    /// migration, holding its socket, if not stopped).
    nbd_listener: Option<tokio::task::JoinHandle<()>>,
    /// The control stream's receive side, for the commit exchange.
    control_rx: Option<ControlRx>,
    /// This VM's write tracker claimed (one tracker per VM: see `tracker_claims`); let go
    /// with the rest of the undo, after the tracker itself on every path.
    tracker_claim: Option<crate::tracker_claims::TrackerClaim>,
    /// This agent's mapping of the guest's RAM. Dropping its last reference unmaps it,
    /// which for a 1 GiB guest took ~18 ms of page-table teardown: inside the guest's
    /// pause when the link was dropped after the fence. Kept until the guest runs
    /// somewhere, then released off the runtime.
    ram: Option<Arc<RamFile>>,
}

/// Runs [`run`] and, should it panic (a bug), still settles who owns the VM: the target
/// keeps it if it committed, otherwise it is aborted there and the guest resumes here.
pub async fn run_guarded(
    // The host's outgoing slot, given back when this returns.
    _slot: super::SlotGuard,
    ctx: Arc<AgentCtx>,
    p: MigrationParams,
    h: Arc<OutgoingHandle>,
    spec: VmSpec,
    proc: Arc<QemuProcess>,
) {
    let job = p.job.clone();
    let (ctx2, h2, proc2) = (ctx.clone(), h.clone(), proc.clone());
    let task = run(ctx, p, h, spec, proc);
    super::job::run_guarded(&job.id, task, |panic| async move {
        // Settle exactly as a restarted agent would: the journaled mark decides.
        let why = format!(
            "internal error in the migration of VM '{}' (a bug: {panic})",
            job.vm
        );
        settle_and_end(ctx2, h2, job.vm, job.target, Some(proc2), why).await;
    })
    .await;
}

/// Runs a migration whose VM the caller already marked as migrating, to its end.
pub async fn run(
    ctx: Arc<AgentCtx>,
    p: MigrationParams,
    h: Arc<OutgoingHandle>,
    spec: VmSpec,
    proc: Arc<QemuProcess>,
) {
    let started = Instant::now();
    let mut undo = Undo::default();
    let mut m = Migration {
        ctx: ctx.clone(),
        p: p.clone(),
        h: h.clone(),
        spec,
        proc: proc.clone(),
        at: Phase::Preflight,
        started,
        stop_time: None,
        token: String::new(),
        reported: (0, 0, 0),
        link_rate: 0.0,
        target_quic: None,
        disk_counters: None,
        local_digest: None,
        final_round: None,
        tail_round: None,
    };
    ctx.metrics.active.inc();
    let deadline = p.timeout.unwrap_or(Duration::from_secs(u64::MAX / 4));
    // Cancel and timeout are noticed outside the phase; they are charged to the phase
    // that was running (`m.at`) once it has been dropped.
    let result = tokio::select! {
        r = m.drive(&mut undo) => r,
        _ = h.cancel.cancelled() => Err(JobError::cancelled(Phase::Preflight)),
        _ = tokio::time::sleep(deadline) => Err(JobError::new(
            Phase::Preflight,
            format!("not ready to commit after {} s (--timeout)", deadline.as_secs()),
        )),
    }
    .map_err(|e| MigrateError { phase: m.at, ..e });
    let result = match result {
        Ok(()) => m.commit(&mut undo).await,
        Err(e) => Err(e),
    };
    let result = match result {
        // Commit may be on the wire: the target decides, ask it (IN_DOUBT meanwhile).
        Err(e) if m.h.meta().mark == SourceMark::CommitSent => {
            warn!(migration = %m.p.job.id, "commit not confirmed ({}): asking the target", e.message);
            m.at = Phase::Settle;
            match settle(&m.ctx, &m.h, &m.p.job.target, Some(&m.proc)).await {
                SourceAction::Finish => Ok(0),
                _ => Err(JobError::new(
                    Phase::Settle,
                    not_committed_because(&m.h, &e.message),
                )),
            }
        }
        other => other,
    };
    let ram = undo.ram.take();
    // A committed source's tracker is torn down off the pause and off the runtime (see
    // the final round); a rollback disarms it before the guest runs on.
    let tracker = result
        .is_ok()
        .then(|| (undo.tracker.take(), undo.tracker_claim.take()));
    match result {
        Ok(resume_us) => m.finish_committed(resume_us, undo).await,
        Err(e) => m.roll_back(e, undo).await,
    }
    if let Some(ram) = ram {
        let _ = tokio::task::spawn_blocking(move || drop(ram)).await;
    }
    if let Some((t, claim)) = tracker {
        let _ = tokio::task::spawn_blocking(move || drop(t)).await;
        drop(claim);
    }
}

struct Migration {
    ctx: Arc<AgentCtx>,
    p: MigrationParams,
    h: Arc<OutgoingHandle>,
    spec: VmSpec,
    proc: Arc<QemuProcess>,
    /// The phase running (or last run).
    at: Phase,
    started: Instant,
    /// When the source vCPUs stopped (QMP STOP event).
    stop_time: Option<SystemTime>,
    token: String,
    /// Counter values already added to the metrics (they are published as deltas).
    reported: (u64, u64, u64),
    /// Steady rate the preflight probe measured on the data path (bytes/s, 0: unknown).
    link_rate: f64,
    /// The target's data-plane address as its preflight facts gave it: the QUIC handshake
    /// starts there while Prepare runs.
    target_quic: Option<SocketAddr>,
    /// Bytes through the NBD tunnels of the disk mirrors.
    disk_counters: Option<Arc<super::disks::TunnelCounters>>,
    /// Fingerprint of the source RAM at switchover (when verifying).
    local_digest: Option<u128>,
    /// The final round and the batch count it ends at.
    final_round: Option<(u32, u64)>,
    /// The last pre-copy round and its batch count, when the guest paused before its
    /// confirmation came: it is read during the commit exchange.
    tail_round: Option<(u32, u64)>,
}

/// What [`Migration::prepare`] leaves: where the data plane goes, the disks that travel.
struct Prepared {
    quic_addr: String,
    copies: Vec<pb::DiskProbe>,
    /// The data plane opened while the target prepared, and the address it went to
    /// (a connection is dropped, which closes it, when Prepare names another address).
    early: Option<(SocketAddr, Result<OpenedDataPlane, OpenFailure>)>,
}

/// A data plane the target accepted: the connection and its control stream after Hello.
type OpenedDataPlane = (quinn::Connection, ControlChannel);

/// How opening the data plane failed ([`Migration::open_data_plane`]).
struct OpenFailure {
    err: JobError<Phase>,
    /// Whether the target answered (and refused) rather than never being reached or never
    /// answering.
    answered: bool,
}

/// What [`Migration::connect`] does with the data plane opened while the target prepared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EarlyHandshake {
    /// Open, to the address Prepare named: the data plane.
    Use,
    /// That address was never reached or never answered, though the target had answered
    /// its Prepare: its error is the phase's (a second attempt would double the wait).
    Report,
    /// Another address, a connection closed since, or a refusal (an agent of a version that
    /// does not wait for its Prepare refuses a Hello that came first): open afresh. (A
    /// failure while the target was still preparing is not kept: `connect` opens afresh.)
    Fresh,
}

/// [`EarlyHandshake`] for a data plane opened to `made_to` that gave `open` (`Ok(whether
/// the connection is still open)`, or `Err(whether the target answered)` when it failed)
/// against the address Prepare named. Pure.
fn early_handshake(
    made_to: SocketAddr,
    open: Result<bool, bool>,
    prepared_at: SocketAddr,
) -> EarlyHandshake {
    match open {
        _ if made_to != prepared_at => EarlyHandshake::Fresh,
        Ok(true) => EarlyHandshake::Use,
        Ok(false) | Err(true) => EarlyHandshake::Fresh,
        Err(false) => EarlyHandshake::Report,
    }
}

/// The data plane [`Migration::connect`] opens.
struct Link {
    conn: quinn::Connection,
    /// The target's data-plane address as dialled (careful resume's key).
    peer: SocketAddr,
    ctl_tx: FrameWriter,
    ctl_rx: ControlRx,
    /// The page streams (taken by the page sender).
    writers: Vec<FrameWriter>,
    ram: Arc<RamFile>,
    /// The RTT after the handshake, before any page: the path's own delay, without the
    /// queue pre-copy builds (what the pause's round trip costs once the queue drained).
    base_rtt: Duration,
}

/// Where [`Migration::precopy`] stopped.
struct Precopied {
    sender: PageSender,
    /// Pages written during the last round, still to send.
    pending: DirtyBitmap,
    round: u32,
    /// Wire bytes per second, as measured.
    bandwidth: Option<f64>,
    /// Pages per second the guest wrote during the last round.
    dirty_rate: f64,
    /// The tracker's audit (`--verify sent`), its last window perhaps still being hashed.
    audit: Option<(TrackerAudit, Option<RunningAudit>)>,
    /// When the written pages were last collected: the final round holds what the guest
    /// writes from then to the stop.
    collected_at: Instant,
}

/// Round 0's start, made while the target prepares: when write tracking was armed, and
/// the scan for the non-zero pages (with how long it took).
struct Round0Scan {
    armed_at: Instant,
    scan: JoinHandle<Result<(DirtyBitmap, Duration), ferry_memory::MemoryError>>,
}

/// The switchover's work in flight that [`Migration::fence`] waits for.
struct Switched {
    sender: PageSender,
    events: broadcast::Receiver<QmpEvent>,
    /// Relays (and captures) QEMU's device state: (captured, forwarded) bytes.
    relay: JoinHandle<std::io::Result<(u64, JoinHandle<std::io::Result<u64>>)>>,
    capture: PathBuf,
    capture_part: PathBuf,
    /// The source RAM's fingerprint, computed meanwhile (when verifying).
    digest: Option<JoinHandle<Result<u128, ferry_memory::MemoryError>>>,
    final_round: (u32, u64),
    pause_deadline: Duration,
}

/// `--compress auto` during a pre-copy: see [`auto_codec`].
struct AutoCodec {
    samples_task: Option<JoinHandle<Vec<auto_codec::CodecSample>>>,
    /// As sampled; `samples` are these corrected by what the wire showed (always from
    /// these, so a clamp never loses the codecs' order).
    base: Vec<auto_codec::CodecSample>,
    samples: Vec<auto_codec::CodecSample>,
    cell: Arc<SharedCodec>,
    /// This host's cores, and the page streams (each compresses on one).
    cores_limit: f64,
    streams: f64,
    link: auto_codec::LinkKnowledge,
    /// The CPU costs per byte as the intervals that sent enough showed.
    costs: auto_codec::CostKnowledge,
    /// The recent decisive intervals' weighings of the codecs.
    verdicts: auto_codec::Verdicts,
    /// Where the current interval started.
    mark: Option<IntervalMark>,
}

/// The page streams' counters, the UDP bytes sent and the CPU at the start of an interval.
struct IntervalMark {
    wait_ns: u64,
    encode_ns: u64,
    encode_cpu_ns: u64,
    page_bytes: u64,
    payload_bytes: u64,
    /// Bytes the streams handed to QUIC.
    written: u64,
    udp_bytes: u64,
    at: Instant,
    cpu: auto_codec::CpuMeter,
}

impl IntervalMark {
    fn now(c: &super::pages::PageCounters, udp_bytes: u64) -> Self {
        IntervalMark {
            wait_ns: c.wait_ns.load(Ordering::Relaxed),
            encode_ns: c.encode_ns.load(Ordering::Relaxed),
            encode_cpu_ns: c.encode_cpu_ns.load(Ordering::Relaxed),
            page_bytes: c.page_bytes.load(Ordering::Relaxed),
            payload_bytes: c.payload_bytes.load(Ordering::Relaxed),
            written: c.wire_bytes.load(Ordering::Relaxed),
            udp_bytes,
            at: Instant::now(),
            cpu: auto_codec::CpuMeter::start(),
        }
    }
}

impl AutoCodec {
    /// Called every [`auto_codec::STEP_EVERY`] while a round runs: the interval since the
    /// last call, and the codec for the next one. Returns what changed, to show.
    async fn tick(
        &mut self,
        sender_counters: &super::pages::PageCounters,
        conn: &quinn::ConnectionStats,
    ) -> Option<String> {
        let udp_bytes = conn.udp_tx.bytes;
        if self.base.is_empty() {
            match self.samples_task.take() {
                Some(t) if t.is_finished() => {
                    self.base = t.await.unwrap_or_default();
                    self.samples = self.base.clone();
                }
                other => self.samples_task = other,
            }
        }
        let now = IntervalMark::now(sender_counters, udp_bytes);
        let start = self.mark.replace(now)?;
        let now = self.mark.as_ref()?;
        let secs = start.at.elapsed().as_secs_f64().max(1e-3);
        let wait = (now.wait_ns - start.wait_ns) as f64;
        let enc = (now.encode_ns - start.encode_ns) as f64;
        let cpu = start.cpu.read(self.cores_limit)?;
        if wait + enc <= 0.0 || self.samples.is_empty() {
            return None;
        }
        let current = self.cell.get();
        let (page, payload) = (
            now.page_bytes - start.page_bytes,
            now.payload_bytes - start.payload_bytes,
        );
        if payload > 0 {
            self.samples = auto_codec::rescale(&self.base, current, page as f64 / payload as f64);
        }
        let (written, sent) = (
            now.written - start.written,
            now.udp_bytes.saturating_sub(start.udp_bytes),
        );
        let iv = auto_codec::Interval {
            wait_share: wait / (wait + enc),
            wire_rate: sent as f64 / secs,
            queued_share: if written > 0 {
                written.saturating_sub(sent) as f64 / written as f64
            } else {
                0.0
            },
            cores: cpu.cores,
            used: cpu.used,
            encoding: (now.encode_cpu_ns - start.encode_cpu_ns) as f64 / 1e9 / secs,
            page_rate: page as f64 / secs,
            window_rate: conn.path.cwnd as f64 / conn.path.rtt.as_secs_f64().max(1e-4),
        };
        let cur = self.samples.iter().find(|s| s.codec == current)?;
        self.costs.add(&iv, cur);
        let costs = self.costs.costs();
        if let Some(w) =
            auto_codec::weigh(&self.samples, current, iv, &self.link, self.streams, &costs)
        {
            debug!(
                bound = if iv.link_bound() { "link" } else { "cpu" },
                wire_mbit = (iv.wire_rate * 8.0 / 1e6).round(),
                used = iv.used,
                cores = iv.cores,
                "compress auto: weighed against {current}: {}",
                w.0.iter()
                    .map(|&(c, t)| format!(
                        "{c} {:.0} MB/s ({:.2}x)",
                        t / 1e6,
                        w.gain(c, current).unwrap_or(0.0)
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            self.verdicts.add(w);
        }
        let next = self.verdicts.choose(current);
        self.link.add(&iv);
        (next != current).then(|| {
            self.cell.set(next);
            format!(
                "compress auto: {current} -> {next} (over {} interval(s); this one {}, wire {:.0} Mbit/s of a window allowing {:.0}, \
                 {:.1} of {:.1} core(s) used; {:.1} ns/byte to read, {:.1} to send; {})",
                self.verdicts.len(),
                if iv.link_bound() { "link-bound" } else { "CPU-bound" },
                iv.wire_rate * 8.0 / 1e6,
                iv.window_rate * 8.0 / 1e6,
                iv.used,
                iv.cores,
                costs.read * 1e9,
                costs.send * 1e9,
                self.samples
                    .iter()
                    .filter(|s| s.codec != Codec::None)
                    .map(|s| format!("{} {:.2}x at {:.0} MB/s", s.codec, s.ratio, s.bytes_per_sec / 1e6))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
    }
}

impl Migration {
    /// Enters `phase`: recorded (errors are charged to it) and published.
    fn enter(&mut self, phase: Phase, shown: pb::MigrationPhase, message: impl Into<String>) {
        self.at = phase;
        self.show(shown, message);
    }

    /// Publishes progress within the phase.
    fn show(&self, shown: pb::MigrationPhase, message: impl Into<String>) {
        self.ctx.outgoing.set_phase(&self.h, shown, message.into());
    }

    /// Records a switchover step, in microseconds since the guest stopped.
    fn mark(&self, f: impl FnOnce(&mut pb::DowntimeBreakdown, u64)) {
        self.mark_at(SystemTime::now(), f)
    }

    /// Fits `conn`'s send window to its congestion window: with the usual margin ahead
    /// of it, or, `tight`, with none (`tight_tail_window`). Returns the window set.
    fn fit_send_window(&self, conn: &quinn::Connection, tight: bool) -> u64 {
        if tight {
            self.ctx.quic.fit_send_window_tight(conn)
        } else {
            self.ctx.quic.fit_send_window(conn)
        }
    }

    /// How long after the source guest stopped `at` was (zero before the stop, or
    /// unknown).
    fn since_stop(&self, at: SystemTime) -> Duration {
        self.stop_time
            .and_then(|t| at.duration_since(t).ok())
            .unwrap_or_default()
    }

    /// Records a switchover step that happened at `at`.
    fn mark_at(&self, at: SystemTime, f: impl FnOnce(&mut pb::DowntimeBreakdown, u64)) {
        let us = self.since_stop(at).as_micros() as u64;
        self.h.update(|s| {
            f(
                s.stats
                    .get_or_insert_with(Default::default)
                    .downtime_breakdown
                    .get_or_insert_with(Default::default),
                us,
            )
        });
    }

    /// Records (and shows) a policy decision.
    fn policy(&self, msg: &str) {
        self.h.update(|s| {
            s.message = msg.to_string();
            let st = s.stats.get_or_insert_with(Default::default);
            st.policy_applied = msg.to_string();
        });
    }

    /// After round 0: the prediction from what it measured (link, write rate, codec),
    /// published, and the convergence check the preflight used to make before any page
    /// moved: a migration that cannot converge stops here unless forced (then the stall
    /// policy decides, as before).
    /// `wire` is the bytes round 0 put on QUIC.
    fn after_round0(&mut self, r0: crate::preflight::Round0, wire: f64) -> Res<()> {
        let p = crate::preflight::predict_after_round0(
            r0,
            self.spec.memory_mib << 20,
            self.p.page_streams,
            self.p.downtime_ms,
            self.p.max_rounds,
            if self.p.verify == VerifyMode::Full {
                self.spec.memory_mib << 20
            } else {
                0
            },
        );
        // A round 0 of a few MiB is mostly the connection's start-up: no verdict from it.
        let refusal = if wire >= f64::from(4u32 << 20) {
            crate::preflight::round0_refusal(&p)
        } else {
            None
        };
        self.h.update(|s| {
            let st = s.stats.get_or_insert_with(Default::default);
            // A preflight that measured (pacing) keeps its own figures.
            if st
                .prediction
                .as_ref()
                .is_none_or(|old| old.link_bytes_per_sec == 0.0)
            {
                st.prediction = Some(p);
            }
        });
        match refusal {
            Some(why) if !self.p.force => Err(JobError::new(
                Phase::Precopy,
                format!("{why} — --force goes on and lets --on-stall decide"),
            )),
            Some(why) => {
                self.show(pb::MigrationPhase::Precopy, format!("forced past: {why}"));
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Settles the audit's suspects against a collection of written pages: a page that
    /// read differently from what was sent and that the tracker did not report is a
    /// write the tracker missed, and the migration stops (the guest stays here).
    fn check_audit(&self, a: &mut TrackerAudit, collected: &DirtyBitmap, at: Phase) -> Res<()> {
        let missed = a.settle(collected);
        let audited = a.audited();
        self.h.update(|s| {
            if let Some(st) = s.stats.as_mut() {
                st.audited_pages = audited;
            }
        });
        if missed.is_empty() {
            return Ok(());
        }
        let shown: Vec<String> = missed.iter().take(8).map(|p| p.to_string()).collect();
        Err(JobError::new(
            at,
            format!(
                "the write tracker missed guest writes: {} page(s) (first: {}) no longer hold what was sent and were not reported written; \
                 the guest keeps running on this host (audit of {audited} pages so far)",
                missed.len(),
                shown.join(", ")
            ),
        ))
    }

    fn qmp(&self) -> &QmpClient {
        self.proc.qmp()
    }

    /// Fires a failpoint (see `failpoint.rs`); an injected error fails the current phase.
    async fn fail_point(&self, name: &'static str) -> Res<()> {
        crate::failpoint::hit(name, &self.ctx.cfg.state_dir)
            .await
            .map_err(fail(self.at, name))
    }

    /// The phases before the commit, in order, all cancellable. Ends with the target
    /// holding RAM and device state and the source QEMU fenced (completed).
    async fn drive(&mut self, undo: &mut Undo) -> Res<()> {
        let tracker = self.preflight().await?;
        // Write tracking is armed and round 0's pages are found while the target prepares
        // (the scan took 56-75 ms for a 1 GiB guest, 100 ms for 4 GiB, before the first
        // page could leave).
        let ram = Arc::new(
            RamFile::open(self.ctx.cfg.ram_path(&self.spec.name), false)
                .map_err(fail(Phase::Prepare, "open RAM"))?,
        );
        undo.ram = Some(ram.clone());
        let round0 = self.arm_tracker(tracker, &ram, undo).await?;
        let mut prepared = self.prepare(undo).await?;
        let mut link = self.connect(&mut prepared, ram, undo).await?;
        if !prepared.copies.is_empty() {
            self.mirror_disks(&link.conn, &prepared.copies, undo)
                .await?;
        }
        let precopied = self.precopy(&mut link, tracker, round0, undo).await?;
        let switched = self.switchover(&mut link, precopied, undo).await?;
        self.fence(switched).await?;
        undo.control = Some(link.ctl_tx);
        undo.control_rx = Some(link.ctl_rx);
        Ok(())
    }

    /// [`Phase::Preflight`]: hard failures stop here; soft ones unless forced. Returns
    /// the write tracker this host can use.
    async fn preflight(&mut self) -> Res<TrackerKind> {
        self.enter(
            Phase::Preflight,
            pb::MigrationPhase::Preparing,
            format!("preflight checks against {}", self.p.job.target),
        );
        let tracker = self.ctx.tracker.clone().map_err(|why| {
            JobError::new(
                Phase::Preflight,
                format!(
                    "no dirty-page tracker works on host {}: {why}",
                    self.ctx.cfg.host_name
                ),
            )
        })?;
        let report = crate::preflight::run(
            &self.ctx,
            &self.spec,
            Some(&self.proc),
            &self.p.job.target,
            self.p.job.codec,
            self.p.downtime_ms,
            self.p.job.bandwidth,
            // The link is measured by round 0 itself, unless pacing needs it up front.
            if self.ctx.cfg.migration.pace_to_link && self.p.job.bandwidth == 0 {
                crate::preflight::Depth::Measure
            } else {
                crate::preflight::Depth::Checks
            },
        )
        .await
        .map_err(|s| JobError::new(Phase::Preflight, s.message()))?;
        let failed: Vec<String> = report
            .checks
            .iter()
            .filter(|c| c.status == pb::CheckStatus::Fail as i32)
            .map(|c| {
                format!(
                    "{}: {}{}",
                    c.name,
                    c.detail,
                    if c.fix.is_empty() {
                        String::new()
                    } else {
                        format!(" (fix: {})", c.fix)
                    }
                )
            })
            .collect();
        self.h.update(|s| {
            s.stats.get_or_insert_with(Default::default).prediction = report.prediction
        });
        self.target_quic = report
            .target
            .as_ref()
            .and_then(|t| t.quic_addr.parse().ok());
        self.link_rate = report
            .prediction
            .as_ref()
            .map(|p| p.link_bytes_per_sec)
            .unwrap_or(0.0);
        if !(report.ok || report.ok_with_force && self.p.force) {
            let hint = if report.ok_with_force {
                " — only soft checks failed: --force overrides them"
            } else {
                ""
            };
            return Err(JobError::new(
                Phase::Preflight,
                format!("{}{hint}", failed.join("; ")),
            ));
        }
        if !failed.is_empty() {
            self.show(
                pb::MigrationPhase::Preparing,
                format!("forced past soft preflight failures: {}", failed.join("; ")),
            );
        }
        // Total time counts the migration itself, not the checks before it.
        let preflight = self.started.elapsed();
        self.started = Instant::now();
        self.h.update(|s| {
            s.stats.get_or_insert_with(Default::default).preflight_ms = preflight.as_millis() as u64
        });
        info!(migration = %self.p.job.id, ?preflight, "preflight done");
        self.fail_point("src.preflight.done").await?;
        Ok(tracker)
    }

    /// [`Phase::Prepare`]: plans the disks with the target (shared or copied), then the
    /// target makes the RAM file, the disk copies and a paused QEMU waiting for us.
    async fn prepare(&mut self, undo: &mut Undo) -> Res<Prepared> {
        self.enter(
            Phase::Prepare,
            pb::MigrationPhase::Preparing,
            format!("asking {} to prepare", self.p.job.target),
        );
        let chan = self
            .ctx
            .peers
            .get(&self.p.job.target, &self.ctx.identity)
            .await
            .map_err(|e| {
                JobError::new(
                    Phase::Prepare,
                    format!("cannot reach target agent {}: {e}", self.p.job.target),
                )
            })?;
        let mut peer = FerryPeerClient::new(chan);
        // Disks: shared storage stays put, the rest travels through an NBD mirror.
        let plans = super::disks::plan(&self.ctx.storage, &self.spec, &mut peer, self.p.storage)
            .await
            .map_err(fail(Phase::Prepare, "storage"))?;
        let copies: Vec<pb::DiskProbe> = plans
            .iter()
            .filter(|p| !p.shared)
            .map(|p| p.probe.clone())
            .collect();
        let storage = match (plans.len(), copies.len()) {
            (0, _) => "none".to_string(),
            (_, 0) => "shared".to_string(),
            (n, c) if c == n => "copied".to_string(),
            (n, c) => format!("shared ({}), copied ({c})", n - c),
        };
        if !plans.is_empty() {
            self.show(pb::MigrationPhase::Preparing, format!("storage: {storage}"));
        }
        self.h
            .update(|s| s.stats.get_or_insert_with(Default::default).storage = storage.clone());
        // The token is ours, journaled before Prepare: a source that dies before the answer
        // can still ask about (and abort) what the target prepared.
        let token = uuid::Uuid::new_v4().simple().to_string();
        self.h.set_meta(|m| m.token = Some(token.clone()));
        self.ctx.outgoing.persist(&self.h);
        self.token = token.clone();
        let request = pb::PrepareRequest {
            migration_id: self.p.job.id.clone(),
            spec: Some(spec_to_pb(&self.spec)),
            source_host: self.ctx.cfg.host_name.clone(),
            protocol_version: u32::from(PROTOCOL_VERSION),
            copy_disks: copies.clone(),
            shared_disks: plans
                .iter()
                .filter(|p| p.shared)
                .map(|p| p.probe.clone())
                .collect(),
            token: token.clone(),
        };
        // The data plane opens while the target prepares, to the address its facts gave: the
        // QUIC handshake (a round trip, and careful resume's check of it) and the Hello,
        // which the target answers once its Prepare is done (two round trips, 45 ms on wan,
        // that no longer come after Prepare). A refused Prepare does not wait for it.
        let early_addr = self.target_quic;
        let ram_bytes = undo.ram.as_ref().map(|r| r.len());
        let this = &*self;
        let early = async move {
            let (a, ram_bytes) = (early_addr?, ram_bytes?);
            Some((a, this.open_data_plane(a, ram_bytes).await))
        };
        // Set before the call: a Prepare that fails, times out or is cancelled may still
        // finish on the target, and the rollback's Abort tells it not to wait for us.
        undo.peer = Some(peer.clone());
        let (answer, early) = {
            let rpc = peer.prepare(request);
            tokio::pin!(rpc, early);
            let mut early_out = None;
            let answer = loop {
                tokio::select! {
                    a = &mut rpc => break a,
                    e = &mut early, if early_out.is_none() => early_out = Some(e),
                }
            };
            let early = match early_out {
                // Failed while the target was still preparing (a target stalled longer
                // than the handshake's deadline): `connect` opens afresh now it answered.
                Some(Some((_, Err(_)))) => None,
                Some(e) => e,
                None if answer.is_ok() => early.await,
                None => None,
            };
            (answer, early)
        };
        let prep = answer
            .map_err(|s| {
                self.ctx.peers.forget_if_unreached(&self.p.job.target, &s);
                JobError::new(
                    Phase::Prepare,
                    format!(
                        "target {} refused to prepare: {}",
                        self.p.job.target,
                        status_msg(&s)
                    ),
                )
            })?
            .into_inner();
        undo.peer = Some(peer);
        self.fail_point("src.prepare.done").await?;
        if prep.token != token {
            return Err(JobError::new(
                Phase::Prepare,
                format!(
                    "target {} answered with another token than the one sent (an old agent?)",
                    self.p.job.target
                ),
            ));
        }
        let target_label = format!("{} ({})", prep.target_host, self.p.job.target);
        self.h.update(|s| s.target = target_label);
        Ok(Prepared {
            quic_addr: prep.quic_addr,
            copies,
            early,
        })
    }

    /// [`Phase::Connect`]: QUIC with mutual TLS, a control stream (hello, token) and N
    /// page streams.
    async fn connect(
        &mut self,
        prepared: &mut Prepared,
        ram: Arc<RamFile>,
        undo: &mut Undo,
    ) -> Res<Link> {
        self.enter(
            Phase::Connect,
            pb::MigrationPhase::Connecting,
            format!("connecting data plane to {}", prepared.quic_addr),
        );
        let at = Phase::Connect;
        let quic_addr: SocketAddr = prepared.quic_addr.parse().map_err(fail(at, "address"))?;
        let early = prepared.early.take();
        let use_of = early.as_ref().map(|(a, r)| {
            let open = match r {
                Ok((c, _)) => Ok(c.close_reason().is_none()),
                Err(f) => Err(f.answered),
            };
            early_handshake(*a, open, quic_addr)
        });
        let (conn, ctl) = match (early, use_of) {
            (Some((_, Ok(opened))), Some(EarlyHandshake::Use)) => {
                info!(migration = %self.p.job.id, rtt = ?opened.0.rtt(), "data plane opened while the target prepared");
                opened
            }
            (Some((_, Err(f))), Some(EarlyHandshake::Report)) => return Err(f.err),
            _ => self
                .open_data_plane(quic_addr, ram.len())
                .await
                .map_err(|f| f.err)?,
        };
        undo.conn = Some(conn.clone());
        let (ctl_tx, ctl_rx) = ctl.split();
        let ctl_rx = spawn_control_reader(ctl_rx);
        let mut writers = Vec::new();
        for i in 0..self.p.page_streams {
            let mut s = conn.open_uni().await.map_err(fail(at, "page stream"))?;
            write_stream_header(&mut s, StreamHeader::new(StreamKind::Pages, i as u16))
                .await
                .map_err(fail(at, "page stream"))?;
            writers.push(FrameWriter::new(s));
        }
        self.fail_point("src.connect.done").await?;
        Ok(Link {
            base_rtt: conn.rtt(),
            conn,
            peer: quic_addr,
            ctl_tx,
            ctl_rx,
            writers,
            ram,
        })
    }

    /// Opens the data plane: the QUIC connection ([`Migration::connect_resumed`]), the
    /// control stream, and the Hello the target answers once the migration is prepared
    /// there (it waits for a Prepare still running: [`super::target::HELLO_WAITS_FOR_PREPARE`]).
    async fn open_data_plane(
        &self,
        addr: SocketAddr,
        ram_bytes: u64,
    ) -> Result<OpenedDataPlane, OpenFailure> {
        let at = Phase::Connect;
        let unanswered = |err| OpenFailure {
            err,
            answered: false,
        };
        let conn = self.connect_resumed(addr).await.map_err(unanswered)?;
        let answered = |err| OpenFailure {
            err,
            answered: true,
        };
        let (mut cs, cr) = conn
            .open_bi()
            .await
            .map_err(|e| answered(fail(at, "control stream")(e)))?;
        write_stream_header(&mut cs, StreamHeader::new(StreamKind::Control, 0))
            .await
            .map_err(|e| answered(fail(at, "control stream")(e)))?;
        let mut ctl = ControlChannel::new(cs, cr);
        ctl.send(&ControlMessage::Hello {
            version: PROTOCOL_VERSION,
            migration_id: self.p.job.id.clone(),
            token: self.token.clone(),
            ram_bytes,
            page_size: PAGE_SIZE as u32,
            page_streams: self.p.page_streams as u16,
        })
        .await
        .map_err(|e| answered(fail(at, "handshake")(e)))?;
        let handshake = |e: String| JobError::new(at, format!("handshake: {e}"));
        // The target may first finish its Prepare (up to HELLO_WAITS_FOR_PREPARE).
        let wait = super::target::HELLO_WAITS_FOR_PREPARE + Duration::from_secs(5);
        match tokio::time::timeout(wait, ctl.recv()).await {
            Ok(Ok(ControlMessage::HelloOk { .. })) => Ok((conn, ctl)),
            Ok(Ok(ControlMessage::Error { message })) => {
                Err(answered(handshake(format!("target refused: {message}"))))
            }
            Ok(Ok(other)) => Err(answered(handshake(format!("unexpected {other:?}")))),
            Ok(Err(e)) => Err(answered(handshake(e.to_string()))),
            Err(_) => Err(unanswered(handshake(format!(
                "no answer from target within {} s",
                wait.as_secs()
            )))),
        }
    }

    /// Opens the data-plane connection, its congestion window resumed from what this
    /// path carried lately when the handshake's RTT says it is the same path (careful
    /// resume: `ferry_transport::resume`), else with slow start.
    async fn connect_resumed(&self, addr: SocketAddr) -> Res<quinn::Connection> {
        use ferry_transport::resume::{resume_window, rtt_matches};
        let at = Phase::Connect;
        let saved = self
            .ctx
            .cfg
            .migration
            .careful_resume
            .then(|| self.ctx.paths.get(addr))
            .flatten();
        let floor = ferry_transport::default_initial_window();
        let window = resume_window(saved.as_ref(), Instant::now(), floor);
        let conn = self
            .ctx
            .quic
            .connect_ip_with_window(addr, window)
            .await
            .map_err(fail(at, ""))?;
        let (Some(w), Some(s)) = (window, saved) else {
            return Ok(conn);
        };
        if rtt_matches(s.rtt, conn.rtt()) {
            info!(migration = %self.p.job.id, "careful resume: the data plane starts with a {w}-byte window (this path carried {:.0} Mbit/s at {:?} RTT {:.0} s ago)",
                s.delivered_bytes_per_sec * 8.0 / 1e6, s.rtt, s.at.elapsed().as_secs_f64());
            return Ok(conn);
        }
        // Another path behind the address: nothing sent yet, so start over with slow start.
        info!(migration = %self.p.job.id, "careful resume not used: handshake RTT {:?} against {:?} saved for this path", conn.rtt(), s.rtt);
        self.ctx.paths.forget(addr);
        conn.close(0u32.into(), b"path changed; reconnecting");
        self.ctx.quic.connect_ip(addr).await.map_err(fail(at, ""))
    }

    /// Arms write tracking inside the source QEMU (uffd taken from the process) and
    /// starts the scan for round 0's pages (every non-zero page), which must follow the
    /// arming: a page written after the scan is the tracker's. The tracker goes to `undo`
    /// (a rollback disarms it), after the VM's tracker is claimed (a `ferryctl preflight`
    /// dirty-rate sample may hold it for ~1 s).
    async fn arm_tracker(
        &mut self,
        tracker_kind: TrackerKind,
        ram: &Arc<RamFile>,
        undo: &mut Undo,
    ) -> Res<Round0Scan> {
        let at = Phase::Prepare;
        let claim = self
            .ctx
            .trackers
            .claim(&self.spec.name, Duration::from_secs(5))
            .await
            .ok_or_else(|| {
                JobError::new(
                    at,
                    format!(
                        "the write tracker of VM '{}' stayed busy for 5 s (a dirty-rate sample?)",
                        self.spec.name
                    ),
                )
            })?;
        undo.tracker_claim = Some(claim);
        let ram_path = self.ctx.cfg.ram_path(&self.spec.name);
        let mut tracker = tracker_kind
            .attach(
                self.proc.pid() as i32,
                DEFAULT_SHIM_FD,
                &ram_path,
                ram.len(),
            )
            .map_err(fail(at, "arm tracker"))?;
        tracker.arm().map_err(fail(at, "arm tracker"))?;
        // Round 0's first collection covers everything since now: its rate is measured
        // from here.
        let armed_at = Instant::now();
        undo.tracker = Some(tracker);
        let ram2 = ram.clone();
        // On as many threads as the page streams compress on: since the target answers
        // Prepare before its QEMU starts, the scan is what round 0's first page waits for.
        let threads = self.p.page_streams.max(1) as usize;
        let scan = tokio::task::spawn_blocking(move || {
            let t = Instant::now();
            ram2.nonzero_pages_parallel(threads)
                .map(|p| (p, t.elapsed()))
        });
        Ok(Round0Scan { armed_at, scan })
    }

    /// [`Phase::Precopy`]: rounds of written pages while the guest runs (write tracking
    /// armed and round 0's pages found by [`Migration::arm_tracker`]), until the stall
    /// policy says switch over.
    async fn precopy(
        &mut self,
        link: &mut Link,
        tracker_kind: TrackerKind,
        round0: Round0Scan,
        undo: &mut Undo,
    ) -> Res<Precopied> {
        self.enter(
            Phase::Precopy,
            pb::MigrationPhase::Precopy,
            "copying guest memory (round 0: every non-zero page)",
        );
        let at = Phase::Precopy;
        let Round0Scan { armed_at, scan } = round0;
        let tracker_name = undo.tracker.as_ref().map(|t| t.name()).unwrap_or("none");
        // The soft-dirty tracker can lose a write by design (between reading pagemap and
        // clearing the bits): with it the pause scans the whole RAM instead.
        if self.p.verify == VerifyMode::Sent && tracker_kind == TrackerKind::SoftDirty {
            self.p.verify = VerifyMode::Full;
            self.policy(
                "verify full: the soft-dirty tracker can miss a write, so the pause hashes all RAM",
            );
        }
        self.qmp()
            // No return path: see the fence.
            .migrate_set_capabilities(&[
                ("x-ignore-shared", true),
                ("events", true),
                ("return-path", false),
                ("pause-before-switchover", true),
            ])
            .await
            .map_err(fail(at, "set capabilities"))?;
        self.h.update(|s| {
            if let Some(st) = s.stats.as_mut() {
                st.tracker = tracker_name.into();
                st.verify = self.p.verify.as_str().into();
            }
        });
        // Pace to the probed link rate: QUIC's BBR alone overshot the testbed's one-BDP
        // bottleneck queue and lost ~40% of what it sent (benches/RESULTS.md).
        let pace = if self.p.job.bandwidth > 0 {
            self.p.job.bandwidth
        } else if self.ctx.cfg.migration.pace_to_link && self.link_rate > 0.0 {
            (self.link_rate * PACE_HEADROOM) as u64
        } else {
            0
        };
        let remembered = (self.p.job.compression == Compression::Auto)
            .then(|| self.ctx.codecs.get(&self.p.job.target))
            .flatten();
        if let Some(r) = remembered {
            info!(migration = %self.p.job.id, link_mbit = r.link.pushed.map(|b| (b * 8.0 / 1e6).round()),
                "compress auto: starting with {}, where round 0 of the last migration to {} ended", r.codec, self.p.job.target);
        }
        let mut sender = PageSender::new(
            std::mem::take(&mut link.writers),
            link.ram.clone(),
            self.p
                .job
                .compression
                .initial_with(remembered.map(|r| r.codec)),
        )
        .with_rate_limit(pace);
        // `--verify sent`: sums of what is sent, and the audit that keeps them honest.
        let mut audit = None;
        if self.p.verify == VerifyMode::Sent {
            sender = sender.with_sums();
            audit = Some(TrackerAudit::new(
                link.ram.page_count(),
                self.ctx.cfg.migration.audit_pages_per_round,
            ));
        }
        let mut audit_task: Option<RunningAudit> = None;
        // Whether an audit window has been settled (see RunningAudit::required).
        let mut audit_settled = false;
        let mut collected_at = armed_at;
        let mut prev_dirty = u64::MAX;
        // Whether the last round did not shrink against the one before it.
        let mut prev_flat = false;
        let waited = Instant::now();
        let (mut pending, took) = scan
            .await
            .map_err(fail(at, "scan RAM"))?
            .map_err(fail(at, "scan RAM"))?;
        info!(migration = %self.p.job.id, pages = pending.count(), ?took, waited = ?waited.elapsed(), "round 0: non-zero pages found (while the target prepared)");
        let mut round: u32 = 0;
        let mut dirty_rate: f64; // pages per second during the last pre-copy round
                                 // The write rate as last known, for the live ETA (round 0's early sample first).
        let mut known_dirty_rate = 0.0;

        // `--compress auto`: the codec sample runs beside round 0.
        let mut auto = (self.p.job.compression == Compression::Auto).then(|| {
            let (ram, pages) = (link.ram.clone(), pending.clone());
            AutoCodec {
                samples_task: Some(tokio::task::spawn_blocking(move || {
                    auto_codec::sample(&ram, &pages)
                })),
                base: Vec::new(),
                samples: Vec::new(),
                cell: sender.codec(),
                cores_limit: std::thread::available_parallelism()
                    .map(|n| n.get() as f64)
                    .unwrap_or(1.0),
                streams: self.p.page_streams.max(1) as f64,
                link: remembered.map(|r| r.link).unwrap_or_default(),
                costs: auto_codec::CostKnowledge::default(),
                verdicts: auto_codec::Verdicts::default(),
                mark: None,
            }
        });
        let round_deadline = Duration::from_secs(self.ctx.cfg.migration.round_timeout_s.max(1));
        self.ctx.quic.fit_send_window(&link.conn);
        // The rounds announced and not yet confirmed, oldest first, and what the
        // confirmations say.
        let mut unconfirmed: VecDeque<Unconfirmed> = VecDeque::new();
        // Whether the next round waits for the oldest confirmation (StallDecision::Drain).
        let mut drain = false;
        // Whether a drain happened: at most one per migration.
        let mut drained = false;
        // The share of round 0's packets lost (known after it), for `tight_tail_window`.
        let mut round0_loss: Option<f64> = None;
        // Whether the last round's writes were not compared with the round before it.
        let mut last_passed = false;
        let mut confirmations = Confirmations::default();
        // Debug only: the path as the congestion controller sees it, until pre-copy ends.
        let _path_trace = super::path_trace::PathTrace::start(&link.conn, &self.p.job.id);
        loop {
            // `tight_tail_window`: from round 2 on, nothing written waits ahead of the wire
            // (by default on a path round 0 found lossless).
            let setting = self.ctx.cfg.migration.tight_tail_window;
            let tight = setting.applies(round, round0_loss);
            if tight {
                let w = self.fit_send_window(&link.conn, tight);
                if round == 2 {
                    info!(migration = %self.p.job.id, send_window = w, "tight_tail_window: from round 2 on the send window is the congestion window alone");
                }
            } else if round == 2 && setting == crate::config::TightTailWindow::Lossless {
                info!(migration = %self.p.job.id, loss = round0_loss.unwrap_or(0.0),
                    "tight_tail_window: round 0 lost packets, the send window keeps its margin");
            }
            let wire0 = sender.counters.wire_bytes.load(Ordering::Relaxed);
            let t0 = Instant::now();
            sender.note_resent(&pending);
            // Round 0 also samples the guest's write rate early on: over a whole long
            // round the count of distinct pages saturates at the working set and reads
            // as a lower rate than the guest's. What the sample collects joins round 1.
            // With `auto` the codec is revisited every STEP_EVERY while the round runs.
            // Its rate (pages per second since the arming), 0 when not taken this round.
            let mut sampled_rate = 0.0;
            // What the sample and later mid-round collections returned: joins the next
            // round's set.
            let mut collected: Option<DirtyBitmap> = None;
            // Wire bytes and time at that mark: round 0's rate after the connection's
            // start-up, for the prediction (slow start on a long path skews the average).
            let mut ramped: Option<(u64, f64)> = None;
            {
                let counters = sender.counters.clone();
                if let Some(a) = auto.as_mut() {
                    // Intervals lie inside rounds: the pause between them says nothing.
                    a.mark = None;
                }
                let round_pages = pending.count();
                let at_start = (
                    counters.pages_done(),
                    counters.wire_bytes.load(Ordering::Relaxed),
                );
                let skip = sender.skip_set();
                let mut last_collect = Instant::now();
                let send = sender.send_round(round, &pending, round == 0);
                tokio::pin!(send);
                let mut sampled_writes = round > 0 || undo.tracker.is_none();
                // One tick drives the live status, auto's steps and the write sample.
                let mut tick = tokio::time::interval(progress::PROGRESS_EVERY);
                loop {
                    tokio::select! {
                        r = &mut send => {
                            if let Err(e) = r {
                                let why = why_sending_failed(&mut link.ctl_rx, e).await;
                                return Err(fail(at, "send pages")(why));
                            }
                            break;
                        }
                        _ = tick.tick() => {}
                    }
                    // Keep what is written close to the wire (see send_window_for).
                    self.fit_send_window(&link.conn, tight);
                    self.round_progress(
                        &counters,
                        round,
                        round_pages,
                        at_start,
                        t0,
                        known_dirty_rate,
                    );
                    if let Some(a) = auto.as_mut() {
                        if let Some(msg) = a.tick(&counters, &link.conn.stats()).await {
                            info!(migration = %self.p.job.id, "{msg}");
                            self.show(pb::MigrationPhase::Precopy, msg);
                        }
                    }
                    let el = t0.elapsed();
                    let sample_due = !sampled_writes && el >= WRITE_RATE_SAMPLE;
                    if sample_due {
                        sampled_writes = true;
                        ramped = Some((
                            counters.wire_bytes.load(Ordering::Relaxed),
                            el.as_secs_f64(),
                        ));
                    }
                    // Pages written again since the round began are left for the next
                    // round instead of being sent twice. Not before round 0's write-rate
                    // sample: it must count every write since the arming.
                    let skip_due = !sample_due
                        && sampled_writes
                        && last_collect.elapsed() >= SKIP_COLLECT_EVERY;
                    let tracker = undo.tracker.as_mut().filter(|_| sample_due || skip_due);
                    if let Some(t) = tracker {
                        // A look where the tracker can (the round's end collects these
                        // pages again): re-protecting mid-round cost a TLB flush per
                        // 2 MiB region written, thousands of them in rounds 0 and 1.
                        let (pages, looked) =
                            look_or_collect(t.as_mut()).map_err(fail(at, "collect dirty pages"))?;
                        last_collect = Instant::now();
                        skip.add(&pages);
                        if sample_due {
                            let secs = armed_at.elapsed().as_secs_f64().max(1e-3);
                            sampled_rate = pages.count() as f64 / secs;
                            known_dirty_rate = sampled_rate;
                        }
                        if !looked {
                            match collected.as_mut() {
                                Some(c) => c.union_with(&pages),
                                None => collected = Some(pages),
                            }
                        }
                    }
                }
            }
            // A round counts as done when the target has written it, not when QUIC
            // buffered it: otherwise throughput is overestimated and a backlog lands in the
            // downtime. The next round does not wait for that, though (a round trip with the link
            // idle, ~0.3 s of a wan migration): pages of one region always travel on one
            // stream, so a page's later copy cannot overtake its earlier one. Up to
            // MAX_ROUNDS_IN_FLIGHT rounds are left unconfirmed: a round lasts as long as its
            // pages take to leave, not a round trip, so the last one, and the final round
            // that holds its writes, shrink below a round trip's worth of the guest's
            // writes. QUIC's send window (fitted to the congestion window) keeps what they
            // queue small. Round 0 is confirmed at once, since the prediction made after it
            // needs the link's rate.
            let sent = sender.counters.wire_bytes.load(Ordering::Relaxed) - wire0;
            let this = Unconfirmed {
                round,
                batches_total: sender.batches_total(),
                wire_bytes: sent,
                started: t0,
            };
            announce_round(&mut link.ctl_tx, &this).await?;
            // How long this round waited for earlier ones (see round_comparable).
            let waiting = Instant::now();
            let drain_round = std::mem::take(&mut drain);
            let round0 = if round == 0 {
                Some(this)
            } else {
                unconfirmed.push_back(this);
                None
            };
            confirmations
                .confirm_arrived(
                    &mut link.ctl_rx,
                    &mut unconfirmed,
                    MAX_ROUNDS_IN_FLIGHT,
                    drain_round,
                    round_deadline,
                )
                .await?;
            let waited = waiting.elapsed();
            if let Some(this) = round0 {
                confirmations
                    .confirm(&mut link.ctl_rx, this, round_deadline)
                    .await?;
                if let Some(a) = auto.as_ref() {
                    self.ctx.codecs.record(
                        &self.p.job.target,
                        auto_codec::Remembered {
                            codec: sender.codec().get(),
                            link: a.link,
                        },
                    );
                }
                // What this path carried, for the next connection to the same peer.
                if let Some(bw) = confirmations.bandwidth {
                    self.ctx.paths.record(
                        link.peer,
                        ferry_transport::resume::PathRecord {
                            delivered_bytes_per_sec: bw,
                            rtt: link.base_rtt,
                            at: Instant::now(),
                        },
                    );
                }
            }
            self.fail_point("src.precopy.round").await?;
            let secs = t0.elapsed().as_secs_f64().max(1e-6);
            // The audit is not waited for: a window still hashing is settled at a later
            // round's end (waiting here made every short round 10-20 ms longer, and the
            // final round with it). Asked before the collection, so that a finished
            // window's reads all precede it.
            let audit_done = audit_task.as_ref().is_some_and(|t| t.task.is_finished());
            let window_began = collected_at;
            collected_at = Instant::now();
            // The round's end is only looked at (`peek`) where the tracker can: the pages
            // are re-protected once another round is decided. A re-protecting collection
            // costs a TLB flush on QEMU's other cores per 2 MiB region written (8-9 ms for
            // ~500 scattered pages on this host, against 0.3-1 ms for a look), and before
            // the switchover those milliseconds were guest writes for the final round.
            let (mut dirty, peeked) = match undo.tracker.as_mut() {
                Some(t) => look_or_collect(t.as_mut()).map_err(fail(at, "collect dirty pages"))?,
                None => (DirtyBitmap::new(0), false),
            };
            if let Some(pages) = collected.take() {
                dirty.union_with(&pages);
            }
            #[cfg(feature = "failpoints")]
            crate::failpoint::forget_writes(&mut dirty);
            if let Some(t) = audit_task.as_mut() {
                t.since.union_with(&dirty);
            }
            if audit_done {
                if let (Some(a), Some(t)) = (audit.as_mut(), audit_task.take()) {
                    let suspects = t.task.await.map_err(fail(at, "tracker audit"))?;
                    a.add_suspects(suspects.unwrap_or_default());
                    self.check_audit(a, &t.since, at)?;
                    audit_settled = true;
                }
            }
            // The first window is required: pre-copy does not end before one window
            // begun after round 0 has been settled (the later ones only while rounds run).
            if audit_task.is_none() && !audit_settled {
                if let (Some(a), Some(sums)) = (audit.as_mut(), sender.sums()) {
                    audit_task = RunningAudit::start(a, sums, &link.ram, &dirty, true);
                }
            }
            info!(migration = %self.p.job.id, round, pages = pending.count(), written = dirty.count(),
                took = ?t0.elapsed(), window = ?collected_at.duration_since(window_began), confirm_waited = ?waited, audit_running = audit_task.is_some(),
                "pre-copy round ended");
            round += 1;
            let ratio = ratio(&sender);
            let bw = confirmations.bandwidth.unwrap_or(1e9).max(1.0);
            let predicted_ms = dirty.count() as f64 * PAGE_SIZE as f64 / ratio / bw * 1000.0;
            // Round 0's collection reaches back to the arming (see `armed_at`).
            let window = if round == 1 {
                armed_at.elapsed().as_secs_f64().max(secs)
            } else {
                secs
            };
            dirty_rate = dirty.count() as f64 / window;
            known_dirty_rate = dirty_rate.max(if round == 1 { known_dirty_rate } else { 0.0 });
            self.record_round(pb::RoundRecord {
                round: round - 1,
                pages: pending.count(),
                wire_bytes: sent,
                duration_ms: (secs * 1000.0) as u64,
                dirty_pages: dirty.count(),
                r#final: false,
            });
            self.publish(
                &sender,
                round,
                &dirty,
                dirty_rate,
                bw,
                predicted_ms,
                &format!("round {round}: {} pages written meanwhile", dirty.count()),
            );
            if round == 1 {
                let rate = dirty_rate.max(sampled_rate);
                // The next rounds carry the pages written meanwhile, which compress
                // differently from RAM as a whole (2.4x against 1.8x with zstd-1 on far):
                // the prediction takes their ratio from a sample of them.
                let codec = sender.codec().get();
                let (ram, pages) = (link.ram.clone(), dirty.clone());
                let next_ratio = tokio::task::spawn_blocking(move || {
                    let data = auto_codec::read_sample(&ram, &pages, 512).ok()?;
                    auto_codec::measure(codec, &data).ok().map(|s| s.ratio)
                })
                .await
                .ok()
                .flatten();
                let wire_end = sender.counters.wire_bytes.load(Ordering::Relaxed);
                let r0 = crate::preflight::Round0 {
                    wire_bytes_per_sec: crate::preflight::round0_rate(wire_end, secs, ramped),
                    rtt_ms: path_rtt(&link.conn, link.base_rtt).as_secs_f64() * 1000.0,
                    loss_rate: *round0_loss.insert(crate::preflight::path_loss(&link.conn)),
                    dirty_pages_per_sec: rate,
                    codec_ratio: next_ratio.unwrap_or(ratio),
                    next_round_bytes: dirty.count() * PAGE_SIZE as u64,
                    elapsed_ms: self.started.elapsed().as_secs_f64() * 1000.0,
                    device_save_ms: self.ctx.device_save.get(),
                    commit_tail_ms: self.ctx.commit_tail.get(&self.p.job.target),
                };
                self.after_round0(r0, wire_end as f64)?;
            }
            let count = dirty.count();
            pending = dirty;
            // The policy is a pure decision (`ferry_handoff::stall_decision`, unit-tested);
            // the throttle's cgroup writes stay here.
            let compared = ferry_handoff::compare_rounds(
                waited.as_secs_f64() * 1000.0,
                secs * 1000.0,
                link.base_rtt.as_secs_f64() * 1000.0,
                last_passed,
            );
            last_passed = !compared;
            let input = ferry_handoff::StallInput {
                round,
                max_rounds: self.p.max_rounds,
                dirty_pages: count,
                prev_dirty_pages: if compared { prev_dirty } else { u64::MAX },
                prev_flat,
                predicted_ms,
                path_ms: link.base_rtt.as_secs_f64() * 1000.0,
                downtime_ms: self.p.downtime_ms,
                can_throttle_more: true,
                audit_pending: audit_task.as_ref().is_some_and(|t| t.required),
                queued_ms: queued_ms(&unconfirmed, bw, link.base_rtt),
                window_ms: collected_at.duration_since(window_began).as_secs_f64() * 1000.0,
                after_drain: drain_round,
                drained,
            };
            prev_dirty = count;
            prev_flat = !ferry_handoff::shrank(count, input.prev_dirty_pages);
            match ferry_handoff::stall_decision(input, self.p.on_stall) {
                StallDecision::Switchover => break,
                StallDecision::Continue => {}
                StallDecision::Drain => {
                    info!(migration = %self.p.job.id, queued_ms = input.queued_ms, unconfirmed = unconfirmed.len(),
                        "the final round would queue behind earlier rounds: one more round, waiting for a confirmation");
                    drain = true;
                    drained = true;
                }
                StallDecision::StopAndCopy => {
                    let pct = undo.throttle.as_ref().map(|t| t.percent);
                    let msg = match pct {
                        Some(pct) => format!("throttled guest CPU to {pct}%, then stop-and-copy after {round} rounds ({count} pages left)"),
                        None => format!("stop-and-copy after {round} rounds: {count} pages left (predicted pause {predicted_ms:.0} ms)"),
                    };
                    warn!(migration = %self.p.job.id, "{msg}");
                    self.policy(&msg);
                    break;
                }
                StallDecision::Abort => {
                    return Err(JobError::new(at, format!(
                        "pre-copy does not converge after {round} rounds: the guest wrote {count} pages during the last round \
                         ({:.1} MiB/s) and the link moves {:.1} MiB/s of pages (--on-stall abort)",
                        dirty_rate * PAGE_SIZE as f64 / 1048576.0,
                        bw * ratio / 1048576.0
                    )))
                }
                StallDecision::ThrottleStep => {
                    if undo.throttle.is_none() {
                        let t = crate::throttle::CpuThrottle::attach(&self.spec.name, self.proc.pid()).map_err(fail(at, "throttle"))?;
                        undo.throttle = Some(t);
                    }
                    let stepped = match undo.throttle.as_mut() {
                        Some(t) => t.step_down().map_err(fail(at, "throttle"))?,
                        None => false,
                    };
                    let pct = undo.throttle.as_ref().map(|t| t.percent).unwrap_or(100);
                    if !stepped {
                        // At the quota's floor: what the decision says when it cannot throttle more.
                        let msg = format!("throttled guest CPU to {pct}%, then stop-and-copy after {round} rounds ({count} pages left)");
                        self.policy(&msg);
                        break;
                    }
                    let msg = format!("throttled guest CPU to {pct}% after round {round}: it wrote {count} pages during the round");
                    info!(migration = %self.p.job.id, "{msg}");
                    self.policy(&msg);
                    prev_dirty = u64::MAX;
                    prev_flat = false;
                }
            }
            // Another round: what was looked at is re-protected now, with whatever the
            // guest wrote since the look (the collection reports both).
            if peeked {
                let more = undo
                    .tracker
                    .as_mut()
                    .map(|t| t.collect())
                    .transpose()
                    .map_err(fail(at, "collect dirty pages"))?
                    .unwrap_or_else(|| DirtyBitmap::new(0));
                #[cfg(feature = "failpoints")]
                let more = {
                    let mut more = more;
                    crate::failpoint::forget_writes(&mut more);
                    more
                };
                if let Some(t) = audit_task.as_mut() {
                    t.since.union_with(&more);
                }
                pending.union_with(&more);
            }
            // The next audit window, when none is hashing, is hashed while it is sent.
            if audit_task.is_none() {
                if let (Some(a), Some(sums)) = (audit.as_mut(), sender.sums()) {
                    audit_task = RunningAudit::start(a, sums, &link.ram, &pending, false);
                }
            }
        }
        // A window begun only because rounds went on is not waited for (with the guest
        // writing on, that wait would land in the final round): it stops hashing and does
        // not count as audited.
        if let (Some(a), Some(t)) = (audit.as_mut(), audit_task.take_if(|t| !t.required)) {
            t.abandon(a);
        }
        // The link's rate the decision to stop was taken with.
        let bandwidth = confirmations.bandwidth;
        // The last rounds' confirmations are not waited for: the guest would write on for a
        // round trip (far: 50 ms, ~250 more pages in the pause) while they travel. What of
        // them is still in flight reaches the target ahead of the final pages on the same
        // streams; the latest one's confirmation (which covers those before it) is read
        // during the commit exchange.
        self.tail_round = unconfirmed.back().map(|u| (u.round, u.batches_total));
        Ok(Precopied {
            audit: audit.map(|a| (a, audit_task)),
            sender,
            pending,
            round,
            bandwidth,
            dirty_rate,
            collected_at,
        })
    }

    /// [`Phase::Switchover`]: QEMU pauses the guest before sending device state; the
    /// mirrors complete; the last pages, the digest request and QEMU's device state leave
    /// at once. Ends with QEMU told to continue (it is completing) and its device state on
    /// the way through the relay, which keeps a capture of it beside the RAM file.
    async fn switchover(
        &mut self,
        link: &mut Link,
        pre: Precopied,
        undo: &mut Undo,
    ) -> Res<Switched> {
        self.enter(
            Phase::Switchover,
            pb::MigrationPhase::Switchover,
            "pausing guest for switchover",
        );
        let at = Phase::Switchover;
        let Precopied {
            mut sender,
            pending,
            mut round,
            bandwidth,
            dirty_rate,
            audit,
            collected_at,
        } = pre;
        // The required audit window's suspects, when pre-copy ended at its round limit
        // before the window was done, settled against the pause's collection and those
        // since the window began.
        let mut audit = match audit {
            Some((mut a, running)) => {
                let mut since = DirtyBitmap::new(0);
                if let Some(t) = running {
                    let suspects = t.task.await.map_err(fail(at, "tracker audit"))?;
                    a.add_suspects(suspects.unwrap_or_default());
                    since = t.since;
                }
                Some((a, since))
            }
            None => None,
        };
        let relay_path = self
            .ctx
            .cfg
            .run_dir(&self.spec.name)
            .join(format!("migrate-{}.sock", self.p.job.short_id()));
        let _ = std::fs::remove_file(&relay_path);
        let listener =
            tokio::net::UnixListener::bind(&relay_path).map_err(fail(at, "device-state relay"))?;
        undo.relay_path = Some(relay_path.clone());
        let (mut ds, _dr) = link
            .conn
            .open_bi()
            .await
            .map_err(fail(at, "device-state stream"))?;
        write_stream_header(&mut ds, StreamHeader::new(StreamKind::DeviceState, 0))
            .await
            .map_err(fail(at, "device-state stream"))?;
        // The device state is kept beside the RAM file while the handoff is unsettled:
        // written as `.part`, renamed once the source QEMU completed (whole).
        let capture = self
            .ctx
            .cfg
            .ram_path(&self.spec.name)
            .with_extension(format!("devstate-{}", self.p.job.short_id()));
        let capture_part = capture.with_extension("part");
        let cap2 = capture_part.clone();
        // The device state travels with the codec the pages use now (none where the link
        // outruns the compressor).
        let codec = sender.codec().get();
        let relay = tokio::spawn(async move {
            let (unix, _) = listener.accept().await?;
            relay_capturing(unix, ds, codec, &cap2).await
        });
        let mut events = self.qmp().subscribe();
        let migrate_at = SystemTime::now();
        let t_migrate = collected_at.elapsed();
        self.qmp()
            .migrate(&format!("unix:{}", relay_path.display()))
            .await
            .map_err(fail(at, "start QEMU migration"))?;
        undo.migrate_issued = true;
        self.wait_pre_switchover(&mut events, migrate_at).await?;
        self.mark(|b, us| b.pre_switchover_us = us);
        self.fail_point("src.switchover.paused").await?;
        let pause_deadline =
            Duration::from_secs(self.ctx.cfg.migration.switchover_timeout_s.max(1));
        // Disks: the mirrors are in step (write-blocking) and the guest is paused; a READY
        // mirror cancelled now completes with both sides equal. Now, never later.
        if !undo.mirrors.is_empty() {
            self.finish_mirrors(undo).await?;
        }

        // The guest is paused. QEMU saves its device state while the last pages are
        // collected and travel: the state is on a stream of its own, the target holds it
        // until every last page is written, and a paused QEMU saving its devices does not
        // write guest RAM (a collection after the save began catches whatever it might,
        // one before could not). Sequential, the save followed the final round inside
        // the pause.
        let t_final = Instant::now();
        self.qmp()
            .migrate_continue("pre-switchover")
            .await
            .map_err(fail(at, "migrate-continue"))?;
        self.mark(|b, us| b.continue_us = us);
        // Last round, then the target must hold every page. Nothing is re-protected: the
        // guest stays paused here, and a rollback disarms the tracker (on this host a
        // re-protecting collection of ~500 scattered pages flushed TLBs for 5-8 ms).
        let mut last = undo
            .tracker
            .as_mut()
            .map(|t| t.collect_final())
            .transpose()
            .map_err(fail(at, "collect dirty pages"))?
            .unwrap_or_else(|| DirtyBitmap::new(0));
        if let Some((a, since)) = audit.as_mut() {
            since.union_with(&last);
            self.check_audit(a, since, at)?;
        }
        last.union_with(&pending);
        sender.note_resent(&last);
        let t_collected = t_final.elapsed();
        let wire_before = sender.counters.wire_bytes.load(Ordering::Relaxed);
        // The send window as the congestion window is now (it was last fitted during a
        // pre-copy round).
        self.ctx.quic.fit_send_window(&link.conn);
        // Pipelined switchover: the last pages, the request for the target's digest and
        // QEMU's device state all leave at once; the target feeds the device state to its
        // QEMU (and hashes its RAM) only once every last page is written. One round trip
        // instead of three before the target can resume.
        let final_batches =
            tokio::time::timeout(pause_deadline, sender.send_round(round, &last, false))
                .await
                .map_err(|_| {
                    fail(at, "send final pages")(format!(
                        "the final round did not leave within {pause_deadline:?} (link stalled?)"
                    ))
                })?;
        let final_batches = match final_batches {
            Ok(_) => sender.batches_total(),
            Err(e) => {
                let why = why_sending_failed(&mut link.ctl_rx, e).await;
                return Err(fail(at, "send final pages")(why));
            }
        };
        let t_sent = t_final.elapsed();
        self.record_round(pb::RoundRecord {
            round,
            pages: last.count(),
            wire_bytes: sender.counters.wire_bytes.load(Ordering::Relaxed) - wire_before,
            duration_ms: t_sent.as_millis() as u64,
            dirty_pages: 0,
            r#final: true,
        });
        round += 1;
        let end = ControlMessage::FinalRoundEnd {
            round,
            batches_total: final_batches,
            verify: self.p.verify.compares(),
        };
        link.ctl_tx
            .write(&ferry_wire::Frame::encode_control(&end).map_err(fail(at, "round end"))?)
            .await
            .map_err(fail(at, "round end"))?;
        // The tracker stays armed: unregistering the whole of guest RAM took 20 ms for a
        // 4 GiB guest, here inside the pause, before the fence. A committed source drops
        // it once the guest runs on the target; a rollback disarms it.
        info!(migration = %self.p.job.id, pages = last.count(), ?t_migrate, written_for = ?collected_at.elapsed().saturating_sub(t_final.elapsed()),
            ?t_collected, ?t_sent, t_announced = ?t_final.elapsed(), "final round sent");
        self.fail_point("src.final_round.sent").await?;
        self.publish(
            &sender,
            round,
            &last,
            dirty_rate,
            bandwidth.unwrap_or(0.0),
            0.0,
            &format!("final round: {} pages", last.count()),
        );
        // The guest is paused: no estimate of the end is left to give.
        self.h.update(|s| {
            if let Some(st) = s.stats.as_mut() {
                st.eta_ms = 0;
            }
        });

        // The RAM files are final now. Their digests are computed while QEMU moves the
        // device state (a paused target QEMU loading state does not write guest RAM);
        // both must agree before the commit.
        let digest = match (self.p.verify, sender.sums()) {
            (VerifyMode::None, _) => {
                self.show(pb::MigrationPhase::Switchover, "sending device state");
                None
            }
            // O(pages): every page's sum as sent, the final round's included.
            (VerifyMode::Sent, Some(sums)) => {
                self.show(
                    pb::MigrationPhase::Verifying,
                    "comparing the sums of the pages sent while sending device state",
                );
                let sums = sums.clone();
                Some(tokio::task::spawn_blocking(move || Ok(sums.fingerprint())))
            }
            // O(RAM): the source's whole RAM as it is now.
            _ => {
                self.show(
                    pb::MigrationPhase::Verifying,
                    "comparing RAM digests while sending device state",
                );
                let ram2 = link.ram.clone();
                Some(tokio::task::spawn_blocking(move || ram2.fingerprint(2)))
            }
        };
        self.fail_point("src.device_state.sent").await?;
        Ok(Switched {
            sender,
            events,
            relay,
            capture,
            capture_part,
            digest,
            final_round: (round, final_batches),
            pause_deadline,
        })
    }

    /// [`Phase::Fence`]: without a return path the source QEMU completes as soon as its
    /// device state is in our relay (no round trip to the target), and a completed
    /// outgoing migration never resumes the guest by itself. Only a fenced source may
    /// send Commit. The capture is whole once QEMU completed and the relay finished.
    async fn fence(&mut self, sw: Switched) -> Res<()> {
        self.at = Phase::Fence;
        let at = Phase::Fence;
        let Switched {
            mut sender,
            mut events,
            relay,
            capture,
            capture_part,
            digest,
            final_round,
            pause_deadline,
        } = sw;
        let ev = ferry_qmp::wait_migration_status(
            &mut events,
            pause_deadline,
            &["completed", "failed", "cancelled"],
        )
        .await
        .map_err(fail(at, ""))?;
        if ev.migration_status() != Some("completed") {
            let why = qemu_migration_error(self.qmp()).await;
            return Err(JobError::new(
                at,
                format!(
                    "source QEMU migration {}: {why}",
                    ev.migration_status().unwrap_or("?")
                ),
            ));
        }
        let (completed_at, completed_seen) = (
            self.since_stop(ev.timestamp),
            self.since_stop(SystemTime::now()),
        );
        let (captured, forward) = tokio::time::timeout(pause_deadline, relay)
            .await
            .map_err(|_| JobError::new(at, "the device-state relay did not finish"))?
            .map_err(fail(at, "device-state relay"))?
            .map_err(fail(at, "device-state relay"))?;
        std::fs::rename(&capture_part, &capture).map_err(fail(at, "device-state capture"))?;
        self.h.set_meta(|m| m.capture = Some(capture.clone()));
        info!(migration = %self.p.job.id, ?completed_at, ?completed_seen, relay_done = ?self.since_stop(SystemTime::now()), captured, "source QEMU completed");
        self.mark(|b, us| b.fence_us = us);
        self.fail_point("src.fence.done").await?;
        // The source's half of the verification; the target compares when asked to commit.
        if let Some(task) = digest {
            let t = Instant::now();
            let local = task
                .await
                .map_err(fail(at, "verify"))?
                .map_err(fail(at, "verify"))?;
            self.local_digest = Some(local);
            info!(migration = %self.p.job.id, waited = ?t.elapsed(), "source digest ready");
        }
        let h = self.h.clone();
        let page_wire = sender.counters.wire_bytes.load(Ordering::Relaxed);
        tokio::spawn(async move {
            if let Ok(Ok(Ok(sent))) = tokio::time::timeout(Duration::from_secs(60), forward).await {
                h.update(|s| {
                    if let Some(st) = s.stats.as_mut() {
                        st.device_state_bytes = captured;
                        st.wire_bytes = page_wire + sent;
                    }
                });
            }
        });
        sender.finish();
        self.final_round = Some(final_round);
        Ok(())
    }

    /// Adds the data plane's packet totals to the metrics and the log, then closes it:
    /// committed and aborted migrations alike (the failed ones are often the lossy ones).
    fn close_data_plane(&self, c: quinn::Connection, code: u32, reason: &'static [u8]) {
        let st = c.stats();
        let (random_losses, floored) =
            ferry_transport::congestion::loss_decisions(&c).unwrap_or_default();
        let dp = &self.ctx.metrics.data_plane;
        dp.datagrams.inc_by(st.udp_tx.datagrams);
        dp.lost_packets.inc_by(st.path.lost_packets);
        dp.random_loss_events.inc_by(random_losses);
        dp.floored_reductions.inc_by(floored);
        // What the data plane cost in packets: datagrams per send call says whether UDP
        // segmentation offload (GSO) batched them, ACKs per datagram what the peer sent back.
        info!(
            migration = %self.p.job.id,
            datagrams = st.udp_tx.datagrams,
            send_calls = st.udp_tx.ios,
            bytes = st.udp_tx.bytes,
            acks_received = st.frame_rx.acks,
            datagrams_received = st.udp_rx.datagrams,
            lost_packets = st.path.lost_packets,
            congestion_events = st.path.congestion_events,
            window_held_mb = ferry_transport::congestion::held_bytes(&c).unwrap_or(0) / 1_000_000,
            random_losses,
            floored,
            mtu = st.path.current_mtu,
            rtt = ?st.path.rtt,
            "data plane totals"
        );
        c.close(code.into(), reason);
    }

    /// [`Phase::Commit`]. Not cancellable: from here on the source never resumes by itself.
    /// `CommitSent` is journaled with the VM record (held) before Commit leaves on the
    /// data plane's control stream; the target decides, journals, resumes and answers
    /// `Committed` once the VM is its own. Anything else and the caller asks the target.
    async fn commit(&mut self, undo: &mut Undo) -> Res<i64> {
        self.at = Phase::Commit;
        let at = Phase::Commit;
        self.h.update(|s| {
            s.phase = pb::MigrationPhase::Committing as i32;
            s.message = format!("committing on {}", self.p.job.target);
        });
        self.h.set_meta(|m| m.mark = SourceMark::CommitSent);
        let t0 = Instant::now();
        let vm = self
            .ctx
            .vms
            .held_record(&self.p.job.vm)
            .await
            .map_err(|s| JobError::new(at, s.message()));
        let t_record = t0.elapsed();
        let journaled = vm.and_then(|vm| {
            self.ctx
                .outgoing
                .persist_with(&self.h, vec![Op::PutVm(vm)])
                .map_err(fail(at, ""))
        });
        if let Err(e) = journaled {
            // Nothing was promised: roll back as before any commit.
            self.h.set_meta(|m| m.mark = SourceMark::BeforeCommit);
            return Err(JobError::new(
                at,
                format!("cannot journal the commit: {}", e.message),
            ));
        }
        info!(migration = %self.p.job.id, vm = %self.p.job.vm, ?t_record, t_journaled = ?t0.elapsed(), "committing on {}", self.p.job.target);
        self.fail_point("src.commit.journaled").await?;
        let (Some(tx), Some(rx)) = (undo.control.as_mut(), undo.control_rx.as_mut()) else {
            return Err(JobError::new(at, "no control stream"));
        };
        let digest = self.local_digest.map(|d| d.to_le_bytes());
        let msg = ControlMessage::Commit {
            digest,
            leave_paused: self.p.leave_paused,
        };
        tx.write(&ferry_wire::Frame::encode_control(&msg).map_err(fail(at, ""))?)
            .await
            .map_err(fail(at, "send Commit"))?;
        self.mark(|b, us| b.commit_sent_us = us);
        self.fail_point("src.commit.sent").await?;
        let (final_round, final_batches) = self.final_round.unwrap_or((u32::MAX, 0));
        let wait = Duration::from_secs(self.ctx.cfg.migration.commit_timeout_s.max(1));
        loop {
            let Arrived {
                msg, at: arrived, ..
            } = recv_control_at(rx, wait, at).await?;
            match msg {
                // An earlier unconfirmed pre-copy round: the tail's confirmation covers it.
                ControlMessage::RoundApplied { round, .. }
                    if self.tail_round.is_some_and(|(r, _)| round < r) => {}
                ControlMessage::RoundApplied {
                    round,
                    batches_applied,
                } if self.tail_round.is_some_and(|(r, _)| r == round) => {
                    let (_, batches) = self.tail_round.take().unwrap_or_default();
                    if batches_applied < batches {
                        return Err(JobError::new(
                            at,
                            format!("target wrote {batches_applied} of {batches} batches of round {round}"),
                        ));
                    }
                }
                ControlMessage::RoundApplied {
                    round,
                    batches_applied,
                } if round == final_round => {
                    if batches_applied < final_batches {
                        return Err(JobError::new(
                            at,
                            format!("target wrote {batches_applied} of {final_batches} batches"),
                        ));
                    }
                    self.mark_at(arrived, |b, us| b.final_round_us = us);
                }
                ControlMessage::DeviceStateLoaded { ok: true, .. } => {
                    self.mark_at(arrived, |b, us| b.device_state_us = us)
                }
                ControlMessage::DeviceStateLoaded { ok: false, error } => {
                    // The target refuses to commit now; its answer follows.
                    warn!(migration = %self.p.job.id, "target QEMU failed to load the device state: {}", error.unwrap_or_default());
                }
                ControlMessage::Committed {
                    resume_unix_us,
                    ready_unix_us,
                } => {
                    self.fail_point("src.commit.answered").await?;
                    if let Some(d) = self.local_digest {
                        // The target compared the fingerprints before it resumed.
                        self.h.update(|s| {
                            if let Some(st) = s.stats.as_mut() {
                                st.ram_digest = format!("{d:032x}");
                            }
                        });
                    }
                    return Ok(if self.p.leave_paused {
                        ready_unix_us
                    } else {
                        resume_unix_us
                    });
                }
                ControlMessage::Error { message } => {
                    return Err(JobError::new(
                        at,
                        format!("target refused to commit: {message}"),
                    ))
                }
                other => return Err(JobError::new(at, format!("unexpected {other:?}"))),
            }
        }
    }

    /// Mirrors every travelling disk into the target's NBD export, tunnelled over QUIC,
    /// until all mirrors are READY; then switches them to write-blocking so they stay in
    /// step while RAM moves.
    async fn mirror_disks(
        &mut self,
        conn: &quinn::Connection,
        copies: &[pb::DiskProbe],
        undo: &mut Undo,
    ) -> Res<()> {
        self.enter(
            Phase::Disks,
            pb::MigrationPhase::CopyingDisks,
            format!("mirroring {} disk(s) to the target", copies.len()),
        );
        let relay_path = self.ctx.cfg.run_dir(&self.spec.name).join(format!(
            "nbd-{}.sock",
            &self.p.job.id[..8.min(self.p.job.id.len())]
        ));
        let _ = std::fs::remove_file(&relay_path);
        let listener =
            tokio::net::UnixListener::bind(&relay_path).map_err(fail(Phase::Disks, "NBD relay"))?;
        undo.nbd_relay_path = Some(relay_path.clone());
        let counters = Arc::new(super::disks::TunnelCounters::default());
        // Every NBD connection QEMU opens becomes one QUIC stream to the target's QEMU.
        let (conn2, codec, c2, id) = (
            conn.clone(),
            self.p.job.codec,
            counters.clone(),
            self.p.job.id.clone(),
        );
        let listener_task = tokio::spawn(async move {
            while let Ok((unix, _)) = listener.accept().await {
                let (conn, c, id) = (conn2.clone(), c2.clone(), id.clone());
                tokio::spawn(async move {
                    let r = async {
                        let (mut send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
                        write_stream_header(&mut send, StreamHeader::new(StreamKind::NbdTunnel, 0))
                            .await
                            .map_err(|e| e.to_string())?;
                        super::disks::tunnel(unix, send, recv, codec, c).await
                    };
                    if let Err(e) = r.await {
                        warn!(migration = %id, "NBD tunnel: {e}");
                    }
                });
            }
        });
        undo.nbd_listener = Some(listener_task);
        // QEMU before 8.2 cannot switch a running mirror to write-blocking: use it from the start.
        let v = self.qmp().version();
        let can_switch = (v.major, v.minor) >= (8, 2);
        let first_mode = if can_switch {
            MirrorCopyMode::Background
        } else {
            MirrorCopyMode::WriteBlocking
        };
        let relay = relay_path.display().to_string();
        // Before the jobs start: a job that fails is gone from query-block-jobs, its error
        // only in its event.
        let mut job_events = self.qmp().subscribe();
        for c in copies {
            let node = super::disks::mirror_node(&c.id);
            self.qmp()
                .blockdev_add_nbd_unix(&node, &relay, &c.id)
                .await
                .map_err(|e| {
                    fail(Phase::Disks, "disk mirror")(format!("disk '{}': NBD client: {e}", c.id))
                })?;
            undo.mirrors.push(node.clone());
            self.qmp()
                .blockdev_mirror(&node, &c.id, &node, first_mode)
                .await
                .map_err(|e| fail(Phase::Disks, "disk mirror")(format!("disk '{}': {e}", c.id)))?;
        }
        let started = Instant::now();
        let ready_deadline =
            Duration::from_secs(self.ctx.cfg.migration.mirror_ready_timeout_s.max(1));
        loop {
            if started.elapsed() > ready_deadline {
                return Err(fail(Phase::Disks, "disk mirror")(format!("the disk mirrors were not READY within {ready_deadline:?} (mirror_ready_timeout_s)")));
            }
            let jobs = self
                .qmp()
                .query_block_jobs()
                .await
                .map_err(fail(Phase::Disks, "disk mirror"))?;
            let ours: Vec<_> = jobs
                .iter()
                .filter(|j| undo.mirrors.contains(&j.device))
                .collect();
            if ours.len() < undo.mirrors.len() {
                let why = super::disks::mirror_failure(&mut job_events, &undo.mirrors)
                    .unwrap_or_else(|| "a mirror job ended by itself".into());
                return Err(fail(Phase::Disks, "disk mirror")(format!(
                    "{why} (writing to {}: its storage full, or the NBD connection to it failed?)",
                    self.p.job.target
                )));
            }
            let (len, done) = ours
                .iter()
                .fold((0, 0), |(l, d), j| (l + j.len, d + j.offset));
            let ready = ours.iter().all(|j| j.ready);
            let wire = counters.wire.load(Ordering::Relaxed);
            self.h.update(|s| {
                let st = s.stats.get_or_insert_with(Default::default);
                st.disk_bytes_total = len;
                st.disk_bytes_done = done;
                st.disk_wire_bytes = wire;
                s.message = format!("mirroring disks: {} of {} MiB", done >> 20, len >> 20);
            });
            if ready {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        if can_switch {
            for node in &undo.mirrors {
                self.qmp()
                    .block_job_set_copy_mode(node, MirrorCopyMode::WriteBlocking)
                    .await
                    .map_err(fail(Phase::Disks, "disk mirror"))?;
            }
        }
        info!(migration = %self.p.job.id, elapsed = ?started.elapsed(), "disk mirrors ready; guest writes now reach both sides");
        self.disk_counters = Some(counters);
        self.fail_point("src.disks.ready").await
    }

    /// At pre-switchover: completes every (READY, write-blocking) mirror and removes its
    /// NBD node, leaving the source QEMU on its own disks.
    async fn finish_mirrors(&mut self, undo: &mut Undo) -> Res<()> {
        let mut events = self.qmp().subscribe();
        for node in &undo.mirrors {
            self.qmp()
                .block_job_cancel(node, false)
                .await
                .map_err(fail(Phase::Switchover, "disk mirror"))?;
        }
        let mut pending: Vec<String> = undo.mirrors.clone();
        while !pending.is_empty() {
            let ev = wait_for_event(&mut events, Duration::from_secs(60), |e| {
                matches!(
                    e.name.as_str(),
                    "BLOCK_JOB_COMPLETED" | "BLOCK_JOB_CANCELLED" | "BLOCK_JOB_ERROR"
                )
            })
            .await
            .map_err(fail(Phase::Switchover, "disk mirror"))?;
            let dev = ev
                .data
                .get("device")
                .and_then(|d| d.as_str())
                .unwrap_or_default()
                .to_string();
            if !pending.contains(&dev) {
                continue;
            }
            if ev.name != "BLOCK_JOB_COMPLETED" || ev.data.get("error").is_some() {
                return Err(fail(Phase::Switchover, "disk mirror")(format!(
                    "mirror {dev} ended with {} {}",
                    ev.name, ev.data
                )));
            }
            pending.retain(|p| *p != dev);
        }
        for node in std::mem::take(&mut undo.mirrors) {
            if let Err(e) = self.qmp().blockdev_del(&node).await {
                warn!(migration = %self.p.job.id, "blockdev-del {node}: {e}");
            }
        }
        if let Some(c) = &self.disk_counters {
            let wire = c.wire.load(Ordering::Relaxed);
            self.h.update(|s| {
                let st = s.stats.get_or_insert_with(Default::default);
                st.disk_bytes_done = st.disk_bytes_total.max(st.disk_bytes_done);
                st.disk_wire_bytes = wire;
            });
        }
        Ok(())
    }

    /// Waits for QEMU to pause the guest at `pre-switchover`, noting when vCPUs stopped.
    async fn wait_pre_switchover(
        &mut self,
        events: &mut tokio::sync::broadcast::Receiver<QmpEvent>,
        from: SystemTime,
    ) -> Res<()> {
        // QEMU's steps from `migrate` (at `from`) to the stop: the guest writes on
        // meanwhile, into the final round.
        let mut steps: Vec<(String, Duration)> = Vec::new();
        loop {
            let ev = wait_for_event(events, Duration::from_secs(120), |e| {
                e.name == "STOP" || e.name == "MIGRATION"
            })
            .await
            .map_err(fail(Phase::Switchover, "switchover"))?;
            let since = ev.timestamp.duration_since(from).unwrap_or_default();
            if ev.name == "STOP" {
                self.stop_time = Some(ev.timestamp);
                steps.push(("STOP".into(), since));
                continue;
            }
            steps.push((ev.migration_status().unwrap_or("?").to_string(), since));
            match ev.migration_status() {
                Some("pre-switchover") => {
                    info!(migration = %self.p.job.id, "QEMU from migrate to the stop: {steps:?}");
                    return Ok(());
                }
                Some("failed") | Some("cancelled") => {
                    let why = qemu_migration_error(self.qmp()).await;
                    return Err(fail(Phase::Switchover, "switchover")(format!(
                        "QEMU migration {}: {why}",
                        ev.migration_status().unwrap_or("")
                    )));
                }
                _ => {}
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn publish(
        &mut self,
        sender: &PageSender,
        round: u32,
        dirty: &DirtyBitmap,
        dirty_rate: f64,
        bw: f64,
        predicted_ms: f64,
        msg: &str,
    ) {
        let c = &sender.counters;
        let elapsed = self.started.elapsed();
        let shown_codec = match self.p.job.compression {
            Compression::Auto => format!("auto: {}", sender.codec().get()),
            Compression::Fixed(c) => c.to_string(),
        };
        self.count_metrics(c);
        self.ctx.metrics.dirty_rate.set(dirty_rate);
        self.h.update(|s| {
            s.message = msg.to_string();
            let st = s.stats.get_or_insert_with(Default::default);
            st.guest_ram_bytes = self.spec.memory_mib << 20;
            st.pages_sent = c.pages.load(Ordering::Relaxed);
            st.zero_pages_sent = c.zero_pages.load(Ordering::Relaxed);
            st.pages_resent = sender.resent;
            st.pages_skipped = c.skipped_pages.load(Ordering::Relaxed);
            st.page_bytes = c.page_bytes.load(Ordering::Relaxed);
            st.wire_bytes = c.wire_bytes.load(Ordering::Relaxed);
            st.rounds = round;
            st.last_round_dirty_pages = dirty.count();
            st.dirty_rate_pages_per_sec = dirty_rate;
            st.throughput_bytes_per_sec = bw;
            st.compression_ratio = ratio(sender);
            st.elapsed_ms = elapsed.as_millis() as u64;
            st.expected_downtime_ms = predicted_ms as u64;
            st.codec = shown_codec;
            st.round_pages_done = st.round_pages;
        });
    }

    /// Moves the Prometheus counters up to what the page streams counted.
    fn count_metrics(&mut self, c: &PageCounters) {
        let now = (
            c.page_bytes.load(Ordering::Relaxed),
            c.wire_bytes.load(Ordering::Relaxed),
            c.pages.load(Ordering::Relaxed),
        );
        let codec = self.p.job.compression.to_string();
        let m = &self.ctx.metrics;
        m.page_bytes
            .with_label_values(&[&codec])
            .inc_by(now.0.saturating_sub(self.reported.0));
        m.wire_bytes
            .with_label_values(&[&codec])
            .inc_by(now.1.saturating_sub(self.reported.1));
        m.pages
            .with_label_values(&[&codec])
            .inc_by(now.2.saturating_sub(self.reported.2));
        self.reported = now;
    }

    /// The live status while a round runs (every [`progress::PROGRESS_EVERY`]): the
    /// counters, how far the round is, its rate, the elapsed time and the ETA.
    /// `at_start` is (pages, wire bytes) counted when the round started.
    fn round_progress(
        &mut self,
        c: &PageCounters,
        round: u32,
        round_pages: u64,
        at_start: (u64, u64),
        round_start: Instant,
        dirty_rate: f64,
    ) {
        self.count_metrics(c);
        let pages = c.pages.load(Ordering::Relaxed);
        let zero = c.zero_pages.load(Ordering::Relaxed);
        let done = c.pages_done();
        let wire = c.wire_bytes.load(Ordering::Relaxed);
        let secs = round_start.elapsed().as_secs_f64();
        let elapsed = self.started.elapsed();
        self.h.update(|s| {
            let st = s.stats.get_or_insert_with(Default::default);
            let expected_downtime = st
                .prediction
                .as_ref()
                .map(|p| p.predicted_downtime_ms)
                .filter(|&d| d > 0)
                .unwrap_or(u64::from(self.p.downtime_ms));
            let p = RoundProgress {
                round_pages,
                done_pages: done.saturating_sub(at_start.0).min(round_pages),
                round_secs: secs,
                dirty_pages_per_sec: dirty_rate,
                expected_downtime_ms: expected_downtime as f64,
            };
            st.guest_ram_bytes = self.spec.memory_mib << 20;
            st.pages_sent = pages;
            st.zero_pages_sent = zero;
            st.pages_skipped = c.skipped_pages.load(Ordering::Relaxed);
            st.page_bytes = c.page_bytes.load(Ordering::Relaxed);
            st.wire_bytes = wire;
            st.rounds = round;
            st.round_pages = round_pages;
            st.round_pages_done = p.done_pages;
            if secs > 0.0 {
                st.throughput_bytes_per_sec = wire.saturating_sub(at_start.1) as f64 / secs;
            }
            let payload = c.payload_bytes.load(Ordering::Relaxed);
            if payload > 0 {
                st.compression_ratio = st.page_bytes as f64 / payload as f64;
            }
            if dirty_rate > 0.0 {
                st.dirty_rate_pages_per_sec = dirty_rate;
            }
            st.expected_downtime_ms = expected_downtime;
            st.eta_ms = p.eta_ms().unwrap_or(0);
            st.elapsed_ms = elapsed.as_millis() as u64;
        });
    }

    /// Adds a finished round to the status's history.
    fn record_round(&self, r: pb::RoundRecord) {
        self.h.update(|s| {
            s.stats
                .get_or_insert_with(Default::default)
                .round_history
                .push(r)
        });
    }

    async fn finish_committed(&mut self, resume_us: i64, mut undo: Undo) {
        // QEMU's device-state save as the pause model counts it: from the stop to the fence
        // (the source QEMU completed, its stream relayed; the final round travels meanwhile
        // and is modelled apart). Not learned when disk mirrors were finished in the pause
        // (a migration with disks has their counters): their time is in that span too.
        let fence_us = self
            .h
            .snapshot()
            .stats
            .and_then(|s| s.downtime_breakdown)
            .map(|b| b.fence_us);
        if let Some(us) = fence_us.filter(|&us| us > 0 && self.disk_counters.is_none()) {
            self.ctx.device_save.record(us as f64 / 1000.0);
        }
        let downtime_ms = match (self.stop_time, resume_us) {
            (Some(stop), r) if r > 0 => {
                let stop_us = stop
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_micros() as i64)
                    .unwrap_or(0);
                ((r - stop_us).max(0) / 1000) as u64
            }
            _ => 0,
        };
        if let Some(c) = undo.conn.take() {
            self.close_data_plane(c, 0, b"committed");
        }
        if let Some(t) = undo.throttle.take() {
            t.release();
        }
        if let Some(t) = undo.nbd_listener.take() {
            t.abort();
        }
        for p in [undo.relay_path.take(), undo.nbd_relay_path.take()]
            .into_iter()
            .flatten()
        {
            let _ = std::fs::remove_file(p);
        }
        if self.ctx.cfg.migration.retain_source_ram {
            // Benchmark instrumentation: keep the RAM as it was at switchover for comparison.
            let ram = self.ctx.cfg.ram_path(&self.spec.name);
            let kept = ram.with_extension("after-migration");
            if let Err(e) = std::fs::rename(&ram, &kept) {
                warn!(migration = %self.p.job.id, "keeping source RAM as {}: {e}", kept.display());
            }
        }
        let elapsed = self.started.elapsed().as_millis() as u64;
        // The pause's tail to this target, for the next predictions: Commit sent to the
        // target's resume (both marks counted from the stop).
        let mut tail = None;
        self.h.update(|s| {
            let st = s.stats.get_or_insert_with(Default::default);
            st.downtime_ms = downtime_ms;
            if let Some(stop) = self.stop_time {
                let stop_us = stop
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_micros() as i64)
                    .unwrap_or(0);
                let b = st.downtime_breakdown.get_or_insert_with(Default::default);
                b.commit_us = (resume_us - stop_us).max(0) as u64;
                if b.commit_sent_us > 0 && b.commit_us > b.commit_sent_us {
                    tail = Some((b.commit_us - b.commit_sent_us) as f64 / 1000.0);
                }
            }
            st.elapsed_ms = elapsed;
        });
        if let Some(ms) = tail {
            self.ctx.commit_tail.record(&self.p.job.target, ms);
        }
        let m = &self.ctx.metrics;
        m.downtime.observe(downtime_ms as f64 / 1000.0);
        m.duration.observe(elapsed as f64 / 1000.0);
        m.rounds.observe(f64::from(
            self.h.snapshot().stats.map(|s| s.rounds).unwrap_or(0),
        ));
        finish_copy(
            &self.ctx,
            &self.h,
            &self.p.job.vm,
            Some(&self.proc),
            format!("VM '{}' now runs on {}", self.p.job.vm, self.p.job.target),
        )
        .await;
    }

    async fn roll_back(&mut self, e: MigrateError, mut undo: Undo) {
        let reason = format!(
            "migration of VM '{}' from {} to {} {e}",
            self.p.job.vm, self.ctx.cfg.host_name, self.p.job.target
        );
        warn!(migration = %self.p.job.id, "{reason}; rolling back");
        let _ = crate::failpoint::hit("src.rollback.start", &self.ctx.cfg.state_dir).await;
        if let Some(mut t) = undo.tracker.take() {
            let _ = t.disarm();
        }
        // The guest runs here again: at full speed.
        if let Some(t) = undo.throttle.take() {
            t.release();
        }
        if undo.migrate_issued {
            cancel_qemu_migration(self.qmp(), true).await;
        }
        // Disk mirrors still running: stop them (the guest keeps its own disks) and drop
        // the NBD clients, before the guest runs on.
        for node in std::mem::take(&mut undo.mirrors) {
            let mut ev = self.qmp().subscribe();
            if self.qmp().block_job_cancel(&node, true).await.is_ok() {
                let _ = wait_for_event(&mut ev, Duration::from_secs(10), |e| {
                    matches!(
                        e.name.as_str(),
                        "BLOCK_JOB_CANCELLED" | "BLOCK_JOB_COMPLETED" | "BLOCK_JOB_ERROR"
                    )
                })
                .await;
            }
            if let Err(err) = self.qmp().blockdev_del(&node).await {
                warn!(migration = %self.p.job.id, "blockdev-del {node}: {err}");
            }
        }
        if let Some(t) = undo.nbd_listener.take() {
            t.abort();
        }
        if let Some(p) = undo.nbd_relay_path.take() {
            let _ = std::fs::remove_file(p);
        }
        if let Some(mut peer) = undo.peer.take() {
            let req = pb::AbortRequest {
                migration_id: self.p.job.id.clone(),
                reason: reason.clone(),
                token: self.token.clone(),
                taken_back: false,
            };
            if let Err(err) = tokio::time::timeout(Duration::from_secs(10), peer.abort(req)).await {
                warn!(migration = %self.p.job.id, "target abort call: {err}");
            }
        }
        if let Some(c) = undo.conn.take() {
            self.close_data_plane(c, 1, b"aborted");
        }
        if let Some(p) = undo.relay_path.take() {
            let _ = std::fs::remove_file(p);
        }
        let elapsed = self.started.elapsed().as_millis() as u64;
        take_back(
            &self.ctx,
            &self.h,
            &self.p.job.vm,
            Some(&self.proc),
            &reason,
            e.cancelled,
            elapsed,
        )
        .await;
    }
}

/// Cancels the QEMU's outgoing migration if one is still under way (`cont` is refused
/// while it runs) and waits (bounded) for it to end. `unknown_is_active`: cancel also when
/// QEMU cannot say.
async fn cancel_qemu_migration(qmp: &QmpClient, unknown_is_active: bool) {
    let active = match qmp.query_migrate().await {
        Ok(info) => !matches!(
            info.status.as_deref(),
            None | Some("completed" | "failed" | "cancelled" | "none")
        ),
        Err(_) => unknown_is_active,
    };
    if active {
        let mut ev = qmp.subscribe();
        if qmp.migrate_cancel().await.is_ok() {
            let _ = ferry_qmp::wait_migration_status(
                &mut ev,
                Duration::from_secs(15),
                &["cancelled", "failed", "completed"],
            )
            .await;
        }
    }
}

/// Why QEMU's migration failed, as `query-migrate` says (empty if it does not).
async fn qemu_migration_error(qmp: &QmpClient) -> String {
    qmp.query_migrate()
        .await
        .ok()
        .and_then(|i| i.error_desc)
        .unwrap_or_default()
}

/// The source QEMU's state, asked over QMP.
async fn source_qemu(proc: Option<&Arc<QemuProcess>>) -> SourceQemu {
    let Some(p) = proc else {
        return SourceQemu::Gone;
    };
    if p.try_exited().is_some() {
        return SourceQemu::Gone;
    }
    match p.qmp().query_status().await {
        Ok(st) if st.running => SourceQemu::Running,
        Ok(st) if st.status == "postmigrate" => SourceQemu::Fenced,
        Ok(_) => SourceQemu::Paused,
        Err(_) => SourceQemu::Gone,
    }
}

/// How a question to the target went, besides its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delivery {
    /// It answered, or refused with an error of its own.
    Reached,
    /// Written to a channel, no answer: it may have been read and acted on.
    MaybeRead,
    /// No channel could be made: never written.
    NeverSent,
}

/// `IncomingStatus` from the target, as a [`TargetAnswer`] (an error is `Unreachable`:
/// the target fails closed), and how the question went ([`Delivery`]).
async fn ask_target(
    ctx: &AgentCtx,
    target: &str,
    id: &str,
    token: &str,
) -> (TargetAnswer, Delivery) {
    let deadline = Duration::from_secs(ctx.cfg.migration.peer_call_timeout_s.clamp(1, 30));
    let (reply, sent) = peer_call_traced(ctx, target, deadline, |mut peer| async move {
        peer.incoming_status(pb::IncomingStatusRequest {
            id: id.to_string(),
            token: token.to_string(),
        })
        .await
    })
    .await;
    let delivery = if crate::tls::reached(&reply) {
        Delivery::Reached
    } else if sent {
        Delivery::MaybeRead
    } else {
        Delivery::NeverSent
    };
    let answer = match reply {
        Some(Ok(r)) => match pb::IncomingState::try_from(r.state) {
            Ok(pb::IncomingState::Committed) => TargetAnswer::Owned,
            Ok(pb::IncomingState::Settling) => TargetAnswer::Settling,
            Ok(pb::IncomingState::Prepared) => TargetAnswer::Prepared,
            Ok(pb::IncomingState::Aborted) => TargetAnswer::Aborted,
            Ok(pb::IncomingState::Unknown) => TargetAnswer::Unknown,
            _ => TargetAnswer::Unreachable,
        },
        _ => TargetAnswer::Unreachable,
    };
    (answer, delivery)
}

/// A peer gRPC call under one deadline (`peer_call_timeout_s`, at most 30 s) covering
/// connect and TLS handshake (when no cached channel serves) and the call: a frozen peer
/// accepts TCP connections (its kernel does) and then never answers. `None`: no answer in
/// time.
async fn peer_call<T, F, Fut>(
    ctx: &AgentCtx,
    target: &str,
    call: F,
) -> Option<Result<T, tonic::Status>>
where
    F: FnOnce(FerryPeerClient<Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let deadline = Duration::from_secs(ctx.cfg.migration.peer_call_timeout_s.clamp(1, 30));
    peer_call_within(ctx, target, deadline, call).await
}

/// [`peer_call`] under `deadline` (cold migration's questions use their own).
pub(crate) async fn peer_call_within<T, F, Fut>(
    ctx: &AgentCtx,
    target: &str,
    deadline: Duration,
    call: F,
) -> Option<Result<T, tonic::Status>>
where
    F: FnOnce(FerryPeerClient<Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    peer_call_traced(ctx, target, deadline, call).await.0
}

/// [`peer_call_within`], and whether the request may have reached the peer: `false` only
/// when no channel to it could be made (connect, TLS or HTTP/2 set-up failed or ran out of
/// time), so the request was never written. A request written and not answered may still
/// be read and acted on (a frozen peer that thaws, an answer lost on the way back).
async fn peer_call_traced<T, F, Fut>(
    ctx: &AgentCtx,
    target: &str,
    deadline: Duration,
    call: F,
) -> (Option<Result<T, tonic::Status>>, bool)
where
    F: FnOnce(FerryPeerClient<Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let sent = AtomicBool::new(false);
    let attempt = async {
        let chan = ctx.peers.get(target, &ctx.identity).await.ok()?;
        sent.store(true, Ordering::Release);
        Some(
            call(FerryPeerClient::new(chan))
                .await
                .map(tonic::Response::into_inner),
        )
    };
    let answer = tokio::time::timeout(deadline, attempt).await.ok().flatten();
    // A peer that did not answer may have lost the connection itself: connect afresh next
    // time (the cached channel would only reconnect once the old one is seen broken).
    match &answer {
        None => ctx.peers.forget(target),
        Some(Err(s)) => ctx.peers.forget_if_unreached(target, s),
        Some(Ok(_)) => {}
    }
    (answer, sent.load(Ordering::Acquire))
}

/// Asks the target to abort migration `id` (`peer_call`'s bounds and answer).
async fn abort_target(
    ctx: &AgentCtx,
    target: &str,
    id: &str,
    token: &str,
    reason: &str,
) -> Option<Result<pb::AbortResponse, tonic::Status>> {
    let req = pb::AbortRequest {
        migration_id: id.to_string(),
        reason: reason.to_string(),
        token: token.to_string(),
        taken_back: false,
    };
    peer_call(ctx, target, |mut peer| async move { peer.abort(req).await }).await
}

/// Asks the target until the outcome is known, per [`source_recovery`]; meanwhile the
/// migration is IN_DOUBT (journaled, shown at once) and the guest stays paused here.
/// Returns `Finish` (the target owns the VM) or `RollBack` (take it back).
pub async fn settle(
    ctx: &Arc<AgentCtx>,
    h: &Arc<OutgoingHandle>,
    target: &str,
    proc: Option<&Arc<QemuProcess>>,
) -> SourceAction {
    let meta = h.meta();
    if meta.taken_back {
        // The operator's verdict decided before this agent restarted: not a question to
        // the target again (one waiting for its source's word would take it as "still
        // settling" and resume its copy), only the news.
        h.verdict
            .declare("an operator, before this agent restarted");
        let token = meta.token.clone().unwrap_or_default();
        verdict_took_back(ctx, h, target, token, false);
        let qemu = source_qemu(proc).await;
        return SourceAction::RollBack(rollback_resume(
            qemu,
            meta.was_running,
            meta.capture_whole(),
        ));
    }
    let mut in_doubt = false;
    // The declaration a target's answer spent (0: none).
    let mut verdict_spent = 0;
    if h.meta().mark == SourceMark::CommitSent {
        // The outcome is the target's and unknown here until it answers: say so at once.
        let msg =
            format!("commit sent; asking {target} for the outcome (the VM stays paused here)");
        ctx.outgoing.set_phase(h, pb::MigrationPhase::InDoubt, msg);
    }
    let mut pause = Duration::from_millis(250);
    loop {
        let _ = crate::failpoint::hit("src.settle.ask", &ctx.cfg.state_dir).await;
        let meta = h.meta();
        let token = meta.token.clone().unwrap_or_default();
        // The operator's verdict counts only for a question that provably never reached
        // the target (no channel to it could be made): one written and unanswered may
        // still be read — by a target back from a restart and waiting for its source, it
        // is "still settling", and it resumes its copy. A target that answers after the
        // verdict settles it by its word.
        let declaration = h.verdict.declaration();
        let verdict = declaration != verdict_spent;
        let (answer, delivery) = ask_target(ctx, target, &h.id, &token).await;
        let by_verdict = verdict && delivery == Delivery::NeverSent;
        if verdict && delivery == Delivery::Reached {
            verdict_spent = declaration;
            warn!(migration = %h.id, ?answer, "{target} answered after the operator declared it gone: its word settles the migration");
        }
        let answer = answer_with_verdict(answer, by_verdict);
        let qemu = source_qemu(proc).await;
        let action = source_recovery(
            meta.mark,
            answer,
            qemu,
            meta.was_running,
            meta.capture_whole(),
        );
        info!(migration = %h.id, ?answer, ?qemu, ?action, "settling with the target");
        if answer == TargetAnswer::Unknown && meta.mark == SourceMark::BeforeCommit {
            // Nothing prepared there yet, but a Prepare may still be under way (making
            // disk copies): tell it not to wait for a source that will never come.
            let why = "the source rolled back before the target was prepared";
            let _ = abort_target(ctx, target, &h.id, &token, why).await;
        }
        match action {
            None => return SourceAction::RollBack(Resume::AlreadyRunning),
            Some(a @ SourceAction::RollBack(_)) if by_verdict => {
                // Journaled before the guest resumes here: a restart then takes it back
                // again without asking, and the target hears it when it comes back.
                h.set_meta(|m| m.taken_back = true);
                match ctx.outgoing.persist_with(h, vec![]) {
                    Ok(()) => {
                        let _ = crate::failpoint::hit("src.verdict.journaled", &ctx.cfg.state_dir)
                            .await;
                        warn!(migration = %h.id, "the operator declared {target} gone for good and it cannot be reached: the VM is taken back here");
                        verdict_took_back(ctx, h, target, token, false);
                        return a;
                    }
                    Err(e) => {
                        // Unjournaled, a restart would ask the target again, and a target
                        // waiting for its source would resume: stay in doubt.
                        h.set_meta(|m| m.taken_back = false);
                        error!(migration = %h.id, "journal: {e}: the operator's verdict cannot be recorded; the VM stays paused here, in doubt");
                    }
                }
            }
            Some(a @ (SourceAction::Finish | SourceAction::RollBack(_))) => return a,
            Some(SourceAction::AbortTargetThenRollBack) => {
                let why = "the source is settling a commit it could not confirm";
                let reply = abort_target(ctx, target, &h.id, &token, why).await;
                match reply {
                    // Aborted: the next answer says so.
                    Some(Ok(r)) if r.existed => continue,
                    Some(Err(e)) => {
                        info!(migration = %h.id, "target refused to abort: {}", e.message())
                    }
                    // Nothing live to abort yet (a Prepare still under way there, or a
                    // restart not yet recovered): ask again after the pause, not at once.
                    _ => {}
                }
            }
            Some(SourceAction::AskAgain) => {}
            Some(SourceAction::HoldInDoubt) => {
                if !in_doubt {
                    in_doubt = true;
                    if let (SourceQemu::Running, Some(p)) = (qemu, proc) {
                        // Should not happen (fenced), but never run while in doubt.
                        let _ = p.qmp().stop().await;
                    }
                    let msg = format!(
                        "commit of VM '{}' on {target} could not be confirmed (target unreachable); the VM stays paused on {} until the target answers",
                        h.snapshot().vm,
                        ctx.cfg.host_name
                    );
                    warn!(migration = %h.id, "{msg}");
                    h.update(|s| s.error = msg.clone());
                    ctx.outgoing.set_phase(h, pb::MigrationPhase::InDoubt, msg);
                }
            }
        }
        // The operator's verdict is acted on at once, after one more question.
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = h.verdict.wait(), if !h.verdict.declared() => {}
        }
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

/// The operator's verdict took migration `h`'s VM back here (journaled as `taken_back`):
/// marks the verdict as what settled it and tells the target ([`tell_target_taken_back`];
/// `cold` for a cold migration).
pub fn verdict_took_back(
    ctx: &Arc<AgentCtx>,
    h: &OutgoingHandle,
    target: &str,
    token: String,
    cold: bool,
) {
    h.verdict.apply();
    tell_target_taken_back(ctx.clone(), h.id.clone(), target.to_string(), token, cold);
}

/// Tells the target, until it takes the news, that the operator's verdict took migration
/// `id`'s VM back here: a target that comes back holding a committed copy discards it
/// instead of resuming it (`ferry_handoff::SourceWord::TookBack`). Stops on an answer, or
/// on the target's word that the VM runs there (logged as an error: it runs on two hosts);
/// any other error is told again. Then, once the migration's end is journaled, clears the
/// record's `taken_back` (a restart before that tells again).
///
/// A cold migration's target (`cold`) is told with an AbortColdMigration marked the same
/// way: it removes the definition the migration made there, if the VM never started.
pub fn tell_target_taken_back(
    ctx: Arc<AgentCtx>,
    id: String,
    target: String,
    token: String,
    cold: bool,
) {
    tokio::spawn(async move {
        let mut pause = Duration::from_secs(1);
        let reason = "the source took the VM back on its operator's verdict";
        loop {
            let reply = if cold {
                let req = pb::AbortColdMigrationRequest {
                    migration_id: id.clone(),
                    token: token.clone(),
                    reason: reason.into(),
                    discard: true,
                    taken_back: true,
                };
                peer_call(&ctx, &target, |mut peer| async move {
                    peer.abort_cold_migration(req).await
                })
                .await
                .map(|r| {
                    r.and_then(|r| match r.finished {
                        // This news is never answered "finished": a target from before
                        // it read a plain Abort, and kept the VM.
                        true => Err(tonic::Status::failed_precondition(
                            "it does not know this news (an older ferry) and keeps the VM",
                        )),
                        false => Ok(r.existed),
                    })
                })
            } else {
                let req = pb::AbortRequest {
                    migration_id: id.clone(),
                    reason: reason.into(),
                    token: token.clone(),
                    taken_back: true,
                };
                peer_call(
                    &ctx,
                    &target,
                    |mut peer| async move { peer.abort(req).await },
                )
                .await
                .map(|r| {
                    r.and_then(|r| match r.fenced {
                        true => Err(tonic::Status::already_exists(
                            "it holds the copy committed there, now fenced (paused, held for the operator; its guest may have run beside this one)",
                        )),
                        false => Ok(r.existed),
                    })
                })
            };
            match &reply {
                Some(Ok(existed)) => {
                    info!(migration = %id, discarded = existed, "{target} heard that the VM was taken back");
                    break;
                }
                // The verdict found a host that was not gone: the VM may have run on both
                // until the target heard this and fenced its copy (the target never answers
                // this news ALREADY_EXISTS: the code stands for "fenced" here). Which
                // copy's work to keep is the operator's to decide.
                Some(Err(s)) if s.code() == tonic::Code::AlreadyExists => {
                    error!(migration = %id, "{target} was not gone after all: {}. The VM runs here; `ferryctl vm show` there tells what its copy did, `ferryctl vm clear-fence` there lets it run again", s.message());
                    break;
                }
                Some(Err(s)) if s.code() == tonic::Code::FailedPrecondition => {
                    // Cold: the target started the VM there (or keeps its definition)
                    // before it heard; the copy here, freed by the verdict and stopped,
                    // must not start beside it — held until the operator settles it. A
                    // guest that runs here is left running (never stopped on this news).
                    let held = match cold {
                        true => hold_cold_copy_here(&ctx, &id, &target).await,
                        false => false,
                    };
                    if held {
                        error!(migration = %id, "{target} answered that the VM lives there too (the operator's verdict found a host that was not gone): {}; the VM's definition here is fenced (start refused until `ferryctl vm clear-fence`)", s.message());
                    } else {
                        error!(migration = %id, "{target} answered that the VM lives there too (the operator's verdict found a host that was not gone); remove one: {}", s.message());
                    }
                    break;
                }
                // Not heard (unreachable, or an error of its own such as a journal it
                // cannot read, a wrong token): a target that has not heard may still
                // resume its copy. Told again, with backoff.
                Some(Err(s)) => {
                    warn!(migration = %id, "{target} did not take the news that the VM was taken back: {}", s.message());
                }
                None => {}
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(30));
        }
        // The end is journaled right after the guest resumes; a restart before it tells
        // again (the flag stays).
        for _ in 0..600 {
            match ctx.journal.migration(&id) {
                Ok(Some(mut r)) if r.settled() => {
                    r.taken_back = false;
                    if let Err(e) = ctx.journal.put_migration(&r) {
                        warn!(migration = %id, "journal: {e}");
                    }
                    return;
                }
                Ok(Some(_)) => tokio::time::sleep(Duration::from_secs(1)).await,
                _ => return,
            }
        }
    });
}

/// The cold source's hold on its own copy when the target of migration `id` answered that
/// it keeps the VM ([`crate::vms::VmManager::fence_if_stopped`]): true when held.
async fn hold_cold_copy_here(ctx: &Arc<AgentCtx>, id: &str, target: &str) -> bool {
    let vm = match ctx.journal.migration(id) {
        Ok(Some(r)) => r.vm,
        Ok(None) => return false,
        Err(e) => {
            warn!(migration = %id, "journal: {e}");
            return false;
        }
    };
    let fence = crate::journal::Fence {
        migration: id.to_string(),
        runs_on: target.to_string(),
        at_ms: super::now_ms(),
        why: crate::journal::FenceWhy::StartedThere,
    };
    match ctx.vms.fence_if_stopped(&vm, fence).await {
        Ok(held) => held,
        Err(e) => {
            warn!(migration = %id, vm = %vm, "fencing the copy here: {}", e.message());
            false
        }
    }
}

/// The target owns the VM: stop the source QEMU, remove RAM file and capture, forget the
/// VM here — journaled with the migration's end in one transaction.
async fn finish_copy(
    ctx: &AgentCtx,
    h: &OutgoingHandle,
    vm: &str,
    proc: Option<&Arc<QemuProcess>>,
    message: String,
) {
    if let Some(p) = proc {
        if let Err(e) = p.kill().await {
            warn!(migration = %h.id, "stopping source QEMU after commit: {e}");
        }
    }
    let _ = ctx.vms.end_outgoing(vm, true, false).await;
    h.meta().remove_capture();
    crate::vms::remove_vm_files(&ctx.cfg, vm);
    ctx.outgoing
        .end_completed(h, &ctx.metrics, message, vec![Op::RemoveVm(vm.to_string())]);
    let _ = ctx
        .journal
        .prune_migrations(ctx.cfg.migration.journal_history);
}

/// Takes the guest back here per [`rollback_resume`] (a suspended guest stays suspended;
/// a fenced QEMU that died is restarted from the capture) and ends the migration.
async fn take_back(
    ctx: &AgentCtx,
    h: &OutgoingHandle,
    vm: &str,
    proc: Option<&Arc<QemuProcess>>,
    reason: &str,
    cancelled: bool,
    elapsed_ms: u64,
) {
    let meta = h.meta();
    // A QEMU migration still under way (a task that died mid-flight): cancel it first,
    // `cont` is refused while it runs.
    if let Some(p) = proc {
        cancel_qemu_migration(p.qmp(), false).await;
    }
    let resume = rollback_resume(
        source_qemu(proc).await,
        meta.was_running,
        meta.capture_whole(),
    );
    let running = match resume {
        Resume::AlreadyRunning => true,
        Resume::LeavePaused => false,
        Resume::Cont => match proc {
            Some(p) => match p.qmp().cont().await {
                Ok(()) => true,
                Err(e) => {
                    warn!(migration = %h.id, "resuming source guest: {e}");
                    false
                }
            },
            None => false,
        },
        Resume::FromCapture { then_cont } => match &meta.capture {
            Some(c) => match ctx.vms.restart_from_capture(vm, c, then_cont).await {
                Ok(_) => then_cont,
                Err(e) => {
                    warn!(migration = %h.id, "{}", e.message());
                    false
                }
            },
            None => false,
        },
        Resume::Crashed => false,
    };
    let rec = ctx
        .vms
        .end_outgoing(vm, false, running)
        .await
        .ok()
        .flatten();
    meta.remove_capture();
    let where_ = match resume {
        Resume::Crashed => format!(
            "its QEMU on {} is gone: VM '{vm}' crashed (start it again)",
            ctx.cfg.host_name
        ),
        Resume::LeavePaused => format!(
            "rolled back: VM '{vm}' is on {} (left suspended, as it was)",
            ctx.cfg.host_name
        ),
        _ => format!("rolled back: VM '{vm}' runs on {}", ctx.cfg.host_name),
    };
    // The VM record (free again) and the migration's end, one transaction.
    let ops = rec.map(|r| vec![Op::PutVm(r)]).unwrap_or_default();
    ctx.outgoing
        .end_unsuccessful(h, &ctx.metrics, reason, cancelled, elapsed_ms, where_, ops);
    let _ = ctx
        .journal
        .prune_migrations(ctx.cfg.migration.journal_history);
}

/// Settles an outgoing migration whose task is gone (agent restart, panic) and ends it.
pub async fn settle_and_end(
    ctx: Arc<AgentCtx>,
    h: Arc<OutgoingHandle>,
    vm: String,
    target: String,
    proc: Option<Arc<QemuProcess>>,
    why: String,
) {
    match settle(&ctx, &h, &target, proc.as_ref()).await {
        SourceAction::Finish => {
            finish_copy(
                &ctx,
                &h,
                &vm,
                proc.as_ref(),
                format!("VM '{vm}' now runs on {target} ({why}; the target had committed)"),
            )
            .await
        }
        _ => {
            let why = not_committed_because(&h, &why);
            take_back(&ctx, &h, &vm, proc.as_ref(), &why, false, 0).await
        }
    }
}

/// Why a settled migration did not commit: `first` (what interrupted the commit), and
/// whose word took the VM back.
fn not_committed_because(h: &OutgoingHandle, first: &str) -> String {
    if let Some(note) = h.verdict.settled_note() {
        format!("{first}; {note}: the VM was taken back here")
    } else {
        format!("{first}; the target did not commit")
    }
}

/// A window of the tracker's audit being hashed off the runtime, and every collection of
/// written pages since it began: its suspects are settled against all of them (a page
/// sent again meanwhile has new sums, and the collection that sent it explains it).
struct RunningAudit {
    /// The window's suspects; `None` once abandoned.
    task: JoinHandle<Option<Vec<u64>>>,
    since: DirtyBitmap,
    window: (u64, u64),
    cancel: Arc<AtomicBool>,
    /// The first window after round 0: pre-copy does not end before it is settled, so
    /// that every migration audits at least one window. Later windows are hashed while
    /// rounds go on anyway and abandoned when pre-copy ends first.
    required: bool,
}

/// Pages an audit window hashes between looks at its cancel flag (16 MiB: a few ms).
const AUDIT_CHUNK: u64 = 4096;

impl RunningAudit {
    /// Starts hashing the audit's next window off the runtime, leaving out `skip` (the
    /// next round's pages, whose sums change meanwhile). `None` when auditing is off.
    fn start(
        a: &mut TrackerAudit,
        sums: &Arc<PageSums>,
        ram: &Arc<RamFile>,
        skip: &DirtyBitmap,
        required: bool,
    ) -> Option<RunningAudit> {
        let (first, end) = a.next_window()?;
        let cancel = Arc::new(AtomicBool::new(false));
        let (sums, ram, skip, stop) = (sums.clone(), ram.clone(), skip.clone(), cancel.clone());
        let task = tokio::task::spawn_blocking(move || {
            let mut suspects = Vec::new();
            let mut p = first;
            while p < end {
                if stop.load(Ordering::Relaxed) {
                    return None;
                }
                let chunk_end = (p + AUDIT_CHUNK).min(end);
                suspects.extend(sums.mismatches(&ram, p, chunk_end, &skip));
                p = chunk_end;
            }
            Some(suspects)
        });
        Some(RunningAudit {
            task,
            since: DirtyBitmap::new(0),
            window: (first, end),
            cancel,
            required,
        })
    }

    /// Stops hashing (the task ends at its next chunk); the window does not count.
    fn abandon(self, a: &mut TrackerAudit) {
        self.cancel.store(true, Ordering::Relaxed);
        a.abandon(self.window.0, self.window.1);
    }
}

/// What `t` reports written: a look (`peek`, `true`) where the tracker can, its
/// collection (re-protecting) otherwise.
fn look_or_collect(t: &mut dyn DirtyTracker) -> Result<(DirtyBitmap, bool), TrackerError> {
    Ok(match t.peek()? {
        Some(pages) => (pages, true),
        None => (t.collect()?, false),
    })
}

/// Pre-copy rounds announced and not yet confirmed before the next round waits.
const MAX_ROUNDS_IN_FLIGHT: usize = 8;

/// A pre-copy round whose end was announced to the target and whose confirmation has
/// not been read yet.
struct Unconfirmed {
    round: u32,
    /// Frames sent on all streams up to the end of this round.
    batches_total: u64,
    /// Wire bytes this round wrote to the page streams.
    wire_bytes: u64,
    /// When the round began to send.
    started: Instant,
}

/// Tells the target a round is complete (it answers once it has written every batch).
async fn announce_round(tx: &mut FrameWriter, r: &Unconfirmed) -> Res<()> {
    let msg = ferry_wire::Frame::encode_control(&ControlMessage::RoundEnd {
        round: r.round,
        batches_total: r.batches_total,
    })
    .map_err(fail(Phase::Precopy, "round end"))?;
    tx.write(&msg)
        .await
        .map_err(fail(Phase::Precopy, "round end"))
}

/// The link's rate as the target's round confirmations show it.
#[derive(Default)]
struct Confirmations {
    /// When the last confirmation arrived.
    last_at: Option<Instant>,
    /// Wire bytes per second, once a round has been confirmed.
    bandwidth: Option<f64>,
}

impl Confirmations {
    /// Reads the confirmations of `unconfirmed` rounds, oldest first: those that have
    /// arrived, and waits for more while over `max` rounds are out (and for the oldest
    /// one if `wait_one`).
    async fn confirm_arrived(
        &mut self,
        rx: &mut ControlRx,
        unconfirmed: &mut VecDeque<Unconfirmed>,
        max: usize,
        mut wait_one: bool,
        deadline: Duration,
    ) -> Res<()> {
        while let Some(r) = unconfirmed.pop_front() {
            let a = if unconfirmed.len() >= max || std::mem::take(&mut wait_one) {
                recv_control_at(rx, deadline, Phase::Precopy).await?
            } else {
                match rx.try_recv() {
                    Ok(Ok(a)) => a,
                    Ok(Err(e)) => return Err(fail(Phase::Precopy, "round end")(e)),
                    // Not here yet, or the reader ended (the next wait reports why).
                    Err(_) => {
                        unconfirmed.push_front(r);
                        return Ok(());
                    }
                }
            };
            self.confirmed(a, r)?;
        }
        Ok(())
    }

    /// Waits for `r`'s confirmation and folds its rate into [`Self::bandwidth`].
    async fn confirm(&mut self, rx: &mut ControlRx, r: Unconfirmed, deadline: Duration) -> Res<()> {
        let a = recv_control_at(rx, deadline, Phase::Precopy).await?;
        self.confirmed(a, r)
    }

    /// `a` must confirm `r`; its rate is folded into [`Self::bandwidth`].
    fn confirmed(&mut self, a: Arrived, r: Unconfirmed) -> Res<()> {
        match a.msg {
            ControlMessage::RoundApplied {
                round,
                batches_applied,
            } if round == r.round && batches_applied >= r.batches_total => {}
            other => {
                return Err(fail(Phase::Precopy, "round end")(format!(
                    "target did not confirm round {}: {other:?}",
                    r.round
                )))
            }
        }
        // The arrival as the reader saw it: the confirmation may have waited while the
        // next round was sent.
        let at = a.instant;
        let secs = link_busy_secs(self.last_at, r.started, at);
        self.bandwidth = round_bandwidth(self.bandwidth, r.wire_bytes, secs);
        self.last_at = Some(at);
        Ok(())
    }
}

/// Milliseconds the link needs for what `unconfirmed` rounds may still hold queued at the
/// sender: their wire bytes beyond what a round trip at `bw` bytes per second keeps in
/// flight or on its way back as confirmations.
fn queued_ms(unconfirmed: &VecDeque<Unconfirmed>, bw: f64, rtt: Duration) -> f64 {
    let bytes: u64 = unconfirmed.iter().map(|u| u.wire_bytes).sum();
    let bw = bw.max(1.0);
    (bytes as f64 - bw * rtt.as_secs_f64()).max(0.0) / bw * 1000.0
}

/// The path's round trip without load or processing: the least sample QUIC took (its
/// ack delay not subtracted), which the handshake's figure (`base_rtt`) is not — that one
/// holds the handshake's crypto, 23-38 ms on a 20 ms path here.
fn path_rtt(conn: &quinn::Connection, base_rtt: Duration) -> Duration {
    least_rtt(conn.stats().path.min_rtt, base_rtt)
}

/// The smaller of QUIC's least sample and the handshake's figure (a zero sample, which
/// quinn does not report, would mean none).
fn least_rtt(min_rtt: Duration, base_rtt: Duration) -> Duration {
    if min_rtt.is_zero() {
        base_rtt
    } else {
        min_rtt.min(base_rtt)
    }
}

/// How long the link carried a round that began sending at `started` and was confirmed at
/// `confirmed`: from its start or the previous round's confirmation (`last`), whichever is
/// later — with pipelined rounds the link was busy with the previous round until then.
fn link_busy_secs(last: Option<Instant>, started: Instant, confirmed: Instant) -> f64 {
    let from = last.map_or(started, |l| l.max(started));
    confirmed.saturating_duration_since(from).as_secs_f64()
}

/// The link's rate after a confirmed round of `wire_bytes` that took `secs`: only rounds
/// big enough to fill the pipe say anything about the link; each such round weighs half.
/// An interval under a millisecond says nothing (a rate from it would be absurd).
fn round_bandwidth(prev: Option<f64>, wire_bytes: u64, secs: f64) -> Option<f64> {
    if secs < 1e-3 {
        return prev;
    }
    let bw = wire_bytes as f64 / secs;
    match prev {
        None => Some(bw),
        Some(prev) if wire_bytes < 4 << 20 => Some(prev),
        Some(prev) => Some(0.5 * prev + 0.5 * bw),
    }
}

/// Compression ratio so far (page bytes over payload bytes).
fn ratio(sender: &PageSender) -> f64 {
    let c = &sender.counters;
    let payload = c.payload_bytes.load(Ordering::Relaxed);
    if payload == 0 {
        1.0
    } else {
        c.page_bytes.load(Ordering::Relaxed) as f64 / payload as f64
    }
}

/// Reads control messages on a task of its own (reads are not cancel-safe).
pub fn spawn_control_reader(mut r: ferry_transport::FrameReader) -> ControlRx {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let msg = match r.next().await {
                Ok(Some(ferry_wire::Frame::Control(msg))) => Ok(Arrived {
                    msg,
                    at: SystemTime::now(),
                    instant: Instant::now(),
                }),
                Ok(Some(_)) => Err("unexpected page frame on control stream".to_string()),
                Ok(None) => Err("peer closed the control stream".to_string()),
                Err(e) => Err(e.to_string()),
            };
            let end = msg.is_err();
            if tx.send(msg).await.is_err() || end {
                return;
            }
        }
    });
    rx
}

/// A control message and when it arrived (the pause's breakdown counts arrivals, not
/// when a later phase got to read them).
pub struct Arrived {
    /// The message.
    pub msg: ControlMessage,
    /// When the reader took it off the stream.
    pub at: SystemTime,
    /// The same moment on the monotonic clock (intervals: a wall-clock step cannot bend them).
    pub instant: Instant,
}

/// The control stream's messages as [`spawn_control_reader`] delivers them.
pub type ControlRx = mpsc::Receiver<Result<Arrived, String>>;

/// How long a failed page send waits for the target to say why.
const TARGET_REASON_WAIT: Duration = Duration::from_secs(2);

/// Why sending pages failed: a target that stops reading its page streams (a page it
/// could not write, ENOSPC on a full RAM directory) says why on the control stream, and
/// that is what the operator needs rather than "stopped by peer"; the send's own error
/// when the target says nothing within [`TARGET_REASON_WAIT`].
async fn why_sending_failed(rx: &mut ControlRx, e: PageError) -> String {
    // Reading RAM or encoding failed here: the target has nothing to say about it.
    if !matches!(e, PageError::Transport(_)) {
        return e.to_string();
    }
    let deadline = tokio::time::Instant::now() + TARGET_REASON_WAIT;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(Ok(Arrived {
                msg: ControlMessage::Error { message },
                ..
            }))) => return format!("target reported: {message}"),
            // Confirmations of earlier rounds: the reason may follow them.
            Ok(Some(Ok(_))) => continue,
            // The control stream broke as well: its reason says more than the send's.
            Ok(Some(Err(c))) => return format!("{e} (control stream: {c})"),
            _ => return e.to_string(),
        }
    }
}

async fn recv_control_at(rx: &mut ControlRx, timeout: Duration, phase: Phase) -> Res<Arrived> {
    match tokio::time::timeout(timeout, rx.recv()).await {
        Ok(Some(Ok(Arrived {
            msg: ControlMessage::Error { message },
            ..
        }))) => Err(fail(phase, "target")(format!("target reported: {message}"))),
        Ok(Some(Ok(a))) => Ok(a),
        Ok(Some(Err(e))) => Err(fail(phase, "control stream")(e)),
        Ok(None) => Err(fail(phase, "control stream")("closed")),
        Err(_) => Err(fail(phase, "control stream")(format!(
            "no answer from target within {timeout:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::{early_handshake, EarlyHandshake};
    use super::{least_rtt, round_bandwidth};
    use std::time::Duration;

    #[test]
    fn the_handshake_made_during_prepare_serves_only_the_address_prepare_named() {
        let (a, b) = (
            "10.0.0.2:7711".parse().expect("addr"),
            "10.0.0.3:7711".parse().expect("addr"),
        );
        assert_eq!(early_handshake(a, Ok(true), a), EarlyHandshake::Use);
        // Closed since it opened: a new one.
        assert_eq!(early_handshake(a, Ok(false), a), EarlyHandshake::Fresh);
        // Never reached or never answered at the address Prepare names, after Prepare's
        // answer: that is the answer.
        assert_eq!(early_handshake(a, Err(false), a), EarlyHandshake::Report);
        // Refused (an older agent refuses a Hello before its Prepare is done): once more,
        // now that it is prepared.
        assert_eq!(early_handshake(a, Err(true), a), EarlyHandshake::Fresh);
        // Prepare named another address: whatever happened at the old one does not count.
        assert_eq!(early_handshake(a, Ok(true), b), EarlyHandshake::Fresh);
        assert_eq!(early_handshake(a, Err(false), b), EarlyHandshake::Fresh);
    }

    #[test]
    fn the_path_rtt_is_the_least_sample_unless_there_is_none() {
        let ms = Duration::from_millis;
        assert_eq!(least_rtt(ms(20), ms(34)), ms(20));
        assert_eq!(least_rtt(Duration::ZERO, ms(34)), ms(34));
        assert_eq!(least_rtt(ms(40), ms(34)), ms(34));
    }

    #[test]
    fn first_confirmed_round_sets_the_rate_whatever_its_size() {
        assert_eq!(
            round_bandwidth(None, 1 << 20, 0.5),
            Some(2.0 * (1 << 20) as f64)
        );
    }

    #[test]
    fn small_rounds_leave_the_rate_alone() {
        // A round of 1 MiB does not fill a wan pipe: its rate says nothing about the link.
        assert_eq!(round_bandwidth(Some(100e6), 1 << 20, 1.0), Some(100e6));
    }

    #[test]
    fn big_rounds_weigh_half() {
        let bw = round_bandwidth(Some(100e6), 50_000_000, 1.0).unwrap();
        assert!((bw - 75e6).abs() < 1.0, "{bw}");
    }

    #[test]
    fn an_interval_under_a_millisecond_leaves_the_rate_as_it_was() {
        assert_eq!(round_bandwidth(None, 8 << 20, 0.0), None);
        assert_eq!(round_bandwidth(Some(100e6), 8 << 20, 1e-4), Some(100e6));
    }

    #[test]
    fn the_link_is_busy_from_the_later_of_start_and_last_confirmation() {
        use super::link_busy_secs;
        use std::time::{Duration, Instant};
        let t = Instant::now();
        let s = Duration::from_secs;
        // Round 0: no confirmation before, from its start.
        assert_eq!(link_busy_secs(None, t, t + s(3)), 3.0);
        // Pipelined: the round began before the previous one was confirmed.
        assert_eq!(link_busy_secs(Some(t + s(2)), t + s(1), t + s(3)), 1.0);
        // Not pipelined: the round began after.
        assert_eq!(link_busy_secs(Some(t), t + s(1), t + s(3)), 2.0);
        // A confirmation read before the round's start cannot make time negative.
        assert_eq!(link_busy_secs(None, t + s(1), t), 0.0);
    }
}
