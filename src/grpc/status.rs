//! The one table from kvd's errors to gRPC statuses: etcd's code for each,
//! with the error's message (etcd's own text where etcd has the error). Every
//! client service answers errors through it.

use tonic::{Code, Status};

use crate::error::Error;

/// The gRPC code etcd answers `e` with.
pub fn code(e: &Error) -> Code {
    match e {
        Error::EmptyKey
        | Error::KeyNotFound
        | Error::ValueProvided
        | Error::LeaseProvided
        | Error::TooManyOps
        | Error::DuplicateKey
        | Error::InvalidSortOption
        | Error::RequestTooLarge
        | Error::LeaderKeyMissing
        | Error::UnknownAlarmAction(_) => Code::InvalidArgument,
        Error::Compacted | Error::FutureRev => Code::OutOfRange,
        Error::LeaseNotFound => Code::NotFound,
        Error::LeaseExist => Code::FailedPrecondition,
        Error::LeaseTtlTooLarge => Code::OutOfRange,
        Error::ElectionNotLeader | Error::ElectionNoLeader => Code::Unknown,
        Error::SessionExpired => Code::FailedPrecondition,
        Error::NoLeader | Error::Timeout | Error::Stopped => Code::Unavailable,
        Error::AlarmActivateUnsupported => Code::Unimplemented,
        Error::Internal(_) => Code::Internal,
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        Status::new(code(&e), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etcd_errors_keep_etcds_code_and_message() {
        let s = Status::from(Error::Compacted);
        assert_eq!(
            (s.code(), s.message()),
            (Code::OutOfRange, "etcdserver: mvcc: required revision has been compacted")
        );
        let s = Status::from(Error::LeaderKeyMissing);
        assert_eq!((s.code(), s.message()), (Code::InvalidArgument, "\"leader\" field must be provided"));
        assert_eq!(Status::from(Error::NoLeader).code(), Code::Unavailable);
        assert_eq!(Status::from(Error::UnknownAlarmAction(9)).message(), "unknown alarm action 9");
    }
}
