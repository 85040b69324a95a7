//! Snapshots on the wire: the leader's loop that sends one in chunks, and
//! a chunk as openraft's `InstallSnapshotRequest`, with its data read and
//! written as one byte string.
//!
//! openraft's struct derives serde with `data: Vec<u8>`, which serde treats
//! as a sequence: bincode then writes and reads the 1 MiB of every chunk one
//! byte at a time. On a member catching up by snapshot, decoding the chunks
//! so was 8% of its CPU (`perf record`, 300,000 keys of 1 KiB), and it runs
//! between receiving one chunk and asking for the next. A sequence of bytes
//! and a byte string have the same bincode layout (a u64 length, then the
//! bytes), so these mirror types read and write exactly what openraft's
//! struct does, and members of every kvd version understand each other.

use std::future::Future;
use std::io::SeekFrom;
use std::time::Duration;

use openraft::error::{
    Fatal, InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, ReplicationClosed, StreamingError,
};
use openraft::network::{RPCOption, RaftNetwork};
use openraft::raft::{InstallSnapshotRequest, SnapshotResponse};
use openraft::storage::Snapshot;
use openraft::{SnapshotMeta, StorageError, StorageIOError, Vote};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::{decode, CodecError, Node, NodeId, TypeConfig};

/// Times a chunk is sent again after a network error before the snapshot
/// is given up on (openraft then begins it again later).
const CHUNK_RETRIES: u32 = 3;
/// The wait before a chunk is sent again.
const RETRY_DELAY: Duration = Duration::from_millis(200);
/// A call that failed after this long is not tried again: the peer is
/// stuck rather than briefly unreachable, and each try could wait out the
/// whole install timeout.
const RETRY_WITHIN: Duration = Duration::from_secs(10);

