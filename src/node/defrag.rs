//! Defragment: giving a member's disk space back.

use std::time::Duration;

use super::Member;
use crate::error::Error;
use crate::raft::state_machine::Defragmented;

/// How long a defragment waits for the snapshot it asks for. The
/// defragment has done its part by then; a snapshot that takes longer is
/// still built, and the answer does not wait for it.
const SNAPSHOT_WAIT: Duration = Duration::from_secs(60);

impl Member {
    /// Rewrites this member's database with only what is live and switches
    /// to it (see [`crate::raft::state_machine::Shared::defragment`]), then
    /// has Raft take a snapshot, so that the snapshot file stops holding
    /// data removed since the last one, and the log up to now can go.
    pub async fn defragment(&self) -> Result<Defragmented, Error> {
        let done = self.state.defragment().await?;
        let applied = self.raft.metrics().borrow().last_applied;
        let Some(applied) = applied else { return Ok(done) };
        self.raft.trigger().snapshot().await.map_err(Error::internal)?;
        let taken = self
            .raft
            .wait(Some(SNAPSHOT_WAIT))
            .metrics(|m| m.snapshot.is_some_and(|s| s.index >= applied.index), "snapshot after defragment")
            .await;
        if let Err(e) = taken {
            tracing::warn!(error = %e, "defragmented; the snapshot asked for after it is not taken yet");
        }
        Ok(done)
    }
}
