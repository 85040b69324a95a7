//! etcd's Txn: validation (op limits, duplicate keys), compares, and applying
//! the chosen branch, nested transactions included.
//!
//! As in etcd, every compare of the whole nested transaction is evaluated
//! against the state before the transaction, the chosen branches are checked
//! before anything changes, and then the operations run in order, each seeing
//! the effects of the ones before it.

use std::collections::HashSet;

use super::keys::RangeEnd;
use super::ops::{self, rev_header};
use super::StoreError;
use super::{MvccStore, Writer};
use crate::error::{Error, Result};
use crate::proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use crate::proto::etcdserverpb::request_op::Request;
use crate::proto::etcdserverpb::response_op::Response;
use crate::proto::etcdserverpb::{Compare, RequestOp, ResponseOp, TxnRequest, TxnResponse};
use crate::proto::mvccpb::KeyValue;

/// Checks a Txn as etcd does before proposing it: operation counts, each
/// operation, and that no key is written twice.
pub fn check_txn(req: &TxnRequest, max_ops: usize) -> Result<()> {
    if req.compare.len() > max_ops || req.success.len() > max_ops || req.failure.len() > max_ops {
        return Err(Error::TooManyOps);
    }
    for op in req.success.iter().chain(&req.failure) {
        match &op.request {
            Some(Request::RequestRange(r)) => ops::check_range(r)?,
            Some(Request::RequestPut(p)) => ops::check_put(p)?,
            Some(Request::RequestDeleteRange(d)) => ops::check_delete(d)?,
            Some(Request::RequestTxn(t)) => check_txn(t, max_ops)?,
            None => {}
        }
    }
    check_intervals(&req.success)?;
    check_intervals(&req.failure)?;
    Ok(())
}

/// Key ranges deleted by a Txn: `[key, range_end)`, the single key, or with
/// a `"\0"` range end every key from `key` on. (etcd 3.4 compares `"\0"` as
/// a plain byte string here, so it misses a put after a from-key delete and
/// then fails while applying; kvd rejects such a Txn as a duplicate key.)
struct Deletes(Vec<(Vec<u8>, RangeEnd)>);

impl Deletes {
    fn hits(&self, k: &[u8]) -> bool {
        self.0.iter().any(|(key, end)| end.contains(key, k))
    }
}

/// Returns the keys put and the ranges deleted by `ops` (and the operations
/// nested in them), or `DuplicateKey` if a key is written twice. A key may be
/// put in both branches of a nested Txn, which are exclusive.
fn check_intervals(ops: &[RequestOp]) -> Result<(HashSet<Vec<u8>>, Deletes)> {
    let mut dels = Deletes(Vec::new());
    for op in ops {
        if let Some(Request::RequestDeleteRange(d)) = &op.request {
            dels.0.push((d.key.clone(), RangeEnd::from_request(&d.range_end)));
        }
    }
    let mut puts: HashSet<Vec<u8>> = HashSet::new();
    for op in ops {
        let Some(Request::RequestTxn(t)) = &op.request else { continue };
        let (puts_then, dels_then) = check_intervals(&t.success)?;
        let (puts_else, dels_else) = check_intervals(&t.failure)?;
        for k in &puts_then {
            if puts.contains(k) || dels.hits(k) {
                return Err(Error::DuplicateKey);
            }
            puts.insert(k.clone());
        }
        for k in puts_else {
            if (puts.contains(&k) && !puts_then.contains(&k)) || dels.hits(&k) {
                return Err(Error::DuplicateKey);
            }
            puts.insert(k);
        }
        dels.0.extend(dels_then.0);
        dels.0.extend(dels_else.0);
    }
    for op in ops {
        if let Some(Request::RequestPut(p)) = &op.request {
            if puts.contains(&p.key) || dels.hits(&p.key) {
                return Err(Error::DuplicateKey);
            }
            puts.insert(p.key.clone());
        }
    }
    Ok((puts, dels))
}

/// Whether no branch of the Txn writes.
pub fn is_read_only(req: &TxnRequest) -> bool {
    req.success.iter().chain(&req.failure).all(|op| match &op.request {
        Some(Request::RequestPut(_)) | Some(Request::RequestDeleteRange(_)) => false,
        Some(Request::RequestTxn(t)) => is_read_only(t),
        _ => true,
    })
}

/// Whether the Txn may be served from local state without a read barrier:
/// it has operations, and every one is a serializable Range. etcd also
/// serves a Txn with no operations (compares only) locally; kvd does not,
/// because such a Txn is how clients check state, and a stale answer there
/// is a wrong answer.
pub fn is_serializable(req: &TxnRequest) -> bool {
    let ops: Vec<&RequestOp> = req.success.iter().chain(&req.failure).collect();
    !ops.is_empty() && ops.iter().all(|op| matches!(&op.request, Some(Request::RequestRange(r)) if r.serializable))
}

