//! When pre-copy ends: the final round fits the downtime target, or rounds stall and a
//! policy decides.

use serde::{Deserialize, Serialize};

/// What to do when pre-copy rounds stop shrinking (or the round limit is reached).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StallPolicy {
    /// Stop-and-copy: pause the guest and send the rest (longer downtime). The seeds' advice.
    Pause,
    /// Give up: roll back, the guest keeps running on the source.
    Abort,
    /// Lower the guest's CPU quota step by step until rounds shrink; then stop-and-copy.
    Throttle,
}

impl std::str::FromStr for StallPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "" | "pause" => Ok(StallPolicy::Pause),
            "abort" => Ok(StallPolicy::Abort),
            "throttle" => Ok(StallPolicy::Throttle),
            other => Err(format!(
                "on_stall: unknown policy '{other}' (pause, abort or throttle)"
            )),
        }
    }
}

/// The facts after one pre-copy round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StallInput {
    /// Rounds done (1 after round 0).
    pub round: u32,
    pub max_rounds: u32,
    /// Pages the guest wrote during the last round.
    pub dirty_pages: u64,
    /// The same for the round before (`u64::MAX` if none, after a throttle step, or when
    /// this round does not compare with it: [`round_comparable`]).
    pub prev_dirty_pages: u64,
    /// Whether the round before was flat too: compared with its own predecessor, it did
    /// not shrink by a tenth ([`shrank`]). A stall takes two flat rounds in a row.
    pub prev_flat: bool,
    /// Predicted time of a final round of `dirty_pages` (its transfer).
    pub predicted_ms: f64,
    /// The round trip the pause adds to that transfer (the path's unloaded RTT): the
    /// final pages' confirmation cannot come back sooner.
    pub path_ms: f64,
    pub downtime_ms: u32,
    /// Throttling only: whether the CPU quota can still be lowered.
    pub can_throttle_more: bool,
    /// Whether the tracker's audit is still hashing a window pre-copy must not end
    /// without. Its suspects are settled against a collection taken after it finished, so
    /// a switchover would wait for it with the guest writing on; another short round
    /// sends those writes instead.
    pub audit_pending: bool,
    /// Time the link needs for what earlier rounds still hold queued at the sender (their
    /// unconfirmed bytes beyond a round trip's worth): a final round sent now arrives
    /// behind them.
    pub queued_ms: f64,
    /// The window the round's `dirty_pages` were written in (collection to collection).
    pub window_ms: f64,
    /// Whether the round just ended was the one a [`StallDecision::Drain`] asked for: it
    /// holds what the guest wrote while the queue drained, and pre-copy ends after it
    /// (compared with the round before, it would read as a stall), unless one more round
    /// would halve it: a big final round that fits ([`worth_another_round`]), or one that
    /// does not fit, written during a long wait.
    pub after_drain: bool,
    /// Whether a drain already happened in this migration: never a second one (the round
    /// that halves a big final round after a drain must not wait again).
    pub drained: bool,
}

/// The decision after a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StallDecision {
    /// The final round fits the downtime target: switch over.
    Switchover,
    /// Another round.
    Continue,
    /// Stalled: pause the guest and copy the rest.
    StopAndCopy,
    /// Stalled: roll back.
    Abort,
    /// Stalled: lower the CPU quota one step, then another round.
    ThrottleStep,
    /// The final round would fit but would queue behind earlier rounds' bytes: one more
    /// round that waits for the oldest unconfirmed round's confirmation, then the
    /// switchover.
    Drain,
}

/// Share of the downtime target a queue ahead of the final round may take before
/// pre-copy waits for it to drain.
pub const DRAIN_SHARE: f64 = 0.1;

/// Share of the downtime target above which a final round that fits is still worth
/// another round, when that round should hold at most half the writes
/// ([`ROUND_OVERHEAD_MS`]). On a short path the first round that fits can be anywhere up
/// to the whole target (lan: final rounds of 368-2,096 pages, pauses 12-37 ms); one more
/// round of a few milliseconds brings it down to what the guest writes while it is sent.
pub const BIG_FINAL_SHARE: f64 = 1.0 / 3.0;

/// A pre-copy round's cost beside its transfer (the tracker's collection, the round's
/// announcement), for whether one more round would shrink the final one.
pub const ROUND_OVERHEAD_MS: f64 = 5.0;

