//! The client side of the peer API: one long-lived gRPC channel per peer,
//! used by openraft for its RPCs and by the node to forward proposals and ask
//! for read indexes. AppendEntries go on one long-lived gRPC stream per peer
//! over that channel (see [`PeerConnection`]), with unary calls to a peer
//! that does not serve the stream.
//!
//! It also holds a partition switch: a member can be told to treat some peers
//! as unreachable, which the tests use to cut links without touching sockets.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use super::snapshot_chunk::{send_snapshot, ChunkOut};
use super::{decode, encode, Node, NodeId, TypeConfig};
use crate::proto::kvdpb::peer_client::PeerClient;
use crate::proto::kvdpb::RaftPayload;

/// Bound on how long a connection attempt to a peer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// The longest wait before openraft tries an unreachable peer again.
pub const MAX_BACKOFF: Duration = Duration::from_millis(100);

fn backoff_delays() -> impl Iterator<Item = Duration> + Send + 'static {
    std::iter::successors(Some(Duration::from_millis(10)), |d| Some((*d * 2).min(MAX_BACKOFF)))
}

/// The peer RPCs.
#[derive(Debug, Clone, Copy)]
pub enum Rpc {
    /// Raft AppendEntries.
    AppendEntries,
    /// Raft RequestVote.
    Vote,
    /// One chunk of a snapshot.
    InstallSnapshot,
    /// A client write forwarded to the leader.
    Forward,
    /// Client writes forwarded to the leader together.
    ForwardBatch,
    /// A read index asked of the leader.
    ReadIndex,
    /// A lease keep-alive or time-to-live query for the leader.
    Lease,
    /// Keep-alives gathered by a follower, for the leader.
    LeaseRenewals,
    /// What a member knows of a member that starts on an empty directory.
    Probe,
    /// A membership change asked of the leader.
    Membership,
    /// The leader asks a member to campaign now (it hands over leadership).
    Campaign,
}

/// gRPC metadata on every peer request: the sender's cluster id, and the
/// sender's and receiver's member ids, in hex (as etcd's peer messages carry
/// its cluster id and member ids). A member refuses a request whose cluster
/// or receiver is not its own, or whose sender is not a member.
pub const CLUSTER_HEADER: &str = "kvd-cluster-id";
/// The sender's member id; see [`CLUSTER_HEADER`].
pub const FROM_HEADER: &str = "kvd-from";
/// The receiver's member id; see [`CLUSTER_HEADER`].
pub const TO_HEADER: &str = "kvd-to";

/// What a member answers peers while it is not yet let into its cluster
/// (see `crate::join`): it took nothing, so the request was as good as not
/// sent.
pub const STARTING: &str = "member is starting: it is checking with the others that it may join";

/// Who a member is, as it tells its peers on every request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Identity {
    /// The cluster it belongs to.
    pub cluster_id: u64,
    /// Its member id.
    pub member_id: NodeId,
}

/// Channels to peers, shared by everything in a member that talks to them.
#[derive(Clone, Default)]
pub struct Network {
    channels: Arc<Mutex<HashMap<NodeId, (String, Channel)>>>,
    /// Peers this member sends nothing to: cut off by a test's partition
    /// switch, or silenced while it hands over leadership.
    cut: Arc<Mutex<Cut>>,
    source: Option<IpAddr>,
    streams: Arc<Mutex<HashMap<NodeId, Streams>>>,
    /// Idle streams of requests made of the leader, by kind and leader
    /// (see [`Network::call`]).
    asking_streams: Arc<Mutex<HashMap<(Asking, NodeId), Streams>>>,
    identity: Identity,
    /// The largest message a peer accepts; see [`message_limit`].
    limit: usize,
    /// How to reach https:// peers.
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    /// Peers whose last answer was that this member is not a member of
    /// their cluster (see [`Network::disowned_by`]).
    disowned: Arc<Mutex<HashSet<NodeId>>>,
    /// Peers openraft could not reach at its last call, and since when
    /// (see [`Network::note_unreachable`]).
    unreachable: Arc<Mutex<HashMap<NodeId, Down>>>,
}

/// A peer that openraft's calls do not reach.
struct Down {
    since: Instant,
    reported: Instant,
    failed: u64,
}

/// How often a peer that stays unreachable is reported again. openraft
/// tries it every [`MAX_BACKOFF`] and logs each failure; those lines are
/// left out of kvd's log (see `kvd::logging`) for these.
pub const REPORT_UNREACHABLE_EVERY: Duration = Duration::from_secs(30);

/// The two reasons a peer gets nothing, kept apart so that healing a test's
/// partition does not end a hand-over, and one lock covers both.
#[derive(Default)]
struct Cut {
    /// By the test partition switch ([`Network::block`], [`Network::heal`]).
    blocked: HashSet<NodeId>,
    /// While this member, as leader, hands its leadership to another (see
    /// `Member::move_leader`).
    silenced: HashSet<NodeId>,
}

/// The largest peer message a member accepts, and so sends: a batch of
/// forwarded writes or one log entry (each closes past 4 MiB, plus the one
/// write that crossed that, of at most `--max-request-bytes`), or a snapshot
/// chunk, with room for framing. AppendEntries that would be larger are sent
/// in parts.
pub fn message_limit(max_request_bytes: usize) -> usize {
    const FRAMING: usize = 512 * 1024;
    4 * 1024 * 1024 + 2 * max_request_bytes + super::SNAPSHOT_CHUNK_BYTES + FRAMING
}

/// Idle AppendEntries streams to `addr` of one peer. openraft replicates to
/// a peer through one connection, and makes a new one for each heartbeat
/// round that confirms a read index: each takes an idle stream when it
/// calls and gives it back with the answer, so both reuse open streams.
#[derive(Default)]
struct Streams {
    addr: String,
    idle: Vec<AppendStream>,
    /// When the peer was found to serve no stream.
    unary_since: Option<std::time::Instant>,
}

