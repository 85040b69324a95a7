//! In-process three-member clusters: replication, failover, restart and
//! snapshot catch-up.

mod support;

use support::{get, get_local, put, TestCluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_through_any_member_is_read_from_every_member() {
    let c = TestCluster::start(3, |_| {}).await;
    for writer in 0..3 {
        let key = format!("from-{writer}");
        let resp = c.client(writer).put(put(&key, "v")).await.expect("put");
        let rev = resp.header.expect("header").revision;
        for reader in 0..3 {
            let got = c.client(reader).range(get(&key)).await.expect("linearizable get");
            assert_eq!(got.kvs.len(), 1, "member {reader} sees the write made through member {writer}");
            assert_eq!(got.kvs[0].mod_revision, rev);
            assert!(got.header.expect("header").revision >= rev);
        }
    }
    // Headers name the member that answered and the same cluster.
    let ids: Vec<u64> = (0..3).map(|i| c.member(i).member.id).collect();
    let mut cluster_ids = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let h = c.client(i).range(get("from-0")).await.unwrap().header.unwrap();
        assert_eq!(h.member_id, *id);
        cluster_ids.push(h.cluster_id);
    }
    assert!(cluster_ids.iter().all(|x| *x == cluster_ids[0] && *x != 0));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_leader_elects_a_new_one_and_loses_no_acknowledged_write() {
    let mut c = TestCluster::start(3, |_| {}).await;
    let client = c.client_all();
    let mut acked = Vec::new();
    for i in 0..50 {
        let key = format!("k{i:03}");
        client.put(put(&key, &i.to_string())).await.expect("put before failover");
        acked.push(key);
    }
    let old = c.wait_leader().await;
    let old_id = c.member(old).member.id;
    c.stop(old).await;
    let new = c.wait_leader().await;
    assert_ne!(c.member(new).member.id, old_id, "a new leader is elected");
    // Writes go on through the survivors.
    let survivor = c.running()[0];
    for i in 50..60 {
        let key = format!("k{i:03}");
        c.client(survivor).put(put(&key, &i.to_string())).await.expect("put after failover");
        acked.push(key);
    }
    for m in c.running() {
        let all = c
            .client(m)
            .range(kvd::proto::etcdserverpb::RangeRequest {
                key: b"k".to_vec(),
                range_end: b"l".to_vec(),
                ..Default::default()
            })
            .await
            .expect("range");
        let keys: Vec<String> = all.kvs.iter().map(|kv| String::from_utf8(kv.key.clone()).unwrap()).collect();
        assert_eq!(keys, acked, "member {m} has every acknowledged write");
    }
    c.shutdown().await;
}

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
async fn the_whole_cluster_restarts_with_every_key_intact() {
    let mut c = TestCluster::start(3, |_| {}).await;
    let client = c.client_all();
    for i in 0..30 {
        client.put(put(&format!("key-{i:02}"), &format!("value-{i}"))).await.unwrap();
    }
    client
        .delete_range(kvd::proto::etcdserverpb::DeleteRangeRequest { key: b"key-00".to_vec(), ..Default::default() })
        .await
        .unwrap();
    let before = client.range(get("key-05")).await.unwrap();
    let rev_before = before.header.unwrap().revision;
    for i in 0..3 {
        c.stop(i).await;
    }
    for i in 0..3 {
        c.restart(i).await;
    }
    c.wait_leader().await;
    let all = c
        .client_all()
        .range(kvd::proto::etcdserverpb::RangeRequest {
            key: b"key-".to_vec(),
            range_end: b"key.".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(all.kvs.len(), 29);
    assert_eq!(all.kvs[0].key, b"key-01");
    assert_eq!(all.kvs[4].value, b"value-5");
    assert_eq!(all.kvs[4], before.kvs[0], "versions and revisions survive the restart");
    assert_eq!(all.header.unwrap().revision, rev_before, "the revision survives the restart");
    // And the history too: a read at an old revision still sees the deleted key.
    let old = c
        .client_all()
        .range(kvd::proto::etcdserverpb::RangeRequest { key: b"key-00".to_vec(), revision: 2, ..Default::default() })
        .await
        .unwrap();
    assert_eq!(old.kvs.len(), 1);
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
