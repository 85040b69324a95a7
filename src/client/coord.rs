//! Coordination for Rust services: watches that resume after a reconnect,
//! leases kept alive in the background (with a signal when they are lost),
//! locks and leader elections with fencing tokens.
//!
//! ```no_run
//! # async fn demo() -> Result<(), tonic::Status> {
//! use std::time::Duration;
//! use kvd::client::Client;
//! let client = Client::new(&["127.0.0.1:2379".into()], Duration::from_secs(2)).map_err(tonic::Status::unavailable)?;
//! let session = client.session(10).await?;           // a lease, kept alive
//! let election = client.election("service/leader", &session);
//! let leadership = election.campaign(b"replica-1").await?;
//! println!("leading with fencing token {}", leadership.rev());
//! session.lost().await;                               // the lease could not be kept
//! # Ok(()) }
//! ```

use std::time::{Duration, Instant};

use super::Conn;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use super::Client;
use crate::proto::etcdserverpb::lease_client::LeaseClient;
use crate::proto::etcdserverpb::watch_client::WatchClient;
use crate::proto::etcdserverpb::watch_request::RequestUnion;
use crate::proto::etcdserverpb::*;
use crate::proto::mvccpb::Event;
use crate::proto::v3electionpb::election_client::ElectionClient;
use crate::proto::v3electionpb::{
    CampaignRequest, LeaderKey, LeaderRequest, LeaderResponse, ProclaimRequest, ResignRequest,
};
use crate::proto::v3lockpb::lock_client::LockClient;
use crate::proto::v3lockpb::{LockRequest, UnlockRequest};

impl Client {
    fn channel_at(&self, i: usize) -> Conn {
        self.conn(i % self.channels.len())
    }

