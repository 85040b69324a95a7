//! Starting and stopping a member.
//!
//! [`start`] opens the data directory, starts Raft, forms the cluster when
//! this is a new member of a new cluster, and serves the client and peer APIs
//! on listeners the caller may have bound already (tests bind port 0).
//! [`ServerHandle::shutdown`] stops serving, stops Raft and flushes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{InitializeError, RaftError};
use openraft::{BasicNode, SnapshotPolicy};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;

use crate::config::{ClusterState, Validated};
use crate::grpc::election::ElectionService;
use crate::grpc::lease::LeaseService;
use crate::grpc::lock::LockService;
use crate::grpc::peer::PeerService;
use crate::grpc::watch::WatchService;
use crate::grpc::{cluster::ClusterService, kv::KvService, maintenance::MaintenanceService, GRPC_OVERHEAD_BYTES};
use crate::node::{Member, RequestLimits};
use crate::proto::etcdserverpb::{
    cluster_server::ClusterServer, kv_server::KvServer, maintenance_server::MaintenanceServer,
};
use crate::proto::etcdserverpb::{lease_server::LeaseServer, watch_server::WatchServer};
use crate::proto::kvdpb::{peer_server::PeerServer, MemberAttributes};
use crate::proto::v3electionpb::election_server::ElectionServer;
use crate::proto::v3lockpb::lock_server::LockServer;
use crate::raft::log_store::LogStore;
use crate::raft::network::Network;
use crate::raft::state_machine::StateMachine;
use crate::raft::Raft;

/// Why a member could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The data directory could not be opened (in use, unreadable, corrupt).
    #[error("cannot open data dir {dir}: {why}")]
    DataDir {
        /// The directory.
        dir: String,
        /// The cause.
        why: String,
    },
    /// The data directory belongs to another member or cluster.
    #[error("data dir {dir} belongs to member {found:x} of cluster {cluster:x}, not to member {expected:x}")]
    WrongMember {
        /// The directory.
        dir: String,
        /// The member id stored there.
        found: u64,
        /// The cluster id stored there.
        cluster: u64,
        /// This member's id.
        expected: u64,
    },
    /// Raft refused to start.
    #[error("cannot start raft: {0}")]
    Raft(String),
    /// TLS could not be set up.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// A member on an empty data directory may not join (see [`crate::join`]).
    #[error(transparent)]
    Join(#[from] crate::join::JoinError),
}

/// How long a stopping member waits for requests in flight.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);
/// How often `kvd` looks whether its Raft has stopped on its own.
const FATAL_CHECK: Duration = Duration::from_millis(100);

/// Why a member stops on its own.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Fatal {
    /// Its Raft stopped (a storage error): nothing acknowledged is lost, and
    /// it may be restarted once the cause is fixed.
    #[error("raft stopped: {0}; restart this member once the cause is fixed")]
    Raft(String),
    /// It was removed from the cluster; it must not be restarted on this
    /// data directory (add it again as a new member instead).
    #[error(
        "{0}; it stops, and must not be restarted on this data dir (add it again with member add, on an empty one)"
    )]
    Removed(String),
}