impl Streams {
    /// Runs `f` on the streams in `all` to peer `id` at `addr`, forgetting
    /// those to another address.
    fn of<K: std::hash::Hash + Eq, T>(
        all: &Mutex<HashMap<K, Streams>>,
        id: K,
        addr: &str,
        f: impl FnOnce(&mut Streams) -> T,
    ) -> T {
        let mut all = all.lock().unwrap_or_else(|p| p.into_inner());
        let streams = all.entry(id).or_default();
        if streams.addr != addr {
            *streams = Streams { addr: addr.to_string(), ..Default::default() };
        }
        f(streams)
    }

    /// An idle stream whose peer has not closed it.
    fn take_open(&mut self) -> Option<AppendStream> {
        while let Some(stream) = self.idle.pop() {
            if !stream.requests.is_closed() {
                return Some(stream);
            }
        }
        None
    }

    fn give_back(&mut self, stream: AppendStream) {
        if self.idle.len() < MAX_IDLE_STREAMS {
            self.idle.push(stream);
        }
    }

    fn unary(&self) -> bool {
        self.unary_since.is_some_and(|t| t.elapsed() < UNARY_RETRY)
    }
}

/// Idle streams kept per peer: one for replication and one for read index
/// rounds, with room to spare.
const MAX_IDLE_STREAMS: usize = 4;

/// The requests a follower makes of its leader on its clients' behalf that
/// go on streams of their own kind (see [`Network::call`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Asking {
    /// `ForwardBatch`, on `ForwardStream`.
    Forward,
    /// `ReadIndex`, on `ReadIndexStream`.
    ReadIndex,
    /// `LeaseRenewals`, on `LeaseRenewalsStream`.
    LeaseRenewals,
}

impl Asking {
    const ALL: [Asking; 3] = [Asking::Forward, Asking::ReadIndex, Asking::LeaseRenewals];

    fn of(rpc: Rpc) -> Option<Asking> {
        match rpc {
            Rpc::ForwardBatch => Some(Asking::Forward),
            Rpc::ReadIndex => Some(Asking::ReadIndex),
            Rpc::LeaseRenewals => Some(Asking::LeaseRenewals),
            _ => None,
        }
    }
}

/// How long a peer found to serve no AppendEntries stream gets unary calls
/// before a stream is tried again (it may have been upgraded meanwhile).
const UNARY_RETRY: Duration = Duration::from_secs(60);

/// Why a peer call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The request never left this member (no connection, or the peer is cut
    /// off by the partition switch); it is safe to retry.
    #[error("not sent: {0}")]
    NotSent(String),
    /// The request may have reached the peer; its effect is unknown.
    #[error("no answer: {0}")]
    Unknown(String),
    /// The request went out and no answer came in time (a peer paused, or
    /// whose disk stalled): its effect is unknown.
    #[error("timed out: {0}")]
    TimedOut(String),
    /// The connection failed under the request: its effect is unknown, and
    /// the peer is not reachable through it for now (it reset or dropped
    /// the connection, as a peer that is stopping or cut off does).
    #[error("connection broken: {0}")]
    Broken(String),
}

impl Network {
    /// Channels whose connections leave from `peer_listen`'s IP when this
    /// member listens for peers on one specific address: then every
    /// connection between two members, in either direction, carries the
    /// address of each at its ends, which is what a firewall rule (or the
    /// fault harness's proxy) tells members apart by.
    ///
    /// Every request carries `identity`, and no message larger than `limit`
    /// is sent.
    pub fn new(
        peer_listen: SocketAddr,
        identity: Identity,
        limit: usize,
        tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    ) -> Self {
        let ip = peer_listen.ip();
        Network { source: (!ip.is_unspecified()).then_some(ip), identity, limit, tls, ..Default::default() }
    }

    /// `message` as a request to peer `to`, with this member's identity.
    fn request<T>(&self, to: NodeId, message: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(message);
        let md = req.metadata_mut();
        for (name, value) in
            [(CLUSTER_HEADER, self.identity.cluster_id), (FROM_HEADER, self.identity.member_id), (TO_HEADER, to)]
        {
            if let Ok(v) = format!("{value:x}").parse() {
                md.insert(name, v);
            }
        }
        req
    }

    /// Makes peer `id` unreachable from this member (tests).
    pub fn block(&self, id: NodeId) {
        self.cut.lock().unwrap_or_else(|p| p.into_inner()).blocked.insert(id);
    }

    /// Makes every peer reachable again (tests).
    pub fn heal(&self) {
        self.cut.lock().unwrap_or_else(|p| p.into_inner()).blocked.clear();
    }