/// Evaluates the compares of the Txn and of the nested Txns on the chosen
/// branches, in pre-order.
fn compare_path(store: &MvccStore, req: &TxnRequest, path: &mut Vec<bool>) -> Result<()> {
    let mut ok = true;
    for c in &req.compare {
        if !compare(store, c)? {
            ok = false;
            break;
        }
    }
    path.push(ok);
    for op in if ok { &req.success } else { &req.failure } {
        if let Some(Request::RequestTxn(t)) = &op.request {
            compare_path(store, t, path)?;
        }
    }
    Ok(())
}

/// Evaluates one compare; only a compare on values reads them from disk.
fn compare(store: &MvccStore, c: &Compare) -> Result<bool> {
    let end = RangeEnd::from_request(&c.range_end);
    let mut keys = store.current(&c.key, &end).peekable();
    if keys.peek().is_none() {
        return Ok(c.target != CompareTarget::Value as i32 && compare_kv(c, &KeyValue::default()));
    }
    let values = c.target == CompareTarget::Value as i32;
    for (key, meta) in keys {
        let kv = if values { store.load(key, meta)? } else { meta.without_value(key) };
        if !compare_kv(c, &kv) {
            return Ok(false);
        }
    }
    Ok(true)
}

fn compare_kv(c: &Compare, kv: &KeyValue) -> bool {
    use std::cmp::Ordering;
    let int = |want: Option<i64>, have: i64| have.cmp(&want.unwrap_or(0));
    let ord: Ordering = match (CompareTarget::try_from(c.target), &c.target_union) {
        (Ok(CompareTarget::Value), u) => {
            let want: &[u8] = match u {
                Some(TargetUnion::Value(v)) => v,
                _ => &[],
            };
            kv.value.as_slice().cmp(want)
        }
        (Ok(CompareTarget::Version), u) => {
            int(matches_int(u, |u| if let TargetUnion::Version(v) = u { Some(*v) } else { None }), kv.version)
        }
        (Ok(CompareTarget::Create), u) => int(
            matches_int(u, |u| if let TargetUnion::CreateRevision(v) = u { Some(*v) } else { None }),
            kv.create_revision,
        ),
        (Ok(CompareTarget::Mod), u) => {
            int(matches_int(u, |u| if let TargetUnion::ModRevision(v) = u { Some(*v) } else { None }), kv.mod_revision)
        }
        (Ok(CompareTarget::Lease), u) => {
            int(matches_int(u, |u| if let TargetUnion::Lease(v) = u { Some(*v) } else { None }), kv.lease)
        }
        (Err(_), _) => return false,
    };
    match CompareResult::try_from(c.result) {
        Ok(CompareResult::Equal) => ord == Ordering::Equal,
        Ok(CompareResult::NotEqual) => ord != Ordering::Equal,
        Ok(CompareResult::Greater) => ord == Ordering::Greater,
        Ok(CompareResult::Less) => ord == Ordering::Less,
        Err(_) => false,
    }
}

fn matches_int(u: &Option<TargetUnion>, f: impl Fn(&TargetUnion) -> Option<i64>) -> Option<i64> {
    u.as_ref().and_then(f)
}

/// Which operations [`check_branches`] checks.
#[derive(Clone, Copy, PartialEq)]
enum Check {
    Puts,
    Ranges,
}