/// Sends `snapshot` to the peer behind `net` in chunks of the size
/// `option` gives, one after another, each once the last is answered, and
/// returns the answer to the last (or to the first that shows a vote
/// higher than `vote`).
///
/// openraft's own loop waits a millisecond before every chunk (more, with
/// the timer's granularity): for 1.1 GB in chunks of 1 MiB that is a second
/// or two of a member's catch-up spent waiting. This one sends the next
/// chunk as soon as the last is answered. A chunk other than the last that
/// meets a network error within [`RETRY_WITHIN`] is sent again a few times
/// (the last one's answer waits for the whole install, and a peer that got
/// it has nothing to take it again into); a peer that lost what it had
/// received (it answers that the snapshot does not match) gets the snapshot
/// again from the start, up to [`CHUNK_RETRIES`] times.
///
/// A peer that cannot be reached at all (the first chunk was not sent) fails
/// the sending at once: openraft tries again after its backoff with the
/// snapshot that is newest then. Tried again here, the snapshot taken before
/// the peer came back went first, and the peer then needed the newer one
/// as well (one stream of 77 MB before the one of 117 MB it needed).
pub async fn send_snapshot<N: RaftNetwork<TypeConfig> + ?Sized>(
    net: &mut N,
    target: NodeId,
    vote: Vote<NodeId>,
    mut snapshot: Snapshot<TypeConfig>,
    cancel: impl Future<Output = ReplicationClosed>,
    option: RPCOption,
) -> Result<SnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>> {
    let signature = snapshot.meta.signature();
    let storage = |e: std::io::Error| StorageError::from(StorageIOError::read_snapshot(Some(signature.clone()), &e));
    let chunk_bytes = option.snapshot_chunk_size().unwrap_or(super::SNAPSHOT_CHUNK_BYTES).max(1);
    let data = &mut snapshot.snapshot;
    let end = data.seek(SeekFrom::End(0)).await.map_err(storage)?;
    let mut cancel = std::pin::pin!(cancel);
    let mut offset = 0u64;
    let mut failures = 0u32;
    let mut restarts = 0u32;
    // Where the data is positioned: a seek (a blocking call for a plain
    // file) only to send a chunk again or to begin again.
    let mut at = end;
    loop {
        if let Some(closed) = futures::FutureExt::now_or_never(cancel.as_mut()) {
            return Err(closed.into());
        }
        if at != offset {
            data.seek(SeekFrom::Start(offset)).await.map_err(storage)?;
        }
        let mut buf = Vec::with_capacity(chunk_bytes);
        while buf.len() < chunk_bytes && data.read_buf(&mut buf).await.map_err(storage)? > 0 {}
        let len = buf.len() as u64;
        at = offset + len;
        let done = offset + len >= end;
        if len == 0 && !done {
            let short =
                std::io::Error::new(std::io::ErrorKind::UnexpectedEof, format!("data ends at {offset} of {end} bytes"));
            return Err(storage(short).into());
        }
        let req = InstallSnapshotRequest { vote, meta: snapshot.meta.clone(), offset, data: buf, done };
        let sent_at = tokio::time::Instant::now();
        let transient = match net.install_snapshot(req, option.clone()).await {
            Ok(resp) if resp.vote > vote || done => return Ok(SnapshotResponse::new(resp.vote)),
            Ok(_) => {
                failures = 0;
                offset += len;
                continue;
            }
            Err(RPCError::RemoteError(e)) => match e.source {
                RaftError::APIError(InstallSnapshotError::SnapshotMismatch(mismatch)) => {
                    restarts += 1;
                    if restarts > CHUNK_RETRIES {
                        let e =
                            std::io::Error::other(format!("the peer lost the snapshot {restarts} times: {mismatch}"));
                        return Err(NetworkError::new(&e).into());
                    }
                    tracing::info!(peer = %format!("{target:x}"), %mismatch, "the peer lost the snapshot it was receiving; sending it again from the start");
                    offset = 0;
                    failures = 0;
                    continue;
                }
                RaftError::Fatal(fatal) => {
                    return Err(RemoteError { target: e.target, target_node: e.target_node, source: fatal }.into())
                }
            },
            Err(RPCError::PayloadTooLarge(e)) => return Err(NetworkError::new(&e).into()),
            Err(RPCError::Timeout(e)) => StreamingError::Timeout(e),
            Err(RPCError::Unreachable(e)) if offset == 0 => return Err(StreamingError::Unreachable(e)),
            Err(RPCError::Unreachable(e)) => StreamingError::Unreachable(e),
            Err(RPCError::Network(e)) => StreamingError::Network(e),
        };
        failures += 1;
        if done || failures > CHUNK_RETRIES || sent_at.elapsed() >= RETRY_WITHIN {
            return Err(transient);
        }
        tracing::debug!(peer = %format!("{target:x}"), offset, error = %transient, "sending a snapshot chunk again");
        tokio::select! {
            closed = cancel.as_mut() => return Err(closed.into()),
            () = tokio::time::sleep(RETRY_DELAY) => {}
        }
    }
}

/// The fields of `InstallSnapshotRequest`, in its order, borrowed: what
/// goes on the wire for a chunk (see [`ChunkOut::of`]).
#[derive(Serialize)]
pub struct ChunkOut<'a> {
    vote: &'a Vote<NodeId>,
    meta: &'a SnapshotMeta<NodeId, Node>,
    offset: u64,
    #[serde(with = "serde_bytes")]
    data: &'a [u8],
    done: bool,
}

/// The fields of `InstallSnapshotRequest`, in its order.
#[derive(Deserialize)]
struct ChunkIn {
    vote: Vote<NodeId>,
    meta: SnapshotMeta<NodeId, Node>,
    offset: u64,
    #[serde(with = "serde_bytes")]
    data: Vec<u8>,
    done: bool,
}

