//! The agent's journal: VM definitions and migration records in an embedded database
//! (redb), so an agent that restarts knows what it owned and what was in flight.

use redb::{Database, ReadableTable, TableDefinition};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::path::Path;

const VMS: TableDefinition<&str, &[u8]> = TableDefinition::new("vms");
const MIGRATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("migrations");
const COLD_PLACED: TableDefinition<&str, &[u8]> = TableDefinition::new("cold_placed");

/// Journal failures.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal database: {0}")]
    Db(String),
    #[error("journal record {key}: {source}")]
    Decode {
        key: String,
        source: serde_json::Error,
    },
}

fn db<E: std::fmt::Display>(e: E) -> JournalError {
    JournalError::Db(e.to_string())
}

/// What the journal keeps about a VM this host owns.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmRecord {
    pub spec: ferry_qemu::VmSpec,
    /// PID of its QEMU when last started (to re-adopt or clean up after a restart).
    pub pid: Option<u32>,
    /// Set while the VM is the target of an uncommitted incoming migration.
    pub incoming_migration: Option<String>,
    /// Source side: set (with the migration's `CommitSent` mark, one transaction) while
    /// an outgoing migration may have handed the VM over. The VM is held — paused,
    /// refusing resume/start/migrate — until that migration is settled.
    #[serde(default)]
    pub held_by: Option<String>,
    /// Target side of a cold migration: the migration that defined the VM here, until it
    /// first starts (cleared, journaled, before its QEMU spawns). Only such a definition
    /// goes when the source says it took the VM back on its operator's verdict.
    #[serde(default)]
    pub arrived_by: Option<String>,
    /// Set when this copy was fenced ([`Fence`]): paused and held until the operator
    /// clears it. A restart that finds its QEMU running pauses it again.
    #[serde(default)]
    pub fenced: Option<Fence>,
}

/// A copy of a VM held here because the VM runs on another host after an operator's
/// verdict on a migration found a host that was not gone ([`FenceWhy`]). It stays paused
/// or stopped, never removed (what its guest did is the operator's to keep or drop), until
/// the operator clears the fence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fence {
    /// The migration the verdict was given on.
    pub migration: String,
    /// The host that runs the VM now.
    pub runs_on: String,
    /// When the fence was set (ms since the Unix epoch).
    pub at_ms: i64,
    /// Which side of the migration this copy is.
    #[serde(default)]
    pub why: FenceWhy,
}

/// Why a copy is fenced ([`Fence`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum FenceWhy {
    /// Live, on the target: this copy ran here after the commit while the source took the
    /// VM back on its operator's verdict; the source's copy runs (the verdict's word).
    #[default]
    TakenBack,
    /// Cold, on the source: the verdict took the VM back here, stopped, but the target had
    /// started the VM already; that copy runs, and this one must not start beside it.
    StartedThere,
}

impl std::fmt::Display for Fence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.why {
            FenceWhy::TakenBack => write!(
                f,
                "fenced: migration {} committed here, then its source {} took the VM back on its operator's verdict (at {} ms since the epoch); the VM runs there",
                self.migration, self.runs_on, self.at_ms
            ),
            FenceWhy::StartedThere => write!(
                f,
                "fenced: the operator's verdict took the VM back here from cold migration {}, but its target {} had started the VM already (heard at {} ms since the epoch); the VM runs there",
                self.migration, self.runs_on, self.at_ms
            ),
        }
    }
}

/// Which side of a migration this host was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Source,
    Target,
}

