//! A three-member kvd cluster of real processes, and the proxy on its peer
//! links that the harness cuts.
//!
//! Member `i` (of three, and a fourth place the cluster grows into) listens
//! for peers on its own loopback address `127.0.0.(11+i)`
//! and kvd makes its outgoing peer connections from that address. The peer
//! URL the members know each other by is a proxy port of the harness, one per
//! member, which forwards to the member's real peer port. A proxy sees which
//! member a connection comes from by its source address, so it can refuse and
//! cut the links the harness names: `(from, to)` pairs, one direction each.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvd::client::Client;
use kvd::proto::etcdserverpb::alarm_request::AlarmAction;
use kvd::proto::etcdserverpb::{AlarmMember, AlarmRequest, AlarmType};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The members' client addresses, and the TLS that clients reach them with
/// (in a run with `--tls`).
#[derive(Clone)]
pub struct Endpoints {
    pub addrs: Vec<String>,
    pub tls: Option<kvd::client::ClientTls>,
}

impl Endpoints {
    /// Member `m`'s address alone.
    pub fn only(&self, m: usize) -> Endpoints {
        Endpoints { addrs: self.addrs[m..=m].to_vec(), tls: self.tls.clone() }
    }

    /// A client of all of them, in this order, with `timeout` to connect.
    pub fn client(&self, timeout: Duration) -> Client {
        Client::with_tls(&self.addrs, timeout, self.tls.as_ref()).expect("endpoints are valid")
    }
}

/// Members of the cluster.
pub const MEMBERS: usize = 3;

/// Places for members: the three, and a fourth that the add-learner fault
/// grows the cluster into (and shrinks it out of again).
pub const SLOTS: usize = MEMBERS + 1;

/// Links that carry nothing: `(from, to)` means connections that member
/// `from` opens to member `to` are refused, and open ones are cut.
pub type Cuts = Arc<HashSet<(usize, usize)>>;

/// The common name of the members' certificate, which each member requires
/// of the others (`--peer-cert-allowed-cn`).
const MEMBER_CN: &str = "kvd-member";

/// Makes a CA in `dir`, and signed by it a certificate the members serve
/// and present to each other (for every address they are reached at) and
/// one for clients: `ca.pem`, `member.pem`, `member-key.pem`, `client.pem`,
/// `client-key.pem`. Returns `dir`.
fn make_pki(dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "kvd-faults CA");
    std::fs::write(dir.join("ca.pem"), ca.self_signed(&ca_key)?.pem())?;
    let issuer = Issuer::new(ca, ca_key);
    let mut member_names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    member_names.extend((0..SLOTS).map(|i| member_ip(i).to_string()));
    for (name, cn, sans) in [("member", MEMBER_CN, member_names), ("client", "kvd-faults client", Vec::new())] {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(sans)?;
        params.distinguished_name.push(DnType::CommonName, cn);
        std::fs::write(dir.join(format!("{name}.pem")), params.signed_by(&key, &issuer)?.pem())?;
        std::fs::write(dir.join(format!("{name}-key.pem")), key.serialize_pem())?;
    }
    Ok(dir.to_path_buf())
}

/// How clients reach members that serve TLS from the PKI in `dir`.
fn client_tls(dir: &Option<PathBuf>) -> Option<kvd::client::ClientTls> {
    dir.as_ref().map(|d| kvd::client::ClientTls {
        ca: Some(d.join("ca.pem")),
        identity: Some((d.join("client.pem"), d.join("client-key.pem"))),
        skip_verify: false,
    })
}

fn member_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 11 + i as u8))
}

fn free_port(ip: IpAddr) -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind((ip, 0))?.local_addr()?.port())
}

