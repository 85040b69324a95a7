//! Locks and elections, as kvd serves them itself (etcd's v3lock and
//! v3election services) on top of keys, leases and the applied-revision
//! broadcast.
//!
//! A candidate (for a lock or for leadership) owns the key `<name>/<lease in
//! hex>`, created with its lease. Candidates queue in create-revision order:
//! the one with the lowest create revision holds the lock or leads. A waiting
//! candidate watches only its predecessor (the candidate created just before
//! it) and looks again when that key is deleted; it never polls. The key's
//! create revision is a fencing token: it grows with every new holder.

use std::sync::Arc;

use super::Member;
use crate::error::Error;
use crate::mvcc::keys::{prefix_end, RangeEnd};
use crate::proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use crate::proto::etcdserverpb::request_op::Request as Op;
use crate::proto::etcdserverpb::response_op::Response as OpResponse;
use crate::proto::etcdserverpb::{
    Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest, TxnResponse,
};
use crate::proto::mvccpb::event::EventType;
use crate::proto::mvccpb::KeyValue;

/// The key prefix of candidates for `name`.
pub fn candidates_prefix(name: &[u8]) -> Vec<u8> {
    let mut p = name.to_vec();
    p.push(b'/');
    p
}

/// The key a candidate with `lease` uses for `name`.
pub fn candidate_key(name: &[u8], lease: i64) -> Vec<u8> {
    let mut k = candidates_prefix(name);
    k.extend_from_slice(format!("{lease:x}").as_bytes());
    k
}

fn create_rev_is(key: &[u8], rev: i64) -> Compare {
    Compare {
        result: CompareResult::Equal as i32,
        target: CompareTarget::Create as i32,
        key: key.to_vec(),
        target_union: Some(TargetUnion::CreateRevision(rev)),
        range_end: Vec::new(),
    }
}

/// A candidate's key as it stands after [`Member::claim`].
pub struct Claim {
    /// Its key-value (value as stored, create revision = fencing token).
    pub kv: KeyValue,
    /// Whether this call created it (else it existed, from the same lease).
    pub created: bool,
    /// The revision of the claim.
    pub revision: i64,
}

impl Member {
    /// Runs a Txn through Raft, even one that only reads: its reads see the
    /// state at its own revision.
    pub async fn txn_write(&self, req: TxnRequest) -> Result<TxnResponse, Error> {
        self.write(req).await
    }

    /// Creates `key` with `value` and `lease` unless it exists.
    pub async fn claim(&self, key: &[u8], value: &[u8], lease: i64) -> Result<Claim, Error> {
        let put = PutRequest { key: key.to_vec(), value: value.to_vec(), lease, ..Default::default() };
        let get = RangeRequest { key: key.to_vec(), ..Default::default() };
        let resp = self
            .txn_write(TxnRequest {
                compare: vec![create_rev_is(key, 0)],
                success: vec![
                    RequestOp { request: Some(Op::RequestPut(put)) },
                    RequestOp { request: Some(Op::RequestRange(get.clone())) },
                ],
                failure: vec![RequestOp { request: Some(Op::RequestRange(get)) }],
            })
            .await?;
        let revision = resp.header.as_ref().map_or(0, |h| h.revision);
        let kv = resp
            .responses
            .iter()
            .find_map(|r| match &r.response {
                Some(OpResponse::ResponseRange(rr)) => rr.kvs.first().cloned(),
                _ => None,
            })
            .ok_or_else(|| Error::internal("claimed key missing from its own txn"))?;
        Ok(Claim { kv, created: resp.succeeded, revision })
    }

    /// Puts `value` on `key` if its create revision is still `rev`; false if
    /// the key is gone or was re-created.
    pub async fn put_if_created_at(&self, key: &[u8], rev: i64, value: &[u8], lease: i64) -> Result<bool, Error> {
        let put = PutRequest { key: key.to_vec(), value: value.to_vec(), lease, ..Default::default() };
        let resp = self
            .txn_write(TxnRequest {
                compare: vec![create_rev_is(key, rev)],
                success: vec![RequestOp { request: Some(Op::RequestPut(put)) }],
                failure: Vec::new(),
            })
            .await?;
        Ok(resp.succeeded)
    }