    fn current_index(&self) -> usize {
        self.current.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// LeaseGrant: a lease of `ttl` seconds (`id` 0: the server picks one).
    pub async fn lease_grant(&self, ttl: i64, id: i64) -> Result<LeaseGrantResponse, Status> {
        self.call(|ch| async move { LeaseClient::new(ch).lease_grant(LeaseGrantRequest { ttl, id }).await }).await
    }

    /// LeaseRevoke.
    pub async fn lease_revoke(&self, id: i64) -> Result<LeaseRevokeResponse, Status> {
        self.call(|ch| async move { LeaseClient::new(ch).lease_revoke(LeaseRevokeRequest { id }).await }).await
    }

    /// LeaseTimeToLive.
    pub async fn lease_time_to_live(&self, id: i64, keys: bool) -> Result<LeaseTimeToLiveResponse, Status> {
        self.read_call(|ch| async move {
            LeaseClient::new(ch).lease_time_to_live(LeaseTimeToLiveRequest { id, keys }).await
        })
        .await
    }

    /// LeaseLeases.
    pub async fn lease_leases(&self) -> Result<LeaseLeasesResponse, Status> {
        self.read_call(|ch| async move { LeaseClient::new(ch).lease_leases(LeaseLeasesRequest {}).await }).await
    }

    /// One keep-alive; returns the TTL the lease was extended by (0: the
    /// lease does not exist any more).
    pub async fn lease_keep_alive_once(&self, id: i64) -> Result<i64, Status> {
        self.call(|ch| async move {
            let (tx, rx) = mpsc::channel(1);
            let _ = tx.send(LeaseKeepAliveRequest { id }).await;
            let mut stream = LeaseClient::new(ch).lease_keep_alive(ReceiverStream::new(rx)).await?.into_inner();
            match stream.message().await? {
                Some(resp) => Ok(tonic::Response::new(resp.ttl)),
                None => Err(Status::unavailable("keep-alive stream closed")),
            }
        })
        .await
    }

    /// Grants a lease of `ttl` seconds and keeps it alive in the background
    /// until the session is dropped or closed.
    pub async fn session(&self, ttl: i64) -> Result<Session, Status> {
        let granted = self.lease_grant(ttl, 0).await?;
        Ok(Session::start(self, granted.id, granted.ttl))
    }

    /// Watches `req`'s keys. The stream survives the loss of its endpoint: it
    /// reconnects (to the next endpoint if need be) and resumes after the
    /// last revision it delivered, so no event is lost or repeated.
    pub async fn watch(&self, req: WatchCreateRequest) -> Result<WatchStream, Status> {
        self.token_ready().await?;
        let start = self.current_index();
        let mut last_err = None;
        for i in 0..self.channels.len() {
            match self.open_watch(self.channel_at(start + i), req.clone()).await {
                Ok((sender, stream, created)) => {
                    let (tx, rx) = mpsc::channel(64);
                    let channels = (0..self.channels.len()).map(|j| self.channel_at(start + i + j)).collect();
                    let client = self.clone_handle();
                    let resumer = Resumer { client, channels, req, next_rev: 0, _requests: sender, stream, tx };
                    let task = tokio::spawn(resumer.run(created));
                    return Ok(WatchStream { rx, task });
                }
                Err(s) if super::retryable(&s) => last_err = Some(s),
                Err(s) => return Err(s),
            }
        }
        Err(last_err.unwrap_or_else(|| Status::unavailable("no endpoint answered")))
    }

    /// A lock on `name` held with `session`'s lease.
    pub fn lock_handle(&self, name: &str, session: &Session) -> Lock {
        Lock { client: self.clone_handle(), name: name.as_bytes().to_vec(), lease: session.id() }
    }

    /// The election `name`, campaigning with `session`'s lease.
    pub fn election(&self, name: &str, session: &Session) -> Election {
        Election { client: self.clone_handle(), name: name.as_bytes().to_vec(), lease: session.id() }
    }

    /// Lock (etcd's v3lock service): waits until `name` is held by `lease`;
    /// returns the key that holds it.
    pub async fn lock(&self, name: &[u8], lease: i64) -> Result<crate::proto::v3lockpb::LockResponse, Status> {
        // Not retried on another endpoint: the first may already hold a key.
        let ch = self.channel_at(self.current_index());
        LockClient::new(ch).lock(LockRequest { name: name.to_vec(), lease }).await.map(|r| r.into_inner())
    }

    /// Unlock: releases the lock held by `key`.
    pub async fn unlock(&self, key: &[u8]) -> Result<(), Status> {
        self.call(|ch| async move { LockClient::new(ch).unlock(UnlockRequest { key: key.to_vec() }).await }).await?;
        Ok(())
    }

    /// The current leader of election `name`.
    pub async fn leader(&self, name: &[u8]) -> Result<LeaderResponse, Status> {
        self.read_call(|ch| async move { ElectionClient::new(ch).leader(LeaderRequest { name: name.to_vec() }).await })
            .await
    }

    /// Each leader of election `name` as it changes.
    pub async fn observe(&self, name: &[u8]) -> Result<Streaming<LeaderResponse>, Status> {
        self.call(|ch| async move { ElectionClient::new(ch).observe(LeaderRequest { name: name.to_vec() }).await })
            .await
    }

    /// A second client over the same connections.
    pub fn clone_handle(&self) -> Client {
        Client {
            endpoints: self.endpoints.clone(),
            channels: self.channels.clone(),
            current: std::sync::atomic::AtomicUsize::new(self.current_index()),
            max_message_bytes: self.max_message_bytes,
            failures: Default::default(),
            tls: self.tls.clone(),
            token: self.token.clone(),
            credentials: self.credentials.clone(),
        }
    }
}

type WatchSender = mpsc::Sender<WatchRequest>;

impl Client {
    /// Opens a watch on `ch`. One refused for want of a fresh token (it
    /// lapsed, or the member restarted and forgot it) is opened again after
    /// the client authenticates, as its other calls are.
    async fn open_watch(
        &self,
        ch: Conn,
        create: WatchCreateRequest,
    ) -> Result<(WatchSender, Streaming<WatchResponse>, WatchResponse), Status> {
        let opened = open_watch(ch.clone(), create.clone()).await?;
        if self.credentials.is_some() && opened.2.canceled && super::refused_for_token(&opened.2.cancel_reason) {
            self.authenticate().await?;
            return open_watch(ch, create).await;
        }
        Ok(opened)
    }
}

async fn open_watch(
    ch: Conn,
    create: WatchCreateRequest,
) -> Result<(WatchSender, Streaming<WatchResponse>, WatchResponse), Status> {
    let (sender, rx) = mpsc::channel(4);
    let _ = sender.send(WatchRequest { request_union: Some(RequestUnion::CreateRequest(create)) }).await;
    let mut stream = WatchClient::new(ch).watch(ReceiverStream::new(rx)).await?.into_inner();
    let created = stream.message().await?.ok_or_else(|| Status::unavailable("watch stream closed"))?;
    Ok((sender, stream, created))
}

/// A watch's responses, in order. Dropping it cancels the watch.
pub struct WatchStream {
    rx: mpsc::Receiver<Result<WatchResponse, Status>>,
    task: JoinHandle<()>,
}

impl WatchStream {
    /// The next response: events of one or more whole revisions, a progress
    /// notification, or (last) the cancellation. `None` once it has ended.
    pub async fn next(&mut self) -> Option<Result<WatchResponse, Status>> {
        self.rx.recv().await
    }
}

impl Drop for WatchStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Resumer {
    /// Authenticates again when a member refuses the token.
    client: Client,
    channels: Vec<Conn>,
    req: WatchCreateRequest,
    /// The revision to resume from.
    next_rev: i64,
    /// Keeps the request stream (and so the watch) open.
    _requests: WatchSender,
    stream: Streaming<WatchResponse>,
    tx: mpsc::Sender<Result<WatchResponse, Status>>,
}

impl Resumer {
    async fn run(mut self, created: WatchResponse) {
        self.next_rev = if self.req.start_revision > 0 {
            self.req.start_revision
        } else {
            created.header.as_ref().map_or(0, |h| h.revision) + 1
        };
        if self.tx.send(Ok(created)).await.is_err() {
            return;
        }
        let mut endpoint = 0;
        loop {
            match self.stream.message().await {
                Ok(Some(resp)) => {
                    if let Some(last) = resp.events.last().and_then(|e: &Event| e.kv.as_ref()) {
                        if !resp.fragment {
                            self.next_rev = last.mod_revision + 1;
                        }
                    } else if resp.events.is_empty() && !resp.created && !resp.canceled {
                        // A progress notification: nothing is owed at or
                        // below its revision.
                        let rev = resp.header.as_ref().map_or(0, |h| h.revision);
                        self.next_rev = self.next_rev.max(rev + 1);
                    }
                    let end = resp.canceled;
                    if self.tx.send(Ok(resp)).await.is_err() || end {
                        return;
                    }
                }
                Ok(None) | Err(_) => {
                    // Reconnect, trying each endpoint in turn, and resume.
                    let mut req = self.req.clone();
                    req.start_revision = self.next_rev;
                    let mut backoff = Duration::from_millis(50);
                    loop {
                        if self.tx.is_closed() {
                            return;
                        }
                        endpoint = (endpoint + 1) % self.channels.len();
                        match self.client.open_watch(self.channels[endpoint].clone(), req.clone()).await {
                            Ok((sender, stream, created)) if !created.canceled => {
                                self._requests = sender;
                                self.stream = stream;
                                break;
                            }
                            Ok((_, _, created)) => {
                                let _ = self.tx.send(Ok(created)).await;
                                return;
                            }
                            Err(_) => {
                                tokio::time::sleep(backoff).await;
                                backoff = (backoff * 2).min(Duration::from_secs(1));
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Whether a session's lease is still held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// Held at least until this instant (the last acknowledged keep-alive's
    /// send time plus the TTL).
    Alive(Instant),
    /// Expired, revoked, or not renewed in time: whatever it guarded is gone.
    Lost,
}

/// A lease kept alive by a background task.
pub struct Session {
    id: i64,
    ttl: i64,
    state: watch::Receiver<LeaseState>,
    task: JoinHandle<()>,
}

impl Session {
    fn start(client: &Client, id: i64, ttl: i64) -> Session {
        let channels: Vec<Conn> =
            (0..client.channels.len()).map(|j| client.channel_at(client.current_index() + j)).collect();
        let granted = Instant::now();
        let (tx, state) = watch::channel(LeaseState::Alive(granted + Duration::from_secs(ttl.max(0) as u64)));
        let task = tokio::spawn(keep_alive(channels, id, ttl, tx));
        Session { id, ttl, state, task }
    }

    /// The lease id.
    pub fn id(&self) -> i64 {
        self.id
    }

    /// The TTL in seconds.
    pub fn ttl(&self) -> i64 {
        self.ttl
    }

    /// The lease's state now.
    pub fn state(&self) -> LeaseState {
        match *self.state.borrow() {
            LeaseState::Alive(until) if until > Instant::now() => LeaseState::Alive(until),
            _ => LeaseState::Lost,
        }
    }

    /// Resolves when the lease is lost.
    pub async fn lost(&self) {
        let mut rx = self.state.clone();
        loop {
            let until = match *rx.borrow_and_update() {
                LeaseState::Lost => return,
                LeaseState::Alive(until) => until,
            };
            tokio::select! {
                _ = tokio::time::sleep_until(until.into()) => {
                    if matches!(*rx.borrow(), LeaseState::Alive(u) if u <= Instant::now()) {
                        return;
                    }
                }
                changed = rx.changed() => if changed.is_err() { return },
            }
        }
    }

    /// Stops the keep-alives and revokes the lease (deleting its keys).
    pub async fn close(self, client: &Client) -> Result<(), Status> {
        self.task.abort();
        client.lease_revoke(self.id).await.map(|_| ())
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Sends a keep-alive every third of the TTL, over one stream at a time,
/// moving to the next endpoint when a stream fails.
async fn keep_alive(channels: Vec<Conn>, id: i64, ttl: i64, state: watch::Sender<LeaseState>) {
    let period = Duration::from_millis((ttl.max(1) as u64 * 1000) / 3);
    let mut endpoint = 0;
    loop {
        let (tx, rx) = mpsc::channel(1);
        let opened = LeaseClient::new(channels[endpoint].clone()).lease_keep_alive(ReceiverStream::new(rx)).await;
        if let Ok(resp) = opened {
            let mut stream = resp.into_inner();
            loop {
                let sent = Instant::now();
                if tx.send(LeaseKeepAliveRequest { id }).await.is_err() {
                    break;
                }
                let answer = tokio::time::timeout(period.max(Duration::from_millis(500)), stream.message()).await;
                match answer {
                    Ok(Ok(Some(resp))) if resp.ttl > 0 => {
                        let _ = state.send(LeaseState::Alive(sent + Duration::from_secs(resp.ttl as u64)));
                    }
                    Ok(Ok(Some(_))) => {
                        let _ = state.send(LeaseState::Lost);
                        return;
                    }
                    _ => break,
                }
                tokio::time::sleep(period.saturating_sub(sent.elapsed())).await;
            }
        }
        if matches!(*state.borrow(), LeaseState::Alive(until) if until <= Instant::now()) {
            let _ = state.send(LeaseState::Lost);
            return;
        }
        endpoint = (endpoint + 1) % channels.len();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A lock on a name, taken with a session's lease (etcd's v3lock service).
pub struct Lock {
    client: Client,
    name: Vec<u8>,
    lease: i64,
}

/// A held lock.
#[derive(Debug, Clone)]
pub struct LockGuard {
    /// The key that holds the lock.
    pub key: Vec<u8>,
    /// The key's create revision: a fencing token, larger for every later
    /// holder. Writes guarded by the lock should compare it.
    pub rev: i64,
}

impl Lock {
    /// Waits until the lock is held.
    pub async fn lock(&self) -> Result<LockGuard, Status> {
        let resp = self.client.lock(&self.name, self.lease).await?;
        let rev = self
            .client
            .range(RangeRequest { key: resp.key.clone(), ..Default::default() })
            .await?
            .kvs
            .first()
            .map(|kv| kv.create_revision)
            .ok_or_else(|| Status::failed_precondition("the lock's key vanished (its lease expired)"))?;
        Ok(LockGuard { key: resp.key, rev })
    }

    /// Releases the lock.
    pub async fn unlock(&self, guard: LockGuard) -> Result<(), Status> {
        self.client.unlock(&guard.key).await
    }
}

/// A leader election among replicas, campaigning with a session's lease
/// (etcd's v3election service).
pub struct Election {
    client: Client,
    name: Vec<u8>,
    lease: i64,
}

/// Leadership won in an election.
#[derive(Debug, Clone)]
pub struct Leadership {
    key: LeaderKey,
}

impl Leadership {
    /// The fencing token: the leader key's create revision.
    pub fn rev(&self) -> i64 {
        self.key.rev
    }

    /// The leader key.
    pub fn key(&self) -> &[u8] {
        &self.key.key
    }
}

impl Election {
    /// Waits until this candidate leads, then returns its leadership.
    pub async fn campaign(&self, value: &[u8]) -> Result<Leadership, Status> {
        let ch = self.client.channel_at(self.client.current_index());
        let req = CampaignRequest { name: self.name.clone(), lease: self.lease, value: value.to_vec() };
        let resp = ElectionClient::new(ch).campaign(req).await?.into_inner();
        let key = resp.leader.ok_or_else(|| Status::internal("campaign answered without a leader key"))?;
        Ok(Leadership { key })
    }

    /// Announces a new value as the leader.
    pub async fn proclaim(&self, leadership: &Leadership, value: &[u8]) -> Result<(), Status> {
        let key = leadership.key.clone();
        self.client
            .call(|ch| {
                let req = ProclaimRequest { leader: Some(key.clone()), value: value.to_vec() };
                async move { ElectionClient::new(ch).proclaim(req).await }
            })
            .await?;
        Ok(())
    }

    /// Gives up leadership.
    pub async fn resign(&self, leadership: Leadership) -> Result<(), Status> {
        let key = leadership.key;
        self.client
            .call(|ch| {
                let req = ResignRequest { leader: Some(key.clone()) };
                async move { ElectionClient::new(ch).resign(req).await }
            })
            .await?;
        Ok(())
    }

    /// The current leader's key-value.
    pub async fn leader(&self) -> Result<LeaderResponse, Status> {
        self.client.leader(&self.name).await
    }

    /// Each leader as it changes.
    pub async fn observe(&self) -> Result<Streaming<LeaderResponse>, Status> {
        self.client.observe(&self.name).await
    }
}
