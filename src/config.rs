//! `kvd`'s configuration: etcd's flag names, each also read from a `KVD_`
//! environment variable, validated into addresses and ids before anything
//! starts.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use sha2::{Digest, Sha256};

use crate::node::auto_compaction::AutoCompaction;
use crate::raft::NodeId;

/// Whether this member starts a new cluster or joins an existing one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ClusterState {
    /// Form a new cluster from `--initial-cluster`.
    New,
    /// The cluster exists; this member only restarts or waits to be added.
    Existing,
}

/// The flags of `kvd`.
#[derive(Debug, Clone, Parser)]
#[command(name = "kvd", version, about = "kvd: a Raft-replicated key-value store that speaks the etcd v3 API")]
pub struct Config {
    /// Human-readable name of this member.
    #[arg(long, env = "KVD_NAME", default_value = "default")]
    pub name: String,
    /// Directory for the Raft log, the data and snapshots (default: `<name>.kvd`).
    #[arg(long, env = "KVD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Comma-separated URLs to serve clients on.
    #[arg(long, env = "KVD_LISTEN_CLIENT_URLS", default_value = "http://localhost:2379")]
    pub listen_client_urls: String,
    /// Comma-separated client URLs to tell the cluster about.
    #[arg(long, env = "KVD_ADVERTISE_CLIENT_URLS", default_value = "http://localhost:2379")]
    pub advertise_client_urls: String,
    /// URL to serve peers on.
    #[arg(long, env = "KVD_LISTEN_PEER_URLS", default_value = "http://localhost:2380")]
    pub listen_peer_urls: String,
    /// This member's peer URL as the other members reach it.
    #[arg(long, env = "KVD_INITIAL_ADVERTISE_PEER_URLS", default_value = "http://localhost:2380")]
    pub initial_advertise_peer_urls: String,
    /// The initial members, as `name=peer-url,name=peer-url,...`.
    #[arg(long, env = "KVD_INITIAL_CLUSTER", default_value = "default=http://localhost:2380")]
    pub initial_cluster: String,
    /// `new` to form a cluster, `existing` to restart into one.
    #[arg(long, env = "KVD_INITIAL_CLUSTER_STATE", value_enum, default_value = "new")]
    pub initial_cluster_state: ClusterState,
    /// Token that keeps the ids of different clusters apart.
    #[arg(long, env = "KVD_INITIAL_CLUSTER_TOKEN", default_value = "etcd-cluster")]
    pub initial_cluster_token: String,
    /// Leader heartbeat interval, in milliseconds.
    #[arg(long, env = "KVD_HEARTBEAT_INTERVAL", default_value_t = 100)]
    pub heartbeat_interval: u64,
    /// Election timeout, in milliseconds.
    #[arg(long, env = "KVD_ELECTION_TIMEOUT", default_value_t = 1000)]
    pub election_timeout: u64,
    /// Number of applied client requests that triggers a snapshot (and log
    /// purge), as etcd counts them.
    #[arg(long, env = "KVD_SNAPSHOT_COUNT", default_value_t = 100_000)]
    pub snapshot_count: u64,
    /// Largest client request, in bytes.
    #[arg(long, env = "KVD_MAX_REQUEST_BYTES", default_value_t = 1_572_864)]
    pub max_request_bytes: usize,
    /// Most operations in one transaction.
    #[arg(long, env = "KVD_MAX_TXN_OPS", default_value_t = 128)]
    pub max_txn_ops: usize,
    /// How long a watch that asked for progress notifications may go without
    /// a response before it gets an empty one with the current revision.
    #[arg(long = "experimental-watch-progress-notify-interval", env = "KVD_EXPERIMENTAL_WATCH_PROGRESS_NOTIFY_INTERVAL", default_value = "10m", value_parser = humantime::parse_duration)]
    pub watch_progress_notify_interval: std::time::Duration,
    /// Origins (`scheme://host[:port]`, comma-separated) whose web pages may
    /// call the JSON gateway, for CORS; `*` allows all.
    #[arg(long, env = "KVD_CORS", default_value = "*")]
    pub cors: String,
    /// Host names (comma-separated) that plain-HTTP requests may name in
    /// their Host header; `*` allows all. Guards a member on a private
    /// address against DNS rebinding; requests over TLS are not checked.
    #[arg(long, env = "KVD_HOST_WHITELIST", default_value = "*")]
    pub host_whitelist: String,
    /// Certificate (PEM) the client port presents on https:// URLs.
    #[arg(long, env = "KVD_CERT_FILE")]
    pub cert_file: Option<PathBuf>,
    /// Private key (PEM) of --cert-file.
    #[arg(long, env = "KVD_KEY_FILE")]
    pub key_file: Option<PathBuf>,
    /// CA certificates (PEM) that client certificates are checked against;
    /// with it, clients must present one (as in etcd 3.4).
    #[arg(long, env = "KVD_TRUSTED_CA_FILE")]
    pub trusted_ca_file: Option<PathBuf>,
    /// Serve only clients with a certificate from --trusted-ca-file.
    #[arg(long, env = "KVD_CLIENT_CERT_AUTH")]
    pub client_cert_auth: bool,
    /// Serve https:// client URLs with a self-signed certificate made at
    /// start (for trying TLS out; clients cannot verify it).
    #[arg(long, env = "KVD_AUTO_TLS")]
    pub auto_tls: bool,
    /// Certificate (PEM) this member presents to other members, as server
    /// and as client, on https:// peer URLs.
    #[arg(long, env = "KVD_PEER_CERT_FILE")]
    pub peer_cert_file: Option<PathBuf>,
    /// Private key (PEM) of --peer-cert-file.
    #[arg(long, env = "KVD_PEER_KEY_FILE")]
    pub peer_key_file: Option<PathBuf>,
    /// CA certificates (PEM) that other members' certificates are checked
    /// against, both ways; with it, a member must present one to connect.
    #[arg(long, env = "KVD_PEER_TRUSTED_CA_FILE")]
    pub peer_trusted_ca_file: Option<PathBuf>,
    /// Accept peer connections only with a certificate from
    /// --peer-trusted-ca-file.
    #[arg(long, env = "KVD_PEER_CLIENT_CERT_AUTH")]
    pub peer_client_cert_auth: bool,
    /// Accept peer connections only from certificates with this common name.
    #[arg(long, env = "KVD_PEER_CERT_ALLOWED_CN")]
    pub peer_cert_allowed_cn: Option<String>,
    /// Tokens Authenticate hands out: `simple` (random strings every member
    /// learns through the log), or `jwt,pub-key=PATH,priv-key=PATH,
    /// sign-method=RS256|ES256|…,ttl=5m` (signed tokens any member with the
    /// public key verifies).
    #[arg(long, env = "KVD_AUTH_TOKEN", default_value = "simple")]
    pub auth_token: String,
    /// Seconds a simple token stays valid without being used.
    #[arg(long, env = "KVD_AUTH_TOKEN_TTL", default_value_t = 300)]
    pub auth_token_ttl: u64,
    /// bcrypt's cost for the passwords of users (4 to 31; each step doubles
    /// the time to check one).
    #[arg(long, env = "KVD_BCRYPT_COST", default_value_t = 10)]
    pub bcrypt_cost: u32,
    /// Refuse membership changes that would leave fewer started or reachable
    /// members than a quorum (as etcd; `--strict-reconfig-check=false` to
    /// skip the check).
    #[arg(long, env = "KVD_STRICT_RECONFIG_CHECK", default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub strict_reconfig_check: bool,
    /// Serve https:// peer URLs with a self-signed certificate made at start,
    /// and connect to other members without checking theirs (for trying TLS
    /// out: traffic is encrypted, but members are known only by the cluster
    /// and member ids each message carries).
    #[arg(long, env = "KVD_PEER_AUTO_TLS")]
    pub peer_auto_tls: bool,
    /// Most bytes of data before the NOSPACE alarm refuses writes that add
    /// data: 0 for etcd's default of 2 GiB, negative for no quota.
    #[arg(long, env = "KVD_QUOTA_BACKEND_BYTES", default_value_t = 0, allow_negative_numbers = true)]
    pub quota_backend_bytes: i64,
    /// Raise the NOSPACE alarm when the data dir's filesystem has fewer free
    /// bytes than this (0: do not look), so that writes are refused before
    /// the disk fills.
    #[arg(long, env = "KVD_QUOTA_DISK_FREE_BYTES", default_value_t = 64 << 20)]
    pub quota_disk_free_bytes: u64,
    /// `periodic` (keep a time of history) or `revision` (keep a number of
    /// revisions), for --auto-compaction-retention.
    #[arg(long, env = "KVD_AUTO_COMPACTION_MODE", default_value = "periodic")]
    pub auto_compaction_mode: String,
    /// History automatic compaction keeps: in periodic mode hours (a bare
    /// number) or a duration such as `30m`; in revision mode a number of
    /// revisions. 0 turns automatic compaction off.
    #[arg(long, env = "KVD_AUTO_COMPACTION_RETENTION", default_value = "0")]
    pub auto_compaction_retention: String,
    /// Threads that serve clients and peers and run Raft (default: one per
    /// CPU). Members that share a machine do better with fewer each: every
    /// extra thread wakes and sleeps on its own, and the log and sled write
    /// on threads of their own anyway.
    #[arg(long, env = "KVD_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
    /// Memory the database keeps its pages in (sled's page cache), bytes.
    /// While the store's pages fit in it, more makes puts at random keys
    /// cheaper (they read and decode no page again). Once the cache is
    /// full, a member holds two to three times what it adds.
    #[arg(long, env = "KVD_BACKEND_CACHE_BYTES", default_value_t = crate::raft::db_dir::SLED_CACHE_BYTES)]
    pub backend_cache_bytes: u64,
}

