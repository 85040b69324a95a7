//! Counters and latency histograms of one member, for `GET /metrics` (see
//! [`crate::grpc::endpoints`]). Each member has its own (several members can
//! run in one process); recording is a few relaxed atomic adds.
//!
//! - `etcd_disk_wal_fsync_duration_seconds`: each sync of the Raft log.
//! - `etcd_disk_backend_commit_duration_seconds`: each commit of a group of
//!   applied writes to sled.
//! - `grpc_server_started_total` and `grpc_server_handled_total`: client
//!   RPCs by service and method, and by status code once they end.
//! - `etcd_server_leader_changes_seen_total`: leaders this member has seen.
//! - `kvd_lease_renewals_total` and `kvd_lease_renewal_batches_total`:
//!   keep-alives this member took from its clients, and the batches it
//!   renewed them in (from a follower one call to the leader each).
//! - `kvd_leadership_rounds_total`: heartbeat rounds in which a quorum
//!   confirmed this member's leadership, for linearizable reads (its own
//!   and its followers') and keep-alives; keep-alives share one for a
//!   quarter of an election timeout.
//! - `kvd_server_slow_requests_total`: Range, Put, DeleteRange and Txn
//!   requests this member took longer than [`SLOW_REQUEST`] to answer,
//!   each also logged (see [`SlowRequests`]).
//!
//! The names, labels and buckets are etcd 3.4's, so that dashboards and
//! alerts written for etcd read kvd unchanged.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Upper bounds of the histogram buckets, in seconds: 1 ms doubling to
/// 8.192 s, as etcd's disk histograms.
const BUCKETS: [f64; 14] =
    [0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048, 4.096, 8.192];

/// A latency histogram with [`BUCKETS`].
#[derive(Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last is past 8.192 s.
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl Histogram {
    /// Records one duration.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let bucket = BUCKETS.iter().position(|&le| secs <= le).unwrap_or(BUCKETS.len());
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Writes the histogram in Prometheus text format.
    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut total = 0;
        for (i, count) in self.counts.iter().enumerate() {
            total += count.load(Ordering::Relaxed);
            match BUCKETS.get(i) {
                Some(le) => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {total}");
                }
                None => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {total}");
                }
            }
        }
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {total}");
    }
}

/// gRPC status codes by number, as the `grpc_code` label names them.
const CODES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];

/// The code counted for a status code outside [`CODES`].
pub const UNKNOWN: usize = 2;
/// The code counted for an RPC whose client went away before it ended.
pub const CANCELED: usize = 1;

/// The client RPCs kvd serves: path, and gRPC type as etcd labels it.
const METHODS: &[(&str, &str)] = &[
    ("/etcdserverpb.KV/Range", "unary"),
    ("/etcdserverpb.KV/Put", "unary"),
    ("/etcdserverpb.KV/DeleteRange", "unary"),
    ("/etcdserverpb.KV/Txn", "unary"),
    ("/etcdserverpb.KV/Compact", "unary"),
    ("/etcdserverpb.Watch/Watch", "bidi_stream"),
    ("/etcdserverpb.Lease/LeaseGrant", "unary"),
    ("/etcdserverpb.Lease/LeaseRevoke", "unary"),
    ("/etcdserverpb.Lease/LeaseKeepAlive", "bidi_stream"),
    ("/etcdserverpb.Lease/LeaseTimeToLive", "unary"),
    ("/etcdserverpb.Lease/LeaseLeases", "unary"),
    ("/etcdserverpb.Cluster/MemberAdd", "unary"),
    ("/etcdserverpb.Cluster/MemberRemove", "unary"),
    ("/etcdserverpb.Cluster/MemberUpdate", "unary"),
    ("/etcdserverpb.Cluster/MemberList", "unary"),
    ("/etcdserverpb.Cluster/MemberPromote", "unary"),
    ("/etcdserverpb.Maintenance/Alarm", "unary"),
    ("/etcdserverpb.Maintenance/Status", "unary"),
    ("/etcdserverpb.Maintenance/Defragment", "unary"),
    ("/etcdserverpb.Maintenance/Hash", "unary"),
    ("/etcdserverpb.Maintenance/HashKV", "unary"),
    ("/etcdserverpb.Maintenance/Snapshot", "server_stream"),
    ("/etcdserverpb.Maintenance/MoveLeader", "unary"),
    ("/etcdserverpb.Auth/AuthEnable", "unary"),
    ("/etcdserverpb.Auth/AuthDisable", "unary"),
    ("/etcdserverpb.Auth/AuthStatus", "unary"),
    ("/etcdserverpb.Auth/Authenticate", "unary"),
    ("/etcdserverpb.Auth/UserAdd", "unary"),
    ("/etcdserverpb.Auth/UserGet", "unary"),
    ("/etcdserverpb.Auth/UserList", "unary"),
    ("/etcdserverpb.Auth/UserDelete", "unary"),
    ("/etcdserverpb.Auth/UserChangePassword", "unary"),
    ("/etcdserverpb.Auth/UserGrantRole", "unary"),
    ("/etcdserverpb.Auth/UserRevokeRole", "unary"),
    ("/etcdserverpb.Auth/RoleAdd", "unary"),
    ("/etcdserverpb.Auth/RoleGet", "unary"),
    ("/etcdserverpb.Auth/RoleList", "unary"),
    ("/etcdserverpb.Auth/RoleDelete", "unary"),
    ("/etcdserverpb.Auth/RoleGrantPermission", "unary"),
    ("/etcdserverpb.Auth/RoleRevokePermission", "unary"),
    ("/v3lockpb.Lock/Lock", "unary"),
    ("/v3lockpb.Lock/Unlock", "unary"),
    ("/v3electionpb.Election/Campaign", "unary"),
    ("/v3electionpb.Election/Proclaim", "unary"),
    ("/v3electionpb.Election/Leader", "unary"),
    ("/v3electionpb.Election/Observe", "server_stream"),
    ("/v3electionpb.Election/Resign", "unary"),
];

