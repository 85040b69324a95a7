//! One handle for a kvd cluster under test, whichever way its members run:
//! in the test's own process (`tests/support`'s `TestCluster`), as real
//! `kvd` processes (`tests/support/processes.rs`), or as the fault harness
//! runs them, behind its peer-link proxies (`tests/kvd-faults`). A scenario
//! written once against [`Cluster`] ([`scenarios`]) runs on each.

pub mod scenarios;

use kvd::client::Client;

/// A three-member (or larger) kvd cluster under test.
#[allow(async_fn_in_trait)]
pub trait Cluster {
    /// How many members it was started with.
    fn size(&self) -> usize;
    /// Indexes of the members running now.
    fn running(&self) -> Vec<usize>;
    /// A client of member `i` alone.
    fn client(&self, i: usize) -> Client;
    /// A client of every member, failing over between them.
    fn client_all(&self) -> Client;
    /// Waits until every running member knows the same leader; its index.
    async fn leader(&self) -> usize;
    /// The member id of member `i`, from its own answer.
    async fn member_id(&self, i: usize) -> u64 {
        let status = self.client(i).status_of(0).await.expect("status");
        status.header.expect("header").member_id
    }
    /// Stops member `i` at once: in-process, its tasks end; as a process,
    /// SIGKILL.
    async fn kill(&mut self, i: usize);
    /// Starts member `i` again on its data directory and ports.
    async fn restart(&mut self, i: usize);
}