/// A configuration that cannot work, with what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A URL could not be parsed or resolved.
    #[error("invalid URL {url:?} in --{flag}: {why}")]
    BadUrl {
        /// The flag it came from.
        flag: &'static str,
        /// The URL.
        url: String,
        /// What is wrong.
        why: String,
    },
    /// The TLS flags do not fit together.
    #[error("{0}")]
    BadTls(String),
    /// `--initial-cluster` is malformed.
    #[error("invalid --initial-cluster: {0}")]
    BadCluster(String),
    /// This member is not in `--initial-cluster` with its advertised peer URL.
    #[error("--initial-cluster has no member named {name:?} with peer URL {url} (from --initial-advertise-peer-urls)")]
    NotAMember {
        /// This member's name.
        name: String,
        /// Its advertised peer URL.
        url: String,
    },
    /// The timing flags are inconsistent.
    #[error("--election-timeout ({election}ms) must be at least 5 times --heartbeat-interval ({heartbeat}ms), and both above 0")]
    BadTiming {
        /// Election timeout in ms.
        election: u64,
        /// Heartbeat interval in ms.
        heartbeat: u64,
    },
    /// A limit is out of range.
    #[error("{0}")]
    BadLimit(String),
    /// A flag's value cannot be read.
    #[error("{0}")]
    BadFlag(String),
}

