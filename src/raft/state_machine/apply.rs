//! Applying one command to the store, and which commands read history while
//! they are applied.

use prost::Message;

use super::super::committer::Committer;
use super::super::Response;
use super::group::Group;
use super::records::alarm_key;
use super::view::State;
use super::ATTRS;
use crate::error::Error;
use crate::mvcc::{ops, txn, Batch};
use crate::proto::etcdserverpb::alarm_request::AlarmAction;
use crate::proto::etcdserverpb::{
    request_op, AlarmMember, AlarmResponse, AlarmType, CompactionResponse, LeaseGrantResponse, LeaseRevokeRequest,
    LeaseRevokeResponse, TxnRequest,
};
use crate::proto::kvdpb::{command, command_result, AuthChange, Command, CommandResult, LeaseExpire};
use crate::proto::mvccpb::Event;
use std::collections::BTreeSet;

pub(super) fn decode_command(bytes: &[u8]) -> Option<Command> {
    Command::decode(bytes).ok()
}

/// Whether a command goes into a log entry of its own: one that reads
/// history from sled while it is applied (a Txn with a range at a set
/// revision), which sled must then hold up to date, so the entries before it
/// are committed first and an entry is never committed in part; or a
/// compaction, since an older kvd read history to compact and refuses a
/// compaction batched with other commands.
pub fn reads_history(op: &command::Op) -> bool {
    match op {
        command::Op::Txn(t) => txn_reads_history(t),
        command::Op::Compact(_) => true,
        _ => false,
    }
}

/// Whether a Txn has a range at a set revision, at any depth.
pub fn txn_reads_history(t: &TxnRequest) -> bool {
    t.success.iter().chain(&t.failure).any(|op| match &op.request {
        Some(request_op::Request::RequestRange(r)) => r.revision != 0,
        Some(request_op::Request::RequestTxn(inner)) => txn_reads_history(inner),
        _ => false,
    })
}

pub(super) type Applying = (Batch, Response, Vec<Event>);

/// The name etcd gives an alarm type, for logs.
pub fn alarm_name(alarm: i32) -> &'static str {
    AlarmType::try_from(alarm).map_or("UNKNOWN", |t| t.as_str_name())
}

/// The error a write gets while an alarm is raised, as etcd's capped and
/// corrupt appliers answer: with CORRUPT, every write; with NOSPACE, what
/// adds data (a put, a Txn with a put in any branch, a lease grant), while
/// deletes, compaction and lease revokes go on so that space can be freed.
/// It depends only on replicated state, so every member refuses alike.
pub fn refused_by_alarm(alarms: &BTreeSet<(u64, i32)>, op: &command::Op) -> Option<Error> {
    let raised = |t: AlarmType| alarms.iter().any(|(_, a)| *a == t as i32);
    let writes_data = matches!(
        op,
        command::Op::Put(_)
            | command::Op::DeleteRange(_)
            | command::Op::Txn(_)
            | command::Op::Compact(_)
            | command::Op::LeaseGrant(_)
            | command::Op::LeaseRevoke(_)
            | command::Op::LeaseExpire(_)
    );
    if writes_data && raised(AlarmType::Corrupt) {
        return Some(Error::Corrupt);
    }
    let adds = match op {
        command::Op::Put(_) | command::Op::LeaseGrant(_) => true,
        command::Op::Txn(t) => txn_puts(t),
        _ => false,
    };
    (adds && raised(AlarmType::Nospace)).then_some(Error::NoSpace)
}

/// Whether a Txn has a put in either branch, at any depth.
pub fn txn_puts(t: &TxnRequest) -> bool {
    t.success.iter().chain(&t.failure).any(|op| match &op.request {
        Some(request_op::Request::RequestPut(_)) => true,
        Some(request_op::Request::RequestTxn(inner)) => txn_puts(inner),
        _ => false,
    })
}