/// A migration as journaled; `status` is the last published status.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrationRecord {
    pub id: String,
    pub role: Role,
    pub vm: String,
    pub peer: String,
    /// "prepared", "committed", or the source-side phase name.
    pub state: String,
    /// Target side: the one-time token the source must present.
    pub token: Option<String>,
    /// Protobuf-encoded `ferry.v1.MigrationStatus` (source side), for history.
    pub status: Option<Vec<u8>>,
    /// Target side: the receiver's ownership state (journaled before its effects).
    #[serde(default)]
    pub receiver: Option<ferry_handoff::Receiver>,
    /// Source side: the last irreversible step journaled.
    #[serde(default)]
    pub mark: Option<ferry_handoff::SourceMark>,
    /// Source side: whether the guest ran before the migration (a rollback leaves a
    /// suspended guest suspended).
    #[serde(default)]
    pub was_running: bool,
    /// Source side: the device-state capture kept beside the RAM file until settled.
    #[serde(default)]
    pub capture: Option<std::path::PathBuf>,
    /// Target side: disk images this host created empty for the migration (removed if
    /// it does not commit, also after a restart).
    #[serde(default)]
    pub copies: Vec<std::path::PathBuf>,
    /// Target side: disk images about to be made, journaled before the first is (state
    /// "preparing"). A restart removes only those still linked to their staging name
    /// (`ferry_disk::staged`): made by this migration, not found there.
    #[serde(default)]
    pub staged_copies: Vec<std::path::PathBuf>,
    /// Target side, once settled: disk copies of a migration that did not commit whose
    /// removal failed (an I/O error). Each kept its staging name, so another try removes it
    /// only while it is provably this migration's; tried at start-up and periodically. A
    /// record with any is not pruned.
    #[serde(default)]
    pub left_behind: Vec<std::path::PathBuf>,
    /// Source side of a cold migration: whether the definition goes from this host once
    /// the target has the VM (`None`: a live migration). Kept so that a restart can finish
    /// what the operator asked.
    #[serde(default)]
    pub cold_undefine: Option<bool>,
    /// Source side: the operator's verdict took the VM back here (the target, declared
    /// gone for good, did not answer), journaled before the guest resumes; true until the
    /// target has heard it (an Abort marked "taken back"). A record with it is not pruned.
    #[serde(default)]
    pub taken_back: bool,
    /// Not pruned before this time (milliseconds since the epoch; 0: no such limit): a
    /// cold migration's outcome on its target, which its source may ask for after an
    /// outage ([`COLD_OUTCOME_KEPT_MS`]); a live migration's `Owned` on its target
    /// ([`OWNED_KEPT_MS`]).
    #[serde(default)]
    pub keep_until_ms: i64,
    /// Milliseconds since the epoch of the last write (history pruning).
    #[serde(default)]
    pub updated_ms: i64,
}

impl MigrationRecord {
    /// A record with only the identifying fields set.
    pub fn new(id: &str, role: Role, vm: &str, peer: &str, state: &str) -> MigrationRecord {
        MigrationRecord {
            id: id.into(),
            role,
            vm: vm.into(),
            peer: peer.into(),
            state: state.into(),
            token: None,
            status: None,
            receiver: None,
            mark: None,
            was_running: true,
            capture: None,
            copies: Vec::new(),
            staged_copies: Vec::new(),
            left_behind: Vec::new(),
            cold_undefine: None,
            taken_back: false,
            keep_until_ms: 0,
            updated_ms: 0,
        }
    }

    /// Whether nothing is left to settle about it.
    pub fn settled(&self) -> bool {
        match self.role {
            Role::Target => matches!(
                self.receiver,
                Some(ferry_handoff::Receiver::Owned | ferry_handoff::Receiver::Aborted)
            ),
            Role::Source => self.mark == Some(ferry_handoff::SourceMark::Settled),
        }
    }
}

/// Target side: the disk images an incoming cold migration received whole and renamed
/// into place, while it has not defined its VM. Journaled as each arrives, so that images
/// of a copy that never finishes (the source gone, this agent restarted) are found and
/// removed once nothing uses them for `partial_keep_s`. Backing layers are not listed:
/// another VM's overlay may come to rest on one, and no VM's disk names the layer below.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColdPlacedRecord {
    /// The migration.
    pub id: String,
    /// The VM it brought.
    pub vm: String,
    /// The source host.
    pub source: String,
    /// Each image, with the file this migration placed there (the path may name another
    /// file since: then it is not this migration's to remove).
    pub placed: Vec<(std::path::PathBuf, ferry_disk::FileId)>,
    /// Milliseconds since the epoch of the last write.
    pub updated_ms: i64,
}

