//! Forwarding batching on a follower.
//!
//! A follower sends the writes its clients make to the leader. One peer call
//! per write costs a gRPC exchange on both members for every write, so
//! writes that arrive while earlier forwards are on their way are gathered
//! and sent in one `ForwardBatch` call; the leader proposes each of them (its
//! batcher puts them in one entry) and answers each. A lone write goes in a
//! `Forward` call of its own.
//!
//! Each write gets the answer it would have got alone: its own result, "not
//! the leader", "not sent" (safe to retry) or, when the call may have
//! reached the leader but no answer came back, a timeout.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot, Semaphore};

use super::network::{CallError, Network, Rpc};
use super::{decode, encode, NodeId, Raft, Response};
use crate::error::Error;
use crate::node::Forwarded;

/// Forward calls under way at once.
const MAX_IN_FLIGHT: usize = 4;
/// Most writes in one call.
const MAX_BATCH: usize = 512;
/// A batch closes once its writes add up to this many bytes.
const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Writes waiting to be forwarded; past this, writers wait their turn.
const QUEUE: usize = 4 * MAX_BATCH;

/// What a forwarded write came back with: `Ok(None)` if it certainly never
/// reached the leader (or the leader's address is unknown).
pub type Answer = Result<Option<Forwarded<Response>>, Error>;

struct Pending {
    leader: NodeId,
    bytes: Vec<u8>,
    deadline: Instant,
    done: oneshot::Sender<Answer>,
}

/// The queue of writes this member forwards to the leader.
pub struct Forwarder {
    tx: mpsc::Sender<Pending>,
}

impl Forwarder {
    /// Starts the forwarding task; it ends when this is dropped.
    pub fn start(raft: Raft, network: Network) -> Forwarder {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(raft, network, rx));
        Forwarder { tx }
    }

    /// Forwards an encoded `Command` to `leader`, waiting at most until
    /// `deadline`.
    pub async fn forward(&self, leader: NodeId, bytes: Vec<u8>, deadline: Instant) -> Answer {
        let (done, answer) = oneshot::channel();
        if self.tx.send(Pending { leader, bytes, deadline, done }).await.is_err() {
            return Err(Error::Stopped);
        }
        answer.await.unwrap_or(Err(Error::Stopped))
    }
}

async fn run(raft: Raft, network: Network, mut rx: mpsc::Receiver<Pending>) {
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut held: Option<Pending> = None;
    loop {
        let first = match held.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        // Waiting for a slot is what lets the next batch gather.
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let batch = gather(first, &mut rx, &mut held);
        let (raft, network) = (raft.clone(), network.clone());
        tokio::spawn(async move {
            send(&raft, &network, batch).await;
            drop(slot);
        });
    }
}

/// The writes of the next call: `first`, then what is queued for the same
/// leader, up to the limits; a write for another leader is left in `held`.
fn gather(first: Pending, rx: &mut mpsc::Receiver<Pending>, held: &mut Option<Pending>) -> Vec<Pending> {
    let mut size = first.bytes.len();
    let leader = first.leader;
    let mut batch = vec![first];
    while batch.len() < MAX_BATCH && size < MAX_BATCH_BYTES {
        match rx.try_recv() {
            Ok(p) if p.leader != leader => {
                *held = Some(p);
                break;
            }
            Ok(p) => {
                size += p.bytes.len();
                batch.push(p);
            }
            Err(_) => break,
        }
    }
    batch
}

/// Sends one call for `batch` and hands each write its answer.
async fn send(raft: &Raft, network: &Network, mut batch: Vec<Pending>) {
    let Some(leader) = batch.first().map(|p| p.leader) else { return };
    let deadline = batch.iter().map(|p| p.deadline).min().unwrap_or_else(Instant::now);
    if batch.len() == 1 {
        let Some(p) = batch.pop() else { return };
        let answer = crate::node::ask_leader(raft, network, leader, Rpc::Forward, p.bytes, deadline).await;
        let _ = p.done.send(answer);
        return;
    }
    let (list, waiting): (Vec<Vec<u8>>, Vec<oneshot::Sender<Answer>>) =
        batch.into_iter().map(|p| (p.bytes, p.done)).unzip();
    let answers = call_batch(raft, network, leader, list, deadline, waiting.len()).await;
    match answers {
        Ok(Some(list)) => {
            for (done, answer) in waiting.into_iter().zip(list) {
                let _ = done.send(Ok(Some(answer)));
            }
        }
        Ok(None) => {
            for done in waiting {
                let _ = done.send(Ok(None));
            }
        }
        Err(e) => {
            for done in waiting {
                let _ = done.send(Err(e.clone()));
            }
        }
    }
}

/// One `ForwardBatch` call: the answers in order, `Ok(None)` if it was
/// certainly not delivered.
async fn call_batch(
    raft: &Raft,
    network: &Network,
    leader: NodeId,
    list: Vec<Vec<u8>>,
    deadline: Instant,
    count: usize,
) -> Result<Option<Vec<Forwarded<Response>>>, Error> {
    let node = raft.metrics().borrow().membership_config.membership().get_node(&leader).cloned();
    let Some(node) = node else { return Ok(None) };
    let timeout = deadline.saturating_duration_since(Instant::now()).max(std::time::Duration::from_millis(1));
    match network.call(leader, &node.addr, Rpc::ForwardBatch, encode(&list)?, timeout).await {
        Ok(bytes) => {
            let answers: Vec<Forwarded<Response>> = decode(&bytes)?;
            if answers.len() != count {
                // The writes were delivered; what became of them is unknown.
                return Err(Error::Timeout);
            }
            Ok(Some(answers))
        }
        Err(CallError::NotSent(_)) => Ok(None),
        Err(CallError::Unknown(m)) => {
            tracing::debug!(leader, "forwarding {count} writes to the leader failed: {m}");
            Err(Error::Timeout)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(leader: NodeId, tag: u8) -> Pending {
        Pending { leader, bytes: vec![tag], deadline: Instant::now(), done: oneshot::channel().0 }
    }

    fn tags(batch: &[Pending]) -> Vec<u8> {
        batch.iter().map(|p| p.bytes[0]).collect()
    }

    #[test]
    fn a_batch_goes_to_one_leader() {
        let (tx, mut rx) = mpsc::channel(16);
        for p in [pending(1, 2), pending(2, 3), pending(2, 4)] {
            tx.try_send(p).expect("queued");
        }
        let mut held = None;
        assert_eq!(tags(&gather(pending(1, 1), &mut rx, &mut held)), vec![1, 2]);
        let other = held.take().expect("held back");
        assert_eq!(tags(&gather(other, &mut rx, &mut held)), vec![3, 4]);
        assert!(held.is_none());
    }
}