/// Applies one command, of a log entry of `term`. Errors a client caused
/// come back in the `Response`; an `Err` is a storage failure that leaves
/// the member unable to go on. Commands that read history first commit
/// `group` to `tree`; `in_batch` tells that earlier commands of the same
/// entry may be in `group`, which only whole entries may leave.
pub(super) fn apply_command(
    state: &mut State,
    command: Option<Command>,
    term: u64,
    group: &mut Group,
    committer: &Committer,
    in_batch: bool,
) -> Result<Applying, Error> {
    let refused = |e: Error| Ok((Batch::default(), Response(Err(e)), Vec::new()));
    let mut events = Vec::new();
    let Some(Command { op: Some(op), stamp }) = command else {
        return refused(Error::internal("undecodable command in the log"));
    };
    if in_batch && reads_history(&op) {
        // The batcher never does this; refusing is the same on every member.
        return refused(Error::internal("a command that reads history was batched with others"));
    }
    if let Err(e) = state.auth.check_command(stamp.as_ref(), &op, &state.store) {
        return refused(e);
    }
    if let Some(e) = refused_by_alarm(&state.alarms, &op) {
        return refused(e);
    }
    // The leader of one term decided this expiry on that term's deadlines.
    if let command::Op::LeaseExpire(e) = &op {
        if e.term != term {
            return refused(Error::StaleLeaseExpiry);
        }
    }
    let result = match op {
        // Batches are unpacked by the caller and never nested.
        command::Op::Batch(_) => return refused(Error::internal("a command batch inside a command batch")),
        command::Op::Put(p) => {
            if let Err(e) = ops::check_put_applies(&state.store, &p) {
                return refused(e);
            }
            let mut w = state.store.write();
            let resp = ops::put_owned(&mut w, p)?;
            let batch;
            (batch, events) = w.finish();
            (batch, command_result::Result::Put(resp))
        }
        command::Op::DeleteRange(d) => {
            let mut w = state.store.write();
            let resp = ops::delete_range(&mut w, &d)?;
            let batch;
            (batch, events) = w.finish();
            (batch, command_result::Result::DeleteRange(resp))
        }
        command::Op::Txn(t) => {
            if txn_reads_history(&t) {
                group.commit(&mut state.store, committer)?;
            }
            let path = match txn::plan(&state.store, &t) {
                Ok(path) => path,
                // A value that cannot be read is this member's fault, not
                // the request's: answering otherwise than the others would
                // let the members diverge.
                Err(e @ Error::Internal(_)) => return Err(e),
                Err(e) => return refused(e),
            };
            let mut w = state.store.write();
            let resp = txn::apply(&mut w, &t, &path)?;
            let batch;
            (batch, events) = w.finish();
            (batch, command_result::Result::Txn(resp))
        }
        command::Op::Compact(c) => {
            let mut batch = Batch::default();
            if let Err(e) = state.store.compact(c.revision, &mut batch) {
                return refused(e);
            }
            let header = ops::rev_header(state.store.revision());
            (batch, command_result::Result::Compact(CompactionResponse { header }))
        }
        command::Op::Publish(attrs) => {
            let mut batch = Batch::default();
            let mut key = vec![ATTRS];
            key.extend_from_slice(&attrs.id.to_be_bytes());
            batch.insert(key, attrs.encode_to_vec());
            state.attrs.insert(attrs.id, attrs);
            (batch, command_result::Result::Published(true))
        }
        command::Op::LeaseGrant(g) => {
            let mut batch = Batch::default();
            if !state.store.grant_lease(g.id, g.ttl, &mut batch) {
                return refused(Error::LeaseExist);
            }
            let header = ops::rev_header(state.store.revision());
            (
                batch,
                command_result::Result::LeaseGrant(LeaseGrantResponse {
                    header,
                    id: g.id,
                    ttl: g.ttl,
                    error: String::new(),
                }),
            )
        }
        command::Op::LeaseRevoke(LeaseRevokeRequest { id }) | command::Op::LeaseExpire(LeaseExpire { id, .. }) => {
            let mut w = state.store.write();
            if !w.revoke_lease(id) {
                return refused(Error::LeaseNotFound);
            }
            let header = ops::rev_header(w.revision());
            let batch;
            (batch, events) = w.finish();
            let header = if events.is_empty() { ops::rev_header(state.store.revision()) } else { header };
            (batch, command_result::Result::LeaseRevoke(LeaseRevokeResponse { header }))
        }
        command::Op::Alarm(a) => {
            let mut batch = Batch::default();
            let raised = (a.member_id, a.alarm);
            let member = AlarmMember { member_id: a.member_id, alarm: a.alarm };
            let alarms = match AlarmAction::try_from(a.action) {
                _ if AlarmType::try_from(a.alarm).is_err() => return refused(Error::UnknownAlarmType(a.alarm)),
                Ok(AlarmAction::Activate) => {
                    if state.alarms.insert(raised) {
                        tracing::warn!(member = %format!("{:x}", a.member_id), alarm = alarm_name(a.alarm), "alarm raised");
                        batch.insert(alarm_key(a.member_id, a.alarm), []);
                    }
                    vec![member]
                }
                Ok(AlarmAction::Deactivate) => {
                    if state.alarms.remove(&raised) {
                        tracing::info!(member = %format!("{:x}", a.member_id), alarm = alarm_name(a.alarm), "alarm cleared");
                        batch.remove(alarm_key(a.member_id, a.alarm));
                        vec![member]
                    } else {
                        Vec::new()
                    }
                }
                // GET is answered from the state, never proposed.
                _ => return refused(Error::UnknownAlarmAction(a.action)),
            };
            (batch, command_result::Result::Alarm(AlarmResponse { header: None, alarms }))
        }
        command::Op::Auth(AuthChange { change }) => {
            let mut batch = Batch::default();
            let Some(change) = change else { return refused(Error::internal("an empty auth change")) };
            match state.auth.apply(change, &state.tokens, &mut batch) {
                Ok(revision) => (batch, command_result::Result::AuthRevision(revision)),
                Err(e) => return refused(e),
            }
        }
    };
    let (batch, result) = result;
    let encoded = CommandResult { result: Some(result) }.encode_to_vec();
    Ok((batch, Response(Ok(serde_bytes::ByteBuf::from(encoded))), events))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::etcdserverpb::{
        CompactionRequest, DeleteRangeRequest, LeaseGrantRequest, LeaseRevokeRequest, PutRequest, RequestOp,
    };
    use crate::proto::kvdpb::MemberAttributes;

    #[test]
    fn alarms_refuse_writes_as_etcd_appliers_do() {
        let put = || command::Op::Put(PutRequest::default());
        let nested_put = TxnRequest {
            failure: vec![RequestOp {
                request: Some(request_op::Request::RequestTxn(TxnRequest {
                    success: vec![RequestOp { request: Some(request_op::Request::RequestPut(PutRequest::default())) }],
                    ..Default::default()
                })),
            }],
            ..Default::default()
        };
        let delete_only = TxnRequest {
            success: vec![RequestOp {
                request: Some(request_op::Request::RequestDeleteRange(DeleteRangeRequest::default())),
            }],
            ..Default::default()
        };
        let ops = [
            ("put", put()),
            ("txn with a nested put", command::Op::Txn(nested_put)),
            ("txn that deletes", command::Op::Txn(delete_only)),
            ("delete", command::Op::DeleteRange(DeleteRangeRequest::default())),
            ("compact", command::Op::Compact(CompactionRequest::default())),
            ("grant", command::Op::LeaseGrant(LeaseGrantRequest::default())),
            ("revoke", command::Op::LeaseRevoke(LeaseRevokeRequest::default())),
            ("publish", command::Op::Publish(MemberAttributes::default())),
        ];
        let refusals = |alarms: &[(u64, AlarmType)]| -> Vec<(&str, Option<Error>)> {
            let alarms: BTreeSet<(u64, i32)> = alarms.iter().map(|(m, a)| (*m, *a as i32)).collect();
            ops.iter().map(|(name, op)| (*name, refused_by_alarm(&alarms, op))).collect()
        };
        assert!(refusals(&[]).iter().all(|(_, e)| e.is_none()));
        let no_space = Some(Error::NoSpace);
        assert_eq!(
            refusals(&[(7, AlarmType::Nospace)]),
            vec![
                ("put", no_space.clone()),
                ("txn with a nested put", no_space.clone()),
                ("txn that deletes", None),
                ("delete", None),
                ("compact", None),
                ("grant", no_space),
                ("revoke", None),
                ("publish", None),
            ]
        );
        let corrupt = refusals(&[(7, AlarmType::Nospace), (8, AlarmType::Corrupt)]);
        for (name, e) in corrupt {
            let want = if name == "publish" { None } else { Some(Error::Corrupt) };
            assert_eq!(e, want, "{name}");
        }
    }
}
