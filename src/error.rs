//! Errors a client can see. Every variant that etcd also has carries etcd's
//! message, so etcd clients recognise it (clientv3 matches on the message
//! text); the gRPC code of each is in one table, `grpc::status`.

use serde::{Deserialize, Serialize};

/// An error answered to a client. It is serializable because a leader sends
/// it back to the follower that forwarded the request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum Error {
    /// A request named no key.
    #[error("etcdserver: key is not provided")]
    EmptyKey,
    /// `ignore_value` or `ignore_lease` on a key that does not exist.
    #[error("etcdserver: key not found")]
    KeyNotFound,
    /// `ignore_value` together with a value.
    #[error("etcdserver: value is provided")]
    ValueProvided,
    /// `ignore_lease` together with a lease.
    #[error("etcdserver: lease is provided")]
    LeaseProvided,
    /// More compares or operations in one Txn than `--max-txn-ops`.
    #[error("etcdserver: too many operations in txn request")]
    TooManyOps,
    /// One Txn writes the same key twice.
    #[error("etcdserver: duplicate key given in txn request")]
    DuplicateKey,
    /// A read or compaction at a revision that was compacted away.
    #[error("etcdserver: mvcc: required revision has been compacted")]
    Compacted,
    /// A read or compaction at a revision the store has not reached.
    #[error("etcdserver: mvcc: required revision is a future revision")]
    FutureRev,
    /// A put names a lease that does not exist.
    #[error("etcdserver: requested lease not found")]
    LeaseNotFound,
    /// A lease grant names an ID that is already granted.
    #[error("etcdserver: lease already exists")]
    LeaseExist,
    /// A lease grant asks for a TTL above the maximum.
    #[error("etcdserver: too large lease TTL")]
    LeaseTtlTooLarge,
    /// Proclaim by a candidate that does not hold leadership.
    #[error("election: not leader")]
    ElectionNotLeader,
    /// Leader of an election nobody holds.
    #[error("election: no leader")]
    ElectionNoLeader,
    /// A lock or election request whose lease expired while it waited.
    #[error("kvd: the lease of this lock or campaign expired while it waited")]
    SessionExpired,
    /// An unknown sort order or sort target.
    #[error("etcdserver: invalid sort option")]
    InvalidSortOption,
    /// A request larger than `--max-request-bytes`.
    #[error("etcdserver: request is too large")]
    RequestTooLarge,
    /// No leader is known, so nothing can be committed or read linearizably.
    #[error("etcdserver: no leader")]
    NoLeader,
    /// The request may or may not have been applied: the leader stopped
    /// answering after it was sent.
    #[error("etcdserver: request timed out")]
    Timeout,
    /// The member is shutting down.
    #[error("etcdserver: server stopped")]
    Stopped,
    /// An Election request without the leader key it acts for.
    #[error("\"leader\" field must be provided")]
    LeaderKeyMissing,
    /// A write refused because the NOSPACE alarm is raised, or because it
    /// would take the data past `--quota-backend-bytes` (which raises it).
    #[error("etcdserver: mvcc: database space exceeded")]
    NoSpace,
    /// An alarm action that is not GET, ACTIVATE or DEACTIVATE.
    #[error("unknown alarm action {0}")]
    UnknownAlarmAction(i32),
    /// A storage or internal failure; the text says what failed.
    #[error("kvd: internal error: {0}")]
    Internal(String),
    /// A write forwarded by a member that the leader will not propose (it
    /// does not decode, or is not one a member sends); the text says why.
    #[error("kvd: forwarded write refused: {0}")]
    ForwardRefused(String),
    /// A membership change names a member the cluster does not have.
    #[error("etcdserver: member not found")]
    MemberNotFound,
    /// A member added or updated with a peer URL another member has.
    #[error("etcdserver: Peer URLs already exists")]
    PeerUrlExists,
    /// Peer URLs that are not URLs.
    #[error("etcdserver: given member URLs are invalid")]
    MemberBadUrls,
    /// A change that would leave the cluster without a quorum of members
    /// that have started (published their name), as etcd's strict
    /// reconfiguration check counts them.
    #[error("etcdserver: re-configuration failed due to not enough started members")]
    NotEnoughStarted,
    /// A change that would leave the cluster without a quorum of members
    /// reachable now (or, for a voter added, with any voter unreachable).
    #[error("etcdserver: unhealthy cluster")]
    Unhealthy,
    /// Promote of a member that is a voter already.
    #[error("etcdserver: can only promote a learner member")]
    MemberNotLearner,
    /// Promote of a learner whose log is behind the leader's.
    #[error("etcdserver: can only promote a learner member which is in sync with leader")]
    LearnerNotReady,
    /// A second learner (etcd allows one at a time).
    #[error("etcdserver: too many learner members in cluster")]
    TooManyLearners,
    /// A member added or updated with more than one peer URL.
    #[error("kvd: a member has one peer URL, and {0} were given")]
    OnePeerUrl(usize),
    /// A request only the leader takes (MoveLeader), sent to a follower.
    #[error("etcdserver: not leader")]
    NotLeader,
    /// MoveLeader to a member that is not a voter.
    #[error("etcdserver: bad leader transferee")]
    BadLeaderTransferee,
    /// MoveLeader whose target did not catch up or win in time.
    #[error("etcdserver: request timed out, leader transfer took too long")]
    LeaderTransferTimeout,
    /// A membership change while another is not yet committed.
    #[error("kvd: another membership change is in progress; try again once it is done")]
    MembershipChangeInProgress,
    /// A write while the CORRUPT alarm is raised.
    #[error("etcdserver: corrupt cluster")]
    Corrupt,
    /// An alarm request naming an alarm type that is not NONE, NOSPACE or
    /// CORRUPT.
    #[error("unknown alarm type {0}")]
    UnknownAlarmType(i32),
    /// A lease expiry decided by the leader of one term, applied from an
    /// entry of another: void (see `kvdpb::LeaseExpire`).
    #[error("kvd: a lease expiry decided in an earlier term is void")]
    StaleLeaseExpiry,
    /// AuthEnable without a user named root.
    #[error("etcdserver: root user does not exist")]
    RootUserNotExist,
    /// AuthEnable while the root user lacks the root role.
    #[error("etcdserver: root user does not have root role")]
    RootRoleNotExist,
    /// UserAdd of a name that exists.
    #[error("etcdserver: user name already exists")]
    UserAlreadyExist,
    /// A user name that is empty, or a request with no user while auth is
    /// on.
    #[error("etcdserver: user name is empty")]
    UserEmpty,
    /// A user that does not exist.
    #[error("etcdserver: user name not found")]
    UserNotFound,
    /// RoleAdd of a name that exists.
    #[error("etcdserver: role name already exists")]
    RoleAlreadyExist,
    /// A role that does not exist.
    #[error("etcdserver: role name not found")]
    RoleNotFound,
    /// An empty role name.
    #[error("etcdserver: role name is empty")]
    RoleEmpty,
    /// A wrong user name or password.
    #[error("etcdserver: authentication failed, invalid user ID or password")]
    AuthFailed,
    /// The user's roles do not cover what the request does.
    #[error("etcdserver: permission denied")]
    PermissionDenied,
    /// UserRevokeRole of a role the user does not have.
    #[error("etcdserver: role is not granted to the user")]
    RoleNotGranted,
    /// RoleRevokePermission of a permission the role does not have.
    #[error("etcdserver: permission is not granted to the role")]
    PermissionNotGranted,
    /// Authenticate while auth is off.
    #[error("etcdserver: authentication is not enabled")]
    AuthNotEnabled,
    /// A token this member does not know, or one that expired.
    #[error("etcdserver: invalid auth token")]
    InvalidAuthToken,
    /// A change that would lock root out while auth is on: deleting the
    /// root user or role, or revoking root's root role.
    #[error("etcdserver: invalid auth management")]
    InvalidAuthMgmt,
    /// A write checked against an auth state that changed before it was
    /// applied; the client asks again.
    #[error("etcdserver: revision of auth store is old")]
    AuthOldRevision,
    /// Authenticate of a user that has no password (it is known by its
    /// client certificate only), in etcd's words.
    #[error("auth: authentication failed, password was given for no password user")]
    NoPasswordUser,
    /// A user added without a password and without `no_password`.
    #[error("etcdserver: password is empty")]
    PasswordEmpty,
}

impl Error {
    /// Wraps any displayable failure as an internal error.
    pub fn internal(e: impl std::fmt::Display) -> Self {
        Error::Internal(e.to_string())
    }
}

impl From<sled::Error> for Error {
    fn from(e: sled::Error) -> Self {
        Error::internal(format!("storage: {e}"))
    }
}

/// The result type of the key-value layer.
pub type Result<T, E = Error> = std::result::Result<T, E>;
