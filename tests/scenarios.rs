//! The scenarios of `kvd_testkit::scenarios`, each run twice: on three
//! members in this process, and on three real `kvd` processes (SIGKILL for a
//! kill).

mod support;

use kvd_testkit::scenarios;
use support::processes::ProcessCluster;
use support::TestCluster;

macro_rules! both_ways {
    ($($scenario:ident: $in_process:ident, $processes:ident;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $in_process() {
            let mut c = TestCluster::start(3, |_| {}).await;
            scenarios::$scenario(&mut c).await;
            c.shutdown().await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $processes() {
            let mut c = ProcessCluster::start(3).await;
            scenarios::$scenario(&mut c).await;
        }
    )*};
}

both_ways! {
    write_anywhere_read_everywhere:
        in_process_a_write_anywhere_is_read_everywhere, processes_a_write_anywhere_is_read_everywhere;
    leader_killed_loses_no_acknowledged_write:
        in_process_a_killed_leader_loses_no_acknowledged_write, processes_a_killed_leader_loses_no_acknowledged_write;
    whole_cluster_restarts_intact:
        in_process_the_whole_cluster_restarts_intact, processes_the_whole_cluster_restarts_intact;
}
