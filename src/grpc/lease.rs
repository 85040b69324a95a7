//! The Lease service: Grant, Revoke, KeepAlive (a stream), TimeToLive and
//! Leases. Deadlines live on the leader (see [`crate::lease`]); a member that
//! is not the leader passes keep-alives and time-to-live queries to it.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::error::Error;
use crate::node::Member;
use crate::proto::etcdserverpb::lease_server::Lease;
use crate::proto::etcdserverpb::{
    LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse, LeaseLeasesRequest,
    LeaseLeasesResponse, LeaseRevokeRequest, LeaseRevokeResponse, LeaseStatus, LeaseTimeToLiveRequest,
    LeaseTimeToLiveResponse,
};

/// Keep-alives of one stream renewed at once; past this, the stream's next
/// keep-alive waits for the oldest to be answered.
pub const KEEP_ALIVES_IN_FLIGHT: usize = 1024;

/// The Lease service of one member.
pub struct LeaseService {
    member: Arc<Member>,
}

impl LeaseService {
    /// A service for `member`.
    pub fn new(member: Arc<Member>) -> Self {
        LeaseService { member }
    }
}

#[tonic::async_trait]
impl Lease for LeaseService {
    async fn lease_grant(&self, req: Request<LeaseGrantRequest>) -> Result<Response<LeaseGrantResponse>, Status> {
        Ok(Response::new(self.member.lease_grant(req.into_inner()).await?))
    }

    async fn lease_revoke(&self, req: Request<LeaseRevokeRequest>) -> Result<Response<LeaseRevokeResponse>, Status> {
        Ok(Response::new(self.member.lease_revoke(req.into_inner().id).await?))
    }

    type LeaseKeepAliveStream = Pin<Box<dyn Stream<Item = Result<LeaseKeepAliveResponse, Status>> + Send + 'static>>;

    async fn lease_keep_alive(
        &self,
        req: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        Ok(Response::new(Box::pin(self.keep_alive(req.into_inner()))))
    }
    async fn lease_time_to_live(
        &self,
        req: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        let req = req.into_inner();
        Ok(Response::new(self.member.lease_time_to_live(req.id, req.keys).await?))
    }

    async fn lease_leases(&self, _req: Request<LeaseLeasesRequest>) -> Result<Response<LeaseLeasesResponse>, Status> {
        self.member.read_barrier().await?;
        let leases = {
            let state = self.member.state.read();
            state.store.leases().keys().map(|id| LeaseStatus { id: *id }).collect()
        };
        let mut resp = LeaseLeasesResponse { header: None, leases };
        self.member.fill_header(&mut resp.header);
        Ok(Response::new(resp))
    }
}

impl LeaseService {
    /// Renews each lease of `inbound` (a gRPC stream, or the JSON objects of
    /// a gateway request) and answers on the stream returned, in order; it
    /// ends with `inbound`, once every keep-alive taken is answered, or with
    /// an error when the leader cannot be reached. Up to
    /// [`KEEP_ALIVES_IN_FLIGHT`] keep-alives of a stream are renewed at
    /// once, so that a client keeping many leases alive on one stream has
    /// them renewed together (see [`crate::node::lease::Renewals`]).
    pub fn keep_alive<S>(&self, mut inbound: S) -> ReceiverStream<Result<LeaseKeepAliveResponse, Status>>
    where
        S: Stream<Item = Result<LeaseKeepAliveRequest, Status>> + Send + Unpin + 'static,
    {
        use futures::stream::FuturesOrdered;
        use futures::StreamExt;
        let (tx, rx) = mpsc::channel(16);
        let member = self.member.clone();
        tokio::spawn(async move {
            let mut renewing = FuturesOrdered::new();
            let mut open = true;
            while open || !renewing.is_empty() {
                tokio::select! {
                    msg = inbound.next(), if open && renewing.len() < KEEP_ALIVES_IN_FLIGHT => match msg {
                        Some(Ok(req)) => {
                            let member = member.clone();
                            renewing.push_back(async move { (req.id, member.lease_renew(req.id).await) });
                        }
                        Some(Err(status)) => {
                            let _ = tx.send(Err(status)).await;
                            return;
                        }
                        None => open = false,
                    },
                    Some((id, renewed)) = renewing.next(), if !renewing.is_empty() => {
                        // An unknown or expired lease answers TTL 0, as etcd
                        // does; a failure to reach the leader ends the stream
                        // with the error, so the client retries elsewhere.
                        let resp = match renewed {
                            Ok(ttl) => {
                                let mut resp = LeaseKeepAliveResponse { header: None, id, ttl };
                                member.fill_header(&mut resp.header);
                                Ok(resp)
                            }
                            Err(e) => Err(Status::from(e)),
                        };
                        let failed = resp.is_err();
                        if tx.send(resp).await.is_err() || failed {
                            return;
                        }
                    }
                    _ = tx.closed() => return,
                    _ = member.stopped() => {
                        let _ = tx.send(Err(Error::Stopped.into())).await;
                        return;
                    }
                }
            }
        });
        ReceiverStream::new(rx)
    }
}
