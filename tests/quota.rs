//! The storage quota, alarms and automatic compaction on in-process
//! clusters: a write past `--quota-backend-bytes` raises NOSPACE, which
//! every member then applies alike (puts, Txns with a put and lease grants
//! refused; reads, deletes and compaction go on), it survives a restart, and
//! after compaction `alarm disarm` lets writes resume. A disk with less free
//! space than `--quota-disk-free-bytes` raises NOSPACE too; CORRUPT refuses
//! every write; periodic automatic compaction compacts on its own.

mod support;

use std::time::Duration;

use kvd::proto::etcdserverpb::alarm_request::AlarmAction;
use kvd::proto::etcdserverpb::{
    request_op, AlarmMember, AlarmRequest, AlarmType, CompactionRequest, DeleteRangeRequest, RangeRequest, RequestOp,
    TxnRequest,
};
use support::{put, TestCluster, WAIT};
use tonic::Code;

const NO_SPACE: &str = "etcdserver: mvcc: database space exceeded";

fn alarm(action: AlarmAction, member_id: u64, alarm: AlarmType) -> AlarmRequest {
    AlarmRequest { action: action as i32, member_id, alarm: alarm as i32 }
}

async fn alarms(client: &kvd::client::Client) -> Vec<AlarmMember> {
    client.alarm(alarm(AlarmAction::Get, 0, AlarmType::None)).await.expect("alarm list").alarms
}

fn refused<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code, message: &str) {
    let e = r.expect_err("refused");
    assert_eq!((e.code(), e.message()), (code, message), "{e:?}");
}

fn txn(ops: Vec<RequestOp>) -> TxnRequest {
    TxnRequest { success: ops, ..Default::default() }
}

fn delete_op(key: &str) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestDeleteRange(DeleteRangeRequest {
            key: key.into(),
            ..Default::default()
        })),
    }
}

fn put_op(key: &str) -> RequestOp {
    RequestOp { request: Some(request_op::Request::RequestPut(put(key, "v"))) }
}

