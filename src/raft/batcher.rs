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

use openraft::error::{ClientWriteError, RaftError};
use prost::Message;
use tokio::sync::{mpsc, oneshot};

use super::gather::{Limits, Queued};
use super::{decode, NodeId, Raft, Request, Response, WritesInFlight};
use crate::error::Error;
use crate::node::Forwarded;
use crate::proto::kvdpb::{command, Command, CommandBatch};

/// Entries being committed at once.
pub const MAX_IN_FLIGHT: usize = 2;
/// Most proposals in one entry.
pub const MAX_BATCH: usize = 1024;
/// A batch closes once its proposals add up to this many bytes.
pub const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Proposals waiting for a batch; past this, proposers wait their turn.
const QUEUE: usize = 4 * MAX_BATCH;

struct Pending {
    bytes: Vec<u8>,
    alone: bool,
    done: oneshot::Sender<Forwarded<Response>>,
}

/// The queue of proposals to this member's Raft.
pub struct Proposals {
    tx: mpsc::Sender<Pending>,
    writes: WritesInFlight,
}

impl Proposals {
    /// Starts the batching task for `raft`; it ends when this is dropped.
    /// Each proposal is counted in `writes` while it waits.
    pub fn start(raft: Raft, writes: WritesInFlight) -> Proposals {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(raft, rx));
        Proposals { tx, writes }
    }

    /// Client writes this member is handling: waiting, proposed or being
    /// forwarded to the leader.
    pub fn pending(&self) -> usize {
        self.writes.count()
    }

    /// Proposes an encoded `Command` and waits for what applying it
    /// produced; `alone` puts it in an entry of its own. `NotLeader` means it
    /// was not appended here.
    pub async fn propose(&self, bytes: Vec<u8>, alone: bool) -> Forwarded<Response> {
        let _counted = self.writes.enter();
        let (done, answer) = oneshot::channel();
        if self.tx.send(Pending { bytes, alone, done }).await.is_err() {
            return Forwarded::Failed(Error::Stopped);
        }
        answer.await.unwrap_or(Forwarded::Failed(Error::Stopped))
    }
}

const LIMITS: Limits = Limits { in_flight: MAX_IN_FLIGHT, items: MAX_BATCH, bytes: MAX_BATCH_BYTES };

/// A proposal joins the entry of the ones before it unless either must go
/// alone.
impl Queued for Pending {
    fn size(&self) -> usize {
        self.bytes.len()
    }

    fn joins(&self, first: &Self) -> bool {
        !self.alone && !first.alone
    }
}

async fn run(raft: Raft, rx: mpsc::Receiver<Pending>) {
    super::gather::run(rx, LIMITS, |batch| {
        let raft = raft.clone();
        async move { commit(&raft, batch).await }
    })
    .await
}

/// Commits one entry holding `batch` and answers each proposer.
async fn commit(raft: &Raft, mut batch: Vec<Pending>) {
    if batch.len() == 1 {
        let Some(p) = batch.pop() else { return };
        let answer = match raft.client_write(Request(p.bytes)).await {
            Ok(written) => Forwarded::Done(written.data),
            Err(e) => rejected(e).answer(),
        };
        let _ = p.done.send(answer);
        return;
    }
    let (bytes, waiting): (Vec<Vec<u8>>, Vec<oneshot::Sender<Forwarded<Response>>>) =
        batch.into_iter().map(|p| (p.bytes, p.done)).unzip();
    let entry = Command { op: Some(command::Op::Batch(CommandBatch { commands: bytes })) }.encode_to_vec();
    match raft.client_write(Request(entry)).await {
        Ok(written) => {
            let responses = written.data.0.and_then(|list| decode::<Vec<Response>>(&list)).and_then(|list| {
                if list.len() == waiting.len() {
                    Ok(list)
                } else {
                    Err(Error::internal("a command batch answered with the wrong number of responses"))
                }
            });
            match responses {
                Ok(list) => {
                    for (done, resp) in waiting.into_iter().zip(list) {
                        let _ = done.send(Forwarded::Done(resp));
                    }
                }
                Err(e) => {
                    for done in waiting {
                        let _ = done.send(Forwarded::Failed(e.clone()));
                    }
                }
            }
        }
        Err(e) => {
            let why = rejected(e);
            for done in waiting {
                let _ = done.send(why.answer());
            }
        }
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

    fn pending(tag: u8, alone: bool) -> Pending {
        Pending { bytes: vec![tag], alone, done: oneshot::channel().0 }
    }

    fn tags(batch: &[Pending]) -> Vec<u8> {
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
