//! etcd's Range, Put and DeleteRange over the MVCC store, with etcd's
//! validation, limits, sorting and filters.

use super::keys::RangeEnd;
use super::{MvccStore, Writer};
use crate::error::{Error, Result};
use crate::proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use crate::proto::etcdserverpb::{
    DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse, RangeRequest, RangeResponse, ResponseHeader,
};
use crate::proto::mvccpb::KeyValue;

/// A header that carries only a revision; the gRPC layer fills in the ids and
/// term of top-level responses (responses nested in a Txn keep only this).
pub fn rev_header(revision: i64) -> Option<ResponseHeader> {
    Some(ResponseHeader { revision, ..Default::default() })
}

/// Checks a Range request as etcd does before serving it.
pub fn check_range(req: &RangeRequest) -> Result<()> {
    if req.key.is_empty() {
        return Err(Error::EmptyKey);
    }
    if SortOrder::try_from(req.sort_order).is_err() || SortTarget::try_from(req.sort_target).is_err() {
        return Err(Error::InvalidSortOption);
    }
    Ok(())
}

/// Checks a Put request as etcd does before proposing it.
pub fn check_put(req: &PutRequest) -> Result<()> {
    if req.key.is_empty() {
        return Err(Error::EmptyKey);
    }
    if req.ignore_value && !req.value.is_empty() {
        return Err(Error::ValueProvided);
    }
    if req.ignore_lease && req.lease != 0 {
        return Err(Error::LeaseProvided);
    }
    Ok(())
}

/// Checks a DeleteRange request as etcd does before proposing it.
pub fn check_delete(req: &DeleteRangeRequest) -> Result<()> {
    if req.key.is_empty() {
        return Err(Error::EmptyKey);
    }
    Ok(())
}

/// Serves a Range on `store` as seen at revision `current` (the store's
/// revision, or the revision a write in progress sees).
pub fn range(store: &MvccStore, current: i64, req: &RangeRequest) -> Result<RangeResponse> {
    let rev = store.check_read_rev(req.revision, current)?;
    let end = RangeEnd::from_request(&req.range_end);
    let filtered = req.min_mod_revision != 0
        || req.max_mod_revision != 0
        || req.min_create_revision != 0
        || req.max_create_revision != 0;
    // Like etcd: fetch everything when sorting or filtering, else one more
    // than the limit, to tell whether there is more.
    let fetch = if req.sort_order != SortOrder::None as i32 || filtered {
        usize::MAX
    } else if req.limit > 0 {
        (req.limit as usize).saturating_add(1)
    } else {
        usize::MAX
    };
    let mut count = 0usize;
    let mut kvs = Vec::new();
    if rev == current {
        // Values are read only for the key-values returned (or sorted by).
        let load = !req.keys_only || req.sort_target == SortTarget::Value as i32;
        for (key, meta) in store.current(&req.key, &end) {
            if !req.count_only
                && kvs.len() < fetch
                && (!filtered || passes(req, meta.mod_revision, meta.create_revision))
            {
                kvs.push(if load { store.load(key, meta)? } else { meta.without_value(key) });
            }
            count += 1;
        }
    } else {
        let all = store.at_revision(&req.key, &end, rev)?;
        count = all.len();
        if !req.count_only {
            kvs = all.into_iter().take(fetch).collect();
        }
    }
    if filtered {
        kvs.retain(|kv| passes(req, kv.mod_revision, kv.create_revision));
    }
    sort(&mut kvs, req.sort_order, req.sort_target);
    let mut more = false;
    if req.limit > 0 && kvs.len() > req.limit as usize {
        kvs.truncate(req.limit as usize);
        more = true;
    }
    if req.keys_only {
        for kv in &mut kvs {
            kv.value.clear();
        }
    }
    Ok(RangeResponse { header: rev_header(current), kvs, more, count: count as i64 })
}