/// How long a cold migration's outcome stays in its target's journal: a source that lost
/// Finish's answer asks for it, also after an outage of that long; past it the target
/// answers "unknown" and the source frees its copy.
pub const COLD_OUTCOME_KEPT_MS: i64 = 30 * 24 * 3600 * 1000;

/// How long a live migration's `Owned` record stays in its target's journal (whatever
/// number of migrations come after): a source whose operator took the VM back on a wrong
/// verdict tells this host so when it reaches it again, and the record is what says which
/// VM to fence here. Past it the news finds nothing and is only logged.
pub const OWNED_KEPT_MS: i64 = COLD_OUTCOME_KEPT_MS;

/// One change in a [`Journal::apply`] transaction.
#[derive(Debug, Clone)]
pub enum Op {
    PutVm(VmRecord),
    RemoveVm(String),
    PutMigration(MigrationRecord),
    RemoveMigration(String),
}

/// The embedded database.
pub struct Journal {
    db: Database,
}

impl Journal {
    /// Opens (or creates) the journal file.
    pub fn open(path: &Path) -> Result<Journal, JournalError> {
        let db = Database::create(path).map_err(db)?;
        // Create the tables so read transactions never meet a missing table.
        let tx = db.begin_write().map_err(db_err)?;
        tx.open_table(VMS).map_err(db_err)?;
        tx.open_table(MIGRATIONS).map_err(db_err)?;
        tx.open_table(COLD_PLACED).map_err(db_err)?;
        tx.commit().map_err(db_err)?;
        Ok(Journal { db })
    }

