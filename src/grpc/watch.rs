//! The Watch service: many watches per bidirectional stream, each served from
//! this member's own applied state.
//!
//! A watch first replays history from its start revision (in chunks of whole
//! revisions, read from disk), then follows the applied revisions that the
//! state machine broadcasts. The broadcast holds a bounded number of
//! revisions; a watch that falls further behind (a slow reader) is told so and
//! goes back to replaying from history where it left off. No event is skipped
//! and none is sent twice: the watch keeps the next revision it owes its
//! client and discards anything older.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use prost::Message;
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::error::Error;
use crate::mvcc::keys::RangeEnd;
use crate::node::Member;
use crate::proto::etcdserverpb::watch_create_request::FilterType;
use crate::proto::etcdserverpb::watch_request::RequestUnion;
use crate::proto::etcdserverpb::watch_server::Watch;
use crate::proto::etcdserverpb::{ResponseHeader, WatchCreateRequest, WatchRequest, WatchResponse};
use crate::proto::mvccpb::event::EventType;
use crate::proto::mvccpb::Event;
use crate::raft::state_machine::Applied;

/// Events read from history per chunk while a watch catches up.
const REPLAY_CHUNK: usize = 1000;
/// Responses buffered per stream before watches wait for the client.
const STREAM_BUFFER: usize = 64;

/// The Watch service of one member.
pub struct WatchService {
    member: Arc<Member>,
    progress_interval: Duration,
}

impl WatchService {
    /// A service for `member`; watches that ask for progress notifications get
    /// one after each `progress_interval` without events.
    pub fn new(member: Arc<Member>, progress_interval: Duration) -> Self {
        WatchService { member, progress_interval }
    }
}

type Outbound = mpsc::Sender<Result<WatchResponse, Status>>;

#[tonic::async_trait]
impl Watch for WatchService {
    type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchResponse, Status>> + Send + 'static>>;

    async fn watch(&self, req: Request<Streaming<WatchRequest>>) -> Result<Response<Self::WatchStream>, Status> {
        Ok(Response::new(Box::pin(self.open(req.into_inner()))))
    }
}

impl WatchService {
    /// Serves the watch requests of `inbound` (a gRPC stream, or the JSON
    /// objects of a gateway request) and answers on the stream returned.
    /// Watches go on after `inbound` ends, until the client goes away, as
    /// etcd's do.
    pub fn open<S>(&self, inbound: S) -> ReceiverStream<Result<WatchResponse, Status>>
    where
        S: Stream<Item = Result<WatchRequest, Status>> + Send + Unpin + 'static,
    {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let stream = WatchStreamState {
            member: self.member.clone(),
            progress_interval: self.progress_interval,
            tx,
            watches: HashMap::new(),
            next_id: 0,
        };
        // The stream's requests are checked with the credentials of the
        // call that opened it.
        let credentials = crate::auth::CREDENTIALS.try_with(|c| c.clone()).ok();
        tokio::spawn(async move {
            match credentials {
                Some(c) => crate::auth::CREDENTIALS.scope(c, stream.run(inbound)).await,
                None => stream.run(inbound).await,
            }
        });
        ReceiverStream::new(rx)
    }
}

struct ActiveWatch {
    task: JoinHandle<()>,
    /// Every event at or below this revision has been queued to the client.
    synced: Arc<AtomicI64>,
}

struct WatchStreamState {
    member: Arc<Member>,
    progress_interval: Duration,
    tx: Outbound,
    watches: HashMap<i64, ActiveWatch>,
    next_id: i64,
}

