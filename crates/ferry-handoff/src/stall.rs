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
    /// The same for the round before (`u64::MAX` if none, or after a throttle step).
    pub prev_dirty_pages: u64,
    /// Predicted time of a final round of `dirty_pages`.
    pub predicted_ms: f64,
    pub downtime_ms: u32,
    /// Throttling only: whether the CPU quota can still be lowered.
    pub can_throttle_more: bool,
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
}

/// A round "stalls" at the round limit, or when from round 3 on it did not shrink by a
/// tenth compared with the round before.
pub fn stall_decision(i: StallInput, policy: StallPolicy) -> StallDecision {
    if i.predicted_ms <= f64::from(i.downtime_ms) {
        return StallDecision::Switchover;
    }
    let at_limit = i.round >= i.max_rounds;
    let stalled = at_limit
        || (i.round >= 3
            && i.dirty_pages.saturating_mul(10) >= i.prev_dirty_pages.saturating_mul(9));
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
            predicted_ms,
            downtime_ms: 30,
            can_throttle_more: true,
        }
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
    fn parses_policies() {
        assert_eq!("".parse::<StallPolicy>(), Ok(StallPolicy::Pause));
        assert_eq!("throttle".parse::<StallPolicy>(), Ok(StallPolicy::Throttle));
        assert!("nope".parse::<StallPolicy>().is_err());
    }
}
