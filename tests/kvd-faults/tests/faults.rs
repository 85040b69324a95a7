//! The fault-injection harness, short: three seeds, every fault kind at least
//! once in each, against the kvd binary of this build (`target/<profile>/kvd`,
//! which `cargo test --workspace` builds). A longer run is
//! `kvd-faults --runs 20 --duration 60s` (see the README).

use std::process::Command;

use kvd_faults::Fault;

/// Runs kvd-faults with `args`, prints what it said, and answers its
/// standard output once it found no anomaly. One run at a time: each starts
/// three members and a load, and two or three at once on a 2-core machine
/// stretch elections and restarts past the harness's bounds.
fn run_harness(args: &[&str]) -> String {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let out = Command::new(env!("CARGO_BIN_EXE_kvd-faults")).args(args).output().expect("run kvd-faults");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("{text}");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "kvd-faults {args:?} found anomalies (exit {:?})", out.status.code());
    text
}

#[test]
fn three_seeds_of_every_fault_find_no_anomaly() {
    let text = run_harness(&["--seed", "1", "--runs", "3", "--duration", "20s"]);
    assert!(text.contains("no anomalies"), "no verdict in the output");
    // Each run injected every kind of fault.
    let runs: Vec<&str> = text.split("== run").skip(1).collect();
    assert_eq!(runs.len(), 3, "three runs");
    for run in runs {
        // The last run's text also holds the totals; its own lines come first.
        let run = run.split("== 3 runs").next().unwrap_or(run);
        let faults = run.lines().find(|l| l.trim_start().starts_with("seed ") && l.contains(": faults ")).unwrap_or("");
        for f in Fault::ALL {
            // disk-full needs a tmpfs mount; the harness says so when it
            // cannot make one.
            let skipped = *f == Fault::DiskFull && run.contains("disk-full skipped:");
            assert!(skipped || faults.contains(&format!("{f}×")), "{f} was not injected: {faults}");
        }
        assert!(run.contains("lost 0"), "acknowledged writes were lost: {run}");
    }
}

/// One seed with TLS on both ports (client and peer certificates required,
/// a peer common name allowed): the same guarantees hold through TLS, with
/// members killed, paused, cut off and restarted mid-handshake.
#[test]
fn one_seed_with_tls_finds_no_anomaly() {
    let text = run_harness(&["--seed", "7", "--runs", "1", "--duration", "20s", "--tls"]);
    assert!(text.contains("TLS on client and peer ports"), "the run was not with TLS");
    assert!(text.contains("no anomalies") && text.contains("lost 0"), "no clean verdict: {text}");
    let faults = text.lines().find(|l| l.trim_start().starts_with("seed ") && l.contains(": faults ")).unwrap_or("");
    for f in Fault::ALL {
        let skipped = *f == Fault::DiskFull && text.contains("disk-full skipped:");
        assert!(skipped || faults.contains(&format!("{f}×")), "{f} was not injected: {faults}");
    }
}

/// Whole-cluster restarts back to back: each time the members come back,
/// the one whose vote was its own leads again in the same term, and reads
/// reach it within milliseconds of its start. Linearizable reads and
/// revisions must hold across every restart, and leases, kept alive anew by
/// each restored leader, must expire once the restarts end.
#[test]
fn back_to_back_whole_cluster_restarts_find_no_anomaly() {
    let text = run_harness(&["--seed", "11", "--runs", "1", "--duration", "20s", "--faults", "restart-all"]);
    assert!(text.contains("no anomalies") && text.contains("lost 0"), "no clean verdict: {text}");
    let restarts = text.lines().filter(|l| l.contains(" restart-all (leader m")).count();
    assert!(restarts >= 5, "only {restarts} whole-cluster restarts");
}

/// The scenarios kvd's own tests run in-process and on plain processes, run
/// on the harness's cluster: peer links through its proxies, members on
/// addresses of their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_shared_scenarios_pass_on_the_harness_cluster() {
    use kvd_testkit::scenarios;
    let kvd = std::path::Path::new(env!("CARGO_BIN_EXE_kvd-faults")).with_file_name("kvd");
    assert!(kvd.exists(), "no kvd binary at {} (cargo test --workspace builds it)", kvd.display());
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster =
        kvd_faults::cluster::Cluster::start(kvd, dir.path().to_path_buf(), 500, None, false).await.expect("start");
    kvd_testkit::Cluster::leader(&cluster).await;
    scenarios::write_anywhere_read_everywhere(&mut cluster).await;
    scenarios::leader_killed_loses_no_acknowledged_write(&mut cluster).await;
    scenarios::whole_cluster_restarts_intact(&mut cluster).await;
    cluster.stop_all();
}