/// A running member.
pub struct ServerHandle {
    /// The member.
    pub member: Arc<Member>,
    /// Addresses the client API listens on.
    pub client_addrs: Vec<SocketAddr>,
    /// Address the peer API listens on.
    pub peer_addr: SocketAddr,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// Binds the listeners the configuration names and starts the member.
pub async fn start(cfg: Validated) -> Result<ServerHandle, StartError> {
    let mut clients = Vec::new();
    for addr in &cfg.client_addrs {
        clients.push(TcpListener::bind(addr).await.map_err(|source| StartError::Listen { addr: *addr, source })?);
    }
    let peer =
        TcpListener::bind(cfg.peer_addr).await.map_err(|source| StartError::Listen { addr: cfg.peer_addr, source })?;
    start_on(cfg, clients, peer).await
}

/// How long a member may take to answer one chunk of a snapshot, the last
/// of which it answers once the whole snapshot is installed.
const SNAPSHOT_INSTALL_TIMEOUT_MS: u64 = 10 * 60 * 1000;

/// Opens the data directory's database. The first start records whose
/// directory it is (member id, cluster id and name); a later one must be
/// the member of that name, and takes the recorded ids: a member added with
/// `member add` has an id the leader gave it, and a member whose peer URL
/// was changed keeps its id.
fn open_db(cfg: &mut Validated) -> Result<sled::Db, StartError> {
    let dir = cfg.data_dir.display().to_string();
    let fail = |why: String| StartError::DataDir { dir: dir.clone(), why };
    std::fs::create_dir_all(&cfg.data_dir).map_err(|e| fail(e.to_string()))?;
    crate::raft::db_dir::remove_unused(&cfg.data_dir).map_err(|e| fail(e.to_string()))?;
    let path = crate::raft::db_dir::db_path(&cfg.data_dir).map_err(|e| fail(e.to_string()))?;
    crate::raft::db_dir::set_cache_bytes(cfg.config.backend_cache_bytes);
    let db = crate::raft::db_dir::open_db_at(&path).map_err(|e| fail(e.to_string()))?;
    let ident = cfg.id.to_be_bytes();
    let name = db.get(b"member_name").map_err(|e| fail(e.to_string()))?;
    match db.get(b"member_id").map_err(|e| fail(e.to_string()))? {
        None => {
            db.insert(b"member_id", &ident).map_err(|e| fail(e.to_string()))?;
            db.insert(b"cluster_id", &cfg.cluster_id.to_be_bytes()).map_err(|e| fail(e.to_string()))?;
            db.insert(b"member_name", cfg.config.name.as_bytes()).map_err(|e| fail(e.to_string()))?;
            db.flush().map_err(|e| fail(e.to_string()))?;
        }
        Some(found) if name.as_deref() == Some(cfg.config.name.as_bytes()) => {
            if let Ok(bytes) = found.as_ref().try_into() {
                cfg.id = u64::from_be_bytes(bytes);
            }
        }
        Some(found) if found.as_ref() != ident => {
            let found = found.as_ref().try_into().map(u64::from_be_bytes).unwrap_or(0);
            let cluster = db
                .get(b"cluster_id")
                .ok()
                .flatten()
                .and_then(|c| c.as_ref().try_into().ok().map(u64::from_be_bytes))
                .unwrap_or(0);
            return Err(StartError::WrongMember { dir, found, cluster, expected: cfg.id });
        }
        Some(_) if name.is_none() => {
            // Recorded before names were: the id matched, so record the name.
            db.insert(b"member_name", cfg.config.name.as_bytes()).map_err(|e| fail(e.to_string()))?;
        }
        Some(_) => {}
    }
    Ok(db)
}

/// Reads the cluster id stored in the data directory.
fn stored_cluster_id(db: &sled::Db) -> Option<u64> {
    db.get(b"cluster_id").ok().flatten().and_then(|c| c.as_ref().try_into().ok().map(u64::from_be_bytes))
}

/// Starts the member on listeners bound by the caller.
pub async fn start_on(
    mut cfg: Validated,
    clients: Vec<TcpListener>,
    peer: TcpListener,
) -> Result<ServerHandle, StartError> {
    let client_tls = match cfg.client_https.contains(&true) {
        true => {
            let urls = format!("{},{}", cfg.config.listen_client_urls, cfg.config.advertise_client_urls);
            Some(crate::tls::client_port(&cfg.config, &url_hosts(&urls))?)
        }
        false => None,
    };
    let peer_urls = format!("{},{}", cfg.config.listen_peer_urls, cfg.config.initial_advertise_peer_urls);
    let (peer_tls, peer_client_tls) = match crate::tls::peer(&cfg.config, &url_hosts(&peer_urls))? {
        Some(tls) => (Some(tls.server), Some(tls.client)),
        None => (None, None),
    };
    let fresh = crate::join::is_fresh(&cfg.data_dir);
    let peer_local = peer.local_addr().map_err(|source| StartError::Listen { addr: cfg.peer_addr, source })?;
    let peer_limit = crate::raft::network::message_limit(cfg.config.max_request_bytes);
    // The members a sender must be one of until this member knows the
    // membership from its log.
    let mut initial: Vec<u64> = cfg.members.iter().map(|m| m.id).collect();
    if fresh && cfg.config.initial_cluster_state == ClusterState::Existing {
        // A member added with `member add` has the id the leader gave it,
        // and belongs to the cluster the others belong to: both are learnt
        // from them, by this member's peer URL.
        let identity = crate::raft::network::Identity { cluster_id: cfg.cluster_id, member_id: cfg.id };
        let asking = Network::new(peer_local, identity, peer_limit, peer_client_tls.clone());
        let answers = crate::join::probe_all(&asking, &cfg).await;
        if let Some((id, cluster_id, members)) = crate::join::assigned(&cfg, &answers) {
            tracing::info!(member = %format!("{id:x}"), cluster = %format!("{cluster_id:x}"), "joining an existing cluster");
            cfg.id = id;
            cfg.cluster_id = cluster_id;
            initial = members;
        }
    }
    if fresh {
        crate::join::mark(&cfg.data_dir)
            .map_err(|e| StartError::DataDir { dir: cfg.data_dir.display().to_string(), why: e.to_string() })?;
    }
    let db = open_db(&mut cfg)?;
    let data_err =
        |e: crate::error::Error| StartError::DataDir { dir: cfg.data_dir.display().to_string(), why: e.to_string() };
    let mut log_store = LogStore::open(&cfg.data_dir.join("log")).map_err(|e| data_err(e.into()))?;
    let writes = log_store.writes_in_flight();
    let wal_fsync = log_store.fsync_histogram();
    log_store.import_from_sled(&db).map_err(|e| data_err(e.into()))?;
    let mut state_machine = StateMachine::open(&db, &cfg.data_dir).map_err(data_err)?;
    // A quarter of the heartbeat interval, which is how long the leader
    // waits for an AppendEntries answer.
    log_store.pace_by(state_machine.applied_index(), cfg.heartbeat / 4);
    let snapshot_due = state_machine.snapshot_every(cfg.config.snapshot_count);
    let shared = state_machine.shared();
    let listed = shared.was_listed();
    let metrics = Arc::new(crate::metrics::Metrics {
        wal_fsync,
        backend_commit: shared.commit_histogram(),
        ..Default::default()
    });
    let cluster_id = stored_cluster_id(&db).unwrap_or(cfg.cluster_id);
    let identity = crate::raft::network::Identity { cluster_id, member_id: cfg.id };
    let network = Network::new(peer_local, identity, peer_limit, peer_client_tls);

    let snapshot_count = cfg.config.snapshot_count;
    let raft_config = openraft::Config {
        cluster_name: cfg.config.initial_cluster_token.clone(),
        heartbeat_interval: cfg.heartbeat.as_millis() as u64,
        // openraft waits a leader lease (election_timeout_max) plus a random
        // time in [min, max) without a leader before it campaigns; these
        // make that [T, 4T/3) for --election-timeout T, as etcd waits T
        // (randomised) before it campaigns.
        election_timeout_min: (cfg.election.as_millis() as u64 / 3).max(cfg.heartbeat.as_millis() as u64 + 1),
        election_timeout_max: (cfg.election.as_millis() as u64 * 2 / 3).max(cfg.heartbeat.as_millis() as u64 + 2),
        snapshot_policy: SnapshotPolicy::LogsSinceLast(snapshot_count),
        // The log behind a snapshot is purged by the member itself, to a
        // bound in entries and bytes (`Member::purge_the_log`): openraft's
        // purge counts entries only, and one entry carries a batch of writes.
        max_in_snapshot_log_to_keep: u64::MAX,
        snapshot_max_chunk_size: crate::raft::SNAPSHOT_CHUNK_BYTES as u64,
        // The answer to a snapshot's last chunk waits for the whole install,
        // which takes as long as the data is large (the member keeps the
        // leader's word meanwhile: see the peer service's InstallSnapshot).
        install_snapshot_timeout: SNAPSHOT_INSTALL_TIMEOUT_MS,
        max_payload_entries: 1000,
        ..Default::default()
    }
    .validate()
    .map_err(|e| StartError::Raft(e.to_string()))?;
    let (restored, restored_last) = {
        use openraft::storage::RaftLogStorage;
        let vote = log_store.read_vote().await.map_err(|e| StartError::Raft(e.to_string()))?;
        let last = log_store.get_log_state().await.map_err(|e| StartError::Raft(e.to_string()))?.last_log_id;
        // Every applied entry was committed and written to this log before
        // it was applied; a log that ends before them lost its end (cut or
        // damaged). Going on would have Raft rebuild from a state it cannot
        // reconcile, so refuse, and say how to recover.
        let applied = state_machine.last_applied();
        if last.map(|l| l.index) < applied.map(|l| l.index) {
            return Err(StartError::DataDir {
                dir: cfg.data_dir.display().to_string(),
                why: format!(
                    "the raft log ends at index {} but entries up to {} were applied: its end was lost (truncated or damaged); refusing to start. Restore this member's data directory from a copy",
                    last.map_or(0, |l| l.index),
                    applied.map_or(0, |l| l.index)
                ),
            });
        }
        state_machine.resume_compaction();
        (crate::read_index::Restored::from_start(cfg.id, vote, last), last)
    };
    let purged_log = log_store.clone();
    let raft = Raft::new(cfg.id, Arc::new(raft_config), network.clone(), log_store, state_machine)
        .await
        .map_err(|e| StartError::Raft(e.to_string()))?;
    restored_state(&raft, restored_last).await?;

    let (stop, stop_rx) = watch::channel(false);
    let request_timeout = Duration::from_secs(5) + 2 * cfg.election;
    let proposals = crate::raft::batcher::Proposals::start(raft.clone(), writes.clone(), request_timeout);
    let forwards = crate::raft::forwarder::Forwarder::start(raft.clone(), network.clone(), writes);
    let reads = crate::read_index::ReadIndex::new(
        raft.clone(),
        network.clone(),
        request_timeout,
        restored,
        metrics.leadership_rounds.clone(),
    );
    let (renewals, renewal_queue) = crate::node::lease::Renewals::new();
    let member = Arc::new(Member {
        id: cfg.id,
        cluster_id,
        raft,
        state: shared,
        network,
        limits: RequestLimits { max_request_bytes: cfg.config.max_request_bytes, max_txn_ops: cfg.config.max_txn_ops },
        request_timeout,
        min_lease_ttl: crate::lease::min_lease_ttl(cfg.election),
        election: cfg.election,
        // Keep-alives on the leader share a confirmation of its leadership
        // for a quarter of an election timeout, rather than a heartbeat
        // round per batch; a new leader's countdowns carry that as grace.
        lessor: crate::lease::Lessor::new(cfg.election / 4),
        renewals,
        revocations: Default::default(),
        stop: stop_rx.clone(),
        proposals,
        forwards,
        reads,
        metrics,
        membership_lock: Default::default(),
        listed: listed.into(),
        strict_reconfig_check: cfg.config.strict_reconfig_check,
        logins: crate::node::auth::Logins::new(cfg.config.bcrypt_cost, cfg.jwt.clone()),
        space: crate::node::alarm::Space {
            quota_bytes: crate::node::alarm::Space::quota_from_flag(cfg.config.quota_backend_bytes),
            disk_free_bytes: cfg.config.quota_disk_free_bytes,
            data_dir: cfg.data_dir.clone(),
        },
        vouches: crate::node::peer::Vouches::new(),
        commit_told: Default::default(),
    });
    member.tokens().set_ttl(Duration::from_secs(cfg.config.auth_token_ttl));
    // A defragment this member makes by itself waits while another
    // member's is under way. The compaction thread asks (not a task of the
    // runtime, so it may block on one).
    let (asker, runtime) = (Arc::downgrade(&member), tokio::runtime::Handle::current());
    member.state.on_defragment_turn(move || {
        let asking = asker.upgrade().filter(|member| !*member.stop.borrow());
        asking.is_none_or(|member| runtime.block_on(member.defragment_turn()))
    });
    // Not among `tasks`: it ends when the member stops, with nothing to
    // finish gracefully.
    tokio::spawn(crate::node::lease::run_renewals(Arc::downgrade(&member), renewal_queue, stop_rx.clone()));

    let mut tasks = Vec::new();
    let peer_addr = peer.local_addr().map_err(|source| StartError::Listen { addr: cfg.peer_addr, source })?;
    let (open, open_rx) = watch::channel(!fresh);
    let allowed_cn = cfg.config.peer_cert_allowed_cn.clone();
    let gate = PeerGate { open: open_rx, initial, limit: peer_limit, tls: peer_tls, allowed_cn };
    tasks.push(serve_peer(member.clone(), peer, gate, stop_rx.clone()));
    if fresh {
        let answers = crate::join::probe_all(&member.network, &cfg).await;
        let refusal = crate::join::decide(&cfg, &answers).err();
        let unmarked = match refusal {
            None => crate::join::unmark(&cfg.data_dir).err(),
            Some(_) => None,
        };
        if refusal.is_some() || unmarked.is_some() {
            let handle = ServerHandle { member, client_addrs: Vec::new(), peer_addr, stop, tasks };
            handle.shutdown().await;
            return Err(match (refusal, unmarked) {
                (Some(refusal), _) => refusal.into(),
                (None, e) => StartError::DataDir {
                    dir: cfg.data_dir.display().to_string(),
                    why: e.map_or_else(String::new, |e| e.to_string()),
                },
            });
        }
        let _ = open.send(true);
    }
    if cfg.config.initial_cluster_state == ClusterState::New {
        // Every member of a new cluster knows its membership, and one that
        // forms the cluster campaigns at once. Were they all to do so at the
        // same moment, they would campaign against each other: the member
        // with the lowest id forms it at once, each other one only if it
        // has heard from no leader after its rank times half an election
        // timeout (so a cluster forms when the first member is down too).
        let members: BTreeMap<u64, BasicNode> =
            cfg.members.iter().map(|m| (m.id, BasicNode::new(&m.peer_url))).collect();
        let rank = members.keys().position(|id| *id == cfg.id).unwrap_or(0) as u32;
        if rank == 0 {
            if let Err(e) = form(&member.raft, members).await {
                let handle = ServerHandle { member, client_addrs: Vec::new(), peer_addr, stop, tasks };
                handle.shutdown().await;
                return Err(StartError::Raft(e));
            }
        } else {
            let (member, stop) = (member.clone(), stop_rx.clone());
            let pause = cfg.election / 2 * rank;
            tasks.push(tokio::spawn(async move {
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stopped(stop) => return,
                }
                let joined = member.raft.metrics().borrow().membership_config.nodes().next().is_some();
                if !joined {
                    if let Err(e) = form(&member.raft, members).await {
                        tracing::error!("cannot form the cluster: {e}");
                    }
                }
            }));
        }
    }
    let mut client_addrs = Vec::new();
    for (i, listener) in clients.into_iter().enumerate() {
        let addr = listener.local_addr().map_err(|source| StartError::Listen { addr: cfg.peer_addr, source })?;
        client_addrs.push(addr);
        let progress = cfg.config.watch_progress_notify_interval;
        let tls = client_tls.clone().filter(|_| cfg.client_https.get(i).copied().unwrap_or(false));
        let access = cfg.http_access.on_listener(tls.is_some());
        tasks.push(serve_clients(member.clone(), listener, tls, access, progress, stop_rx.clone()));
    }
    tasks.push(tokio::spawn(member.clone().run_lease_expiry()));
    tasks.push(tokio::spawn(member.clone().count_leader_changes()));
    tasks.push(tokio::spawn(member.clone().finish_joint_changes()));
    tasks.push(tokio::spawn(member.clone().record_when_listed()));
    tasks.push(tokio::spawn(member.clone().watch_disk()));
    tasks.push(tokio::spawn(member.clone().run_auto_compaction(cfg.auto_compaction)));
    tasks.push(tokio::spawn(member.clone().take_snapshots(snapshot_due)));
    tasks.push(tokio::spawn(member.clone().purge_the_log(purged_log, snapshot_count.min(5000))));
    tasks.push(publish_attributes(member.clone(), cfg.config.name.clone(), cfg.client_urls.clone(), stop_rx));
    tracing::info!(member = %format!("{:x}", cfg.id), name = %cfg.config.name, ?client_addrs, %peer_addr, "kvd member started");
    Ok(ServerHandle { member, client_addrs, peer_addr, stop, tasks })
}

