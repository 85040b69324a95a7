//! `snapshot save`, `status` and `restore`: a snapshot taken from one member
//! with etcdctl 3.4 (Debian's `etcd-client`, installed by
//! `cluster-scripts/test.sh`) and with kvctl, checked, and restored into the
//! data directories of a new three-member cluster that serves the same data,
//! history and leases, and goes on from the next revision.

mod support;

use std::path::Path;
use std::process::{Command, Output};

use kvd::proto::etcdserverpb::{CompactionRequest, PutRequest, RangeRequest};
use support::{put, TestCluster};

const KVCTL: &str = env!("CARGO_BIN_EXE_kvctl");

fn run(bin: &str, args: &[&str]) -> Output {
    Command::new(bin).env("ETCDCTL_API", "3").args(args).output().unwrap_or_else(|e| {
        panic!("{bin} runs (etcdctl: apt-get install etcd-client; cluster-scripts/test.sh does it): {e}")
    })
}

fn ok(bin: &str, args: &[&str]) -> String {
    let out = run(bin, args);
    assert!(out.status.success(), "{bin} {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn fails(bin: &str, args: &[&str]) -> String {
    let out = run(bin, args);
    assert!(!out.status.success(), "{bin} {args:?} should fail");
    String::from_utf8(out.stderr).unwrap()
}

fn status_json(file: &Path) -> serde_json::Value {
    serde_json::from_str(&ok(KVCTL, &["snapshot", "status", "-w", "json", file.to_str().unwrap()])).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_saved_snapshot_restores_into_a_new_cluster_with_the_same_data_and_history() {
    let c = TestCluster::start(3, |_| {}).await;
    let client = c.client_all();
    for i in 0..50 {
        client.put(put(&format!("k{i:02}"), &format!("v{i}"))).await.unwrap();
    }
    client.put(put("k00", "second")).await.unwrap();
    let before_compact = client.put(put("k01", "second")).await.unwrap().header.unwrap().revision;
    client.put(put("k01", "third")).await.unwrap();
    client.compact(CompactionRequest { revision: before_compact, physical: true }).await.unwrap();
    let lease = client.lease_grant(3600, 0).await.unwrap().id;
    client
        .put(PutRequest { key: b"leased".to_vec(), value: b"x".to_vec(), lease, ..Default::default() })
        .await
        .unwrap();
    let last = client.put(put("last", "y")).await.unwrap().header.unwrap().revision;
    let everything = RangeRequest { key: vec![0], range_end: vec![0], ..Default::default() };
    let want = client.range(everything.clone()).await.unwrap().kvs;
    assert_eq!(want.len(), 52);

    // The member asked must have applied the last write: wait for it.
    let leader = c.wait_leader().await;
    let ask = (leader + 1) % 3;
    c.wait_applied(ask, c.applied(leader)).await;
    let dir = tempfile::tempdir().unwrap();
    let endpoint = c.client_addrs[ask].to_string();
    let by_etcdctl = dir.path().join("etcdctl.snap");
    let by_kvctl = dir.path().join("kvctl.snap");
    let out = ok("etcdctl", &["--endpoints", &endpoint, "snapshot", "save", by_etcdctl.to_str().unwrap()]);
    assert!(out.contains("Snapshot saved at"), "{out}");
    let out = ok(KVCTL, &["--endpoints", &endpoint, "snapshot", "save", by_kvctl.to_str().unwrap()]);
    assert_eq!(out.trim(), format!("Snapshot saved at {}", by_kvctl.display()));
    assert!(!Path::new(&format!("{}.part", by_kvctl.display())).exists());
    // Both are taken at the same state of the same member.
    assert_eq!(std::fs::read(&by_etcdctl).unwrap(), std::fs::read(&by_kvctl).unwrap());

    let status = status_json(&by_kvctl);
    assert_eq!(status["revision"], last);
    assert_eq!(status["totalKey"], 52);
    assert_eq!(status["totalSize"], std::fs::metadata(&by_kvctl).unwrap().len());
    let table = ok(KVCTL, &["snapshot", "status", "-w", "table", by_kvctl.to_str().unwrap()]);
    assert!(table.contains("TOTAL KEYS") && table.contains(&last.to_string()), "{table}");

    // A snapshot must be asked of one member.
    let all = c.client_addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(",");
    let err = fails(KVCTL, &["--endpoints", &all, "snapshot", "save", dir.path().join("x").to_str().unwrap()]);
    assert!(err.contains("one selected node"), "{err}");
    c.shutdown().await;

    // Every member of the new cluster is restored from the same file.
    let file = by_etcdctl.clone();
    let r = TestCluster::start_prepared(
        3,
        |_| {},
        |_, data_dir| {
            let out =
                ok(KVCTL, &["snapshot", "restore", file.to_str().unwrap(), "--data-dir", data_dir.to_str().unwrap()]);
            assert!(out.contains(&format!("revision {last} (52 keys)")), "{out}");
        },
    )
    .await;
    let client = r.client_all();
    let got = client.range(everything.clone()).await.unwrap();
    assert_eq!(got.kvs, want, "the same keys, values, revisions and versions");
    assert_eq!(got.header.unwrap().revision, last);
    // History above the compacted revision is there, below it is not.
    let old = client
        .range(RangeRequest { key: b"k01".to_vec(), revision: before_compact, ..Default::default() })
        .await
        .unwrap();
    assert_eq!(old.kvs[0].value, b"second");
    let gone =
        client.range(RangeRequest { key: b"k01".to_vec(), revision: before_compact - 1, ..Default::default() }).await;
    assert!(gone.unwrap_err().message().contains("compacted"));
    // The lease came along, with its key.
    let ttl = client.lease_time_to_live(lease, true).await.unwrap();
    assert_eq!(ttl.granted_ttl, 3600);
    assert_eq!(ttl.keys, vec![b"leased".to_vec()]);
    // The new cluster goes on from the next revision.
    let next = client.put(put("after", "z")).await.unwrap().header.unwrap().revision;
    assert_eq!(next, last + 1);
    for i in r.running() {
        let local = r.client(i).range(support::get_local("after")).await.unwrap();
        assert!(local.kvs.is_empty() || local.kvs[0].mod_revision == next);
    }
    r.shutdown().await;

    // A directory in use, and a damaged file, are refused with a reason.
    let used = dir.path().join("used");
    std::fs::create_dir(&used).unwrap();
    std::fs::write(used.join("keep"), b"x").unwrap();
    let err = fails(KVCTL, &["snapshot", "restore", by_kvctl.to_str().unwrap(), "--data-dir", used.to_str().unwrap()]);
    assert!(err.contains("not empty"), "{err}");
    let mut bytes = std::fs::read(&by_kvctl).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    let damaged = dir.path().join("damaged.snap");
    std::fs::write(&damaged, &bytes).unwrap();
    let fresh = dir.path().join("fresh");
    let err = fails(KVCTL, &["snapshot", "restore", damaged.to_str().unwrap(), "--data-dir", fresh.to_str().unwrap()]);
    assert!(err.contains("digest does not match"), "{err}");
    assert!(!fresh.exists());
    let err = fails(KVCTL, &["snapshot", "status", damaged.to_str().unwrap()]);
    assert!(err.contains("damaged kvd snapshot") && err.contains("digest does not match"), "{err}");
    // A file of another kind is named for what it is not.
    let other = dir.path().join("notes.txt");
    std::fs::write(&other, b"not a snapshot at all\n").unwrap();
    let err = fails(KVCTL, &["snapshot", "status", other.to_str().unwrap()]);
    assert!(err.contains("not a kvd snapshot"), "{err}");
}

/// The bytes of the files under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| match e.file_type().unwrap().is_dir() {
            true => dir_bytes(&e.path()),
            false => e.metadata().unwrap().len(),
        })
        .sum()
}

