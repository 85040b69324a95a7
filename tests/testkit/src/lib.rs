//! One handle for a kvd cluster under test, whichever way its members run:
//! in the test's own process (`tests/support`'s `TestCluster`), as real
//! `kvd` processes (`tests/support/processes.rs`), or as the fault harness
//! runs them, behind its peer-link proxies (`tests/kvd-faults`). A scenario
//! written once against [`Cluster`] ([`scenarios`]) runs on each.

pub mod scenarios;

use std::future::Future;
use std::time::Duration;

use kvd::client::Client;
use kvd::proto::etcdserverpb::StatusResponse;

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

/// Picks `n` distinct free ports on 127.0.0.1 (bound on port 0, then
/// released), for processes that must be told their ports.
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<std::net::TcpListener> =
        (0..n).map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind")).collect();
    listeners.iter().map(|l| l.local_addr().expect("local addr").port()).collect()
}

/// Waits, up to `within`, until every member of `running` names the same
/// leader and that member says it leads; returns the leader's index.
/// `status(i)` asks member `i` (`None`: it did not answer).
pub async fn agreed_leader<F, Fut>(running: &[usize], mut status: F, within: Duration) -> usize
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = Option<StatusResponse>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let mut named = Vec::new();
        let mut leading = None;
        for &i in running {
            let answer = status(i).await;
            if let Some(st) = &answer {
                if st.header.as_ref().is_some_and(|h| h.member_id == st.leader) {
                    leading = Some(i);
                }
            }
            named.push(answer.map(|st| st.leader));
        }
        let agreed = named.first().copied().flatten().is_some_and(|l| l != 0 && named.iter().all(|n| *n == Some(l)));
        if let (true, Some(i)) = (agreed, leading) {
            return i;
        }
        assert!(tokio::time::Instant::now() < deadline, "no agreed leader within {within:?}: {named:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
