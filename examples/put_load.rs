//! A small put load generator for the first throughput figures: `clients`
//! concurrent writers over `conns` gRPC connections, each putting random
//! keys until `total` puts are done. It speaks the etcd v3 API, so it drives
//! etcd and kvd alike.
//!
//! cargo run --release --example put_load -- --endpoints 127.0.0.1:2379 --clients 64 --conns 8 --total 20000

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use kvd::proto::etcdserverpb::kv_client::KvClient;
use kvd::proto::etcdserverpb::PutRequest;
use rand::Rng;
use tonic::transport::Endpoint;

#[derive(Parser)]
struct Args {
    /// Comma-separated endpoints; connections are spread over them.
    #[arg(long, default_value = "127.0.0.1:2379")]
    endpoints: String,
    #[arg(long, default_value_t = 64)]
    clients: usize,
    #[arg(long, default_value_t = 8)]
    conns: usize,
    #[arg(long, default_value_t = 20_000)]
    total: usize,
    #[arg(long, default_value_t = 8)]
    key_size: usize,
    #[arg(long, default_value_t = 8)]
    val_size: usize,
    #[arg(long, default_value_t = 100_000)]
    key_space: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let eps: Vec<String> = args.endpoints.split(',').map(|e| format!("http://{e}")).collect();
    let mut channels = Vec::new();
    for i in 0..args.conns {
        channels.push(Endpoint::from_shared(eps[i % eps.len()].clone())?.tcp_nodelay(true).connect().await?);
    }
    let done = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..args.clients {
        let mut kv = KvClient::new(channels[c % channels.len()].clone());
        let done = done.clone();
        let (total, key_size, val_size, key_space) = (args.total, args.key_size, args.val_size, args.key_space);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let value = vec![b'v'; val_size];
            while done.fetch_add(1, Ordering::Relaxed) < total {
                let n: u64 = rand::thread_rng().gen_range(0..key_space);
                let mut key = format!("{n:0width$}", width = key_size).into_bytes();
                key.truncate(key_size.max(1));
                let t = Instant::now();
                kv.put(PutRequest { key, value: value.clone(), ..Default::default() }).await?;
                lat.push(t.elapsed());
            }
            anyhow::Ok(lat)
        }));
    }
    let mut lat: Vec<Duration> = Vec::new();
    for t in tasks {
        lat.extend(t.await??);
    }
    let elapsed = start.elapsed();
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    println!(
        "puts={} clients={} conns={} elapsed={:.2}s throughput={:.0}/s p50={:.2}ms p99={:.2}ms max={:.2}ms",
        lat.len(),
        args.clients,
        args.conns,
        elapsed.as_secs_f64(),
        lat.len() as f64 / elapsed.as_secs_f64(),
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        lat[lat.len() - 1].as_secs_f64() * 1e3
    );
    Ok(())
}