impl WatchStreamState {
    async fn run<S>(mut self, mut inbound: S)
    where
        S: Stream<Item = Result<WatchRequest, Status>> + Send + Unpin + 'static,
    {
        use futures::StreamExt;
        let mut open = true;
        loop {
            let msg = tokio::select! {
                msg = inbound.next(), if open => msg,
                _ = self.tx.closed() => break,
                _ = self.member.stopped() => {
                    let _ = self.tx.send(Err(Error::Stopped.into())).await;
                    break;
                }
            };
            let req = match msg {
                Some(Ok(req)) => req,
                // The client sends no more requests; its watches go on.
                None => {
                    open = false;
                    continue;
                }
                Some(Err(status)) => {
                    tracing::debug!("watch stream ended: {status}");
                    let _ = self.tx.send(Err(status)).await;
                    break;
                }
            };
            self.watches.retain(|_, w| !w.task.is_finished());
            let sent = match req.request_union {
                Some(RequestUnion::CreateRequest(c)) => self.create(c).await,
                Some(RequestUnion::CancelRequest(c)) => self.cancel(c.watch_id).await,
                Some(RequestUnion::ProgressRequest(_)) => self.progress().await,
                None => true,
            };
            if !sent {
                break;
            }
        }
        for (_, w) in self.watches.drain() {
            w.task.abort();
        }
    }

    fn header(&self, revision: i64) -> Option<ResponseHeader> {
        let mut header = Some(ResponseHeader { revision, ..Default::default() });
        self.member.fill_header(&mut header);
        header
    }

    async fn send(&self, resp: WatchResponse) -> bool {
        self.tx.send(Ok(resp)).await.is_ok()
    }

    async fn create(&mut self, c: WatchCreateRequest) -> bool {
        let (rx, current) = self.member.state.subscribe();
        // A watch needs READ on its range, as in etcd, which answers a
        // refusal as a watch created and canceled at once.
        if let Err(e) = self.member.authorize_read(&c.key, &c.range_end) {
            return self
                .send(WatchResponse {
                    header: self.header(current),
                    watch_id: -1,
                    created: true,
                    canceled: true,
                    // etcd words it as a gRPC error.
                    cancel_reason: format!("rpc error: code = {:?} desc = {e}", crate::grpc::status::code(&e)),
                    ..Default::default()
                })
                .await;
        }
        let id = if c.watch_id != 0 {
            if self.watches.contains_key(&c.watch_id) {
                return self
                    .send(WatchResponse {
                        header: self.header(current),
                        watch_id: c.watch_id,
                        created: true,
                        canceled: true,
                        cancel_reason: "mvcc: duplicate watch ID provided on the WatchStream".into(),
                        ..Default::default()
                    })
                    .await;
            }
            c.watch_id
        } else {
            while self.watches.contains_key(&self.next_id) {
                self.next_id += 1;
            }
            self.next_id += 1;
            self.next_id - 1
        };
        let start = if c.start_revision > 0 { c.start_revision } else { current + 1 };
        let created = WatchResponse { header: self.header(current), watch_id: id, created: true, ..Default::default() };
        if !self.send(created).await {
            return false;
        }
        let synced = Arc::new(AtomicI64::new(start - 1));
        let watcher = Watcher {
            member: self.member.clone(),
            id,
            key: c.key,
            end: RangeEnd::from_request(&c.range_end),
            no_put: c.filters.contains(&(FilterType::Noput as i32)),
            no_delete: c.filters.contains(&(FilterType::Nodelete as i32)),
            prev_kv: c.prev_kv,
            fragment: c.fragment,
            progress: c.progress_notify.then_some(self.progress_interval),
            next: start,
            synced: synced.clone(),
            tx: self.tx.clone(),
        };
        let task = tokio::spawn(watcher.run(rx));
        self.watches.insert(id, ActiveWatch { task, synced });
        true
    }

    async fn cancel(&mut self, id: i64) -> bool {
        // As etcd, cancelling a watch this stream does not have answers nothing.
        let Some(w) = self.watches.remove(&id) else { return true };
        w.task.abort();
        let _ = w.task.await;
        let current = self.member.state.read().store.revision();
        self.send(WatchResponse { header: self.header(current), watch_id: id, canceled: true, ..Default::default() })
            .await
    }

    /// Answers a progress request with a revision every watch on the stream
    /// has delivered all events up to (watch id -1, as etcd 3.4).
    async fn progress(&mut self) -> bool {
        let current = self.member.state.read().store.revision();
        let rev = self.watches.values().map(|w| w.synced.load(Ordering::Acquire)).fold(current, i64::min);
        self.send(WatchResponse { header: self.header(rev), watch_id: -1, ..Default::default() }).await
    }
}

