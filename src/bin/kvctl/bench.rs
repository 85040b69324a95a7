//! `bench`: a load generator that speaks the etcd v3 API, so it drives kvd
//! and etcd alike. Workloads: `put`, `range` (linearizable or serializable),
//! `txn-put`, `watch-latency` (from a put being sent to its event reaching
//! every watcher of a prefix), and the lease workloads of [`super::bench_lease`]:
//! `lease-keepalive` and `lease-expiry`. Latencies go into an HDR histogram (microsecond
//! resolution, 3 significant digits); the report gives throughput and the
//! p50/p90/p99/p99.9/max latencies, as text or JSON.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use kvd::client::Client;
use kvd::client::Conn;
use kvd::mvcc::keys::prefix_end;
use kvd::proto::etcdserverpb::kv_client::KvClient;
use kvd::proto::etcdserverpb::maintenance_client::MaintenanceClient;
use kvd::proto::etcdserverpb::request_op::Request as Op;
use kvd::proto::etcdserverpb::watch_client::WatchClient;
use kvd::proto::etcdserverpb::watch_request::RequestUnion;
use kvd::proto::etcdserverpb::{
    PutRequest, RangeRequest, RequestOp, StatusRequest, TxnRequest, WatchCreateRequest, WatchRequest,
};
use rand::Rng;
use serde_json::json;
use tokio_stream::wrappers::ReceiverStream;

use crate::output::Format;

/// What `bench` runs.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// Puts of random (or sequential) keys.
    Put,
    /// Ranges over one key (see --consistency).
    Range,
    /// Txns that each put one key.
    TxnPut,
    /// Puts at --rate, timed until their events reach every watcher.
    WatchLatency,
    /// --leases leases kept alive every third of their TTL, as etcd's
    /// clients do: each keep-alive timed until its answer.
    LeaseKeepalive,
    /// --leases leases, a key on each, renewed at once and left to expire
    /// together, while puts go on at --rate: the puts' latencies, and the
    /// time until the last of those keys is gone.
    LeaseExpiry,
}

#[derive(Args)]
pub struct BenchArgs {
    /// The workload.
    #[arg(value_enum)]
    workload: Workload,
    /// gRPC connections, spread over the endpoints.
    #[arg(long, default_value_t = 1)]
    pub(crate) conns: usize,
    /// Concurrent clients, spread over the connections.
    #[arg(long, default_value_t = 1)]
    pub(crate) clients: usize,
    /// Requests in all (for watch-latency: puts).
    #[arg(long, default_value_t = 10_000)]
    pub(crate) total: u64,
    /// Run for this long instead of --total requests (e.g. 10s).
    #[arg(long, value_parser = crate::parse_duration)]
    pub(crate) duration: Option<Duration>,
    /// Key size in bytes.
    #[arg(long, default_value_t = 8)]
    key_size: usize,
    /// Value size in bytes.
    #[arg(long, default_value_t = 8)]
    pub(crate) val_size: usize,
    /// Distinct keys written.
    #[arg(long, default_value_t = 100_000)]
    key_space_size: u64,
    /// Write keys in order instead of at random.
    #[arg(long)]
    sequential_keys: bool,
    /// With --sequential-keys, the number of the first key written, so that
    /// runs one after another write new keys.
    #[arg(long, default_value_t = 0)]
    first_key: u64,
    /// Requests per second in all (0: as fast as possible). watch-latency
    /// puts at 100/s unless this says otherwise.
    #[arg(long, default_value_t = 0)]
    pub(crate) rate: u64,
    /// Range consistency: l (linearizable) or s (serializable).
    #[arg(long, default_value = "l", value_parser = ["l", "s"])]
    consistency: String,
    /// range: read keys a put bench wrote (at random in --key-space-size,
    /// of --key-size) instead of one key written first.
    #[arg(long)]
    written_keys: bool,
    /// Watchers for watch-latency (spread over the connections).
    #[arg(long, default_value_t = 10)]
    pub(crate) watchers: usize,
    /// Watch streams for watch-latency: the watchers are spread over them,
    /// as etcd's clients put many watches on one stream (0: one stream per
    /// watcher).
    #[arg(long, default_value_t = 0)]
    watch_streams: usize,
    /// Keep-alive streams for lease-keepalive, spread over the connections,
    /// the leases shared among them (0: one stream per connection).
    #[arg(long, default_value_t = 0)]
    pub(crate) keepalive_streams: usize,
    /// Leases for the lease workloads.
    #[arg(long, default_value_t = 1000)]
    pub(crate) leases: usize,
    /// The leases' time to live, in seconds.
    #[arg(long, default_value_t = 15)]
    pub(crate) lease_ttl: i64,
    /// No progress lines on stderr.
    #[arg(long)]
    pub(crate) quiet: bool,
}