/// Removes everything in `dir`, but not `dir` itself (it may be a mount
/// point).
fn empty_dir(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            std::fs::remove_dir_all(&path)?;
        } else {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

/// What the member processes run with.
pub struct Layout {
    pub kvd: PathBuf,
    pub dir: PathBuf,
    pub client_addrs: Vec<SocketAddr>,
    pub peer_listen: Vec<SocketAddr>,
    pub peer_proxy: Vec<SocketAddr>,
    pub election_ms: u64,
    /// The member whose data directory is a small tmpfs of its own, for the
    /// disk-full fault; `None` when that fault is off or no tmpfs could be
    /// mounted.
    pub small_disk: Option<usize>,
    /// With TLS on both ports: the directory of the harness's CA and
    /// certificates.
    pub tls: Option<PathBuf>,
}

/// The member processes, the proxies and the cuts.
pub struct Cluster {
    pub layout: Layout,
    children: Vec<Option<Child>>,
    paused: Vec<bool>,
    cuts: watch::Sender<Cuts>,
    /// A client of every member.
    pub client: Client,
    /// Members that joined with `member add` (a replacement): they start
    /// with `--initial-cluster-state existing` from then on.
    joined: Vec<bool>,
}

impl Cluster {
    /// Starts the proxies and three members under `dir`.
    pub async fn start(
        kvd: PathBuf,
        dir: PathBuf,
        election_ms: u64,
        small_disk: Option<usize>,
        tls: bool,
    ) -> anyhow::Result<Cluster> {
        let mut client_addrs = Vec::new();
        let mut peer_listen = Vec::new();
        let mut proxies = Vec::new();
        for i in 0..SLOTS {
            let local = IpAddr::V4(Ipv4Addr::LOCALHOST);
            client_addrs.push(SocketAddr::new(local, free_port(local)?));
            peer_listen.push(SocketAddr::new(member_ip(i), free_port(member_ip(i))?));
            proxies.push(TcpListener::bind((local, 0)).await?);
        }
        let peer_proxy: Vec<SocketAddr> = proxies.iter().map(|l| l.local_addr()).collect::<Result<_, _>>()?;
        let (cuts, cuts_rx) = watch::channel(Cuts::default());
        for (to, listener) in proxies.into_iter().enumerate() {
            tokio::spawn(proxy(listener, to, peer_listen[to], cuts_rx.clone()));
        }
        let tls = match tls {
            true => Some(make_pki(&dir.join("tls"))?),
            false => None,
        };
        let endpoints =
            Endpoints { addrs: client_addrs[..MEMBERS].iter().map(|a| a.to_string()).collect(), tls: client_tls(&tls) };
        let client = endpoints.client(Duration::from_millis(500));
        let small_disk = match small_disk {
            Some(m) => {
                let mount = dir.join(format!("m{m}"));
                std::fs::create_dir_all(&mount)?;
                let out = Command::new("mount")
                    .args(["-t", "tmpfs", "-o", "size=512m", "tmpfs"])
                    .arg(&mount)
                    .stderr(Stdio::piped())
                    .output();
                match out {
                    Ok(o) if o.status.success() => Some(m),
                    Ok(o) => anyhow::bail!(
                        "disk-full needs a tmpfs (run as root, or leave the fault out): mount: {}",
                        String::from_utf8_lossy(&o.stderr).trim()
                    ),
                    Err(e) => anyhow::bail!("disk-full needs a tmpfs: mount: {e}"),
                }
            }
            None => None,
        };
        let layout = Layout { kvd, dir, client_addrs, peer_listen, peer_proxy, election_ms, small_disk, tls };
        let mut cluster = Cluster {
            layout,
            children: (0..SLOTS).map(|_| None).collect(),
            paused: vec![false; SLOTS],
            cuts,
            client,
            // A member in the spare slot always joins an existing cluster.
            joined: (0..SLOTS).map(|i| i >= MEMBERS).collect(),
        };
        for i in 0..MEMBERS {
            cluster.start_member(i)?;
        }
        Ok(cluster)
    }

    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.layout.dir.join(format!("m{i}"))
    }

    /// Replaces stopped member `i` as an operator replaces a member whose
    /// disk died: removes it (`member remove`), empties its data directory,
    /// adds it again as a learner with the same peer URL (it gets a new id),
    /// starts it with `--initial-cluster-state existing`, and promotes it
    /// once it has caught up. Returns its old and new ids.
    pub async fn replace_member(&mut self, i: usize, old_id: u64, within: Duration) -> anyhow::Result<(u64, u64)> {
        let deadline = Instant::now() + within;
        self.remove(i, old_id, deadline).await?;
        empty_dir(&self.data_dir(i))?;
        let new_id = self.add(i, true, deadline).await?;
        self.joined[i] = true;
        self.start_member(i)?;
        self.promote(i, new_id, deadline).await?;
        Ok((old_id, new_id))
    }

    /// `member remove` of member `i` (`id`), tried again until `deadline`;
    /// a member already gone is fine.
    async fn remove(&self, i: usize, id: u64, deadline: Instant) -> anyhow::Result<()> {
        loop {
            match self.client.member_remove(id).await {
                Ok(_) => return Ok(()),
                Err(e) if e.message() == "etcdserver: member not found" => return Ok(()),
                Err(e) => retry_until(deadline, "member remove", i, &e)?,
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// `member add` of slot `i`'s peer URL, as a learner or a voter, tried
    /// again until `deadline`; returns the new member's id.
    async fn add(&self, i: usize, learner: bool, deadline: Instant) -> anyhow::Result<u64> {
        let scheme = if self.layout.tls.is_some() { "https" } else { "http" };
        let url = format!("{scheme}://{}", self.layout.peer_proxy[i]);
        loop {
            match self.client.member_add(vec![url.clone()], learner).await {
                Ok(added) => return Ok(added.member.map_or(0, |m| m.id)),
                Err(e) => retry_until(deadline, "member add", i, &e)?,
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// `member promote` of member `i` (`id`), tried again until `deadline`
    /// (it is refused until the learner has caught up).
    async fn promote(&self, i: usize, id: u64, deadline: Instant) -> anyhow::Result<()> {
        loop {
            match self.client.member_promote(id).await {
                Ok(_) => return Ok(()),
                Err(e) => retry_until(deadline, "member promote", i, &e)?,
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until member `i`, just removed, has stopped on its own; kills
    /// it and fails at `deadline`.
    async fn await_stop(&mut self, i: usize, deadline: Instant) -> anyhow::Result<()> {
        while !self.exited(i) {
            if Instant::now() >= deadline {
                self.kill(i);
                anyhow::bail!("m{i} did not stop on its own after its removal");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Copies stopped member `i`'s data directory aside; returns the copy.
    pub fn save_data(&self, i: usize) -> anyhow::Result<PathBuf> {
        let saved = self.layout.dir.join(format!("m{i}-saved"));
        let _ = std::fs::remove_dir_all(&saved);
        copy_dir(&self.data_dir(i), &saved)?;
        Ok(saved)
    }

    /// Puts back what [`Cluster::save_data`] copied, and removes the copy.
    /// The data directory is emptied rather than removed: it may be a mount
    /// point.
    pub fn restore_data(&self, i: usize, saved: &Path) -> anyhow::Result<()> {
        let data = self.data_dir(i);
        empty_dir(&data)?;
        copy_dir(saved, &data)?;
        std::fs::remove_dir_all(saved)?;
        Ok(())
    }

    /// The three members' client addresses, with the TLS clients need.
    pub fn endpoints(&self) -> Endpoints {
        Endpoints {
            addrs: self.layout.client_addrs[..MEMBERS].iter().map(|a| a.to_string()).collect(),
            tls: client_tls(&self.layout.tls),
        }
    }

    /// A client of the member in slot `i` alone.
    pub fn client_of(&self, i: usize) -> Client {
        let addrs = vec![self.layout.client_addrs[i].to_string()];
        Endpoints { addrs, tls: client_tls(&self.layout.tls) }.client(Duration::from_millis(500))
    }

    /// Grows the cluster into the spare slot and shrinks it back, as an
    /// operator adds a member: `member add --learner`, start it with
    /// `--initial-cluster-state existing` on an empty data directory,
    /// `member promote` once it has caught up (refused until then), check
    /// that it serves a linearizable read, then `member remove`: the member
    /// must stop on its own. Returns its id and the time from the add to
    /// the promotion.
    pub async fn grow_and_shrink(&mut self, within: Duration) -> anyhow::Result<(u64, Duration)> {
        let i = MEMBERS;
        let deadline = Instant::now() + within;
        empty_dir(&self.data_dir(i)).or_else(|_| std::fs::create_dir_all(self.data_dir(i)))?;
        let started = Instant::now();
        let id = self.add(i, true, deadline).await?;
        self.start_member(i)?;
        self.promote(i, id, deadline).await?;
        let promoted = started.elapsed();
        let own = self.client_of(i);
        loop {
            let read = kvd::proto::etcdserverpb::RangeRequest { key: b"grown".to_vec(), ..Default::default() };
            match own.range(read).await {
                Ok(_) => break,
                Err(e) => retry_until(deadline, "a linearizable read", i, &e)?,
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.remove(i, id, deadline).await?;
        self.await_stop(i, deadline).await?;
        Ok((id, promoted))
    }

    /// Removes running member `i` from the cluster with `member remove`
    /// (it must stop on its own), empties its data directory and adds it
    /// again as a voter (`member add` without `--learner`) under a new id,
    /// started with `--initial-cluster-state existing`. Returns its old and
    /// new ids.
    pub async fn remove_and_readd(&mut self, i: usize, old_id: u64, within: Duration) -> anyhow::Result<(u64, u64)> {
        let deadline = Instant::now() + within;
        self.remove(i, old_id, deadline).await?;
        self.await_stop(i, deadline).await?;
        empty_dir(&self.data_dir(i))?;
        let new_id = self.add(i, false, deadline).await?;
        self.joined[i] = true;
        self.start_member(i)?;
        Ok((old_id, new_id))
    }

    /// The id of the member in slot `i`, as it answers.
    pub async fn member_id(&self, i: usize) -> Result<u64, tonic::Status> {
        self.client.status_of(i).await.map(|s| s.header.map_or(0, |h| h.member_id))
    }

    /// The raised alarms, as the members answer (empty if none answers).
    pub async fn alarms(&self) -> Vec<AlarmMember> {
        let get = AlarmRequest { action: AlarmAction::Get as i32, member_id: 0, alarm: AlarmType::None as i32 };
        self.client.alarm(get).await.map(|r| r.alarms).unwrap_or_default()
    }

    /// Clears every raised alarm, as `alarm disarm` does.
    pub async fn disarm(&self) -> Result<(), tonic::Status> {
        for a in self.alarms().await {
            let clear = AlarmRequest { action: AlarmAction::Deactivate as i32, member_id: a.member_id, alarm: a.alarm };
            self.client.alarm(clear).await?;
        }
        Ok(())
    }

    fn command(&self, i: usize) -> Command {
        let l = &self.layout;
        let scheme = if l.tls.is_some() { "https" } else { "http" };
        // The three, and the member in the spare slot when that is the one.
        let initial: Vec<String> = (0..MEMBERS)
            .chain((i >= MEMBERS).then_some(i))
            .map(|m| format!("m{m}={scheme}://{}", l.peer_proxy[m]))
            .collect();
        let mut cmd = Command::new(&l.kvd);
        cmd.args(["--name", &format!("m{i}")])
            .arg("--data-dir")
            .arg(self.data_dir(i))
            .args(["--listen-client-urls", &format!("{scheme}://{}", l.client_addrs[i])])
            .args(["--advertise-client-urls", &format!("{scheme}://{}", l.client_addrs[i])])
            .args(["--listen-peer-urls", &format!("{scheme}://{}", l.peer_listen[i])])
            .args(["--initial-advertise-peer-urls", &format!("{scheme}://{}", l.peer_proxy[i])])
            .args(["--initial-cluster", &initial.join(",")])
            .args(["--initial-cluster-token", "faults"])
            .args(["--initial-cluster-state", if self.joined[i] { "existing" } else { "new" }])
            .args(["--election-timeout", &l.election_ms.to_string()])
            .args(["--heartbeat-interval", &(l.election_ms / 5).to_string()])
            // Small enough that snapshots and log purges happen in a run.
            .args(["--snapshot-count", "2000"]);
        if let Some(tls) = &l.tls {
            let file = |name: &str| tls.join(name);
            cmd.arg("--cert-file").arg(file("member.pem")).arg("--key-file").arg(file("member-key.pem"));
            cmd.arg("--trusted-ca-file").arg(file("ca.pem")).arg("--client-cert-auth");
            cmd.arg("--peer-cert-file").arg(file("member.pem")).arg("--peer-key-file").arg(file("member-key.pem"));
            cmd.arg("--peer-trusted-ca-file").arg(file("ca.pem")).arg("--peer-client-cert-auth");
            cmd.args(["--peer-cert-allowed-cn", MEMBER_CN]);
        }
        cmd
    }

    /// Starts member `i` (which must not be running).
    pub fn start_member(&mut self, i: usize) -> anyhow::Result<()> {
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.layout.dir.join(format!("m{i}.log")))?;
        let child = self.command(i).stdout(Stdio::null()).stderr(log).spawn()?;
        self.children[i] = Some(child);
        self.paused[i] = false;
        Ok(())
    }

    /// Starts member `i` and expects it to refuse: it must exit non-zero
    /// within `within`; returns the last line it wrote.
    pub async fn start_refused(&mut self, i: usize, within: Duration) -> anyhow::Result<Result<String, String>> {
        let path = self.layout.dir.join(format!("m{i}-refused.log"));
        let log = std::fs::File::create(&path)?;
        let mut child = self.command(i).stdout(Stdio::null()).stderr(log).spawn()?;
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait()? {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                // kvd's refusal, else its last words: a background thread
                // may still log a line after the refusal is printed.
                let refusal = text.lines().rev().find(|l| l.starts_with("kvd: error:"));
                let last = refusal.or(text.lines().last()).unwrap_or("").to_string();
                return Ok(if status.success() { Err(format!("exited 0: {last}")) } else { Ok(last) });
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Ok(Err(format!("still running after {within:?}")));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.children[i].is_some()
    }

    /// Whether member `i` has exited on its own (reaping it if so).
    pub fn exited(&mut self, i: usize) -> bool {
        let gone = match &mut self.children[i] {
            Some(child) => matches!(child.try_wait(), Ok(Some(_))),
            None => false,
        };
        if gone {
            self.children[i] = None;
        }
        gone
    }

    /// SIGKILL to member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.children[i].take() {
            if self.paused[i] {
                signal(&child, libc::SIGCONT);
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        self.paused[i] = false;
    }

    /// SIGSTOP (`pause`) or SIGCONT to member `i`.
    pub fn pause(&mut self, i: usize, pause: bool) {
        if let Some(child) = &self.children[i] {
            signal(child, if pause { libc::SIGSTOP } else { libc::SIGCONT });
            self.paused[i] = pause;
        }
    }

    /// Sets the links that carry nothing (an empty set heals everything).
    pub fn cut(&self, links: HashSet<(usize, usize)>) {
        self.cuts.send_replace(Arc::new(links));
    }

    /// The member every running member names as leader, if they agree and it
    /// is running.
    pub async fn leader(&self) -> Option<usize> {
        let mut seen = None;
        for i in 0..MEMBERS {
            if !self.is_running(i) || self.paused[i] {
                continue;
            }
            // A member that does not answer (it may have exited on its own)
            // is skipped: the others can still have a leader.
            let Ok(Ok(status)) = tokio::time::timeout(Duration::from_millis(500), self.client.status_of(i)).await
            else {
                continue;
            };
            if status.header.as_ref().is_some_and(|h| h.member_id == status.leader) {
                seen = Some(i);
            }
        }
        seen
    }

    /// Time until a member other than `old` says it leads, up to `within`.
    pub async fn new_leader_without(&self, old: usize, within: Duration) -> Option<Duration> {
        let start = Instant::now();
        while start.elapsed() < within {
            for i in (0..MEMBERS).filter(|&i| i != old && self.is_running(i) && !self.paused[i]) {
                let status = tokio::time::timeout(Duration::from_millis(200), self.client.status_of(i)).await;
                if let Ok(Ok(st)) = status {
                    if st.header.as_ref().is_some_and(|h| h.member_id == st.leader) {
                        return Some(start.elapsed());
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// Waits for a leader, up to `within`.
    pub async fn wait_leader(&self, within: Duration) -> Option<usize> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(l) = self.leader().await {
                return Some(l);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops every member.
    pub fn stop_all(&mut self) {
        for i in 0..SLOTS {
            self.kill(i);
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop_all();
        if let Some(m) = self.layout.small_disk {
            let _ = Command::new("umount").arg(self.data_dir(m)).status();
        }
    }
}

/// An error for `what` on member `i` once `deadline` has passed; before,
/// nothing (the caller tries again).
fn retry_until(deadline: Instant, what: &str, i: usize, e: &tonic::Status) -> anyhow::Result<()> {
    anyhow::ensure!(Instant::now() < deadline, "{what} of m{i}: {e:?}");
    Ok(())
}

/// Fills the file system holding `dir` with a file `dir/filler` until only
/// `leave` bytes are free (or a write fails for lack of space); returns the
/// bytes written.
pub fn fill(dir: &Path, leave: u64) -> std::io::Result<u64> {
    use std::io::Write;
    let mut f = std::fs::File::create(dir.join("filler"))?;
    let chunk = vec![0u8; 1 << 20];
    let mut written = 0u64;
    while kvd::node::alarm::free_bytes(dir)? > leave + chunk.len() as u64 {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => return Err(e),
        }
    }
    f.sync_all()?;
    Ok(written)
}

fn signal(child: &Child, sig: libc::c_int) {
    // The pid is our own child's, still unreaped, so it names that process.
    unsafe {
        libc::kill(child.id() as libc::pid_t, sig);
    }
}

/// Which member a peer connection comes from, by its source address.
fn member_of(addr: SocketAddr) -> Option<usize> {
    (0..MEMBERS).find(|&i| member_ip(i) == addr.ip())
}

async fn proxy(listener: TcpListener, to: usize, target: SocketAddr, cuts: watch::Receiver<Cuts>) {
    loop {
        let Ok((conn, from)) = listener.accept().await else { continue };
        let from = member_of(from);
        let mut cuts = cuts.clone();
        tokio::spawn(async move {
            let is_cut = |c: &Cuts| from.is_some_and(|f| c.contains(&(f, to)));
            if is_cut(&cuts.borrow_and_update()) {
                return;
            }
            let Ok(upstream) = TcpStream::connect(target).await else { return };
            let _ = conn.set_nodelay(true);
            let _ = upstream.set_nodelay(true);
            let (mut a, mut b) = (conn, upstream);
            let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
            tokio::pin!(copy);
            loop {
                tokio::select! {
                    _ = &mut copy => return,
                    changed = cuts.changed() => {
                        if changed.is_err() || is_cut(&cuts.borrow_and_update()) {
                            return;
                        }
                    }
                }
            }
        });
    }
}

/// Where a log segment's records end: kvd allocates segments ahead, so the
/// records are followed by zeros up to the file's end.
fn records_end(bytes: &[u8]) -> usize {
    bytes.iter().rposition(|&b| b != 0).map_or(0, |last| last + 1)
}

/// The Raft log segments in `log_dir`, oldest first.
fn log_segments(log_dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut segments: Vec<PathBuf> = std::fs::read_dir(log_dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    segments.sort();
    Ok(segments)
}

/// Flips one byte a third of the way into the records of the member's oldest
/// Raft log segment; returns the file changed.
pub fn flip_a_log_byte(data_dir: &Path) -> anyhow::Result<PathBuf> {
    let log_dir = data_dir.join("log");
    let segments = log_segments(&log_dir)?;
    for file in segments {
        let mut bytes = std::fs::read(&file)?;
        let end = records_end(&bytes);
        if end > 4096 {
            bytes[end / 3] ^= 0x5a;
            std::fs::write(&file, bytes)?;
            return Ok(file);
        }
    }
    anyhow::bail!("no log segment with over 4 KiB of records in {}", log_dir.display())
}

/// Cuts the member's oldest Raft log segment to half of its records; returns
/// the new length.
pub fn truncate_log(data_dir: &Path) -> anyhow::Result<u64> {
    let log_dir = data_dir.join("log");
    let segments = log_segments(&log_dir)?;
    let file = segments.first().ok_or_else(|| anyhow::anyhow!("no log segment in {}", log_dir.display()))?;
    let len = records_end(&std::fs::read(file)?) as u64 / 2;
    std::fs::OpenOptions::new().write(true).open(file)?.set_len(len)?;
    Ok(len)
}

/// Copies a directory tree (a member's data, kept to restore after damage).
pub fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// The harness's cluster as the scenarios shared with kvd's own tests see
/// it (`kvd_testkit`): a kill is SIGKILL, a restart starts the process
/// again on its data directory.
impl kvd_testkit::Cluster for Cluster {
    fn size(&self) -> usize {
        MEMBERS
    }

    fn running(&self) -> Vec<usize> {
        (0..MEMBERS).filter(|&i| self.is_running(i)).collect()
    }

    fn client(&self, i: usize) -> Client {
        self.endpoints().only(i).client(Duration::from_secs(2))
    }

    fn client_all(&self) -> Client {
        self.endpoints().client(Duration::from_secs(2))
    }

    async fn leader(&self) -> usize {
        let answering: Vec<usize> = (0..MEMBERS).filter(|&i| self.is_running(i) && !self.paused[i]).collect();
        let status = |i| async move {
            tokio::time::timeout(Duration::from_millis(500), self.client.status_of(i)).await.ok().and_then(Result::ok)
        };
        kvd_testkit::agreed_leader(&answering, status, Duration::from_secs(30)).await
    }

    async fn kill(&mut self, i: usize) {
        Cluster::kill(self, i)
    }

    async fn restart(&mut self, i: usize) {
        self.start_member(i).expect("start the member again");
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.client.status_of(i).await.is_err() {
            assert!(Instant::now() < deadline, "member {i} did not come back");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
