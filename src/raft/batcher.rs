//! Proposal batching on the leader.
//!
//! openraft appends and flushes one client write at a time on the leader, so
//! a write per log entry caps the cluster at one fsync per write. Proposals
//! that arrive while earlier ones are being committed are therefore gathered
//! into one log entry (`kvdpb::CommandBatch`), which the state machine applies
//! command by command, each at its own revision, and whose response lists
//! each command's response. A lone proposal goes in an entry of its own.
//!
//! At most [`MAX_IN_FLIGHT`] entries are being committed at a time; while
//! they are, new proposals queue and form the next batch, so batches grow
//! with load and stay single under light load.
//!
//! A proposal marked `alone` (one that reads history while it is applied,
//! see [`super::state_machine::reads_history`]) always gets an entry of its
//! own.
//!
//! An entry not committed within the request timeout is given up on (see
//! [`commit`]), so that a write Raft never answers cannot hold a slot.

use std::future::Future;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::raft::ClientWriteResponse;
use prost::Message;
use tokio::sync::{mpsc, oneshot};

use super::gather::{Limits, Queued};
use super::leader::{Forwarded, Proposal};
use super::{decode, NodeId, Raft, Request, Response, TypeConfig, WritesInFlight};
use crate::error::Error;
use crate::proto::kvdpb::{command, Command, CommandBatch};

/// Entries being committed at once.
pub const MAX_IN_FLIGHT: usize = 2;
/// Most proposals in one entry.
pub const MAX_BATCH: usize = 1024;
/// A batch closes once its proposals add up to this many bytes.
pub const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Proposals waiting for a batch; past this, proposers wait their turn.
const QUEUE: usize = 4 * MAX_BATCH;

struct Proposed {
    bytes: Vec<u8>,
    alone: bool,
    done: oneshot::Sender<Forwarded<Response>>,
}

/// The queue of proposals to this member's Raft.
pub struct Proposals {
    tx: mpsc::Sender<Proposed>,
    writes: WritesInFlight,
}

impl Proposals {
    /// Starts the batching task for `raft`; it ends when this is dropped.
    /// Each proposal is counted in `writes` while it waits; an entry not
    /// committed within `timeout` answers its proposers "request timed out".
    pub fn start(raft: Raft, writes: WritesInFlight, timeout: Duration) -> Proposals {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(raft, rx, timeout));
        Proposals { tx, writes }
    }

    /// Client writes this member is handling: waiting, proposed or being
    /// forwarded to the leader.
    pub fn pending(&self) -> usize {
        self.writes.count()
    }

    /// Proposes a write and waits for what applying it produced; one marked
    /// `alone` gets an entry of its own. `NotLeader` means it
    /// was not appended here.
    pub async fn propose(&self, proposal: Proposal) -> Forwarded<Response> {
        let Proposal { command: bytes, alone } = proposal;
        let _counted = self.writes.enter();
        let (done, answer) = oneshot::channel();
        if self.tx.send(Proposed { bytes, alone, done }).await.is_err() {
            return Forwarded::Failed(Error::Stopped);
        }
        answer.await.unwrap_or(Forwarded::Failed(Error::Stopped))
    }
}

const LIMITS: Limits = Limits { in_flight: MAX_IN_FLIGHT, items: MAX_BATCH, bytes: MAX_BATCH_BYTES };

/// A proposal joins the entry of the ones before it unless either must go
/// alone.
impl Queued for Proposed {
    fn size(&self) -> usize {
        self.bytes.len()
    }

    fn joins(&self, first: &Self) -> bool {
        !self.alone && !first.alone
    }
}

async fn run(raft: Raft, rx: mpsc::Receiver<Proposed>, timeout: Duration) {
    super::gather::run(rx, LIMITS, |batch| {
        let raft = raft.clone();
        async move { commit(move |entry| async move { raft.client_write(entry).await }, batch, timeout).await }
    })
    .await
}

type WriteResult = Result<ClientWriteResponse<TypeConfig>, RaftError<NodeId, ClientWriteError<NodeId, super::Node>>>;

/// Commits one entry holding `batch` through `write` and answers each
/// proposer.
///
/// If the entry is not committed and applied within `timeout`, its
/// proposers hear "request timed out", as from etcd (the entry may still be
/// committed later), and the slot it held is freed. openraft 0.9 never
/// answers a write whose entry a snapshot install discarded: a leader cut off
/// with entries in flight, which then catches up from a snapshot, would
/// otherwise hold both slots for good and propose nothing more while it led
/// again (the fault harness saw writes stop for 14 s that way).
async fn commit<W, Fut>(write: W, mut batch: Vec<Proposed>, timeout: Duration)
where
    W: FnOnce(Request) -> Fut,
    Fut: Future<Output = WriteResult>,
{
    let (entry, waiting): (Vec<u8>, Vec<oneshot::Sender<Forwarded<Response>>>) = if batch.len() == 1 {
        let Some(p) = batch.pop() else { return };
        (p.bytes, vec![p.done])
    } else {
        let (bytes, waiting): (Vec<Vec<u8>>, Vec<_>) = batch.into_iter().map(|p| (p.bytes, p.done)).unzip();
        (
            Command { op: Some(command::Op::Batch(CommandBatch { commands: bytes })), stamp: None }.encode_to_vec(),
            waiting,
        )
    };
    let single = waiting.len() == 1;
    let answers: Vec<Forwarded<Response>> = match tokio::time::timeout(timeout, write(Request(entry))).await {
        Err(_) => waiting.iter().map(|_| Forwarded::Failed(Error::Timeout)).collect(),
        Ok(Err(e)) => {
            let why = rejected(e);
            waiting.iter().map(|_| why.answer()).collect()
        }
        Ok(Ok(written)) if single => vec![Forwarded::Done(written.data)],
        Ok(Ok(written)) => {
            let responses = written.data.0.and_then(|list| Ok(decode::<Vec<Response>>(&list)?)).and_then(|list| {
                if list.len() == waiting.len() {
                    Ok(list)
                } else {
                    Err(Error::internal("a command batch answered with the wrong number of responses"))
                }
            });
            match responses {
                Ok(list) => list.into_iter().map(Forwarded::Done).collect(),
                Err(e) => waiting.iter().map(|_| Forwarded::Failed(e.clone())).collect(),
            }
        }
    };
    for (done, answer) in waiting.into_iter().zip(answers) {
        let _ = done.send(answer);
    }
}