/// Latencies and counts of one run.
pub(crate) struct Tally {
    pub(crate) latency_us: Histogram<u64>,
    pub(crate) errors: u64,
    pub(crate) first_error: Option<String>,
}

impl Tally {
    pub(crate) fn new() -> Tally {
        // 1 µs to 10 min at 3 significant digits.
        let latency_us = Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds");
        Tally { latency_us, errors: 0, first_error: None }
    }

    pub(crate) fn ok(&mut self, took: Duration) {
        let us = (took.as_micros() as u64).clamp(1, 600_000_000);
        let _ = self.latency_us.record(us);
    }

    pub(crate) fn failed(&mut self, e: impl ToString) {
        self.errors += 1;
        self.first_error.get_or_insert_with(|| e.to_string());
    }

    /// The next message of `stream`; none when it ends, or when it fails,
    /// which counts as an error.
    pub(crate) async fn next_of<T>(&mut self, stream: &mut tonic::Streaming<T>) -> Option<T> {
        match stream.message().await {
            Ok(msg) => msg,
            Err(e) => {
                self.failed(e.message());
                None
            }
        }
    }

    pub(crate) fn merge(&mut self, other: Tally) {
        let _ = self.latency_us.add(&other.latency_us);
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

/// Which request a client sends next, and when to stop.
struct Schedule {
    issued: AtomicU64,
    done: AtomicU64,
    total: u64,
    until: Option<Instant>,
    rate: u64,
    start: Instant,
}

impl Schedule {
    /// The number of the next request, after waiting for its turn under
    /// --rate; `None` when the run is over.
    async fn next(&self) -> Option<u64> {
        let n = self.issued.fetch_add(1, Ordering::Relaxed);
        match self.until {
            Some(until) if Instant::now() >= until => return None,
            None if n >= self.total => return None,
            _ => {}
        }
        if self.rate > 0 {
            let at = self.start + Duration::from_secs_f64(n as f64 / self.rate as f64);
            tokio::time::sleep_until(at.into()).await;
        }
        Some(n)
    }
}

pub async fn run(client: &Client, a: BenchArgs, fmt: Format, dial_timeout: Duration) -> Result<()> {
    if a.conns == 0 || a.clients == 0 {
        bail!("--conns and --clients must be at least 1");
    }
    if a.key_size == 0 || a.key_space_size == 0 {
        bail!("--key-size and --key-space-size must be at least 1");
    }
    let channels = connect(client, a.conns, dial_timeout).await?;
    let start = Instant::now();
    let (tally, requests, extra) = match a.workload {
        Workload::WatchLatency => with_nothing_more(watch_latency(&channels, &a).await?),
        Workload::LeaseKeepalive => super::bench_lease::keepalive(&channels, &a).await?,
        Workload::LeaseExpiry => super::bench_lease::expiry(&channels, &a).await?,
        _ => with_nothing_more(closed_loop(&channels, &a).await?),
    };
    let elapsed = start.elapsed();
    report(&a, fmt, &tally, requests, elapsed, extra);
    if requests > 0 && tally.errors == requests {
        bail!("every request failed: {}", tally.first_error.unwrap_or_default());
    }
    Ok(())
}

fn with_nothing_more((tally, requests): (Tally, u64)) -> (Tally, u64, Vec<(&'static str, serde_json::Value)>) {
    (tally, requests, Vec::new())
}

/// `conns` channels over the endpoints, with the client's TLS settings;
/// each has answered a status request before the run starts, so that an
/// endpoint that cannot be reached is named at once.
async fn connect(client: &Client, conns: usize, dial_timeout: Duration) -> Result<Vec<Conn>> {
    // With --user, every connection carries the token it gets here.
    client.authenticate().await.map_err(|s| anyhow::anyhow!("authenticating: {}", s.message()))?;
    let endpoints = client.endpoints();
    let mut channels = Vec::new();
    for i in 0..conns {
        let endpoint = &endpoints[i % endpoints.len()];
        let channel = kvd::client::channel(endpoint, dial_timeout, client.tls()).map_err(anyhow::Error::msg)?;
        let channel = client.intercept(channel);
        let mut maintenance = MaintenanceClient::new(channel.clone());
        tokio::time::timeout(dial_timeout * 2, maintenance.status(StatusRequest {}))
            .await
            .map_err(|_| anyhow::anyhow!("no answer from {endpoint} within {:?}", dial_timeout * 2))?
            .map_err(|s| anyhow::anyhow!("cannot reach {endpoint}: {}", s.message()))?;
        channels.push(channel);
    }
    Ok(channels)
}

/// The keys a run writes: `size` bytes, the key number in the last (up to)
/// eight, big-endian.
#[derive(Clone, Copy)]
struct Keys {
    sequential: bool,
    first: u64,
    space: u64,
    size: usize,
}

impl Keys {
    fn key(&self, n: u64) -> Vec<u8> {
        let k = if self.sequential {
            self.first.wrapping_add(n % self.space)
        } else {
            rand::thread_rng().gen_range(0..self.space)
        };
        let mut key = vec![b'k'; self.size];
        let take = self.size.min(8);
        key[self.size - take..].copy_from_slice(&k.to_be_bytes()[8 - take..]);
        key
    }
}

const RANGE_KEY: &[u8] = b"kvctl-bench-range";
const WATCH_PREFIX: &[u8] = b"kvctl-bench-watch/";

/// `clients` closed-loop clients, each sending its next request when the
/// previous one is answered (or when --rate allows).
async fn closed_loop(channels: &[Conn], a: &BenchArgs) -> Result<(Tally, u64)> {
    let value = vec![b'v'; a.val_size];
    if a.workload == Workload::Range && !a.written_keys {
        let put = PutRequest { key: RANGE_KEY.to_vec(), value: value.clone(), ..Default::default() };
        KvClient::new(channels[0].clone()).put(put).await.context("writing the key to range over")?;
    }
    let schedule = Arc::new(Schedule {
        issued: AtomicU64::new(0),
        done: AtomicU64::new(0),
        total: a.total,
        until: a.duration.map(|d| Instant::now() + d),
        rate: a.rate,
        start: Instant::now(),
    });
    let progress = (!a.quiet).then(|| tokio::spawn(show_progress(schedule.clone(), a.duration.is_none())));
    let mut tasks = Vec::new();
    for c in 0..a.clients {
        let mut kv = KvClient::new(channels[c % channels.len()].clone());
        let schedule = schedule.clone();
        let workload = a.workload;
        let serializable = a.consistency == "s";
        let written_keys = a.written_keys;
        let keys =
            Keys { sequential: a.sequential_keys, first: a.first_key, space: a.key_space_size, size: a.key_size };
        let value = value.clone();
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::new();
            while let Some(n) = schedule.next().await {
                let sent = Instant::now();
                let result = match workload {
                    Workload::Put => {
                        let req = PutRequest { key: keys.key(n), value: value.clone(), ..Default::default() };
                        kv.put(req).await.map(|_| ())
                    }
                    Workload::TxnPut => {
                        let put = PutRequest { key: keys.key(n), value: value.clone(), ..Default::default() };
                        let req = TxnRequest {
                            compare: Vec::new(),
                            success: vec![RequestOp { request: Some(Op::RequestPut(put)) }],
                            failure: Vec::new(),
                        };
                        kv.txn(req).await.map(|_| ())
                    }
                    // The other workloads do not run in this loop.
                    Workload::Range | Workload::WatchLatency | Workload::LeaseKeepalive | Workload::LeaseExpiry => {
                        let key = if written_keys { keys.key(n) } else { RANGE_KEY.to_vec() };
                        let req = RangeRequest { key, serializable, ..Default::default() };
                        kv.range(req).await.map(|_| ())
                    }
                };
                match result {
                    Ok(()) => tally.ok(sent.elapsed()),
                    Err(e) => tally.failed(e.message()),
                }
                schedule.done.fetch_add(1, Ordering::Relaxed);
            }
            tally
        }));
    }
    let mut tally = Tally::new();
    for t in tasks {
        tally.merge(t.await?);
    }
    if let Some(p) = progress {
        p.abort();
    }
    let requests = schedule.done.load(Ordering::Relaxed);
    Ok((tally, requests))
}

