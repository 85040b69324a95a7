//! The lease workloads of `bench`: many leases kept alive, and many leases
//! expiring at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kvd::client::Conn;
use kvd::proto::etcdserverpb::kv_client::KvClient;
use kvd::proto::etcdserverpb::lease_client::LeaseClient;
use kvd::proto::etcdserverpb::{LeaseGrantRequest, LeaseKeepAliveRequest, PutRequest, RangeRequest};
use serde_json::json;
use tokio_stream::wrappers::ReceiverStream;

use kvd::mvcc::keys::prefix_end;

use super::bench::{BenchArgs, Tally};

/// Where `lease-expiry` puts the key of each lease.
const LEASED_PREFIX: &[u8] = b"kvctl-bench-lease/";
/// Where `lease-expiry` puts while the leases expire.
const PUT_PREFIX: &[u8] = b"kvctl-bench-lease-put/";

/// Grants `a.leases` leases of `a.lease_ttl` seconds from `a.clients`
/// clients; with `key_on_each`, also puts a key on each. Each lease granted
/// is handed to `warm`, when given.
async fn grant(channels: &[Conn], a: &BenchArgs, key_on_each: bool, warm: Option<&Arc<Warm>>) -> Result<Vec<i64>> {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..a.clients {
        let channel = channels[c % channels.len()].clone();
        let (next, n, ttl) = (next.clone(), a.leases as u64, a.lease_ttl);
        let warm = warm.cloned();
        tasks.push(tokio::spawn(async move {
            let (mut lease, mut kv) = (LeaseClient::new(channel.clone()), KvClient::new(channel));
            let mut ids = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, anyhow::Error>(ids);
                }
                let id = lease.lease_grant(LeaseGrantRequest { ttl, id: 0 }).await.context("lease grant")?.into_inner();
                if !id.error.is_empty() {
                    bail!("lease grant: {}", id.error);
                }
                if key_on_each {
                    let mut key = LEASED_PREFIX.to_vec();
                    key.extend_from_slice(i.to_string().as_bytes());
                    kv.put(PutRequest { key, value: b"x".to_vec(), lease: id.id, ..Default::default() })
                        .await
                        .context("put with a lease")?;
                }
                if let Some(warm) = &warm {
                    warm.granted(id.id);
                }
                ids.push(id.id);
            }
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.extend(t.await??);
    }
    if !a.quiet {
        eprintln!("granted {} leases of {} s", ids.len(), a.lease_ttl);
    }
    Ok(ids)
}

/// Keeps the leases granted so far alive while the others are granted, each
/// once a period, untimed: granting 100,000 leases can take longer than
/// their TTL, and a client keeps a lease alive from its grant on.
pub(crate) struct Warm {
    /// Each lease granted, and when it was granted or last kept alive.
    leases: std::sync::Mutex<Vec<(i64, Instant)>>,
    stop: std::sync::atomic::AtomicBool,
}

impl Warm {
    fn granted(&self, id: i64) {
        self.leases.lock().unwrap_or_else(|p| p.into_inner()).push((id, Instant::now()));
    }

    /// Keeps the leases alive on one stream per channel, every `period`,
    /// until [`Warm::stop`]; the answers are read and dropped.
    fn start(channels: &[Conn], period: Duration) -> (Arc<Warm>, tokio::task::JoinHandle<()>) {
        let warm = Arc::new(Warm { leases: Default::default(), stop: Default::default() });
        let (theirs, channels) = (warm.clone(), channels.to_vec());
        let task = tokio::spawn(async move {
            let mut streams = Vec::new();
            let mut readers = Vec::new();
            for channel in channels {
                let (tx, rx) = tokio::sync::mpsc::channel::<LeaseKeepAliveRequest>(1024);
                streams.push(tx);
                readers.push(tokio::spawn(async move {
                    if let Ok(answers) = LeaseClient::new(channel).lease_keep_alive(ReceiverStream::new(rx)).await {
                        let mut answers = answers.into_inner();
                        while let Ok(Some(_)) = answers.message().await {}
                    }
                }));
            }
            let mut next = 0usize;
            while !theirs.stop.load(Ordering::Relaxed) {
                let now = Instant::now();
                let due: Vec<i64> = {
                    let mut leases = theirs.leases.lock().unwrap_or_else(|p| p.into_inner());
                    leases
                        .iter_mut()
                        .filter(|(_, last)| now.duration_since(*last) >= period)
                        .map(|(id, last)| {
                            *last = now;
                            *id
                        })
                        .collect()
                };
                for id in due {
                    next = (next + 1) % streams.len();
                    if streams[next].send(LeaseKeepAliveRequest { id }).await.is_err() {
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            drop(streams);
            for r in readers {
                let _ = tokio::time::timeout(Duration::from_secs(5), r).await;
            }
        });
        (warm, task)
    }

    /// Stops keeping the leases alive; the measured keep-alives take over.
    async fn stop(&self, task: tokio::task::JoinHandle<()>) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = task.await;
    }
}

/// One keep-alive stream: sends a keep-alive for each of `ids` whenever
/// `due` says, and times each from its request to its answer. An answer
/// with a TTL of 0 (the lease is gone) counts as an error.
struct KeepAlives {
    tx: tokio::sync::mpsc::Sender<LeaseKeepAliveRequest>,
    /// When each lease's last keep-alive was sent, in µs since `epoch`.
    sent_us: Arc<Vec<AtomicU64>>,
    sent: u64,
    epoch: Instant,
    answers: tokio::task::JoinHandle<Tally>,
    /// Answers received, for those that wait for a round's.
    answered: Arc<AtomicU64>,
}

impl KeepAlives {
    fn open(channel: Conn, ids: &[i64], epoch: Instant) -> KeepAlives {
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        let index: HashMap<i64, usize> = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
        let sent_us: Arc<Vec<AtomicU64>> = Arc::new(ids.iter().map(|_| AtomicU64::new(0)).collect());
        let answered = Arc::new(AtomicU64::new(0));
        let (theirs, counted) = (sent_us.clone(), answered.clone());
        let answers = tokio::spawn(async move {
            let mut tally = Tally::new();
            // The call is answered once the first keep-alive is sent: etcd
            // sends no headers before its first answer.
            let mut stream = match LeaseClient::new(channel).lease_keep_alive(ReceiverStream::new(rx)).await {
                Ok(s) => s.into_inner(),
                Err(e) => {
                    tally.failed(e.message());
                    return tally;
                }
            };
            loop {
                let Some(resp) = tally.next_of(&mut stream).await else { break };
                let now_us = epoch.elapsed().as_micros() as u64;
                match index.get(&resp.id) {
                    Some(_) if resp.ttl <= 0 => tally.failed(format!("lease {:x} expired while kept alive", resp.id)),
                    Some(i) => {
                        tally.ok(Duration::from_micros(now_us.saturating_sub(theirs[*i].load(Ordering::Acquire))))
                    }
                    None => tally.failed(format!("an answer for lease {:x}, which was not kept alive", resp.id)),
                }
                counted.fetch_add(1, Ordering::Relaxed);
            }
            tally
        });
        KeepAlives { tx, sent_us, sent: 0, epoch, answers, answered }
    }

    async fn send(&mut self, i: usize, id: i64) -> Result<()> {
        self.sent_us[i].store(self.epoch.elapsed().as_micros().max(1) as u64, Ordering::Release);
        self.tx.send(LeaseKeepAliveRequest { id }).await.context("keep-alive stream closed")?;
        self.sent += 1;
        Ok(())
    }

    /// Ends the stream once every answer is in (or `wait` has passed).
    async fn finish(self, wait: Duration) -> Result<(Tally, u64)> {
        let deadline = Instant::now() + wait;
        while self.answered.load(Ordering::Relaxed) < self.sent && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(self.tx);
        let mut tally = match tokio::time::timeout(Duration::from_secs(5), self.answers).await {
            Ok(t) => t?,
            Err(_) => Tally::new(),
        };
        let missing = self.sent.saturating_sub(self.answered.load(Ordering::Relaxed));
        for _ in 0..missing {
            tally.failed(format!("no answer within {wait:?}"));
        }
        Ok((tally, self.sent))
    }
}

/// The leases of stream `s` of `streams`: every `streams`-th one.
fn share(ids: &[i64], s: usize, streams: usize) -> Vec<i64> {
    ids.iter().skip(s).step_by(streams).copied().collect()
}

/// Grants `a.leases` leases and keeps each alive every third of its TTL,
/// as etcd's clients do, the leases' turns spread evenly over the period,
/// on --keepalive-streams streams (one per connection by default), for
/// --duration (30 s by default). Each
/// keep-alive is timed from its request to its answer. While the leases are
/// granted, those granted already are kept alive untimed ([`Warm`]).
pub async fn keepalive(
    channels: &[Conn],
    a: &BenchArgs,
) -> Result<(Tally, u64, Vec<(&'static str, serde_json::Value)>)> {
    if a.lease_ttl < 3 {
        bail!("--lease-ttl must be at least 3 seconds");
    }
    let period = Duration::from_secs_f64(a.lease_ttl as f64 / 3.0);
    let (warm, warming) = Warm::start(channels, period);
    let granted = grant(channels, a, false, Some(&warm)).await;
    warm.stop(warming).await;
    let ids = granted?;
    let run = a.duration.unwrap_or(Duration::from_secs(30));
    let epoch = Instant::now();
    let mut tasks = Vec::new();
    let streams = match a.keepalive_streams {
        0 => channels.len(),
        n => n,
    };
    for s in 0..streams {
        let mine = share(&ids, s, streams);
        let mut stream = KeepAlives::open(channels[s % channels.len()].clone(), &mine, epoch);
        tasks.push(tokio::spawn(async move {
            let start = Instant::now();
            let n = mine.len().max(1) as f64;
            // Lease i of this stream is renewed at i/n of each period:
            // renewals go out in small bursts, every millisecond.
            'rounds: for round in 0u32.. {
                let begun = start + period * round;
                for (i, id) in mine.iter().enumerate() {
                    let at = begun + period.mul_f64(i as f64 / n);
                    if at >= start + run {
                        break 'rounds;
                    }
                    if at > Instant::now() + Duration::from_millis(1) {
                        tokio::time::sleep_until(at.into()).await;
                    }
                    stream.send(i, *id).await?;
                }
            }
            stream.finish(Duration::from_secs(10)).await
        }));
    }
    let mut tally = Tally::new();
    let mut sent = 0;
    for t in tasks {
        let (t, n) = t.await??;
        tally.merge(t);
        sent += n;
    }
    // The run's throughput counts the grants' time too; these do not.
    let secs = epoch.elapsed().as_secs_f64();
    let extra = vec![
        ("leases", json!(ids.len())),
        ("lease_ttl_s", json!(a.lease_ttl)),
        ("keepalive_seconds", json!(secs)),
        ("offered_per_s", json!(ids.len() as f64 / period.as_secs_f64())),
        ("answered_per_s", json!(tally.latency_us.len() as f64 / secs)),
    ];
    Ok((tally, sent, extra))
}

/// Grants `a.leases` leases with a key on each (keeping those granted alive
/// while the rest are granted), renews them all at once so
/// that they expire within the same moment, and puts at --rate (200/s by
/// default) to other keys until the last leased key is gone and a second
/// more. The tally is the puts'; also returns how long the keys took to go
/// after the leases' TTL ran out.
pub async fn expiry(channels: &[Conn], a: &BenchArgs) -> Result<(Tally, u64, Vec<(&'static str, serde_json::Value)>)> {
    // Kept alive from its grant on, as a client does: on a busy machine
    // granting them all can take longer than their TTL.
    let (warm, warming) = Warm::start(channels, Duration::from_secs_f64(a.lease_ttl.max(3) as f64 / 3.0));
    let granted = grant(channels, a, true, Some(&warm)).await;
    warm.stop(warming).await;
    let ids = granted?;
    // One round of keep-alives, all at once: each lease's TTL starts again.
    let epoch = Instant::now();
    let mut rounds = Vec::new();
    for (s, channel) in channels.iter().enumerate() {
        let mine = share(&ids, s, channels.len());
        let mut stream = KeepAlives::open(channel.clone(), &mine, epoch);
        rounds.push(tokio::spawn(async move {
            for (i, id) in mine.iter().enumerate() {
                stream.send(i, *id).await?;
            }
            stream.finish(Duration::from_secs(30)).await
        }));
    }
    let mut renewed = Tally::new();
    for r in rounds {
        renewed.merge(r.await??.0);
    }
    if renewed.errors > 0 {
        bail!(
            "{} of the leases could not be renewed (a longer --lease-ttl gives the grants more time): {}",
            renewed.errors,
            renewed.first_error.unwrap_or_default()
        );
    }
    let renewed_at = Instant::now();
    let expire_at = renewed_at + Duration::from_secs(a.lease_ttl.max(0) as u64);
    if !a.quiet {
        eprintln!("renewed {} leases in {:?}; they expire in {} s", ids.len(), renewed_at - epoch, a.lease_ttl);
    }

    // Puts at the rate asked, from the renewal until a second after the keys are gone.
    let rate = if a.rate == 0 { 200 } else { a.rate };
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (theirs, channel, val_size) = (stop.clone(), channels[0].clone(), a.val_size);
    let puts = tokio::spawn(async move {
        let mut kv = KvClient::new(channel);
        let (mut tally, mut n) = (Tally::new(), 0u64);
        let start = Instant::now();
        while !theirs.load(Ordering::Relaxed) {
            tokio::time::sleep_until((start + Duration::from_secs_f64(n as f64 / rate as f64)).into()).await;
            let mut key = PUT_PREFIX.to_vec();
            key.extend_from_slice((n % 1000).to_string().as_bytes());
            let sent = Instant::now();
            match kv.put(PutRequest { key, value: vec![b'v'; val_size], ..Default::default() }).await {
                Ok(_) => tally.ok(sent.elapsed()),
                Err(e) => tally.failed(e.message()),
            }
            n += 1;
        }
        (tally, n)
    });

    // The leased keys, counted every 50 ms until none is left.
    let mut kv = KvClient::new(channels[channels.len() - 1].clone());
    let count = RangeRequest {
        key: LEASED_PREFIX.to_vec(),
        range_end: prefix_end(LEASED_PREFIX),
        count_only: true,
        ..Default::default()
    };
    let give_up = expire_at + Duration::from_secs(300);
    let mut last_seen = None;
    let gone_at = loop {
        let left = kv.range(count.clone()).await.context("counting the leased keys")?.into_inner().count;
        let now = Instant::now();
        if left == 0 {
            break now;
        }
        if now > give_up {
            stop.store(true, Ordering::Relaxed);
            bail!("{left} leased keys were still there 300 s after their leases' TTL ran out");
        }
        if !a.quiet && last_seen != Some(left) && now > expire_at {
            eprintln!("{:>6} ms after the TTL: {left} leased keys left", (now - expire_at).as_millis());
        }
        last_seen = Some(left);
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let (tally, n) = puts.await?;
    let drain_ms = (gone_at.saturating_duration_since(expire_at)).as_secs_f64() * 1000.0;
    let extra = vec![
        ("leases", json!(ids.len())),
        ("lease_ttl_s", json!(a.lease_ttl)),
        ("keys_gone_after_ttl_ms", json!(drain_ms)),
    ];
    Ok((tally, n, extra))
}
