//! The Watch service: many watches per bidirectional stream, each served from
//! this member's own applied state.
//!
//! One task serves a stream and all its watches, as etcd's watch stream does:
//! it takes each applied revision the state machine broadcasts once and
//! hands its events to every watch of the stream that follows the broadcast
//! (a task per watch woke thousands of tasks per revision). A watch first
//! replays history from its start revision (in chunks of whole revisions,
//! read from disk), taking turns with the stream's other work, then follows
//! the broadcast. The broadcast holds a bounded number of revisions; when the
//! stream falls further behind (a slow reader), its watches go back to
//! replaying from history where each left off. No event is skipped and none
//! is sent twice: each watch keeps the next revision it owes its client and
//! discards anything older.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use prost::Message;
use tokio::sync::{broadcast, mpsc};
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
        let stream = WatchStream {
            out: Out { member: self.member.clone(), tx },
            progress_interval: self.progress_interval,
            watches: HashMap::new(),
            behind: VecDeque::new(),
            notifying: 0,
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

/// Where a stream's responses go, and the member they come from.
struct Out {
    member: Arc<Member>,
    tx: Outbound,
}

/// One stream and its watches, served by one task.
struct WatchStream {
    out: Out,
    progress_interval: Duration,
    watches: HashMap<i64, Watcher>,
    /// Watches replaying history, in the order of their turns.
    behind: VecDeque<i64>,
    /// How many watches asked for progress notifications.
    notifying: usize,
    next_id: i64,
}

/// What woke a stream's task.
enum Step {
    Applied(Result<Arc<Applied>, broadcast::error::RecvError>),
    Request(Option<Result<WatchRequest, Status>>),
    Tick,
    Replay,
}

impl WatchStream {
    async fn run<S>(mut self, mut inbound: S)
    where
        S: Stream<Item = Result<WatchRequest, Status>> + Send + Unpin + 'static,
    {
        use futures::StreamExt;
        // Subscribed before any watch is created, so that each revision
        // after a watch's start is either in the state it reads or still
        // to come here (`Shared::subscribe`).
        let (mut applied, _) = self.out.member.state.subscribe();
        let period = self.progress_interval;
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        let mut open = true;
        loop {
            // One chunk of history for the watch whose turn it is, then
            // whatever else is ready: no watch waits for another's replay.
            if !self.replay_one().await {
                break;
            }
            let step = tokio::select! {
                item = applied.recv() => Step::Applied(item),
                msg = inbound.next(), if open => Step::Request(msg),
                _ = tick.tick(), if self.notifying > 0 => Step::Tick,
                _ = std::future::ready(()), if !self.behind.is_empty() => Step::Replay,
                _ = self.out.tx.closed() => break,
                _ = self.out.member.stopped() => {
                    let _ = self.out.tx.send(Err(Error::Stopped.into())).await;
                    break;
                }
            };
            let go_on = match step {
                Step::Applied(Ok(applied)) => self.fan_out(&applied).await,
                Step::Applied(Err(broadcast::error::RecvError::Lagged(missed))) => {
                    tracing::debug!(missed, "watch stream fell behind; replaying from history");
                    for w in self.watches.values_mut().filter(|w| w.live) {
                        w.live = false;
                        self.behind.push_back(w.id);
                    }
                    true
                }
                Step::Applied(Err(broadcast::error::RecvError::Closed)) => false,
                // The client sends no more requests; its watches go on.
                Step::Request(None) => {
                    open = false;
                    true
                }
                Step::Request(Some(Err(status))) => {
                    tracing::debug!("watch stream ended: {status}");
                    let _ = self.out.tx.send(Err(status)).await;
                    false
                }
                Step::Request(Some(Ok(req))) => match req.request_union {
                    Some(RequestUnion::CreateRequest(c)) => self.create(c).await,
                    Some(RequestUnion::CancelRequest(c)) => self.cancel(c.watch_id).await,
                    Some(RequestUnion::ProgressRequest(_)) => self.progress().await,
                    None => true,
                },
                Step::Tick => self.notify_progress().await,
                Step::Replay => true,
            };
            if !go_on {
                break;
            }
        }
    }

    /// Gives one applied revision's events to every watch following the
    /// broadcast. Returns false once the client is gone.
    async fn fan_out(&mut self, applied: &Applied) -> bool {
        let Self { out, watches, behind, .. } = self;
        // One header for the revision, not one per watch.
        let mut header = None;
        let mut cancelled = Vec::new();
        for w in watches.values_mut() {
            if !w.live || applied.rev < w.next {
                continue;
            }
            if applied.rev > w.next || applied.events.is_empty() {
                // A revision this stream did not see, or one applied
                // without events (a snapshot install): replay from history.
                w.live = false;
                behind.push_back(w.id);
                continue;
            }
            w.next = applied.rev + 1;
            let events: Vec<Event> = applied.events.iter().filter(|e| w.wanted(e)).cloned().collect();
            if events.is_empty() {
                continue;
            }
            let header = *header.get_or_insert_with(|| out.header(applied.rev));
            match out.deliver(w, events, header).await {
                Ok(sent) => w.sent_since_tick |= sent,
                Err(Stop::Gone) => return false,
                Err(Stop::Cancelled) => cancelled.push(w.id),
            }
        }
        for id in cancelled {
            self.forget(id);
        }
        true
    }

    /// Replays one chunk of history to the watch whose turn it is; a watch
    /// with nothing left to replay follows the broadcast from then on.
    /// Returns false once the client is gone.
    async fn replay_one(&mut self) -> bool {
        let Some(id) = self.behind.pop_front() else { return true };
        let Some(w) = self.watches.get_mut(&id) else { return true };
        if w.live {
            return true;
        }
        let result = match self.out.next_chunk(w) {
            None => {
                w.live = true;
                return true;
            }
            Some(Ok((mut events, last))) => {
                events.retain(|e| w.wanted(e));
                self.out.deliver(w, events, self.out.header(last)).await.map(|_| last)
            }
            Some(Err((Error::Compacted, compacted))) => {
                // As etcd answers it: the compacted revision says why, and
                // the header carries no revision.
                let mut header = self.out.header(0);
                if let Some(h) = header.as_mut() {
                    h.revision = 0;
                }
                let resp = WatchResponse {
                    header,
                    watch_id: id,
                    canceled: true,
                    compact_revision: compacted,
                    ..Default::default()
                };
                self.out.send(resp).await.map_err(|_| Stop::Gone).and(Err(Stop::Cancelled))
            }
            Some(Err((e, _))) => self.out.cancel(id, e).await.map(|_| 0),
        };
        match result {
            Ok(last) => {
                w.next = last + 1;
                self.behind.push_back(id);
                true
            }
            Err(Stop::Cancelled) => {
                self.forget(id);
                true
            }
            Err(Stop::Gone) => false,
        }
    }

    async fn create(&mut self, c: WatchCreateRequest) -> bool {
        let current = self.out.member.state.read().store.revision();
        // A watch needs READ on its range, as in etcd, which answers a
        // refusal as a watch created and canceled at once.
        if let Err(e) = self.out.member.authorize_read(&c.key, &c.range_end) {
            return self
                .out
                .send(WatchResponse {
                    header: self.out.header(current),
                    watch_id: -1,
                    created: true,
                    canceled: true,
                    // etcd words it as a gRPC error.
                    cancel_reason: format!("rpc error: code = {:?} desc = {e}", crate::grpc::status::code(&e)),
                    ..Default::default()
                })
                .await
                .is_ok();
        }
        let id = if c.watch_id != 0 {
            if self.watches.contains_key(&c.watch_id) {
                return self
                    .out
                    .send(WatchResponse {
                        header: self.out.header(current),
                        // etcd answers with no watch's id.
                        watch_id: -1,
                        created: true,
                        canceled: true,
                        cancel_reason: "mvcc: duplicate watch ID provided on the WatchStream".into(),
                        ..Default::default()
                    })
                    .await
                    .is_ok();
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
        let created =
            WatchResponse { header: self.out.header(current), watch_id: id, created: true, ..Default::default() };
        if self.out.send(created).await.is_err() {
            return false;
        }
        // A watch from the next revision on follows the broadcast at once;
        // one from an earlier one replays history first.
        let live = start > current;
        if !live {
            self.behind.push_back(id);
        }
        self.notifying += usize::from(c.progress_notify);
        let watcher = Watcher {
            id,
            key: c.key,
            end: RangeEnd::from_request(&c.range_end),
            no_put: c.filters.contains(&(FilterType::Noput as i32)),
            no_delete: c.filters.contains(&(FilterType::Nodelete as i32)),
            prev_kv: c.prev_kv,
            fragment: c.fragment,
            progress: c.progress_notify,
            next: start,
            live,
            sent_since_tick: false,
        };
        self.watches.insert(id, watcher);
        true
    }

    /// Drops a watch; a turn to replay it that is still queued is skipped.
    fn forget(&mut self, id: i64) -> bool {
        let Some(w) = self.watches.remove(&id) else { return false };
        self.notifying -= usize::from(w.progress);
        true
    }

    async fn cancel(&mut self, id: i64) -> bool {
        // As etcd, cancelling a watch this stream does not have answers nothing.
        if !self.forget(id) {
            return true;
        }
        let current = self.out.member.state.read().store.revision();
        let resp =
            WatchResponse { header: self.out.header(current), watch_id: id, canceled: true, ..Default::default() };
        self.out.send(resp).await.is_ok()
    }

    /// Answers a progress request with a revision every watch on the stream
    /// has delivered all events up to (watch id -1, as etcd 3.4).
    async fn progress(&mut self) -> bool {
        let current = self.out.member.state.read().store.revision();
        let rev = self.watches.values().map(|w| w.next - 1).fold(current, i64::min);
        self.out.send(WatchResponse { header: self.out.header(rev), watch_id: -1, ..Default::default() }).await.is_ok()
    }

    /// Tells each watch that asked for progress notifications and follows
    /// the broadcast, but got no events since the last tick, how far it is.
    async fn notify_progress(&mut self) -> bool {
        let current = self.out.member.state.read().store.revision();
        for w in self.watches.values_mut() {
            if w.progress && w.live && !w.sent_since_tick {
                // A watch from a future revision is as far as the store.
                let rev = (w.next - 1).min(current);
                let resp = WatchResponse { header: self.out.header(rev), watch_id: w.id, ..Default::default() };
                if self.out.send(resp).await.is_err() {
                    return false;
                }
            }
            w.sent_since_tick = false;
        }
        true
    }
}

/// One watch: what it wants and where it is.
struct Watcher {
    id: i64,
    key: Vec<u8>,
    end: RangeEnd,
    no_put: bool,
    no_delete: bool,
    prev_kv: bool,
    fragment: bool,
    /// Whether it asked for progress notifications.
    progress: bool,
    /// The next revision this watch owes its client.
    next: i64,
    /// Whether it follows the broadcast (it has replayed all history up to
    /// the revisions still to come there).
    live: bool,
    sent_since_tick: bool,
}

impl Watcher {
    fn wanted(&self, e: &Event) -> bool {
        let Some(kv) = &e.kv else { return false };
        if !self.end.contains(&self.key, &kv.key) {
            return false;
        }
        let put = e.r#type == EventType::Put as i32;
        !(put && self.no_put || !put && self.no_delete)
    }
}

/// Replayed events and the last revision they cover.
type Chunk = (Vec<Event>, i64);

/// How a watch stops.
enum Stop {
    /// The client is gone.
    Gone,
    /// The watch was cancelled by the server (compaction, failure); the
    /// response saying so has been sent.
    Cancelled,
}

impl Out {
    fn header(&self, revision: i64) -> Option<ResponseHeader> {
        let mut header = Some(ResponseHeader { revision, ..Default::default() });
        self.member.fill_header(&mut header);
        header
    }

    async fn send(&self, resp: WatchResponse) -> Result<(), Stop> {
        self.tx.send(Ok(resp)).await.map_err(|_| Stop::Gone)
    }

    /// The next chunk of history `w` is to replay, with the last revision
    /// it covers; None once `w.next` is past the current revision. An
    /// error comes with the compacted revision.
    fn next_chunk(&self, w: &Watcher) -> Option<Result<Chunk, (Error, i64)>> {
        let state = match self.member.state.read_committed() {
            Ok(state) => state,
            Err(e) => return Some(Err((e, 0))),
        };
        let current = state.store.revision();
        if w.next > current {
            return None;
        }
        let compacted = state.store.compacted();
        let read = state.store.history_events(&w.key, &w.end, w.next, current, REPLAY_CHUNK, w.prev_kv);
        Some(read.map_err(|e| (e, compacted)))
    }

    /// Cancels watch `id` because reading history failed.
    async fn cancel(&self, id: i64, e: Error) -> Result<(), Stop> {
        tracing::warn!(watch = id, "reading history for a watch failed: {e}");
        let resp = WatchResponse {
            header: self.header(0),
            watch_id: id,
            canceled: true,
            cancel_reason: e.to_string(),
            ..Default::default()
        };
        self.send(resp).await?;
        Err(Stop::Cancelled)
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

    /// Sends `events`, the ones `w` wants of whole revisions up to the
    /// header's revision. Returns whether anything was sent.
    async fn deliver(&self, w: &Watcher, mut events: Vec<Event>, header: Option<ResponseHeader>) -> Result<bool, Stop> {
        if events.is_empty() {
            return Ok(false);
        }
        if !w.prev_kv {
            for e in &mut events {
                e.prev_kv = None;
            }
        } else if let Err(e) = self.fill_prev(&mut events) {
            self.cancel(w.id, e).await?;
        }
        let limit = self.member.limits.max_request_bytes;
        let chunks: Vec<Vec<Event>> = if w.fragment && events.iter().map(|e| e.encoded_len()).sum::<usize>() > limit {
            fragments(events, limit)
        } else {
            vec![events]
        };
        let n = chunks.len();
        for (i, events) in chunks.into_iter().enumerate() {
            let resp = WatchResponse { header, watch_id: w.id, events, fragment: i + 1 < n, ..Default::default() };
            self.send(resp).await?;
        }
        Ok(true)
    }
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
