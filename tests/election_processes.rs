//! Leader election among replicas that are separate processes (the
//! `leader_election` example), against a three-member cluster: the leading
//! process is killed, then the next one is paused past its lease. Another
//! replica takes over each time, every observer sees the leaders in the same
//! order, and no two replicas ever both succeed at fenced writes in one lease
//! period.

mod support;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvd::proto::etcdserverpb::WatchCreateRequest;
use kvd::proto::mvccpb::event::EventType;
use support::{TestCluster, WAIT};

const TTL_SECS: u64 = 2;
const ELECTION: &str = "svc";
const WORK_KEY: &str = "svc-work";

/// What the replicas printed: (replica, when, line).
type Lines = Arc<Mutex<Vec<(usize, Instant, String)>>>;

/// Replica processes, killed when dropped (also when the test fails).
struct Replicas {
    children: Vec<Child>,
    lines: Lines,
}

impl Replicas {
    fn start(n: usize, endpoints: &str) -> Replicas {
        let bin = example_binary("leader_election");
        let lines: Lines = Default::default();
        let mut children = Vec::new();
        for i in 0..n {
            let mut child = Command::new(&bin)
                .args(["--endpoints", endpoints, "--id", &format!("r{i}"), "--election", ELECTION])
                .args(["--work-key", WORK_KEY, "--ttl", &TTL_SECS.to_string(), "--work-interval-ms", "100"])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
            let out = child.stdout.take().expect("stdout");
            let sink = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    sink.lock().unwrap().push((i, Instant::now(), line));
                }
            });
            children.push(child);
        }
        Replicas { children, lines }
    }

    fn signal(&self, i: usize, sig: &str) {
        let ok = Command::new("kill").args([sig, &self.children[i].id().to_string()]).status().expect("kill");
        assert!(ok.success(), "kill {sig} replica {i}");
    }

    /// Waits until a line from a replica matches `pred`; returns the first.
    async fn wait_line(&self, what: &str, pred: impl Fn(usize, &str) -> bool) -> (usize, Instant, String) {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(hit) = self.lines.lock().unwrap().iter().find(|(i, _, l)| pred(*i, l)).cloned() {
                return hit;
            }
            assert!(Instant::now() < deadline, "waited {WAIT:?} for {what}: {:#?}", self.lines.lock().unwrap());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn count(&self, i: usize, prefix: &str) -> usize {
        self.lines.lock().unwrap().iter().filter(|(r, _, l)| *r == i && l.starts_with(prefix)).count()
    }
}

impl Drop for Replicas {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Builds an example (test runs build examples only as test harnesses) and
/// returns its path under `target/<profile>/examples`.
fn example_binary(name: &str) -> PathBuf {
    let mut build = Command::new(env!("CARGO"));
    build.current_dir(env!("CARGO_MANIFEST_DIR")).args(["build", "--quiet", "--example", name]);
    if !cfg!(debug_assertions) {
        build.arg("--release");
    }
    let built = build.status().expect("run cargo");
    assert!(built.success(), "cargo build --example {name} failed");
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).expect("target dir");
    profile_dir.join("examples").join(name)
}

