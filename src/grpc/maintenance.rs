//! The Maintenance service: member status, alarms, defragmentation, and
//! snapshots of a member's data for `snapshot save`.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::node::Member;
use crate::proto::etcdserverpb::maintenance_server::Maintenance;
use crate::proto::etcdserverpb::{
    AlarmRequest, AlarmResponse, DefragmentRequest, DefragmentResponse, HashKvRequest, HashKvResponse, HashRequest,
    HashResponse, MoveLeaderRequest, MoveLeaderResponse, SnapshotRequest, SnapshotResponse, StatusRequest,
    StatusResponse,
};
use crate::raft::state_machine::alarm_name;

/// Bytes of a snapshot per message.
const SNAPSHOT_CHUNK: usize = 64 * 1024;

/// Sends a backup as the body of a snapshot file ([`crate::backup`]: the
/// magic, the length, the records, zeros to a multiple of 512 bytes) and
/// then its SHA-256 digest, in chunks of [`SNAPSHOT_CHUNK`] bytes. Stops
/// when the client goes.
fn send_backup(
    backup: crate::raft::state_machine::BackupFile,
    mut header: Option<crate::proto::etcdserverpb::ResponseHeader>,
    tx: tokio::sync::mpsc::Sender<Result<SnapshotResponse, Status>>,
) {
    use sha2::Digest;
    use std::io::Read;
    let start = crate::backup::body_start(backup.len);
    let padding = crate::backup::padding_len(backup.len);
    let total = start.len() as u64 + backup.len + padding;
    let mut body =
        std::io::Cursor::new(start).chain(backup.file.take(backup.len)).chain(std::io::repeat(0).take(padding));
    let (mut sha, mut sent) = (sha2::Sha256::new(), 0u64);
    while sent < total {
        let mut blob = Vec::with_capacity(SNAPSHOT_CHUNK.min((total - sent) as usize));
        match (&mut body).take(SNAPSHOT_CHUNK as u64).read_to_end(&mut blob) {
            Ok(0) => {
                let _ = tx.blocking_send(Err(Status::internal("the backup ended before its length")));
                return;
            }
            Ok(n) => sent += n as u64,
            Err(e) => {
                let _ = tx.blocking_send(Err(Status::internal(format!("read backup: {e}"))));
                return;
            }
        }
        sha.update(&blob);
        let chunk = SnapshotResponse { header: header.take(), remaining_bytes: total - sent, blob };
        if tx.blocking_send(Ok(chunk)).is_err() {
            return;
        }
    }
    let digest = sha.finalize().to_vec();
    let _ = tx.blocking_send(Ok(SnapshotResponse { header: None, remaining_bytes: 0, blob: digest }));
}

/// The etcd API version kvd implements, reported by Status.
pub const API_VERSION: &str = "3.4.0";

/// The Maintenance service of one member.
pub struct MaintenanceService {
    member: Arc<Member>,
}