/// etcd's runbook for giving disk space back: delete, compact, then
/// `etcdctl defrag` of every member. Each member's database shrinks to a
/// fraction, the writes made while the members defragment are all kept,
/// and a member started again afterwards serves the same data.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn defrag_gives_back_the_space_of_deleted_keys_and_keeps_every_write() {
    use kvd::proto::etcdserverpb::DeleteRangeRequest;
    let mut c = TestCluster::start(3, |_| {}).await;
    let client = c.client_all();
    let value = "v".repeat(4096);
    for chunk in (0..2000).collect::<Vec<u32>>().chunks(50) {
        let puts = chunk.iter().map(|i| client.put(put(&format!("k{i:05}"), &value)));
        for done in futures::future::join_all(puts).await {
            done.unwrap();
        }
    }
    let deleted = DeleteRangeRequest { key: b"k00000".to_vec(), range_end: b"k01800".to_vec(), ..Default::default() };
    let revision = client.delete_range(deleted).await.unwrap().header.unwrap().revision;
    client.compact(CompactionRequest { revision, physical: true }).await.unwrap();
    let leader = c.wait_leader().await;
    for i in 0..3 {
        c.wait_applied(i, c.applied(leader)).await;
        c.member(i).member.state.flush().await.unwrap();
    }
    let db_of = |c: &TestCluster, i: usize| {
        let data_dir = c.configs[i].data_dir.clone().unwrap();
        kvd::raft::db_dir::db_path(&data_dir).unwrap()
    };
    let before: Vec<u64> = (0..3).map(|i| dir_bytes(&db_of(&c, i))).collect();

    // Writes go on while each member defragments.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (writer, stopped) = (c.client_all(), stop.clone());
    let writes = tokio::spawn(async move {
        let mut n = 0u32;
        while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
            writer.put(put(&format!("late{n:05}"), "x")).await.unwrap();
            n += 1;
        }
        n
    });
    let endpoints = c.client_addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>();
    let all = endpoints.join(",");
    let out = tokio::task::spawn_blocking(move || ok("etcdctl", &["--endpoints", &all, "defrag"])).await.unwrap();
    for ep in &endpoints {
        assert!(out.contains(&format!("Finished defragmenting etcd member[{ep}]")), "{out}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let late = writes.await.unwrap();
    assert!(late > 0, "no write went through while the members defragmented");

    let after: Vec<u64> = (0..3).map(|i| dir_bytes(&db_of(&c, i))).collect();
    eprintln!("database bytes before defrag {before:?}, after {after:?}; {late} puts during it");
    for i in 0..3 {
        assert!(after[i] * 3 < before[i], "member {i}: {} bytes after defrag, {} before", after[i], before[i]);
    }
    let count = |prefix: &str| RangeRequest {
        key: prefix.as_bytes().to_vec(),
        range_end: format!("{prefix}~").into_bytes(),
        count_only: true,
        serializable: true,
        ..Default::default()
    };
    let check = |c: &TestCluster, i: usize| {
        let member = c.client(i);
        let (k, late_count) = (count("k"), count("late"));
        async move {
            assert_eq!(member.range(k).await.unwrap().count, 200, "member {i}");
            assert_eq!(member.range(late_count).await.unwrap().count, i64::from(late), "member {i}");
        }
    };
    let leader = c.wait_leader().await;
    for i in 0..3 {
        c.wait_applied(i, c.applied(leader)).await;
        check(&c, i).await;
    }
    let again = (leader + 1) % 3;
    c.stop(again).await;
    c.restart(again).await;
    let leader = c.wait_leader().await;
    c.wait_applied(again, c.applied(leader)).await;
    check(&c, again).await;
    let value_of = client.range(RangeRequest { key: b"k01999".to_vec(), ..Default::default() }).await.unwrap();
    assert_eq!(value_of.kvs[0].value, value.as_bytes());
    c.shutdown().await;
}

/// Every member applies the same compactions, so the value files of all
/// grow mostly removed at once; a member begins the defragment it makes by
/// itself only when no other member it can reach has one under way or
/// about to begin. A member's own claim does not hold it back, and a member
/// that is down holds back no one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_defragments_by_itself_only_while_no_other_member_does() {
    let mut c = TestCluster::start(3, |_| {}).await;
    c.wait_leader().await;
    for i in 0..3 {
        assert!(c.member(i).member.defragment_turn().await, "member {i}: no defragment anywhere");
    }
    let claim = c.member(1).member.state.claim_defragment();
    assert!(!c.member(0).member.defragment_turn().await, "member 1 claimed");
    assert!(!c.member(2).member.defragment_turn().await, "member 1 claimed");
    assert!(c.member(1).member.defragment_turn().await, "a member's own claim");
    // Two members that claim at the same moment each see the other's.
    let other = c.member(2).member.state.claim_defragment();
    assert!(!c.member(1).member.defragment_turn().await);
    assert!(!c.member(2).member.defragment_turn().await);
    drop((claim, other));
    assert!(c.member(0).member.defragment_turn().await, "the claims were dropped");
    let held = c.member(2).member.state.claim_defragment();
    c.stop(1).await;
    assert!(!c.member(0).member.defragment_turn().await, "member 2 claimed, member 1 is down");
    drop(held);
    assert!(c.member(0).member.defragment_turn().await, "a member that is down holds back no one");
    c.shutdown().await;
}
