//! The agent's journal: VM definitions and migration records in an embedded database
//! (redb), so an agent that restarts knows what it owned and what was in flight.

use redb::{Database, ReadableTable, TableDefinition};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::path::Path;

const VMS: TableDefinition<&str, &[u8]> = TableDefinition::new("vms");
const MIGRATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("migrations");

/// Journal failures.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal database: {0}")]
    Db(String),
    #[error("journal record {key}: {source}")]
    Decode { key: String, source: serde_json::Error },
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
        tx.commit().map_err(db_err)?;
        Ok(Journal { db })
    }

    fn put<T: Serialize>(&self, table: TableDefinition<&str, &[u8]>, key: &str, value: &T) -> Result<(), JournalError> {
        let bytes = serde_json::to_vec(value).map_err(|source| JournalError::Decode { key: key.into(), source })?;
        let tx = self.db.begin_write().map_err(db_err)?;
        tx.open_table(table).map_err(db_err)?.insert(key, bytes.as_slice()).map_err(db_err)?;
        tx.commit().map_err(db_err)
    }

    fn remove(&self, table: TableDefinition<&str, &[u8]>, key: &str) -> Result<bool, JournalError> {
        let tx = self.db.begin_write().map_err(db_err)?;
        let existed = tx.open_table(table).map_err(db_err)?.remove(key).map_err(db_err)?.is_some();
        tx.commit().map_err(db_err)?;
        Ok(existed)
    }

    fn all<T: DeserializeOwned>(&self, table: TableDefinition<&str, &[u8]>) -> Result<Vec<T>, JournalError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(table).map_err(db_err)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(db_err)? {
            let (k, v) = row.map_err(db_err)?;
            out.push(serde_json::from_slice(v.value()).map_err(|source| JournalError::Decode { key: k.value().to_string(), source })?);
        }
        Ok(out)
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
        self.put(MIGRATIONS, &rec.id.clone(), rec)
    }

    /// Forgets a migration.
    pub fn remove_migration(&self, id: &str) -> Result<bool, JournalError> {
        self.remove(MIGRATIONS, id)
    }

    /// Every migration record.
    pub fn migrations(&self) -> Result<Vec<MigrationRecord>, JournalError> {
        self.all(MIGRATIONS)
    }
}

fn db_err<E: std::fmt::Display>(e: E) -> JournalError {
    db(e)
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
            let spec: ferry_qemu::VmSpec = serde_json::from_value(serde_json::json!({"name": "web01", "memory_mib": 256, "kernel": "/k"})).unwrap();
            j.put_vm(&VmRecord { spec, pid: Some(42), incoming_migration: None }).unwrap();
            j.put_migration(&MigrationRecord {
                id: "m1".into(),
                role: Role::Source,
                vm: "web01".into(),
                peer: "b".into(),
                state: "completed".into(),
                token: None,
                status: None,
            })
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
}
