//! `member list`, `endpoint status` and `endpoint health`.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Subcommand;
use kvd::client::{endpoint_url, Client};
use serde_json::json;

use crate::output::{self, Format};

/// Membership commands.
#[derive(Subcommand)]
pub enum MemberCommand {
    /// Lists all members in the cluster.
    List,
    /// Adds a member into the cluster, and prints the settings it must start with.
    Add {
        /// The new member's name (its --name).
        name: String,
        /// The new member's peer URL.
        #[arg(long = "peer-urls", required = true)]
        peer_urls: String,
        /// Add it as a learner, which gets the log but does not vote.
        #[arg(long)]
        learner: bool,
    },
    /// Removes a member from the cluster.
    Remove {
        /// The member's ID, in hex.
        id: String,
    },
    /// Updates a member's peer URL.
    Update {
        /// The member's ID, in hex.
        id: String,
        /// The new peer URL.
        #[arg(long = "peer-urls", required = true)]
        peer_urls: String,
    },
    /// Promotes a learner that has caught up to a voting member.
    Promote {
        /// The learner's ID, in hex.
        id: String,
    },
}

/// A member ID argument, in hex as etcdctl takes it.
fn member_id(arg: &str) -> Result<u64> {
    u64::from_str_radix(arg, 16)
        .map_err(|_| anyhow::anyhow!("bad member ID arg (parsing {arg:?}: invalid syntax), expecting ID in Hex"))
}

fn urls(arg: &str) -> Vec<String> {
    arg.split(',').map(|u| u.trim().to_string()).filter(|u| !u.is_empty()).collect()
}

/// Endpoint commands.
#[derive(Subcommand)]
pub enum EndpointCommand {
    /// Prints the status of each endpoint.
    Status {
        /// Use all members' client URLs instead of --endpoints.
        #[arg(long)]
        cluster: bool,
    },
    /// Checks the health of each endpoint.
    Health {
        /// Use all members' client URLs instead of --endpoints.
        #[arg(long)]
        cluster: bool,
    },
    /// Prints each endpoint's hash of its history up to a revision.
    Hashkv {
        /// Use all members' client URLs instead of --endpoints.
        #[arg(long)]
        cluster: bool,
        /// The revision to hash up to (0: the latest).
        #[arg(long, default_value_t = 0)]
        rev: i64,
    },
}

/// Alarm commands.
#[derive(Subcommand)]
pub enum AlarmCommand {
    /// Lists the raised alarms.
    List,
    /// Disarms every raised alarm.
    Disarm,
}

/// `alarm list` and `alarm disarm`, printed as etcdctl prints them (the
/// alarm in protobuf's text form, trailing space included). Disarm lists
/// the alarms and clears each, as etcd's client does.
pub async fn alarm(client: &Client, cmd: AlarmCommand) -> Result<()> {
    use kvd::proto::etcdserverpb::alarm_request::AlarmAction;
    use kvd::proto::etcdserverpb::{AlarmRequest, AlarmType};
    let list = AlarmRequest { action: AlarmAction::Get as i32, member_id: 0, alarm: AlarmType::None as i32 };
    let mut alarms = client.alarm(list).await?.alarms;
    if let AlarmCommand::Disarm = cmd {
        let mut cleared = Vec::new();
        for a in alarms {
            let req = AlarmRequest { action: AlarmAction::Deactivate as i32, member_id: a.member_id, alarm: a.alarm };
            cleared.extend(client.alarm(req).await?.alarms);
        }
        alarms = cleared;
    }
    for a in alarms {
        let name = AlarmType::try_from(a.alarm).map_or_else(|_| a.alarm.to_string(), |t| t.as_str_name().to_string());
        outln!("memberID:{} alarm:{name} ", a.member_id);
    }
    Ok(())
}

/// `defrag`: each endpoint in turn, as etcdctl does.
pub async fn defrag(client: &Client, cluster: bool, timeout: Duration) -> Result<()> {
    let each = targets(client, cluster, timeout).await?;
    let mut failed = false;
    for (i, ep) in each.endpoints().iter().enumerate() {
        match each.defragment_of(i).await {
            Ok(_) => outln!("Finished defragmenting etcd member[{}]", display(ep)),
            Err(e) => {
                eprintln!("Failed to defragment etcd member[{}] ({})", display(ep), e.message());
                failed = true;
            }
        }
    }
    if failed {
        bail!("defragment failed on some endpoints");
    }
    Ok(())
}