    /// The peers whose last answer was that this member is not a member of
    /// the cluster: once most members say so, it was removed while it could
    /// not hear of it.
    pub fn disowned_by(&self) -> HashSet<NodeId> {
        self.disowned.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn note_answer(&self, id: NodeId, status: Option<&tonic::Status>) {
        let disowns = status.is_some_and(|s| {
            s.code() == tonic::Code::FailedPrecondition && s.message().ends_with("is not a member of this cluster")
        });
        let mut disowned = self.disowned.lock().unwrap_or_else(|p| p.into_inner());
        if disowns {
            disowned.insert(id);
        } else {
            disowned.remove(&id);
        }
    }

    fn is_blocked(&self, id: NodeId) -> bool {
        let cut = self.cut.lock().unwrap_or_else(|p| p.into_inner());
        cut.blocked.contains(&id) || cut.silenced.contains(&id)
    }

    /// openraft's call to peer `id` at `addr` did not reach it: logged when
    /// the peer becomes unreachable, and again every
    /// [`REPORT_UNREACHABLE_EVERY`] while it stays so, instead of once per
    /// try. A peer this member cuts off itself is not reported.
    fn note_unreachable(&self, id: NodeId, addr: &str, cause: &dyn std::fmt::Display) {
        if self.is_blocked(id) {
            return;
        }
        let now = Instant::now();
        let mut down = self.unreachable.lock().unwrap_or_else(|p| p.into_inner());
        match down.get_mut(&id) {
            None => {
                down.insert(id, Down { since: now, reported: now, failed: 1 });
                tracing::warn!(
                    peer = %format!("{id:x}"),
                    %addr,
                    "peer unreachable: {cause} (reported again every {} s while it stays so)",
                    REPORT_UNREACHABLE_EVERY.as_secs()
                );
            }
            Some(d) => {
                d.failed += 1;
                if now.duration_since(d.reported) >= REPORT_UNREACHABLE_EVERY {
                    d.reported = now;
                    tracing::warn!(
                        peer = %format!("{id:x}"),
                        %addr,
                        "peer still unreachable after {} s ({} failed calls): {cause}",
                        now.duration_since(d.since).as_secs(),
                        d.failed
                    );
                }
            }
        }
    }

    /// openraft's call to peer `id` at `addr` had an answer.
    fn note_reached(&self, id: NodeId, addr: &str) {
        let was = self.unreachable.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        if let Some(d) = was {
            tracing::info!(
                peer = %format!("{id:x}"),
                %addr,
                "peer reachable again after {:.1} s ({} failed calls)",
                d.since.elapsed().as_secs_f64(),
                d.failed
            );
        }
    }

    /// Sends nothing to `ids` until [`Network::unsilence`]: a leader that
    /// hands over its leadership lets the others' leases run out.
    pub fn silence(&self, ids: &[NodeId]) {
        self.cut.lock().unwrap_or_else(|p| p.into_inner()).silenced.extend(ids.iter().copied());
    }

    /// Ends [`Network::silence`].
    pub fn unsilence(&self) {
        self.cut.lock().unwrap_or_else(|p| p.into_inner()).silenced.clear();
    }

    /// The idle streams to peer `id` at `addr`, forgetting those to another
    /// address.
    fn with_streams<T>(&self, id: NodeId, addr: &str, f: impl FnOnce(&mut Streams) -> T) -> T {
        Streams::of(&self.streams, id, addr, f)
    }

    /// [`Network::with_streams`] for the streams of `kind`'s requests.
    fn with_asking_streams<T>(&self, kind: Asking, id: NodeId, addr: &str, f: impl FnOnce(&mut Streams) -> T) -> T {
        Streams::of(&self.asking_streams, (kind, id), addr, f)
    }

    fn take_stream(&self, id: NodeId, addr: &str) -> Option<AppendStream> {
        self.with_streams(id, addr, |s| s.take_open())
    }

    fn give_back_stream(&self, id: NodeId, addr: &str, stream: AppendStream) {
        self.with_streams(id, addr, |s| s.give_back(stream))
    }

    fn drop_streams(&self, id: NodeId, addr: &str) {
        self.with_streams(id, addr, |s| s.idle.clear());
        for kind in Asking::ALL {
            self.with_asking_streams(kind, id, addr, |s| s.idle.clear());
        }
    }

    /// Whether AppendEntries to peer `id` go in unary calls for now.
    fn unary(&self, id: NodeId, addr: &str) -> bool {
        self.with_streams(id, addr, |s| s.unary())
    }

    fn set_unary(&self, id: NodeId, addr: &str) {
        self.with_streams(id, addr, |s| s.unary_since = Some(std::time::Instant::now()))
    }

    fn channel(&self, id: NodeId, addr: &str) -> Result<Channel, String> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((a, ch)) = channels.get(&id) {
            if a == addr {
                return Ok(ch.clone());
            }
        }
        let endpoint = Endpoint::from_shared(crate::tls::plain_url(addr))
            .map_err(|e| format!("bad peer URL {addr}: {e}"))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .local_address(self.source);
        let ch = match addr.starts_with("https://") {
            true => {
                let tls = self.tls.clone().ok_or_else(|| {
                    format!("peer URL {addr} needs TLS, and neither --peer-cert-file nor --peer-auto-tls is set")
                })?;
                crate::tls::channel(endpoint, tls, self.source)
            }
            false => endpoint.connect_lazy(),
        };
        channels.insert(id, (addr.to_string(), ch.clone()));
        Ok(ch)
    }

