//! The server side of the peer API: hands Raft RPCs to openraft, and serves
//! the proposals and read-index requests that followers forward.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{AppendEntriesRequest, VoteRequest};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};

use crate::node::peer::ProbeRequest;
use crate::node::Member;
use crate::proto::kvdpb::peer_server::Peer;
use crate::proto::kvdpb::RaftPayload;
use crate::raft::leader::{encode_answer, Proposal};
use crate::raft::network::{CLUSTER_HEADER, FROM_HEADER, STARTING, TO_HEADER};
use crate::raft::snapshot_chunk::decode_chunk;
use crate::raft::{decode, encode, NodeId, TypeConfig};

/// Names the peer port in the answer to a call it does not serve (an etcd
/// client pointed at it by mistake), which the gRPC router gives with no
/// message.
pub fn name_unimplemented(mut resp: http::Response<tonic::body::Body>) -> http::Response<tonic::body::Body> {
    let headers = resp.headers_mut();
    if headers.get("grpc-status").is_some_and(|s| s == "12") && headers.get("grpc-message").is_none() {
        headers.insert(
            "grpc-message",
            http::HeaderValue::from_static(
                "this%20is%20a%20kvd%20peer%20port;%20clients%20connect%20to%20a%20client%20port%20(--advertise-client-urls)",
            ),
        );
    }
    resp
}

/// The peer gRPC service of one member.
///
/// Every request but a probe must say who sends it (see
/// [`crate::raft::network::CLUSTER_HEADER`]): this member's cluster, this
/// member as receiver, and a sender that is a member (of the membership this
/// member knows, or of `--initial-cluster` before it knows one). Raft
/// messages must also come from the member whose vote they carry. Anything
/// else is refused before openraft or the node sees it, and logged once a
/// minute per sender and reason.
#[derive(Clone)]
pub struct PeerService {
    member: Arc<Member>,
    /// False while the member, started on an empty data directory, asks the
    /// others whether they know it: until then it takes no part in Raft
    /// (it could otherwise vote with a vote it has forgotten) and answers
    /// only probes.
    open: watch::Receiver<bool>,
    /// The members of `--initial-cluster`.
    initial: Vec<NodeId>,
    /// When each refusal was last logged, by sender and reason.
    logged: Arc<Mutex<HashMap<String, Instant>>>,
    /// `--peer-cert-allowed-cn`: the only common name a peer certificate may have.
    allowed_cn: Option<String>,
}

/// How long a Raft request waits for a starting member to be let in.
const READY_WAIT: Duration = Duration::from_secs(3);

/// How often the same refusal of the same sender is logged.
const LOG_EVERY: Duration = Duration::from_secs(60);

impl PeerService {
    /// A service for `member`, serving Raft once `open` is true.
    pub fn new(
        member: Arc<Member>,
        open: watch::Receiver<bool>,
        initial: Vec<NodeId>,
        allowed_cn: Option<String>,
    ) -> Self {
        PeerService { member, open, initial, logged: Default::default(), allowed_cn }
    }

    /// Waits, a little, until the member has been let in: the members of a
    /// new cluster finish asking each other at slightly different times, and
    /// the first to finish campaigns at once.
    async fn ready(&self) -> Result<(), Status> {
        if *self.open.borrow() {
            return Ok(());
        }
        let mut open = self.open.clone();
        let opened = tokio::time::timeout(READY_WAIT, open.wait_for(|o| *o)).await.is_ok_and(|r| r.is_ok());
        if opened {
            Ok(())
        } else {
            Err(Status::unavailable(STARTING))
        }
    }

