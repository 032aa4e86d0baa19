//! The target's side of the handoff: who owns the VM, as a receiver state with a step
//! function, and the commit decision.

use serde::{Deserialize, Serialize};

/// The target's ownership state of one incoming migration. Every state but `Prepared`
/// is journaled before the effects that follow it (see [`Effect`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Receiver {
    /// A paused QEMU waits for pages and device state; the source owns the VM.
    Prepared,
    /// Journaled with the VM record: the VM is ours, resuming it is under way. A restart
    /// in this state resumes the QEMU, or hands the VM back if the QEMU is gone.
    Committed { leave_paused: bool },
    /// The VM is ours for good (resumed, or left paused as asked); the source may destroy
    /// its copy once it hears this.
    Owned,
    /// Discarded: QEMU killed, files removed. Kept as a tombstone so the source hears
    /// "aborted" rather than "never heard of it".
    Aborted,
}

/// What happens to a [`Receiver`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceiverEvent {
    /// The source asked to commit; `verdict` is [`decide_commit`]'s.
    CommitAsked {
        verdict: Result<(), String>,
        leave_paused: bool,
    },
    /// The source (or its recovery) asked to abort.
    AbortAsked,
    /// The data plane ended before a commit (source gone, bad frame, timeout).
    SourceLost,
    /// The QEMU reported RESUME after `cont` (or was left paused as asked).
    Resumed,
    /// `cont` failed or the QEMU died before it resumed.
    ResumeFailed,
}

/// Effects, in the order the agent must carry them out. A `Journal*` effect must be
/// durable before the next effect starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Journal `Committed` together with the VM record (one transaction).
    JournalCommitted { leave_paused: bool },
    /// QMP `cont` (and `announce-self`), then report `Resumed` or `ResumeFailed`.
    Resume,
    /// Journal `Owned`.
    JournalOwned,
    /// Tell the source the VM is ours.
    ReplyOwned,
    /// Journal the tombstone `Aborted` (and drop the VM record, one transaction). Always
    /// after `Discard`, so a crash between them discards again on restart.
    JournalAborted,
    /// Kill the QEMU, remove RAM file, run directory and disk copies (idempotent).
    Discard,
    /// Tell the caller no (the state is unchanged unless another effect says so).
    Refuse(String),
}

impl Receiver {
    /// One step: the next state and what to do, in order.
    pub fn step(self, ev: ReceiverEvent) -> (Receiver, Vec<Effect>) {
        use Effect as E;
        use Receiver as R;
        use ReceiverEvent as V;
        match (self, ev) {
            (
                R::Prepared,
                V::CommitAsked {
                    verdict: Ok(()),
                    leave_paused: true,
                },
            ) => (
                R::Owned,
                vec![
                    E::JournalCommitted { leave_paused: true },
                    E::JournalOwned,
                    E::ReplyOwned,
                ],
            ),
            (
                R::Prepared,
                V::CommitAsked {
                    verdict: Ok(()),
                    leave_paused: false,
                },
            ) => (
                R::Committed {
                    leave_paused: false,
                },
                vec![
                    E::JournalCommitted {
                        leave_paused: false,
                    },
                    E::Resume,
                ],
            ),
            // A refused commit (device state did not load, fingerprints differ) ends the
            // migration here: the source resumes its fenced copy.
            (
                R::Prepared,
                V::CommitAsked {
                    verdict: Err(why), ..
                },
            ) => (
                R::Aborted,
                vec![E::Refuse(why), E::Discard, E::JournalAborted],
            ),
            (R::Prepared, V::AbortAsked | V::SourceLost) => {
                (R::Aborted, vec![E::Discard, E::JournalAborted])
            }
            (R::Prepared, V::Resumed | V::ResumeFailed) => (R::Prepared, vec![]),

            (R::Committed { .. }, V::Resumed) => (R::Owned, vec![E::JournalOwned, E::ReplyOwned]),
            // The source still holds its fenced copy (it destroys it only on Owned): hand
            // the VM back rather than leave it nowhere.
            (R::Committed { .. }, V::ResumeFailed) => (
                R::Aborted,
                vec![
                    E::Discard,
                    E::JournalAborted,
                    E::Refuse(
                        "the target QEMU failed to resume; the VM is handed back to the source"
                            .into(),
                    ),
                ],
            ),
            (s @ R::Committed { .. }, V::CommitAsked { .. }) => {
                (s, vec![E::Refuse("commit in progress: ask again".into())])
            }
            (s @ R::Committed { .. }, V::AbortAsked) => (
                s,
                vec![E::Refuse("committed: the VM is being resumed here".into())],
            ),
            (s @ R::Committed { .. }, V::SourceLost) => (s, vec![]),

            (R::Owned, V::CommitAsked { .. }) => (R::Owned, vec![E::ReplyOwned]),
            (R::Owned, V::AbortAsked) => (
                R::Owned,
                vec![E::Refuse("committed: the VM runs here now".into())],
            ),
            (R::Owned, V::SourceLost | V::Resumed | V::ResumeFailed) => (R::Owned, vec![]),

            (R::Aborted, V::CommitAsked { .. }) => (
                R::Aborted,
                vec![E::Refuse("the migration was aborted here".into())],
            ),
            (R::Aborted, _) => (R::Aborted, vec![]),
        }
    }