/// One watch: where it is, what it wants, where it sends.
struct Watcher {
    member: Arc<Member>,
    id: i64,
    key: Vec<u8>,
    end: RangeEnd,
    no_put: bool,
    no_delete: bool,
    prev_kv: bool,
    fragment: bool,
    progress: Option<Duration>,
    /// The next revision this watch owes its client.
    next: i64,
    synced: Arc<AtomicI64>,
    tx: Outbound,
}

/// Replayed events and the last revision they cover.
type Chunk = (Vec<Event>, i64);

/// How a watch stops.
enum Stop {
    /// The client is gone or cancelled.
    Gone,
    /// The watch was cancelled by the server (compaction, failure); the
    /// response saying so has been sent.
    Cancelled,
}

impl Watcher {
    async fn run(mut self, mut rx: broadcast::Receiver<Arc<Applied>>) {
        loop {
            if self.catch_up().await.is_err() {
                return;
            }
            match self.follow(&mut rx).await {
                Ok(Resync::FromHistory) => {}
                Ok(Resync::Resubscribe) => rx = self.member.state.subscribe().0,
                Err(_) => return,
            }
        }
    }

    /// Replays history from `next` up to the current revision.
    async fn catch_up(&mut self) -> Result<(), Stop> {
        loop {
            let Some(read) = self.next_chunk() else { return Ok(()) };
            match read {
                Ok((events, last)) => {
                    self.deliver(events, last).await?;
                    self.next = last + 1;
                    self.synced.store(last, Ordering::Release);
                }
                Err((Error::Compacted, compacted)) => {
                    // As etcd answers it: the compacted revision says why,
                    // and the header carries no revision.
                    let mut header = self.header(0);
                    if let Some(h) = header.as_mut() {
                        h.revision = 0;
                    }
                    let resp = WatchResponse {
                        header,
                        watch_id: self.id,
                        canceled: true,
                        compact_revision: compacted,
                        ..Default::default()
                    };
                    let _ = self.tx.send(Ok(resp)).await;
                    return Err(Stop::Cancelled);
                }
                Err((e, _)) => return self.cancel(e).await,
            }
        }
    }

    /// The next chunk of history to replay, with the last revision it
    /// covers; None once `next` is past the current revision. An error
    /// comes with the compacted revision.
    fn next_chunk(&self) -> Option<Result<Chunk, (Error, i64)>> {
        let state = match self.member.state.read_committed() {
            Ok(state) => state,
            Err(e) => return Some(Err((e, 0))),
        };
        let current = state.store.revision();
        if self.next > current {
            return None;
        }
        let compacted = state.store.compacted();
        let read = state.store.history_events(&self.key, &self.end, self.next, current, REPLAY_CHUNK, self.prev_kv);
        Some(read.map_err(|e| (e, compacted)))
    }

    /// Cancels the watch because reading history failed.
    async fn cancel(&self, e: Error) -> Result<(), Stop> {
        tracing::warn!(watch = self.id, "reading history for a watch failed: {e}");
        let resp = WatchResponse {
            header: self.header(0),
            watch_id: self.id,
            canceled: true,
            cancel_reason: e.to_string(),
            ..Default::default()
        };
        let _ = self.tx.send(Ok(resp)).await;
        Err(Stop::Cancelled)
    }

    /// Follows applied revisions live until it falls behind.
    async fn follow(&mut self, rx: &mut broadcast::Receiver<Arc<Applied>>) -> Result<Resync, Stop> {
        let period = self.progress.unwrap_or(Duration::from_secs(3600));
        let mut quiet = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        let mut sent_since_tick = false;
        loop {
            tokio::select! {
                item = rx.recv() => match item {
                    Ok(applied) => {
                        if applied.rev < self.next {
                            continue;
                        }
                        if applied.rev > self.next || applied.events.is_empty() {
                            // A revision this member applied without events
                            // (a snapshot install): replay from history.
                            return Ok(Resync::FromHistory);
                        }
                        let events = applied.events.clone();
                        sent_since_tick |= self.deliver(events, applied.rev).await?;
                        self.next = applied.rev + 1;
                        self.synced.store(applied.rev, Ordering::Release);
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::debug!(watch = self.id, missed, "watch fell behind; replaying from history");
                        return Ok(Resync::Resubscribe);
                    }
                    Err(broadcast::error::RecvError::Closed) => return Err(Stop::Gone),
                },
                _ = quiet.tick(), if self.progress.is_some() => {
                    if !sent_since_tick {
                        let resp = WatchResponse { header: self.header(self.next - 1), watch_id: self.id, ..Default::default() };
                        self.tx.send(Ok(resp)).await.map_err(|_| Stop::Gone)?;
                    }
                    sent_since_tick = false;
                }
                _ = self.tx.closed() => return Err(Stop::Gone),
            }
        }
    }

