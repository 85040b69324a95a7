//! etcd's HTTP/JSON gateway: the same requests, good and bad, sent with curl
//! to kvd and to etcd 3.4, and the answers compared (HTTP status and body,
//! after ids, terms, names and URLs are masked), the watch and keep-alive
//! streams included.

mod support;

use std::process::Command;

use support::TestCluster;

/// One request: method, path, JSON body.
type Step = (&'static str, &'static str, &'static str);

const STEPS: &[Step] = &[
    ("POST", "/v3/kv/put", r#"{"key":"Zm9v","value":"YmFy"}"#),
    ("POST", "/v3/kv/put", r#"{"key":"Zm9v","value":"YmF6","prev_kv":true}"#),
    ("POST", "/v3/kv/range", r#"{"key":"Zm9v"}"#),
    ("POST", "/v3beta/kv/range", r#"{"key":"Zm9v","count_only":true}"#),
    ("POST", "/v3/kv/range", r#"{"key":"Zm9v","nope":1}"#),
    ("POST", "/v3/kv/range", r#"{"key":"Zm9v","revision":"99"}"#),
    ("POST", "/v3/kv/range", r#"{"key":""}"#),
    ("POST", "/v3/kv/range", r#"{"key":"Zm9v","sort_order":"DESCEND","sort_target":"MOD","keys_only":true}"#),
    (
        "POST",
        "/v3/kv/txn",
        r#"{"compare":[{"key":"Zm9v","target":"VALUE","result":"EQUAL","value":"YmF6"}],"success":[{"request_put":{"key":"YQ==","value":"MQ=="}},{"request_range":{"key":"YQ=="}}]}"#,
    ),
    (
        "POST",
        "/v3/kv/txn",
        r#"{"compare":[{"key":"Zm9v","target":"VERSION","result":"GREATER","version":"5"}],"failure":[{"request_delete_range":{"key":"YQ==","prev_kv":true}}]}"#,
    ),
    ("POST", "/v3/kv/deleterange", r#"{"key":"Zm9v","prev_kv":true}"#),
    ("POST", "/v3/lease/grant", r#"{"TTL":"60","ID":"7"}"#),
    ("POST", "/v3/lease/grant", r#"{"TTL":"60","ID":"7"}"#),
    ("POST", "/v3/kv/put", r#"{"key":"bGVhc2Vk","value":"eA==","lease":"7"}"#),
    ("POST", "/v3/kv/put", r#"{"key":"bGVhc2Vk","value":"eA==","lease":"123"}"#),
    ("POST", "/v3/kv/lease/leases", "{}"),
    ("POST", "/v3/lease/revoke", r#"{"ID":"7"}"#),
    ("POST", "/v3/kv/lease/revoke", r#"{"ID":"7"}"#),
    ("POST", "/v3/kv/range", r#"{"key":"bGVhc2Vk"}"#),
    ("POST", "/v3/kv/compaction", r#"{"revision":"3"}"#),
    ("POST", "/v3/kv/range", r#"{"key":"Zm9v","revision":"2"}"#),
    ("POST", "/v3/kv/compaction", r#"{"revision":"2"}"#),
    ("POST", "/v3/lease/grant", r#"{"TTL":"60","ID":"8"}"#),
    ("POST", "/v3/lock/lock", r#"{"name":"bXlsb2Nr","lease":"8"}"#),
    ("POST", "/v3/election/campaign", r#"{"name":"ZWxlY3Rpb24=","lease":"8","value":"djE="}"#),
    ("POST", "/v3/election/leader", r#"{"name":"ZWxlY3Rpb24="}"#),
    ("POST", "/v3/election/observe", r#"{"name":"ZWxlY3Rpb24="}"#),
    ("POST", "/v3/lease/keepalive", r#"{"ID":"8"}{"ID":"8"}{"ID":"99"}"#),
    ("POST", "/v3/watch", r#"{"create_request":{"key":"Zm9v","start_revision":"1","prev_kv":true}}"#),
    ("POST", "/v3/watch", r#"{"create_request":{"key":"YQ==","range_end":"Yg==","start_revision":"1"}}"#),
    ("POST", "/v3/cluster/member/list", ""),
    ("POST", "/v3/maintenance/alarm", "{}"),
    ("POST", "/v3/nope", "{}"),
    ("GET", "/v3/kv/range", ""),
];

/// Status line code and body of `method path` with `body` against `base`.
fn curl(base: &str, (method, path, body): (&str, &str, &str)) -> (u16, String) {
    use std::io::Write;
    let mut child = Command::new("curl")
        .args(["-s", "-X", method, "-w", "\n%{http_code}"])
        // A watch goes on until the client leaves.
        .args(if ["/v3/watch", "/v3/election/observe"].contains(&path) { vec!["--max-time", "1"] } else { vec![] })
        // The body on stdin: it may be larger than a command line.
        .args(if body.is_empty() { vec![] } else { vec!["--data-binary", "@-"] })
        .arg(format!("{base}{path}"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("curl is installed");
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(body.as_bytes()).expect("write the body");
    }
    let out = child.wait_with_output().expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or((&text, "0"));
    // etcd's gateway appends gRPC's trailer to some error bodies.
    let body = body.split("Grpc-Trailer-Content-Type").next().unwrap_or(body);
    (code.trim().parse().unwrap_or(0), body.trim_end().to_string())
}

/// Masks the value of `"key":"…"` wherever it appears, if it is at least
/// `min` characters long.
fn mask(text: &str, key: &str, min: usize) -> String {
    let marker = format!("\"{key}\":\"");
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find(&marker) {
        out.push_str(&rest[..at + marker.len()]);
        rest = &rest[at + marker.len()..];
        let end = rest.find('"').unwrap_or(rest.len());
        out.push_str(if end >= min { "*" } else { &rest[..end] });
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

fn normalize(body: &str) -> String {
    let mut b = body.to_string();
    for key in ["cluster_id", "member_id", "raft_term", "name"] {
        b = mask(&b, key, 1);
    }
    // Member ids, not lease ids.
    b = mask(&b, "ID", 6);
    // URLs: ports differ.
    while let Some(at) = b.find("http://127.0.0.1:") {
        let end = b[at..].find('"').map_or(b.len(), |e| at + e);
        b.replace_range(at..end, "<url>");
    }
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gateway_answers_as_etcds() {
    let c = TestCluster::start(1, |_| {}).await;
    let kvd = format!("http://{}", c.client_addrs[0]);
    let etcd = support::Etcd::start();
    let client =
        kvd::client::Client::new(std::slice::from_ref(&etcd.client), std::time::Duration::from_secs(2)).unwrap();
    support::wait_ready(&client).await;
    let etcd_url = etcd.client.clone();
    let (on_kvd, on_etcd) = tokio::task::spawn_blocking(move || {
        let run = |base: &str| STEPS.iter().map(|s| curl(base, *s)).collect::<Vec<_>>();
        (run(&kvd), run(&etcd_url))
    })
    .await
    .unwrap();
    drop(etcd);
    for ((step, kvd), etcd) in STEPS.iter().zip(&on_kvd).zip(&on_etcd) {
        assert_eq!(kvd.0, etcd.0, "HTTP status of {step:?}: kvd {kvd:?}, etcd {etcd:?}");
        assert_eq!(normalize(&kvd.1), normalize(&etcd.1), "body of {step:?}");
    }
    // What the sequence went through.
    assert!(on_kvd.iter().any(|(s, b)| *s == 412 && b.contains("lease already exists")), "{on_kvd:?}");
    assert!(on_kvd.iter().any(|(s, _)| *s == 404), "{on_kvd:?}");
    assert!(on_kvd.iter().filter(|(_, b)| b.starts_with(r#"{"result":"#)).count() >= 4, "{on_kvd:?}");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn version_and_malformed_requests() {
    let c = TestCluster::start(1, |_| {}).await;
    let base = format!("http://{}", c.client_addrs[0]);
    let (version, bad, big, snapshot) = tokio::task::spawn_blocking(move || {
        let version = curl(&base, ("GET", "/version", ""));
        let bad = curl(&base, ("POST", "/v3/kv/range", "{bad"));
        // Larger than --max-request-bytes plus gRPC's allowance.
        let value = "A".repeat(3 << 20);
        let body = format!(r#"{{"key":"Zm9v","value":"{value}"}}"#);
        let big = curl(&base, ("POST", "/v3/kv/put", &body));
        let snapshot = curl(&base, ("POST", "/v3/maintenance/snapshot", "{}"));
        (version, bad, big, snapshot)
    })
    .await
    .unwrap();
    assert_eq!(version, (200, r#"{"etcdserver":"3.4.0","etcdcluster":"3.4.0"}"#.to_string()));
    // etcd's Go parser words it otherwise; the status and code are etcd's.
    assert_eq!(bad.0, 400, "{bad:?}");
    assert!(bad.1.contains(r#""code":3"#), "{bad:?}");
    assert_eq!(big.0, 429, "{big:?}");
    assert!(big.1.contains("received message larger than max"), "{big:?}");
    // The snapshot as lines of base64 chunks, the last one its SHA-256.
    assert_eq!(snapshot.0, 200);
    let lines: Vec<serde_json::Value> = snapshot.1.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(lines.len() >= 2, "{snapshot:?}");
    assert!(lines.iter().all(|l| l["result"]["blob"].is_string()), "{snapshot:?}");
    c.shutdown().await;
}