    /// Sends `payload` to peer `id` at `addr` and returns the answer's bytes.
    ///
    /// Forwarded writes (`ForwardBatch`), read index requests and gathered
    /// keep-alives go on long-lived streams, as AppendEntries do: a unary
    /// call costs a new HTTP/2 stream with its headers and a task on both
    /// members, for every write a lone client makes through a follower, and
    /// for every round of linearizable reads or keep-alives a follower
    /// serves. A stream is taken for one call and given back once its
    /// answer is in; one that fails or times out is dropped, since a late
    /// answer on it would be read as the next call's. A leader without the
    /// stream (an older kvd) gets unary calls, per kind.
    pub async fn call(
        &self,
        id: NodeId,
        addr: &str,
        rpc: Rpc,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, CallError> {
        let kind = Asking::of(rpc).filter(|k| !self.with_asking_streams(*k, id, addr, |s| s.unary()));
        let payload = match kind {
            Some(kind) => match tokio::time::timeout(timeout, self.ask_on_stream(kind, id, addr, payload)).await {
                Ok(Ok(Ok(answer))) => return Ok(answer),
                Ok(Ok(Err(unsent))) => {
                    self.with_asking_streams(kind, id, addr, |s| s.unary_since = Some(std::time::Instant::now()));
                    unsent
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(CallError::TimedOut(format!("{rpc:?} to {id:x} after {timeout:?}"))),
            },
            None => payload,
        };
        let mut client = self.client(id, addr)?;
        let req = self.request(id, RaftPayload { data: payload });
        let fut = async {
            match rpc {
                Rpc::AppendEntries => client.append_entries(req).await,
                Rpc::Vote => client.vote(req).await,
                Rpc::InstallSnapshot => client.install_snapshot(req).await,
                Rpc::Forward => client.forward(req).await,
                Rpc::ForwardBatch => client.forward_batch(req).await,
                Rpc::ReadIndex => client.read_index(req).await,
                Rpc::Lease => client.lease(req).await,
                Rpc::LeaseRenewals => client.lease_renewals(req).await,
                Rpc::Probe => client.probe(req).await,
                Rpc::Membership => client.membership(req).await,
                Rpc::Campaign => client.campaign(req).await,
            }
        };
        match tokio::time::timeout(timeout, fut).await {
            Err(_) => Err(CallError::TimedOut(format!("{rpc:?} to {id:x} after {timeout:?}"))),
            Ok(Err(s)) => {
                self.note_answer(id, Some(&s));
                Err(call_error(s))
            }
            Ok(Ok(resp)) => {
                self.note_answer(id, None);
                Ok(resp.into_inner().data)
            }
        }
    }

    /// Sends a request of `kind` on an idle stream to leader `id`, or a new
    /// one. If the leader serves no such stream the payload comes back
    /// unsent (`Ok(Err)`), for a unary call: it is never copied.
    async fn ask_on_stream(
        &self,
        kind: Asking,
        id: NodeId,
        addr: &str,
        payload: Vec<u8>,
    ) -> Result<Result<Vec<u8>, Vec<u8>>, CallError> {
        if self.is_blocked(id) {
            self.with_asking_streams(kind, id, addr, |s| s.idle.clear());
            return Err(CallError::NotSent(format!("peer {id:x} is cut off")));
        }
        let mut stream = match self.with_asking_streams(kind, id, addr, |s| s.take_open()) {
            Some(stream) => stream,
            None => {
                let mut client = self.client(id, addr)?;
                let (requests, outgoing) = mpsc::channel(1);
                let outgoing = self.request(id, ReceiverStream::new(outgoing));
                let opened = match kind {
                    Asking::Forward => client.forward_stream(outgoing).await,
                    Asking::ReadIndex => client.read_index_stream(outgoing).await,
                    Asking::LeaseRenewals => client.lease_renewals_stream(outgoing).await,
                };
                match opened {
                    Ok(answers) => AppendStream { requests, answers: answers.into_inner() },
                    Err(s) if s.code() == tonic::Code::Unimplemented => return Ok(Err(payload)),
                    Err(s) => {
                        // A refusal comes when the stream opens; a member
                        // refused on an open stream is refused again when the
                        // next call opens a new one.
                        self.note_answer(id, Some(&s));
                        return Err(call_error(s));
                    }
                }
            }
        };
        let answer = stream.call(payload).await?;
        self.note_answer(id, None);
        self.with_asking_streams(kind, id, addr, |s| s.give_back(stream));
        Ok(Ok(answer))
    }

    /// A client for peer `id` at `addr`, unless the peer is cut off.
    fn client(&self, id: NodeId, addr: &str) -> Result<PeerClient<Channel>, CallError> {
        if self.is_blocked(id) {
            return Err(CallError::NotSent(format!("peer {id:x} is cut off")));
        }
        Ok(PeerClient::new(self.channel(id, addr).map_err(CallError::NotSent)?)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX))
    }

    /// Opens a stream of AppendEntries to peer `id` at `addr`; None if the
    /// peer does not serve such streams (a kvd from before them).
    async fn open_append_stream(&self, id: NodeId, addr: &str) -> Result<Option<AppendStream>, CallError> {
        let mut client = self.client(id, addr)?;
        let (requests, outgoing) = mpsc::channel(1);
        match client.append_entries_stream(self.request(id, ReceiverStream::new(outgoing))).await {
            Ok(answers) => Ok(Some(AppendStream { requests, answers: answers.into_inner() })),
            Err(s) if s.code() == tonic::Code::Unimplemented => Ok(None),
            Err(s) => Err(call_error(s)),
        }
    }
}

/// What a failed peer call means for the request.
fn call_error(s: tonic::Status) -> CallError {
    // tonic reports a channel that could not connect this way, before
    // anything is sent.
    if crate::client::not_sent(&s) || (s.code() == tonic::Code::Unavailable && s.message() == STARTING) {
        CallError::NotSent(s.to_string())
    } else if crate::client::broken(&s) {
        CallError::Broken(s.to_string())
    } else {
        CallError::Unknown(s.to_string())
    }
}

/// A stream of requests to one peer (AppendEntries, or forwarded writes): a
/// request goes out, and its answer comes back before the next is sent.
struct AppendStream {
    requests: mpsc::Sender<RaftPayload>,
    answers: tonic::Streaming<RaftPayload>,
}

impl AppendStream {
    /// Sends one request and waits for its answer.
    async fn call(&mut self, payload: Vec<u8>) -> Result<Vec<u8>, CallError> {
        if self.requests.send(RaftPayload { data: payload }).await.is_err() {
            // The request body is gone: the stream ended before this request
            // could be written to it.
            return Err(CallError::NotSent("the peer stream closed".into()));
        }
        match self.answers.message().await {
            Ok(Some(answer)) => Ok(answer.data),
            Ok(None) => Err(CallError::Broken("the peer ended the stream".into())),
            Err(s) => Err(call_error(s)),
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> PeerConnection {
        PeerConnection::new(self.clone(), target, node.addr.clone())
    }
}

/// openraft's handle on one peer. AppendEntries, which openraft sends on a
/// handle one at a time, go on long-lived streams kept by the [`Network`]:
/// a unary call per entry batch and heartbeat cost a new HTTP/2 stream each,
/// with its headers and a task on both sides.
pub struct PeerConnection {
    net: Network,
    target: NodeId,
    addr: String,
}

type RpcResult<T, E> = Result<T, RPCError<NodeId, Node, RaftError<NodeId, E>>>;

impl PeerConnection {
    fn new(net: Network, target: NodeId, addr: String) -> Self {
        PeerConnection { net, target, addr }
    }

    async fn raft_call<Req, Resp, E>(&self, rpc: Rpc, req: &Req, timeout: Duration) -> RpcResult<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let payload = encode(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let bytes = self.net.call(self.target, &self.addr, rpc, payload, timeout).await.map_err(|e| self.failed(e))?;
        self.answer(&bytes)
    }

    /// The openraft error for a call to this peer that failed (see
    /// [`rpc_error`]); one that did not reach the peer, or had no answer in
    /// time, marks the peer unreachable (see [`Network::note_unreachable`]).
    // openraft's RPCError is large by design; the trait fixes the error type.
    #[allow(clippy::result_large_err)]
    fn failed<E: std::error::Error>(&self, e: CallError) -> RPCError<NodeId, Node, RaftError<NodeId, E>> {
        match &e {
            CallError::NotSent(_) | CallError::Broken(_) | CallError::TimedOut(_) => {
                self.net.note_unreachable(self.target, &self.addr, &e)
            }
            CallError::Unknown(_) => {}
        }
        rpc_error(e)
    }

    // openraft's RPCError is large by design; the trait fixes the error type.
    #[allow(clippy::result_large_err)]
    fn answer<Resp, E>(&self, bytes: &[u8]) -> RpcResult<Resp, E>
    where
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        self.net.note_reached(self.target, &self.addr);
        let answer: Result<Resp, RaftError<NodeId, E>> =
            decode(bytes).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        answer.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    /// Sends one AppendEntries on an idle stream, or a new one. None if the
    /// peer serves no such stream.
    ///
    /// The stream is taken from the idle ones for the call and given back
    /// only once the answer is in. A call dropped midway (openraft drops a
    /// call that outlives its timeout) thus drops its stream with it:
    /// otherwise the next request on it would read the late answer to this
    /// one as its own, and openraft would count entries as stored on a
    /// member that does not have them.
    async fn stream_call(&mut self, payload: Vec<u8>) -> Result<Option<Vec<u8>>, CallError> {
        if self.net.is_blocked(self.target) {
            self.net.drop_streams(self.target, &self.addr);
            return Err(CallError::NotSent(format!("peer {:x} is cut off", self.target)));
        }
        let mut stream = match self.net.take_stream(self.target, &self.addr) {
            Some(stream) => stream,
            None => match self.net.open_append_stream(self.target, &self.addr).await? {
                Some(stream) => stream,
                None => return Ok(None),
            },
        };
        let answer = stream.call(payload).await?;
        self.net.give_back_stream(self.target, &self.addr, stream);
        Ok(Some(answer))
    }
}

/// The openraft error for a failed peer call. Unreachable makes openraft wait
/// (see `backoff`) before it tries this peer again; after any other error it
/// retries with the next entry or heartbeat, which against a peer that resets
/// every connection made thousands of failed calls a second.
fn rpc_error<E: std::error::Error>(e: CallError) -> RPCError<NodeId, Node, RaftError<NodeId, E>> {
    match e {
        CallError::NotSent(_) | CallError::Broken(_) => RPCError::Unreachable(Unreachable::new(&e)),
        CallError::Unknown(_) | CallError::TimedOut(_) => RPCError::Network(NetworkError::new(&e)),
    }
}

impl RaftNetwork<TypeConfig> for PeerConnection {
    /// Waits before retrying an unreachable peer: 10 ms, doubling up to
    /// [`MAX_BACKOFF`]; openraft starts over after a call that succeeds.
    fn backoff(&self) -> Backoff {
        Backoff::new(backoff_delays())
    }

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>, openraft::error::Infallible> {
        let timeout = option.hard_ttl();
        let payload = encode(&rpc).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        if self.net.limit > 0 && payload.len() > self.net.limit && rpc.entries.len() > 1 {
            // The peer would refuse it: openraft sends fewer entries.
            let fit = (rpc.entries.len() as u64 * self.net.limit as u64 / payload.len() as u64 / 2).max(1);
            return Err(RPCError::PayloadTooLarge(openraft::error::PayloadTooLarge::new_entries_hint(fit)));
        }
        if self.net.unary(self.target, &self.addr) {
            return self.raft_call(Rpc::AppendEntries, &rpc, timeout).await;
        }
        match tokio::time::timeout(timeout, self.stream_call(payload)).await {
            Ok(Ok(Some(bytes))) => self.answer(&bytes),
            Ok(Ok(None)) => {
                tracing::info!(peer = %format!("{:x}", self.target), "peer serves no AppendEntries stream; using unary calls");
                self.net.set_unary(self.target, &self.addr);
                self.raft_call(Rpc::AppendEntries, &rpc, timeout).await
            }
            // A stream that failed or timed out is dropped (see
            // `stream_call`): it may still carry an answer to this request.
            Ok(Err(e)) => Err(self.failed(e)),
            Err(_) => {
                Err(self.failed(CallError::TimedOut(format!("AppendEntries to {:x} after {timeout:?}", self.target))))
            }
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        self.raft_call(Rpc::InstallSnapshot, &ChunkOut::of(&rpc), option.hard_ttl()).await
    }

    async fn full_snapshot(
        &mut self,
        vote: openraft::Vote<NodeId>,
        snapshot: openraft::storage::Snapshot<TypeConfig>,
        cancel: impl std::future::Future<Output = openraft::error::ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<
        openraft::raft::SnapshotResponse<NodeId>,
        openraft::error::StreamingError<TypeConfig, openraft::error::Fatal<NodeId>>,
    > {
        let target = self.target;
        send_snapshot(self, target, vote, snapshot, cancel, option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>, openraft::error::Infallible> {
        self.raft_call(Rpc::Vote, &rpc, option.hard_ttl()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::LogId;
    use openraft::Vote;

    fn heartbeat() -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: Vote::new_committed(1, 1),
            prev_log_id: None,
            entries: vec![],
            leader_commit: None,
        }
    }

    /// A peer address whose listener runs `serve` on every connection.
    fn peer(serve: fn(std::net::TcpStream)) -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                std::thread::spawn(move || serve(conn));
            }
        });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn a_peer_without_the_append_stream_gets_unary_calls() {
        // A gRPC server with no services answers every call Unimplemented,
        // as a kvd from before the stream answers the stream.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tonic::transport::Server::builder()
            .add_routes(tonic::service::Routes::default())
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
        let server = tokio::spawn(server);
        let mut conn = PeerConnection::new(Network::default(), 2, format!("http://{addr}"));
        let err = conn.append_entries(heartbeat(), RPCOption::new(Duration::from_secs(5))).await;
        // The unary call was made, and refused too.
        let err = err.expect_err("nothing serves AppendEntries");
        assert!(matches!(err, RPCError::Network(_)), "{err:?}");
        assert!(format!("{err:?}").contains("not implemented"), "{err:?}");
        assert!(conn.net.unary(2, &conn.addr));
        assert_eq!(idle_streams(&conn), 0);
        server.abort();
    }

    /// A peer whose AppendEntries stream answers a request with a previous
    /// log id only after a long wait, with a conflict, and any other at once,
    /// with success. Forwarded writes, read index requests and keep-alives
    /// come back as they went, after "unary" for a unary call; with
    /// `streams` the peer serves ForwardStream, ReadIndexStream and
    /// LeaseRenewalsStream too, and counts the streams opened of each.
    #[derive(Default)]
    struct SlowPeer {
        streams: Option<Arc<Opened>>,
    }

    /// Streams a [`SlowPeer`] opened, of each kind.
    #[derive(Default)]
    struct Opened {
        forward: std::sync::atomic::AtomicUsize,
        read_index: std::sync::atomic::AtomicUsize,
        renewals: std::sync::atomic::AtomicUsize,
    }

    impl Opened {
        fn count(&self, kind: Asking) -> &std::sync::atomic::AtomicUsize {
            match kind {
                Asking::Forward => &self.forward,
                Asking::ReadIndex => &self.read_index,
                Asking::LeaseRenewals => &self.renewals,
            }
        }

        fn of(&self, kind: Asking) -> usize {
            self.count(kind).load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    impl SlowPeer {
        /// Answers a stream of `kind` with its own messages, if it serves one.
        fn echo(
            &self,
            kind: Asking,
            req: tonic::Request<tonic::Streaming<RaftPayload>>,
        ) -> Result<tonic::Response<Answers>, tonic::Status> {
            let Some(opened) = &self.streams else {
                return Err(tonic::Status::unimplemented("not in this test"));
            };
            opened.count(kind).fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(tonic::Response::new(Box::pin(req.into_inner())))
        }
    }

    fn unary_echo(req: tonic::Request<RaftPayload>) -> Result<tonic::Response<RaftPayload>, tonic::Status> {
        let data = [b"unary".as_slice(), &req.into_inner().data].concat();
        Ok(tonic::Response::new(RaftPayload { data }))
    }

    type Answers = std::pin::Pin<Box<dyn futures::Stream<Item = Result<RaftPayload, tonic::Status>> + Send>>;

    fn unimplemented() -> Result<tonic::Response<RaftPayload>, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this test"))
    }

    #[tonic::async_trait]
    impl crate::proto::kvdpb::peer_server::Peer for SlowPeer {
        type AppendEntriesStreamStream = Answers;
        type ForwardStreamStream = Answers;
        type ReadIndexStreamStream = Answers;
        type LeaseRenewalsStreamStream = Answers;

        async fn forward_stream(
            &self,
            req: tonic::Request<tonic::Streaming<RaftPayload>>,
        ) -> Result<tonic::Response<Answers>, tonic::Status> {
            self.echo(Asking::Forward, req)
        }

        async fn read_index_stream(
            &self,
            req: tonic::Request<tonic::Streaming<RaftPayload>>,
        ) -> Result<tonic::Response<Answers>, tonic::Status> {
            self.echo(Asking::ReadIndex, req)
        }

        async fn lease_renewals_stream(
            &self,
            req: tonic::Request<tonic::Streaming<RaftPayload>>,
        ) -> Result<tonic::Response<Answers>, tonic::Status> {
            self.echo(Asking::LeaseRenewals, req)
        }

        async fn append_entries_stream(
            &self,
            req: tonic::Request<tonic::Streaming<RaftPayload>>,
        ) -> Result<tonic::Response<Answers>, tonic::Status> {
            use futures::StreamExt;
            let answers = req.into_inner().then(|request| async move {
                let rpc: AppendEntriesRequest<TypeConfig> = decode(&request?.data).expect("a request");
                let answer: Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>> = match rpc.prev_log_id {
                    Some(_) => {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        Ok(AppendEntriesResponse::Conflict)
                    }
                    None => Ok(AppendEntriesResponse::Success),
                };
                Ok(RaftPayload { data: encode(&answer).expect("encode") })
            });
            Ok(tonic::Response::new(Box::pin(answers)))
        }

        async fn append_entries(
            &self,
            _: tonic::Request<RaftPayload>,
        ) -> Result<tonic::Response<RaftPayload>, tonic::Status> {
            unimplemented()
        }
        async fn vote(&self, _: tonic::Request<RaftPayload>) -> Result<tonic::Response<RaftPayload>, tonic::Status> {
            unimplemented()
        }
        async fn install_snapshot(
            &self,
            _: tonic::Request<RaftPayload>,
        ) -> Result<tonic::Response<RaftPayload>, tonic::Status> {
            unimplemented()
        }
        async fn forward(&self, _: tonic::Request<RaftPayload>) -> Result<tonic::Response<RaftPayload>, tonic::Status> {
            unimplemented()
        }
        async fn forward_batch(
            &self,
            req: tonic::Request<RaftPayload>,
        ) -> Result<tonic::Response<RaftPayload>, tonic::Status> {
            unary_echo(req)
        }
        async fn read_index(
            &self,
            req: tonic::Request<RaftPayload>,
        ) -> Result<tonic::Response<RaftPayload>, tonic::Status> {
            unary_echo(req)
        }
        async fn lease(&self, _: tonic::Request<RaftPayload>) -> Result<tonic::Response<RaftPayload>, tonic::Status> {
            unimplemented()
        }
        async fn lease_renewals(
            &self,
            req: tonic::Request<RaftPayload>,
        ) -> Result<tonic::Response<RaftPayload>, tonic::Status> {
            unary_echo(req)
        }
        async fn probe(&self, _: tonic::Request<RaftPayload>) -> Result<tonic::Response<RaftPayload>, tonic::Status> {
            unimplemented()
        }

        async fn membership(
            &self,
            _: tonic::Request<RaftPayload>,
        ) -> Result<tonic::Response<RaftPayload>, tonic::Status> {
            unimplemented()
        }

        async fn campaign(
            &self,
            _: tonic::Request<RaftPayload>,
        ) -> Result<tonic::Response<RaftPayload>, tonic::Status> {
            unimplemented()
        }
    }

    fn idle_streams(conn: &PeerConnection) -> usize {
        conn.net.with_streams(conn.target, &conn.addr, |s| s.idle.len())
    }

    #[tokio::test]
    async fn a_call_dropped_midway_leaves_no_answer_for_the_next() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tonic::transport::Server::builder()
            .add_service(crate::proto::kvdpb::peer_server::PeerServer::new(SlowPeer::default()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
        let server = tokio::spawn(server);
        let mut conn = PeerConnection::new(Network::default(), 2, format!("http://{addr}"));
        let option = || RPCOption::new(Duration::from_secs(5));
        // The stream works, and stays open between calls.
        let ok = conn.append_entries(heartbeat(), option()).await.expect("answered");
        assert!(matches!(ok, AppendEntriesResponse::Success), "{ok:?}");
        assert_eq!(idle_streams(&conn), 1);
        // Another handle on the same peer, as openraft makes for each read
        // index round, takes the idle stream and gives it back.
        let mut other = PeerConnection::new(conn.net.clone(), 2, conn.addr.clone());
        let ok = other.append_entries(heartbeat(), option()).await.expect("answered");
        assert!(matches!(ok, AppendEntriesResponse::Success), "{ok:?}");
        assert_eq!(idle_streams(&conn), 1);
        // A call dropped while its answer is on the way, as openraft drops
        // one past its own timeout...
        let slow = AppendEntriesRequest {
            prev_log_id: Some(LogId::new(openraft::CommittedLeaderId::new(1, 1), 1)),
            ..heartbeat()
        };
        let dropped = tokio::time::timeout(Duration::from_millis(50), conn.append_entries(slow, option())).await;
        assert!(dropped.is_err(), "the slow answer came early");
        // ... must not hand its late conflict to the next call.
        let next = conn.append_entries(heartbeat(), option()).await.expect("answered");
        assert!(matches!(next, AppendEntriesResponse::Success), "the next call read {next:?}");
        assert!(!conn.net.unary(2, &conn.addr));
        server.abort();
    }

    /// A listening peer serving `peer`.
    async fn serve(peer: SlowPeer) -> (String, tokio::task::JoinHandle<Result<(), tonic::transport::Error>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tonic::transport::Server::builder()
            .add_service(crate::proto::kvdpb::peer_server::PeerServer::new(peer))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
        (format!("http://{addr}"), tokio::spawn(server))
    }

    fn idle_asking_streams(net: &Network, kind: Asking, addr: &str) -> usize {
        net.with_asking_streams(kind, 2, addr, |s| s.idle.len())
    }

    #[tokio::test]
    async fn requests_to_the_leader_reuse_a_stream_of_their_kind_and_a_leader_without_it_gets_unary_calls() {
        let timeout = Duration::from_secs(5);
        let opened = Arc::new(Opened::default());
        let (addr, server) = serve(SlowPeer { streams: Some(opened.clone()) }).await;
        let net = Network::default();
        let kinds = [
            (Rpc::ForwardBatch, Asking::Forward),
            (Rpc::ReadIndex, Asking::ReadIndex),
            (Rpc::LeaseRenewals, Asking::LeaseRenewals),
        ];
        for (rpc, kind) in kinds {
            let idle_others = || {
                let others = kinds.iter().filter(|(_, k)| *k != kind);
                others.map(|(_, k)| idle_asking_streams(&net, *k, &addr)).collect::<Vec<_>>()
            };
            let others = idle_others();
            for request in [b"first".to_vec(), b"second".to_vec(), b"third".to_vec()] {
                let answer = net.call(2, &addr, rpc, request.clone(), timeout).await.expect("answered");
                assert_eq!(answer, request, "{rpc:?} answered on the stream, in order");
                assert_eq!(idle_asking_streams(&net, kind, &addr), 1, "{rpc:?}");
            }
            assert_eq!(opened.of(kind), 1, "one {kind:?} stream for all three");
            assert_eq!(idle_others(), others, "{rpc:?} took no stream of another kind");
            // Calls under way at once each take a stream of their own.
            let (a, b) = tokio::join!(
                net.call(2, &addr, rpc, b"a".to_vec(), timeout),
                net.call(2, &addr, rpc, b"b".to_vec(), timeout)
            );
            assert_eq!((a.expect("a"), b.expect("b")), (b"a".to_vec(), b"b".to_vec()));
            assert_eq!(idle_asking_streams(&net, kind, &addr), 2, "{rpc:?}");
        }
        server.abort();

        // An older leader answers the streams Unimplemented: unary calls.
        let (addr, server) = serve(SlowPeer::default()).await;
        for (rpc, kind) in kinds {
            let answer = net.call(2, &addr, rpc, b"w".to_vec(), timeout).await.expect("answered");
            assert_eq!(answer, b"unaryw", "{rpc:?}");
            assert!(net.with_asking_streams(kind, 2, &addr, |s| s.unary()), "{rpc:?}");
            assert_eq!(idle_asking_streams(&net, kind, &addr), 0, "{rpc:?}");
        }
        server.abort();
    }

    #[test]
    fn an_unreachable_peer_is_logged_when_it_goes_every_30_s_and_when_it_is_back() {
        let lines = crate::logging::captured::Lines::default();
        let net = Network::default();
        let back = |d: Duration| Instant::now().checked_sub(d).expect("the clock is past that");
        tracing::subscriber::with_default(lines.subscriber(false), || {
            for _ in 0..3 {
                net.note_unreachable(7, "http://a:2380", &"connection refused");
            }
            assert!(is_down(&net, 7));
            // Until REPORT_UNREACHABLE_EVERY has passed, the tries are counted.
            if let Some(d) = net.unreachable.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&7) {
                (d.since, d.reported) = (back(Duration::from_secs(45)), back(REPORT_UNREACHABLE_EVERY));
            }
            net.note_unreachable(7, "http://a:2380", &"connection refused");
            net.note_unreachable(7, "http://a:2380", &"connection refused");
            net.note_reached(7, "http://a:2380");
            net.note_reached(7, "http://a:2380");
            assert!(!is_down(&net, 7));
            // A peer this member cut off itself is not reported.
            net.block(8);
            net.note_unreachable(8, "http://b:2380", &"peer 8 is cut off");
            assert!(!is_down(&net, 8));
        });
        let text = lines.text();
        let logged: Vec<&str> = text.lines().collect();
        assert_eq!(logged.len(), 3, "{text}");
        assert!(logged[0].contains("WARN") && logged[0].contains("peer unreachable: connection refused"), "{text}");
        assert!(logged[0].contains("peer=7") && logged[0].contains("addr=http://a:2380"), "{text}");
        assert!(logged[1].contains("peer still unreachable after 45 s (4 failed calls): connection refused"), "{text}");
        assert!(logged[2].contains("INFO") && logged[2].contains("peer reachable again after 45."), "{text}");
        assert!(logged[2].contains("(5 failed calls)"), "{text}");
    }

    /// Whether `net` holds peer `id` for unreachable.
    fn is_down(net: &Network, id: NodeId) -> bool {
        net.unreachable.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&id)
    }

    #[test]
    fn a_call_unreached_or_unanswered_in_time_marks_the_peer_down_and_an_answer_up() {
        let conn = PeerConnection::new(Network::default(), 7, "http://a:2380".into());
        let failed = |e: CallError| drop(conn.failed::<openraft::error::Infallible>(e));
        failed(CallError::Unknown("the peer answered: permission denied".into()));
        assert!(!is_down(&conn.net, 7), "an answer that is an error is an answer");
        failed(CallError::TimedOut("AppendEntries to 7 after 150ms".into()));
        assert!(is_down(&conn.net, 7), "no answer in time");
        let answer = encode(&Ok::<(), RaftError<NodeId, openraft::error::Infallible>>(())).expect("encode");
        conn.answer::<(), openraft::error::Infallible>(&answer).expect("an answer");
        assert!(!is_down(&conn.net, 7));
        failed(CallError::NotSent("tcp connect error".into()));
        assert!(is_down(&conn.net, 7), "not reached");
        failed(CallError::Broken("the peer ended the stream".into()));
        assert!(is_down(&conn.net, 7), "cut off under the call");
    }

    #[test]
    fn backoff_doubles_from_10_ms_up_to_the_cap() {
        let ms: Vec<u128> = backoff_delays().take(8).map(|d| d.as_millis()).collect();
        assert_eq!(ms, [10, 20, 40, 80, 100, 100, 100, 100]);
    }

    #[tokio::test]
    async fn a_peer_that_drops_connections_is_unreachable_and_one_that_is_silent_is_not() {
        let option = || RPCOption::new(Duration::from_millis(500));
        // Dropped at once: openraft should back off, not retry at once.
        let mut dropping = PeerConnection::new(Network::default(), 2, peer(drop));
        let err = dropping.append_entries(heartbeat(), option()).await.expect_err("nothing answers");
        assert!(matches!(err, RPCError::Unreachable(_)), "{err:?}");
        // Held open without a word: the call times out, which says nothing
        // of whether the peer can be reached.
        let silent = |conn: std::net::TcpStream| {
            std::thread::sleep(Duration::from_secs(2));
            drop(conn);
        };
        let mut silent = PeerConnection::new(Network::default(), 3, peer(silent));
        let err = silent.append_entries(heartbeat(), option()).await.expect_err("nothing answers");
        assert!(matches!(err, RPCError::Network(_)), "{err:?}");
    }
}
