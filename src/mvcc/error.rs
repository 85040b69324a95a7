//! The MVCC store's own failures: a record on disk that is not as kvd writes
//! it, or bookkeeping of the store that disagrees with itself. A client sees
//! either as an internal error. The refusals etcd makes (a compacted
//! revision, a duplicate key, ...) are not failures of the store: they are
//! the client-facing errors themselves.

use crate::error::Error;

/// A failure of the MVCC store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A record is not as kvd writes it; the text says which.
    #[error("corrupt {0}")]
    Corrupt(String),
    /// The store's own bookkeeping disagrees with itself.
    #[error("{0}")]
    Inconsistent(String),
}

impl StoreError {
    /// A record that is not as kvd writes it: `what` names it.
    pub fn corrupt(what: impl std::fmt::Display) -> Self {
        StoreError::Corrupt(what.to_string())
    }

    /// Bookkeeping that disagrees with itself: `why` says how.
    pub fn inconsistent(why: impl std::fmt::Display) -> Self {
        StoreError::Inconsistent(why.to_string())
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Error {
        Error::internal(e)
    }
}
