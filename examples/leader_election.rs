//! A replicated service that elects one leader among its replicas with kvd.
//!
//! Run several copies against one cluster; exactly one leads at a time:
//!
//! ```sh
//! cargo run --example leader_election -- --endpoints 127.0.0.1:2379,127.0.0.1:22379 --id replica-1
//! cargo run --example leader_election -- --endpoints 127.0.0.1:2379,127.0.0.1:22379 --id replica-2
//! ```
//!
//! Each replica holds a lease (a session kept alive in the background) and
//! campaigns with it. The winner does the service's work: here, a counter
//! written every `--work-interval-ms`. Every write is fenced: a Txn that
//! succeeds only while the replica's leader key still exists with the create
//! revision it won with (the fencing token). A leader that was paused or cut
//! off past its lease finds its writes refused, and steps down; so does one
//! whose session reports the lease lost. It then campaigns again with a new
//! lease.
//!
//! On SIGINT (Ctrl-C) or SIGTERM a replica resigns and revokes its lease
//! before it exits, so another takes over at once rather than after the TTL.
//!
//! The replica prints one line per event, for people and for tests:
//! `campaigning`, `leader token=<rev>`, `work token=<rev> seq=<n> rev=<r>`,
//! `stepped-down token=<rev> reason=<why>`, and `exiting` last.

use std::time::Duration;

use anyhow::Result;
use clap::Parser;
use kvd::client::{Client, Election, Leadership, Session};
use kvd::proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use kvd::proto::etcdserverpb::request_op::Request as Op;
use kvd::proto::etcdserverpb::{Compare, PutRequest, RequestOp, TxnRequest};

#[derive(Parser)]
struct Args {
    /// Comma-separated kvd (or etcd) client endpoints.
    #[arg(long, default_value = "127.0.0.1:2379")]
    endpoints: String,
    /// This replica's name, proclaimed as the election's value.
    #[arg(long)]
    id: String,
    /// The election's name.
    #[arg(long, default_value = "service-leader")]
    election: String,
    /// The key the leader writes its work to.
    #[arg(long, default_value = "service-work")]
    work_key: String,
    /// Lease TTL in seconds: how long a dead leader blocks the others.
    #[arg(long, default_value_t = 5)]
    ttl: i64,
    /// Milliseconds between two pieces of work.
    #[arg(long, default_value_t = 200)]
    work_interval_ms: u64,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let endpoints: Vec<String> = args.endpoints.split(',').map(|s| s.trim().to_string()).collect();
    let client = Client::new(&endpoints, Duration::from_secs(2)).map_err(anyhow::Error::msg)?;
    let stop = stop_on_signals()?;
    while !*stop.borrow() {
        if let Err(e) = serve_one_term(&client, &args, stop.clone()).await {
            say(&format!("error reason={:?}", e.to_string()));
            let mut stop = stop.clone();
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = stop.wait_for(|s| *s) => {}
            }
        }
    }
    say("exiting");
    Ok(())
}

/// A flag that turns true on the first SIGINT or SIGTERM.
fn stop_on_signals() -> Result<tokio::sync::watch::Receiver<bool>> {
    use tokio::signal::unix::{signal, SignalKind};
    let (tx, rx) = tokio::sync::watch::channel(false);
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        let _ = tx.send(true);
    });
    Ok(rx)
}

/// One turn: take a lease, campaign, lead until leadership is lost or the
/// replica is told to stop.
async fn serve_one_term(client: &Client, args: &Args, mut stop: tokio::sync::watch::Receiver<bool>) -> Result<()> {
    let session = client.session(args.ttl).await?;
    let election = client.election(&args.election, &session);
    say("campaigning");
    let leadership = tokio::select! {
        won = election.campaign(args.id.as_bytes()) => won?,
        _ = session.lost() => {
            say("stepped-down token=0 reason=lease-lost-while-campaigning");
            return Ok(());
        }
        _ = stop.wait_for(|s| *s) => {
            // Revoking the lease deletes the waiting candidate's key too.
            let _ = client.lease_revoke(session.id()).await;
            return Ok(());
        }
    };
    let token = leadership.rev();
    say(&format!("leader token={token}"));
    let why = lead(client, args, &session, &leadership, stop).await;
    say(&format!("stepped-down token={token} reason={why}"));
    resign(&election, leadership, &session, client).await;
    Ok(())
}

/// Does the leader's work until leadership is lost or the replica is told
/// to stop; returns why it ended.
async fn lead(
    client: &Client,
    args: &Args,
    session: &Session,
    leadership: &Leadership,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> &'static str {
    let mut seq = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(args.work_interval_ms));
    loop {
        tokio::select! {
            _ = session.lost() => return "lease-lost",
            _ = stop.wait_for(|s| *s) => return "shutdown",
            _ = tick.tick() => {}
        }
        seq += 1;
        let value = format!("{} token={} seq={seq}", args.id, leadership.rev());
        match client.txn(fenced_put(leadership, &args.work_key, value)).await {
            Ok(resp) if resp.succeeded => {
                let rev = resp.header.map_or(0, |h| h.revision);
                say(&format!("work token={} seq={seq} rev={rev}", leadership.rev()));
            }
            Ok(_) => return "fenced-out",
            // The outcome is unknown (a member went away mid-call): the next
            // fenced write tells whether this replica still leads.
            Err(_) => {}
        }
    }
}

/// A put that succeeds only while `leadership`'s key exists with the create
/// revision it was won with.
fn fenced_put(leadership: &Leadership, key: &str, value: String) -> TxnRequest {
    let still_leader = Compare {
        result: CompareResult::Equal as i32,
        target: CompareTarget::Create as i32,
        key: leadership.key().to_vec(),
        target_union: Some(TargetUnion::CreateRevision(leadership.rev())),
        range_end: Vec::new(),
    };
    let put = PutRequest { key: key.as_bytes().to_vec(), value: value.into_bytes(), ..Default::default() };
    TxnRequest {
        compare: vec![still_leader],
        success: vec![RequestOp { request: Some(Op::RequestPut(put)) }],
        failure: Vec::new(),
    }
}

/// Gives up leadership and the lease, best effort: if the cluster cannot be
/// reached, the lease expires on its own.
async fn resign(election: &Election, leadership: Leadership, session: &Session, client: &Client) {
    let _ = election.resign(leadership).await;
    let _ = client.lease_revoke(session.id()).await;
}

fn say(what: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{what}");
    let _ = out.flush();
}
