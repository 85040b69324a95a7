//! openraft's storage conformance suite against kvd's log store and state
//! machine, each in a fresh temporary directory.

use kvd::raft::log_store::LogStore;
use kvd::raft::state_machine::StateMachine;
use kvd::raft::{StorageError, TypeConfig};
use openraft::testing::{StoreBuilder, Suite};
use openraft::StorageIOError;

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError> {
        let dir = tempfile::tempdir().map_err(|e| StorageIOError::write(&e))?;
        let db = sled::open(dir.path().join("db")).map_err(|e| StorageIOError::write(&e))?;
        let log = LogStore::open(&dir.path().join("log")).map_err(|e| StorageIOError::write(&e))?;
        let sm = StateMachine::open(&db, dir.path()).map_err(|e| StorageIOError::write(&e))?;
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    Suite::test_all(Builder).expect("the storage suite passes");
}
