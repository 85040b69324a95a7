//! A member that catches up by a snapshot, or by the log, several times
//! larger than a fixed memory budget does so within the budget: snapshots are
//! written, sent, received and loaded in chunks, never held whole, and the
//! entries of a log being replayed are appended and applied in bounded
//! steps, never held in memory all at once. Measured from /proc on real
//! `kvd` processes: the catching-up member's peak resident memory against
//! the resident memory of the members that hold the same data and caught up
//! on nothing. (A member's steady memory grows with the data it has written
//! through sled and the allocator, catch-up or not; what the catch-up may add
//! on top of it is the budget.)

mod support;

use std::time::{Duration, Instant};

use kvd::client::Client;
use kvd_testkit::Cluster;
use support::processes::ProcessCluster;

/// What installing a snapshot may add to a member's peak resident memory,
/// whatever the snapshot's size.
const BUDGET_MIB: u64 = 32;
/// The data written while the member is away: more than three times the
/// budget. (Before snapshots were streamed, the install alone held the
/// whole snapshot once, and its records once more.)
const DATA_MIB: u64 = 3 * BUDGET_MIB + 16;
const VALUE_BYTES: usize = 256 * 1024;

/// A field of /proc/<pid>/status, in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let line = status.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("no {field}"));
    line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("a number of kB")
}

/// Puts [`DATA_MIB`] of values of [`VALUE_BYTES`] random bytes (so that
/// nothing on the way compresses them) at `big/<n>`; returns how many.
async fn put_big_values(client: &Client) -> u64 {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut value = vec![0u8; VALUE_BYTES];
    let puts = DATA_MIB * 1024 * 1024 / VALUE_BYTES as u64;
    for i in 0..puts {
        for chunk in value.chunks_mut(8) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            chunk.copy_from_slice(&seed.to_le_bytes()[..chunk.len()]);
        }
        let put = kvd::proto::etcdserverpb::PutRequest {
            key: format!("big/{i:06}").into_bytes(),
            value: value.clone(),
            ..Default::default()
        };
        client.put(put).await.unwrap();
    }
    puts
}

