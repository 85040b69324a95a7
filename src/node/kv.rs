//! The key-value API of a member: Range, Put, DeleteRange, Txn and Compact,
//! validated as etcd validates them, with the response header filled in.

use super::{Member, Write};
use crate::error::Error;
use crate::mvcc::{ops, txn};
use crate::proto::etcdserverpb::{
    AlarmRequest, AlarmResponse, CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse,
    LeaseGrantRequest, LeaseGrantResponse, LeaseRevokeRequest, LeaseRevokeResponse, PutRequest, PutResponse,
    RangeRequest, RangeResponse, TxnRequest, TxnResponse,
};
use crate::proto::kvdpb::{command, command_result, MemberAttributes};
use crate::raft::state_machine::txn_reads_history;

/// Each replicated write and the response it produces, in one table.
macro_rules! writes {
    ($($request:ty => $op:ident, $result:ident, $output:ty;)*) => {$(
        impl Write for $request {
            type Output = $output;
            fn into_op(self) -> command::Op {
                command::Op::$op(self)
            }
            fn output(result: command_result::Result) -> Option<$output> {
                match result {
                    command_result::Result::$result(out) => Some(out),
                    _ => None,
                }
            }
        }
    )*};
}

writes! {
    PutRequest => Put, Put, PutResponse;
    DeleteRangeRequest => DeleteRange, DeleteRange, DeleteRangeResponse;
    TxnRequest => Txn, Txn, TxnResponse;
    CompactionRequest => Compact, Compact, CompactionResponse;
    LeaseGrantRequest => LeaseGrant, LeaseGrant, LeaseGrantResponse;
    LeaseRevokeRequest => LeaseRevoke, LeaseRevoke, LeaseRevokeResponse;
    MemberAttributes => Publish, Published, bool;
    AlarmRequest => Alarm, Alarm, AlarmResponse;
}

impl Member {
    /// Range: linearizable unless `serializable`.
    pub async fn range(&self, req: RangeRequest) -> Result<RangeResponse, Error> {
        ops::check_range(&req)?;
        if !req.serializable {
            self.read_barrier().await?;
        }
        self.authorize_read(&req.key, &req.range_end)?;
        let mut resp = {
            // A past revision is read from history in sled.
            let state = self.state.read_for(req.revision > 0)?;
            ops::range(&state.store, state.store.revision(), &req)?
        };
        self.fill_header(&mut resp.header);
        Ok(resp)
    }

    /// Put.
    pub async fn put(&self, req: PutRequest) -> Result<PutResponse, Error> {
        ops::check_put(&req)?;
        self.check_quota(super::alarm::put_cost(&req)).await?;
        let mut resp = self.write(req).await?;
        self.fill_header(&mut resp.header);
        Ok(resp)
    }

    /// DeleteRange.
    pub async fn delete_range(&self, req: DeleteRangeRequest) -> Result<DeleteRangeResponse, Error> {
        ops::check_delete(&req)?;
        let mut resp = self.write(req).await?;
        self.fill_header(&mut resp.header);
        Ok(resp)
    }

    /// Txn. As etcd does, a Txn that writes nothing is served locally after a
    /// read barrier instead of going through the log.
    pub async fn txn(&self, req: TxnRequest) -> Result<TxnResponse, Error> {
        txn::check_txn(&req, self.limits.max_txn_ops)?;
        let mut resp = if txn::is_read_only(&req) {
            if !txn::is_serializable(&req) {
                self.read_barrier().await?;
            }
            self.authorize(|auth, who| auth.check_txn(who, &req))?;
            let state = self.state.read_for(txn_reads_history(&req))?;
            txn::read_only(&state.store, &req)?
        } else {
            self.check_quota(super::alarm::txn_cost(&req)).await?;
            self.write(req).await?
        };
        self.fill_header(&mut resp.header);
        Ok(resp)
    }

    /// Compact. With `physical`, as etcd does, the answer waits until this
    /// member has removed the compacted history, however long that takes.
    pub async fn compact(&self, req: CompactionRequest) -> Result<CompactionResponse, Error> {
        let (rev, physical) = (req.revision, req.physical);
        let mut resp = self.write(req).await?;
        if physical {
            tokio::select! {
                done = self.state.await_physical(rev) => done?,
                () = self.stopped() => return Err(Error::Stopped),
            }
        }
        self.fill_header(&mut resp.header);
        Ok(resp)
    }

    /// Records this member's name and client URLs for MemberList.
    pub async fn publish(&self, attrs: MemberAttributes) -> Result<(), Error> {
        self.write(attrs).await.map(|_| ())
    }
}
