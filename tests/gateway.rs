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
    ("POST", "/v3/lease/timetolive", r#"{"ID":"8","keys":true}"#),
    ("POST", "/v3/kv/lease/timetolive", r#"{"ID":"99"}"#),
    ("POST", "/v3/lock/unlock", r#"{"key":"bXlsb2NrLzg="}"#),
    ("POST", "/v3/lock/unlock", r#"{"key":"bm90LWhlbGQ="}"#),
    ("POST", "/v3/election/proclaim", r#"{"leader":$LEADER,"value":"djI="}"#),
    ("POST", "/v3/election/leader", r#"{"name":"ZWxlY3Rpb24="}"#),
    (
        "POST",
        "/v3/election/proclaim",
        r#"{"leader":{"name":"ZWxlY3Rpb24=","key":"bm9wZQ==","lease":"8"},"value":"djM="}"#,
    ),
    ("POST", "/v3/election/resign", r#"{"leader":$LEADER}"#),
    ("POST", "/v3/election/leader", r#"{"name":"ZWxlY3Rpb24="}"#),
    ("POST", "/v3/cluster/member/list", ""),
    ("POST", "/v3/cluster/member/add", r#"{"peerURLs":["http://127.0.0.1:1"],"isLearner":true}"#),
    ("POST", "/v3/cluster/member/add", r#"{"peerURLs":["nope"]}"#),
    ("POST", "/v3/cluster/member/add", "{}"),
    // The first member's URL. (etcd makes an added member's id from its URL
    // and the second: the same URL added twice within a second gets etcd's
    // "member ID already exist" instead, which kvd's ids never collide into.)
    ("POST", "/v3/cluster/member/add", r#"{"peerURLs":["$PEER"],"isLearner":true}"#),
    ("POST", "/v3/cluster/member/add", r#"{"peerURLs":["http://127.0.0.1:4"],"isLearner":true}"#),
    ("POST", "/v3/cluster/member/promote", r#"{"ID":"$LEARNER"}"#),
    ("POST", "/v3/cluster/member/promote", r#"{"ID":"1"}"#),
    ("POST", "/v3/cluster/member/update", r#"{"ID":"1","peerURLs":["http://127.0.0.1:3"]}"#),
    ("POST", "/v3/cluster/member/update", r#"{"ID":"$LEARNER","peerURLs":["$PEER"]}"#),
    ("POST", "/v3/cluster/member/update", r#"{"ID":"$LEARNER","peerURLs":["http://127.0.0.1:2"]}"#),
    ("POST", "/v3/cluster/member/list", "{}"),
    ("POST", "/v3/cluster/member/remove", r#"{"ID":"$LEARNER"}"#),
    ("POST", "/v3/cluster/member/remove", r#"{"ID":"$LEARNER"}"#),
    ("POST", "/v3/maintenance/alarm", "{}"),
    ("POST", "/v3/maintenance/alarm", r#"{"action":"DEACTIVATE","memberID":"1","alarm":"NOSPACE"}"#),
    ("POST", "/v3/maintenance/status", "{}"),
    ("POST", "/v3/maintenance/defragment", "{}"),
    ("POST", "/v3/maintenance/hash", "{}"),
    ("POST", "/v3/maintenance/hashkv", "{}"),
    ("POST", "/v3/maintenance/transfer-leadership", r#"{"targetID":"1"}"#),
    ("POST", "/v3/kv/range", "null"),
    ("POST", "/v3/kv/put", ""),
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

/// Steps after which etcd 3.4 lists the learner as a voter: its member
/// update replaces the member's attributes with the request's, learner flag
/// and all (a bug later etcd versions fixed). kvd keeps the learner a
/// learner; these answers are compared without the flag.
const ETCD_DROPS_LEARNER_FLAG: &[Step] = &[
    ("POST", "/v3/cluster/member/update", r#"{"ID":"$LEARNER","peerURLs":["http://127.0.0.1:2"]}"#),
    ("POST", "/v3/cluster/member/list", "{}"),
];

/// Every path of etcd 3.4's gateway below `/v3/`.
const ROUTES: &[&str] = &[
    "kv/range",
    "kv/put",
    "kv/deleterange",
    "kv/txn",
    "kv/compaction",
    "watch",
    "lease/grant",
    "lease/revoke",
    "kv/lease/revoke",
    "lease/keepalive",
    "lease/timetolive",
    "kv/lease/timetolive",
    "lease/leases",
    "kv/lease/leases",
    "cluster/member/add",
    "cluster/member/remove",
    "cluster/member/update",
    "cluster/member/list",
    "cluster/member/promote",
    "maintenance/alarm",
    "maintenance/status",
    "maintenance/defragment",
    "maintenance/hash",
    "maintenance/snapshot",
    "maintenance/transfer-leadership",
    "lock/lock",
    "lock/unlock",
    "election/campaign",
    "election/proclaim",
    "election/leader",
    "election/observe",
    "election/resign",
];

/// Bodies that JSON or the messages' types refuse, with the path they go
/// to; each route also gets `{bad` and a GET.
const MALFORMED: &[(&str, &str)] = &[
    ("/v3/kv/range", r#"{"key":5}"#),
    ("/v3/kv/range", "[]"),
    ("/v3/kv/range", r#"{"key":"!!!"}"#),
    ("/v3/kv/range", r#"{"key":"YQ==","sort_order":"NOPE"}"#),
    ("/v3/lease/grant", r#"{"TTL":"abc"}"#),
    ("/v3/maintenance/alarm", r#"{"action":"BOGUS"}"#),
    ("/v3/kv/txn", r#"{"compare":[{"key":"YQ==","target":"NOPE"}]}"#),
];

/// Masks what differs between two clusters by nature (ids, terms, names,
/// URLs, sizes, versions, hashes) and puts member lists in one order.
fn normalize_value(v: &mut serde_json::Value) {
    use serde_json::Value;
    match v {
        Value::Object(map) => {
            for (key, value) in map.iter_mut() {
                let masked = match key.as_str() {
                    "cluster_id" | "member_id" | "raft_term" | "name" | "memberID" | "version" | "dbSize"
                    | "dbSizeInUse" | "raftIndex" | "raftTerm" | "raftAppliedIndex" | "hash" => true,
                    // Member ids, not lease ids.
                    "ID" | "leader" => value.as_str().is_some_and(|s| s.len() >= 6),
                    _ => false,
                };
                if masked {
                    *value = Value::String("*".into());
                } else {
                    normalize_value(value);
                }
            }
            // A lease's time left depends on when it was asked.
            if map.contains_key("grantedTTL") {
                map.insert("TTL".into(), Value::String("*".into()));
            }
            // etcd lists a lease's keys in no set order.
            for list in ["members", "keys"] {
                if let Some(Value::Array(items)) = map.get_mut(list) {
                    items.sort_by_key(|m| m.to_string());
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(normalize_value),
        // URLs: ports differ.
        Value::String(s) if s.starts_with("http://127.0.0.1:") && s.len() > "http://127.0.0.1:9".len() => {
            *s = "<url>".into()
        }
        _ => {}
    }
}

fn normalize(body: &str) -> String {
    body.lines()
        .map(|line| match serde_json::from_str::<serde_json::Value>(line) {
            Ok(mut v) => {
                normalize_value(&mut v);
                v.to_string()
            }
            Err(_) => line.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs `steps` against `base`, filling `$LEARNER` with the id of the member
/// the last member add answered, `$PEER` with the first member's peer URL
/// and `$LEADER` with the leader key the last campaign answered.
fn run_steps(base: &str, steps: &[Step]) -> Vec<(u16, String)> {
    let mut learner = String::new();
    let mut peer = String::new();
    let mut leader = String::from("{}");
    let mut out = Vec::new();
    for (method, path, body) in steps {
        let body = body.replace("$LEARNER", &learner).replace("$LEADER", &leader).replace("$PEER", &peer);
        let answer = curl(base, (method, path, &body));
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&answer.1) {
            if *path == "/v3/cluster/member/add" && v["member"]["ID"].is_string() {
                learner = v["member"]["ID"].as_str().unwrap_or_default().to_string();
            }
            if *path == "/v3/cluster/member/list" && peer.is_empty() {
                peer = v["members"][0]["peerURLs"][0].as_str().unwrap_or_default().to_string();
            }
            if *path == "/v3/election/campaign" && v["leader"].is_object() {
                leader = v["leader"].to_string();
            }
        }
        out.push(answer);
    }
    out
}

/// The status and the error's gRPC code: all that is compared of an answer
/// to malformed JSON, which etcd's Go decoder words its own way.
fn status_and_code((status, body): &(u16, String)) -> (u16, Option<i64>) {
    let code = serde_json::from_str::<serde_json::Value>(body).ok().and_then(|v| v["code"].as_i64());
    (*status, code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gateway_answers_as_etcds() {
    let c = TestCluster::start(1, |_| {}).await;
    let kvd = format!("http://{}", c.client_addrs[0]);
    let etcd = support::Etcd::start_ready().await;
    let etcd_url = etcd.client.clone();
    let mut malformed: Vec<(String, String, String)> =
        MALFORMED.iter().map(|(path, body)| ("POST".into(), path.to_string(), body.to_string())).collect();
    for route in ROUTES {
        malformed.push(("POST".into(), format!("/v3/{route}"), "{bad".into()));
        malformed.push(("GET".into(), format!("/v3/{route}"), String::new()));
    }
    let bad_steps = malformed.clone();
    let (on_kvd, on_etcd, bad_kvd, bad_etcd) = tokio::task::spawn_blocking(move || {
        let bad = |base: &str| bad_steps.iter().map(|(m, p, b)| curl(base, (m, p, b))).collect::<Vec<_>>();
        (run_steps(&kvd, STEPS), run_steps(&etcd_url, STEPS), bad(&kvd), bad(&etcd_url))
    })
    .await
    .unwrap();
    drop(etcd);
    for ((step, kvd), etcd) in STEPS.iter().zip(&on_kvd).zip(&on_etcd) {
        assert_eq!(kvd.0, etcd.0, "HTTP status of {step:?}: kvd {kvd:?}, etcd {etcd:?}");
        let mut on_kvd = normalize(&kvd.1);
        if ETCD_DROPS_LEARNER_FLAG.contains(step) {
            assert!(on_kvd.contains(r#""isLearner":true"#), "kvd keeps the learner a learner: {on_kvd}");
            on_kvd = on_kvd.replace(r#","isLearner":true"#, "");
        }
        assert_eq!(on_kvd, normalize(&etcd.1), "body of {step:?}");
    }
    for ((step, kvd), etcd) in malformed.iter().zip(&bad_kvd).zip(&bad_etcd) {
        assert_eq!(status_and_code(kvd), status_and_code(etcd), "{step:?}: kvd {kvd:?}, etcd {etcd:?}");
    }
    // What the sequence went through.
    assert!(on_kvd.iter().any(|(s, b)| *s == 412 && b.contains("lease already exists")), "{on_kvd:?}");
    assert!(on_kvd.iter().any(|(s, _)| *s == 404), "{on_kvd:?}");
    assert!(on_kvd.iter().filter(|(_, b)| b.starts_with(r#"{"result":"#)).count() >= 4, "{on_kvd:?}");
    assert!(on_kvd.iter().any(|(_, b)| b.contains(r#""isLearner":true"#)), "{on_kvd:?}");
    assert!(on_kvd.iter().any(|(_, b)| b.contains("which is in sync with leader")), "{on_kvd:?}");
    assert!(on_kvd.iter().any(|(_, b)| b.contains("member not found")), "{on_kvd:?}");
    assert!(on_kvd.iter().any(|(_, b)| b.contains("dbSizeInUse")), "{on_kvd:?}");
    assert!(bad_kvd.iter().filter(|(s, _)| *s == 400).count() >= 30, "{bad_kvd:?}");
    assert!(bad_kvd.iter().filter(|(s, _)| *s == 405).count() >= ROUTES.len(), "{bad_kvd:?}");
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

/// Status and `Access-Control-*` headers of `method path` with `headers`
/// against `base`.
fn cors_of(base: &str, method: &str, path: &str, headers: &[&str]) -> (u16, Vec<String>) {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-o", "/dev/null", "-D", "-", "-X", method]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    if method == "POST" {
        cmd.args(["--data-binary", r#"{"key":"YQ=="}"#]);
    }
    let out = cmd.arg(format!("{base}{path}")).output().expect("curl is installed");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let mut cors: Vec<String> = text
        .lines()
        .filter(|l| l.to_ascii_lowercase().starts_with("access-control-"))
        .map(|l| l.trim().to_ascii_lowercase())
        .collect();
    cors.sort();
    (status, cors)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cors_and_host_checks_answer_as_etcds() {
    // etcd takes an origin only with its port.
    let flags = ["--cors", "http://a.example:80", "--host-whitelist", "example.com,127.0.0.1"];
    let restricted = TestCluster::start(1, |args| args.extend(flags.map(String::from))).await;
    let open = TestCluster::start(1, |_| {}).await;
    let etcd_restricted = support::Etcd::start_with("http", &flags.map(String::from));
    let etcd_open = support::Etcd::start();
    for e in [&etcd_restricted, &etcd_open] {
        let client =
            kvd::client::Client::new(std::slice::from_ref(&e.client), std::time::Duration::from_secs(2)).unwrap();
        support::wait_ready(&client).await;
    }
    let cases: &[(&str, &str, &[&str])] = &[
        ("POST", "/v3/kv/range", &["Origin: http://a.example:80"]),
        ("POST", "/v3/kv/range", &["Origin: http://b.example:80"]),
        ("POST", "/v3/kv/range", &[]),
        ("OPTIONS", "/v3/kv/range", &["Origin: http://a.example:80", "Access-Control-Request-Method: POST"]),
        ("OPTIONS", "/v3/kv/range", &["Origin: http://b.example:80"]),
        ("GET", "/version", &["Origin: http://a.example:80"]),
        ("GET", "/health", &["Origin: http://a.example:80"]),
        ("POST", "/v3/kv/range", &["Host: example.com:1234"]),
        ("POST", "/v3/kv/range", &["Host: rebound.example"]),
        ("GET", "/version", &["Host: rebound.example:2379", "Origin: http://a.example:80"]),
        ("OPTIONS", "/version", &["Host: rebound.example"]),
    ];
    let pairs = [
        (format!("http://{}", restricted.client_addrs[0]), etcd_restricted.client.clone()),
        (format!("http://{}", open.client_addrs[0]), etcd_open.client.clone()),
    ];
    let answers = tokio::task::spawn_blocking(move || {
        let mut answers = Vec::new();
        for (kvd, etcd) in &pairs {
            for (method, path, headers) in cases {
                answers.push((
                    format!("{method} {path} {headers:?} on {kvd}"),
                    cors_of(kvd, method, path, headers),
                    cors_of(etcd, method, path, headers),
                ));
            }
        }
        answers
    })
    .await
    .unwrap();
    for (case, on_kvd, on_etcd) in &answers {
        assert_eq!(on_kvd, on_etcd, "{case}");
    }
    // What the cases went through: an echoed origin, none, a star, and a
    // refused host.
    let seen = |want: &str| answers.iter().filter(|(_, k, _)| k.1.iter().any(|h| h.contains(want))).count();
    assert!(seen("access-control-allow-origin: http://a.example:80") >= 3, "{answers:?}");
    assert!(seen("access-control-allow-origin: *") >= 8, "{answers:?}");
    assert!(answers.iter().any(|(_, k, _)| k.0 == 421), "{answers:?}");
    assert!(answers.iter().any(|(_, k, _)| k.0 == 200 && k.1.is_empty()), "{answers:?}");
    drop((etcd_restricted, etcd_open));
    restricted.shutdown().await;
    open.shutdown().await;
}

/// The requests of etcd 3.4's gateway guide ("Why gRPC gateway"), in its
/// order and its spelling (camelCase fields in the transactions): what
/// each answers, and the watch's two lines around a put.
fn docs_walkthrough(base: &str) -> Vec<(u16, String)> {
    use std::io::BufRead;
    let mut out = vec![
        curl(base, ("POST", "/v3/kv/put", r#"{"key": "Zm9v", "value": "YmFy"}"#)),
        curl(base, ("POST", "/v3/kv/range", r#"{"key": "Zm9v"}"#)),
        curl(base, ("POST", "/v3/kv/range", r#"{"key": "Zm9v", "range_end": "Zm9w"}"#)),
    ];
    let mut watch = Command::new("curl")
        .args(["-s", "-N", "--max-time", "10", "-X", "POST", "-d", r#"{"create_request": {"key":"Zm9v"} }"#])
        .arg(format!("{base}/v3/watch"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("curl is installed");
    let mut lines = std::io::BufReader::new(watch.stdout.take().expect("piped"));
    let mut line = String::new();
    // The put goes once the watch is created.
    lines.read_line(&mut line).expect("the watch's first line");
    out.push((200, line.trim_end().to_string()));
    out.push(curl(base, ("POST", "/v3/kv/put", r#"{"key": "Zm9v", "value": "YmFy"}"#)));
    line.clear();
    lines.read_line(&mut line).expect("the watch's event");
    out.push((200, line.trim_end().to_string()));
    let _ = watch.kill();
    let _ = watch.wait();
    for body in [
        r#"{"compare":[{"target":"CREATE","key":"Zm9v","createRevision":"2"}],"success":[{"requestPut":{"key":"Zm9v","value":"YmFy"}}]}"#,
        r#"{"compare":[{"version":"4","result":"EQUAL","target":"VERSION","key":"Zm9v"}],"success":[{"requestRange":{"key":"Zm9v"}}]}"#,
        r#"{"compare":[{"version":"3","result":"EQUAL","target":"VERSION","key":"Zm9v"}],"success":[{"requestRange":{"key":"Zm9v"}}]}"#,
    ] {
        out.push(curl(base, ("POST", "/v3/kv/txn", body)));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcds_gateway_guide_works_as_on_etcd() {
    let c = TestCluster::start(1, |_| {}).await;
    let kvd = format!("http://{}", c.client_addrs[0]);
    let etcd = support::Etcd::start_ready().await;
    let etcd_url = etcd.client.clone();
    let (on_kvd, on_etcd) =
        tokio::task::spawn_blocking(move || (docs_walkthrough(&kvd), docs_walkthrough(&etcd_url))).await.unwrap();
    drop(etcd);
    assert_eq!(on_kvd.len(), on_etcd.len());
    for (i, (kvd, etcd)) in on_kvd.iter().zip(&on_etcd).enumerate() {
        assert_eq!(kvd.0, etcd.0, "step {i}: kvd {kvd:?}, etcd {etcd:?}");
        assert_eq!(normalize(&kvd.1), normalize(&etcd.1), "step {i}");
    }
    // What the guide shows: the value read back, the watch's event, a
    // transaction that took its success branch with a camelCase request.
    assert!(
        on_kvd[1].1.contains(
            r#""kvs":[{"key":"Zm9v","create_revision":"2","mod_revision":"2","version":"1","value":"YmFy"}]"#
        ),
        "{on_kvd:?}"
    );
    assert!(on_kvd[3].1.contains(r#""created":true"#), "{on_kvd:?}");
    assert!(
        on_kvd[5].1.contains(r#""events":[{"kv":{"key":"Zm9v","create_revision":"2","mod_revision":"3""#),
        "{on_kvd:?}"
    );
    assert!(on_kvd[6].1.contains(r#""succeeded":true"#), "{on_kvd:?}");
    assert!(on_kvd[8].1.contains(r#""response_range""#) && on_kvd[8].1.contains(r#""succeeded":true"#), "{on_kvd:?}");
    c.shutdown().await;
}
