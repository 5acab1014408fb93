//! The daemon's state on disk: one record per VM in an embedded database (redb). Changes
//! gather in one open transaction until [`Store::commit`] makes them durable (group commit: one
//! disk sync for a burst of changes instead of one each); the controller acknowledges a change
//! only after its commit, so a daemon killed at any moment loses nothing it acknowledged.

use std::path::Path;

use hyperpool_api::pool::VmRecord;
use redb::{Database, ReadableTable, TableDefinition, WriteTransaction};

const VMS: TableDefinition<&str, &[u8]> = TableDefinition::new("vms");

#[derive(Debug, thiserror::Error)]
#[error("state database: {0}")]
pub struct StoreError(String);

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

pub struct Store {
    /// Changes not yet committed. Declared first so that it is dropped (rolled back) before the
    /// database is: redb waits for a live write transaction when its database goes away.
    pending: Option<WriteTransaction>,
    db: Database,
}

impl Store {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(err)?;
        // The table exists from the start, so readers never meet "no such table".
        let txn = db.begin_write().map_err(err)?;
        txn.open_table(VMS).map_err(err)?;
        txn.commit().map_err(err)?;
        Ok(Self { pending: None, db })
    }

    fn txn(&mut self) -> Result<&WriteTransaction, StoreError> {
        if self.pending.is_none() {
            self.pending = Some(self.db.begin_write().map_err(err)?);
        }
        Ok(self.pending.as_ref().expect("opened above"))
    }

    /// Writes a record into the open transaction (durable at the next [`Store::commit`]).
    pub fn put(&mut self, record: &VmRecord) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(record).map_err(err)?;
        self.txn()?
            .open_table(VMS)
            .map_err(err)?
            .insert(record.spec.name.as_str(), bytes.as_slice())
            .map_err(err)?;
        Ok(())
    }

    /// Removes a record in the open transaction (durable at the next [`Store::commit`]).
    pub fn delete(&mut self, name: &str) -> Result<bool, StoreError> {
        Ok(self
            .txn()?
            .open_table(VMS)
            .map_err(err)?
            .remove(name)
            .map_err(err)?
            .is_some())
    }

    /// Whether there are changes that [`Store::commit`] would make durable.
    pub fn has_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// Makes every change since the last commit durable, in one transaction.
    pub fn commit(&mut self) -> Result<(), StoreError> {
        match self.pending.take() {
            Some(txn) => txn.commit().map_err(err),
            None => Ok(()),
        }
    }

    /// The committed records (changes not yet committed are not seen).
    pub fn list(&self) -> Result<Vec<VmRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        let table = txn.open_table(VMS).map_err(err)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(err)? {
            let (name, bytes) = entry.map_err(err)?;
            let record: VmRecord = serde_json::from_slice(bytes.value())
                .map_err(|e| err(format!("record '{}': {e}", name.value())))?;
            out.push(record);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyperpool_api::pool::{VmSpec, VmStatus};

    fn record(name: &str) -> VmRecord {
        VmRecord {
            spec: VmSpec {
                name: name.into(),
                cpus: 1,
                memory_mib: 64,
                ..VmSpec::default()
            },
            status: VmStatus::Stopped,
            pid: None,
            started_at_ms: None,
            last_exit: None,
            restarts: 0,
        }
    }

    #[test]
    fn records_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        {
            let mut store = Store::open(&path).unwrap();
            store.put(&record("a")).unwrap();
            let mut b = record("b");
            b.status = VmStatus::Running;
            b.pid = Some(42);
            store.put(&b).unwrap();
            store.put(&record("c")).unwrap();
            assert!(store.delete("c").unwrap());
            assert!(!store.delete("c").unwrap());
            assert!(store.has_pending());
            store.commit().unwrap();
            assert!(!store.has_pending());
            // Not committed: gone when the store is.
            store.put(&record("d")).unwrap();
        }
        let store = Store::open(&path).unwrap();
        let all = store.list().unwrap();
        let names: Vec<_> = all.iter().map(|r| r.spec.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(all[1].pid, Some(42));
        assert_eq!(all[1].status, VmStatus::Running);
    }
}