    fn put<T: Serialize>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
        value: &T,
    ) -> Result<(), JournalError> {
        let bytes = serde_json::to_vec(value).map_err(|source| JournalError::Decode {
            key: key.into(),
            source,
        })?;
        let tx = self.db.begin_write().map_err(db_err)?;
        tx.open_table(table)
            .map_err(db_err)?
            .insert(key, bytes.as_slice())
            .map_err(db_err)?;
        tx.commit().map_err(db_err)
    }

    fn remove(&self, table: TableDefinition<&str, &[u8]>, key: &str) -> Result<bool, JournalError> {
        let tx = self.db.begin_write().map_err(db_err)?;
        let existed = tx
            .open_table(table)
            .map_err(db_err)?
            .remove(key)
            .map_err(db_err)?
            .is_some();
        tx.commit().map_err(db_err)?;
        Ok(existed)
    }

    fn all<T: DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &[u8]>,
    ) -> Result<Vec<T>, JournalError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(table).map_err(db_err)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(db_err)? {
            let (k, v) = row.map_err(db_err)?;
            out.push(
                serde_json::from_slice(v.value()).map_err(|source| JournalError::Decode {
                    key: k.value().to_string(),
                    source,
                })?,
            );
        }
        Ok(out)
    }

    /// Applies every change in one durable transaction: either all are journaled or none.
    pub fn apply(&self, ops: &[Op]) -> Result<(), JournalError> {
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            let mut vms = tx.open_table(VMS).map_err(db_err)?;
            let mut migs = tx.open_table(MIGRATIONS).map_err(db_err)?;
            for op in ops {
                match op {
                    Op::PutVm(r) => {
                        let b = serde_json::to_vec(r).map_err(|source| JournalError::Decode {
                            key: r.spec.name.clone(),
                            source,
                        })?;
                        vms.insert(r.spec.name.as_str(), b.as_slice())
                            .map_err(db_err)?;
                    }
                    Op::RemoveVm(n) => {
                        vms.remove(n.as_str()).map_err(db_err)?;
                    }
                    Op::PutMigration(r) => {
                        let mut r = r.clone();
                        r.updated_ms = now_ms();
                        let b = serde_json::to_vec(&r).map_err(|source| JournalError::Decode {
                            key: r.id.clone(),
                            source,
                        })?;
                        migs.insert(r.id.as_str(), b.as_slice()).map_err(db_err)?;
                    }
                    Op::RemoveMigration(id) => {
                        migs.remove(id.as_str()).map_err(db_err)?;
                    }
                }
            }
        }
        tx.commit().map_err(db_err)
    }

    /// One migration record.
    pub fn migration(&self, id: &str) -> Result<Option<MigrationRecord>, JournalError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(MIGRATIONS).map_err(db_err)?;
        match t.get(id).map_err(db_err)? {
            Some(v) => serde_json::from_slice(v.value())
                .map(Some)
                .map_err(|source| JournalError::Decode {
                    key: id.to_string(),
                    source,
                }),
            None => Ok(None),
        }
    }

    /// Keeps the newest `keep` settled migration records (unsettled ones are never
    /// pruned: they are what a restart settles; nor are those with copies left behind, nor
    /// those kept until a time still ahead). Returns how many were removed.
    pub fn prune_migrations(&self, keep: usize) -> Result<usize, JournalError> {
        let now = now_ms();
        let mut settled: Vec<MigrationRecord> = self
            .migrations()?
            .into_iter()
            .filter(|r| {
                r.settled() && r.left_behind.is_empty() && !r.taken_back && r.keep_until_ms <= now
            })
            .collect();
        if settled.len() <= keep {
            return Ok(0);
        }
        settled.sort_by_key(|r| std::cmp::Reverse(r.updated_ms));
        let ops: Vec<Op> = settled[keep..]
            .iter()
            .map(|r| Op::RemoveMigration(r.id.clone()))
            .collect();
        self.apply(&ops)?;
        Ok(ops.len())
    }

    /// Records (or replaces) a VM.
    pub fn put_vm(&self, rec: &VmRecord) -> Result<(), JournalError> {
        self.put(VMS, &rec.spec.name.clone(), rec)
    }

    /// Forgets a VM.
    pub fn remove_vm(&self, name: &str) -> Result<bool, JournalError> {
        self.remove(VMS, name)
    }

    /// Every VM record.
    pub fn vms(&self) -> Result<Vec<VmRecord>, JournalError> {
        self.all(VMS)
    }

    /// Records (or replaces) a migration.
    pub fn put_migration(&self, rec: &MigrationRecord) -> Result<(), JournalError> {
        self.apply(&[Op::PutMigration(rec.clone())])
    }

    /// Forgets a migration.
    pub fn remove_migration(&self, id: &str) -> Result<bool, JournalError> {
        self.remove(MIGRATIONS, id)
    }

    /// Every migration record.
    pub fn migrations(&self) -> Result<Vec<MigrationRecord>, JournalError> {
        self.all(MIGRATIONS)
    }

    /// Records (or replaces) what a cold migration placed here, stamped now if its
    /// `updated_ms` is 0 (kept otherwise: a rewrite that only drops entries does not make
    /// the rest younger); a record with nothing placed is removed.
    pub fn put_cold_placed(&self, rec: &ColdPlacedRecord) -> Result<(), JournalError> {
        if rec.placed.is_empty() {
            return self.remove(COLD_PLACED, &rec.id).map(|_| ());
        }
        let mut rec = rec.clone();
        if rec.updated_ms == 0 {
            rec.updated_ms = now_ms();
        }
        self.put(COLD_PLACED, &rec.id.clone(), &rec)
    }

    /// Forgets what a cold migration placed (its VM is defined here, or they are gone).
    pub fn remove_cold_placed(&self, id: &str) -> Result<bool, JournalError> {
        self.remove(COLD_PLACED, id)
    }

    /// Every cold migration's placed images.
    pub fn cold_placed(&self) -> Result<Vec<ColdPlacedRecord>, JournalError> {
        self.all(COLD_PLACED)
    }
}

