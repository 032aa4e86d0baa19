//! The live-migration handoff of ferry as pure state machines: no I/O, no clocks.
//!
//! The agent (`ferry-agent`) carries out what these functions decide; the deterministic
//! simulation in `tests/simulation.rs` drives the very same functions through lost
//! messages, crashes and restarts and checks the ownership invariant after every step:
//! **a VM runs on at most one host at any instant, and on exactly one once the faults
//! stop.**
//!
//! The handoff in one paragraph: the source pauses the guest (QEMU `pre-switchover`),
//! sends the last pages, lets its QEMU write the device state into a local socket that
//! the source agent both relays to the target and keeps as a file beside the RAM file
//! (the *capture*), and waits for its QEMU to report `completed`. A QEMU whose outgoing
//! migration completed never resumes the guest by itself: the source is **fenced**. Only
//! then does the source journal `CommitSent` and send `Commit`. The target journals
//! `Committed` (with the VM record, one transaction), resumes its QEMU, journals `Owned`
//! and answers. The source destroys its copy only once the target says `Owned`; until
//! then its fenced QEMU (or, if that QEMU died, the RAM file plus the capture) can still
//! take the guest back.

pub mod phase;
pub mod receiver;
pub mod recovery;
pub mod stall;
pub mod verify;

pub use phase::Phase;
pub use receiver::{decide_commit, Effect, Receiver, ReceiverEvent};
pub use recovery::{
    answer_with_verdict, on_taken_back, rollback_resume, source_recovery, target_after_waiting,
    target_recovery, OnTakenBack, Resume, SourceAction, SourceMark, SourceQemu, SourceWord,
    TargetAction, TargetAnswer, TargetQemu,
};
pub use stall::{
    compare_rounds, round_comparable, shrank, stall_decision, worth_another_round, StallDecision,
    StallInput, StallPolicy,
};
pub use verify::VerifyMode;
