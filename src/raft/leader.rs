//! Reaching the leader: what a follower sends it, how it answers, and the one
//! loop every request that needs the leader retries in until it is answered.
//!
//! A member asks the leader for three things on a client's behalf: to propose
//! a write ([`Proposal`]), for a read index, and for a lease's deadline. Each
//! answer is a [`Forwarded`]: done, "not the leader" (with the leader the
//! receiver knows of), or failed. [`until_leader`] retries an attempt across
//! leader changes until it is answered or its deadline passes.

use std::future::Future;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::network::{CallError, Network, Rpc};
use super::{decode, encode, NodeId, Raft};
use crate::error::Error;

/// How a leader answers a forwarded proposal, read-index or lease request.
#[derive(Debug, Serialize, Deserialize)]
pub enum Forwarded<T> {
    /// The leader handled it.
    Done(T),
    /// The receiver is not the leader; it names the leader it knows of.
    NotLeader(Option<NodeId>),
    /// The leader could not handle it.
    Failed(Error),
}

/// A write on its way to the leader's log: the encoded `kvdpb::Command`, as
/// it goes into the log, and what the leader needs to know of it without
/// decoding it again.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Proposal {
    /// The encoded `kvdpb::Command`.
    #[serde(with = "serde_bytes")]
    pub command: Vec<u8>,
    /// Whether it must have a log entry of its own (it reads history while
    /// it is applied; see `state_machine::reads_history`).
    pub alone: bool,
}

/// What one attempt of [`until_leader`] came to.
pub enum Attempt<T> {
    /// An answer for the caller, a success or a final failure.
    Answered(Result<T, Error>),
    /// No leader answered; `stale` is the leader the attempt tried, if any.
    /// The loop waits for another before the next attempt.
    Retry {
        /// The leader that was tried and did not answer.
        stale: Option<NodeId>,
    },
}

impl<T> From<Forwarded<T>> for Attempt<T> {
    fn from(f: Forwarded<T>) -> Self {
        match f {
            Forwarded::Done(t) => Attempt::Answered(Ok(t)),
            Forwarded::Failed(e) => Attempt::Answered(Err(e)),
            Forwarded::NotLeader(leader) => Attempt::Retry { stale: leader },
        }
    }
}

/// Runs `attempt` until it is answered, waiting for a new leader between
/// tries. Past `deadline` it answers "request timed out" when a leader is
/// known (the request may have reached it) and "no leader" when none is.
pub async fn until_leader<T, F, Fut>(raft: &Raft, deadline: Instant, mut attempt: F) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Attempt<T>>,
{
    loop {
        let stale = match attempt().await {
            Attempt::Answered(answer) => return answer,
            Attempt::Retry { stale } => stale,
        };
        if Instant::now() >= deadline {
            let known = raft.metrics().borrow().current_leader.is_some();
            return Err(if known { Error::Timeout } else { Error::NoLeader });
        }
        await_leader(raft, stale, deadline).await;
    }
}

/// Waits, up to `deadline` (and at most 100 ms), until `raft` knows a leader
/// other than `stale`.
pub async fn await_leader(raft: &Raft, stale: Option<NodeId>, deadline: Instant) {
    let wait = deadline.saturating_duration_since(Instant::now()).min(Duration::from_millis(100));
    let _ = raft.wait(Some(wait)).metrics(|m| m.current_leader.is_some() && m.current_leader != stale, "leader").await;
}

/// Sends `rpc` to `leader` over `network` and decodes its answer, a `T`
/// (mostly a [`Forwarded`]). `Ok(None)` means it was certainly not delivered
/// (or the leader's address is not known), so it may be retried; a request
/// that may have arrived but got no answer is `Err(Timeout)`.
pub async fn ask_leader<T: serde::de::DeserializeOwned>(
    raft: &Raft,
    network: &Network,
    leader: NodeId,
    rpc: Rpc,
    payload: Vec<u8>,
    deadline: Instant,
) -> Result<Option<T>, Error> {
    let node = raft.metrics().borrow().membership_config.membership().get_node(&leader).cloned();
    let Some(node) = node else { return Ok(None) };
    let timeout = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    match network.call(leader, &node.addr, rpc, payload, timeout).await {
        Ok(bytes) => Ok(Some(decode(&bytes)?)),
        Err(CallError::NotSent(_)) => Ok(None),
        Err(CallError::Unknown(m) | CallError::Broken(m) | CallError::TimedOut(m)) => {
            tracing::debug!(leader, ?rpc, "request to the leader failed: {m}");
            Err(Error::Timeout)
        }
    }
}

/// What asking `leader` for something that may safely be asked again (a
/// read index, a lease's deadline) came to: its answer, or a retry when it
/// was not the leader, was not reached or did not answer in time. (A write
/// that may have arrived is never asked again: see `Member::propose`.)
pub fn idempotent_attempt<T>(leader: NodeId, asked: Result<Option<Forwarded<T>>, Error>) -> Attempt<T> {
    match asked {
        Ok(Some(answer @ (Forwarded::Done(_) | Forwarded::Failed(_)))) => answer.into(),
        Ok(Some(Forwarded::NotLeader(_)) | None) | Err(Error::Timeout) => Attempt::Retry { stale: Some(leader) },
        Err(e) => Attempt::Answered(Err(e)),
    }
}

/// Encodes a peer answer; an answer that cannot be encoded becomes a failure.
pub fn encode_answer<T: Serialize>(answer: &Forwarded<T>) -> Vec<u8> {
    encode(answer).unwrap_or_else(|e| encode(&Forwarded::<()>::Failed(e.into())).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forwarded_answer_becomes_an_attempt() {
        assert!(matches!(Attempt::from(Forwarded::Done(3)), Attempt::Answered(Ok(3))));
        assert!(matches!(
            Attempt::<u8>::from(Forwarded::Failed(Error::LeaseNotFound)),
            Attempt::Answered(Err(Error::LeaseNotFound))
        ));
        assert!(matches!(Attempt::<u8>::from(Forwarded::NotLeader(Some(7))), Attempt::Retry { stale: Some(7) }));
    }

    #[test]
    fn a_proposal_keeps_its_bytes_and_flag_through_the_peer_encoding() {
        let p = Proposal { command: vec![1, 2, 3], alone: true };
        let back: Proposal = decode(&encode(&p).unwrap()).unwrap();
        assert_eq!(back.command, p.command);
        assert!(back.alone);
    }
}