    /// The sender of `req`, if it may talk to this member.
    async fn sender<T>(&self, req: &Request<T>) -> Result<NodeId, Status> {
        let md = req.metadata();
        let header = |name: &str| -> Option<u64> {
            md.get(name).and_then(|v| v.to_str().ok()).and_then(|v| u64::from_str_radix(v, 16).ok())
        };
        // By IP alone: a stranger's every connection comes from a new port.
        let peer = req.remote_addr().map_or_else(|| "an unknown address".to_string(), |a| a.ip().to_string());
        if let Some(allowed) = &self.allowed_cn {
            let cn = req.peer_certs().and_then(|certs| certs.first().and_then(|c| crate::tls::common_name(c)));
            if cn.as_deref() != Some(allowed.as_str()) {
                return Err(self.refuse(
                    &peer,
                    "cn",
                    &format!("peer certificate common name {cn:?} is not the allowed {allowed:?}"),
                ));
            }
        }
        let (Some(cluster), Some(from), Some(to)) = (header(CLUSTER_HEADER), header(FROM_HEADER), header(TO_HEADER))
        else {
            return Err(self.refuse(&peer, "unidentified", "request without member identity: not from a kvd member"));
        };
        let who = format!("member {from:x} at {peer}");
        if cluster != self.member.cluster_id {
            return Err(self.refuse(
                &who,
                "cluster",
                &format!("request cluster ID mismatch: the request is for cluster {cluster:x}, this member belongs to cluster {:x}", self.member.cluster_id),
            ));
        }
        if to != self.member.id {
            return Err(self.refuse(
                &who,
                "receiver",
                &format!("member ID mismatch: the request is for member {to:x}, this is member {:x}", self.member.id),
            ));
        }
        self.still_member(from, &who).await?;
        Ok(from)
    }

    /// Refuses `from` unless it is a member, by this member's configuration
    /// or a member's word.
    async fn still_member(&self, from: NodeId, who: &str) -> Result<(), Status> {
        let known = {
            let metrics = self.member.raft.metrics();
            let membership = &metrics.borrow().membership_config;
            let mut nodes = membership.nodes().peekable();
            if nodes.peek().is_none() {
                self.initial.contains(&from)
            } else {
                membership.nodes().any(|(id, _)| *id == from)
            }
        };
        if !known && !self.member.vouched_for(from).await {
            return Err(self.refuse(who, "member", &format!("member {from:x} is not a member of this cluster")));
        }
        Ok(())
    }

    /// A refusal with `why`, logged unless the same was logged for `who`
    /// within [`LOG_EVERY`].
    fn refuse(&self, who: &str, reason: &str, why: &str) -> Status {
        let key = format!("{who}/{reason}");
        let mut logged = self.logged.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if logged.get(&key).is_none_or(|t| now.duration_since(*t) >= LOG_EVERY) {
            if logged.len() > 1024 {
                logged.retain(|_, t| now.duration_since(*t) < LOG_EVERY);
            }
            logged.insert(key, now);
            tracing::warn!("refused a peer request from {who}: {why}");
        }
        Status::failed_precondition(why.to_string())
    }

    /// Answers each message of a stream a member opened on its clients'
    /// behalf with `answer` (of this member, the sender and the message's
    /// bytes), in turn. The sender is checked when the stream opens and
    /// again for each message, so a member removed meanwhile gets nothing
    /// more on it. Ends when the sender closes the stream, on a message that
    /// cannot be read, or when this member stops.
    async fn answer_each<F, A>(
        &self,
        req: Request<Streaming<RaftPayload>>,
        answer: F,
    ) -> Result<Response<AnswerStream>, Status>
    where
        F: Fn(Arc<Member>, NodeId, Vec<u8>) -> A + Clone + Send + 'static,
        A: std::future::Future<Output = Result<Vec<u8>, Status>> + Send,
    {
        self.ready().await?;
        let from = self.sender(&req).await?;
        let who = format!("member {from:x}");
        let service = Arc::new(self.clone());
        let stopping = self.member.clone();
        let answers = req.into_inner().then(move |request| {
            let (service, who, answer) = (service.clone(), who.clone(), answer.clone());
            async move {
                let request = request?;
                service.still_member(from, &who).await?;
                let data = answer(service.member.clone(), from, request.data).await?;
                Ok(RaftPayload { data })
            }
        });
        let until_stop = async move { stopping.stopped().await };
        Ok(Response::new(Box::pin(answers.take_until(until_stop))))
    }

