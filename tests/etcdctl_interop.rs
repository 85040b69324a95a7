//! etcdctl 3.4 (Debian's `etcd-client`) against a three-member kvd: every KV
//! command, the member list and endpoint status and health. The test runner
//! (`cluster-scripts/test.sh`) installs etcdctl; without it these tests fail.

mod support;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use support::TestCluster;

struct Etcdctl {
    endpoints: String,
}

impl Etcdctl {
    fn run_with(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut child = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(&self.endpoints)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("etcdctl is installed (apt-get install etcd-client; cluster-scripts/test.sh does it)");
        if let Some(input) = stdin {
            child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        }
        drop(child.stdin.take());
        child.wait_with_output().unwrap()
    }

    /// Runs etcdctl, expects success, returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run_with(args, None);
        assert!(out.status.success(), "etcdctl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs etcdctl, expects failure, returns stderr.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run_with(args, None);
        assert!(!out.status.success(), "etcdctl {args:?} should fail");
        String::from_utf8(out.stderr).unwrap()
    }
}

async fn cluster_and_etcdctl() -> (TestCluster, Etcdctl) {
    let c = TestCluster::start(3, |_| {}).await;
    let endpoints = c.client_addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(",");
    (c, Etcdctl { endpoints })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn put_get_del_with_every_option() {
    let (c, e) = cluster_and_etcdctl().await;
    tokio::task::spawn_blocking(move || {
        assert_eq!(e.ok(&["put", "a", "1"]), "OK\n");
        assert_eq!(e.ok(&["put", "b", "2"]), "OK\n");
        assert_eq!(e.ok(&["put", "c", "3"]), "OK\n");
        assert_eq!(e.ok(&["put", "a", "10", "--prev-kv"]), "OK\na\n1\n");
        assert_eq!(e.ok(&["get", "a"]), "a\n10\n");
        assert_eq!(e.ok(&["get", "a", "--print-value-only"]), "10\n");
        assert_eq!(e.ok(&["get", "", "--prefix", "--keys-only"]), "a\n\nb\n\nc\n\n");
        assert_eq!(e.ok(&["get", "b", "--from-key"]), "b\n2\nc\n3\n");
        assert_eq!(e.ok(&["get", "a", "c"]), "a\n10\nb\n2\n");
        assert_eq!(e.ok(&["get", "", "--prefix", "--limit", "2"]), "a\n10\nb\n2\n");
        assert_eq!(e.ok(&["get", "", "--prefix", "--order", "DESCEND"]), "c\n3\nb\n2\na\n10\n");
        assert_eq!(e.ok(&["get", "", "--prefix", "--sort-by", "MODIFY", "--order", "DESCEND"]), "a\n10\nc\n3\nb\n2\n");
        assert!(e.ok(&["get", "", "--prefix", "--limit", "1", "-w", "json"]).contains("\"more\":true,\"count\":3"));
        assert_eq!(e.ok(&["get", "a", "--rev", "2"]), "a\n1\n");
        assert_eq!(e.ok(&["get", "a", "--consistency", "s"]), "a\n10\n");
        let json = e.ok(&["get", "a", "-w", "json"]);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["kvs"][0]["version"], 2);
        assert_eq!(v["kvs"][0]["create_revision"], 2);
        assert_eq!(v["kvs"][0]["mod_revision"], 5);
        assert_eq!(v["header"]["revision"], 5);
        assert_eq!(e.ok(&["del", "a", "--prev-kv"]), "1\na\n10\n");
        assert_eq!(e.ok(&["del", "nothing"]), "0\n");
        e.ok(&["put", "p/1", "x"]);
        e.ok(&["put", "p/2", "y"]);
        assert_eq!(e.ok(&["del", "p/", "--prefix"]), "2\n");
        assert_eq!(e.ok(&["del", "b", "--from-key"]), "2\n");
        assert_eq!(e.ok(&["get", "", "--from-key"]), "");
        assert!(e.fails(&["get", "a", "--rev", "1000"]).contains("required revision is a future revision"));
        assert!(e.fails(&["put", "", "v"]).contains("key is not provided"));
    })
    .await
    .unwrap();
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn txn_and_compaction() {
    let (c, e) = cluster_and_etcdctl().await;
    tokio::task::spawn_blocking(move || {
        e.ok(&["put", "k", "v1"]);
        let txn = "value(\"k\") = \"v1\"\n\nput k v2\nget k\n\nput k failed\n\n";
        let out = e.run_with(&["txn"], Some(txn));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "SUCCESS\n\nOK\n\nk\nv2\n");
        let out = e.run_with(&["txn"], Some(txn));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "FAILURE\n\nOK\n");
        assert_eq!(e.ok(&["get", "k", "--print-value-only"]), "failed\n");
        let out = e.run_with(&["txn", "-w", "json"], Some("mod(\"k\") > \"0\"\n\ndel k\n\n\n"));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["succeeded"], true);
        let dup = e.run_with(&["txn"], Some("\nput x 1\nput x 2\n\n\n"));
        assert!(String::from_utf8_lossy(&dup.stderr).contains("duplicate key given in txn request"));

        assert_eq!(e.ok(&["compaction", "3"]), "compacted revision 3\n");
        assert!(e.fails(&["get", "k", "--rev", "2"]).contains("required revision has been compacted"));
        assert!(e.fails(&["compaction", "2"]).contains("required revision has been compacted"));
        assert_eq!(e.ok(&["compaction", "--physical", "4"]), "compacted revision 4\n");
    })
    .await
    .unwrap();
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn member_list_and_endpoint_status_and_health() {
    let (c, e) = cluster_and_etcdctl().await;
    let ids: Vec<String> = (0..3).map(|i| format!("{:x}", c.member(i).node.id)).collect();
    let peers: Vec<String> = c.peer_addrs.iter().map(|a| format!("http://{a}")).collect();
    // Members publish their names through the log shortly after start.
    let deadline = std::time::Instant::now() + support::WAIT;
    let list = loop {
        let e2 = Etcdctl { endpoints: e.endpoints.clone() };
        let list = tokio::task::spawn_blocking(move || e2.ok(&["member", "list"])).await.unwrap();
        if list.lines().all(|l| l.contains(", started, m")) || std::time::Instant::now() > deadline {
            break list;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(list.lines().count(), 3, "{list}");
    for (i, line) in list.lines().enumerate() {
        let _ = i;
        assert!(line.contains(", started, m"), "{line}");
    }
    for (id, peer) in ids.iter().zip(&peers) {
        assert!(list.contains(&format!("{id}, started")) && list.contains(peer.as_str()), "{list}");
    }
    let leader_id = format!("{:x}", c.member(c.wait_leader().await).node.id);
    tokio::task::spawn_blocking(move || {
        let status = e.ok(&["endpoint", "status"]);
        assert_eq!(status.lines().count(), 3, "{status}");
        assert_eq!(status.matches(", true, false, ").count(), 1, "exactly one leader: {status}");
        let leader_line = status.lines().find(|l| l.contains(", true, false, ")).unwrap();
        assert!(leader_line.contains(&leader_id), "{status}");
        let table = e.ok(&["endpoint", "status", "-w", "table"]);
        assert!(table.contains("RAFT APPLIED INDEX"), "{table}");
        let health = e.run_with(&["endpoint", "health"], None);
        assert!(health.status.success(), "{}", String::from_utf8_lossy(&health.stderr));
        let text = String::from_utf8_lossy(&health.stdout).to_string() + &String::from_utf8_lossy(&health.stderr);
        assert_eq!(text.matches("is healthy: successfully committed proposal").count(), 3, "{text}");
    })
    .await
    .unwrap();
    c.shutdown().await;
}