/// Checks one kind of operation on the chosen branches against the state
/// before the Txn: puts (lease, ignore flags), or read revisions. etcd checks
/// every put of the Txn before any range, so errors come in that order.
fn check_branches(
    store: &MvccStore,
    req: &TxnRequest,
    path: &mut std::slice::Iter<'_, bool>,
    check: Check,
) -> Result<()> {
    let ok = *path.next().ok_or_else(|| StoreError::inconsistent("txn path too short"))?;
    for op in if ok { &req.success } else { &req.failure } {
        match &op.request {
            Some(Request::RequestTxn(t)) => check_branches(store, t, path, check)?,
            Some(Request::RequestPut(p)) if check == Check::Puts => ops::check_put_applies(store, p)?,
            Some(Request::RequestRange(r)) if check == Check::Ranges => {
                let first = if store.compacted() == 0 { -1 } else { store.compacted() };
                if r.revision != 0 && r.revision > store.revision() {
                    return Err(Error::FutureRev);
                }
                if r.revision != 0 && r.revision < first {
                    return Err(Error::Compacted);
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// Plans a Txn on the current state: evaluates its compares and checks the
/// chosen branches. Nothing changes.
pub fn plan(store: &MvccStore, req: &TxnRequest) -> Result<Vec<bool>> {
    let mut path = Vec::new();
    compare_path(store, req, &mut path)?;
    if !is_read_only(req) {
        check_branches(store, req, &mut path.iter(), Check::Puts)?;
    }
    check_branches(store, req, &mut path.iter(), Check::Ranges)?;
    Ok(path)
}

/// Applies a Txn planned by [`plan`] through a write.
pub fn apply(w: &mut Writer<'_>, req: &TxnRequest, path: &[bool]) -> Result<TxnResponse> {
    let mut resp = apply_branch(&mut Target::Write(w), req, &mut path.iter())?;
    resp.header = rev_header(w.view_revision());
    Ok(resp)
}

/// Serves a read-only Txn on the current state.
pub fn read_only(store: &MvccStore, req: &TxnRequest) -> Result<TxnResponse> {
    let path = plan(store, req)?;
    let mut resp = apply_branch(&mut Target::Read(store), req, &mut path.iter())?;
    resp.header = rev_header(store.revision());
    Ok(resp)
}

enum Target<'a, 'b> {
    Write(&'a mut Writer<'b>),
    Read(&'a MvccStore),
}

fn apply_branch(
    t: &mut Target<'_, '_>,
    req: &TxnRequest,
    path: &mut std::slice::Iter<'_, bool>,
) -> Result<TxnResponse> {
    let ok = *path.next().ok_or_else(|| StoreError::inconsistent("txn path too short"))?;
    let mut responses = Vec::new();
    for op in if ok { &req.success } else { &req.failure } {
        let response = match (&op.request, &mut *t) {
            (Some(Request::RequestRange(r)), Target::Write(w)) => {
                Response::ResponseRange(ops::range(w.store(), w.view_revision(), r)?)
            }
            (Some(Request::RequestRange(r)), Target::Read(s)) => {
                Response::ResponseRange(ops::range(s, s.revision(), r)?)
            }
            (Some(Request::RequestPut(p)), Target::Write(w)) => Response::ResponsePut(ops::put(w, p)?),
            (Some(Request::RequestDeleteRange(d)), Target::Write(w)) => {
                Response::ResponseDeleteRange(ops::delete_range(w, d)?)
            }
            (Some(Request::RequestTxn(n)), t) => {
                let mut nested = apply_branch(t, n, path)?;
                nested.header = Some(Default::default());
                Response::ResponseTxn(nested)
            }
            (Some(_), Target::Read(_)) => return Err(StoreError::inconsistent("write in a read-only txn").into()),
            (None, _) => continue,
        };
        responses.push(ResponseOp { response: Some(response) });
    }
    Ok(TxnResponse { header: None, succeeded: ok, responses })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::etcdserverpb::{DeleteRangeRequest, PutRequest};

    fn put(key: &[u8]) -> RequestOp {
        RequestOp { request: Some(Request::RequestPut(PutRequest { key: key.to_vec(), ..Default::default() })) }
    }

    fn del(key: &[u8], end: &[u8]) -> RequestOp {
        let d = DeleteRangeRequest { key: key.to_vec(), range_end: end.to_vec(), prev_kv: false };
        RequestOp { request: Some(Request::RequestDeleteRange(d)) }
    }

    fn nested(success: Vec<RequestOp>, failure: Vec<RequestOp>) -> RequestOp {
        RequestOp { request: Some(Request::RequestTxn(TxnRequest { compare: vec![], success, failure })) }
    }

    fn txn(success: Vec<RequestOp>) -> TxnRequest {
        TxnRequest { compare: vec![], success, failure: vec![] }
    }

    #[test]
    fn a_key_written_twice_is_a_duplicate() {
        assert_eq!(check_txn(&txn(vec![put(b"a"), put(b"a")]), 128), Err(Error::DuplicateKey));
        assert_eq!(check_txn(&txn(vec![del(b"a", b"c"), put(b"b")]), 128), Err(Error::DuplicateKey));
        assert_eq!(check_txn(&txn(vec![nested(vec![put(b"a")], vec![]), put(b"a")]), 128), Err(Error::DuplicateKey));
        assert_eq!(check_txn(&txn(vec![del(b"a", b"b"), put(b"b")]), 128), Ok(()));
        // Both branches of a nested Txn may put the same key: only one runs.
        assert_eq!(check_txn(&txn(vec![nested(vec![put(b"a")], vec![put(b"a")])]), 128), Ok(()));
    }

    #[test]
    fn a_from_key_delete_covers_every_later_key() {
        // A nested from-key delete followed by a put of a key it covers must
        // be refused before it is proposed: applying it cannot be undone.
        let t = txn(vec![nested(vec![del(b"a/1", b"\0")], vec![]), nested(vec![put(b"b")], vec![])]);
        assert_eq!(check_txn(&t, 128), Err(Error::DuplicateKey));
        assert_eq!(check_txn(&txn(vec![del(b"b", b"\0"), put(b"a")]), 128), Ok(()));
    }

    #[test]
    fn op_counts_are_limited() {
        let many: Vec<RequestOp> = (0..3u8).map(|i| put(&[b'k', i])).collect();
        assert_eq!(check_txn(&txn(many.clone()), 3), Ok(()));
        assert_eq!(check_txn(&txn(many), 2), Err(Error::TooManyOps));
    }
}