    /// Checks that a Raft message from `from` carries `from`'s own vote.
    fn own_vote(&self, from: NodeId, vote: &openraft::Vote<NodeId>) -> Result<(), Status> {
        match vote.leader_id().voted_for() {
            Some(id) if id == from => Ok(()),
            other => Err(self.refuse(
                &format!("member {from:x}"),
                "vote",
                &format!("member {from:x} sent a Raft message with the vote of {other:x?}"),
            )),
        }
    }
}

fn input<T: DeserializeOwned>(req: Request<RaftPayload>) -> Result<T, Status> {
    Ok(decode(&req.into_inner().data)?)
}

fn output<T, E>(res: Result<T, RaftError<NodeId, E>>) -> Result<Response<RaftPayload>, Status>
where
    T: Serialize,
    E: Serialize + std::error::Error,
{
    let data = encode(&res)?;
    Ok(Response::new(RaftPayload { data }))
}

/// Answers to a stream of requests, in order.
type AnswerStream = Pin<Box<dyn Stream<Item = Result<RaftPayload, Status>> + Send>>;

/// Proposes each of the forwarded writes in `list` (an encoded list of
/// proposals) and answers the list of their outcomes, in order.
async fn serve_forwarded(member: &Member, from: NodeId, list: &[u8]) -> Result<Vec<u8>, Status> {
    let list: Vec<Proposal> = decode(list)?;
    let answers = futures::future::join_all(list.into_iter().map(|p| member.serve_forward(from, p))).await;
    Ok(encode(&answers)?)
}

#[tonic::async_trait]
impl Peer for PeerService {
    type AppendEntriesStreamStream = AnswerStream;
    type ForwardStreamStream = AnswerStream;
    type ReadIndexStreamStream = AnswerStream;
    type LeaseRenewalsStreamStream = AnswerStream;

    /// Hands each request to openraft in turn and answers it before taking
    /// the next. Ends when the leader closes the stream, on a request that
    /// cannot be read, or when this member stops.
    async fn append_entries_stream(
        &self,
        req: Request<Streaming<RaftPayload>>,
    ) -> Result<Response<AnswerStream>, Status> {
        self.ready().await?;
        let from = self.sender(&req).await?;
        let member = self.member.clone();
        let stopping = self.member.clone();
        let answers = req.into_inner().then(move |request| {
            let member = member.clone();
            async move {
                let rpc: AppendEntriesRequest<TypeConfig> = decode(&request?.data)?;
                if rpc.vote.leader_id().voted_for() != Some(from) {
                    return Err(Status::failed_precondition(format!(
                        "member {from:x} sent entries with the vote of another member"
                    )));
                }
                let res: Result<_, RaftError<NodeId>> = member.serve_append_entries(rpc).await;
                let data = encode(&res)?;
                Ok(RaftPayload { data })
            }
        });
        let until_stop = async move { stopping.stopped().await };
        Ok(Response::new(Box::pin(answers.take_until(until_stop))))
    }

    async fn append_entries(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        self.ready().await?;
        let from = self.sender(&req).await?;
        let rpc: AppendEntriesRequest<TypeConfig> = input(req)?;
        self.own_vote(from, &rpc.vote)?;
        output(self.member.serve_append_entries(rpc).await)
    }

    async fn vote(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        self.ready().await?;
        let from = self.sender(&req).await?;
        let rpc: VoteRequest<NodeId> = input(req)?;
        self.own_vote(from, &rpc.vote)?;
        output(self.member.raft.vote(rpc).await)
    }

