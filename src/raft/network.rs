//! The client side of the peer API: one long-lived gRPC channel per peer,
//! used by openraft for its RPCs and by the node to forward proposals and ask
//! for read indexes.
//!
//! It also holds a partition switch: a member can be told to treat some peers
//! as unreachable, which the tests use to cut links without touching sockets.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};

use super::{decode, encode, Node, NodeId, TypeConfig};
use crate::error::Error;
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
}

/// Channels to peers, shared by everything in a member that talks to them.
#[derive(Clone, Default)]
pub struct Network {
    channels: Arc<Mutex<HashMap<NodeId, (String, Channel)>>>,
    blocked: Arc<Mutex<HashSet<NodeId>>>,
    source: Option<IpAddr>,
}

/// Why a peer call failed.
#[derive(Debug)]
pub enum CallError {
    /// The request never left this member (no connection, or the peer is cut
    /// off by the partition switch); it is safe to retry.
    NotSent(String),
    /// The request may have reached the peer; its effect is unknown.
    Unknown(String),
    /// The connection failed under the request: its effect is unknown, and
    /// the peer is not reachable through it for now (it reset or dropped
    /// the connection, as a peer that is stopping or cut off does).
    Broken(String),
}

impl Network {
    /// Channels whose connections leave from `peer_listen`'s IP when this
    /// member listens for peers on one specific address: then every
    /// connection between two members, in either direction, carries the
    /// address of each at its ends, which is what a firewall rule (or the
    /// fault harness's proxy) tells members apart by.
    pub fn new(peer_listen: SocketAddr) -> Self {
        let ip = peer_listen.ip();
        Network { source: (!ip.is_unspecified()).then_some(ip), ..Default::default() }
    }

    /// Makes peer `id` unreachable from this member (tests).
    pub fn block(&self, id: NodeId) {
        self.blocked.lock().unwrap_or_else(|p| p.into_inner()).insert(id);
    }

    /// Makes every peer reachable again (tests).
    pub fn heal(&self) {
        self.blocked.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    fn is_blocked(&self, id: NodeId) -> bool {
        self.blocked.lock().unwrap_or_else(|p| p.into_inner()).contains(&id)
    }

    fn channel(&self, id: NodeId, addr: &str) -> Result<Channel, String> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((a, ch)) = channels.get(&id) {
            if a == addr {
                return Ok(ch.clone());
            }
        }
        let endpoint = Endpoint::from_shared(addr.to_string())
            .map_err(|e| format!("bad peer URL {addr}: {e}"))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .local_address(self.source);
        let ch = endpoint.connect_lazy();
        channels.insert(id, (addr.to_string(), ch.clone()));
        Ok(ch)
    }

    /// Sends `payload` to peer `id` at `addr` and returns the answer's bytes.
    pub async fn call(
        &self,
        id: NodeId,
        addr: &str,
        rpc: Rpc,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, CallError> {
        if self.is_blocked(id) {
            return Err(CallError::NotSent(format!("peer {id:x} is cut off")));
        }
        let mut client = PeerClient::new(self.channel(id, addr).map_err(CallError::NotSent)?)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX);
        let req = RaftPayload { data: payload };
        let fut = async {
            match rpc {
                Rpc::AppendEntries => client.append_entries(req).await,
                Rpc::Vote => client.vote(req).await,
                Rpc::InstallSnapshot => client.install_snapshot(req).await,
                Rpc::Forward => client.forward(req).await,
                Rpc::ForwardBatch => client.forward_batch(req).await,
                Rpc::ReadIndex => client.read_index(req).await,
                Rpc::Lease => client.lease(req).await,
            }
        };
        match tokio::time::timeout(timeout, fut).await {
            Err(_) => Err(CallError::Unknown(format!("{rpc:?} to {id:x} timed out after {timeout:?}"))),
            // tonic reports a channel that could not connect this way, before
            // anything is sent.
            Ok(Err(s)) if crate::client::not_sent(&s) => Err(CallError::NotSent(s.to_string())),
            Ok(Err(s)) if crate::client::broken(&s) => Err(CallError::Broken(s.to_string())),
            Ok(Err(s)) => Err(CallError::Unknown(s.to_string())),
            Ok(Ok(resp)) => Ok(resp.into_inner().data),
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> PeerConnection {
        PeerConnection { net: self.clone(), target, addr: node.addr.clone() }
    }
}

/// openraft's handle on one peer.
pub struct PeerConnection {
    net: Network,
    target: NodeId,
    addr: String,
}

type RpcResult<T, E> = Result<T, RPCError<NodeId, Node, RaftError<NodeId, E>>>;

impl PeerConnection {
    async fn raft_call<Req, Resp, E>(&self, rpc: Rpc, req: &Req, timeout: Duration) -> RpcResult<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let payload = encode(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        // Unreachable makes openraft wait (see `backoff`) before it tries
        // this peer again; after any other error it retries with the next
        // entry or heartbeat, which against a peer that resets every
        // connection made thousands of failed calls a second.
        let bytes = self.net.call(self.target, &self.addr, rpc, payload, timeout).await.map_err(|e| match e {
            CallError::NotSent(m) | CallError::Broken(m) => {
                RPCError::Unreachable(Unreachable::new(&Error::Internal(m)))
            }
            CallError::Unknown(m) => RPCError::Network(NetworkError::new(&Error::Internal(m))),
        })?;
        let answer: Result<Resp, RaftError<NodeId, E>> =
            decode(&bytes).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        answer.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
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
        self.raft_call(Rpc::AppendEntries, &rpc, option.hard_ttl()).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        self.raft_call(Rpc::InstallSnapshot, &rpc, option.hard_ttl()).await
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

    #[test]
    fn backoff_doubles_from_10_ms_up_to_the_cap() {
        let ms: Vec<u128> = backoff_delays().take(8).map(|d| d.as_millis()).collect();
        assert_eq!(ms, [10, 20, 40, 80, 100, 100, 100, 100]);
    }

    #[tokio::test]
    async fn a_peer_that_drops_connections_is_unreachable_and_one_that_is_silent_is_not() {
        let option = || RPCOption::new(Duration::from_millis(500));
        // Dropped at once: openraft should back off, not retry at once.
        let mut dropping = PeerConnection { net: Network::default(), target: 2, addr: peer(drop) };
        let err = dropping.append_entries(heartbeat(), option()).await.expect_err("nothing answers");
        assert!(matches!(err, RPCError::Unreachable(_)), "{err:?}");
        // Held open without a word: the call times out, which says nothing
        // of whether the peer can be reached.
        let silent = |conn: std::net::TcpStream| {
            std::thread::sleep(Duration::from_secs(2));
            drop(conn);
        };
        let mut silent = PeerConnection { net: Network::default(), target: 3, addr: peer(silent) };
        let err = silent.append_entries(heartbeat(), option()).await.expect_err("nothing answers");
        assert!(matches!(err, RPCError::Network(_)), "{err:?}");
    }
}
