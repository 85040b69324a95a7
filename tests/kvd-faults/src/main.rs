//! kvd-faults: runs a three-member kvd cluster of real processes under client
//! load while injecting faults, records every operation, and checks the
//! history afterwards. Exits non-zero on any anomaly.
//!
//! ```sh
//! kvd-faults --seed 7 --duration 60s --faults all
//! kvd-faults --runs 20 --duration 60s          # seeds 1..=20
//! ```

mod checks;
mod inject;
mod linearizability;
mod workload;

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use inject::{inject, Injection};
use kvd::proto::etcdserverpb::RangeRequest;
use kvd_faults::cluster::{Cluster, MEMBERS};
use kvd_faults::Fault;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use workload::{Clock, Record};

#[derive(Parser, Debug)]
#[command(name = "kvd-faults", about = "Fault injection with a linearizability checker for a three-member kvd")]
struct Args {
    /// Seed of the first run (faults, timings and client choices follow from it).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Runs, with seeds seed, seed+1, ...
    #[arg(long, default_value_t = 1)]
    runs: u64,
    /// How long each run injects faults (at least until each chosen fault
    /// has been injected once).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Faults to inject, comma-separated, or "all" (see `Fault` for the
    /// list; disk-full needs root: the data directory of member 2 is a
    /// 512 MiB tmpfs).
    #[arg(long, default_value = "all")]
    faults: String,
    /// Register clients (reads, writes, compare-and-swaps).
    #[arg(long, default_value_t = 6)]
    clients: usize,
    /// The members' election timeout, in milliseconds.
    #[arg(long, default_value_t = 500)]
    election_timeout: u64,
    /// Where the kvd binary is (default: beside this one).
    #[arg(long)]
    kvd: Option<PathBuf>,
    /// Keep each run's data directories and logs (always kept on failure).
    #[arg(long)]
    keep: bool,
    /// Fail a run that missed an availability bound too (writes resuming
    /// within 10 s of a leader kill or while the leader is cut off, a healed
    /// member serving within 10 s).
    #[arg(long)]
    strict_liveness: bool,
    /// Run the members with TLS on both ports: client certificates required
    /// on the client port, and peer certificates with an allowed common name
    /// between members (from a CA the harness makes).
    #[arg(long)]
    tls: bool,
}

/// What one run found.
#[derive(Default)]
struct Report {
    /// Safety violations: any fails the run.
    anomalies: Vec<String>,
    /// Missed availability bounds: reported, and fail the run only with
    /// `--strict-liveness` (a loaded machine can stretch any bound).
    liveness: Vec<String>,
    notes: Vec<String>,
    faults: BTreeMap<String, u32>,
    ops: usize,
    ops_unknown: usize,
    histories: usize,
    undecided: usize,
    acked_inserts: usize,
    lost: usize,
    resume_after_kill: Vec<Duration>,
    resume_after_partition: Vec<Duration>,
    elected_after_cut: Vec<Duration>,
    elected_after_kill: Vec<Duration>,
    lease_expiry: Vec<Duration>,
    leases_late: usize,
    fenced: usize,
    heal_to_serve: Vec<Duration>,
    /// From killing a member to its replacement's promotion.
    replaced: Vec<Duration>,
    /// How long each MoveLeader took.
    moved_leader: Vec<Duration>,
    /// From adding a fourth member as a learner to its promotion.
    grown: Vec<Duration>,
}