    /// Whether this host owns the VM (it may run it).
    pub fn owns(self) -> bool {
        matches!(self, Receiver::Committed { .. } | Receiver::Owned)
    }
}

/// The commit decision: once the device state has loaded and (when verifying) both RAM
/// fingerprints are known, whether to commit. `None`: not decidable yet.
pub fn decide_commit(
    loaded: Option<&Result<(), String>>,
    source_digest: Option<u128>,
    target_digest: Option<&Result<u128, String>>,
) -> Option<Result<(), String>> {
    match (loaded, source_digest, target_digest) {
        (None, _, _) => None,
        (Some(Err(e)), _, _) => Some(Err(format!("the device state did not load: {e}"))),
        (Some(Ok(())), None, _) => Some(Ok(())),
        (Some(Ok(())), Some(_), None) => None,
        (Some(Ok(())), Some(_), Some(Err(e))) => Some(Err(format!("fingerprint of the RAM file: {e}"))),
        (Some(Ok(())), Some(t), Some(Ok(m))) if t == *m => Some(Ok(())),
        (Some(Ok(())), Some(t), Some(Ok(m))) => Some(Err(format!(
            "RAM fingerprint mismatch: source {t:032x} vs target {m:032x}; the target copy is wrong, so the VM stays on the source"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Effect as E;
    use Receiver as R;
    use ReceiverEvent as V;

    #[test]
    fn commit_journals_before_resuming_and_owns_after() {
        let (s, fx) = R::Prepared.step(V::CommitAsked {
            verdict: Ok(()),
            leave_paused: false,
        });
        assert_eq!(
            s,
            R::Committed {
                leave_paused: false
            }
        );
        assert_eq!(
            fx,
            vec![
                E::JournalCommitted {
                    leave_paused: false
                },
                E::Resume
            ]
        );
        let (s, fx) = s.step(V::Resumed);
        assert_eq!(s, R::Owned);
        assert_eq!(fx, vec![E::JournalOwned, E::ReplyOwned]);
    }

    #[test]
    fn left_paused_is_owned_at_once() {
        let (s, fx) = R::Prepared.step(V::CommitAsked {
            verdict: Ok(()),
            leave_paused: true,
        });
        assert_eq!(s, R::Owned);
        assert!(!fx.contains(&E::Resume));
    }

    #[test]
    fn failed_resume_hands_the_vm_back() {
        let (s, fx) = R::Committed {
            leave_paused: false,
        }
        .step(V::ResumeFailed);
        assert_eq!(s, R::Aborted);
        // Discard first: a crash in between finds `Committed` and a dead QEMU, and
        // discards again (idempotent) instead of keeping a tombstone beside a QEMU.
        assert_eq!(fx[..2], [E::Discard, E::JournalAborted]);
    }

    #[test]
    fn abort_is_refused_once_committed_and_commit_refused_once_aborted() {
        for s in [
            R::Committed {
                leave_paused: false,
            },
            R::Owned,
        ] {
            let (s2, fx) = s.step(V::AbortAsked);
            assert_eq!(s2, s);
            assert!(matches!(fx.as_slice(), [E::Refuse(_)]));
        }
        let (s, fx) = R::Aborted.step(V::CommitAsked {
            verdict: Ok(()),
            leave_paused: false,
        });
        assert_eq!(s, R::Aborted);
        assert!(matches!(fx.as_slice(), [E::Refuse(_)]));
    }

    #[test]
    fn refused_commit_or_lost_source_discards() {
        let (s, fx) = R::Prepared.step(V::CommitAsked {
            verdict: Err("mismatch".into()),
            leave_paused: false,
        });
        assert_eq!(s, R::Aborted);
        assert!(fx.contains(&E::Discard) && fx.contains(&E::JournalAborted));
        let (s, _) = R::Prepared.step(V::SourceLost);
        assert_eq!(s, R::Aborted);
        // A commit already taken survives the source vanishing.
        assert_eq!(R::Owned.step(V::SourceLost).0, R::Owned);
    }

    #[test]
    fn commit_decision() {
        let ok: Result<(), String> = Ok(());
        assert_eq!(decide_commit(None, Some(1), Some(&Ok(1))), None);
        assert_eq!(decide_commit(Some(&ok), None, None), Some(Ok(())));
        assert_eq!(decide_commit(Some(&ok), Some(7), None), None);
        assert_eq!(
            decide_commit(Some(&ok), Some(7), Some(&Ok(7))),
            Some(Ok(()))
        );
        assert!(
            matches!(decide_commit(Some(&ok), Some(7), Some(&Ok(8))), Some(Err(e)) if e.contains("mismatch"))
        );
        assert!(
            matches!(decide_commit(Some(&Err("x".into())), Some(7), Some(&Ok(7))), Some(Err(e)) if e.contains("did not load"))
        );
    }
}
