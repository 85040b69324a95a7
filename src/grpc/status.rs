//! The one table from kvd's errors to gRPC statuses: etcd's code for each,
//! with the error's message (etcd's own text where etcd has the error). Every
//! client service answers errors through it.

use tonic::{Code, Status};

use crate::error::Error;
use crate::raft::CodecError;

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
        | Error::UnknownAlarmAction(_)
        | Error::UnknownAlarmType(_)
        | Error::ForwardRefused(_) => Code::InvalidArgument,
        Error::Compacted | Error::FutureRev => Code::OutOfRange,
        Error::LeaseNotFound => Code::NotFound,
        Error::LeaseExist => Code::FailedPrecondition,
        Error::LeaseTtlTooLarge => Code::OutOfRange,
        Error::ElectionNotLeader | Error::ElectionNoLeader => Code::Unknown,
        Error::SessionExpired => Code::FailedPrecondition,
        Error::NoLeader | Error::Timeout | Error::Stopped | Error::Unhealthy => Code::Unavailable,
        Error::NoSpace => Code::ResourceExhausted,
        Error::StaleLeaseExpiry => Code::Aborted,
        Error::Corrupt => Code::DataLoss,
        Error::Internal(_) => Code::Internal,
        Error::MemberNotFound => Code::NotFound,
        Error::MemberBadUrls | Error::OnePeerUrl(_) => Code::InvalidArgument,
        Error::PeerUrlExists
        | Error::NotEnoughStarted
        | Error::MemberNotLearner
        | Error::LearnerNotReady
        | Error::TooManyLearners
        | Error::MembershipChangeInProgress
        | Error::NotLeader
        | Error::BadLeaderTransferee => Code::FailedPrecondition,
        Error::LeaderTransferTimeout => Code::Unavailable,
        Error::UserEmpty
        | Error::RoleEmpty
        | Error::AuthFailed
        | Error::InvalidAuthMgmt
        | Error::AuthOldRevision
        | Error::PasswordEmpty => Code::InvalidArgument,
        Error::RootUserNotExist
        | Error::RootRoleNotExist
        | Error::UserAlreadyExist
        | Error::UserNotFound
        | Error::RoleAlreadyExist
        | Error::RoleNotFound
        | Error::RoleNotGranted
        | Error::PermissionNotGranted
        | Error::AuthNotEnabled => Code::FailedPrecondition,
        Error::PermissionDenied => Code::PermissionDenied,
        Error::InvalidAuthToken => Code::Unauthenticated,
        Error::NoPasswordUser => Code::Unknown,
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        Status::new(code(&e), e.to_string())
    }
}

/// A peer message that did not decode, or an answer that did not encode: a
/// peer's bytes that are not what the peer API carries are the sender's
/// fault (`INVALID_ARGUMENT`); an answer this member cannot encode is its
/// own (`INTERNAL`).
impl From<CodecError> for Status {
    fn from(e: CodecError) -> Status {
        match e {
            CodecError::Decode(_) => Status::invalid_argument(e.to_string()),
            CodecError::Encode(_) => Status::internal(e.to_string()),
        }
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

    #[test]
    fn an_undecodable_peer_message_is_the_senders_fault() {
        let bad = crate::raft::decode::<(u64, String)>(&[1, 2]).unwrap_err();
        assert_eq!(Status::from(bad).code(), Code::InvalidArgument);
    }
}