async fn show_progress(schedule: Arc<Schedule>, by_total: bool) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut last = 0;
    loop {
        tick.tick().await;
        let done = schedule.done.load(Ordering::Relaxed);
        let elapsed = schedule.start.elapsed().as_secs();
        if by_total {
            eprintln!("{elapsed:>4}s  {done}/{} requests  {}/s", schedule.total, done - last);
        } else {
            eprintln!("{elapsed:>4}s  {done} requests  {}/s", done - last);
        }
        last = done;
    }
}

/// Puts `total` values at `rate` (100/s by default) to keys under one
/// prefix, watched by `watchers` watches spread over `watch_streams`
/// streams; each event's latency runs from its put being sent to its
/// arrival at a watcher, for every watcher.
async fn watch_latency(channels: &[Conn], a: &BenchArgs) -> Result<(Tally, u64)> {
    let total = a.total;
    let rate = if a.rate == 0 { 100 } else { a.rate };
    let epoch = Instant::now();
    // When each put was sent, in µs since `epoch` (0: not yet).
    let sent_us: Arc<Vec<AtomicU64>> = Arc::new((0..total).map(|_| AtomicU64::new(0)).collect());
    let watchers = a.watchers.max(1);
    let streams = match a.watch_streams {
        0 => watchers,
        n => n.min(watchers),
    };
    let mut tasks = Vec::new();
    for s in 0..streams {
        // This stream's share of the watchers.
        let mine = watchers / streams + usize::from(s < watchers % streams);
        let (tx, rx) = tokio::sync::mpsc::channel(mine.max(1));
        let create = || {
            let create = WatchCreateRequest {
                key: WATCH_PREFIX.to_vec(),
                range_end: prefix_end(WATCH_PREFIX),
                ..Default::default()
            };
            WatchRequest { request_union: Some(RequestUnion::CreateRequest(create)) }
        };
        // The first watch goes before the call is awaited: etcd answers the
        // call only with its first message.
        tx.send(create()).await?;
        let mut stream =
            WatchClient::new(channels[s % channels.len()].clone()).watch(ReceiverStream::new(rx)).await?.into_inner();
        for w in 0..mine {
            if w > 0 {
                tx.send(create()).await?;
            }
            let created = stream.message().await?.context("watch stream closed")?;
            if !created.created || created.canceled {
                bail!("watch not created: {}", created.cancel_reason);
            }
        }
        let sent_us = sent_us.clone();
        let expected = total * mine as u64;
        tasks.push(tokio::spawn(async move {
            let _keep_open = tx;
            let mut tally = Tally::new();
            let mut seen = 0;
            while seen < expected {
                let Some(resp) = tally.next_of(&mut stream).await else { break };
                let now_us = epoch.elapsed().as_micros() as u64;
                for e in resp.events {
                    let Some(kv) = e.kv else { continue };
                    let Some(seq) = kv.value.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes) else {
                        continue;
                    };
                    seen += 1;
                    if let Some(at) = sent_us.get(seq as usize).map(|s| s.load(Ordering::Acquire)) {
                        tally.ok(Duration::from_micros(now_us.saturating_sub(at)));
                    }
                }
            }
            tally
        }));
    }
    let mut kv = KvClient::new(channels[0].clone());
    let mut put_errors = Tally::new();
    let start = Instant::now();
    for seq in 0..total {
        let at = start + Duration::from_secs_f64(seq as f64 / rate as f64);
        tokio::time::sleep_until(at.into()).await;
        let mut value = seq.to_be_bytes().to_vec();
        value.resize(a.val_size.max(8), b'v');
        sent_us[seq as usize].store(epoch.elapsed().as_micros().max(1) as u64, Ordering::Release);
        let mut key = WATCH_PREFIX.to_vec();
        key.extend_from_slice((seq % a.key_space_size).to_string().as_bytes());
        if let Err(e) = kv.put(PutRequest { key, value, ..Default::default() }).await {
            put_errors.failed(e.message());
        }
        if !a.quiet && seq > 0 && seq % rate == 0 {
            eprintln!("{:>4}s  {seq}/{total} puts", start.elapsed().as_secs());
        }
    }
    let mut tally = put_errors;
    let wait = Duration::from_secs(60);
    for w in tasks {
        match tokio::time::timeout(wait, w).await {
            Ok(t) => tally.merge(t?),
            Err(_) => tally.failed("a watcher did not receive every event within 60s of the last put"),
        }
    }
    let events = tally.latency_us.len();
    Ok((tally, events))
}

