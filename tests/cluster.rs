//! In-process three-member clusters: restart, snapshot catch-up and client
//! failover. The scenarios that also run on real processes are in
//! `tests/scenarios.rs`.

mod support;

use support::{get, get_local, put, TestCluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_member_catches_up_from_its_data_dir() {
    let mut c = TestCluster::start(3, |_| {}).await;
    let leader = c.wait_leader().await;
    let follower = (leader + 1) % 3;
    c.client(leader).put(put("before", "1")).await.unwrap();
    c.stop(follower).await;
    for i in 0..20 {
        c.client(leader).put(put(&format!("while-down-{i}"), "x")).await.unwrap();
    }
    c.restart(follower).await;
    let target = c.applied(leader);
    c.wait_applied(follower, target).await;
    let local = c.client(follower).range(get_local("while-down-19")).await.unwrap();
    assert_eq!(local.kvs.len(), 1, "the restarted member caught up");
    let before = c.client(follower).range(get_local("before")).await.unwrap();
    assert_eq!(before.kvs.len(), 1, "the restarted member kept what it had");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_behind_the_purged_log_catches_up_by_snapshot() {
    let mut c = TestCluster::start(3, |args| args.extend(["--snapshot-count".to_string(), "20".to_string()])).await;
    let leader = c.wait_leader().await;
    let lagging = (leader + 1) % 3;
    c.stop(lagging).await;
    for i in 0..200 {
        c.client(leader).put(put(&format!("s{i:03}"), &"x".repeat(100))).await.unwrap();
    }
    // openraft purges once no replication still reads the entries, which
    // can be a moment after the snapshot.
    let purged = c
        .member(leader)
        .member
        .raft
        .wait(Some(std::time::Duration::from_secs(10)))
        .metrics(|m| m.purged.is_some_and(|l| l.index > 20), "purge after snapshots")
        .await;
    assert!(purged.is_ok(), "the leader purged its log after snapshots: {purged:?}");
    c.restart(lagging).await;
    let target = c.applied(leader);
    c.wait_applied(lagging, target).await;
    let snap = c.member(lagging).member.raft.metrics().borrow().snapshot;
    assert!(snap.is_some(), "the lagging member installed a snapshot");
    let got = c
        .client(lagging)
        .range(kvd::proto::etcdserverpb::RangeRequest {
            key: b"s".to_vec(),
            range_end: b"t".to_vec(),
            serializable: true,
            count_only: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(got.count, 200);
    // It keeps serving after the install: a new write reaches it too.
    c.client(leader).put(put("after-snapshot", "y")).await.unwrap();
    assert_eq!(c.client(lagging).range(get("after-snapshot")).await.unwrap().kvs.len(), 1);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_log_behind_a_snapshot_is_purged_to_a_bound_in_bytes() {
    // A count of 300 keeps 300 entries behind a snapshot at most; entries of
    // 64 KiB values reach the bound in bytes first (16 MiB: about 255).
    let c = TestCluster::start(3, |args| args.extend(["--snapshot-count".to_string(), "300".to_string()])).await;
    let leader = c.wait_leader().await;
    let value = "v".repeat(64 << 10);
    for i in 0..320 {
        c.client(leader).put(put(&format!("big{i:03}"), &value)).await.unwrap();
    }
    let raft = &c.member(leader).member.raft;
    let purged = raft
        .wait(Some(std::time::Duration::from_secs(20)))
        .metrics(
            |m| match (m.snapshot, m.purged) {
                (Some(s), Some(p)) => p.index + 280 > s.index,
                _ => false,
            },
            "a purge past the bound in entries",
        )
        .await;
    let m = raft.metrics().borrow().clone();
    assert!(
        purged.is_ok(),
        "snapshot {:?}, purged up to {:?}: no more than about 255 entries of 64 KiB may stay",
        m.snapshot,
        m.purged
    );
    let (snapshot, purged) = (m.snapshot.map_or(0, |s| s.index), m.purged.map_or(0, |p| p.index));
    assert!(snapshot - purged >= 200, "the bound keeps 16 MiB, about 255 entries: {} kept", snapshot - purged);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_snapshot_count_counts_client_writes_not_log_entries() {
    // etcd's --snapshot-count counts requests. kvd proposes many writes in
    // one entry, so a count of entries would let the log hold many times
    // as many writes as asked.
    let c = TestCluster::start(3, |args| args.extend(["--snapshot-count".to_string(), "400".to_string()])).await;
    let leader = c.wait_leader().await;
    let writers: Vec<_> = (0..64)
        .map(|w| {
            let client = c.client(leader);
            tokio::spawn(async move {
                for i in 0..10 {
                    client.put(put(&format!("w{w:02}-{i}"), "v")).await.unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    let raft = &c.member(leader).member.raft;
    let entries = raft.metrics().borrow().last_log_index.unwrap_or(0);
    // 640 writes from 64 clients at once go in far fewer entries than 400:
    // a snapshot was not asked for by openraft's count of entries.
    assert!(entries < 400, "640 writes took {entries} entries");
    let taken = raft
        .wait(Some(std::time::Duration::from_secs(10)))
        .metrics(|m| m.snapshot.is_some(), "a snapshot after 400 writes")
        .await;
    assert!(taken.is_ok(), "no snapshot after 640 writes in {entries} entries: {taken:?}");
    c.shutdown().await;
}

/// An endpoint that takes connections and drops them at once, as a member
/// does while it is being killed.
fn dropping_endpoint() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            drop(conn);
        }
    });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broken_endpoint_fails_reads_over_but_not_writes() {
    let c = TestCluster::start(1, |_| {}).await;
    let live = c.client(0);
    support::wait_ready(&live).await;
    live.put(put("k", "v1")).await.expect("put");
    let eps = vec![dropping_endpoint(), c.client_all().endpoints()[0].clone()];
    let client = kvd::client::Client::new(&eps, std::time::Duration::from_secs(2)).expect("client");

    // A read is repeated on the next endpoint: it changes nothing.
    let got = client.range(get("k")).await.expect("the read moves on to the live member");
    assert_eq!(got.kvs[0].value, b"v1");
    assert_eq!(client.member_list().await.expect("member list").members.len(), 1);

    // A write whose connection broke may have been taken: it is reported,
    // not sent again.
    let client = kvd::client::Client::new(&eps, std::time::Duration::from_secs(2)).expect("client");
    let err = client.put(put("k", "v2")).await.expect_err("a write on a broken connection is not repeated");
    let broken = std::error::Error::source(&err).is_some_and(|e| e.is::<tonic::transport::Error>());
    assert!(broken, "the error names the broken connection: {err:?}");
    let got = live.range(get("k")).await.expect("get");
    assert_eq!(got.kvs[0].value, b"v1");
    assert_eq!(got.kvs[0].version, 1);
    c.shutdown().await;
}

/// A write answered by a follower is in that follower's state when the
/// answer arrives: a serializable read on the same member right after it
/// sees it, as etcd's members answer. 200 put-then-get rounds per member.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_answers_a_write_only_once_it_has_applied_it() {
    let c = TestCluster::start(3, |_| {}).await;
    let leader = c.wait_leader().await;
    for m in 0..3 {
        let client = c.client(m);
        let mut stale = 0;
        for i in 0..200 {
            let key = format!("ryw-{m}");
            let value = i.to_string();
            let put_rev = client.put(put(&key, &value)).await.expect("put").header.expect("header").revision;
            let got = client.range(get_local(&key)).await.expect("serializable get");
            if got.kvs.first().map(|kv| kv.value.as_slice()) != Some(value.as_bytes()) {
                stale += 1;
            }
            assert!(got.header.expect("header").revision >= put_rev, "member {m} answered below its own write");
        }
        assert_eq!(stale, 0, "member {m} (leader: {}) answered {stale} of 200 reads with an older value", m == leader);
    }
    c.shutdown().await;
}

/// A member whose data directory was wiped has forgotten its vote: it must
/// not come back under its old id, with `new` or `existing`. One restarted on
/// its data comes back as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_that_lost_its_data_is_refused_and_one_with_its_data_rejoins() {
    let mut c = TestCluster::start(3, |_| {}).await;
    let leader = c.wait_leader().await;
    let victim = (leader + 1) % 3;
    for i in 0..10 {
        c.client(leader).put(put(&format!("k{i}"), "v")).await.unwrap();
    }
    // Every member has published its attributes: the cluster has heard from each.
    let deadline = std::time::Instant::now() + support::WAIT;
    while c.member(leader).member.state.read().attrs.len() < 3 {
        assert!(std::time::Instant::now() < deadline, "members did not publish");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    // With its data: it restarts.
    c.stop(victim).await;
    c.restart(victim).await;
    c.wait_applied(victim, c.applied(leader)).await;
    c.stop(victim).await;

    // Without: refused, with new and with existing, and again on a second try.
    let dir = c.configs[victim].validate().unwrap().data_dir;
    std::fs::remove_dir_all(&dir).unwrap();
    for state in ["new", "existing", "new"] {
        let mut config = c.configs[victim].clone();
        config.initial_cluster_state = <kvd::config::ClusterState as clap::ValueEnum>::from_str(state, true).unwrap();
        let v = config.validate().unwrap();
        let listeners = c.listeners(victim);
        let err = match kvd::server::start_on(v, vec![listeners.0], listeners.1).await {
            Ok(_) => panic!("a member with a wiped data dir started ({state})"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("has taken part in this cluster before") && err.contains("must not rejoin"), "{err}");
    }
    // The others were not disturbed: the same leader, every key, new writes.
    assert_eq!(c.wait_leader().await, leader);
    c.client(leader).put(put("after", "v")).await.unwrap();
    let range =
        kvd::proto::etcdserverpb::RangeRequest { key: b"k".to_vec(), range_end: b"l".to_vec(), ..Default::default() };
    let all = c.client((victim + 1) % 3).range(range).await.unwrap();
    assert_eq!(all.kvs.len(), 10);
    c.shutdown().await;
}

/// A new cluster forms when the member that would form it at once (the one
/// with the lowest id) does not start: the others form it after a pause.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_cluster_forms_without_its_first_member() {
    let mut c = TestCluster::start(3, |_| {}).await;
    let ids: Vec<u64> = (0..3).map(|i| c.member(i).member.id).collect();
    let first = (0..3).min_by_key(|i| ids[*i]).unwrap();
    for i in 0..3 {
        c.stop(i).await;
        std::fs::remove_dir_all(c.configs[i].validate().unwrap().data_dir).unwrap();
    }
    let (a, b) = ((first + 1) % 3, (first + 2) % 3);
    // Started together, as members of a new cluster are.
    let (ra, rb) = (c.configs[a].validate().unwrap(), c.configs[b].validate().unwrap());
    let ((ca, pa), (cb, pb)) = (c.listeners(a), c.listeners(b));
    let (ma, mb) = tokio::join!(kvd::server::start_on(ra, vec![ca], pa), kvd::server::start_on(rb, vec![cb], pb));
    c.members[a] = Some(ma.unwrap());
    c.members[b] = Some(mb.unwrap());
    let leader = c.wait_leader().await;
    assert_ne!(leader, first);
    c.client(a).put(put("formed", "yes")).await.unwrap();
    c.shutdown().await;
}