fn main() {
    let args = Args::parse();
    let faults: Vec<Fault> = if args.faults == "all" {
        Fault::ALL.to_vec()
    } else {
        let parsed: Result<Vec<Fault>, String> =
            args.faults.split(',').map(str::trim).filter(|f| !f.is_empty()).map(str::parse).collect();
        match parsed {
            Ok(chosen) => chosen,
            Err(e) => {
                eprintln!("kvd-faults: {e}");
                std::process::exit(2);
            }
        }
    };
    let kvd = args.kvd.clone().unwrap_or_else(|| {
        let me = std::env::current_exe().unwrap_or_default();
        me.with_file_name("kvd")
    });
    if !kvd.exists() {
        eprintln!("kvd-faults: no kvd binary at {} (build it, or pass --kvd)", kvd.display());
        std::process::exit(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kvd-faults: {e}");
            std::process::exit(2);
        }
    };
    let mut failed = 0;
    let mut totals = Report::default();
    for seed in args.seed..args.seed + args.runs {
        let dir = match tempfile::Builder::new().prefix(&format!("kvd-faults-{seed}-")).tempdir() {
            Ok(d) => d,
            Err(e) => {
                eprintln!("kvd-faults: {e}");
                std::process::exit(2);
            }
        };
        println!(
            "== run seed {seed}: {:?} of {}{}; data in {}",
            args.duration,
            faults.iter().map(|f| f.name()).collect::<Vec<_>>().join(","),
            if args.tls { "; TLS on client and peer ports, certificates required" } else { "" },
            dir.path().display()
        );
        let report = match runtime.block_on(run(&args, &faults, seed, kvd.clone(), dir.path().to_path_buf())) {
            Ok(r) => r,
            Err(e) => Report { anomalies: vec![format!("the harness failed: {e:#}")], ..Default::default() },
        };
        print_report(seed, &report);
        let fails = !report.anomalies.is_empty() || (args.strict_liveness && !report.liveness.is_empty());
        if fails || !report.liveness.is_empty() || args.keep {
            let kept = dir.keep();
            println!("   data and logs kept in {}", kept.display());
        }
        if fails {
            failed += 1;
        }
        merge(&mut totals, report);
    }
    if args.runs > 1 {
        println!("== {} runs, {failed} with anomalies", args.runs);
        print_report(0, &totals);
    }
    std::process::exit(if failed > 0 { 1 } else { 0 });
}

fn merge(t: &mut Report, r: Report) {
    t.anomalies.extend(r.anomalies);
    t.liveness.extend(r.liveness);
    for (k, v) in r.faults {
        *t.faults.entry(k).or_default() += v;
    }
    t.ops += r.ops;
    t.ops_unknown += r.ops_unknown;
    t.histories += r.histories;
    t.undecided += r.undecided;
    t.acked_inserts += r.acked_inserts;
    t.lost += r.lost;
    t.resume_after_kill.extend(r.resume_after_kill);
    t.resume_after_partition.extend(r.resume_after_partition);
    t.elected_after_cut.extend(r.elected_after_cut);
    t.elected_after_kill.extend(r.elected_after_kill);
    t.lease_expiry.extend(r.lease_expiry);
    t.leases_late += r.leases_late;
    t.fenced += r.fenced;
    t.heal_to_serve.extend(r.heal_to_serve);
    t.replaced.extend(r.replaced);
    t.moved_leader.extend(r.moved_leader);
    t.grown.extend(r.grown);
}

fn spread(v: &[Duration]) -> String {
    if v.is_empty() {
        return "-".into();
    }
    let mut ms: Vec<u128> = v.iter().map(|d| d.as_millis()).collect();
    ms.sort();
    format!("median {} ms, max {} ms (n={})", ms[ms.len() / 2], ms[ms.len() - 1], ms.len())
}

