//! Process-level tests: the real `kvd` and `kvctl` binaries, started,
//! inspected and stopped through `cluster-scripts/`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kvd_testkit::free_ports;

struct Cluster {
    dir: tempfile::TempDir,
    client_ports: Vec<u16>,
    peer_ports: Vec<u16>,
}

impl Cluster {
    fn new() -> Cluster {
        Self::with_members(3)
    }

    /// Ports for `n` members: three that start.sh starts, and more for
    /// add-member.sh.
    fn with_members(n: usize) -> Cluster {
        let ports = free_ports(2 * n);
        Cluster {
            dir: tempfile::tempdir().unwrap(),
            client_ports: ports[..n].to_vec(),
            peer_ports: ports[n..].to_vec(),
        }
    }

    fn bin_dir() -> PathBuf {
        Path::new(env!("CARGO_BIN_EXE_kvd")).parent().unwrap().to_path_buf()
    }

    fn script(&self, name: &str) -> Output {
        self.script_with(name, &[])
    }

    fn script_with(&self, name: &str, env: &[(&str, &str)]) -> Output {
        self.script_args(name, env, &[])
    }

    fn script_args(&self, name: &str, env: &[(&str, &str)], args: &[&str]) -> Output {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        Command::new("bash")
            .envs(env.iter().copied())
            .arg(root.join("cluster-scripts").join(name))
            .args(args)
            .env("KVD_CLUSTER_DIR", self.dir.path())
            .env("KVD_CLIENT_PORTS", self.client_ports.iter().map(u16::to_string).collect::<Vec<_>>().join(" "))
            .env("KVD_PEER_PORTS", self.peer_ports.iter().map(u16::to_string).collect::<Vec<_>>().join(" "))
            .env("KVD_BIN_DIR", Self::bin_dir())
            .env("KVD_EXTRA_FLAGS", "--heartbeat-interval 50 --election-timeout 500")
            .output()
            .expect("run script")
    }

    fn endpoints(&self) -> String {
        self.client_ports.iter().map(|p| format!("127.0.0.1:{p}")).collect::<Vec<_>>().join(",")
    }

    fn kvctl(&self, endpoints: &str, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_kvctl"))
            .arg("--endpoints")
            .arg(endpoints)
            .args(args)
            .output()
            .expect("run kvctl")
    }

    fn pid(&self, member: &str) -> i32 {
        std::fs::read_to_string(self.dir.path().join(format!("{member}.pid"))).unwrap().trim().parse().unwrap()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.script("stop.sh");
    }
}