/// One initial member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitialMember {
    /// Its name.
    pub name: String,
    /// Its peer URL.
    pub peer_url: String,
    /// Its id.
    pub id: NodeId,
}

/// A configuration checked and resolved.
#[derive(Debug, Clone)]
pub struct Validated {
    /// The flags.
    pub config: Config,
    /// Where to keep data.
    pub data_dir: PathBuf,
    /// Addresses to serve clients on.
    pub client_addrs: Vec<SocketAddr>,
    /// Whether each of `client_addrs` serves TLS (its URL is https://).
    pub client_https: Vec<bool>,
    /// Address to serve peers on.
    pub peer_addr: SocketAddr,
    /// Client URLs to publish.
    pub client_urls: Vec<String>,
    /// This member's id.
    pub id: NodeId,
    /// The initial members.
    pub members: Vec<InitialMember>,
    /// The id of the cluster formed from the initial members.
    pub cluster_id: u64,
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// Election timeout.
    pub election: Duration,
    /// Automatic compaction.
    pub auto_compaction: AutoCompaction,
    /// The CORS and host checks of plain HTTP requests.
    pub http_access: crate::grpc::http_access::HttpAccess,
    /// The keys of `--auth-token jwt,...`; simple tokens without.
    pub jwt: Option<std::sync::Arc<crate::auth::Jwt>>,
}

fn split(list: &str) -> impl Iterator<Item = &str> {
    list.split(',').map(str::trim).filter(|s| !s.is_empty())
}