fn print_report(seed: u64, r: &Report) {
    let faults: Vec<String> = r.faults.iter().map(|(k, v)| format!("{k}×{v}")).collect();
    let head = if seed == 0 { "   totals".to_string() } else { format!("   seed {seed}") };
    println!("{head}: faults {}", if faults.is_empty() { "none".into() } else { faults.join(" ") });
    println!(
        "   operations {} ({} with unknown outcome); histories checked {} ({} undecided); acknowledged inserts {}, lost {}",
        r.ops, r.ops_unknown, r.histories, r.undecided, r.acked_inserts, r.lost
    );
    println!("   a new leader after a leader kill: {}", spread(&r.elected_after_kill));
    println!("   writes resumed after a leader kill: {}", spread(&r.resume_after_kill));
    println!("   move-leader answered after: {}", spread(&r.moved_leader));
    println!("   a killed member replaced (removed, re-added, promoted) after: {}", spread(&r.replaced));
    println!("   a fourth member added as a learner and promoted after: {}", spread(&r.grown));
    println!(
        "   leases let go: key gone after the last keep-alive: {}; later than TTL + election timeout (during faults): {}",
        spread(&r.lease_expiry),
        r.leases_late
    );
    println!("   writes fenced on a lock token: {}", r.fenced);
    println!("   a new leader after the leader was cut off: {}", spread(&r.elected_after_cut));
    println!("   writes resumed after the leader was cut off: {}", spread(&r.resume_after_partition));
    println!("   a cut-off member served again after the heal: {}", spread(&r.heal_to_serve));
    for n in &r.notes {
        println!("   note: {n}");
    }
    if r.anomalies.is_empty() {
        println!("   no anomalies");
    }
    for a in &r.anomalies {
        println!("   ANOMALY: {a}");
    }
    for l in &r.liveness {
        println!("   LIVENESS: {l}");
    }
}