/// Waits until member `away` has applied index `wanted`; past 240 s, fails
/// with the end of the leader's and the member's logs.
async fn wait_until_applied(c: &ProcessCluster, leader: usize, away: usize, wanted: u64) {
    let back = c.client(away);
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        match back.status_of(0).await {
            Ok(s) if s.raft_applied_index >= wanted => return,
            _ => {
                if Instant::now() > deadline {
                    let log = std::fs::read_to_string(c.log(leader)).unwrap_or_default()
                        + "\n-- away --\n"
                        + &std::fs::read_to_string(c.log(away)).unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(40).collect();
                    panic!(
                        "the member did not catch up; its log ends:\n{}",
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    );
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// A cluster of three with one member, `away`, killed while [`DATA_MIB`] of
/// values were put at the leader (see [`put_big_values`]).
struct Away {
    c: ProcessCluster,
    leader: usize,
    away: usize,
    client: Client,
    puts: u64,
}

/// Starts three members with `--snapshot-count snapshot_count`, kills one
/// follower and puts the values while it is down.
async fn member_away_while_values_are_written(snapshot_count: &str) -> Away {
    let mut c =
        ProcessCluster::start_with(3, &["--snapshot-count", snapshot_count, "--quota-backend-bytes", "8589934592"])
            .await;
    let leader = c.leader().await;
    let away = (leader + 1) % 3;
    let client = c.client(leader);
    client.put(support::put("before", "1")).await.unwrap();
    c.kill(away).await;
    let puts = put_big_values(&client).await;
    Away { c, leader, away, client, puts }
}

impl Away {
    /// Restarts the member, waits until it has applied index `wanted`,
    /// checks that it serves the last value whole, and returns its log.
    async fn back_and_caught_up(&mut self, wanted: u64) -> String {
        self.c.restart(self.away).await;
        wait_until_applied(&self.c, self.leader, self.away, wanted).await;
        let last = format!("big/{:06}", self.puts - 1);
        let got = self.c.client(self.away).range(support::get_local(&last)).await.unwrap();
        assert_eq!(got.kvs.len(), 1);
        assert_eq!(got.kvs[0].value.len(), VALUE_BYTES);
        std::fs::read_to_string(self.c.log(self.away)).expect("log")
    }
}

/// Member `away`'s peak resident memory, and the largest resident memory of
/// the others, in MiB.
fn peak_and_steady(c: &ProcessCluster, away: usize) -> (u64, u64) {
    let peak = status_kib(c.pid(away).expect("running"), "VmHWM:") / 1024;
    let steady = (0..c.size())
        .filter(|i| *i != away)
        .filter_map(|i| c.pid(i))
        .map(|p| status_kib(p, "VmRSS:") / 1024)
        .max()
        .expect("the other members run");
    (peak, steady)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_installs_a_snapshot_three_times_its_memory_budget_within_it() {
    let mut a = member_away_while_values_are_written("100").await;
    let (c, leader, client) = (&a.c, a.leader, &a.client);
    let written = client.status_of(0).await.unwrap().raft_applied_index;
    // Enough small writes past the last snapshot that the log the away
    // member needs is purged.
    for i in 0..250 {
        client.put(support::put(&format!("after/{i}"), "v")).await.unwrap();
    }
    // The snapshot the member is sent is the leader's latest, which may be
    // of a state before the last values if its builds lag behind: writes go
    // on until one holds them all.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut n = 0;
    while c.metric(leader, "kvd_raft_snapshot_index").await.unwrap_or(0.0) < written as f64 {
        assert!(Instant::now() < deadline, "the leader took no snapshot of all the values within 60 s");
        client.put(support::put(&format!("later/{n}"), "v")).await.unwrap();
        n += 1;
    }
    let wanted = client.status_of(0).await.unwrap().raft_applied_index;

    let log = a.back_and_caught_up(wanted).await;
    assert!(log.contains("installed snapshot"), "it caught up by a snapshot");
    let (c, away) = (&a.c, a.away);
    let (peak, steady) = peak_and_steady(c, away);
    // A snapshot stream the leader began while the member was down is sent
    // first once it is back, and the latest snapshot after it: the largest
    // install is the one measured.
    let snapshot_mib = log
        .lines()
        .filter(|l| l.contains("installed snapshot"))
        .map(|l| {
            let bytes = l.split_whitespace().find_map(|w| w.strip_prefix("bytes=")).expect("bytes= in the line");
            bytes.parse::<u64>().expect("a number of bytes") / (1024 * 1024)
        })
        .max()
        .expect("the install's line");
    // The member's own snapshot file points into its value file rather than
    // holding every value a second time.
    let path = c.data_dir(away).join("snapshot.bin");
    let own_mib = std::fs::metadata(&path).expect("the snapshot file").len() / (1024 * 1024);
    eprintln!(
        "snapshot {snapshot_mib} MiB sent, {own_mib} MiB kept; the installing member peaked at {peak} MiB; \
         the others hold {steady} MiB; budget {BUDGET_MIB} MiB"
    );
    assert!(snapshot_mib >= 3 * BUDGET_MIB, "the snapshot holds the data ({snapshot_mib} MiB)");
    assert!(own_mib < 4, "the member's own snapshot file holds {own_mib} MiB of {snapshot_mib} MiB of data");
    assert!(
        peak <= steady + BUDGET_MIB,
        "the member peaked at {peak} MiB installing a {snapshot_mib} MiB snapshot; members that installed \
         nothing hold {steady} MiB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_replays_a_log_three_times_its_memory_budget_within_it() {
    // No snapshot is taken while the member is away, so the leader keeps
    // every entry it missed and sends it the log.
    let mut a = member_away_while_values_are_written("1000000").await;
    let wanted = a.client.status_of(0).await.unwrap().raft_applied_index;
    let leader_pid = a.c.pid(a.leader).expect("the leader runs");
    let leader_before = status_kib(leader_pid, "VmHWM:") / 1024;

    let log = a.back_and_caught_up(wanted).await;
    let (c, leader, away) = (&a.c, a.leader, a.away);
    assert!(!log.contains("installed snapshot"), "it caught up by the log, not by a snapshot");
    for i in [leader, away] {
        let index = c.metric(i, "kvd_raft_snapshot_index").await;
        assert_eq!(index, Some(0.0), "member {i} has taken or installed no snapshot");
    }
    let (peak, steady) = peak_and_steady(c, away);
    let leader_after = status_kib(leader_pid, "VmHWM:") / 1024;
    eprintln!(
        "{DATA_MIB} MiB of log replayed; the member peaked at {peak} MiB; the others hold {steady} MiB; \
         the leader peaked at {leader_before} MiB before and {leader_after} MiB after sending it; budget \
         {BUDGET_MIB} MiB"
    );
    assert!(
        peak <= steady + BUDGET_MIB,
        "the member peaked at {peak} MiB replaying {DATA_MIB} MiB of log; members that replayed nothing hold \
         {steady} MiB"
    );
    assert!(
        leader_after <= leader_before + BUDGET_MIB,
        "the leader peaked at {leader_after} MiB sending {DATA_MIB} MiB of log, {leader_before} MiB before"
    );
}
