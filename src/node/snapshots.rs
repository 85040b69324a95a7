//! Snapshots taken when the state machine asks: after `--snapshot-count`
//! client commands, and after the compaction thread defragments; and the
//! Raft log a snapshot covers, purged down to a bound.

use std::sync::Arc;

use super::Member;
use crate::raft::log_store::LogStore;

/// Bytes of log records kept at most, of the entries a snapshot covers, for
/// a member that fell behind to catch up from instead of a snapshot. One
/// entry carries a batch of writes, so a bound in entries alone kept 106 MB
/// of log at 100,000 keys of 1 KiB; 16 MiB still holds 16,000 writes of
/// 1 KiB, more than the 5,000 entries etcd keeps of one write each.
pub const LOG_KEEP_BYTES: u64 = 16 << 20;

impl Member {
    /// Has Raft build a snapshot each time `asked` is notified, until the
    /// member stops. openraft's own policy counts entries, each of which may
    /// carry many commands; it stays as a bound behind this one.
    pub async fn take_snapshots(self: Arc<Self>, asked: Arc<tokio::sync::Notify>) {
        loop {
            tokio::select! {
                () = asked.notified() => {}
                () = self.stopped() => return,
            }
            if let Err(e) = self.raft.trigger().snapshot().await {
                tracing::warn!(error = %e, "could not ask for a snapshot");
            }
        }
    }

    /// Purges the log behind each new snapshot until the member stops, so
    /// that of the entries the snapshot covers at most `keep_entries` and
    /// [`LOG_KEEP_BYTES`] stay. openraft's own purge (which counts entries
    /// only) is off: both bounds are applied here. openraft still waits to
    /// purge entries it is sending to a member.
    pub async fn purge_the_log(self: Arc<Self>, log: LogStore, keep_entries: u64) {
        // At once after each snapshot, as openraft's own purge was: a member
        // added just after one catches up from it, not from the log.
        let mut metrics = self.raft.metrics();
        let mut done = None;
        loop {
            tokio::select! {
                changed = metrics.changed() => if changed.is_err() { return },
                () = self.stopped() => return,
            }
            let Some(snapshot) = metrics.borrow_and_update().snapshot.map(|s| s.index) else { continue };
            if done == Some(snapshot) {
                continue;
            }
            if let Some(upto) = log.purge_point(snapshot, keep_entries, LOG_KEEP_BYTES) {
                if let Err(e) = self.raft.trigger().purge_log(upto).await {
                    tracing::warn!(error = %e, "could not purge the log");
                    continue;
                }
            }
            done = Some(snapshot);
        }
    }
}