    /// Deletes `key` if its create revision is still `rev`.
    pub async fn delete_if_created_at(&self, key: &[u8], rev: i64) -> Result<TxnResponse, Error> {
        let del = DeleteRangeRequest { key: key.to_vec(), ..Default::default() };
        self.txn_write(TxnRequest {
            compare: vec![create_rev_is(key, rev)],
            success: vec![RequestOp { request: Some(Op::RequestDeleteRange(del)) }],
            failure: Vec::new(),
        })
        .await
    }

    /// Deletes `key`.
    pub async fn delete_key(&self, key: &[u8]) -> Result<i64, Error> {
        let del = DeleteRangeRequest { key: key.to_vec(), ..Default::default() };
        let resp = self.write(del).await?;
        Ok(resp.header.map_or(0, |h| h.revision))
    }

    /// Waits until the candidate `key` (created at `rev`) is first in line
    /// under `prefix`: no live key there has a lower create revision. Fails
    /// with [`Error::SessionExpired`] if the candidate's own key goes away
    /// while it waits (its lease expired or it was deleted).
    pub async fn wait_turn(&self, prefix: &[u8], key: &[u8], rev: i64) -> Result<(), Error> {
        // Local state must include the claim before we look at it.
        self.read_barrier().await?;
        let end = RangeEnd::Before(prefix_end(prefix));
        loop {
            let (mut rx, _) = self.state.subscribe();
            let predecessor = {
                let state = self.state.read();
                if state.store.get(key).map(|kv| kv.create_revision) != Some(rev) {
                    return Err(Error::SessionExpired);
                }
                state
                    .store
                    .current(prefix, &end)
                    .filter(|(_, m)| m.create_revision < rev)
                    .max_by_key(|(_, m)| m.create_revision)
                    .map(|(k, _)| k.to_vec())
            };
            let Some(predecessor) = predecessor else { return Ok(()) };
            // Wait for the predecessor's deletion (or our own).
            'wait: loop {
                let applied = tokio::select! {
                    applied = rx.recv() => applied,
                    _ = self.stopped() => return Err(Error::Stopped),
                };
                match applied {
                    Ok(applied) => {
                        let gone = applied.events.is_empty()
                            || applied.events.iter().any(|e| {
                                e.r#type == EventType::Delete as i32
                                    && e.kv.as_ref().is_some_and(|kv| kv.key == predecessor || kv.key == key)
                            });
                        if gone {
                            break 'wait;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break 'wait,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return Err(Error::Stopped),
                }
            }
        }
    }

    /// The live key under `prefix` with the lowest create revision.
    pub fn first_candidate(&self, prefix: &[u8]) -> Result<Option<KeyValue>, Error> {
        let state = self.state.read();
        let end = RangeEnd::Before(prefix_end(prefix));
        let first = state.store.current(prefix, &end).min_by_key(|(_, m)| m.create_revision);
        first.map(|(k, m)| state.store.load(k, m)).transpose()
    }
}

/// Deletes a candidate's key if the request that created it is abandoned
/// (its client went away) before it completes.
pub struct Abandon {
    node: Arc<Member>,
    key: Option<(Vec<u8>, i64)>,
}

impl Abandon {
    /// Guards `key`, created at `rev`, when `created`.
    pub fn new(node: Arc<Member>, key: &[u8], rev: i64, created: bool) -> Self {
        Abandon { node, key: created.then(|| (key.to_vec(), rev)) }
    }

    /// The request completed: keep the key.
    pub fn disarm(mut self) {
        self.key = None;
    }
}

impl Drop for Abandon {
    fn drop(&mut self) {
        if let Some((key, rev)) = self.key.take() {
            let node = self.node.clone();
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    if let Err(e) = node.delete_if_created_at(&key, rev).await {
                        tracing::warn!("removing an abandoned candidate key failed: {e}");
                    }
                });
            }
        }
    }
}