    fn header(&self, revision: i64) -> Option<ResponseHeader> {
        let mut header = Some(ResponseHeader { revision, ..Default::default() });
        self.member.fill_header(&mut header);
        header
    }

    fn wanted(&self, e: &Event) -> bool {
        let Some(kv) = &e.kv else { return false };
        if !self.end.contains(&self.key, &kv.key) {
            return false;
        }
        let put = e.r#type == EventType::Put as i32;
        !(put && self.no_put || !put && self.no_delete)
    }

    /// Reads from history the previous key-value of each event that had one
    /// and does not carry it (live events never do: applying a write does
    /// not read old values). As in etcd, it is left out if it was compacted
    /// away meanwhile.
    fn fill_prev(&self, events: &mut [Event]) -> Result<(), Error> {
        // The store finds versions not yet committed to sled too, so this
        // needs no commit.
        let state = self.member.state.read();
        for e in events.iter_mut().filter(|e| e.prev_kv.is_none()) {
            let Some(kv) = &e.kv else { continue };
            if e.r#type == EventType::Delete as i32 || kv.version > 1 {
                e.prev_kv = state.store.prev_version(&kv.key, kv.mod_revision)?;
            }
        }
        Ok(())
    }

    /// Sends the wanted ones of `events` (whole revisions, up to `last`).
    /// Returns whether anything was sent.
    async fn deliver(&self, mut events: Vec<Event>, last: i64) -> Result<bool, Stop> {
        events.retain(|e| self.wanted(e));
        if events.is_empty() {
            return Ok(false);
        }
        if !self.prev_kv {
            for e in &mut events {
                e.prev_kv = None;
            }
        } else if let Err(e) = self.fill_prev(&mut events) {
            self.cancel(e).await?;
        }
        let header = self.header(last);
        let limit = self.member.limits.max_request_bytes;
        let chunks: Vec<Vec<Event>> = if self.fragment && events.iter().map(|e| e.encoded_len()).sum::<usize>() > limit
        {
            fragments(events, limit)
        } else {
            vec![events]
        };
        let n = chunks.len();
        for (i, events) in chunks.into_iter().enumerate() {
            let resp = WatchResponse { header, watch_id: self.id, events, fragment: i + 1 < n, ..Default::default() };
            self.tx.send(Ok(resp)).await.map_err(|_| Stop::Gone)?;
        }
        Ok(true)
    }
}

enum Resync {
    /// Replay from history; the receiver is still good.
    FromHistory,
    /// The receiver lost revisions: take a new one, then replay.
    Resubscribe,
}

/// Splits events into runs of at most `limit` encoded bytes (at least one
/// event each).
fn fragments(events: Vec<Event>, limit: usize) -> Vec<Vec<Event>> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let mut size = 0;
    for e in events {
        let len = e.encoded_len();
        if !cur.is_empty() && size + len > limit {
            out.push(std::mem::take(&mut cur));
            size = 0;
        }
        size += len;
        cur.push(e);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::mvccpb::KeyValue;

    fn ev(n: usize) -> Event {
        Event { kv: Some(KeyValue { key: vec![b'k'; n], ..Default::default() }), ..Default::default() }
    }

    #[test]
    fn fragments_respect_the_limit_and_keep_every_event() {
        let events: Vec<Event> = (1..=20).map(ev).collect();
        let limit = 40;
        let parts = fragments(events.clone(), limit);
        assert!(parts.len() > 1);
        for p in &parts {
            assert!(!p.is_empty());
            let size: usize = p.iter().map(|e| e.encoded_len()).sum();
            assert!(size <= limit || p.len() == 1, "fragment of {size} bytes");
        }
        assert_eq!(parts.concat(), events);
    }
}