/// Forms a new cluster of `members` on this member, unless its log already
/// holds a membership.
async fn form(raft: &Raft, members: BTreeMap<u64, BasicNode>) -> Result<(), String> {
    let n = members.len();
    // A member restarted on its data with the flags it was first started
    // with (as etcd members are) is formed already: openraft would refuse,
    // and log the refusal as an error, on every such restart.
    if raft.is_initialized().await.map_err(|e| e.to_string())? {
        return Ok(());
    }
    match raft.initialize(members).await {
        Ok(()) => {
            tracing::info!(members = n, "formed a new cluster");
            Ok(())
        }
        Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

/// Accepted connections with Nagle's algorithm off: small gRPC messages
/// would otherwise wait for delayed ACKs (40 ms per round trip). The server
/// builder's own `tcp_nodelay` only covers listeners it binds itself.
fn incoming(listener: TcpListener) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    TcpListenerStream::new(listener).map(|conn| {
        let conn = conn?;
        if let Err(e) = conn.set_nodelay(true) {
            tracing::debug!("TCP_NODELAY on an accepted connection: {e}");
        }
        Ok(conn)
    })
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// What the peer service needs to know beyond the member.
struct PeerGate {
    open: watch::Receiver<bool>,
    initial: Vec<u64>,
    limit: usize,
    tls: Option<crate::tls::ServerTls>,
    allowed_cn: Option<String>,
}

fn serve_peer(
    member: Arc<Member>,
    listener: TcpListener,
    gate: PeerGate,
    stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let svc = PeerServer::new(PeerService::new(member, gate.open, gate.initial, gate.allowed_cn))
        .max_decoding_message_size(gate.limit)
        .max_encoding_message_size(usize::MAX);
    let tls = gate.tls;
    tokio::spawn(async move {
        let router = Server::builder()
            .layer(tower::util::MapResponseLayer::new(crate::grpc::peer::name_unimplemented))
            .add_service(svc);
        let result = match tls {
            None => router.serve_with_incoming_shutdown(incoming(listener), stopped(stop)).await,
            Some(tls) => router.serve_with_incoming_shutdown(tls.incoming(listener), stopped(stop)).await,
        };
        if let Err(e) = result {
            tracing::error!("peer server failed: {e}");
        }
    })
}

/// How long a starting member waits for Raft to report the state it
/// restored; see [`restored_state`].
const RESTORE_REPORT_WAIT: Duration = Duration::from_secs(60);

/// Waits until Raft's metrics show the log found on disk. Until the Raft
/// task first reports, its metrics say term 0 and an empty membership; a
/// peer request checked against them in that moment found its sender
/// listed by no one (a leader added after `--initial-cluster` was refused
/// as a stranger), and the refused leader's member campaigned meanwhile and
/// deposed it. Nothing is served before this returns.
async fn restored_state(raft: &Raft, last: Option<crate::raft::LogId>) -> Result<(), StartError> {
    let Some(last) = last else { return Ok(()) };
    let reported = raft
        .wait(Some(RESTORE_REPORT_WAIT))
        .metrics(|m| m.last_log_index >= Some(last.index), "the restored log")
        .await;
    match reported {
        Ok(_) => Ok(()),
        Err(openraft::metrics::WaitError::ShuttingDown) => {
            Err(StartError::Raft("Raft stopped while restoring this member's state".to_string()))
        }
        Err(e) => {
            tracing::warn!("Raft has not reported the restored log yet ({e}); serving all the same");
            Ok(())
        }
    }
}

/// The hosts of comma-separated URLs, and the loopback names, for a
/// certificate made by `--auto-tls` or `--peer-auto-tls`.
fn url_hosts(urls: &str) -> Vec<String> {
    let mut hosts: Vec<String> = urls
        .split(',')
        .filter_map(|u| url::Url::parse(u.trim()).ok())
        .filter_map(|u| u.host_str().map(|h| h.trim_start_matches('[').trim_end_matches(']').to_string()))
        .chain(["localhost".to_string(), "127.0.0.1".to_string()])
        .collect();
    hosts.sort();
    hosts.dedup();
    hosts
}

fn serve_clients(
    member: Arc<Member>,
    listener: TcpListener,
    tls: Option<crate::tls::ServerTls>,
    access: crate::grpc::http_access::HttpAccess,
    progress_interval: Duration,
    stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let max_in = member.limits.max_request_bytes + GRPC_OVERHEAD_BYTES;
    let kv = KvServer::new(KvService::new(member.clone()))
        .max_decoding_message_size(max_in)
        .max_encoding_message_size(usize::MAX);
    let cluster = ClusterServer::new(ClusterService::new(member.clone())).max_decoding_message_size(max_in);
    let maintenance = MaintenanceServer::new(MaintenanceService::new(member.clone())).max_decoding_message_size(max_in);
    let watch =
        WatchServer::new(WatchService::new(member.clone(), progress_interval)).max_decoding_message_size(max_in);
    let lease = LeaseServer::new(LeaseService::new(member.clone())).max_decoding_message_size(max_in);
    let lock = LockServer::new(LockService::new(member.clone())).max_decoding_message_size(max_in);
    let metrics_member = member.clone();
    let auth =
        crate::proto::etcdserverpb::auth_server::AuthServer::new(crate::grpc::auth::AuthService::new(member.clone()))
            .max_decoding_message_size(max_in);
    let election = ElectionServer::new(ElectionService::new(member)).max_decoding_message_size(max_in);
    tokio::spawn(async move {
        let router = Server::builder()
            // `/metrics` and `/health` are HTTP/1.1 as well, as etcd's are.
            .accept_http1(true)
            .layer(tower::util::MapResponseLayer::new(crate::grpc::size_limit_as_resource_exhausted))
            .layer(crate::grpc::endpoints::layer(metrics_member, progress_interval, access))
            .add_service(kv)
            .add_service(cluster)
            .add_service(maintenance)
            .add_service(watch)
            .add_service(lease)
            .add_service(lock)
            .add_service(election)
            .add_service(auth);
        let result = match tls {
            None => router.serve_with_incoming_shutdown(incoming(listener), stopped(stop)).await,
            Some(tls) => router.serve_with_incoming_shutdown(tls.incoming(listener), stopped(stop)).await,
        };
        if let Err(e) = result {
            tracing::error!("client server failed: {e}");
        }
    })
}

/// Publishes this member's name and client URLs through the log, as etcd
/// does, retrying until it is committed or the member stops.
fn publish_attributes(
    member: Arc<Member>,
    name: String,
    client_urls: Vec<String>,
    stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let attrs = MemberAttributes { id: member.id, name, client_urls };
        let publish = async {
            loop {
                if member.state.read().attrs.get(&member.id) == Some(&attrs) {
                    return;
                }
                match member.publish(attrs.clone()).await {
                    Ok(_) => return,
                    Err(e) => tracing::debug!("publishing member attributes: {e}; retrying"),
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        };
        tokio::select! {
            _ = publish => {}
            _ = stopped(stop) => {}
        }
    })
}

impl ServerHandle {
    /// Resolves if this member's Raft stops on its own: a storage error (a
    /// full disk, a failed write) is fatal to it. The member then serves
    /// nothing useful, so the caller should report the reason and exit; what
    /// is on disk is what was acknowledged, and a restart (once the cause is
    /// gone) catches up from the others.
    ///
    /// It looks every [`FATAL_CHECK`] rather than waiting on Raft's metrics:
    /// those change several times per write, and each change would wake the
    /// thread this waits on.
    pub async fn fatal(&self) -> Fatal {
        let metrics = self.member.raft.metrics();
        let mut tick = tokio::time::interval(FATAL_CHECK);
        loop {
            tick.tick().await;
            if let Err(fatal) = &metrics.borrow().running_state {
                return Fatal::Raft(fatal.to_string());
            }
            if let Some(removed) = self.member.removed() {
                return Fatal::Removed(removed);
            }
            if metrics.has_changed().is_err() {
                return Fatal::Raft("raft stopped".into());
            }
        }
    }

    /// Stops serving, stops Raft and flushes the data directory. A leader
    /// first hands its leadership to the most up-to-date voter (giving up
    /// after an election timeout), so that clients see no election.
    pub async fn shutdown(self) {
        self.member.step_down(self.member.election).await;
        let _ = self.stop.send(true);
        // Unary requests in flight get a moment to finish; long-lived streams
        // (watches, keep-alives, campaigns) would hold a graceful stop open
        // for ever, so after the grace period their connections are dropped
        // and their clients move to another member.
        for t in self.tasks {
            let abort = t.abort_handle();
            if tokio::time::timeout(SHUTDOWN_GRACE, t).await.is_err() {
                abort.abort();
            }
        }
        if let Err(e) = self.member.raft.shutdown().await {
            tracing::warn!("raft shutdown: {e}");
        }
        if let Err(e) = self.member.state.read_committed() {
            tracing::warn!("commit on shutdown: {e}");
        }
        if let Err(e) = self.member.state.flush().await {
            tracing::warn!("flush on shutdown: {e}");
        }
        tracing::info!("kvd member stopped");
    }
}
