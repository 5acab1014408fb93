//! The daemon's state on disk: one record per VM in an embedded database (redb), each change
//! its own durable transaction, so a daemon killed at any moment loses nothing it acknowledged.

use std::path::Path;

use hyperpool_api::pool::VmRecord;
use redb::{Database, ReadableTable, TableDefinition};

const VMS: TableDefinition<&str, &[u8]> = TableDefinition::new("vms");

#[derive(Debug, thiserror::Error)]
#[error("state database: {0}")]
pub struct StoreError(String);

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

pub struct Store {
    db: Database,
}

impl Store {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(err)?;
        // The table exists from the start, so readers never meet "no such table".
        let txn = db.begin_write().map_err(err)?;
        txn.open_table(VMS).map_err(err)?;
        txn.commit().map_err(err)?;
        Ok(Self { db })
    }

    pub fn put(&self, record: &VmRecord) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(record).map_err(err)?;
        let txn = self.db.begin_write().map_err(err)?;
        txn.open_table(VMS)
            .map_err(err)?
            .insert(record.spec.name.as_str(), bytes.as_slice())
            .map_err(err)?;
        txn.commit().map_err(err)
    }

    pub fn delete(&self, name: &str) -> Result<bool, StoreError> {
        let txn = self.db.begin_write().map_err(err)?;
        let existed = txn
            .open_table(VMS)
            .map_err(err)?
            .remove(name)
            .map_err(err)?
            .is_some();
        txn.commit().map_err(err)?;
        Ok(existed)
    }

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
            let store = Store::open(&path).unwrap();
            store.put(&record("a")).unwrap();
            let mut b = record("b");
            b.status = VmStatus::Running;
            b.pid = Some(42);
            store.put(&b).unwrap();
            store.put(&record("c")).unwrap();
            assert!(store.delete("c").unwrap());
            assert!(!store.delete("c").unwrap());
        }
        let store = Store::open(&path).unwrap();
        let all = store.list().unwrap();
        let names: Vec<_> = all.iter().map(|r| r.spec.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(all[1].pid, Some(42));
        assert_eq!(all[1].status, VmStatus::Running);
    }
}
