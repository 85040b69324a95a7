//! Forwarding batching on a follower.
//!
//! A follower sends the writes its clients make to the leader. One peer call
//! per write costs a gRPC exchange on both members for every write, so
//! writes that arrive while earlier forwards are on their way are gathered
//! and sent in one `ForwardBatch` call; the leader proposes each of them (its
//! batcher puts them in one entry) and answers each. A lone write goes as a
//! batch of one. The calls go on long-lived streams to the leader (see
//! [`Network::call`]).
//!
//! Each write gets the answer it would have got alone: its own result, "not
//! the leader", "not sent" (safe to retry) or, when the call may have
//! reached the leader but no answer came back, a timeout.

use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use super::gather::{Limits, Queued};
use super::leader::{ask_leader, Forwarded, Proposal};
use super::network::{Network, Rpc};
use super::{encode, NodeId, Raft, Response, WritesInFlight};
use crate::error::Error;

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
pub type ForwardAnswer = Result<Option<Forwarded<Response>>, Error>;

struct Forwarding {
    leader: NodeId,
    proposal: Proposal,
    deadline: Instant,
    done: oneshot::Sender<ForwardAnswer>,
}

/// The queue of writes this member forwards to the leader.
pub struct Forwarder {
    tx: mpsc::Sender<Forwarding>,
    writes: WritesInFlight,
}

impl Forwarder {
    /// Starts the forwarding task; it ends when this is dropped. Each write
    /// is counted in `writes` while it waits.
    pub fn start(raft: Raft, network: Network, writes: WritesInFlight) -> Forwarder {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(raft, network, rx));
        Forwarder { tx, writes }
    }

    /// Forwards a proposal to `leader`, waiting at most until `deadline`.
    pub async fn forward(&self, leader: NodeId, proposal: Proposal, deadline: Instant) -> ForwardAnswer {
        let _counted = self.writes.enter();
        let (done, answer) = oneshot::channel();
        if self.tx.send(Forwarding { leader, proposal, deadline, done }).await.is_err() {
            return Err(Error::Stopped);
        }
        answer.await.unwrap_or(Err(Error::Stopped))
    }
}

const LIMITS: Limits = Limits { in_flight: MAX_IN_FLIGHT, items: MAX_BATCH, bytes: MAX_BATCH_BYTES };

/// Writes go in one call when they go to the same leader.
impl Queued for Forwarding {
    fn size(&self) -> usize {
        self.proposal.command.len()
    }

    fn joins(&self, first: &Self) -> bool {
        self.leader == first.leader
    }
}

async fn run(raft: Raft, network: Network, rx: mpsc::Receiver<Forwarding>) {
    super::gather::run(rx, LIMITS, |batch| {
        let (raft, network) = (raft.clone(), network.clone());
        async move { send(&raft, &network, batch).await }
    })
    .await
}

/// Sends one call for `batch` and hands each write its answer.
async fn send(raft: &Raft, network: &Network, batch: Vec<Forwarding>) {
    let Some(leader) = batch.first().map(|p| p.leader) else { return };
    let deadline = batch.iter().map(|p| p.deadline).min().unwrap_or_else(Instant::now);
    let (list, waiting): (Vec<Proposal>, Vec<oneshot::Sender<ForwardAnswer>>) =
        batch.into_iter().map(|p| (p.proposal, p.done)).unzip();
    let answers = match encode(&list) {
        Ok(payload) => {
            ask_leader::<Vec<Forwarded<Response>>>(raft, network, leader, Rpc::ForwardBatch, payload, deadline)
                .await
                // Delivered, but with the wrong number of answers: what became
                // of the writes is unknown.
                .and_then(|a| match a {
                    Some(list) if list.len() != waiting.len() => Err(Error::Timeout),
                    a => Ok(a),
                })
        }
        Err(e) => Err(e.into()),
    };
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

#[cfg(test)]
mod tests {
    use super::super::gather::gather;
    use super::*;

    fn pending(leader: NodeId, tag: u8) -> Forwarding {
        Forwarding {
            leader,
            proposal: Proposal { command: vec![tag], alone: false },
            deadline: Instant::now(),
            done: oneshot::channel().0,
        }
    }

    fn tags(batch: &[Forwarding]) -> Vec<u8> {
        batch.iter().map(|p| p.proposal.command[0]).collect()
    }

    #[test]
    fn a_batch_goes_to_one_leader() {
        let (tx, mut rx) = mpsc::channel(16);
        for p in [pending(1, 2), pending(2, 3), pending(2, 4)] {
            tx.try_send(p).expect("queued");
        }
        let mut held = None;
        assert_eq!(tags(&gather(pending(1, 1), &mut rx, &mut held, LIMITS)), vec![1, 2]);
        let other = held.take().expect("held back");
        assert_eq!(tags(&gather(other, &mut rx, &mut held, LIMITS)), vec![3, 4]);
        assert!(held.is_none());
    }
}