/// Waits until nothing listens on `port` any more.
fn wait_until_refused(port: u16) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
        assert!(std::time::Instant::now() < deadline, "port {port} still takes connections");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn cluster_scripts_and_kvctl_survive_a_kill_and_a_full_restart() {
    let c = Cluster::new();
    let up = c.script("start.sh");
    assert!(up.status.success(), "start.sh: {}", text(&up));
    assert!(text(&up).contains("kvd cluster is up"));
    // A start is no cause for warnings. One kind depends on the machine,
    // not on kvd: on a loaded machine the first AppendEntries to a member
    // still starting may take longer than a heartbeat interval, and the
    // member reports that peer as unreachable (openraft tries again).
    let slow_peer = |line: &str| line.contains("kvd::raft::network: peer unreachable") && line.contains("timed out:");
    for n in ["n1", "n2", "n3"] {
        let log = std::fs::read_to_string(c.dir.path().join(format!("{n}.log"))).unwrap();
        let warned = log.lines().filter(|l| l.contains(" WARN ") || l.contains(" ERROR ")).any(|l| !slow_peer(l));
        assert!(!warned, "{n}: {log}");
    }

    // Run again, it starts nobody: every member is running.
    let again = c.script("start.sh");
    assert!(again.status.success(), "{}", text(&again));
    assert_eq!(text(&again).matches("is running already").count(), 3, "{}", text(&again));
    assert!(!text(&again).contains("started n"), "{}", text(&again));

    let eps = c.endpoints();
    let first = format!("127.0.0.1:{}", c.client_ports[0]);
    let third = format!("127.0.0.1:{}", c.client_ports[2]);
    let put = c.kvctl(&first, &["put", "greeting", "hello"]);
    assert!(put.status.success(), "{}", text(&put));
    assert_eq!(String::from_utf8_lossy(&put.stdout), "OK\n");
    let get = c.kvctl(&third, &["get", "greeting"]);
    assert_eq!(String::from_utf8_lossy(&get.stdout), "greeting\nhello\n");

    let status = c.script("status.sh");
    assert!(status.status.success(), "{}", text(&status));
    assert_eq!(text(&status).matches("running (pid").count(), 3, "{}", text(&status));

    // kill -9 the leader: the others elect a new one, kvctl fails over.
    let status = c.kvctl(&eps, &["endpoint", "status", "-w", "json"]);
    let rows: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status json");
    let leader_at = rows
        .as_array()
        .unwrap()
        .iter()
        .position(|r| r["Status"]["leader"] == r["Status"]["header"]["member_id"])
        .expect("one member is the leader");
    let victim = c.pid(&format!("n{}", leader_at + 1));
    assert!(Command::new("kill").args(["-9", &victim.to_string()]).status().unwrap().success());
    // kill(2) returns before the process is gone; until then its socket
    // still takes connections and drops them, and a write sent into that
    // has an unknown outcome, which kvctl reports rather than repeats. The
    // failover under test starts once the member has stopped listening.
    wait_until_refused(c.client_ports[leader_at]);
    for i in 0..20 {
        let out = c.kvctl(&eps, &["put", &format!("after-kill-{i}"), "v"]);
        assert!(out.status.success(), "write {i} after the kill: {}", text(&out));
    }
    let count = c.kvctl(&eps, &["get", "after-kill-", "--prefix", "--count-only"]);
    assert_eq!(String::from_utf8_lossy(&count.stdout).trim(), "20", "{}", text(&count));
    // The member down is reported once by each of the others that called
    // it (the new leader at least), not on every try to reach it (openraft
    // logs four lines per try, ten tries a second).
    let mut reports = 0;
    for (i, n) in ["n1", "n2", "n3"].iter().enumerate().filter(|(i, _)| *i != leader_at) {
        let log = std::fs::read_to_string(c.dir.path().join(format!("{n}.log"))).unwrap();
        let about: Vec<&str> = log
            .lines()
            .filter(|l| ["Unreachable node", "backoff", "peer unreachable", "timed out"].iter().any(|w| l.contains(w)))
            .collect();
        assert!(about.len() <= 2, "member {i}: {about:#?}");
        assert!(about.iter().all(|l| l.contains("kvd::raft::network: peer unreachable")), "member {i}: {about:#?}");
        reports += about.len();
    }
    assert!(reports >= 1, "no member reported the one killed");

    // start.sh starts the killed member alone; it catches up on its data.
    let name = format!("n{}", leader_at + 1);
    let restart = c.script("start.sh");
    assert!(restart.status.success(), "{}", text(&restart));
    assert!(text(&restart).contains(&format!("started {name}\n")), "{}", text(&restart));
    assert_eq!(text(&restart).matches("is running already").count(), 2, "{}", text(&restart));
    let back = format!("127.0.0.1:{}", c.client_ports[leader_at]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let local = c.kvctl(&back, &["get", "after-kill-", "--prefix", "--count-only", "--consistency", "s"]);
        if String::from_utf8_lossy(&local.stdout).trim() == "20" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{name} did not catch up: {}", text(&local));
        std::thread::sleep(std::time::Duration::from_millis(50));
    }

    // Errors go to stderr with a non-zero exit code, and name the endpoint
    // and the cause when a connection fails.
    let refused = format!("127.0.0.1:{}", free_ports(1)[0]);
    let out = c.kvctl(&refused, &["get", "x"]);
    assert_eq!(String::from_utf8_lossy(&out.stderr), format!("Error: {refused}: connection refused\n"));
    let other = format!("127.0.0.1:{}", free_ports(1)[0]);
    let out = c.kvctl(&format!("{refused},{other}"), &["put", "x", "1"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!("Error: every endpoint failed: {refused}: connection refused; {other}: connection refused\n")
    );
    let peer = format!("127.0.0.1:{}", c.peer_ports[0]);
    let out = c.kvctl(&peer, &["put", "x", "1"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("Error: {peer}: this is a kvd peer port")),
        "{}",
        text(&out)
    );
    let out = c.kvctl("nohost.invalid:2379", &["get", "x"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).starts_with("Error: nohost.invalid:2379: cannot resolve host"),
        "{}",
        text(&out)
    );
    let out = c.kvctl(&format!("https://{first}"), &["get", "x"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("the server may not serve TLS"), "{}", text(&out));
    // Errors go to stderr with a non-zero exit code.
    let bad = c.kvctl(&eps, &["get", "x", "--rev", "100000"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("required revision is a future revision"), "{}", text(&bad));

    // Stop everything and start again: every key is still there.
    let down = c.script("stop.sh");
    assert!(down.status.success(), "{}", text(&down));
    let up = c.script("start.sh");
    assert!(up.status.success(), "restart: {}", text(&up));
    let all = c.kvctl(&eps, &["get", "", "--from-key", "--count-only"]);
    assert_eq!(String::from_utf8_lossy(&all.stdout).trim(), "21", "{}", text(&all));
    let members = c.kvctl(&eps, &["member", "list"]);
    assert_eq!(String::from_utf8_lossy(&members.stdout).lines().count(), 3, "{}", text(&members));
    let health = c.kvctl(&eps, &["endpoint", "health"]);
    assert!(health.status.success(), "{}", text(&health));
    // Restarts with the flags of the first start (`--initial-cluster-state
    // new`, as start.sh gives them) are no cause for openraft to log an
    // error on each.
    for n in ["n1", "n2", "n3"] {
        let log = std::fs::read_to_string(c.dir.path().join(format!("{n}.log"))).unwrap();
        let errors: Vec<&str> = log.lines().filter(|l| l.contains("Can not initialize")).collect();
        assert!(errors.is_empty(), "{n}: {errors:#?}");
    }
}

#[test]
fn a_member_whose_value_file_was_cut_refuses_to_start_and_says_why() {
    let c = Cluster::new();
    let up = c.script("start.sh");
    assert!(up.status.success(), "start.sh: {}", text(&up));
    let third = format!("127.0.0.1:{}", c.client_ports[2]);
    // A value of 1 KiB is kept in the value file, not in sled's pages.
    let big = "v".repeat(1024);
    let put = c.kvctl(&c.endpoints(), &["put", "big", &big]);
    assert!(put.status.success(), "{}", text(&put));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while String::from_utf8_lossy(&c.kvctl(&third, &["get", "big", "--consistency", "s"]).stdout).lines().count() != 2 {
        assert!(std::time::Instant::now() < deadline, "n3 did not apply the put");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // n3 stops as an operator stops it, and its value file loses its end.
    let pid = c.pid("n3");
    assert!(Command::new("kill").arg(pid.to_string()).status().unwrap().success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(std::time::Instant::now() < deadline, "n3 did not stop on SIGTERM");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let values = value_files(&c.dir.path().join("n3.data"));
    let file =
        values.iter().find(|f| std::fs::metadata(f).unwrap().len() >= 1024).expect("a value file with the value");
    let len = std::fs::metadata(file).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(file).unwrap().set_len(len / 2).unwrap();

    // It refuses to start, with one line that names the file and the way
    // back; start.sh reports it.
    let again = c.script("start.sh");
    assert!(!again.status.success(), "{}", text(&again));
    assert!(text(&again).contains("member n3 exited"), "{}", text(&again));
    let log = std::fs::read_to_string(c.dir.path().join("n3.log")).unwrap();
    let line = log.lines().find(|l| l.contains("kvd: error: cannot open data dir")).unwrap_or_else(|| panic!("{log}"));
    assert!(line.contains(&format!("value file {}: it holds {} bytes", file.display(), len / 2)), "{line}");
    assert!(line.contains("Remove this member, clear its data directory and add it again"), "{line}");
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn a_snapshot_save_cut_off_midway_names_the_member_and_leaves_no_file() {
    let c = Cluster::new();
    let up = c.script("start.sh");
    assert!(up.status.success(), "start.sh: {}", text(&up));
    // About 40 MB of values, so that the stream lasts long enough to cut.
    let fill = c.kvctl(
        &c.endpoints(),
        &["bench", "put", "--conns", "4", "--clients", "16", "--total", "400", "--val-size", "100000", "--quiet"],
    );
    assert!(fill.status.success(), "{}", text(&fill));
    let third = format!("127.0.0.1:{}", c.client_ports[2]);
    let file = c.dir.path().join("cut.snap");
    let part = c.dir.path().join("cut.snap.part");
    let save = Command::new(env!("CARGO_BIN_EXE_kvctl"))
        .args(["--endpoints", &third, "--command-timeout", "120s", "snapshot", "save"])
        .arg(&file)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run kvctl");
    // Once a first MiB is in, the member that sends it is killed.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::fs::metadata(&part).map_or(0, |m| m.len()) < 1 << 20 {
        assert!(std::time::Instant::now() < deadline, "no snapshot data arrived");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert!(Command::new("kill").args(["-9", &c.pid("n3").to_string()]).status().unwrap().success());
    let out = save.wait_with_output().expect("kvctl ends");
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with(&format!("Error: the snapshot stream from {third} broke after ")), "{err}");
    assert!(err.trim_end().ends_with(&format!("{} was not written", file.display())), "{err}");
    assert!(!file.exists() && !part.exists(), "a file is left behind");
}

/// The value files under a member's data directory.
fn value_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(value_files(&path));
        } else if path.file_name().is_some_and(|n| n.to_string_lossy().starts_with("values-")) {
            out.push(path);
        }
    }
    out
}

#[test]
fn kvd_rejects_bad_flags_and_a_locked_data_dir_with_one_line() {
    let bad = Command::new(env!("CARGO_BIN_EXE_kvd")).args(["--listen-peer-urls", "nonsense"]).output().unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("kvd: error: invalid URL \"nonsense\" in --listen-peer-urls"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let none = Command::new(env!("CARGO_BIN_EXE_kvd")).args(["--worker-threads", "0"]).output().unwrap();
    assert_eq!(none.status.code(), Some(1));
    let err = String::from_utf8_lossy(&none.stderr);
    assert_eq!(err.trim(), "kvd: error: --worker-threads must be at least 1");
    // A flag kvd does not know, or a value that does not parse: one line too.
    for args in [&["--bogus"][..], &["--heartbeat-interval", "soon"][..]] {
        let out = Command::new(env!("CARGO_BIN_EXE_kvd")).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("kvd: error: ") && err.contains(args[0]), "{args:?}: {err}");
    }
    let help = Command::new(env!("CARGO_BIN_EXE_kvd")).arg("--help").output().unwrap();
    assert!(help.status.success() && String::from_utf8_lossy(&help.stdout).contains("--initial-cluster"));

    let c = Cluster::new();
    let up = c.script("start.sh");
    assert!(up.status.success(), "{}", text(&up));
    // A second member on a data dir that is in use refuses to start.
    let ports = free_ports(2);
    let dir = c.dir.path().join("n1.data");
    let out = Command::new(env!("CARGO_BIN_EXE_kvd"))
        .args(["--name", "n1", "--data-dir"])
        .arg(&dir)
        .args(["--listen-client-urls", &format!("http://127.0.0.1:{}", ports[0])])
        .args(["--listen-peer-urls", &format!("http://127.0.0.1:{}", ports[1])])
        .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{}", c.peer_ports[0])])
        .args(["--initial-cluster", &format!("n1=http://127.0.0.1:{}", c.peer_ports[0])])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("kvd: error: cannot open data dir"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    // A member that the cluster does not list, started with `existing`, and
    // one started with `existing` where no member answers: one line each.
    let ports = free_ports(2);
    let own_peer = format!("http://127.0.0.1:{}", ports[1]);
    for (first, want) in [
        (format!("http://127.0.0.1:{}", c.peer_ports[0]), "is not a member of the existing cluster"),
        (format!("http://127.0.0.1:{}", free_ports(1)[0]), "no member of --initial-cluster answered"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_kvd"))
            .args(["--name", "n4", "--data-dir"])
            .arg(c.dir.path().join("n4.data"))
            .args(["--listen-client-urls", &format!("http://127.0.0.1:{}", ports[0])])
            .args(["--listen-peer-urls", &own_peer, "--initial-advertise-peer-urls", &own_peer])
            .args(["--initial-cluster", &format!("n1={first},n4={own_peer}")])
            .args(["--initial-cluster-state", "existing"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.trim().lines().last().unwrap_or_default();
        assert!(last.starts_with("kvd: error: ") && last.contains(want), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn kvctl_prints_completion_scripts_that_complete_kvctl_and_kvd() {
    let kvctl = env!("CARGO_BIN_EXE_kvctl");
    // bash: load each script and ask it to complete a partial word.
    let script = format!(
        "source <('{kvctl}' completion bash) && COMP_WORDS=(kvctl pu) && COMP_CWORD=1 && _kvctl kvctl pu kvctl && \
         echo \"${{COMPREPLY[@]}}\" && source <('{kvctl}' completion bash kvd) && COMP_WORDS=(kvd --data-d) && \
         COMP_CWORD=1 && _kvd kvd --data-d kvd && echo \"${{COMPREPLY[@]}}\""
    );
    let out = Command::new("bash").arg("-c").arg(&script).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "put\n--data-dir\n");
    for (shell, marker) in [("zsh", "#compdef kvctl"), ("fish", "complete -c kvctl")] {
        let out = Command::new(kvctl).args(["completion", shell]).output().unwrap();
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains(marker),
            "{shell}: {}",
            text(&out)
        );
    }
    let out = Command::new(kvctl).args(["completion", "tcsh"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

/// `KVD_TLS=1 start.sh`: a throwaway CA, and three members with TLS for
/// clients and between members; kvctl and etcdctl reach them with the flags
/// start.sh prints, and not without.
#[test]
fn start_sh_with_tls_serves_clients_and_members_over_tls() {
    let c = Cluster::new();
    let up = c.script_with("start.sh", &[("KVD_TLS", "1")]);
    assert!(up.status.success(), "start.sh: {}", text(&up));
    assert!(text(&up).contains("TLS:       clients and members"), "{}", text(&up));
    let tls = c.dir.path().join("tls");
    let flags: Vec<String> = ["--cacert", "ca.pem", "--cert", "client.pem", "--key", "client-key.pem"]
        .chunks(2)
        .flat_map(|f| [f[0].to_string(), tls.join(f[1]).display().to_string()])
        .collect();
    let with_tls =
        |args: &[&str]| -> Vec<String> { flags.iter().cloned().chain(args.iter().map(|a| a.to_string())).collect() };
    let eps = c.endpoints();
    let run = |args: Vec<String>| c.kvctl(&eps, &args.iter().map(String::as_str).collect::<Vec<_>>());
    let put = run(with_tls(&["put", "greeting", "hello"]));
    assert!(put.status.success(), "{}", text(&put));
    let health = run(with_tls(&["endpoint", "health"]));
    assert!(health.status.success(), "{}", text(&health));
    let members = run(with_tls(&["member", "list"]));
    assert_eq!(text(&members).matches(", started, n").count(), 3, "{}", text(&members));
    assert_eq!(text(&members).matches("https://127.0.0.1:").count(), 6, "{}", text(&members));
    let etcdctl = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &eps])
        .args(&flags)
        .args(["get", "greeting", "--print-value-only"])
        .output()
        .expect("etcdctl is installed");
    assert_eq!(String::from_utf8_lossy(&etcdctl.stdout), "hello\n", "{}", text(&etcdctl));
    let plain = c.kvctl(&eps, &["get", "greeting"]);
    assert!(!plain.status.success(), "plain text was served: {}", text(&plain));
    // kvctl bench takes the same flags.
    let bench = run(with_tls(&["-w", "json", "bench", "put", "--total", "200", "--clients", "4", "--quiet"]));
    assert!(bench.status.success(), "{}", text(&bench));
    let report: serde_json::Value = serde_json::from_slice(&bench.stdout).expect("bench prints JSON");
    assert_eq!(report["requests"], 200, "{}", text(&bench));
    assert_eq!(report["errors"], 0, "{}", text(&bench));
    let bench = c.kvctl(&eps, &["bench", "put", "--total", "10", "--quiet"]);
    assert!(!bench.status.success() && text(&bench).contains("cannot reach"), "{}", text(&bench));
    // A restart keeps TLS on without being asked again.
    let down = c.script("stop.sh");
    assert!(down.status.success(), "{}", text(&down));
    let again = c.script("start.sh");
    assert!(again.status.success() && text(&again).contains("TLS:"), "{}", text(&again));
    let get = run(with_tls(&["get", "greeting", "--print-value-only"]));
    assert_eq!(String::from_utf8_lossy(&get.stdout), "hello\n", "{}", text(&get));
}

/// The runbook with the scripts: grow from three members to four with
/// add-member.sh, replace a member that was killed with replace-member.sh
/// (new id, same name and URLs), then stop and start them all: every key is
/// still there and all four members vote.
#[test]
fn add_member_and_replace_member_scripts() {
    let c = Cluster::with_members(4);
    let up = c.script("start.sh");
    assert!(up.status.success(), "start.sh: {}", text(&up));
    let eps = c.endpoints();
    for i in 0..100 {
        let put = c.kvctl(&eps, &["put", &format!("k{i:03}"), "v"]);
        assert!(put.status.success(), "{}", text(&put));
    }
    let added = c.script_args("add-member.sh", &[], &["n4"]);
    let added_text = text(&added);
    assert!(added.status.success(), "add-member.sh: {added_text}");
    assert!(added_text.contains("added to cluster") && added_text.contains("promoted in cluster"), "{added_text}");
    let n4 = format!("127.0.0.1:{}", c.client_ports[3]);
    let count = |endpoint: &str| {
        let out = c.kvctl(endpoint, &["get", "k", "--prefix", "--count-only", "-w", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v["count"].as_i64().unwrap_or(-1)
    };
    assert_eq!(count(&n4), 100, "n4 has every key");

    let old = c.kvctl(&eps, &["member", "list"]);
    let old_n2 = text(&old).lines().find(|l| l.contains(", n2,")).map(|l| l.split(',').next().unwrap().to_string());
    let replaced = c.script_args("replace-member.sh", &[], &["n2"]);
    assert!(replaced.status.success(), "replace-member.sh: {}", text(&replaced));
    let list = c.kvctl(&eps, &["member", "list"]);
    let list = text(&list);
    let new_n2 = list.lines().find(|l| l.contains(", n2,")).map(|l| l.split(',').next().unwrap().to_string());
    assert!(new_n2.is_some() && new_n2 != old_n2, "n2 has a new id: {list}");
    assert_eq!(list.lines().filter(|l| l.ends_with(", false")).count(), 4, "four voters: {list}");
    assert_eq!(count(&format!("127.0.0.1:{}", c.client_ports[1])), 100, "the new n2 has every key");

    let down = c.script("stop.sh");
    assert!(text(&down).contains("stopped 4 member(s)"), "{}", text(&down));
    let again = c.script("start.sh");
    assert!(again.status.success() && text(&again).contains("started n1 n2 n3 n4"), "{}", text(&again));
    assert_eq!(count(&n4), 100);
}
