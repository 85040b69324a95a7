//! Test support: in-process kvd clusters on ephemeral ports and temporary
//! directories, with restart on the same directory and port, a partition
//! switch, and waits on Raft metrics instead of sleeps; and clusters of real
//! `kvd` processes ([`processes`]). Both implement `kvd_testkit::Cluster`, so
//! the scenarios of `kvd_testkit::scenarios` run on either.

#![allow(dead_code)]

pub mod processes;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use kvd::client::Client;
use kvd::config::Config;
use kvd::server::{start_on, ServerHandle};
use tokio::net::{TcpListener, TcpSocket};

/// GET `path` from `addr` over HTTP/1.1: the status and the body (a
/// chunked body with its chunk sizes left out).
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    conn.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut raw))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer within 10 s"))??;
    let raw = String::from_utf8(raw).map_err(std::io::Error::other)?;
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status line in {raw:?}")))?;
    // The body may come chunked: keep the lines that are not chunk sizes.
    let body = raw.split("\r\n\r\n").nth(1).unwrap_or_default();
    let body = body.lines().filter(|l| u64::from_str_radix(l.trim(), 16).is_err()).collect::<Vec<_>>().join("\n");
    Ok((status, body.trim().to_string()))
}

/// The value of the gauge or counter `name` in Prometheus text `metrics`.
pub fn metric_value(metrics: &str, name: &str) -> Option<f64> {
    let line = metrics.lines().find(|l| l.split_whitespace().next() == Some(name))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// How long tests wait for a condition before failing.
pub const WAIT: Duration = Duration::from_secs(30);

/// Binds a listener on `addr`, allowing reuse of a port that was just closed.
/// A member's port is free while it is stopped, and an outgoing connection
/// (the others' retries to reach it) may take it as its own local port for a
/// moment: binding a given port again is retried for a while.
pub fn listen(addr: SocketAddr) -> TcpListener {
    hold(addr).listen(1024).expect("listen")
}

/// A socket bound to `addr` and not listening, which keeps the port from
/// being taken (see `TestCluster::stop`). Binding a given port that is in
/// use is retried for up to 10 s.
fn hold(addr: SocketAddr) -> TcpSocket {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let socket = TcpSocket::new_v4().expect("socket");
        socket.set_reuseaddr(true).expect("reuseaddr");
        match socket.bind(addr) {
            Ok(()) => return socket,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && addr.port() != 0 => {
                assert!(std::time::Instant::now() < deadline, "bind {addr}: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("bind {addr}: {e}"),
        }
    }
}

/// The flags of in-process member `i` (named `m{i}`), with its data under
/// `dir`: plain-text URLs, and Raft timings short enough for tests.
fn member_args(i: usize, dir: &std::path::Path, client: SocketAddr, peer: SocketAddr, initial: &str) -> Vec<String> {
    let data = dir.join("data").display().to_string();
    let (client, peer) = (format!("http://{client}"), format!("http://{peer}"));
    ["kvd", "--name", &format!("m{i}"), "--data-dir", &data, "--listen-client-urls", &client]
        .into_iter()
        .chain(["--advertise-client-urls", &client, "--listen-peer-urls", &peer])
        .chain(["--initial-advertise-peer-urls", &peer, "--initial-cluster", initial])
        .chain(["--heartbeat-interval", "50", "--election-timeout", "500"])
        .map(String::from)
        .collect()
}

/// A cluster of in-process members.
pub struct TestCluster {
    pub members: Vec<Option<ServerHandle>>,
    pub configs: Vec<Config>,
    pub client_addrs: Vec<SocketAddr>,
    pub peer_addrs: Vec<SocketAddr>,
    /// The ports of stopped members, bound but not listening: a connection
    /// to them is refused as to a stopped member's, and neither a new
    /// member's port nor an outgoing connection can take them meanwhile.
    held: std::collections::HashMap<usize, [TcpSocket; 2]>,
    /// The id `member add` gave the member added last.
    pub member_id_added: Option<u64>,
    _dirs: Vec<tempfile::TempDir>,
}

impl TestCluster {
    /// Starts `n` members; `tune` adjusts every member's flags.
    pub async fn start(n: usize, tune: impl Fn(&mut Vec<String>)) -> TestCluster {
        Self::start_prepared(n, tune, |_, _| {}).await
    }

    /// Starts `n` members after `prepare` has been given each member's
    /// index and its data directory, which does not exist yet.
    pub async fn start_prepared(
        n: usize,
        tune: impl Fn(&mut Vec<String>),
        prepare: impl Fn(usize, &std::path::Path),
    ) -> TestCluster {
        let mut clients = Vec::new();
        let mut peers = Vec::new();
        for _ in 0..n {
            clients.push(listen("127.0.0.1:0".parse().unwrap()));
            peers.push(listen("127.0.0.1:0".parse().unwrap()));
        }
        let client_addrs: Vec<SocketAddr> = clients.iter().map(|l| l.local_addr().unwrap()).collect();
        let peer_addrs: Vec<SocketAddr> = peers.iter().map(|l| l.local_addr().unwrap()).collect();
        let initial: Vec<String> = peer_addrs.iter().enumerate().map(|(i, a)| format!("m{i}=http://{a}")).collect();
        let mut dirs = Vec::new();
        let mut configs = Vec::new();
        for i in 0..n {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut args = member_args(i, dir.path(), client_addrs[i], peer_addrs[i], &initial.join(","));
            tune(&mut args);
            prepare(i, &dir.path().join("data"));
            configs.push(Config::parse_from(args));
            dirs.push(dir);
        }
        // All at once, as members of a new cluster start: each new member
        // asks the others whether they know it before it takes part.
        let starts = clients.into_iter().zip(peers).enumerate().map(|(i, (c, p))| {
            let v = configs[i].validate().expect("valid config");
            start_on(v, vec![c], p)
        });
        let members =
            futures::future::join_all(starts).await.into_iter().map(|m| Some(m.expect("member starts"))).collect();
        let cluster = TestCluster {
            members,
            configs,
            client_addrs,
            peer_addrs,
            held: Default::default(),
            member_id_added: None,
            _dirs: dirs,
        };
        cluster.wait_leader().await;
        cluster.wait_started().await;
        cluster
    }

    /// Waits until every member has published its name (etcd's "started"):
    /// membership changes count only started members.
    pub async fn wait_started(&self) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let leader = self.wait_leader().await;
            let list = self.member(leader).member.state.read().attrs.len();
            if list >= self.running().len() {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "members did not publish their names within {WAIT:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The running member `i`.
    pub fn member(&self, i: usize) -> &ServerHandle {
        self.members[i].as_ref().expect("member is running")
    }

    /// Indexes of running members.
    pub fn running(&self) -> Vec<usize> {
        (0..self.members.len()).filter(|i| self.members[*i].is_some()).collect()
    }

    /// Waits until every running member knows the same leader, and returns
    /// the leader's index.
    pub async fn wait_leader(&self) -> usize {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let leaders: Vec<Option<u64>> = self.running().iter().map(|i| self.member(*i).member.leader()).collect();
            if let Some(Some(l)) = leaders.first() {
                if leaders.iter().all(|x| *x == Some(*l)) {
                    if let Some(i) = self.running().into_iter().find(|i| self.member(*i).member.id == *l) {
                        return i;
                    }
                }
            }
            assert!(tokio::time::Instant::now() < deadline, "no agreed leader within {WAIT:?}: {leaders:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until member `i` has applied at least `index`.
    pub async fn wait_applied(&self, i: usize, index: u64) {
        self.member(i)
            .member
            .raft
            .wait(Some(WAIT))
            .applied_index_at_least(Some(index), "catch up")
            .await
            .expect("member catches up");
    }

    /// The leader's last applied log index.
    pub fn applied(&self, i: usize) -> u64 {
        self.member(i).member.raft.metrics().borrow().last_applied.map(|l| l.index).unwrap_or(0)
    }

    /// A client of member `i` alone.
    pub fn client(&self, i: usize) -> Client {
        Client::new(&[format!("http://{}", self.client_addrs[i])], Duration::from_secs(2)).expect("client")
    }

    /// A client of every member.
    pub fn client_all(&self) -> Client {
        let eps: Vec<String> = self.client_addrs.iter().map(|a| format!("http://{a}")).collect();
        Client::new(&eps, Duration::from_secs(2)).expect("client")
    }

    /// Stops member `i`, and holds its ports until it starts again.
    pub async fn stop(&mut self, i: usize) {
        if let Some(m) = self.members[i].take() {
            m.shutdown().await;
            self.held.insert(i, [hold(self.client_addrs[i]), hold(self.peer_addrs[i])]);
        }
    }

    /// Listeners on stopped member `i`'s own ports, for starting it again.
    pub fn listeners(&mut self, i: usize) -> (TcpListener, TcpListener) {
        assert!(self.members[i].is_none(), "member {i} is running");
        drop(self.held.remove(&i));
        (listen(self.client_addrs[i]), listen(self.peer_addrs[i]))
    }

    /// Starts member `i` again on its directory and ports.
    pub async fn restart(&mut self, i: usize) {
        let (client, peer) = self.listeners(i);
        let v = self.configs[i].validate().expect("valid config");
        let m = start_on(v, vec![client], peer).await.expect("member restarts");
        self.members[i] = Some(m);
    }

    /// Adds a member with `member add` (as a learner or a voter) and starts
    /// it with `--initial-cluster-state existing` and the `--initial-cluster`
    /// the answer gives, as an operator would; returns its index. It does
    /// not wait for the new member to catch up.
    pub async fn add_member(&mut self, learner: bool) -> usize {
        let client = self.client_all();
        self.add_member_as(learner, &client).await
    }

    /// [`TestCluster::add_member`] through `admin` (a client with root's
    /// credentials, while auth is on).
    pub async fn add_member_as(&mut self, learner: bool, admin: &Client) -> usize {
        let i = self.add_member_unstarted(learner, admin).await;
        let new_id = self.member_id_added.take().expect("the member added");
        let (client, peer) = self.listeners(i);
        let m = start_on(self.configs[i].validate().expect("valid config"), vec![client], peer)
            .await
            .expect("new member starts");
        assert_eq!(m.member.id, new_id, "the new member runs under the id member add gave it");
        self.members[i] = Some(m);
        i
    }

    /// Adds a member with `member add` as [`TestCluster::add_member_as`]
    /// does, and does not start it (its ports held): `restart` starts it.
    pub async fn add_member_unstarted(&mut self, learner: bool, admin: &Client) -> usize {
        let i = self.members.len();
        let (client, peer) = (hold("127.0.0.1:0".parse().unwrap()), hold("127.0.0.1:0".parse().unwrap()));
        let (client_addr, peer_addr) = (client.local_addr().unwrap(), peer.local_addr().unwrap());
        self.held.insert(i, [client, peer]);
        let added = admin.member_add(vec![format!("http://{peer_addr}")], learner).await.expect("member add");
        let new_id = added.member.as_ref().expect("the member added").id;
        let initial: Vec<String> = added
            .members
            .iter()
            .map(|m| {
                let name = if m.id == new_id { format!("m{i}") } else { m.name.clone() };
                format!("{name}={}", m.peer_ur_ls[0])
            })
            .collect();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut args = member_args(i, dir.path(), client_addr, peer_addr, &initial.join(","));
        args.extend(["--initial-cluster-state".to_string(), "existing".to_string()]);
        self.members.push(None);
        self.configs.push(Config::parse_from(args));
        self.client_addrs.push(client_addr);
        self.peer_addrs.push(peer_addr);
        self._dirs.push(dir);
        self.member_id_added = Some(new_id);
        i
    }

    /// Stops every member.
    pub async fn shutdown(mut self) {
        for i in 0..self.members.len() {
            self.stop(i).await;
        }
    }
}

impl kvd_testkit::Cluster for TestCluster {
    fn size(&self) -> usize {
        self.members.len()
    }

    fn running(&self) -> Vec<usize> {
        TestCluster::running(self)
    }

    fn client(&self, i: usize) -> Client {
        TestCluster::client(self, i)
    }

    fn client_all(&self) -> Client {
        TestCluster::client_all(self)
    }

    async fn leader(&self) -> usize {
        self.wait_leader().await
    }

    /// The id the member runs with, not one it reports: so that a scenario
    /// checks what the member puts in its headers against the truth.
    async fn member_id(&self, i: usize) -> u64 {
        self.member(i).member.id
    }

    async fn kill(&mut self, i: usize) {
        self.stop(i).await
    }

    async fn restart(&mut self, i: usize) {
        TestCluster::restart(self, i).await
    }
}

/// A Put request.
pub fn put(key: &str, value: &str) -> kvd::proto::etcdserverpb::PutRequest {
    kvd::proto::etcdserverpb::PutRequest { key: key.into(), value: value.into(), ..Default::default() }
}

/// A serializable single-key Range request.
pub fn get_local(key: &str) -> kvd::proto::etcdserverpb::RangeRequest {
    kvd::proto::etcdserverpb::RangeRequest { key: key.into(), serializable: true, ..Default::default() }
}

/// A linearizable single-key Range request.
pub fn get(key: &str) -> kvd::proto::etcdserverpb::RangeRequest {
    kvd::proto::etcdserverpb::RangeRequest { key: key.into(), ..Default::default() }
}

/// A single-member etcd 3.4 (Debian's `etcd-server`) on ephemeral ports in a
/// temporary directory, killed when dropped: the reference implementation.
pub struct Etcd {
    child: Child,
    _dir: tempfile::TempDir,
    /// Its client URL.
    pub client: String,
}

impl Etcd {
    /// Starts it; see [`wait_ready`].
    pub fn start() -> Etcd {
        Self::start_with("http", &[])
    }

    /// Starts it and waits until it answers a read.
    pub async fn start_ready() -> Etcd {
        let etcd = Self::start();
        let client = Client::new(std::slice::from_ref(&etcd.client), Duration::from_secs(2)).expect("client");
        wait_ready(&client).await;
        etcd
    }

    /// Starts it serving clients on a `scheme` (http or https) URL, with
    /// `extra` flags (TLS ones, say).
    pub fn start_with(scheme: &str, extra: &[String]) -> Etcd {
        let ports = kvd_testkit::free_ports(2);
        let dir = tempfile::tempdir().unwrap();
        let client = format!("{scheme}://127.0.0.1:{}", ports[0]);
        let peer = format!("http://127.0.0.1:{}", ports[1]);
        let child = Command::new("etcd")
            .args(["--name", "ref", "--data-dir"])
            .arg(dir.path().join("etcd"))
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("ref={peer}")])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd 3.4 is installed (apt-get install etcd-server; cluster-scripts/test.sh does it)");
        Etcd { child, _dir: dir, client }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `client` answers a read.
pub async fn wait_ready(client: &Client) {
    let deadline = Instant::now() + WAIT;
    while client
        .range(kvd::proto::etcdserverpb::RangeRequest { key: b"ready".to_vec(), ..Default::default() })
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "etcd did not become ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What the members of this test process have logged (at info and above),
/// from the first call on; every test of the binary shares it.
pub fn logs() -> Logs {
    use std::sync::{Arc, Mutex, OnceLock};
    static LOGS: OnceLock<Logs> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Logs(Arc::new(Mutex::new(Vec::new())));
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter("info,openraft=error")
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("the first log subscriber of this test binary");
        logs
    })
    .clone()
}

/// Captured log lines; see [`logs`].
#[derive(Clone)]
pub struct Logs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Logs {
    /// The lines that contain every one of `parts`.
    pub fn lines_with(&self, parts: &[&str]) -> Vec<String> {
        let text = self.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        String::from_utf8_lossy(&text)
            .lines()
            .filter(|l| parts.iter().all(|p| l.contains(p)))
            .map(String::from)
            .collect()
    }

    /// Waits until a line contains every one of `parts`, and returns it.
    pub async fn wait_for(&self, parts: &[&str]) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(line) = self.lines_with(parts).into_iter().next() {
                return line;
            }
            assert!(Instant::now() < deadline, "no log line with {parts:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