/// Whether a final round of `predicted_ms` that fits is big enough, and rounds short
/// enough, for one more round to halve it: over [`BIG_FINAL_SHARE`] of `target_ms`, and
/// sent (with [`ROUND_OVERHEAD_MS`]) within half the `window_ms` its pages were written
/// in. Shared with the prediction.
pub fn worth_another_round(predicted_ms: f64, window_ms: f64, target_ms: f64) -> bool {
    predicted_ms > BIG_FINAL_SHARE * target_ms && halves(predicted_ms, window_ms)
}

/// Whether a round of `predicted_ms` (with [`ROUND_OVERHEAD_MS`]) is sent within half the
/// `window_ms` its pages were written in: the round after it should hold at most half.
fn halves(predicted_ms: f64, window_ms: f64) -> bool {
    predicted_ms + ROUND_OVERHEAD_MS <= 0.5 * window_ms
}

/// Whether a round's write count compares with the round before it: not when the round
/// spent most of its window (collection to collection) waiting for the previous round to
/// drain. With pipelined rounds a small round that follows a big one is sent at once and
/// then waits while the big one drains: the writes it collects measure that drain, not
/// how fast rounds shrink (on wan a 2 MB round waiting 60 of its 82 ms read as flat and
/// stopped pre-copy with a 56 ms pause against 30-35 ms otherwise). Waiting about a round
/// trip (`rtt_ms`) for the previous round's confirmation is every small round's rhythm on
/// a long path, and compares: only a wait beyond two round trips is a drain.
pub fn round_comparable(waited_ms: f64, window_ms: f64, rtt_ms: f64) -> bool {
    waited_ms <= 0.5 * window_ms || waited_ms <= 2.0 * rtt_ms
}

/// Whether this round's writes are compared with the previous round's: yes unless it
/// waited for a drain ([`round_comparable`]) and the round before it was compared — one
/// pass at a time, so that pre-copy cannot go on to the round limit on passes.
pub fn compare_rounds(waited_ms: f64, window_ms: f64, rtt_ms: f64, last_passed: bool) -> bool {
    round_comparable(waited_ms, window_ms, rtt_ms) || last_passed
}

/// Whether a round that wrote `dirty` pages shrank by a tenth against the round before,
/// which wrote `prev` (`u64::MAX`: not compared, counts as shrunk).
pub fn shrank(dirty: u64, prev: u64) -> bool {
    dirty.saturating_mul(10) < prev.saturating_mul(9)
}

/// A round "stalls" at the round limit, or when from round 3 on it and the round before
/// it each did not shrink by a tenth compared with their predecessors. One flat round is
/// not enough to pause longer than the target (a flat round whose transfer fits ends
/// pre-copy as before): a guest that writes in bursts (the test guest, CPU-starved on a busy host,
/// catches up on up to 250 ms of writes at once) can fill one short round with more than
/// a longer one before it: one flat round stopped 26 of the 558 wan migrations the
/// benchmark sets recorded, pausing 38-215 ms against ~30 ms (benches/RESULTS.md, ninth
/// session). A guest that really outruns the link stays flat and stops one round later.
///
/// The pause is the final round's transfer plus a round trip. A final round whose transfer
/// and round trip both fit the target switches over at once, unless it is big and one more
/// short round would halve it ([`worth_another_round`]). One whose transfer alone fits
/// (the target as QEMU counts it) gets more rounds while they still shrink — on a long
/// path a smaller final round is the only part of the pause more rounds can cut — and
/// switches over once they stop shrinking or at the round limit: never a stall, whatever
/// the policy. A switchover while the tracker's audit still hashes a window becomes
/// another round, up to the round limit ([`StallInput::audit_pending`]); so does one while
/// earlier rounds' bytes still queue at the sender, waiting for them
/// ([`StallDecision::Drain`]).
pub fn stall_decision(i: StallInput, policy: StallPolicy) -> StallDecision {
    let at_limit = i.round >= i.max_rounds;
    let target = f64::from(i.downtime_ms);
    let pressure = if i.after_drain {
        // What the guest wrote during the wait: on lan 800-2,600 pages, when one more
        // round of a few milliseconds leaves a few hundred. Also when they do not fit:
        // a drain on lan waited 125-170 ms for the target, and switching over on the
        // 2,000-2,600 pages written meanwhile paused for 34-61 ms where the migrations
        // without a drain paused for 15 (benches/RESULTS.md, eighth session).
        match when_it_fits(&i) {
            _ if i.dirty_pages == 0 => StallDecision::Switchover,
            Some(d) => d,
            None if !at_limit && halves(i.predicted_ms, i.window_ms) => StallDecision::Continue,
            None => StallDecision::Switchover,
        }
    } else {
        pressure_decision(i, policy)
    };
    match pressure {
        // Not at the round limit: the audit gets the rounds it needs to finish…
        StallDecision::Switchover if i.audit_pending && !at_limit => StallDecision::Continue,
        // …and the sender's queue the rounds it needs to drain.
        StallDecision::Switchover
            if i.queued_ms > DRAIN_SHARE * target && !i.drained && !at_limit =>
        {
            StallDecision::Drain
        }
        d => d,
    }
}

