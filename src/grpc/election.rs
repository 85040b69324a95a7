//! The Election service (etcd's v3electionpb). The leader of an election is
//! its candidate with the lowest create revision (see
//! [`crate::node::coordination`]); its key-value carries the proclaimed value.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::mvcc::keys::{prefix_end, RangeEnd};
use crate::node::coordination::{candidate_key, candidates_prefix, Abandon};
use crate::node::Member;
use crate::proto::etcdserverpb::ResponseHeader;
use crate::proto::mvccpb::event::EventType;
use crate::proto::mvccpb::KeyValue;
use crate::proto::v3electionpb::election_server::Election;
use crate::proto::v3electionpb::{
    CampaignRequest, CampaignResponse, LeaderKey, LeaderRequest, LeaderResponse, ProclaimRequest, ProclaimResponse,
    ResignRequest, ResignResponse,
};

/// The Election service of one member.
pub struct ElectionService {
    member: Arc<Member>,
}

impl ElectionService {
    /// A service for `member`.
    pub fn new(member: Arc<Member>) -> Self {
        ElectionService { member }
    }

    fn header(&self, revision: i64) -> Option<ResponseHeader> {
        let mut header = Some(ResponseHeader { revision, ..Default::default() });
        self.member.fill_header(&mut header);
        header
    }
}

fn missing_leader_key() -> Status {
    Error::LeaderKeyMissing.into()
}

#[tonic::async_trait]
impl Election for ElectionService {
    async fn campaign(&self, req: Request<CampaignRequest>) -> Result<Response<CampaignResponse>, Status> {
        let req = req.into_inner();
        let key = candidate_key(&req.name, req.lease);
        let claim = self.member.claim(&key, &req.value, req.lease).await?;
        let rev = claim.kv.create_revision;
        let guard = Abandon::new(self.member.clone(), &key, rev, claim.created);
        if !claim.created && claim.kv.value != req.value {
            // The same lease campaigns again with another value: as etcd,
            // take the new value rather than failing.
            if !self.member.put_if_created_at(&key, rev, &req.value, req.lease).await? {
                return Err(Error::SessionExpired.into());
            }
        }
        self.member.wait_turn(&candidates_prefix(&req.name), &key, rev).await?;
        guard.disarm();
        let leader = LeaderKey { name: req.name, key, rev, lease: req.lease };
        Ok(Response::new(CampaignResponse { header: self.header(claim.revision), leader: Some(leader) }))
    }

    async fn proclaim(&self, req: Request<ProclaimRequest>) -> Result<Response<ProclaimResponse>, Status> {
        let req = req.into_inner();
        let leader = req.leader.ok_or_else(missing_leader_key)?;
        if !self.member.put_if_created_at(&leader.key, leader.rev, &req.value, leader.lease).await? {
            return Err(Error::ElectionNotLeader.into());
        }
        Ok(Response::new(ProclaimResponse { header: self.header(0) }))
    }

    async fn leader(&self, req: Request<LeaderRequest>) -> Result<Response<LeaderResponse>, Status> {
        let name = req.into_inner().name;
        self.member.read_barrier().await?;
        // Reading who leads needs READ on the election's keys, as in etcd.
        let prefix = candidates_prefix(&name);
        self.member.authorize_read(&prefix, &crate::mvcc::keys::prefix_end(&prefix))?;
        let kv = self.member.first_candidate(&prefix)?.ok_or(Error::ElectionNoLeader)?;
        Ok(Response::new(LeaderResponse { header: self.header(0), kv: Some(kv) }))
    }

    type ObserveStream = Pin<Box<dyn Stream<Item = Result<LeaderResponse, Status>> + Send + 'static>>;

    async fn observe(&self, req: Request<LeaderRequest>) -> Result<Response<Self::ObserveStream>, Status> {
        let name = req.into_inner().name;
        self.member.read_barrier().await?;
        let prefix = candidates_prefix(&name);
        self.member.authorize_read(&prefix, &crate::mvcc::keys::prefix_end(&prefix))?;
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(observe(self.member.clone(), prefix, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn resign(&self, req: Request<ResignRequest>) -> Result<Response<ResignResponse>, Status> {
        let leader = req.into_inner().leader.ok_or_else(missing_leader_key)?;
        let resp = self.member.delete_if_created_at(&leader.key, leader.rev).await?;
        Ok(Response::new(ResignResponse { header: self.header(resp.header.map_or(0, |h| h.revision)) }))
    }
}

/// Streams the election's leader each time it changes (a new leader, or a new
/// value from the same one), revision by revision, until the client leaves.
async fn observe(member: Arc<Member>, prefix: Vec<u8>, tx: mpsc::Sender<Result<LeaderResponse, Status>>) {
    let end = RangeEnd::Before(prefix_end(&prefix));
    let mut last_sent: Option<(Vec<u8>, i64)> = None;
    'resync: loop {
        // The candidates as of the subscription; then kept up to date from
        // each applied revision, so no leader in between is missed.
        let (mut rx, current) = member.state.subscribe();
        let loaded = {
            let state = member.state.read();
            state.store.current_kvs(&prefix, &end)
        };
        let mut candidates: BTreeMap<i64, KeyValue> = match loaded {
            Ok(kvs) => kvs.into_iter().map(|kv| (kv.create_revision, kv)).collect(),
            Err(e) => {
                let _ = tx.send(Err(e.into())).await;
                return;
            }
        };
        let mut rev = current;
        loop {
            if let Some(leader) = candidates.values().next() {
                let id = (leader.key.clone(), leader.mod_revision);
                if last_sent.as_ref() != Some(&id) {
                    let mut header = Some(ResponseHeader { revision: rev, ..Default::default() });
                    member.fill_header(&mut header);
                    if tx.send(Ok(LeaderResponse { header, kv: Some(leader.clone()) })).await.is_err() {
                        return;
                    }
                    last_sent = Some(id);
                }
            }
            let applied = tokio::select! {
                item = rx.recv() => item,
                _ = tx.closed() => return,
                _ = member.stopped() => {
                    let _ = tx.send(Err(Error::Stopped.into())).await;
                    return;
                }
            };
            match applied {
                Ok(applied) if applied.events.is_empty() => continue 'resync,
                Ok(applied) => {
                    rev = applied.rev;
                    for e in &applied.events {
                        let Some(kv) = &e.kv else { continue };
                        if !end.contains(&prefix, &kv.key) {
                            continue;
                        }
                        if e.r#type == EventType::Delete as i32 {
                            candidates.retain(|_, c| c.key != kv.key);
                        } else {
                            candidates.insert(kv.create_revision, kv.clone());
                        }
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => continue 'resync,
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }
}