/// Whether the method at `index` of [`METHODS`] is timed for
/// [`SlowRequests`]: Range, Put, DeleteRange and Txn, the requests etcd
/// warns of when they take too long. Others wait by design (a lock, a
/// campaign, a defragment, a compaction with `physical`) or stream.
pub fn is_timed(index: usize) -> bool {
    METHODS.get(index).is_some_and(|(path, _)| {
        matches!(
            *path,
            "/etcdserverpb.KV/Range" | "/etcdserverpb.KV/Put" | "/etcdserverpb.KV/DeleteRange" | "/etcdserverpb.KV/Txn"
        )
    })
}

/// Started and handled counts of each of [`METHODS`].
pub struct GrpcCounters {
    index: HashMap<&'static str, usize>,
    started: Vec<AtomicU64>,
    handled: Vec<[AtomicU64; CODES.len()]>,
}

impl Default for GrpcCounters {
    fn default() -> Self {
        GrpcCounters {
            index: METHODS.iter().enumerate().map(|(i, (path, _))| (*path, i)).collect(),
            started: METHODS.iter().map(|_| AtomicU64::new(0)).collect(),
            handled: METHODS.iter().map(|_| Default::default()).collect(),
        }
    }
}

impl GrpcCounters {
    /// Counts an RPC to `path` as started; the method's index, to count it
    /// handled with, or None for a path that is not one of kvd's methods.
    pub fn start(&self, path: &str) -> Option<usize> {
        let method = *self.index.get(path)?;
        self.started[method].fetch_add(1, Ordering::Relaxed);
        Some(method)
    }