impl MaintenanceService {
    /// A service for `member`.
    pub fn new(member: Arc<Member>) -> Self {
        MaintenanceService { member }
    }
}

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
    /// Lists, raises or clears alarms (`crate::node::alarm`).
    async fn alarm(&self, req: Request<AlarmRequest>) -> Result<Response<AlarmResponse>, Status> {
        // Root only, while auth is on (etcd 3.4 lets anyone, even with no
        // user, raise and clear alarms).
        self.member.authorize_admin()?;
        Ok(Response::new(self.member.alarm(req.into_inner()).await?))
    }

    /// Rewrites this member's database with only what is live, and gives
    /// the space of the rest back to the file system, as etcd's does (see
    /// [`Member::defragment`](crate::node::Member::defragment)).
    async fn defragment(&self, _req: Request<DefragmentRequest>) -> Result<Response<DefragmentResponse>, Status> {
        // Root only, while auth is on.
        admin(&self.member)?;
        self.member.defragment().await.map_err(Status::from)?;
        // etcd 3.4 answers a defragment with no header.
        Ok(Response::new(DefragmentResponse { header: None }))
    }

    /// A hash of this member's whole history at its current revision: what
    /// HashKV gives for revision 0. kvd's own hash, not comparable with
    /// etcd's (a hash of its database file).
    async fn hash(&self, _req: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        // Root only, while auth is on.
        admin(&self.member)?;
        let (hash, _, revision) = self.member.state.hash_kv(0).await?;
        let mut resp = HashResponse { header: None, hash };
        self.member.fill_header(&mut resp.header);
        if let Some(h) = resp.header.as_mut() {
            h.revision = revision;
        }
        Ok(Response::new(resp))
    }

    /// A hash of this member's history up to a revision, for comparing
    /// members (`etcdctl endpoint hashkv`): members that applied the same
    /// entries give the same hash, whatever their progress in removing
    /// compacted history. It is kvd's own, not comparable with etcd's.
    async fn hash_kv(&self, req: Request<HashKvRequest>) -> Result<Response<HashKvResponse>, Status> {
        // Root only, while auth is on.
        admin(&self.member)?;
        let (hash, compact_revision, _) = self.member.state.hash_kv(req.into_inner().revision).await?;
        let mut resp = HashKvResponse { header: None, hash, compact_revision };
        self.member.fill_header(&mut resp.header);
        Ok(Response::new(resp))
    }

    type SnapshotStream = Pin<Box<dyn Stream<Item = Result<SnapshotResponse, Status>> + Send + 'static>>;

    /// Streams a copy of this member's data as of its last applied entry
    /// (see [`crate::backup`]): the file's bytes in chunks, each with how
    /// many are still to come, then the SHA-256 of them all, as etcd sends
    /// its own. The first message's header has the snapshot's revision.
    async fn snapshot(&self, _req: Request<SnapshotRequest>) -> Result<Response<Self::SnapshotStream>, Status> {
        // Root only, while auth is on.
        admin(&self.member)?;
        let (revision, backup) = self.member.state.backup().await.map_err(Status::from)?;
        let mut header = None;
        self.member.fill_header(&mut header);
        if let Some(h) = header.as_mut() {
            h.revision = revision;
        }
        // Read, hashed and sent a chunk at a time, by a thread of its own;
        // the channel holds two chunks at most while the client is slow.
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        tokio::task::spawn_blocking(move || send_backup(backup, header, tx));
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn status(&self, _req: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let m = self.member.raft.metrics().borrow().clone();
        let db_size = self.member.state.size_on_disk() as i64;
        let membership = m.membership_config.membership();
        let is_learner = !membership.voter_ids().any(|id| id == self.member.id);
        let mut errors = Vec::new();
        if m.current_leader.is_none() {
            errors.push(crate::error::Error::NoLeader.to_string());
        }
        // As etcd lists them: the alarm in protobuf's text form.
        for a in self.member.alarms() {
            errors.push(format!("memberID:{} alarm:{} ", a.member_id, alarm_name(a.alarm)));
        }
        let mut resp = StatusResponse {
            header: None,
            version: API_VERSION.to_string(),
            db_size,
            leader: m.current_leader.unwrap_or(0),
            raft_index: m.last_log_index.unwrap_or(0),
            raft_term: m.current_term,
            raft_applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
            errors,
            db_size_in_use: self.member.state.bytes_in_use() as i64,
            is_learner,
        };
        self.member.fill_header(&mut resp.header);
        Ok(Response::new(resp))
    }

    /// Hands leadership to another voter (`crate::node::leadership`); only
    /// the leader takes it, as in etcd.
    async fn move_leader(&self, req: Request<MoveLeaderRequest>) -> Result<Response<MoveLeaderResponse>, Status> {
        self.member.move_leader(req.into_inner().target_id).await?;
        let mut resp = MoveLeaderResponse { header: None };
        self.member.fill_header(&mut resp.header);
        Ok(Response::new(resp))
    }
}

/// Whether the request comes from root, for the Maintenance calls etcd
/// checks so (Defragment, Hash, HashKV, Snapshot), refused in etcd's words:
/// its auth store's own errors, with code Unknown.
fn admin(member: &Member) -> Result<(), Status> {
    member.authorize_admin().map_err(|e| match e {
        Error::PermissionDenied | Error::UserEmpty | Error::UserNotFound => {
            Status::unknown(format!("auth: {}", e.to_string().trim_start_matches("etcdserver: ")))
        }
        e => e.into(),
    })
}
