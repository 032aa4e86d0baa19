//! Deterministic simulation of cold migration's ownership (the live handoff has its own in
//! `ferry-handoff/tests/simulation.rs`).
//!
//! Two agents, a VM defined on the source (moved with `--undefine-source`, the case where
//! a wrong step leaves it defined nowhere), the target's incoming migration with every
//! image already there, and the messages of Finish, Abort and the "taken back" news
//! between them. The decisions are the real ones the agent calls: the source's
//! `cold_settle` (what an answer, or none, means once Finish may have reached the target,
//! and whether the operator's verdict counts) and the target's `cold_taken_back` (what the
//! news undoes); the rest mirrors `migration/cold/{source,target}.rs` step by step. A seeded
//! RNG picks every next event: progress of either side, delivery in any order, loss,
//! partitions, a Finish call that times out, restarts of either agent (what each journals
//! survives), the operator's verdict while the target cannot be reached (wrong whenever the
//! target comes back), and an operator starting the VM on either host where it is free to.
//!
//! The target also answers with errors of its own, now and then and for stretches (reached: a failed task;
//! unreached: a journal it cannot read), and the operator declares again when a target
//! that answered once went away. After every event: the VM is defined somewhere, runs on
//! two hosts only after the verdict took it back, and the news never removes a VM that ran
//! on the target. Then faults stop, the source agent is up, and the target is back — or,
//! in a quarter of the schedules, gone for good — and the world must settle: the source's
//! migration ended, the VM never held for ever, defined on at least one host (free on the
//! source when the target is gone and the migration did not complete), on one only unless
//! the target's operator started it there before the news could undo it (then the source
//! must have heard the refusal: it logs the VM defined on two hosts), and a migration
//! reported completed only with the VM defined on the target.
//!
//! `FERRY_SIM_SCHEDULES` sets the number of schedules (default 400). Broken variants must be
//! caught: the failed copy's plain Abort after a verdict (the bug a review found: its
//! "finished" completed the migration, the news then removed the target's copy), a source
//! that does not tell the target, a start that leaves the VM marked as the migration's, and
//! a verdict spent on an answer that cannot be given again (the second review's finding).

use ferry_agent::migration::cold::{
    cold_settle, cold_taken_back, ColdSettle, ColdTakenBack, DefinedHere,
};
use ferry_api::v1 as pb;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Broken {
    No,
    /// The failed copy still sends its plain Abort after the verdict, and completes on a
    /// "finished" answer.
    PlainAbortAfterVerdict,
    /// The source never tells the target that it took the VM back.
    NoNews,
    /// Starting the VM on the target leaves it marked as the migration's (`arrived_by`).
    StartKeepsMark,
    /// A verdict spent on a target that answered cannot be given again.
    OneShotVerdict,
}

/// Who sent a request (the source's task that waits for its answer).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Asker {
    Finish,
    Settle,
    FailedAbort,
    Tell,
}

#[derive(Clone, Debug)]
enum Msg {
    Finish {
        epoch: u32,
    },
    Abort {
        epoch: u32,
        asker: Asker,
        taken_back: bool,
    },
    Reply {
        epoch: u32,
        asker: Asker,
        answer: Result<(bool, bool), tonic::Code>,
    },
}

