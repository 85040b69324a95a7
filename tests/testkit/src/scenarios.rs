//! Scenarios written once against [`Cluster`]: `tests/scenarios.rs` runs
//! them on in-process members and on real processes, and the fault harness's
//! own test on its cluster.

use kvd::proto::etcdserverpb::{DeleteRangeRequest, PutRequest, RangeRequest};

use crate::Cluster;

fn put(key: &str, value: &str) -> PutRequest {
    PutRequest { key: key.into(), value: value.into(), ..Default::default() }
}

fn get(key: &str) -> RangeRequest {
    RangeRequest { key: key.into(), ..Default::default() }
}

fn range(from: &str, to: &str) -> RangeRequest {
    RangeRequest { key: from.into(), range_end: to.into(), ..Default::default() }
}

/// A write made through any member is read, at its revision, from every
/// member, and every answer names the member that gave it and one cluster.
pub async fn write_anywhere_read_everywhere(c: &mut impl Cluster) {
    for writer in 0..c.size() {
        let key = format!("from-{writer}");
        let resp = c.client(writer).put(put(&key, "v")).await.expect("put");
        let rev = resp.header.expect("header").revision;
        for reader in 0..c.size() {
            let got = c.client(reader).range(get(&key)).await.expect("linearizable get");
            assert_eq!(got.kvs.len(), 1, "member {reader} sees the write made through member {writer}");
            assert_eq!(got.kvs[0].mod_revision, rev);
            assert!(got.header.expect("header").revision >= rev);
        }
    }
    let mut cluster_ids = Vec::new();
    for i in 0..c.size() {
        let id = c.member_id(i).await;
        let h = c.client(i).range(get("from-0")).await.expect("get").header.expect("header");
        assert_eq!(h.member_id, id, "member {i} names itself");
        cluster_ids.push(h.cluster_id);
    }
    assert!(cluster_ids.iter().all(|x| *x == cluster_ids[0] && *x != 0), "one cluster id: {cluster_ids:?}");
}

/// The leader stops at once; a new one is elected, writes go on through
/// the others, and no acknowledged write is lost.
pub async fn leader_killed_loses_no_acknowledged_write(c: &mut impl Cluster) {
    let client = c.client_all();
    let mut acked = Vec::new();
    for i in 0..50 {
        let key = format!("acked/{i:03}");
        client.put(put(&key, &i.to_string())).await.expect("put before failover");
        acked.push(key);
    }
    let old = c.leader().await;
    let old_id = c.member_id(old).await;
    c.kill(old).await;
    let new = c.leader().await;
    assert_ne!(c.member_id(new).await, old_id, "a new leader is elected");
    let survivor = c.running()[0];
    for i in 50..60 {
        let key = format!("acked/{i:03}");
        c.client(survivor).put(put(&key, &i.to_string())).await.expect("put after failover");
        acked.push(key);
    }
    for m in c.running() {
        let all = c.client(m).range(range("acked/", "acked0")).await.expect("range");
        let keys: Vec<String> = all.kvs.iter().map(|kv| String::from_utf8_lossy(&kv.key).into_owned()).collect();
        assert_eq!(keys, acked, "member {m} has every acknowledged write");
    }
    // The old leader comes back and catches up.
    c.restart(old).await;
    c.leader().await;
    let all = c.client(old).range(range("acked/", "acked0")).await.expect("range on the restarted member");
    assert_eq!(all.kvs.len(), acked.len(), "the restarted member has every acknowledged write");
}

/// Every member stops and starts again: keys, versions, revisions and
/// history are as they were.
pub async fn whole_cluster_restarts_intact(c: &mut impl Cluster) {
    let client = c.client_all();
    let mut first_rev = 0;
    for i in 0..30 {
        let resp = client.put(put(&format!("key-{i:02}"), &format!("value-{i}"))).await.expect("put");
        if i == 0 {
            first_rev = resp.header.expect("header").revision;
        }
    }
    client.delete_range(DeleteRangeRequest { key: b"key-00".to_vec(), ..Default::default() }).await.expect("delete");
    let before = client.range(get("key-05")).await.expect("get");
    let rev_before = before.header.expect("header").revision;
    for i in 0..c.size() {
        c.kill(i).await;
    }
    for i in 0..c.size() {
        c.restart(i).await;
    }
    c.leader().await;
    let all = c.client_all().range(range("key-", "key.")).await.expect("range after the restart");
    assert_eq!(all.kvs.len(), 29);
    assert_eq!(all.kvs[0].key, b"key-01");
    assert_eq!(all.kvs[4].value, b"value-5");
    assert_eq!(all.kvs[4], before.kvs[0], "versions and revisions survive the restart");
    assert_eq!(all.header.expect("header").revision, rev_before, "the revision survives the restart");
    // And the history too: a read at an old revision still sees the deleted key.
    let old = c
        .client_all()
        .range(RangeRequest { key: b"key-00".to_vec(), revision: first_rev, ..Default::default() })
        .await
        .expect("read at the revision of the first put");
    assert_eq!(old.kvs.len(), 1);
}
