//! `watch`, `lease …`, `lock` and `elect`, with etcdctl's output.

use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use clap::{Args, Subcommand};
use kvd::client::Client;
use kvd::mvcc::keys::prefix_end;
use kvd::proto::etcdserverpb::watch_create_request::FilterType;
use kvd::proto::etcdserverpb::WatchCreateRequest;
use kvd::proto::mvccpb::event::EventType;
use kvd::proto::mvccpb::KeyValue;
use serde_json::json;

use crate::output::{self, Format};

#[derive(Args)]
pub struct WatchArgs {
    /// The key to watch (or the start of the range).
    key: String,
    /// End of the range [key, range_end).
    range_end: Option<String>,
    /// Watch every key with the prefix `key`.
    #[arg(long)]
    prefix: bool,
    /// Start from this revision (0: from now).
    #[arg(long, default_value_t = 0)]
    rev: i64,
    /// Show each event's previous key-value.
    #[arg(long)]
    prev_kv: bool,
    /// Leave out put events.
    #[arg(long)]
    no_put: bool,
    /// Leave out delete events.
    #[arg(long)]
    no_delete: bool,
    /// Ask for periodic progress notifications.
    #[arg(long)]
    progress_notify: bool,
}

/// `watch`: prints events as they come, until interrupted or cancelled.
pub async fn watch(client: &Client, a: WatchArgs, fmt: Format) -> Result<()> {
    let key = a.key.into_bytes();
    let range_end = match (&a.range_end, a.prefix) {
        (Some(_), true) => bail!("`range_end` and `--prefix` are mutually exclusive"),
        (Some(e), false) => e.clone().into_bytes(),
        (None, true) => prefix_end(&key),
        (None, false) => Vec::new(),
    };
    let mut filters = Vec::new();
    if a.no_put {
        filters.push(FilterType::Noput as i32);
    }
    if a.no_delete {
        filters.push(FilterType::Nodelete as i32);
    }
    let req = WatchCreateRequest {
        key,
        range_end,
        start_revision: a.rev,
        prev_kv: a.prev_kv,
        filters,
        progress_notify: a.progress_notify,
        ..Default::default()
    };
    let mut stream = client.watch(req).await?;
    loop {
        let resp = tokio::select! {
            r = stream.next() => r,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let Some(resp) = resp else { return Ok(()) };
        let resp = resp?;
        if resp.canceled {
            if resp.compact_revision != 0 {
                eprintln!("watch was canceled ({})", kvd::error::Error::Compacted);
            } else if !resp.cancel_reason.is_empty() {
                eprintln!("watch was canceled ({})", resp.cancel_reason);
            }
            bail!("watch is canceled by the server");
        }
        if fmt == Format::Json {
            let events: Vec<_> = resp
                .events
                .iter()
                .map(|e| {
                    json!({
                        "type": if e.r#type == EventType::Delete as i32 { "DELETE" } else { "PUT" },
                        "kv": e.kv.as_ref().map(output::kv_json),
                        "prev_kv": e.prev_kv.as_ref().map(output::kv_json),
                    })
                })
                .collect();
            output::print_json(&json!({
                "Header": output::header_json(&resp.header),
                "Events": events,
                "CompactRevision": resp.compact_revision,
                "Canceled": resp.canceled,
                "Created": resp.created,
            }));
            continue;
        }
        for e in &resp.events {
            outln!("{}", if e.r#type == EventType::Delete as i32 { "DELETE" } else { "PUT" });
            if let Some(prev) = &e.prev_kv {
                output::print_kv(prev, false);
            }
            if let Some(kv) = &e.kv {
                output::print_kv(kv, false);
            }
        }
    }
}

/// Lease commands.
#[derive(Subcommand)]
pub enum LeaseCommand {
    /// Creates a lease with a TTL in seconds.
    Grant {
        /// TTL in seconds.
        ttl: i64,
    },
    /// Revokes a lease (and deletes its keys).
    Revoke {
        /// Lease ID in hex.
        id: String,
    },
    /// Shows a lease's remaining TTL.
    Timetolive {
        /// Lease ID in hex.
        id: String,
        /// Also list the attached keys.
        #[arg(long)]
        keys: bool,
    },
    /// Lists all active leases.
    List,
    /// Keeps a lease alive.
    KeepAlive {
        /// Lease ID in hex.
        id: String,
        /// Renew once and exit.
        #[arg(long)]
        once: bool,
    },
}

fn lease_id(s: &str) -> Result<i64> {
    u64::from_str_radix(s.trim_start_matches("0x"), 16)
        .map(|v| v as i64)
        .map_err(|_| anyhow!("bad lease ID arg ({s:?}), expecting ID in Hex"))
}

/// Whether a lease command runs until interrupted (no command timeout).
pub fn lease_is_long_running(cmd: &LeaseCommand) -> bool {
    matches!(cmd, LeaseCommand::KeepAlive { once: false, .. })
}

/// `lease …`.
pub async fn lease(client: &Client, cmd: LeaseCommand, fmt: Format) -> Result<()> {
    match cmd {
        LeaseCommand::Grant { ttl } => {
            let r = client
                .lease_grant(ttl, 0)
                .await
                .map_err(|s| anyhow!("failed to grant lease ({})", client.explain(&s)))?;
            if fmt == Format::Json {
                output::print_json(&json!({"header": output::header_json(&r.header), "ID": r.id, "TTL": r.ttl}));
            } else {
                outln!("lease {:016x} granted with TTL({}s)", r.id, r.ttl);
            }
        }
        LeaseCommand::Revoke { id } => {
            let id = lease_id(&id)?;
            let r = client
                .lease_revoke(id)
                .await
                .map_err(|s| anyhow!("failed to revoke lease ({})", client.explain(&s)))?;
            if fmt == Format::Json {
                output::print_json(&json!({"header": output::header_json(&r.header)}));
            } else {
                outln!("lease {id:016x} revoked");
            }
        }
        LeaseCommand::Timetolive { id, keys } => {
            let id = lease_id(&id)?;
            let r = client.lease_time_to_live(id, keys).await?;
            if fmt == Format::Json {
                output::print_json(&json!({
                    "header": output::header_json(&r.header), "ID": r.id, "TTL": r.ttl, "granted-ttl": r.granted_ttl,
                    "keys": r.keys.iter().map(|k| output::b64(k)).collect::<Vec<_>>(),
                }));
            } else if r.ttl == -1 {
                outln!("lease {id:016x} already expired");
            } else {
                let mut line = format!("lease {id:016x} granted with TTL({}s), remaining({}s)", r.granted_ttl, r.ttl);
                if keys {
                    let names: Vec<String> = r.keys.iter().map(|k| String::from_utf8_lossy(k).into_owned()).collect();
                    line.push_str(&format!(", attached keys([{}])", names.join(" ")));
                }
                outln!("{line}");
            }
        }
        LeaseCommand::List => {
            let r = client.lease_leases().await?;
            if fmt == Format::Json {
                let ids: Vec<_> = r.leases.iter().map(|l| json!({"ID": l.id})).collect();
                output::print_json(&json!({"header": output::header_json(&r.header), "leases": ids}));
            } else {
                outln!("found {} leases", r.leases.len());
                for l in &r.leases {
                    outln!("{:016x}", l.id);
                }
            }
        }
        LeaseCommand::KeepAlive { id, once } => {
            let id = lease_id(&id)?;
            loop {
                let ttl = client.lease_keep_alive_once(id).await?;
                if ttl <= 0 {
                    outln!("lease {id:016x} expired or revoked.");
                    return Ok(());
                }
                outln!("lease {id:016x} keepalived with TTL({ttl})");
                if once {
                    return Ok(());
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis((ttl as u64 * 1000 / 3).max(500))) => {}
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                }
            }
        }
    }
    Ok(())
}

#[derive(Args)]
pub struct LockArgs {
    /// The lock's name.
    name: String,
    /// A command to run while holding the lock; without one, kvctl holds the
    /// lock until interrupted.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
    /// TTL of the session's lease, in seconds.
    #[arg(long, default_value_t = 60)]
    ttl: i64,
}

async fn interrupted() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// `lock NAME [COMMAND…]`: takes the lock, prints its key and fencing token
/// (or runs the command with them in `KVCTL_LOCK_KEY`/`ETCD_LOCK_KEY` and
/// `KVCTL_LOCK_REV`/`ETCD_LOCK_REV`), and releases it.
pub async fn lock(client: &Client, a: LockArgs) -> Result<()> {
    let session = client.session(a.ttl).await?;
    let lock = client.lock_handle(&a.name, &session);
    let guard = tokio::select! {
        g = lock.lock() => match g {
            Ok(g) => g,
            Err(e) => {
                // Its lease goes with it, so that no key of this attempt
                // stays behind to hold up the next one.
                let _ = session.close(client).await;
                return Err(e.into());
            }
        },
        _ = interrupted() => {
            let _ = session.close(client).await;
            return Ok(());
        }
    };
    let key = String::from_utf8_lossy(&guard.key).into_owned();
    let result = if a.command.is_empty() {
        outln!("{key}");
        outln!("fencing token: {}", guard.rev);
        tokio::select! {
            _ = interrupted() => Ok(()),
            _ = session.lost() => Err(anyhow!("session expired: the lock is no longer held")),
        }
    } else {
        let spawned = tokio::process::Command::new(&a.command[0])
            .args(&a.command[1..])
            .env("KVCTL_LOCK_KEY", &key)
            .env("KVCTL_LOCK_REV", guard.rev.to_string())
            .env("ETCD_LOCK_KEY", &key)
            .env("ETCD_LOCK_REV", guard.rev.to_string())
            .spawn();
        // A command that cannot start still releases the lock below.
        match spawned {
            Err(e) => Err(anyhow!("cannot run {:?}: {e}", a.command[0])),
            Ok(mut child) => tokio::select! {
                status = child.wait() => match status {
                    Ok(s) if s.success() => Ok(()),
                    Ok(s) => Err(anyhow!("command {:?} exited with {s}", a.command[0])),
                    Err(e) => Err(anyhow!("waiting for {:?}: {e}", a.command[0])),
                },
                _ = session.lost() => {
                    let _ = child.kill().await;
                    Err(anyhow!("session expired: the lock was lost while the command ran"))
                }
            },
        }
    };
    let _ = lock.unlock(guard).await;
    let _ = session.close(client).await;
    result
}

#[derive(Args)]
pub struct ElectArgs {
    /// The election's name.
    name: String,
    /// The value to proclaim once elected (campaigning needs one).
    proposal: Option<String>,
    /// Observe the election's leaders instead of campaigning.
    #[arg(short = 'l', long)]
    listen: bool,
    /// TTL of the session's lease, in seconds.
    #[arg(long, default_value_t = 60)]
    ttl: i64,
}

fn print_leader(kv: &KeyValue, rev: Option<i64>) {
    output::print_kv(kv, false);
    if let Some(rev) = rev {
        outln!("fencing token: {rev}");
    }
}

/// `elect NAME PROPOSAL` campaigns and, once elected, holds leadership until
/// interrupted; `elect -l NAME` prints each leader as it changes.
pub async fn elect(client: &Client, a: ElectArgs) -> Result<()> {
    if a.listen {
        let mut stream = client.observe(a.name.as_bytes()).await?;
        loop {
            let msg = tokio::select! {
                m = stream.message() => m?,
                _ = interrupted() => return Ok(()),
            };
            let Some(resp) = msg else { bail!("observe stream ended") };
            if let Some(kv) = &resp.kv {
                print_leader(kv, None);
            }
        }
    }
    let Some(proposal) = a.proposal else { bail!("elect takes one election name argument and one proposal argument") };
    let session = client.session(a.ttl).await?;
    let election = client.election(&a.name, &session);
    let leadership = tokio::select! {
        l = election.campaign(proposal.as_bytes()) => l?,
        _ = interrupted() => {
            let _ = session.close(client).await;
            return Ok(());
        }
    };
    let kv = KeyValue {
        key: leadership.key().to_vec(),
        value: proposal.into_bytes(),
        create_revision: leadership.rev(),
        ..Default::default()
    };
    print_leader(&kv, Some(leadership.rev()));
    let result = tokio::select! {
        _ = interrupted() => Ok(()),
        _ = session.lost() => Err(anyhow!("session expired: leadership is lost")),
    };
    let _ = election.resign(leadership).await;
    let _ = session.close(client).await;
    result
}