/// The source's VM.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum SVm {
    Held,
    Free,
    Running,
    Gone,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum SPhase {
    Copying,
    Held,
    Sent,
    Settling,
    /// `Job::failed`: the VM still held, its plain Abort out (or about to go).
    Failing,
    Done,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Inc {
    Receiving,
    Finished,
    Failed,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct TVm {
    arrived_by: bool,
    running: bool,
    /// It has run on the target (the news must never remove it).
    started: bool,
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

struct World {
    broken: Broken,
    // Source.
    s_up: bool,
    epoch: u32,
    phase: SPhase,
    s_vm: SVm,
    /// Journaled: the verdict took the VM back.
    taken_back: bool,
    /// The news is being told (restarted with the flag after a restart).
    telling: bool,
    /// One news call at a time, as the telling task makes them.
    tell_out: bool,
    asking: bool,
    /// The operator's declarations so far (in memory), the one the settling question in
    /// flight was asked under, and the one a target's answer spent.
    declarations: u64,
    asked_under: u64,
    verdict_spent: u64,
    /// In `Failing`: the plain Abort not sent yet.
    failed_pending: bool,
    completed: bool,
    refusal_heard: bool,
    // Target.
    t_up: bool,
    inc: Option<Inc>,
    owned: bool,
    t_vm: Option<TVm>,
    // Network.
    partition: bool,
    /// The target answers every question with an error of its own for a while (a task
    /// that keeps failing).
    t_erring: bool,
    /// The target host is gone for good (from the end of the faults on): never back.
    t_gone: bool,
    net: Vec<Msg>,
    log: Vec<String>,
    /// The first invariant broken after an event.
    violation: Option<String>,
}

impl World {
    fn new(broken: Broken) -> World {
        World {
            broken,
            s_up: true,
            epoch: 0,
            phase: SPhase::Copying,
            s_vm: SVm::Free,
            taken_back: false,
            telling: false,
            tell_out: false,
            asking: false,
            declarations: 0,
            asked_under: 0,
            verdict_spent: 0,
            failed_pending: false,
            completed: false,
            refusal_heard: false,
            t_up: true,
            inc: Some(Inc::Receiving),
            owned: false,
            t_vm: None,
            partition: false,
            t_erring: false,
            t_gone: false,
            net: vec![],
            log: vec![],
            violation: None,
        }
    }

    fn send(&mut self, m: Msg) {
        self.net.push(m);
    }

    // ---- source ----

    fn complete(&mut self) {
        self.s_vm = SVm::Gone;
        self.completed = true;
        self.phase = SPhase::Done;
        self.failed_pending = false;
        self.log
            .push("source: completed, its definition removed".into());
    }

    fn release(&mut self) {
        if self.s_vm == SVm::Held {
            self.s_vm = SVm::Free;
        }
        self.phase = SPhase::Done;
    }

    /// What an answer to the settling question (or none) decides (`settle_with_target`).
    fn settle_answer(&mut self, answer: Option<Result<(bool, bool), tonic::Code>>) {
        self.asking = false;
        let answer = answer.map(|r| {
            r.map(|(existed, finished)| pb::AbortColdMigrationResponse {
                existed,
                finished,
                error: String::new(),
            })
            .map_err(|c| tonic::Status::new(c, "sim"))
        });
        let verdict = if self.broken == Broken::OneShotVerdict {
            // The old rule: one declaration, spent for good by a target's answer.
            self.asked_under > 0 && self.verdict_spent == 0
        } else {
            self.asked_under != self.verdict_spent
        };
        let reached = ferry_agent::tls::reached(&answer);
        if verdict && reached {
            self.verdict_spent = self.asked_under;
            self.log.push(format!(
                "source: the target answered after the verdict ({}): spent",
                match &answer {
                    Some(Ok(_)) => "an answer".to_string(),
                    Some(Err(e)) => format!("{:?}", e.code()),
                    None => "none".to_string(),
                }
            ));
        }
        match cold_settle(&answer, verdict) {
            ColdSettle::Complete => self.complete(),
            ColdSettle::Release if verdict && !reached => {
                self.taken_back = true;
                self.telling = self.broken != Broken::NoNews;
                self.phase = SPhase::Failing;
                self.failed_pending = true;
                self.log
                    .push("source: the verdict takes the VM back".into());
            }
            ColdSettle::Release => {
                self.log.push("source: the target did not define it".into());
                if self.epoch == 0 {
                    // The migration's own task: `Job::failed`.
                    self.phase = SPhase::Failing;
                    self.failed_pending = true;
                } else {
                    // After a restart, `settle_and_end` frees the VM.
                    self.release();
                }
            }
            ColdSettle::AskAgain => {}
        }
    }

    fn source_step(&mut self) -> bool {
        if !self.s_up {
            return false;
        }
        if self.failed_pending {
            // `Job::failed`: the plain Abort, unless the verdict decided; then the VM is free.
            self.failed_pending = false;
            if !self.taken_back || self.broken == Broken::PlainAbortAfterVerdict {
                self.send(Msg::Abort {
                    epoch: self.epoch,
                    asker: Asker::FailedAbort,
                    taken_back: false,
                });
            } else {
                self.release();
            }
            return true;
        }
        match self.phase {
            SPhase::Copying => {
                // Journaled: the VM held, Finish about to go.
                self.s_vm = SVm::Held;
                self.phase = SPhase::Held;
                true
            }
            SPhase::Held => {
                self.send(Msg::Finish { epoch: self.epoch });
                self.phase = SPhase::Sent;
                true
            }
            SPhase::Settling if !self.asking => {
                if self.taken_back {
                    // Restarted with the verdict journaled: no question, only the news.
                    self.release();
                    self.telling = self.broken != Broken::NoNews;
                    return true;
                }
                self.asking = true;
                self.asked_under = self.declarations;
                self.send(Msg::Abort {
                    epoch: self.epoch,
                    asker: Asker::Settle,
                    taken_back: false,
                });
                true
            }
            _ if self.telling && !self.tell_out => {
                self.tell_out = true;
                self.send(Msg::Abort {
                    epoch: self.epoch,
                    asker: Asker::Tell,
                    taken_back: true,
                });
                true
            }
            _ => false,
        }
    }

    fn source_hears(&mut self, asker: Asker, answer: Option<Result<(bool, bool), tonic::Code>>) {
        match asker {
            Asker::Finish => {
                if self.phase != SPhase::Sent {
                    return;
                }
                match answer {
                    Some(Ok(_)) => self.complete(),
                    _ => self.phase = SPhase::Settling,
                }
            }
            Asker::Settle => {
                if self.phase == SPhase::Settling && self.asking {
                    self.settle_answer(answer);
                }
            }
            Asker::FailedAbort => {
                if self.phase != SPhase::Failing || self.failed_pending {
                    return;
                }
                if let Some(Ok((_, true))) = answer {
                    // "The Finish call did get through": completes.
                    self.log
                        .push("source: the failed copy's Abort said finished".into());
                    self.complete();
                } else {
                    self.release();
                }
            }
            Asker::Tell => match answer {
                _ if !std::mem::replace(&mut self.tell_out, false) => {}
                Some(Ok((_, false))) => self.telling = false,
                Some(Ok((_, true))) => {
                    self.telling = false;
                    self.refusal_heard = true;
                }
                Some(Err(tonic::Code::FailedPrecondition)) => {
                    self.telling = false;
                    self.refusal_heard = true;
                    self.log
                        .push("source: the target refused the news (two hosts)".into());
                }
                _ => {}
            },
        }
    }

    fn restart_source(&mut self) {
        self.epoch += 1;
        self.asking = false;
        self.tell_out = false;
        self.declarations = 0;
        self.asked_under = 0;
        self.verdict_spent = 0;
        self.failed_pending = false;
        match self.phase {
            // Before Finish may go: marked failed, the VM free.
            SPhase::Copying => self.phase = SPhase::Done,
            // Journaled held: settled with the target.
            SPhase::Held | SPhase::Sent | SPhase::Settling | SPhase::Failing => {
                if self.s_vm == SVm::Held {
                    self.phase = SPhase::Settling
                } else {
                    self.phase = SPhase::Done
                }
            }
            SPhase::Done => {}
        }
        // A settled record with the flag: told again (server.rs).
        self.telling = self.taken_back && self.broken != Broken::NoNews;
        if self.s_vm == SVm::Held && self.phase == SPhase::Done {
            panic!("held by a migration already settled");
        }
    }

    // ---- target ----

    fn target_handles(&mut self, m: &Msg) -> Option<Result<(bool, bool), tonic::Code>> {
        match m {
            Msg::Finish { .. } => Some(match self.inc {
                Some(Inc::Receiving) => {
                    self.owned = true;
                    self.t_vm = Some(TVm {
                        arrived_by: true,
                        running: false,
                        started: false,
                    });
                    self.inc = Some(Inc::Finished);
                    Ok((true, true))
                }
                Some(Inc::Finished) => Ok((true, true)),
                Some(Inc::Failed) => Err(tonic::Code::Aborted),
                None if self.owned => Ok((true, true)),
                None => Err(tonic::Code::NotFound),
            }),
            Msg::Abort {
                taken_back: false, ..
            } => Some(match self.inc {
                Some(Inc::Receiving) => {
                    self.inc = Some(Inc::Failed);
                    Ok((true, false))
                }
                Some(Inc::Failed) => Ok((true, false)),
                Some(Inc::Finished) => Ok((true, true)),
                None => Ok((self.owned, self.owned)),
            }),
            Msg::Abort {
                taken_back: true, ..
            } => {
                if let Some(i) = self.inc {
                    if i != Inc::Finished {
                        self.inc = Some(Inc::Failed);
                        return Some(Ok((true, false)));
                    }
                }
                if !self.owned {
                    return Some(Ok((self.inc.is_some(), false)));
                }
                let here = self.t_vm.map(|v| DefinedHere {
                    arrived_by: v.arrived_by.then_some("m1"),
                    busy: v.running,
                });
                Some(match cold_taken_back(here, "m1") {
                    ColdTakenBack::Undefine => {
                        if self.t_vm.is_some_and(|v| v.started) {
                            self.violation.get_or_insert(
                                "the news removed a VM that had run on the target".into(),
                            );
                        }
                        self.t_vm = None;
                        self.owned = false;
                        if self.inc.is_some() {
                            self.inc = Some(Inc::Failed);
                        }
                        Ok((true, false))
                    }
                    ColdTakenBack::NothingHere => {
                        self.owned = false;
                        Ok((false, false))
                    }
                    ColdTakenBack::Busy => Err(tonic::Code::Unavailable),
                    ColdTakenBack::Stays => Err(tonic::Code::FailedPrecondition),
                })
            }
            Msg::Reply { .. } => None,
        }
    }

    fn deliver(&mut self, i: usize, rng: &mut Rng) {
        let to_target = !matches!(self.net[i], Msg::Reply { .. });
        if (self.partition || (to_target && !self.t_up)) && rng.chance(50) {
            // Still trying within its deadline (a channel reconnecting): it may yet arrive.
            return;
        }
        let m = self.net.remove(i);
        if self.partition {
            self.lost(&m);
            return;
        }
        match &m {
            Msg::Reply {
                epoch,
                asker,
                answer,
            } => {
                if self.s_up && *epoch == self.epoch {
                    self.source_hears(*asker, Some(*answer));
                }
            }
            Msg::Finish { epoch } | Msg::Abort { epoch, .. } => {
                let asker = match &m {
                    Msg::Abort { asker, .. } => *asker,
                    _ => Asker::Finish,
                };
                let epoch = *epoch;
                if !self.t_up {
                    // Refused connection: the caller hears Unavailable.
                    self.reply_or_lose(epoch, asker, Err(tonic::Code::Unavailable), rng);
                    return;
                }
                if matches!(
                    m,
                    Msg::Abort {
                        taken_back: false,
                        ..
                    }
                ) && (self.t_erring || rng.chance(10))
                {
                    // An error of its own that settles nothing: reached (a failed task),
                    // or not (its journal unreadable: Unavailable).
                    let code = if rng.chance(50) {
                        tonic::Code::Internal
                    } else {
                        tonic::Code::Unavailable
                    };
                    self.reply_or_lose(epoch, asker, Err(code), rng);
                    return;
                }
                if let Some(answer) = self.target_handles(&m) {
                    self.reply_or_lose(epoch, asker, answer, rng);
                }
            }
        }
    }

    fn reply_or_lose(
        &mut self,
        epoch: u32,
        asker: Asker,
        answer: Result<(bool, bool), tonic::Code>,
        rng: &mut Rng,
    ) {
        if rng.chance(15) {
            self.lost(&Msg::Reply {
                epoch,
                asker,
                answer,
            });
        } else {
            self.send(Msg::Reply {
                epoch,
                asker,
                answer,
            });
        }
    }

    /// A message lost: its caller's deadline passes with no answer.
    fn lost(&mut self, m: &Msg) {
        let (epoch, asker) = match m {
            Msg::Finish { epoch } => (*epoch, Asker::Finish),
            Msg::Abort { epoch, asker, .. } | Msg::Reply { epoch, asker, .. } => (*epoch, *asker),
        };
        if self.s_up && epoch == self.epoch {
            self.source_hears(asker, None);
        }
    }

    // ---- the world ----

    fn step(&mut self, rng: &mut Rng, faults: bool) -> bool {
        let n = 12;
        for _ in 0..n * 3 {
            let did = match rng.below(n) {
                0 | 1 => self.source_step(),
                2..=4 if !self.net.is_empty() => {
                    let i = rng.below(self.net.len());
                    self.deliver(i, rng);
                    true
                }
                5 if faults && !self.net.is_empty() => {
                    let i = rng.below(self.net.len());
                    let m = self.net.remove(i);
                    self.lost(&m);
                    true
                }
                6 if faults && rng.chance(30) => {
                    if self.s_up {
                        self.s_up = false;
                        self.log.push("source agent down".into());
                    } else {
                        self.s_up = true;
                        self.restart_source();
                        self.log.push("source agent restarted".into());
                    }
                    true
                }
                7 if faults && rng.chance(30) => {
                    if self.t_up {
                        self.t_up = false;
                        // In memory only: the incoming migration.
                        self.inc = None;
                        self.log.push("target agent down".into());
                    } else {
                        self.t_up = true;
                        self.log.push("target agent restarted".into());
                    }
                    true
                }
                8 if faults && rng.chance(20) => {
                    self.partition = !self.partition;
                    true
                }
                // The operator declares (again, if the last one was spent on an answer).
                9 if self.s_up
                    && self.phase == SPhase::Settling
                    && (self.declarations == 0 || self.declarations == self.verdict_spent)
                    && (!self.t_up || self.partition) =>
                {
                    self.declarations += 1;
                    self.log
                        .push("operator: the target is gone for good".into());
                    true
                }
                10 => self.operator_starts(rng),
                11 if faults && rng.chance(20) => {
                    self.t_erring = !self.t_erring;
                    true
                }
                _ => false,
            };
            if did {
                if let Err(e) = self.check_now() {
                    self.log.push(format!("VIOLATION: {e}"));
                    self.violation.get_or_insert(e);
                }
                return true;
            }
        }
        false
    }

    /// An operator starts the VM where it is free to (their agent allows it).
    fn operator_starts(&mut self, rng: &mut Rng) -> bool {
        if rng.chance(50) {
            if self.s_up && self.s_vm == SVm::Free && self.phase == SPhase::Done && rng.chance(20) {
                self.s_vm = SVm::Running;
                self.log.push("operator starts the VM on the source".into());
                return true;
            }
        } else if self.t_up {
            if let Some(v) = self.t_vm.as_mut() {
                if v.running && rng.chance(20) {
                    v.running = false;
                    self.log.push("operator stops the VM on the target".into());
                    return true;
                }
                if !v.running && rng.chance(20) {
                    v.running = true;
                    v.started = true;
                    if self.broken != Broken::StartKeepsMark {
                        v.arrived_by = false;
                    }
                    self.log.push("operator starts the VM on the target".into());
                    return true;
                }
            }
        }
        false
    }

    /// After every event: the VM is defined somewhere, and it runs on both hosts only
    /// after a verdict on a target that was not gone (the operators started both).
    fn check_now(&self) -> Result<(), String> {
        if self.s_vm == SVm::Gone && self.t_vm.is_none() {
            return Err("the VM is defined on no host".into());
        }
        let both = self.s_vm == SVm::Running && self.t_vm.is_some_and(|v| v.running);
        if both && !self.taken_back {
            return Err("the VM runs on two hosts without a verdict".into());
        }
        Ok(())
    }

    fn settled(&self) -> bool {
        // A target gone for good never hears the news.
        self.phase == SPhase::Done && (self.t_gone || (!self.telling && self.net.is_empty()))
    }

    fn check_end(&self) -> Result<(), String> {
        if let Some(v) = &self.violation {
            return Err(v.clone());
        }
        let on_source = matches!(self.s_vm, SVm::Free | SVm::Running);
        let on_target = self.t_vm.is_some();
        if self.s_vm == SVm::Held {
            return Err("the VM stays held on the source".into());
        }
        if !on_source && !on_target {
            return Err("the VM is defined on no host".into());
        }
        if self.t_gone && !on_source && !self.completed {
            return Err("the target is gone for good and the VM is not free on the source".into());
        }
        // A target gone for good holds nothing anyone can start.
        if on_source && on_target && !self.t_gone {
            let started_there = self.t_vm.is_some_and(|v| v.started);
            if !(self.taken_back && started_there && self.refusal_heard) {
                return Err(
                    "the VM is defined on two hosts, not from a target that started it before the news (or the source did not hear it refused)"
                        .into(),
                );
            }
        }
        if self.completed && !on_target {
            return Err("reported completed, but the target does not have the VM".into());
        }
        Ok(())
    }
}

/// Runs `schedules` seeded schedules; the first failure, with its seed and event log.
fn run(broken: Broken, schedules: u64) -> Result<(), String> {
    for seed in 1..=schedules {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let mut w = World::new(broken);
        let fault_events = 20 + rng.below(120);
        for _ in 0..fault_events {
            w.step(&mut rng, true);
        }
        // Faults stop: the source agent up, the network whole, and the target back — or
        // gone for good (the case the operator's verdict exists for).
        w.partition = false;
        w.t_erring = false;
        if !w.s_up {
            w.s_up = true;
            w.restart_source();
        }
        if rng.chance(25) {
            w.t_gone = true;
            w.t_up = false;
            w.inc = None;
            w.log.push("target host gone for good".into());
        } else {
            w.t_up = true;
        }
        let mut quiet = 0;
        for _ in 0..5000 {
            if w.settled() {
                break;
            }
            if !w.step(&mut rng, false) {
                quiet += 1;
                if quiet > 50 {
                    break;
                }
            }
        }
        if let Some(v) = &w.violation {
            return Err(format!("seed {seed}: {v}\n{}", w.log.join("\n")));
        }
        if !w.settled() {
            return Err(format!(
                "seed {seed}: never settles ({:?}, telling {}, {} messages)\n{}",
                w.phase,
                w.telling,
                w.net.len(),
                w.log.join("\n")
            ));
        }
        w.check_end()
            .map_err(|e| format!("seed {seed}: {e}\n{}", w.log.join("\n")))?;
    }
    Ok(())
}

fn schedules() -> u64 {
    std::env::var("FERRY_SIM_SCHEDULES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400)
}

#[test]
fn cold_ownership_holds_under_every_schedule() {
    if let Err(e) = run(Broken::No, schedules()) {
        panic!("{e}");
    }
}

#[test]
fn simulation_catches_a_plain_abort_after_the_verdict() {
    let e = run(Broken::PlainAbortAfterVerdict, schedules().max(5000))
        .expect_err("the broken variant must be caught");
    assert!(
        e.contains("defined on no host") || e.contains("reported completed"),
        "{e}"
    );
}

#[test]
fn simulation_catches_a_source_that_does_not_tell() {
    let e =
        run(Broken::NoNews, schedules().max(5000)).expect_err("the broken variant must be caught");
    assert!(e.contains("two hosts"), "{e}");
}

#[test]
fn simulation_catches_a_verdict_that_cannot_be_given_again() {
    let e = run(Broken::OneShotVerdict, schedules().max(5000))
        .expect_err("the broken variant must be caught");
    assert!(e.contains("never settles"), "{e}");
}

#[test]
fn simulation_catches_a_start_that_keeps_the_mark() {
    let e = run(Broken::StartKeepsMark, schedules().max(5000))
        .expect_err("the broken variant must be caught");
    assert!(e.contains("removed a VM that had run"), "{e}");
}
