//! Named failpoints at every phase boundary and irreversible step of a migration, for
//! the fault-matrix tests. Compiled in with the `failpoints` feature (the `fail` crate);
//! without it [`hit`] is an empty inline function.
//!
//! A process arms them from the environment at start-up:
//! `FAILPOINTS="src.commit.sent=return(exit);tgt.commit.journaled=return(hang)"`.
//! Actions (the `return(...)` argument):
//! - `exit`: the agent kills itself with SIGKILL on the spot (a `kill -9`, no cleanup);
//! - `hang`: the migration stops there — a peer that stops answering — until the file
//!   `FAILPOINT-RELEASE` appears in the agent's state directory (tests use the pause to
//!   kill a QEMU or cut the link at a precise step);
//! - `error` (or anything else): the step fails with an error naming the failpoint.
//!
//! Every point logs `failpoint NAME hit` when it fires, so a test can wait for it.

/// Every failpoint name, in handoff order (source `src.*`, target `tgt.*`).
pub const POINTS: &[&str] = &[
    "src.preflight.done",
    "src.prepare.done",
    "src.connect.done",
    "src.disks.ready",
    "src.precopy.round",
    "src.switchover.paused",
    "src.final_round.sent",
    "src.device_state.sent",
    "src.fence.done",
    "src.commit.journaled",
    "src.commit.sent",
    "src.commit.answered",
    "src.rollback.start",
    "src.settle.ask",
    "tgt.copies.made",
    "tgt.prepare.done",
    "tgt.ram.reserve",
    "tgt.qemu.started",
    "tgt.hello.done",
    "tgt.final_round.applied",
    "tgt.device_state.loaded",
    "tgt.commit.asked",
    "tgt.commit.journaled",
    "tgt.commit.resumed",
    "tgt.commit.owned",
    "tgt.abort.discarded",
];

/// Failpoints of cold (offline) migration: not in [`POINTS`], whose matrix drives live
/// migrations; `cold_migration.rs` arms them.
pub const COLD_POINTS: &[&str] = &[
    // The source journaled that Finish is about to go (VM held), before sending it.
    "cold.src.finish.journaled",
    // The target defined the VM (journaled), before answering Finish.
    "cold.tgt.finish.committed",
    // The target wrote a chunk of an image (hang: storage that stops answering).
    "cold.tgt.chunk.written",
    // The target heard that its source took the VM back, before acting on it.
    "cold.tgt.taken_back.heard",
];

/// Failpoints of the operator's verdict on a migration in doubt: not in [`POINTS`] (the
/// matrix gives no verdict); `handoff_faults.rs` arms them.
pub const VERDICT_POINTS: &[&str] = &[
    // The source journaled that the verdict takes the VM back, before its guest resumes.
    "src.verdict.journaled",
    // The same for a cold migration, before the VM is free on the source.
    "cold.src.verdict.journaled",
];

/// Fires failpoint `name` if armed: see the module docs for what each action does.
#[cfg(feature = "failpoints")]
pub async fn hit(name: &'static str, state_dir: &std::path::Path) -> Result<(), String> {
    debug_assert!(
        POINTS.contains(&name) || COLD_POINTS.contains(&name) || VERDICT_POINTS.contains(&name),
        "unknown failpoint {name}"
    );
    let Some(action) = fail::eval(name, |arg| arg.unwrap_or_default()) else {
        return Ok(());
    };
    tracing::warn!("failpoint {name} hit: {action}");
    match action.as_str() {
        "exit" => {
            // SAFETY: kill(2) on our own pid; nothing after this runs.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
            std::future::pending().await
        }
        "hang" => {
            let release = state_dir.join("FAILPOINT-RELEASE");
            while !release.exists() {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            tracing::warn!("failpoint {name} released");
            Ok(())
        }
        other => Err(format!("failpoint {name}: injected {other}")),
    }
}

/// Fires failpoint `name` if armed (compiled out: always `Ok`).
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub async fn hit(_name: &'static str, _state_dir: &std::path::Path) -> Result<(), String> {
    Ok(())
}

/// Arms the failpoints named in `FAILPOINTS` for the life of the process.
pub fn setup() {
    #[cfg(feature = "failpoints")]
    {
        let scenario = fail::FailScenario::setup();
        if std::env::var_os("FAILPOINTS").is_some() {
            tracing::warn!(
                "failpoints armed: {}",
                std::env::var("FAILPOINTS").unwrap_or_default()
            );
        }
        // Leaked on purpose: the scenario lasts as long as the process.
        Box::leak(Box::new(scenario));
    }
}

/// Test hook, not a handoff step (so not in [`POINTS`]): with
/// `FAILPOINTS="src.tracker.forget=return(N)"` the source drops the first N pages of each
/// pre-copy collection of written pages — a write tracker that misses writes, for the
/// tests of the audit that must catch it.
#[cfg(feature = "failpoints")]
pub fn forget_writes(dirty: &mut ferry_memory::DirtyBitmap) {
    let Some(n) = fail::eval("src.tracker.forget", |arg| {
        arg.and_then(|a| a.parse::<usize>().ok()).unwrap_or(0)
    }) else {
        return;
    };
    let forgotten: Vec<u64> = dirty.iter().take(n).collect();
    for &p in &forgotten {
        dirty.unset(p);
    }
    if !forgotten.is_empty() {
        tracing::warn!(
            "failpoint src.tracker.forget hit: dropped {} written page(s)",
            forgotten.len()
        );
    }
}
