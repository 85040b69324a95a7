//! Applying one command to the store, and which commands read history while
//! they are applied.

use prost::Message;

use super::super::committer::Committer;
use super::super::Response;
use super::group::Group;
use super::view::State;
use super::ATTRS;
use crate::error::Error;
use crate::mvcc::{ops, txn, Batch};
use crate::proto::etcdserverpb::{request_op, CompactionResponse, LeaseGrantResponse, LeaseRevokeResponse, TxnRequest};
use crate::proto::kvdpb::{command, command_result, Command, CommandResult};
use crate::proto::mvccpb::Event;

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

/// Applies one command. Errors a client caused come back in the `Response`;
/// an `Err` is a storage failure that leaves the member unable to go on.
/// Commands that read history first commit `group` to `tree`; `in_batch`
/// tells that earlier commands of the same entry may be in `group`, which
/// only whole entries may leave.
pub(super) fn apply_command(
    state: &mut State,
    command: Option<Command>,
    group: &mut Group,
    committer: &Committer,
    in_batch: bool,
) -> Result<Applying, Error> {
    let refused = |e: Error| Ok((Batch::default(), Response(Err(e)), Vec::new()));
    let mut events = Vec::new();
    let Some(Command { op: Some(op) }) = command else {
        return refused(Error::internal("undecodable command in the log"));
    };
    if in_batch && reads_history(&op) {
        // The batcher never does this; refusing is the same on every member.
        return refused(Error::internal("a command that reads history was batched with others"));
    }
    let result = match op {
        // Batches are unpacked by the caller and never nested.
        command::Op::Batch(_) => return refused(Error::internal("a command batch inside a command batch")),
        command::Op::Put(p) => {
            if let Err(e) = ops::check_put_applies(&state.store, &p) {
                return refused(e);
            }
            let mut w = state.store.write();
            let resp = ops::put(&mut w, &p)?;
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
        command::Op::LeaseRevoke(r) => {
            let mut w = state.store.write();
            if !w.revoke_lease(r.id) {
                return refused(Error::LeaseNotFound);
            }
            let header = ops::rev_header(w.revision());
            let batch;
            (batch, events) = w.finish();
            let header = if events.is_empty() { ops::rev_header(state.store.revision()) } else { header };
            (batch, command_result::Result::LeaseRevoke(LeaseRevokeResponse { header }))
        }
    };
    let (batch, result) = result;
    let encoded = CommandResult { result: Some(result) }.encode_to_vec();
    Ok((batch, Response(Ok(serde_bytes::ByteBuf::from(encoded))), events))
}