/// Whether a key-value with these revisions passes the request's filters.
fn passes(req: &RangeRequest, mod_revision: i64, create_revision: i64) -> bool {
    !(req.max_mod_revision != 0 && mod_revision > req.max_mod_revision
        || req.min_mod_revision != 0 && mod_revision < req.min_mod_revision
        || req.max_create_revision != 0 && create_revision > req.max_create_revision
        || req.min_create_revision != 0 && create_revision < req.min_create_revision)
}

fn sort(kvs: &mut [KeyValue], order: i32, target: i32) {
    let target = SortTarget::try_from(target).unwrap_or(SortTarget::Key);
    let mut order = SortOrder::try_from(order).unwrap_or(SortOrder::None);
    if target != SortTarget::Key && order == SortOrder::None {
        order = SortOrder::Ascend;
    }
    if order == SortOrder::None || (order == SortOrder::Ascend && target == SortTarget::Key) {
        return;
    }
    match target {
        SortTarget::Key => kvs.sort_by(|a, b| a.key.cmp(&b.key)),
        SortTarget::Version => kvs.sort_by_key(|kv| kv.version),
        SortTarget::Create => kvs.sort_by_key(|kv| kv.create_revision),
        SortTarget::Mod => kvs.sort_by_key(|kv| kv.mod_revision),
        SortTarget::Value => kvs.sort_by(|a, b| a.value.cmp(&b.value)),
    }
    if order == SortOrder::Descend {
        kvs.reverse();
    }
}

/// What a Put needs to hold before it is applied; checked against the state
/// before any change of the request it belongs to.
pub fn check_put_applies(store: &MvccStore, req: &PutRequest) -> Result<()> {
    if req.lease != 0 && store.lease(req.lease).is_none() {
        return Err(Error::LeaseNotFound);
    }
    if (req.ignore_value || req.ignore_lease) && store.get(&req.key).is_none() {
        return Err(Error::KeyNotFound);
    }
    Ok(())
}

/// Applies a Put that passed [`check_put`] and [`check_put_applies`].
///
/// Its checks are done: it fails only if the previous value, when the request
/// needs it, cannot be read from disk. Should a Txn ever reach an
/// `ignore_value` put whose key its own earlier operations removed (the
/// duplicate-key check rules this out), the request's own value and lease are
/// used.
pub fn put(w: &mut Writer<'_>, req: &PutRequest) -> Result<PutResponse> {
    put_owned(w, req.clone())
}

/// [`put`] of a request this write may take apart: its value is moved into
/// the new version rather than copied.
pub fn put_owned(w: &mut Writer<'_>, mut req: PutRequest) -> Result<PutResponse> {
    if !(req.prev_kv || req.ignore_value || req.ignore_lease) {
        // Nothing of the previous version is needed here: the writer finds
        // it in the same walk of the index that replaces it.
        w.put(&req.key, std::mem::take(&mut req.value), req.lease);
        return Ok(PutResponse { header: rev_header(w.revision()), prev_kv: None });
    }
    let store = w.store();
    let prev = match store.get(&req.key) {
        Some(meta) if req.prev_kv || req.ignore_value => Some(store.load(&req.key, meta)?),
        Some(meta) => Some(meta.without_value(&req.key)),
        None => None,
    };
    let value = match (&prev, req.ignore_value) {
        (Some(p), true) => p.value.clone(),
        _ => std::mem::take(&mut req.value),
    };
    let lease = match (&prev, req.ignore_lease) {
        (Some(p), true) => p.lease,
        _ => req.lease,
    };
    w.put(&req.key, value, lease);
    Ok(PutResponse { header: rev_header(w.revision()), prev_kv: if req.prev_kv { prev } else { None } })
}

/// Applies a DeleteRange; it fails only if the deleted values, when the
/// request asks for them, cannot be read from disk.
pub fn delete_range(w: &mut Writer<'_>, req: &DeleteRangeRequest) -> Result<DeleteRangeResponse> {
    let end = RangeEnd::from_request(&req.range_end);
    let (deleted, prev_kvs) = w.delete_range(&req.key, &end, req.prev_kv)?;
    Ok(DeleteRangeResponse { header: rev_header(w.view_revision()), deleted: deleted as i64, prev_kvs })
}