fn token_of(line: &str) -> i64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("token="))
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no token in {line:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_in_processes_fail_over_in_order_and_never_both_write_with_valid_tokens() {
    let c = TestCluster::start(3, |_| {}).await;
    let endpoints = c.client_addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(",");

    // An observer on every member, from before the first campaign.
    let mut observed = Vec::new();
    for m in 0..3 {
        let mut stream = c.client(m).observe(ELECTION.as_bytes()).await.expect("observe");
        let seen: Arc<Mutex<Vec<i64>>> = Default::default();
        let sink = seen.clone();
        tokio::spawn(async move {
            while let Ok(Some(resp)) = stream.message().await {
                let rev = resp.kv.map_or(0, |kv| kv.create_revision);
                let mut s = sink.lock().unwrap();
                if s.last() != Some(&rev) {
                    s.push(rev);
                }
            }
        });
        observed.push(seen);
    }

    let mut replicas = Replicas::start(3, &endpoints);

    // 1. The first leader works, then its process is killed.
    let (first, _, line) = replicas.wait_line("a first leader", |_, l| l.starts_with("leader ")).await;
    let token1 = token_of(&line);
    replicas.wait_line("the first leader's work", |i, l| i == first && l.starts_with("work ")).await;
    let killed_at = Instant::now();
    replicas.children[first].kill().expect("kill -9");
    let (second, elected_at, line) =
        replicas.wait_line("a second leader", |i, l| i != first && l.starts_with("leader ")).await;
    let token2 = token_of(&line);
    let failover = elected_at - killed_at;
    println!("failover after kill -9 of the leader: {failover:?} (lease TTL {TTL_SECS}s)");
    // The lease outlives its last keep-alive (sent every TTL/3) by the TTL,
    // so the dead leader blocks the others for at least 2/3 of the TTL; it
    // is gone within the TTL plus the time to notice and revoke.
    assert!(failover >= Duration::from_millis(TTL_SECS * 2000 / 3), "took over too early: {failover:?}");
    assert!(failover <= Duration::from_secs(TTL_SECS + 3), "took over too late: {failover:?}");
    assert!(token2 > token1);

    // 2. The second leader is paused well past its lease; the third takes
    //    over and works; the second, resumed, is fenced out and steps down.
    replicas.wait_line("the second leader's work", |i, l| i == second && l.starts_with("work ")).await;
    replicas.signal(second, "-STOP");
    let paused_at = Instant::now();
    let third = 3 - first - second;
    let (_, elected_at, line) =
        replicas.wait_line("a third leader", |i, l| i == third && l.starts_with("leader ")).await;
    let token3 = token_of(&line);
    println!("failover after pausing the leader: {:?}", elected_at - paused_at);
    assert!(token3 > token2);
    replicas.wait_line("the third leader's work", |i, l| i == third && l.starts_with("work ")).await;
    replicas.signal(second, "-CONT");
    let (_, _, line) = replicas
        .wait_line("the paused leader to step down", |i, l| i == second && l.starts_with("stepped-down "))
        .await;
    assert_eq!(token_of(&line), token2, "{line}");
    println!("the paused leader, resumed: {line}");
    // The third leader keeps working after the second woke up.
    let before = replicas.count(third, "work ");
    let deadline = Instant::now() + WAIT;
    while replicas.count(third, "work ") < before + 3 {
        assert!(Instant::now() < deadline, "the third leader stopped working");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // 3. Ctrl-C on the third leader: it resigns and revokes its lease before
    //    it exits, so its key is gone when it has exited, and the second
    //    replica (campaigning again) takes over.
    replicas.signal(third, "-INT");
    let status = replicas.children[third].wait().expect("wait for the third leader");
    assert!(status.success(), "exit after SIGINT: {status:?}");
    replicas
        .wait_line("the third leader to resign", |i, l| {
            i == third && l == format!("stepped-down token={token3} reason=shutdown")
        })
        .await;
    replicas.wait_line("the third leader to exit", |i, l| i == third && l == "exiting").await;
    let candidates = c
        .client(0)
        .range(kvd::proto::etcdserverpb::RangeRequest {
            key: format!("{ELECTION}/").into_bytes(),
            range_end: format!("{ELECTION}0").into_bytes(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(
        candidates.kvs.iter().all(|kv| kv.create_revision != token3),
        "the resigned leader's key stayed: {candidates:?}"
    );
    let (_, _, line) = replicas
        .wait_line("the second replica to lead again", |i, l| {
            i == second && l.starts_with("leader ") && token_of(l) > token3
        })
        .await;
    let token4 = token_of(&line);
    drop(replicas);

    // Fencing: in the work key's history, tokens never go back. A write by
    // an older leader after a newer one's would be two leaders at once.
    let client = c.client_all();
    let mut history = client
        .watch(WatchCreateRequest { key: WORK_KEY.into(), start_revision: 1, ..Default::default() })
        .await
        .expect("watch history");
    assert!(history.next().await.unwrap().unwrap().created);
    let last_rev = client.range(support::get(WORK_KEY)).await.unwrap().kvs[0].mod_revision;
    let mut writes: Vec<(i64, i64)> = Vec::new();
    while writes.last().map(|w| w.0) != Some(last_rev) {
        let resp = tokio::time::timeout(WAIT, history.next()).await.expect("history").unwrap().unwrap();
        for e in resp.events {
            assert_eq!(e.r#type, EventType::Put as i32);
            let kv = e.kv.unwrap();
            writes.push((kv.mod_revision, token_of(&String::from_utf8_lossy(&kv.value))));
        }
    }
    let tokens: Vec<i64> = writes.iter().map(|w| w.1).collect();
    assert!(tokens.windows(2).all(|w| w[0] <= w[1]), "a stale leader wrote after a newer one: {writes:?}");
    for t in [token1, token2, token3] {
        assert!(tokens.contains(&t), "leader with token {t} has no fenced write in {tokens:?}");
    }
    assert!(token4 > token3);
    println!("{} fenced writes by 3 successive leaders, tokens {token1} < {token2} < {token3}", writes.len());

    // Every observer saw the three leaders, in order, with no other between.
    for (m, seen) in observed.iter().enumerate() {
        let seen = seen.lock().unwrap().clone();
        assert!(seen.len() >= 3 && seen[..3] == [token1, token2, token3], "observer on member {m} saw {seen:?}");
    }
    c.shutdown().await;
}