/// Why Raft did not take an entry.
enum Rejected {
    NotLeader(Option<NodeId>),
    Failed(Error),
}

impl Rejected {
    fn answer(&self) -> Forwarded<Response> {
        match self {
            Rejected::NotLeader(leader) => Forwarded::NotLeader(*leader),
            Rejected::Failed(e) => Forwarded::Failed(e.clone()),
        }
    }
}

fn rejected(e: RaftError<NodeId, ClientWriteError<NodeId, super::Node>>) -> Rejected {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => Rejected::NotLeader(f.leader_id),
        RaftError::APIError(e) => Rejected::Failed(Error::internal(e)),
        RaftError::Fatal(_) => Rejected::Failed(Error::Stopped),
    }
}

#[cfg(test)]
mod tests {
    use super::super::gather::gather;
    use super::*;

    fn pending(tag: u8, alone: bool) -> Proposed {
        Proposed { bytes: vec![tag], alone, done: oneshot::channel().0 }
    }

    fn answered(tag: u8) -> (Proposed, oneshot::Receiver<Forwarded<Response>>) {
        let (done, answer) = oneshot::channel();
        (Proposed { bytes: vec![tag], alone: false, done }, answer)
    }

    fn written(data: Response) -> ClientWriteResponse<TypeConfig> {
        ClientWriteResponse { log_id: Default::default(), data, membership: None }
    }

    #[tokio::test(start_paused = true)]
    async fn an_entry_never_answered_times_out_and_frees_its_slot_for_the_next() {
        let timeout = Duration::from_secs(6);
        let (tx, rx) = mpsc::channel(16);
        let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = calls.clone();
        // The first MAX_IN_FLIGHT entries are never answered, as openraft
        // leaves a write whose entry a snapshot install discarded; later
        // ones are committed.
        tokio::spawn(crate::raft::gather::run(rx, LIMITS, move |batch| {
            let n = counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move {
                commit(
                    move |_| async move {
                        if n < MAX_IN_FLIGHT {
                            std::future::pending::<()>().await;
                        }
                        Ok(written(Response(Ok(serde_bytes::ByteBuf::from(vec![7])))))
                    },
                    batch,
                    timeout,
                )
                .await
            }
        }));
        let mut stuck = Vec::new();
        for tag in 0..MAX_IN_FLIGHT as u8 {
            let (p, answer) = answered(tag);
            tx.send(p).await.unwrap();
            // Let the runner take it as a batch of its own.
            tokio::task::yield_now().await;
            stuck.push(answer);
        }
        let (p, next) = answered(9);
        tx.send(p).await.unwrap();
        let started = tokio::time::Instant::now();
        let got = tokio::time::timeout(2 * timeout, next).await.expect("a slot was freed by the timeout");
        match got.unwrap() {
            Forwarded::Done(Response(Ok(b))) => assert_eq!(b.as_ref(), &[7]),
            other => panic!("the next entry was not committed: {other:?}"),
        }
        assert!(started.elapsed() >= timeout, "it had to wait for a slot");
        for answer in stuck {
            assert!(matches!(answer.await.unwrap(), Forwarded::Failed(Error::Timeout)));
        }
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), MAX_IN_FLIGHT + 1);
    }

    #[tokio::test]
    async fn each_proposer_of_a_batch_gets_its_own_response() {
        let (a, ra) = answered(1);
        let (b, rb) = answered(2);
        let list =
            vec![Response(Ok(serde_bytes::ByteBuf::from(vec![1]))), Response(Ok(serde_bytes::ByteBuf::from(vec![2])))];
        let encoded = crate::raft::encode(&list).unwrap();
        let reply = Ok(written(Response(Ok(serde_bytes::ByteBuf::from(encoded)))));
        commit(move |_| async move { reply }, vec![a, b], Duration::from_secs(1)).await;
        for (rx, want) in [(ra, 1u8), (rb, 2)] {
            match rx.await.unwrap() {
                Forwarded::Done(Response(Ok(b))) => assert_eq!(b.as_ref(), &[want]),
                other => panic!("{other:?}"),
            }
        }
    }

    fn tags(batch: &[Proposed]) -> Vec<u8> {
        batch.iter().map(|p| p.bytes[0]).collect()
    }

    #[test]
    fn a_proposal_that_must_go_alone_gets_an_entry_of_its_own() {
        let (tx, mut rx) = mpsc::channel(16);
        for p in [pending(2, false), pending(3, true), pending(4, false), pending(5, false)] {
            tx.try_send(p).expect("queued");
        }
        let mut held = None;
        assert_eq!(tags(&gather(pending(1, false), &mut rx, &mut held, LIMITS)), vec![1, 2]);
        let alone = held.take().expect("held back");
        assert_eq!(tags(&gather(alone, &mut rx, &mut held, LIMITS)), vec![3]);
        let next = held.take().expect("held back after the lone one");
        assert_eq!(tags(&gather(next, &mut rx, &mut held, LIMITS)), vec![4, 5]);
        assert!(held.is_none());
    }
}