/// The bytes of data a member reports in use (Status `dbSizeInUse`).
async fn in_use(client: &kvd::client::Client) -> i64 {
    client.status_of(0).await.expect("status").db_size_in_use
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quota_raises_nospace_and_disarm_after_compaction_lets_writes_resume() {
    const QUOTA: i64 = 256 * 1024;
    let mut c = TestCluster::start(3, |args| args.extend(["--quota-backend-bytes".into(), QUOTA.to_string()])).await;
    let leader = c.wait_leader().await;
    let via = (leader + 1) % 3;
    let client = c.client(via);
    let value = |n: usize| format!("{n:05}{}", "x".repeat(10 * 1024));
    // Overwrites of one key: history grows, the live data does not.
    let mut written = 0;
    let err = loop {
        match client.put(put("big", &value(written))).await {
            Ok(_) => written += 1,
            Err(e) => break e,
        }
        assert!(written < 100, "no NOSPACE after {written} puts of 10 KiB under a 256 KiB quota");
    };
    let last = value(written - 1);
    assert_eq!((err.code(), err.message()), (Code::ResourceExhausted, NO_SPACE));
    assert!(written >= 15, "NOSPACE after only {written} puts");
    // The alarm is the member's the client wrote through, on every member.
    let raised = AlarmMember { member_id: c.member(via).member.id, alarm: AlarmType::Nospace as i32 };
    for i in 0..3 {
        assert_eq!(alarms(&c.client(i)).await, vec![raised], "member {i}");
    }
    let status = c.client(leader).status_of(0).await.expect("status");
    let listed = format!("memberID:{} alarm:NOSPACE ", raised.member_id);
    assert!(status.errors.contains(&listed), "{:?}", status.errors);
    // Every member refuses what adds data, as it applies the alarm...
    for i in 0..3 {
        let client = c.client(i);
        refused(client.put(put("small", "v")).await, Code::ResourceExhausted, NO_SPACE);
        refused(client.txn(txn(vec![put_op("t")])).await, Code::ResourceExhausted, NO_SPACE);
        refused(client.lease_grant(60, 0).await, Code::ResourceExhausted, NO_SPACE);
    }
    // ...and serves reads, deletes and Txns without a put.
    let got = client.range(RangeRequest { key: b"big".to_vec(), ..Default::default() }).await.expect("read");
    assert_eq!(got.kvs[0].value, last.as_bytes(), "the last acknowledged put");
    client.put(put("doomed", "v")).await.expect_err("still refused");
    client.txn(txn(vec![delete_op("nothing")])).await.expect("a Txn that only deletes");
    client.delete_range(DeleteRangeRequest { key: b"nothing".to_vec(), ..Default::default() }).await.expect("delete");
    // The alarm is replicated state: a restarted member still has it.
    let follower = (leader + 2) % 3;
    c.stop(follower).await;
    c.restart(follower).await;
    assert_eq!(alarms(&c.client(follower)).await, vec![raised]);
    // Compaction frees the history; no defragment is needed.
    let before = in_use(&client).await;
    assert!(before >= QUOTA * 9 / 10, "{before} bytes in use at NOSPACE");
    let rev = client.range(RangeRequest { key: b"big".to_vec(), ..Default::default() }).await.unwrap();
    let rev = rev.header.unwrap().revision;
    client.compact(CompactionRequest { revision: rev, physical: true }).await.expect("compaction");
    let after = in_use(&client).await;
    assert!(after < QUOTA / 4, "{after} bytes in use after compaction (was {before})");
    // Still refused until the alarm is disarmed.
    refused(client.put(put("small", "v")).await, Code::ResourceExhausted, NO_SPACE);
    let cleared =
        client.alarm(alarm(AlarmAction::Deactivate, raised.member_id, AlarmType::Nospace)).await.expect("disarm");
    assert_eq!(cleared.alarms, vec![raised]);
    // A second disarm finds nothing to clear.
    let again =
        client.alarm(alarm(AlarmAction::Deactivate, raised.member_id, AlarmType::Nospace)).await.expect("disarm");
    assert!(again.alarms.is_empty());
    for i in 0..3 {
        assert!(alarms(&c.client(i)).await.is_empty(), "member {i}");
        c.client(i).put(put(&format!("after{i}"), "v")).await.expect("writes resume");
    }
    // Nothing acknowledged was lost, on any member.
    for i in 0..3 {
        let got = c.client(i).range(RangeRequest { key: b"big".to_vec(), ..Default::default() }).await.unwrap();
        assert_eq!(got.kvs[0].value, last.as_bytes(), "member {i}");
        assert_eq!(got.kvs[0].version, written as i64, "member {i}");
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_disk_short_of_free_space_raises_nospace_again_until_it_has_room() {
    // No disk has a pebibyte free: the member raises NOSPACE at once.
    let c =
        TestCluster::start(1, |args| args.extend(["--quota-disk-free-bytes".into(), (1u64 << 50).to_string()])).await;
    let client = c.client(0);
    let id = c.member(0).member.id;
    let want = vec![AlarmMember { member_id: id, alarm: AlarmType::Nospace as i32 }];
    let raised = || async { alarms(&client).await == want };
    wait_until(raised).await;
    refused(client.put(put("k", "v")).await, Code::ResourceExhausted, NO_SPACE);
    client.alarm(alarm(AlarmAction::Deactivate, id, AlarmType::Nospace)).await.expect("disarm");
    // The disk is no roomier: the member raises it again.
    wait_until(raised).await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn corrupt_refuses_every_write_and_unknown_alarms_are_refused() {
    let c = TestCluster::start(3, |_| {}).await;
    let client = c.client_all();
    client.put(put("k", "v")).await.expect("put");
    let id = c.member(1).member.id;
    let raised = client.alarm(alarm(AlarmAction::Activate, id, AlarmType::Corrupt)).await.expect("activate");
    assert_eq!(raised.alarms, vec![AlarmMember { member_id: id, alarm: AlarmType::Corrupt as i32 }]);
    const CORRUPT: &str = "etcdserver: corrupt cluster";
    refused(client.put(put("k", "w")).await, Code::DataLoss, CORRUPT);
    let del = DeleteRangeRequest { key: b"k".to_vec(), ..Default::default() };
    refused(client.delete_range(del).await, Code::DataLoss, CORRUPT);
    refused(client.compact(CompactionRequest { revision: 1, physical: false }).await, Code::DataLoss, CORRUPT);
    let got = client.range(RangeRequest { key: b"k".to_vec(), ..Default::default() }).await.expect("reads go on");
    assert_eq!(got.kvs[0].value, b"v");
    client.alarm(alarm(AlarmAction::Deactivate, id, AlarmType::Corrupt)).await.expect("deactivate");
    client.put(put("k", "w")).await.expect("writes resume");
    let bad = AlarmRequest { action: AlarmAction::Activate as i32, member_id: id, alarm: 9 };
    refused(client.alarm(bad).await, Code::InvalidArgument, "unknown alarm type 9");
    let bad = AlarmRequest { action: 7, member_id: id, alarm: 1 };
    refused(client.alarm(bad).await, Code::InvalidArgument, "unknown alarm action 7");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn periodic_auto_compaction_keeps_the_retention_of_history() {
    let c = TestCluster::start(3, |args| args.extend(["--auto-compaction-retention".into(), "1s".into()])).await;
    let client = c.client_all();
    let start = std::time::Instant::now();
    let mut first_revision = 0;
    let compacted = loop {
        let resp = client.put(put("k", "v")).await.expect("put");
        if first_revision == 0 {
            first_revision = resp.header.unwrap().revision;
        }
        let old = RangeRequest { key: b"k".to_vec(), revision: first_revision, ..Default::default() };
        match client.range(old).await {
            Ok(_) => {}
            Err(e) if e.message() == "etcdserver: mvcc: required revision has been compacted" => break start.elapsed(),
            Err(e) => panic!("{e:?}"),
        }
        assert!(start.elapsed() < WAIT, "no automatic compaction within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Not before the retention has passed.
    assert!(compacted >= Duration::from_secs(1), "compacted after {compacted:?}");
    // What was written in the last half second is still readable.
    let recent = client.put(put("k", "v")).await.expect("put").header.unwrap().revision;
    let read = RangeRequest { key: b"k".to_vec(), revision: recent - 1, ..Default::default() };
    client.range(read).await.expect("recent history is kept");
    c.shutdown().await;
}

async fn wait_until<F: std::future::Future<Output = bool>>(mut f: impl FnMut() -> F) {
    let deadline = std::time::Instant::now() + WAIT;
    while !f().await {
        assert!(std::time::Instant::now() < deadline, "condition not met within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
