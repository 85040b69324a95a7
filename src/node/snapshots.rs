//! Snapshots taken when the state machine asks: after `--snapshot-count`
//! client commands, and after the compaction thread defragments.

use std::sync::Arc;

use super::Member;

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
}