impl<'a> ChunkOut<'a> {
    /// `req`, to encode as `encode` would encode it, its data in one copy.
    pub fn of(req: &'a InstallSnapshotRequest<TypeConfig>) -> ChunkOut<'a> {
        ChunkOut { vote: &req.vote, meta: &req.meta, offset: req.offset, data: &req.data, done: req.done }
    }
}

/// Decodes what `encode` wrote of a [`ChunkOut`] or of the request itself.
pub fn decode_chunk(bytes: &[u8]) -> Result<InstallSnapshotRequest<TypeConfig>, CodecError> {
    let ChunkIn { vote, meta, offset, data, done } = decode(bytes)?;
    Ok(InstallSnapshotRequest { vote, meta, offset, data, done })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::io::Write;

    use openraft::error::{NetworkError, SnapshotMismatch, Unreachable};
    use openraft::raft::{
        AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotResponse, VoteRequest, VoteResponse,
    };
    use openraft::{CommittedLeaderId, LogId, Membership, StoredMembership};

    use super::*;
    use crate::raft::state_machine::SnapshotData;

    /// How the fake peer answers one InstallSnapshot call.
    enum Answer {
        Ok,
        /// A network error: the chunk never arrived.
        Lost,
        /// The peer could not be reached: the chunk was not sent.
        Unreachable,
        /// A network error after 11 s.
        Stuck,
        /// It lost what it had received.
        Mismatch,
        /// It knows a newer leader.
        HigherVote,
    }

    /// What the peer service gets for `req`.
    fn encode_chunk(req: &InstallSnapshotRequest<TypeConfig>) -> Result<Vec<u8>, CodecError> {
        crate::raft::encode(&ChunkOut::of(req))
    }

    fn network_error<E: std::error::Error>(why: &str) -> RPCError<NodeId, Node, E> {
        RPCError::Network(NetworkError::new(&std::io::Error::other(why.to_string())))
    }

    /// A peer that answers each call as `script` says (then Ok), and keeps
    /// what it was sent.
    struct Peer {
        script: Vec<Answer>,
        calls: usize,
        sent: Vec<(u64, usize, bool)>,
        received: Vec<u8>,
    }

    impl RaftNetwork<TypeConfig> for Peer {
        async fn append_entries(
            &mut self,
            _: AppendEntriesRequest<TypeConfig>,
            _: RPCOption,
        ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
            Err(network_error("not in this test"))
        }

        async fn install_snapshot(
            &mut self,
            req: InstallSnapshotRequest<TypeConfig>,
            _: RPCOption,
        ) -> Result<
            openraft::raft::InstallSnapshotResponse<NodeId>,
            RPCError<NodeId, Node, RaftError<NodeId, InstallSnapshotError>>,
        > {
            let answer = self.script.get(self.calls).unwrap_or(&Answer::Ok);
            self.calls += 1;
            self.sent.push((req.offset, req.data.len(), req.done));
            let vote = req.vote;
            match answer {
                Answer::Lost => Err(network_error("lost")),
                Answer::Unreachable => {
                    Err(RPCError::Unreachable(Unreachable::new(&std::io::Error::other("connection refused"))))
                }
                Answer::Stuck => {
                    tokio::time::sleep(Duration::from_secs(11)).await;
                    Err(network_error("stuck"))
                }
                Answer::Mismatch => {
                    self.received.clear();
                    let id = req.meta.snapshot_id.clone();
                    let mismatch = SnapshotMismatch { expect: (id.clone(), 0).into(), got: (id, req.offset).into() };
                    let source = RaftError::APIError(InstallSnapshotError::SnapshotMismatch(mismatch));
                    Err(RPCError::RemoteError(RemoteError::new(2, source)))
                }
                Answer::HigherVote => Ok(InstallSnapshotResponse { vote: Vote::new(vote.leader_id().term + 1, 2) }),
                Answer::Ok => {
                    assert_eq!(req.offset, self.received.len() as u64, "chunks in order, none twice");
                    self.received.extend_from_slice(&req.data);
                    Ok(InstallSnapshotResponse { vote })
                }
            }
        }

        async fn vote(
            &mut self,
            _: VoteRequest<NodeId>,
            _: RPCOption,
        ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
            Err(network_error("not in this test"))
        }
    }

    /// Snapshot data of 2.5 chunks, and the snapshot that sends it.
    fn snapshot(dir: &tempfile::TempDir) -> (Vec<u8>, Snapshot<TypeConfig>) {
        let bytes: Vec<u8> = (0..super::super::SNAPSHOT_CHUNK_BYTES * 5 / 2).map(|i| (i % 251) as u8).collect();
        let path = dir.path().join("data");
        std::fs::File::create(&path).and_then(|mut f| f.write_all(&bytes)).expect("write");
        let data = SnapshotData::new(std::fs::File::open(&path).expect("open"), 0).expect("data");
        (bytes, Snapshot { meta: chunk(Vec::new(), false).meta, snapshot: Box::new(data) })
    }

    async fn send(script: Vec<Answer>) -> (Peer, Vec<u8>, Result<SnapshotResponse<NodeId>, String>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (bytes, snap) = snapshot(&dir);
        let mut peer = Peer { script, calls: 0, sent: Vec::new(), received: Vec::new() };
        let never = std::future::pending::<ReplicationClosed>();
        let option = RPCOption::new(Duration::from_secs(5));
        let res = send_snapshot(&mut peer, 2, Vote::new_committed(3, 1), snap, never, option).await;
        (peer, bytes, res.map_err(|e| e.to_string()))
    }

    #[tokio::test]
    async fn a_snapshot_goes_chunk_by_chunk_and_a_lost_chunk_is_sent_again() {
        let (peer, bytes, res) = send(vec![Answer::Ok, Answer::Lost, Answer::Lost]).await;
        let mib = super::super::SNAPSHOT_CHUNK_BYTES;
        assert_eq!(res.expect("sent").vote, Vote::new_committed(3, 1));
        assert_eq!(peer.received, bytes);
        assert_eq!(
            peer.sent,
            vec![
                (0, mib, false),
                (mib as u64, mib, false),
                (mib as u64, mib, false),
                (mib as u64, mib, false),
                (2 * mib as u64, mib / 2, true)
            ]
        );
    }

    #[tokio::test]
    async fn a_peer_that_lost_what_it_received_gets_the_snapshot_from_the_start() {
        let (peer, bytes, res) = send(vec![Answer::Ok, Answer::Ok, Answer::Mismatch]).await;
        assert!(res.is_ok(), "{res:?}");
        assert_eq!(peer.received, bytes);
        let offsets: Vec<u64> = peer.sent.iter().map(|s| s.0).collect();
        let mib = super::super::SNAPSHOT_CHUNK_BYTES as u64;
        assert_eq!(offsets, vec![0, mib, 2 * mib, 0, mib, 2 * mib]);
    }

    #[tokio::test]
    async fn a_peer_that_keeps_losing_the_snapshot_fails_the_sending() {
        let (peer, _, res) = send((0..10).map(|_| Answer::Mismatch).collect()).await;
        assert!(res.expect_err("given up").contains("lost the snapshot"));
        assert_eq!(peer.calls, 1 + CHUNK_RETRIES as usize);
    }

    #[tokio::test]
    async fn a_higher_vote_ends_the_sending_and_is_returned() {
        let (peer, _, res) = send(vec![Answer::Ok, Answer::HigherVote]).await;
        assert_eq!(res.expect("answered").vote, Vote::new(4, 2));
        assert_eq!(peer.calls, 2, "nothing sent after the higher vote");
    }

    #[tokio::test]
    async fn a_peer_that_keeps_losing_a_chunk_fails_the_sending_after_a_few_tries() {
        let (peer, _, res) = send((0..10).map(|_| Answer::Lost).collect()).await;
        assert!(res.expect_err("given up").contains("lost"));
        assert_eq!(peer.calls, 1 + CHUNK_RETRIES as usize);
    }

    #[tokio::test(start_paused = true)]
    async fn a_chunk_that_failed_only_after_a_long_wait_is_not_sent_again() {
        let (peer, _, res) = send(vec![Answer::Ok, Answer::Stuck]).await;
        assert!(res.expect_err("given up").contains("stuck"));
        assert_eq!(peer.calls, 2);
    }

    #[tokio::test]
    async fn a_peer_unreachable_at_the_first_chunk_fails_the_sending_at_once_and_later_chunks_are_sent_again() {
        // openraft begins again with the snapshot newest by then.
        let (peer, _, res) = send(vec![Answer::Unreachable, Answer::Ok]).await;
        assert!(res.expect_err("given up").contains("connection refused"));
        assert_eq!(peer.calls, 1);
        // Once the peer has chunks of this snapshot, it is worth finishing.
        let (peer, bytes, res) = send(vec![Answer::Ok, Answer::Unreachable]).await;
        assert!(res.is_ok(), "{res:?}");
        assert_eq!(peer.received, bytes);
        assert_eq!(peer.calls, 4);
    }

    #[tokio::test]
    async fn the_last_chunk_is_not_sent_again() {
        let (peer, _, res) = send(vec![Answer::Ok, Answer::Ok, Answer::Lost]).await;
        assert!(res.expect_err("given up").contains("lost"));
        assert_eq!(peer.calls, 3);
    }

    #[tokio::test]
    async fn a_closed_replication_sends_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_, snap) = snapshot(&dir);
        let mut peer = Peer { script: Vec::new(), calls: 0, sent: Vec::new(), received: Vec::new() };
        let closed = std::future::ready(ReplicationClosed::new("a new leader"));
        let res = send_snapshot(
            &mut peer,
            2,
            Vote::new_committed(3, 1),
            snap,
            closed,
            RPCOption::new(Duration::from_secs(5)),
        )
        .await;
        assert!(matches!(res, Err(StreamingError::Closed(_))), "{res:?}");
        assert_eq!(peer.calls, 0);
    }

    fn chunk(data: Vec<u8>, done: bool) -> InstallSnapshotRequest<TypeConfig> {
        let nodes: BTreeMap<NodeId, Node> =
            [(1, Node::new("http://127.0.0.1:2380")), (7, Node::new("http://[::1]:2380"))].into();
        let membership = Membership::new(vec![[1u64, 7].into()], nodes);
        let log_id = LogId::new(CommittedLeaderId::new(3, 1), 4_321);
        InstallSnapshotRequest {
            vote: Vote::new_committed(3, 1),
            meta: SnapshotMeta {
                last_log_id: Some(log_id),
                last_membership: StoredMembership::new(Some(log_id), membership),
                snapshot_id: "3-4321-abc".into(),
            },
            offset: 5 << 20,
            data,
            done,
        }
    }

    #[test]
    fn a_chunk_is_laid_out_as_openraft_s_request_both_ways() {
        for (data, done) in [(Vec::new(), true), ((0..=255u8).cycle().take(70_001).collect(), false)] {
            let req = chunk(data, done);
            let ours = encode_chunk(&req).expect("encode");
            let theirs = crate::raft::encode(&req).expect("encode");
            assert_eq!(ours, theirs, "the same bytes as openraft's struct gives");
            assert_eq!(decode_chunk(&theirs).expect("decode"), req);
            let back: InstallSnapshotRequest<TypeConfig> = decode(&ours).expect("decode");
            assert_eq!(back, req);
        }
    }

    #[test]
    fn a_chunk_cut_short_or_claiming_more_bytes_than_it_has_is_refused() {
        let bytes = encode_chunk(&chunk(vec![9; 1000], false)).expect("encode");
        for cut in [0, 10, bytes.len() - 500, bytes.len() - 1] {
            assert!(decode_chunk(&bytes[..cut]).is_err(), "{cut} bytes of {}", bytes.len());
        }
        // The data's length, just before its bytes, claiming far more.
        let at = bytes.len() - 1 - 1000 - 8;
        let mut lying = bytes.clone();
        lying[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode_chunk(&lying).is_err());
    }
}