/// Time from `from` until the first acknowledgement of a write called after
/// it, waiting up to `limit`.
async fn resumed(record: &Record, from: u64, limit: Duration) -> Option<Duration> {
    let deadline = Instant::now() + limit;
    loop {
        // The first write called after `from` and acknowledged.
        let first = record
            .write_acks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|&&(call, _)| call > from)
            .map(|&(_, ret)| ret)
            .min();
        if let Some(t) = first {
            return Some(Duration::from_nanos(t - from));
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The last line of member `i`'s log that mentions an error, trimmed, or "".
fn last_error(dir: &std::path::Path, i: usize) -> String {
    let log = std::fs::read_to_string(dir.join(format!("m{i}.log"))).unwrap_or_default();
    log.lines().rev().find(|l| l.contains("error")).unwrap_or("").trim().to_string()
}

/// Time until member `i` answers a linearizable read itself.
async fn serves(cluster: &Cluster, i: usize, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        let r = tokio::time::timeout(Duration::from_millis(500), cluster.client.get_on(i, b"probe")).await;
        if matches!(r, Ok(Ok(_))) {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

async fn run(args: &Args, faults: &[Fault], seed: u64, kvd: PathBuf, dir: PathBuf) -> anyhow::Result<Report> {
    let mut rng = StdRng::seed_from_u64(seed);
    let election = Duration::from_millis(args.election_timeout);
    let (mut cluster, faults) = start_cluster(args, faults, kvd, &dir).await?;
    let faults = &faults[..];
    let mut report = Report::default();

    let clock = Clock(Instant::now());
    let record = Arc::new(Record::default());
    let stop = Arc::new(AtomicBool::new(false));
    let endpoints = cluster.endpoints();
    let load =
        workload::Load { record: record.clone(), clock, stop: stop.clone(), timeout: Duration::from_secs(2), seed };
    let Running { tasks, watchers, watch_until } = start_load(args.clients, &endpoints, load);

    // The faults.
    let end = Instant::now() + args.duration;
    // Every chosen fault once before any repeats, in a seeded order; the
    // first round is always finished, however short the duration.
    let mut windows: Vec<(u64, u64)> = Vec::new();
    let mut schedule: Vec<Fault> = faults.to_vec();
    schedule.shuffle(&mut rng);
    while Instant::now() < end || !schedule.is_empty() {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(500..2000))).await;
        if schedule.is_empty() {
            if Instant::now() >= end {
                break;
            }
            schedule = faults.to_vec();
            schedule.shuffle(&mut rng);
        }
        let Some(fault) = schedule.pop() else { break };
        let leader = cluster.wait_leader(Duration::from_secs(10)).await;
        let Some(leader) = leader else {
            report.anomalies.push(format!("no leader before {fault} ({:?} into the run)", clock.0.elapsed()));
            break;
        };
        let follower = (leader + rng.gen_range(1..MEMBERS)) % MEMBERS;
        let at = clock.now();
        record.fault(true, at);
        *report.faults.entry(fault.to_string()).or_default() += 1;
        println!("   {:>6.1}s {fault} (leader m{leader})", Duration::from_nanos(at).as_secs_f64());
        let ctx = Injection {
            cluster: &mut cluster,
            rng: &mut rng,
            report: &mut report,
            record: &record,
            clock,
            election,
            dir: &dir,
        };
        inject(ctx, fault, leader, follower, at).await?;
        // The fault's effects last until a leader is back (or 10 s).
        let _ = cluster.wait_leader(Duration::from_secs(10)).await;
        windows.push((at, clock.now()));
        record.fault(false, clock.now());
    }

    // Heal, let the load run on a healthy cluster for a moment, then stop it.
    record.fault(true, clock.now());
    cluster.cut(HashSet::new());
    for m in 0..MEMBERS {
        if cluster.exited(m) {
            report.anomalies.push(format!("m{m} had exited on its own (see m{m}.log)"));
        }
        if !cluster.is_running(m) {
            cluster.start_member(m)?;
        }
        cluster.pause(m, false);
    }
    if cluster.wait_leader(Duration::from_secs(20)).await.is_none() {
        report.anomalies.push("no leader after healing everything".into());
    }
    record.fault(false, clock.now());
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }

    // The final revision, by a linearizable read that must succeed now.
    let last = final_revision(&cluster).await;
    let Some(last) = last else {
        report.anomalies.push("the healed cluster did not answer a read".into());
        return Ok(report);
    };

    // Watches: every revision, once, in order.
    *watch_until.lock().unwrap_or_else(|p| p.into_inner()) = Some(last);
    for w in watchers {
        if tokio::time::timeout(Duration::from_secs(20), w).await.is_err() {
            report.anomalies.push(format!("a watcher did not reach revision {last} within 20 s"));
        }
    }
    report.anomalies.extend(record.watch_errors.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned());
    for (i, seen) in record.watched.lock().unwrap_or_else(|p| p.into_inner()).iter().enumerate() {
        report.anomalies.extend(workload::check_watch(i, seen, last));
    }

    // Every member has the same data at the final revision, and at the
    // last compacted one, whose history compaction must have left whole.
    let compacted = *record.compacted.lock().unwrap_or_else(|p| p.into_inner());
    report.notes.push(format!("compacted up to revision {compacted}"));
    let contents = compare_members(&endpoints, last, compacted, &mut report).await;

    checks::records(&record, &contents, &windows, election, &mut report);
    checks::linearizability(&record, &mut report).await?;
    cluster.stop_all();
    Ok(report)
}

/// Starts the cluster for a run: with member 2's data on a small tmpfs when
/// disk-full is chosen and one can be mounted; without that fault when not.
/// Returns the cluster, once it has a leader, and the faults it can take.
async fn start_cluster(
    args: &Args,
    faults: &[Fault],
    kvd: PathBuf,
    dir: &std::path::Path,
) -> anyhow::Result<(Cluster, Vec<Fault>)> {
    let dir = dir.to_path_buf();
    let small_disk = faults.contains(&Fault::DiskFull).then_some(2);
    let cluster = match Cluster::start(kvd.clone(), dir.clone(), args.election_timeout, small_disk, args.tls).await {
        Ok(c) => c,
        Err(e) if small_disk.is_some() => {
            // No tmpfs here (not root, or no mount rights): run without it.
            println!("   disk-full skipped: {e:#}");
            let _ = std::fs::remove_dir_all(dir.join("m2"));
            let mut c = Cluster::start(kvd, dir.clone(), args.election_timeout, None, args.tls).await?;
            c.layout.small_disk = None;
            c
        }
        Err(e) => return Err(e),
    };
    let faults: Vec<Fault> =
        faults.iter().copied().filter(|f| *f != Fault::DiskFull || cluster.layout.small_disk.is_some()).collect();
    if cluster.wait_leader(Duration::from_secs(20)).await.is_none() {
        anyhow::bail!("the cluster elected no leader at start");
    }
    Ok((cluster, faults))
}

/// The load of a run, under way.
struct Running {
    /// The clients, which end when the load's stop flag is set.
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// A watcher per member, which ends at the revision set in `watch_until`.
    watchers: Vec<tokio::task::JoinHandle<()>>,
    watch_until: Arc<Mutex<Option<i64>>>,
}

/// Starts the clients (`clients` on registers, and those that insert, hold
/// leases and locks, and compact) and a watcher on every member.
fn start_load(clients: usize, endpoints: &workload::Endpoints, load: workload::Load) -> Running {
    let record = load.record.clone();
    *record.watched.lock().unwrap_or_else(|p| p.into_inner()) = vec![Vec::new(); MEMBERS];
    *record.watch_progress.lock().unwrap_or_else(|p| p.into_inner()) = vec![1; MEMBERS];
    let mut tasks = Vec::new();
    for c in 0..clients {
        let client = workload::client_from(endpoints, c);
        tasks.push(tokio::spawn(workload::register_client(c, client, load.clone())));
    }
    for c in 0..2 {
        let client = workload::client_from(endpoints, c + 1);
        tasks.push(tokio::spawn(workload::insert_client(c, client, load.clone())));
    }
    for c in 0..2 {
        let client = workload::client_from(endpoints, c + 2);
        tasks.push(tokio::spawn(workload::lease_client(c, client, load.clone())));
        let client = workload::client_from(endpoints, c);
        tasks.push(tokio::spawn(workload::lock_client(client, load.clone())));
    }
    tasks.push(tokio::spawn(workload::compaction_client(workload::client_from(endpoints, 1), load.clone())));
    let watch_until: Arc<Mutex<Option<i64>>> = Default::default();
    let mut watchers = Vec::new();
    for m in 0..MEMBERS {
        let client = workload::client_from(endpoints, m);
        watchers.push(tokio::spawn(workload::watcher(m, client, record.clone(), watch_until.clone())));
    }
    Running { tasks, watchers, watch_until }
}

/// The cluster's revision once healed, by a linearizable read retried for
/// up to about 10 s; `None` if it never answered.
async fn final_revision(cluster: &Cluster) -> Option<i64> {
    for _ in 0..50 {
        let read = cluster.client.range(RangeRequest { key: b"probe".to_vec(), ..Default::default() });
        match tokio::time::timeout(Duration::from_secs(2), read).await {
            Ok(Ok(r)) => return r.header.map(|h| h.revision),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    None
}

/// Reads every member's whole data at `last` and at `compacted` and reports
/// where they differ; returns the first member's data at `last`.
async fn compare_members(
    endpoints: &workload::Endpoints,
    last: i64,
    compacted: i64,
    report: &mut Report,
) -> Vec<kvd::proto::mvccpb::KeyValue> {
    let mut contents = Vec::new();
    for rev in [last, compacted].into_iter().filter(|&r| r > 1) {
        let mut at_rev = Vec::new();
        for m in 0..MEMBERS {
            match workload::contents_at(&endpoints.only(m), rev).await {
                Some(kvs) => at_rev.push(kvs),
                None => report.anomalies.push(format!("m{m} never answered a read at revision {rev}")),
            }
        }
        if at_rev.windows(2).any(|w| w[0] != w[1]) {
            let sizes: Vec<usize> = at_rev.iter().map(|c| c.len()).collect();
            report.anomalies.push(format!("members differ at revision {rev} (keys per member {sizes:?})"));
        }
        if rev == last {
            contents = at_rev.into_iter().next().unwrap_or_default();
        }
    }
    contents
}