/// `member list|add|remove|update|promote`, with etcdctl's output.
pub async fn member(client: &Client, cmd: MemberCommand, fmt: Format) -> Result<()> {
    let cluster = |h: &Option<kvd::proto::etcdserverpb::ResponseHeader>| h.as_ref().map_or(0, |h| h.cluster_id);
    match cmd {
        MemberCommand::List => member_list(client, fmt).await,
        MemberCommand::Add { name, peer_urls, learner } => {
            let resp = client.member_add(urls(&peer_urls), learner).await?;
            let added = resp.member.clone().unwrap_or_default();
            if fmt == Format::Json {
                output::print_json(
                    &json!({"header": output::header_json(&resp.header), "member": member_json(&added)}),
                );
                return Ok(());
            }
            outln!("Member {:16x} added to cluster {:16x}", added.id, cluster(&resp.header));
            let initial: Vec<String> = resp
                .members
                .iter()
                .flat_map(|m| {
                    let n = if m.id == added.id { name.clone() } else { m.name.clone() };
                    m.peer_ur_ls.iter().map(move |u| format!("{n}={u}")).collect::<Vec<_>>()
                })
                .collect();
            let advertise = added.peer_ur_ls.join(",");
            outln!();
            for prefix in ["ETCD", "KVD"] {
                outln!("{prefix}_NAME={name:?}");
                outln!("{prefix}_INITIAL_CLUSTER={:?}", initial.join(","));
                outln!("{prefix}_INITIAL_ADVERTISE_PEER_URLS={advertise:?}");
                outln!("{prefix}_INITIAL_CLUSTER_STATE=\"existing\"");
            }
            Ok(())
        }
        MemberCommand::Remove { id } => {
            let id = member_id(&id)?;
            let resp = client.member_remove(id).await?;
            outln!("Member {id:16x} removed from cluster {:16x}", cluster(&resp.header));
            Ok(())
        }
        MemberCommand::Update { id, peer_urls } => {
            let id = member_id(&id)?;
            let resp = client.member_update(id, urls(&peer_urls)).await?;
            outln!("Member {id:16x} updated in cluster {:16x}", cluster(&resp.header));
            Ok(())
        }
        MemberCommand::Promote { id } => {
            let id = member_id(&id)?;
            let resp = client.member_promote(id).await?;
            outln!("Member {id:16x} promoted in cluster {:16x}", cluster(&resp.header));
            Ok(())
        }
    }
}

fn member_json(m: &kvd::proto::etcdserverpb::Member) -> serde_json::Value {
    json!({"ID": m.id, "name": m.name, "peerURLs": m.peer_ur_ls, "clientURLs": m.client_ur_ls, "isLearner": m.is_learner})
}

/// `move-leader ID`: finds the leader among the endpoints and asks it to
/// hand its leadership over, as etcdctl does.
pub async fn move_leader(client: &Client, transferee: &str) -> Result<()> {
    let target = member_id(transferee)?;
    for (i, endpoint) in client.endpoints().iter().enumerate() {
        let Ok(status) = client.status_of(i).await else { continue };
        let me = status.header.as_ref().map_or(0, |h| h.member_id);
        if status.leader != me {
            continue;
        }
        let leader =
            client.for_endpoints(std::slice::from_ref(endpoint), Duration::from_secs(2)).map_err(anyhow::Error::msg)?;
        leader.move_leader(target).await?;
        outln!("Leadership transferred from {me:x} to {target:x}");
        return Ok(());
    }
    bail!("no leader endpoint given at {:?}", client.endpoints())
}

/// `member list`.
async fn member_list(client: &Client, fmt: Format) -> Result<()> {
    let resp = client.member_list().await?;
    let rows: Vec<Vec<String>> = resp
        .members
        .iter()
        .map(|m| {
            vec![
                format!("{:x}", m.id),
                if m.name.is_empty() { "unstarted" } else { "started" }.to_string(),
                m.name.clone(),
                m.peer_ur_ls.join(","),
                m.client_ur_ls.join(","),
                m.is_learner.to_string(),
            ]
        })
        .collect();
    match fmt {
        Format::Simple => rows.iter().for_each(|r| outln!("{}", r.join(", "))),
        Format::Table => {
            output::print_table(&["ID", "STATUS", "NAME", "PEER ADDRS", "CLIENT ADDRS", "IS LEARNER"], &rows)
        }
        Format::Json => {
            let members: Vec<_> = resp.members.iter().map(member_json).collect();
            output::print_json(&json!({"header": output::header_json(&resp.header), "members": members}));
        }
    }
    Ok(())
}

async fn targets(client: &Client, cluster: bool, dial: Duration) -> Result<Client> {
    let endpoints: Vec<String> = if cluster {
        client.member_list().await?.members.iter().flat_map(|m| m.client_ur_ls.clone()).collect()
    } else {
        client.endpoints().to_vec()
    };
    client.for_endpoints(&endpoints, dial).map_err(anyhow::Error::msg)
}

fn display(endpoint: &str) -> String {
    let url = endpoint_url(endpoint);
    url.trim_start_matches("http://").trim_start_matches("https://").to_string()
}