/// When the final round's transfer and round trip fit the target: the switchover at
/// once, unless one more short round would halve a big final round (not at the round
/// limit). `None` when it does not fit.
fn when_it_fits(i: &StallInput) -> Option<StallDecision> {
    let target = f64::from(i.downtime_ms);
    (i.predicted_ms + i.path_ms.max(0.0) <= target).then(|| {
        if i.round < i.max_rounds && worth_another_round(i.predicted_ms, i.window_ms, target) {
            StallDecision::Continue
        } else {
            StallDecision::Switchover
        }
    })
}

/// [`stall_decision`] from the rounds' sizes alone.
fn pressure_decision(i: StallInput, policy: StallPolicy) -> StallDecision {
    let target = f64::from(i.downtime_ms);
    let at_limit = i.round >= i.max_rounds;
    // Nothing written: no round can make the final one smaller.
    if i.dirty_pages == 0 {
        return StallDecision::Switchover;
    }
    if let Some(d) = when_it_fits(&i) {
        return d;
    }
    let flat = i.round >= 3 && !shrank(i.dirty_pages, i.prev_dirty_pages);
    let stalled = at_limit || (flat && i.prev_flat);
    if i.predicted_ms <= target {
        // The transfer fits (a long path's round trip does not): one flat round says the
        // rounds reached their floor. Waiting for a second risks a round a lost packet
        // stretched (far: 20-100 pages a round, then 400-900 in one that waited 50-150 ms
        // for a retransmission).
        return if at_limit || flat || i.round < 3 && i.dirty_pages >= i.prev_dirty_pages {
            StallDecision::Switchover
        } else {
            StallDecision::Continue
        };
    }
    if !stalled {
        return StallDecision::Continue;
    }
    match policy {
        StallPolicy::Pause => StallDecision::StopAndCopy,
        StallPolicy::Abort => StallDecision::Abort,
        StallPolicy::Throttle if i.can_throttle_more && !at_limit => StallDecision::ThrottleStep,
        StallPolicy::Throttle => StallDecision::StopAndCopy,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(round: u32, dirty: u64, prev: u64, predicted_ms: f64) -> StallInput {
        StallInput {
            round,
            max_rounds: 30,
            dirty_pages: dirty,
            prev_dirty_pages: prev,
            // The round before was flat too: one more flat round is a stall.
            prev_flat: true,
            predicted_ms,
            path_ms: 0.0,
            downtime_ms: 30,
            can_throttle_more: true,
            audit_pending: false,
            queued_ms: 0.0,
            window_ms: 1000.0,
            after_drain: false,
            drained: false,
        }
    }

    #[test]
    fn a_big_final_round_that_fits_gets_one_more_round_when_that_halves_it() {
        // 22 ms of transfer written in a 142 ms round (lan, the round slowed by the audit).
        let mut i = input(3, 2096, 1164, 22.0);
        i.path_ms = 0.5;
        i.window_ms = 142.0;
        assert_eq!(
            stall_decision(i, StallPolicy::Pause),
            StallDecision::Continue
        );
        // The next one: 400 pages, 4 ms, small: go.
        let mut next = input(4, 400, 2096, 4.2);
        next.window_ms = 27.0;
        assert_eq!(
            stall_decision(next, StallPolicy::Pause),
            StallDecision::Switchover
        );
        // Big, but the round was no longer than its transfer: another would not halve it.
        i.window_ms = 40.0;
        assert_eq!(
            stall_decision(i, StallPolicy::Pause),
            StallDecision::Switchover
        );
        // Never past the round limit.
        i.window_ms = 142.0;
        i.round = i.max_rounds;
        assert_eq!(
            stall_decision(i, StallPolicy::Pause),
            StallDecision::Switchover
        );
        // A long path: fitting with the round trip already means a small final round.
        let mut wan = input(3, 450, 2000, 9.5);
        wan.path_ms = 20.0;
        wan.window_ms = 60.0;
        assert_eq!(
            stall_decision(wan, StallPolicy::Pause),
            StallDecision::Switchover
        );
    }

    #[test]
    fn a_round_with_nothing_written_ends_pre_copy() {
        // A long path: the round trip alone exceeds the target, yet there is nothing
        // left to shrink.
        let mut i = input(8, 0, 84, 0.0);
        i.path_ms = 50.0;
        assert_eq!(
            stall_decision(i, StallPolicy::Pause),
            StallDecision::Switchover
        );
    }

    #[test]
    fn the_round_after_a_drain_ends_pre_copy_without_a_stall() {
        // It holds the writes made during the wait: flat against the round before and
        // over the target, which alone reads as a stall.
        let mut i = input(10, 612, 120, 45.0);
        assert_eq!(
            stall_decision(i, StallPolicy::Pause),
            StallDecision::StopAndCopy
        );
        i.after_drain = true;
        i.drained = true;
        i.queued_ms = 40.0;
        // Written in an 82 ms wait (wan): one more 45 ms round would not halve it.
        i.window_ms = 82.0;
        for p in [
            StallPolicy::Pause,
            StallPolicy::Abort,
            StallPolicy::Throttle,
        ] {
            assert_eq!(stall_decision(i, p), StallDecision::Switchover);
        }
    }

    #[test]
    fn after_a_long_drain_a_final_round_over_the_target_gets_one_more_round() {
        // lan, as logged: the drain waited 139 ms for the target; the guest wrote 1,941
        // pages meanwhile, 8 MB raw — over the 30 ms target at the link's rate.
        let mut i = input(4, 1941, 495, 34.0);
        i.path_ms = 0.7;
        i.window_ms = 143.0;
        i.after_drain = true;
        i.drained = true;
        i.queued_ms = 20.0;
        for p in [
            StallPolicy::Pause,
            StallPolicy::Abort,
            StallPolicy::Throttle,
        ] {
            assert_eq!(stall_decision(i, p), StallDecision::Continue);
        }
        // The round after it is decided as any round (it shrank: it fits, no second drain).
        let mut next = input(5, 420, 1941, 7.5);
        next.path_ms = 0.7;
        next.window_ms = 30.0;
        next.drained = true;
        next.queued_ms = 20.0;
        assert_eq!(
            stall_decision(next, StallPolicy::Pause),
            StallDecision::Switchover
        );
        // A wait too short for one more round to halve it: the switchover, as before.
        i.window_ms = 70.0;
        assert_eq!(
            stall_decision(i, StallPolicy::Pause),
            StallDecision::Switchover
        );
        // Nor at the round limit.
        i.window_ms = 143.0;
        i.round = i.max_rounds;
        assert_eq!(
            stall_decision(i, StallPolicy::Pause),
            StallDecision::Switchover
        );
    }

    #[test]
    fn after_a_drain_a_big_final_round_gets_one_more_round_and_no_second_drain() {
        // lan: the drained round waited 90 ms; the guest wrote 1,600 pages (17 ms raw).
        let mut i = input(4, 1600, 360, 17.0);
        i.path_ms = 0.5;
        i.window_ms = 120.0;
        i.after_drain = true;
        i.drained = true;
        i.queued_ms = 50.0;
        assert_eq!(
            stall_decision(i, StallPolicy::Pause),
            StallDecision::Continue
        );
        // The round after it fits, small: the switchover, however much still queues.
        let mut next = input(5, 350, 1600, 3.7);
        next.path_ms = 0.5;
        next.window_ms = 25.0;
        next.drained = true;
        next.queued_ms = 50.0;
        assert_eq!(
            stall_decision(next, StallPolicy::Pause),
            StallDecision::Switchover
        );
        // A small drained round ends pre-copy as before.
        i.dirty_pages = 300;
        i.predicted_ms = 3.2;
        assert_eq!(
            stall_decision(i, StallPolicy::Pause),
            StallDecision::Switchover
        );
    }

    #[test]
    fn a_queue_ahead_of_the_final_round_drains_first() {
        let mut i = input(4, 100, 1000, 5.0);
        i.queued_ms = 2.0;
        // Within a tenth of the target: go.
        assert_eq!(
            stall_decision(i, StallPolicy::Pause),
            StallDecision::Switchover
        );
        i.queued_ms = 60.0;
        assert_eq!(stall_decision(i, StallPolicy::Pause), StallDecision::Drain);
        // The audit comes first (its round need not wait), the round limit last.
        i.audit_pending = true;
        assert_eq!(
            stall_decision(i, StallPolicy::Pause),
            StallDecision::Continue
        );
        i.round = i.max_rounds;
        assert_eq!(
            stall_decision(i, StallPolicy::Pause),
            StallDecision::Switchover
        );
        // A round that does not fit is decided as before, queue or not.
        let mut big = input(4, 800, 1000, 80.0);
        big.queued_ms = 60.0;
        assert_eq!(
            stall_decision(big, StallPolicy::Pause),
            StallDecision::Continue
        );
    }

    #[test]
    fn a_running_audit_earns_more_rounds_until_the_limit() {
        let mut i = input(4, 100, 1000, 5.0);
        assert_eq!(
            stall_decision(i, StallPolicy::Pause),
            StallDecision::Switchover
        );
        i.audit_pending = true;
        assert_eq!(
            stall_decision(i, StallPolicy::Pause),
            StallDecision::Continue
        );
        // At the round limit the switchover waits for the audit instead.
        i.round = i.max_rounds;
        assert_eq!(
            stall_decision(i, StallPolicy::Pause),
            StallDecision::Switchover
        );
        // A stall is a stall, audit or not.
        let mut stalled = input(30, 5000, 5000, 500.0);
        stalled.audit_pending = true;
        assert_eq!(
            stall_decision(stalled, StallPolicy::Pause),
            StallDecision::StopAndCopy
        );
        assert_eq!(
            stall_decision(stalled, StallPolicy::Abort),
            StallDecision::Abort
        );
    }

    #[test]
    fn a_long_path_earns_more_rounds_while_they_shrink() {
        // 20 ms transfer fits 30 ms, but not with a 20 ms round trip: go on while rounds
        // shrink, whatever the policy (this is no stall)…
        let mut i = input(4, 800, 1000, 20.0);
        i.path_ms = 20.0;
        for p in [
            StallPolicy::Pause,
            StallPolicy::Abort,
            StallPolicy::Throttle,
        ] {
            assert_eq!(stall_decision(i, p), StallDecision::Continue);
        }
        // …then switch over once they stop shrinking, or at the round limit.
        let mut flat = input(5, 780, 800, 20.0);
        flat.path_ms = 20.0;
        for p in [
            StallPolicy::Pause,
            StallPolicy::Abort,
            StallPolicy::Throttle,
        ] {
            assert_eq!(stall_decision(flat, p), StallDecision::Switchover);
        }
        let mut limit = input(30, 100, 1000, 20.0);
        limit.path_ms = 20.0;
        assert_eq!(
            stall_decision(limit, StallPolicy::Abort),
            StallDecision::Switchover
        );
        // A round 1 or 2 that grew says the same as a flat one.
        let mut grew = input(2, 1200, 1000, 20.0);
        grew.path_ms = 20.0;
        assert_eq!(
            stall_decision(grew, StallPolicy::Pause),
            StallDecision::Switchover
        );
        // Transfer and round trip within the target: at once.
        let mut small = input(2, 100, 1000, 8.0);
        small.path_ms = 20.0;
        assert_eq!(
            stall_decision(small, StallPolicy::Pause),
            StallDecision::Switchover
        );
    }

    #[test]
    fn fits_switches_over_whatever_the_policy() {
        for p in [
            StallPolicy::Pause,
            StallPolicy::Abort,
            StallPolicy::Throttle,
        ] {
            assert_eq!(
                stall_decision(input(1, 100, u64::MAX, 10.0), p),
                StallDecision::Switchover
            );
        }
    }

    #[test]
    fn shrinking_rounds_continue_and_flat_rounds_stall() {
        assert_eq!(
            stall_decision(input(4, 800, 1000, 100.0), StallPolicy::Pause),
            StallDecision::Continue
        );
        assert_eq!(
            stall_decision(input(4, 950, 1000, 100.0), StallPolicy::Pause),
            StallDecision::StopAndCopy
        );
        // Rounds 1 and 2 never count as stalled (round 0 is not comparable).
        assert_eq!(
            stall_decision(input(2, 5000, 1000, 100.0), StallPolicy::Abort),
            StallDecision::Continue
        );
        assert_eq!(
            stall_decision(input(4, 950, 1000, 100.0), StallPolicy::Abort),
            StallDecision::Abort
        );
    }

    #[test]
    fn one_flat_round_after_shrinking_ones_is_not_a_stall() {
        // Logged (wan, `auto`): round 1 wrote 3,939 pages in 501 ms, round 2 4,542 in 174
        // ms (a burst); the stop-and-copy paused 106 ms against a 30 ms target.
        let mut i = input(3, 4542, 3939, 117.0);
        i.prev_flat = false;
        for p in [
            StallPolicy::Pause,
            StallPolicy::Abort,
            StallPolicy::Throttle,
        ] {
            assert_eq!(stall_decision(i, p), StallDecision::Continue, "{p:?}");
        }
        // The next round flat again: now it is a stall.
        let mut next = input(4, 4400, 4542, 113.0);
        next.prev_flat = !shrank(4542, 3939);
        assert!(next.prev_flat);
        assert_eq!(
            stall_decision(next, StallPolicy::Pause),
            StallDecision::StopAndCopy
        );
        // Or it shrank: more rounds.
        let mut shrinking = input(4, 900, 4542, 22.0);
        shrinking.prev_flat = true;
        assert_ne!(
            stall_decision(shrinking, StallPolicy::Pause),
            StallDecision::StopAndCopy
        );
        // The rule itself: a tenth, and an uncompared round counts as shrunk.
        assert!(shrank(899, 1000) && !shrank(900, 1000) && shrank(5000, u64::MAX));
    }

    #[test]
    fn a_flat_round_that_fits_ends_pre_copy_on_a_long_path() {
        // Logged (far, 50 ms path, `auto`): 26 pages, then 106 in 6 ms. The transfer fits
        // the target (the round trip cannot): switch over, do not wait for a second flat
        // round (the next one, stretched by a retransmission, held 437 pages).
        let mut i = input(12, 106, 26, 4.0);
        i.path_ms = 50.0;
        i.prev_flat = false;
        assert_eq!(
            stall_decision(i, StallPolicy::Pause),
            StallDecision::Switchover
        );
        // Still shrinking: more rounds.
        let mut shrinking = input(11, 26, 52, 1.0);
        shrinking.path_ms = 50.0;
        shrinking.prev_flat = false;
        assert_eq!(
            stall_decision(shrinking, StallPolicy::Pause),
            StallDecision::Continue
        );
    }

    #[test]
    fn throttle_steps_until_it_cannot_then_stops_and_copies() {
        assert_eq!(
            stall_decision(input(4, 950, 1000, 100.0), StallPolicy::Throttle),
            StallDecision::ThrottleStep
        );
        let mut i = input(4, 950, 1000, 100.0);
        i.can_throttle_more = false;
        assert_eq!(
            stall_decision(i, StallPolicy::Throttle),
            StallDecision::StopAndCopy
        );
        let at_limit = input(30, 10, 1000, 100.0);
        assert_eq!(
            stall_decision(at_limit, StallPolicy::Throttle),
            StallDecision::StopAndCopy
        );
        assert_eq!(
            stall_decision(at_limit, StallPolicy::Pause),
            StallDecision::StopAndCopy
        );
    }

    #[test]
    fn a_round_that_mostly_waited_for_the_previous_one_does_not_compare() {
        // wan (21 ms round trip): a 2 MB round that waited 60 of its 82 ms for a drain.
        assert!(!round_comparable(60.0, 82.0, 21.0));
        assert!(round_comparable(40.0, 82.0, 21.0));
        assert!(round_comparable(0.0, 80.0, 21.0));
        // far (50 ms): a small round waiting 85 ms is its confirmation's round trip.
        assert!(round_comparable(85.0, 90.0, 50.0));
        // One pass, then the next round compares whatever it waited for.
        assert!(!compare_rounds(60.0, 82.0, 21.0, false));
        assert!(compare_rounds(60.0, 82.0, 21.0, true));
        assert!(compare_rounds(10.0, 82.0, 21.0, false));
    }

    #[test]
    fn parses_policies() {
        assert_eq!("".parse::<StallPolicy>(), Ok(StallPolicy::Pause));
        assert_eq!("throttle".parse::<StallPolicy>(), Ok(StallPolicy::Throttle));
        assert!("nope".parse::<StallPolicy>().is_err());
    }
}