    async fn install_snapshot(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        self.ready().await?;
        let from = self.sender(&req).await?;
        let rpc = decode_chunk(&req.into_inner().data)?;
        self.own_vote(from, &rpc.vote)?;
        // openraft sends a member no heartbeats while a snapshot is sent to
        // it, and the last chunk's answer waits for the whole install; a
        // member that heard nothing for an election timeout would campaign,
        // and the leader, seeing its higher term, would step down and begin
        // the snapshot again, without end. So each chunk, and every
        // heartbeat interval while it is handled, counts as word from the
        // leader: an empty AppendEntries of the leader's vote, which checks
        // and touches the vote and changes no log.
        let raft = &self.member.raft;
        let heard = openraft::raft::AppendEntriesRequest::<TypeConfig> {
            vote: rpc.vote,
            prev_log_id: None,
            entries: Vec::new(),
            leader_commit: None,
        };
        let every = std::time::Duration::from_millis(raft.config().heartbeat_interval.max(1));
        let _ = raft.append_entries(heard.clone()).await;
        let keep_alive = async {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            loop {
                tick.tick().await;
                let _ = raft.append_entries(heard.clone()).await;
            }
        };
        let res: Result<_, RaftError<NodeId, InstallSnapshotError>> = tokio::select! {
            res = raft.install_snapshot(rpc) => res,
            never = keep_alive => never,
        };
        output(res)
    }

    async fn forward(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        self.ready().await?;
        let from = self.sender(&req).await?;
        let answer = self.member.serve_forward(from, input(req)?).await;
        Ok(Response::new(RaftPayload { data: encode_answer(&answer) }))
    }

    async fn forward_batch(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        self.ready().await?;
        let from = self.sender(&req).await?;
        let data = serve_forwarded(&self.member, from, &req.into_inner().data).await?;
        Ok(Response::new(RaftPayload { data }))
    }

    /// Answers each message in turn, as [`PeerService::forward_batch`]
    /// would (see [`PeerService::answer_each`]).
    async fn forward_stream(&self, req: Request<Streaming<RaftPayload>>) -> Result<Response<AnswerStream>, Status> {
        self.answer_each(req, |member, from, data| async move { serve_forwarded(&member, from, &data).await }).await
    }

    async fn lease(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        self.ready().await?;
        self.sender(&req).await?;
        let answer = self.member.serve_lease(input(req)?).await;
        Ok(Response::new(RaftPayload { data: encode_answer(&answer) }))
    }

    async fn lease_renewals(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        self.ready().await?;
        self.sender(&req).await?;
        let ids: Vec<i64> = input(req)?;
        let answer = self.member.serve_renewals(&ids).await;
        Ok(Response::new(RaftPayload { data: encode_answer(&answer) }))
    }

    /// Answers each message in turn, as [`PeerService::lease_renewals`]
    /// would (see [`PeerService::answer_each`]).
    async fn lease_renewals_stream(
        &self,
        req: Request<Streaming<RaftPayload>>,
    ) -> Result<Response<AnswerStream>, Status> {
        self.answer_each(req, |member, _, data| async move {
            let ids: Vec<i64> = decode(&data)?;
            Ok(encode_answer(&member.serve_renewals(&ids).await))
        })
        .await
    }

    async fn read_index(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        self.ready().await?;
        self.sender(&req).await?;
        let answer = self.member.serve_read_index().await;
        Ok(Response::new(RaftPayload { data: encode_answer(&answer) }))
    }

    /// Answers each message with a read index, as
    /// [`PeerService::read_index`] would, before reading the next (see
    /// [`PeerService::answer_each`]).
    async fn read_index_stream(&self, req: Request<Streaming<RaftPayload>>) -> Result<Response<AnswerStream>, Status> {
        self.answer_each(req, |member, _, _| async move { Ok(encode_answer(&member.serve_read_index().await)) }).await
    }

    async fn membership(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        self.ready().await?;
        self.sender(&req).await?;
        let answer = self.member.serve_membership(input(req)?).await;
        Ok(Response::new(RaftPayload { data: encode_answer(&answer) }))
    }

    async fn campaign(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        self.ready().await?;
        let from = self.sender(&req).await?;
        let answer = self.member.serve_campaign(from).await;
        Ok(Response::new(RaftPayload { data: encode_answer(&answer) }))
    }

    async fn probe(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let probe: ProbeRequest = input(req)?;
        let data = encode(&self.member.serve_probe(&probe))?;
        Ok(Response::new(RaftPayload { data }))
    }
}