    /// Counts an RPC of `method` (from [`Self::start`]) as ended with status
    /// `code`.
    pub fn handled(&self, method: usize, code: usize) {
        let code = if code < CODES.len() { code } else { UNKNOWN };
        if let Some(counts) = self.handled.get(method) {
            counts[code].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Writes both counters in Prometheus text format, the methods and codes
    /// seen so far.
    fn render(&self, out: &mut String) {
        let labels = |path: &str, kind: &str| {
            let (service, method) = path.trim_start_matches('/').split_once('/').unwrap_or(("", path));
            format!("grpc_method=\"{method}\",grpc_service=\"{service}\",grpc_type=\"{kind}\"")
        };
        let _ = writeln!(
            out,
            "# HELP grpc_server_started_total Total number of RPCs started on the server.\n\
             # TYPE grpc_server_started_total counter"
        );
        for ((path, kind), started) in METHODS.iter().zip(&self.started) {
            let n = started.load(Ordering::Relaxed);
            if n > 0 {
                let _ = writeln!(out, "grpc_server_started_total{{{}}} {n}", labels(path, kind));
            }
        }
        let _ = writeln!(
            out,
            "# HELP grpc_server_handled_total Total number of RPCs completed on the server, regardless of success or failure.\n\
             # TYPE grpc_server_handled_total counter"
        );
        for ((path, kind), codes) in METHODS.iter().zip(&self.handled) {
            for (code, count) in CODES.iter().zip(codes) {
                let n = count.load(Ordering::Relaxed);
                if n > 0 {
                    let _ =
                        writeln!(out, "grpc_server_handled_total{{grpc_code=\"{code}\",{}}} {n}", labels(path, kind));
                }
            }
        }
    }
}

/// The counters and histograms of one member.
#[derive(Default)]
pub struct Metrics {
    /// Syncs of the Raft log.
    pub wal_fsync: Arc<Histogram>,
    /// Commits of applied writes to sled.
    pub backend_commit: Arc<Histogram>,
    /// Client RPCs.
    pub grpc: GrpcCounters,
    /// Leaders seen.
    pub leader_changes: AtomicU64,
    /// Keep-alives taken from clients.
    pub lease_renewals: AtomicU64,
    /// The batches they were renewed in.
    pub lease_renewal_batches: AtomicU64,
    /// Heartbeat rounds that confirmed this member's leadership.
    pub leadership_rounds: Arc<AtomicU64>,
    /// Key-value requests answered slowly.
    pub slow: SlowRequests,
}

/// A key-value request answered later than this is logged and counted, as
/// etcd warns of a request that took longer than 100 ms.
pub const SLOW_REQUEST: Duration = Duration::from_millis(100);

/// At most one line about slow requests per this, with a count of those
/// not logged since: a member that is overloaded, or whose disk stalls,
/// answers thousands late at once.
const SLOW_LOG_EVERY: Duration = Duration::from_secs(1);

/// Key-value requests answered later than [`SLOW_REQUEST`]: counted, and
/// logged at most once per [`SLOW_LOG_EVERY`].
#[derive(Default)]
pub struct SlowRequests {
    count: AtomicU64,
    /// When a line was last logged, and how many slow requests were not
    /// logged since.
    logged: Mutex<(Option<Instant>, u64)>,
}

impl SlowRequests {
    /// Notes a request to `method` (its gRPC path) that took `took`.
    pub fn note(&self, method: &str, took: Duration) {
        self.note_at(Instant::now(), method, took)
    }

    fn note_at(&self, now: Instant, method: &str, took: Duration) {
        if took < SLOW_REQUEST {
            return;
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let mut logged = self.logged.lock().unwrap_or_else(|p| p.into_inner());
        let (last, unlogged) = &mut *logged;
        if last.is_some_and(|at| now.saturating_duration_since(at) < SLOW_LOG_EVERY) {
            *unlogged += 1;
            return;
        }
        let others = std::mem::take(unlogged);
        *last = Some(now);
        drop(logged);
        tracing::warn!(
            method,
            took_ms = took.as_millis() as u64,
            expected_ms = SLOW_REQUEST.as_millis() as u64,
            others_since_last_line = others,
            "request took too long"
        );
    }
}

impl Metrics {
    /// Writes every counter and histogram in Prometheus text format.
    pub fn render(&self, out: &mut String) {
        self.wal_fsync.render(
            out,
            "etcd_disk_wal_fsync_duration_seconds",
            "The latency distributions of fsync called by WAL.",
        );
        self.backend_commit.render(
            out,
            "etcd_disk_backend_commit_duration_seconds",
            "The latency distributions of commit called by backend.",
        );
        write_one(
            out,
            "etcd_server_leader_changes_seen_total",
            "counter",
            "The number of leader changes seen.",
            self.leader_changes.load(Ordering::Relaxed) as f64,
        );
        write_one(
            out,
            "kvd_lease_renewals_total",
            "counter",
            "The number of lease keep-alives taken from clients.",
            self.lease_renewals.load(Ordering::Relaxed) as f64,
        );
        write_one(
            out,
            "kvd_lease_renewal_batches_total",
            "counter",
            "The number of batches lease keep-alives were renewed in.",
            self.lease_renewal_batches.load(Ordering::Relaxed) as f64,
        );
        write_one(
            out,
            "kvd_leadership_rounds_total",
            "counter",
            "The number of heartbeat rounds that confirmed this member's leadership, for reads and keep-alives.",
            self.leadership_rounds.load(Ordering::Relaxed) as f64,
        );
        write_one(
            out,
            "kvd_server_slow_requests_total",
            "counter",
            &format!(
                "The number of Range, Put, DeleteRange and Txn requests answered later than {} ms.",
                SLOW_REQUEST.as_millis()
            ),
            self.slow.count.load(Ordering::Relaxed) as f64,
        );
        self.grpc.render(out);
    }
}

/// Writes one metric of a single value, with its help and type lines, in
/// Prometheus text format.
pub fn write_one(out: &mut String, name: &str, kind: &str, help: &str, value: f64) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_request_is_counted_and_logged_at_most_once_a_second() {
        let lines = crate::logging::captured::Lines::default();
        let slow = SlowRequests::default();
        let start = Instant::now();
        let put = "/etcdserverpb.KV/Put";
        tracing::subscriber::with_default(lines.subscriber(false), || {
            slow.note_at(start, put, Duration::from_millis(99));
            slow.note_at(start, put, Duration::from_millis(250));
            slow.note_at(start + Duration::from_millis(10), put, Duration::from_millis(100));
            slow.note_at(start + Duration::from_millis(900), "/etcdserverpb.KV/Range", Duration::from_secs(2));
            slow.note_at(start + Duration::from_millis(1000), "/etcdserverpb.KV/Txn", Duration::from_millis(120));
        });
        let text = lines.text();
        let logged: Vec<&str> = text.lines().collect();
        assert_eq!(logged.len(), 2, "{text}");
        assert!(logged[0].contains("WARN") && logged[0].contains("request took too long"), "{text}");
        assert!(logged[0].contains("method=\"/etcdserverpb.KV/Put\" took_ms=250 expected_ms=100"), "{text}");
        assert!(logged[0].contains("others_since_last_line=0"), "{text}");
        assert!(logged[1].contains("/etcdserverpb.KV/Txn") && logged[1].contains("took_ms=120"), "{text}");
        assert!(logged[1].contains("others_since_last_line=2"), "{text}");
        let mut out = String::new();
        Metrics { slow, ..Default::default() }.render(&mut out);
        assert!(out.contains("\nkvd_server_slow_requests_total 4\n"), "{out}");
        assert!(out.contains("requests answered later than 100 ms.\n"), "{out}");
        // Only the key-value requests are timed: a lock or a campaign
        // waits by design, and a stream's answer is never whole.
        let timed: Vec<&str> = (0..METHODS.len()).filter(|&i| is_timed(i)).map(|i| METHODS[i].0).collect();
        assert_eq!(
            timed,
            ["/etcdserverpb.KV/Range", "/etcdserverpb.KV/Put", "/etcdserverpb.KV/DeleteRange", "/etcdserverpb.KV/Txn"]
        );
    }

    fn rendered(h: &Histogram) -> String {
        let mut out = String::new();
        h.render(&mut out, "h", "help");
        out
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_end_with_the_count() {
        let h = Histogram::default();
        for ms in [0.5, 1.0, 1.5, 3.0, 3.0, 9000.0] {
            h.observe(Duration::from_secs_f64(ms / 1000.0));
        }
        let out = rendered(&h);
        for line in [
            "h_bucket{le=\"0.001\"} 2",
            "h_bucket{le=\"0.002\"} 3",
            "h_bucket{le=\"0.004\"} 5",
            "h_bucket{le=\"8.192\"} 5",
            "h_bucket{le=\"+Inf\"} 6",
            "h_count 6",
        ] {
            assert!(out.lines().any(|l| l == line), "{line} missing from\n{out}");
        }
        let sum: f64 = out.lines().find_map(|l| l.strip_prefix("h_sum ")).expect("sum").parse().expect("number");
        assert!((sum - 9.009).abs() < 1e-6, "{sum}");
    }

    #[test]
    fn rpcs_are_counted_by_method_and_code() {
        let c = GrpcCounters::default();
        let put = c.start("/etcdserverpb.KV/Put").expect("known");
        let range = c.start("/etcdserverpb.KV/Range").expect("known");
        assert_eq!(c.start("/etcdserverpb.Maintenance/Downgrade"), None);
        c.handled(put, 0);
        c.handled(range, 11);
        c.handled(range, 99);
        let mut out = String::new();
        c.render(&mut out);
        for line in [
            "grpc_server_started_total{grpc_method=\"Put\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"} 1",
            "grpc_server_handled_total{grpc_code=\"OK\",grpc_method=\"Put\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"} 1",
            "grpc_server_handled_total{grpc_code=\"OutOfRange\",grpc_method=\"Range\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"} 1",
            "grpc_server_handled_total{grpc_code=\"Unknown\",grpc_method=\"Range\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"} 1",
        ] {
            assert!(out.lines().any(|l| l == line), "{line} missing from\n{out}");
        }
        assert!(!out.contains("Auth"), "{out}");
    }
}