/// `endpoint status`, `endpoint health` and `endpoint hashkv`.
pub async fn endpoint(client: &Client, cmd: EndpointCommand, fmt: Format, timeout: Duration) -> Result<()> {
    match cmd {
        EndpointCommand::Hashkv { cluster, rev } => {
            let each = targets(client, cluster, timeout).await?;
            let mut rows = Vec::new();
            for (i, ep) in each.endpoints().iter().enumerate() {
                match each.hash_kv_of(i, rev).await {
                    Ok(h) => rows.push(vec![display(ep), h.hash.to_string()]),
                    Err(e) => bail!("{}: {}", display(ep), e.message()),
                }
            }
            match fmt {
                Format::Table => output::print_table(&["ENDPOINT", "HASH"], &rows),
                _ => rows.iter().for_each(|r| outln!("{}", r.join(", "))),
            }
        }
        EndpointCommand::Status { cluster } => {
            let each = targets(client, cluster, timeout).await?;
            let mut rows = Vec::new();
            let mut failed = false;
            for (i, ep) in each.endpoints().iter().enumerate() {
                match each.status_of(i).await {
                    Ok(s) => {
                        let id = s.header.as_ref().map(|h| h.member_id).unwrap_or(0);
                        rows.push((
                            ep.clone(),
                            s.clone(),
                            vec![
                                display(ep),
                                format!("{id:x}"),
                                s.version.clone(),
                                output::human_bytes(s.db_size),
                                (s.leader == id).to_string(),
                                s.is_learner.to_string(),
                                s.raft_term.to_string(),
                                s.raft_index.to_string(),
                                s.raft_applied_index.to_string(),
                                s.errors.join(", "),
                            ],
                        ))
                    }
                    Err(e) => {
                        eprintln!("Failed to get the status of endpoint {} ({})", display(ep), e.message());
                        failed = true;
                    }
                }
            }
            match fmt {
                Format::Simple => rows.iter().for_each(|(_, _, r)| outln!("{}", r.join(", "))),
                Format::Table => output::print_table(
                    &[
                        "ENDPOINT",
                        "ID",
                        "VERSION",
                        "DB SIZE",
                        "IS LEADER",
                        "IS LEARNER",
                        "RAFT TERM",
                        "RAFT INDEX",
                        "RAFT APPLIED INDEX",
                        "ERRORS",
                    ],
                    &rows.iter().map(|(_, _, r)| r.clone()).collect::<Vec<_>>(),
                ),
                Format::Json => {
                    let all: Vec<_> = rows
                        .iter()
                        .map(|(ep, s, _)| {
                            let mut status = json!({"header": output::header_json(&s.header), "version": s.version,
                                "dbSize": s.db_size, "leader": s.leader, "raftIndex": s.raft_index, "raftTerm": s.raft_term,
                                "raftAppliedIndex": s.raft_applied_index});
                            // In etcdctl's order; left out when empty, as there.
                            if !s.errors.is_empty() {
                                status["errors"] = json!(s.errors);
                            }
                            status["dbSizeInUse"] = json!(s.db_size_in_use);
                            json!({"Endpoint": ep, "Status": status})
                        })
                        .collect();
                    output::print_json(&json!(all));
                }
            }
            if failed {
                bail!("unhealthy cluster");
            }
        }
        EndpointCommand::Health { cluster } => {
            let each = targets(client, cluster, timeout).await?;
            let mut rows = Vec::new();
            for (i, ep) in each.endpoints().iter().enumerate() {
                let start = Instant::now();
                let res = each.get_on(i, b"health").await;
                let took = start.elapsed();
                rows.push((
                    display(ep),
                    res.is_ok(),
                    took,
                    res.err().map(|e| e.message().to_string()).unwrap_or_default(),
                ));
            }
            match fmt {
                Format::Json => {
                    let all: Vec<_> = rows
                        .iter()
                        .map(|(ep, ok, took, err)| json!({"endpoint": ep, "health": ok, "took": format!("{took:?}"), "error": err}))
                        .collect();
                    output::print_json(&json!(all));
                }
                Format::Table => output::print_table(
                    &["ENDPOINT", "HEALTH", "TOOK", "ERROR"],
                    &rows
                        .iter()
                        .map(|(ep, ok, took, err)| vec![ep.clone(), ok.to_string(), format!("{took:?}"), err.clone()])
                        .collect::<Vec<_>>(),
                ),
                Format::Simple => {
                    for (ep, ok, took, err) in &rows {
                        if *ok {
                            outln!("{ep} is healthy: successfully committed proposal: took = {took:?}");
                        } else {
                            eprintln!("{ep} is unhealthy: failed to commit proposal: {err}");
                        }
                    }
                }
            }
            if rows.iter().any(|(_, ok, _, _)| !ok) {
                bail!("unhealthy cluster");
            }
        }
    }
    Ok(())
}
