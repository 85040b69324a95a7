//! `/metrics` and `/health` on the client port, over plain HTTP/1.1 as a
//! Prometheus scraper or a load balancer's health check speaks it, beside
//! gRPC on the same port.

mod support;

use std::time::Duration;

use support::{put, TestCluster};

/// Sends `GET path` over HTTP/1.1 and returns the status code and body.
async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    support::http_get(addr, path).await.unwrap_or_else(|e| panic!("GET {path} from {addr}: {e}"))
}

fn value(metrics: &str, name: &str) -> f64 {
    support::metric_value(metrics, name).unwrap_or_else(|| panic!("no {name} in\n{metrics}"))
}

fn check_histogram(metrics: &str, name: &str, least: f64) {
    let count = value(metrics, &format!("{name}_count"));
    assert!(count >= least, "{name}: {count} observations, expected {least} or more");
    let buckets: Vec<f64> = metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}_bucket{{")))
        .map(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("a number"))
        .collect();
    assert_eq!(buckets.len(), 15, "{name}: 14 bounds and +Inf");
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{name}: buckets not cumulative: {buckets:?}");
    assert_eq!(value(metrics, &format!("{name}_bucket{{le=\"+Inf\"}}")), count);
    assert!(value(metrics, &format!("{name}_sum")) > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_and_health_answer_over_http_beside_grpc() {
    let mut c = TestCluster::start(3, |_| {}).await;
    let leader = c.wait_leader().await;
    let client = c.client(leader);
    for i in 0..5 {
        client.put(put(&format!("k{i}"), "v")).await.expect("put");
    }
    let lease = client.lease_grant(60, 0).await.expect("grant").id;
    for _ in 0..3 {
        assert_eq!(client.lease_keep_alive_once(lease).await.expect("keep-alive"), 60);
    }
    let revision = client.put(put("k0", "w")).await.expect("put").header.expect("header").revision;
    c.wait_applied(leader, c.applied(leader)).await;

    let (status, metrics) = get(c.client_addrs[leader], "/metrics").await;
    assert_eq!(status, 200, "{metrics}");
    assert_eq!(value(&metrics, "etcd_server_has_leader"), 1.0);
    assert_eq!(value(&metrics, "etcd_server_is_leader"), 1.0);
    assert_eq!(value(&metrics, "etcd_debugging_mvcc_keys_total"), 5.0);
    assert_eq!(value(&metrics, "etcd_debugging_mvcc_current_revision"), revision as f64);
    assert_eq!(value(&metrics, "etcd_debugging_mvcc_compact_revision"), -1.0);
    assert!(value(&metrics, "etcd_server_proposals_applied_total") >= 6.0);
    assert!(value(&metrics, "process_resident_memory_bytes") > 0.0);
    assert_eq!(value(&metrics, "etcd_server_proposals_pending"), 0.0);
    assert!(value(&metrics, "etcd_server_leader_changes_seen_total") >= 1.0);
    // No snapshot yet: a handful of writes is far below --snapshot-count.
    assert_eq!(value(&metrics, "kvd_raft_snapshot_index"), 0.0);
    // Three keep-alives, one at a time: three batches.
    assert_eq!(value(&metrics, "kvd_lease_renewals_total"), 3.0);
    assert_eq!(value(&metrics, "kvd_lease_renewal_batches_total"), 3.0);

    // Client RPCs by method and code, under etcd's labels.
    let future =
        kvd::proto::etcdserverpb::RangeRequest { key: b"k0".to_vec(), revision: revision + 100, ..Default::default() };
    let err = client.range(future).await.expect_err("a future revision");
    assert_eq!(err.code(), tonic::Code::OutOfRange);
    let (_, metrics) = get(c.client_addrs[leader], "/metrics").await;
    let kv = |method: &str| format!("grpc_method=\"{method}\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"");
    assert_eq!(value(&metrics, &format!("grpc_server_started_total{{{}}}", kv("Put"))), 6.0);
    assert_eq!(value(&metrics, &format!("grpc_server_handled_total{{grpc_code=\"OK\",{}}}", kv("Put"))), 6.0);
    assert_eq!(value(&metrics, &format!("grpc_server_started_total{{{}}}", kv("Range"))), 1.0);
    assert_eq!(value(&metrics, &format!("grpc_server_handled_total{{grpc_code=\"OutOfRange\",{}}}", kv("Range"))), 1.0);
    assert!(!metrics.contains("grpc_code=\"OK\",grpc_method=\"Range\""), "{metrics}");

    // The log's syncs: at least one per put, in buckets that add up.
    check_histogram(&metrics, "etcd_disk_wal_fsync_duration_seconds", 6.0);
    // Groups of applied writes are committed to sled after they are applied.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let (_, metrics) = get(c.client_addrs[leader], "/metrics").await;
        if value(&metrics, "etcd_disk_backend_commit_duration_seconds_count") >= 1.0 {
            break metrics;
        }
        assert!(tokio::time::Instant::now() < deadline, "no commit to sled recorded:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    check_histogram(&metrics, "etcd_disk_backend_commit_duration_seconds", 1.0);

    // A put held up past 100 ms, here by the leader's peers being cut off
    // for a moment, is counted and logged.
    let logs = support::logs();
    let slow_before = value(&metrics, "kvd_server_slow_requests_total");
    let ids: Vec<u64> = (0..3).map(|i| c.member(i).member.id).collect();
    for o in (0..3).filter(|&o| o != leader) {
        c.member(leader).member.network.block(ids[o]);
    }
    let other = c.client(leader);
    let held = tokio::spawn(async move { other.put(put("held", "v")).await.map(drop) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.member(leader).member.network.heal();
    held.await.expect("the put's task").expect("the put, once the peers are back");
    let (_, metrics) = get(c.client_addrs[leader], "/metrics").await;
    assert!(value(&metrics, "kvd_server_slow_requests_total") > slow_before, "{metrics}");
    logs.wait_for(&["request took too long", "method=\"/etcdserverpb.KV/Put\"", "expected_ms=100"]).await;

    let follower = (leader + 1) % 3;
    let (_, metrics) = get(c.client_addrs[follower], "/metrics").await;
    assert_eq!(value(&metrics, "etcd_server_is_leader"), 0.0);

    assert_eq!(get(c.client_addrs[follower], "/health").await, (200, r#"{"health":"true"}"#.to_string()));
    // gRPC still answers on the same port.
    c.client(follower).range(support::get("k0")).await.expect("range");

    // A member left alone cannot read through a quorum: unhealthy.
    c.stop(leader).await;
    c.stop((leader + 2) % 3).await;
    assert_eq!(get(c.client_addrs[follower], "/health").await, (503, r#"{"health":"false"}"#.to_string()));
    c.shutdown().await;
}
