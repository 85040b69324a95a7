//! The server side of the peer API: hands Raft RPCs to openraft, and serves
//! the proposals and read-index requests that followers forward.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use openraft::error::{InstallSnapshotError, RaftError};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};

use crate::node::peer::ProbeRequest;
use crate::node::Member;
use crate::proto::kvdpb::peer_server::Peer;
use crate::proto::kvdpb::RaftPayload;
use crate::raft::leader::{encode_answer, Proposal};
use crate::raft::{decode, encode, NodeId};

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
pub struct PeerService {
    member: Arc<Member>,
    /// False while the member, started on an empty data directory, asks the
    /// others whether they know it: until then it takes no part in Raft
    /// (it could otherwise vote with a vote it has forgotten) and answers
    /// only probes.
    open: watch::Receiver<bool>,
}

impl PeerService {
    /// A service for `member`, serving Raft once `open` is true.
    pub fn new(member: Arc<Member>, open: watch::Receiver<bool>) -> Self {
        PeerService { member, open }
    }

    fn ready(&self) -> Result<(), Status> {
        if *self.open.borrow() {
            Ok(())
        } else {
            Err(Status::unavailable("member is starting: it is checking with the others that it may join"))
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

/// Answers to a stream of AppendEntries, in order.
type AppendAnswers = Pin<Box<dyn Stream<Item = Result<RaftPayload, Status>> + Send>>;

#[tonic::async_trait]
impl Peer for PeerService {
    type AppendEntriesStreamStream = AppendAnswers;

    /// Hands each request to openraft in turn and answers it before taking
    /// the next. Ends when the leader closes the stream, on a request that
    /// cannot be read, or when this member stops.
    async fn append_entries_stream(
        &self,
        req: Request<Streaming<RaftPayload>>,
    ) -> Result<Response<AppendAnswers>, Status> {
        self.ready()?;
        let member = self.member.clone();
        let stopping = self.member.clone();
        let answers = req.into_inner().then(move |request| {
            let member = member.clone();
            async move {
                let rpc = decode(&request?.data)?;
                let res: Result<_, RaftError<NodeId>> = member.raft.append_entries(rpc).await;
                let data = encode(&res)?;
                Ok(RaftPayload { data })
            }
        });
        let until_stop = async move { stopping.stopped().await };
        Ok(Response::new(Box::pin(answers.take_until(until_stop))))
    }

    async fn append_entries(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        self.ready()?;
        output(self.member.raft.append_entries(input(req)?).await)
    }

    async fn vote(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        self.ready()?;
        output(self.member.raft.vote(input(req)?).await)
    }

    async fn install_snapshot(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        self.ready()?;
        let res: Result<_, RaftError<NodeId, InstallSnapshotError>> =
            self.member.raft.install_snapshot(input(req)?).await;
        output(res)
    }

    async fn forward(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        self.ready()?;
        let answer = self.member.serve_forward(input(req)?).await;
        Ok(Response::new(RaftPayload { data: encode_answer(&answer) }))
    }

    async fn forward_batch(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        self.ready()?;
        let list: Vec<Proposal> = input(req)?;
        let answers = futures::future::join_all(list.into_iter().map(|p| self.member.serve_forward(p))).await;
        let data = encode(&answers)?;
        Ok(Response::new(RaftPayload { data }))
    }

    async fn lease(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        self.ready()?;
        let answer = self.member.serve_lease(input(req)?).await;
        Ok(Response::new(RaftPayload { data: encode_answer(&answer) }))
    }

    async fn read_index(&self, _req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        self.ready()?;
        let answer = self.member.serve_read_index().await;
        Ok(Response::new(RaftPayload { data: encode_answer(&answer) }))
    }

    async fn probe(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let probe: ProbeRequest = input(req)?;
        let data = encode(&self.member.serve_probe(&probe))?;
        Ok(Response::new(RaftPayload { data }))
    }
}