/// Normalises a URL (`http://host:port`) and resolves it to an address.
pub fn parse_url(flag: &'static str, raw: &str) -> Result<(String, SocketAddr), ConfigError> {
    let bad = |why: &str| ConfigError::BadUrl { flag, url: raw.to_string(), why: why.to_string() };
    let url = url::Url::parse(raw).map_err(|e| bad(&e.to_string()))?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(bad("only http:// and https:// URLs are supported"));
    }
    let host = url.host_str().ok_or_else(|| bad("no host"))?;
    let port = url.port().ok_or_else(|| bad("no port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let addr = (host, port)
        .to_socket_addrs()
        .map_err(|e| bad(&e.to_string()))?
        .next()
        .ok_or_else(|| bad("host does not resolve"))?;
    Ok((format!("{}://{}:{}", url.scheme(), url.host_str().unwrap_or(host), port), addr))
}

/// A member's id, from its peer URL and the cluster token (as etcd derives
/// it from the same inputs). Never 0.
pub fn member_id(peer_url: &str, token: &str) -> NodeId {
    let digest = Sha256::new().chain_update(peer_url.as_bytes()).chain_update(token.as_bytes()).finalize();
    let mut id = [0u8; 8];
    id.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(id).max(1)
}

impl Config {
    /// Checks that the TLS flags make sense together, and that https://
    /// client URLs have a certificate to serve.
    fn check_tls(&self, https: bool) -> Result<(), ConfigError> {
        let bad = |why: &str| Err(ConfigError::BadTls(why.to_string()));
        if self.cert_file.is_some() != self.key_file.is_some() {
            return bad("--cert-file and --key-file go together");
        }
        if self.auto_tls && self.cert_file.is_some() {
            return bad("--auto-tls makes its own certificate; leave out --cert-file and --key-file");
        }
        if https && self.cert_file.is_none() && !self.auto_tls {
            return bad("https:// client URLs need --cert-file and --key-file (or --auto-tls)");
        }
        if !https && (self.cert_file.is_some() || self.auto_tls) {
            return bad("--cert-file or --auto-tls given, but no --listen-client-urls URL is https://");
        }
        if self.client_cert_auth && self.trusted_ca_file.is_none() {
            return bad(
                "--client-cert-auth needs --trusted-ca-file, the CA that client certificates are checked against",
            );
        }
        if self.trusted_ca_file.is_some() && !https {
            return bad("--trusted-ca-file given, but no --listen-client-urls URL is https://");
        }
        Ok(())
    }

    /// Checks that the peer TLS flags fit together and with the peer URLs.
    fn check_peer_tls(&self, https: bool, own_url: &str) -> Result<(), ConfigError> {
        let bad = |why: &str| Err(ConfigError::BadTls(why.to_string()));
        if own_url.starts_with("https://") != https {
            return bad("--listen-peer-urls and --initial-advertise-peer-urls must both be https:// or both http://");
        }
        if self.peer_cert_file.is_some() != self.peer_key_file.is_some() {
            return bad("--peer-cert-file and --peer-key-file go together");
        }
        if self.peer_auto_tls && self.peer_cert_file.is_some() {
            return bad("--peer-auto-tls makes its own certificate; leave out --peer-cert-file and --peer-key-file");
        }
        if self.peer_auto_tls && self.peer_trusted_ca_file.is_some() {
            return bad(
                "--peer-auto-tls certificates are self-signed, so no --peer-trusted-ca-file can vouch for them; \
                 give --peer-cert-file and --peer-key-file signed by that CA instead",
            );
        }
        if https && self.peer_cert_file.is_none() && !self.peer_auto_tls {
            return bad("https:// peer URLs need --peer-cert-file and --peer-key-file (or --peer-auto-tls)");
        }
        if !https && (self.peer_cert_file.is_some() || self.peer_trusted_ca_file.is_some() || self.peer_auto_tls) {
            return bad(
                "--peer-cert-file, --peer-trusted-ca-file or --peer-auto-tls given, but the peer URLs are http://",
            );
        }
        if self.peer_client_cert_auth && self.peer_trusted_ca_file.is_none() {
            return bad("--peer-client-cert-auth needs --peer-trusted-ca-file");
        }
        if self.peer_cert_allowed_cn.is_some() && self.peer_trusted_ca_file.is_none() {
            return bad("--peer-cert-allowed-cn needs --peer-trusted-ca-file");
        }
        Ok(())
    }

    /// Checks the flags and resolves addresses and ids.
    pub fn validate(&self) -> Result<Validated, ConfigError> {
        if self.heartbeat_interval == 0 || self.election_timeout < 5 * self.heartbeat_interval {
            return Err(ConfigError::BadTiming { election: self.election_timeout, heartbeat: self.heartbeat_interval });
        }
        if self.max_txn_ops == 0 {
            return Err(ConfigError::BadLimit("--max-txn-ops must be at least 1".into()));
        }
        if self.max_request_bytes < 1024 {
            return Err(ConfigError::BadLimit("--max-request-bytes must be at least 1024".into()));
        }
        let jwt = match self.auth_token.split_once(',') {
            _ if self.auth_token == "simple" => None,
            Some(("jwt", options)) => {
                Some(std::sync::Arc::new(crate::auth::Jwt::parse(options).map_err(ConfigError::BadFlag)?))
            }
            _ => {
                return Err(ConfigError::BadFlag(format!(
                    "--auth-token {:?}: give simple, or jwt,pub-key=…,priv-key=…,sign-method=…[,ttl=…]",
                    self.auth_token
                )))
            }
        };
        if !(4..=31).contains(&self.bcrypt_cost) {
            return Err(ConfigError::BadLimit(format!("--bcrypt-cost {} is not between 4 and 31", self.bcrypt_cost)));
        }
        if self.auth_token_ttl == 0 {
            return Err(ConfigError::BadLimit("--auth-token-ttl must be at least 1 second".into()));
        }
        if self.snapshot_count == 0 {
            return Err(ConfigError::BadLimit("--snapshot-count must be at least 1".into()));
        }
        if self.worker_threads == Some(0) {
            return Err(ConfigError::BadLimit("--worker-threads must be at least 1".into()));
        }
        if self.backend_cache_bytes < crate::raft::db_dir::SLED_CACHE_MIN_BYTES {
            return Err(ConfigError::BadLimit(format!(
                "--backend-cache-bytes {} is below the least it takes, {} (1 MiB)",
                self.backend_cache_bytes,
                crate::raft::db_dir::SLED_CACHE_MIN_BYTES
            )));
        }
        let http_access = crate::grpc::http_access::HttpAccess::parse(&self.cors, &self.host_whitelist)
            .map_err(ConfigError::BadFlag)?;
        let auto_compaction = AutoCompaction::parse(&self.auto_compaction_mode, &self.auto_compaction_retention)
            .map_err(ConfigError::BadLimit)?;
        let listen = split(&self.listen_client_urls)
            .map(|u| parse_url("listen-client-urls", u))
            .collect::<Result<Vec<_>, _>>()?;
        let client_addrs: Vec<SocketAddr> = listen.iter().map(|(_, a)| *a).collect();
        let client_https: Vec<bool> = listen.iter().map(|(u, _)| u.starts_with("https://")).collect();
        self.check_tls(client_https.contains(&true))?;
        if client_addrs.is_empty() {
            return Err(ConfigError::BadUrl {
                flag: "listen-client-urls",
                url: String::new(),
                why: "no URL given".into(),
            });
        }
        let client_urls = split(&self.advertise_client_urls)
            .map(|u| parse_url("advertise-client-urls", u).map(|(u, _)| u))
            .collect::<Result<Vec<_>, _>>()?;
        let (listen_peer, peer_addr) = parse_url("listen-peer-urls", &self.listen_peer_urls)?;
        let (own_url, _) = parse_url("initial-advertise-peer-urls", &self.initial_advertise_peer_urls)?;
        let peer_https = listen_peer.starts_with("https://");
        self.check_peer_tls(peer_https, &own_url)?;
        let mut members = Vec::new();
        for entry in split(&self.initial_cluster) {
            let (name, url) = entry
                .split_once('=')
                .ok_or_else(|| ConfigError::BadCluster(format!("{entry:?} is not name=peer-url")))?;
            let (url, _) = parse_url("initial-cluster", url)?;
            if url.starts_with("https://") != peer_https {
                return Err(ConfigError::BadTls(format!(
                    "--initial-cluster has {url}, but this member's --listen-peer-urls is {}: every member uses TLS between members, or none",
                    if peer_https { "https://" } else { "http://" }
                )));
            }
            let id = member_id(&url, &self.initial_cluster_token);
            if members.iter().any(|m: &InitialMember| m.name == name || m.id == id) {
                return Err(ConfigError::BadCluster(format!("member {name:?} or its URL {url} appears twice")));
            }
            members.push(InitialMember { name: name.to_string(), peer_url: url, id });
        }
        let me = members
            .iter()
            .find(|m| m.name == self.name && m.peer_url == own_url)
            .ok_or_else(|| ConfigError::NotAMember { name: self.name.clone(), url: own_url.clone() })?;
        let mut ids: Vec<NodeId> = members.iter().map(|m| m.id).collect();
        ids.sort_unstable();
        let cluster_seed: Vec<String> = ids.iter().map(|i| format!("{i:016x}")).collect();
        let cluster_id = member_id(&cluster_seed.join(","), &self.initial_cluster_token);
        Ok(Validated {
            data_dir: self.data_dir.clone().unwrap_or_else(|| PathBuf::from(format!("{}.kvd", self.name))),
            client_addrs,
            client_https,
            peer_addr,
            client_urls,
            id: me.id,
            members: members.clone(),
            cluster_id,
            heartbeat: Duration::from_millis(self.heartbeat_interval),
            election: Duration::from_millis(self.election_timeout),
            auto_compaction,
            http_access,
            jwt,
            config: self.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(args: &[&str]) -> Config {
        Config::parse_from(std::iter::once("kvd").chain(args.iter().copied()))
    }

    #[test]
    fn every_flag_reads_the_environment_variable_named_after_it() {
        use clap::CommandFactory;
        let mut checked = 0;
        for arg in Config::command().get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if matches!(long, "help" | "version") {
                continue;
            }
            let want = format!("KVD_{}", long.to_uppercase().replace('-', "_"));
            let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
            assert_eq!(env.as_deref(), Some(want.as_str()), "--{long}");
            checked += 1;
        }
        assert!(checked > 15, "only {checked} flags seen");
    }

    #[test]
    fn defaults_form_a_single_member_cluster() {
        let v = config(&[]).validate().expect("defaults are valid");
        assert_eq!(v.members.len(), 1);
        assert_eq!(v.data_dir, PathBuf::from("default.kvd"));
        assert_eq!(v.id, v.members[0].id);
    }

    #[test]
    fn a_member_must_be_in_the_initial_cluster() {
        let err = config(&["--name", "x", "--initial-cluster", "a=http://127.0.0.1:1,b=http://127.0.0.1:2"])
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("no member named \"x\""), "{err}");
    }

    #[test]
    fn bad_urls_and_timings_are_rejected() {
        assert!(config(&["--listen-client-urls", "https://127.0.0.1:1"]).validate().is_err());
        assert!(config(&["--listen-peer-urls", "nonsense"]).validate().is_err());
        assert!(config(&["--heartbeat-interval", "500", "--election-timeout", "1000"]).validate().is_err());
    }

    #[test]
    fn the_backend_cache_takes_at_least_one_mib() {
        let err = config(&["--backend-cache-bytes", "1000"]).validate().unwrap_err();
        assert_eq!(err.to_string(), "--backend-cache-bytes 1000 is below the least it takes, 1048576 (1 MiB)");
        let v = config(&["--backend-cache-bytes", "1048576"]).validate().expect("1 MiB is enough");
        assert_eq!(v.config.backend_cache_bytes, 1 << 20);
        assert_eq!(config(&[]).validate().expect("defaults").config.backend_cache_bytes, 16 << 20);
    }

    #[test]
    fn worker_threads_must_be_at_least_one() {
        let err = config(&["--worker-threads", "0"]).validate().unwrap_err();
        assert_eq!(err.to_string(), "--worker-threads must be at least 1");
        let v = config(&["--worker-threads", "1"]).validate().expect("one thread is enough");
        assert_eq!(v.config.worker_threads, Some(1));
        assert!(Config::try_parse_from(["kvd", "--worker-threads", "-1"]).is_err());
    }

    #[test]
    fn ids_depend_on_url_and_token() {
        assert_ne!(member_id("http://a:1", "t"), member_id("http://a:1", "u"));
        assert_ne!(member_id("http://a:1", "t"), member_id("http://a:2", "t"));
    }
}