/// Prints the run's figures; `extra` are those only its workload has.
fn report(
    a: &BenchArgs,
    fmt: Format,
    tally: &Tally,
    requests: u64,
    elapsed: Duration,
    extra: Vec<(&'static str, serde_json::Value)>,
) {
    let name = a.workload.to_possible_value().map(|v| v.get_name().to_string()).unwrap_or_default();
    let h = &tally.latency_us;
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let secs = elapsed.as_secs_f64();
    let ok = h.len();
    let throughput = ok as f64 / secs;
    if fmt == Format::Json {
        let mut v = json!({
            "workload": name,
            "consistency": a.consistency,
            "conns": a.conns,
            "clients": a.clients,
            "requests": requests,
            "errors": tally.errors,
            "first_error": tally.first_error,
            "seconds": secs,
            "throughput": throughput,
            "latency_ms": {
                "mean": h.mean() / 1000.0,
                "p50": ms(0.50), "p90": ms(0.90), "p99": ms(0.99), "p99.9": ms(0.999),
                "max": h.max() as f64 / 1000.0,
            },
        });
        for (name, value) in &extra {
            v[*name] = value.clone();
        }
        outln!("{v}");
        return;
    }
    let unit = match a.workload {
        Workload::WatchLatency => "events",
        Workload::LeaseKeepalive => "keep-alives",
        Workload::LeaseExpiry => "puts",
        _ => "requests",
    };
    outln!("{name}: {ok} {unit} in {secs:.2}s, {throughput:.1}/s, {} errors", tally.errors);
    if let Some(e) = &tally.first_error {
        outln!("first error: {e}");
    }
    outln!(
        "latency ms: p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  mean {:.3}",
        ms(0.5),
        ms(0.9),
        ms(0.99),
        ms(0.999),
        h.max() as f64 / 1000.0,
        h.mean() / 1000.0
    );
    for (name, value) in extra {
        outln!("{name}: {value}");
    }
}

#[cfg(test)]
mod tests {
    use super::Keys;

    #[test]
    fn sequential_keys_start_at_the_first_key_and_end_in_its_big_endian_number() {
        let keys = Keys { sequential: true, first: 1000, space: 10, size: 16 };
        let mut want = vec![b'k'; 8];
        want.extend_from_slice(&1003u64.to_be_bytes());
        assert_eq!(keys.key(3), want);
        // The space wraps before the offset is added: run n writes first..first+space.
        assert_eq!(keys.key(13), want);
        let short = Keys { sequential: true, first: 0x0102, space: 1000, size: 2 };
        assert_eq!(short.key(0), vec![0x01, 0x02]);
    }

    #[test]
    fn random_keys_stay_in_the_key_space() {
        let keys = Keys { sequential: false, first: 0, space: 5, size: 16 };
        for n in 0..200 {
            let k = keys.key(n);
            let number = u64::from_be_bytes(k[8..].try_into().expect("eight bytes"));
            assert!(number < 5, "{number}");
        }
    }
}