fn db_err<E: std::fmt::Display>(e: E) -> JournalError {
    db(e)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.redb");
        {
            let j = Journal::open(&path).unwrap();
            let spec: ferry_qemu::VmSpec = serde_json::from_value(
                serde_json::json!({"name": "web01", "memory_mib": 256, "kernel": "/k"}),
            )
            .unwrap();
            j.put_vm(&VmRecord {
                spec,
                pid: Some(42),
                incoming_migration: None,
                held_by: None,
                arrived_by: None,
                fenced: None,
            })
            .unwrap();
            j.put_migration(&MigrationRecord::new(
                "m1",
                Role::Source,
                "web01",
                "b",
                "completed",
            ))
            .unwrap();
        }
        let j = Journal::open(&path).unwrap();
        let vms = j.vms().unwrap();
        assert_eq!(vms.len(), 1);
        assert_eq!(vms[0].spec.name, "web01");
        assert_eq!(vms[0].pid, Some(42));
        assert_eq!(j.migrations().unwrap()[0].state, "completed");
        assert!(j.remove_vm("web01").unwrap());
        assert!(!j.remove_vm("web01").unwrap());
        assert!(j.vms().unwrap().is_empty());
    }

    #[test]
    fn apply_is_one_transaction_and_prune_keeps_unsettled() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("j.redb")).unwrap();
        let spec: ferry_qemu::VmSpec = serde_json::from_value(
            serde_json::json!({"name": "vm", "memory_mib": 256, "kernel": "/k"}),
        )
        .unwrap();
        let mut m = MigrationRecord::new("m", Role::Target, "vm", "a", "committed");
        m.receiver = Some(ferry_handoff::Receiver::Committed {
            leave_paused: false,
        });
        j.apply(&[
            Op::PutMigration(m.clone()),
            Op::PutVm(VmRecord {
                spec,
                pid: None,
                incoming_migration: None,
                held_by: None,
                arrived_by: None,
                fenced: None,
            }),
        ])
        .unwrap();
        assert_eq!(j.vms().unwrap().len(), 1);
        assert_eq!(j.migration("m").unwrap().unwrap().receiver, m.receiver);
        for i in 0..5 {
            let mut r =
                MigrationRecord::new(&format!("s{i}"), Role::Source, "vm", "b", "COMPLETED");
            r.mark = Some(ferry_handoff::SourceMark::Settled);
            j.put_migration(&r).unwrap();
        }
        assert_eq!(j.prune_migrations(2).unwrap(), 3);
        let left = j.migrations().unwrap();
        assert_eq!(left.len(), 3, "two settled and the unsettled target record");
        assert!(left.iter().any(|r| r.id == "m"));
        // A tombstone with a copy left behind stays until the copy is gone.
        let mut t = MigrationRecord::new("t", Role::Target, "vm", "a", "aborted");
        t.receiver = Some(ferry_handoff::Receiver::Aborted);
        t.left_behind = vec!["/srv/vm.qcow2".into()];
        j.put_migration(&t).unwrap();
        // So does a cold migration's outcome on its target, until its time is up.
        let mut k = MigrationRecord::new("k", Role::Target, "vm", "a", "owned");
        k.receiver = Some(ferry_handoff::Receiver::Owned);
        k.keep_until_ms = i64::MAX;
        j.put_migration(&k).unwrap();
        assert_eq!(j.prune_migrations(0).unwrap(), 2);
        let ids: Vec<String> = j.migrations().unwrap().into_iter().map(|r| r.id).collect();
        assert!(ids.contains(&"k".to_string()), "{ids:?}");
        assert!(
            ids.contains(&"t".to_string()) && ids.contains(&"m".to_string()),
            "{ids:?}"
        );
    }
}
