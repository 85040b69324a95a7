//! Whether a member that starts on an empty data directory may take part in
//! its cluster.
//!
//! A member that lost its data directory has forgotten its vote: if it came
//! back under its old id, it could vote twice in one term, and two leaders
//! in one term would become possible. So before such a member takes part in
//! Raft (its peer port answers nothing but probes meanwhile), it asks every
//! other member of `--initial-cluster` what it knows of it ([`probe_all`]),
//! and [`decide`] refuses the start if the cluster has heard from it before:
//! it published its attributes through the log, or the leader replicated
//! entries to it. With `--initial-cluster-state existing` it also refuses a
//! member that the cluster does not list, and a start where no member of the
//! cluster answers.
//!
//! The check runs while a marker file, [`MARKER`], is in the directory: a
//! start that was refused, or stopped before it finished, checks again.

use std::path::Path;
use std::time::Duration;

use crate::config::{ClusterState, Validated};
use crate::node::peer::{ProbeAnswer, ProbeRequest};
use crate::raft::encode;
use crate::raft::network::{Network, Rpc};

/// The file that marks a data directory whose member has not yet been let in.
pub const MARKER: &str = "joining";

/// How long a member waits for each other member's answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a member with an empty data directory may not start.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// The cluster knows this member: its data was lost.
    #[error(
        "member {id:x} ({name}) has taken part in this cluster before (member {by:x} says so), but its data dir {dir} \
         is empty: it lost its Raft log and vote and must not rejoin under its old id. Restore the directory from a \
         copy, or replace the member: remove it (etcdctl member remove {id:x}) and add it again"
    )]
    Rejoin {
        /// This member's id.
        id: u64,
        /// Its name.
        name: String,
        /// Its data directory.
        dir: String,
        /// The member that knew it.
        by: u64,
    },
    /// `existing` was asked for, and the cluster does not list this member.
    #[error(
        "member {id:x} ({name}) is not a member of the existing cluster (member {by:x} lists {members}); add it \
         first (etcdctl member add), or start it with --initial-cluster-state new to form a new cluster"
    )]
    NotAMember {
        /// This member's id.
        id: u64,
        /// Its name.
        name: String,
        /// The member that answered.
        by: u64,
        /// The members it listed.
        members: String,
    },
    /// `existing` was asked for, and no member of the cluster answered.
    #[error("cannot join the existing cluster: no member of --initial-cluster answered ({tried})")]
    NoCluster {
        /// Each member asked, with what went wrong.
        tried: String,
    },
}

/// Whether the member on `data_dir` starts without data of its own (or
/// after a start that was not let in).
pub fn is_fresh(data_dir: &Path) -> bool {
    // A data dir whose database cannot be found is not fresh: the start
    // then fails on it with the reason, and nothing is written over it.
    let db = crate::raft::db_dir::db_path(data_dir).map(|p| p.exists()).unwrap_or(true);
    !db || data_dir.join(MARKER).exists()
}

/// Marks `data_dir` as not yet let in; it is created if need be.
pub fn mark(data_dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(data_dir)?;
    std::fs::write(data_dir.join(MARKER), b"this member has not yet been let into its cluster\n")?;
    std::fs::File::open(data_dir)?.sync_all()
}

/// Marks `data_dir` as let in.
pub fn unmark(data_dir: &Path) -> std::io::Result<()> {
    std::fs::remove_file(data_dir.join(MARKER))?;
    std::fs::File::open(data_dir)?.sync_all()
}

/// One other member of `--initial-cluster` and what it answered.
pub type Answer = (String, u64, Result<ProbeAnswer, String>);

/// Asks every other member of `--initial-cluster`, at once, what it knows of
/// this one; a member that does not answer in time counts as silent.
pub async fn probe_all(network: &Network, cfg: &Validated) -> Vec<Answer> {
    let request = ProbeRequest { cluster_id: cfg.cluster_id, from: cfg.id };
    let asks = cfg.members.iter().filter(|m| m.id != cfg.id).map(|m| {
        let request = request.clone();
        async move {
            let answer = match encode(&request) {
                Err(e) => Err(e.to_string()),
                Ok(payload) => match network.call(m.id, &m.peer_url, Rpc::Probe, payload, PROBE_TIMEOUT).await {
                    Err(e) => Err(e.to_string()),
                    Ok(bytes) => ProbeAnswer::decode(&bytes).map_err(|e| e.to_string()),
                },
            };
            (m.name.clone(), m.id, answer)
        }
    });
    futures::future::join_all(asks).await
}

/// Who this member is in the cluster it joins, for a member started with
/// `--initial-cluster-state existing` on an empty data directory: a member
/// added with `member add` got its id from the leader, and finds it by its
/// peer URL among the members the others list. Returns its id, the
/// cluster's id and the members, from the first answer that lists this
/// member's peer URL.
pub fn assigned(cfg: &Validated, answers: &[Answer]) -> Option<(u64, u64, Vec<u64>)> {
    use crate::node::membership::normalize_peer_url;
    let own = cfg.members.iter().find(|m| m.id == cfg.id).and_then(|m| normalize_peer_url(&m.peer_url))?;
    answers.iter().filter_map(|(_, _, a)| a.as_ref().ok()).find_map(|a| {
        let (id, _) = a.peers.iter().find(|(_, url)| normalize_peer_url(url).as_deref() == Some(own.as_str()))?;
        Some((*id, a.cluster_id, a.members.clone()))
    })
}

/// Whether the answers let this member start (see the module's text).
///
/// A member id is made from the member's name, peer URLs and cluster token,
/// so any member that knows this id knows this member, whichever cluster id
/// it reports. With `existing`, the members answering are the cluster to
/// join, and their cluster id is theirs, not the one this member's flags
/// would give a new cluster.
pub fn decide(cfg: &Validated, answers: &[Answer]) -> Result<(), JoinError> {
    let answered = || answers.iter().filter_map(|(_, _, a)| a.as_ref().ok());
    if let Some(a) = answered().find(|a| a.knows_you) {
        return Err(JoinError::Rejoin {
            id: cfg.id,
            name: cfg.config.name.clone(),
            dir: cfg.data_dir.display().to_string(),
            by: a.member_id,
        });
    }
    if cfg.config.initial_cluster_state != ClusterState::Existing {
        for (name, _, answer) in answers {
            if let Some(a) = answer.as_ref().ok().filter(|a| a.cluster_id != cfg.cluster_id && !a.members.is_empty()) {
                tracing::warn!(
                    member = %name,
                    "member {:x} belongs to cluster {:x}, not to the new cluster {:x} that --initial-cluster and \
                     --initial-cluster-token make",
                    a.member_id,
                    a.cluster_id,
                    cfg.cluster_id
                );
            }
        }
        return Ok(());
    }
    let joined: Vec<&ProbeAnswer> = answered().filter(|a| !a.members.is_empty()).collect();
    if joined.is_empty() {
        let tried = answers
            .iter()
            .map(|(name, _, a)| match a {
                Ok(_) => format!("{name}: not in a cluster yet"),
                Err(e) => format!("{name}: {e}"),
            })
            .collect::<Vec<_>>()
            .join("; ");
        return Err(JoinError::NoCluster { tried });
    }
    if joined.iter().any(|a| a.members.contains(&cfg.id)) {
        return Ok(());
    }
    let a = joined[0];
    Err(JoinError::NotAMember {
        id: cfg.id,
        name: cfg.config.name.clone(),
        by: a.member_id,
        members: a.members.iter().map(|m| format!("{m:x}")).collect::<Vec<_>>().join(", "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn config(state: &str) -> Validated {
        crate::config::Config::parse_from([
            "kvd",
            "--name",
            "a",
            "--initial-cluster",
            "a=http://127.0.0.1:1,b=http://127.0.0.1:2,c=http://127.0.0.1:3",
            "--initial-advertise-peer-urls",
            "http://127.0.0.1:1",
            "--initial-cluster-state",
            state,
        ])
        .validate()
        .expect("valid")
    }

    fn answer(cfg: &Validated, knows_you: bool, members: Vec<u64>) -> Answer {
        let a = ProbeAnswer {
            cluster_id: cfg.cluster_id,
            member_id: 7,
            members,
            knows_you,
            peers: Vec::new(),
            membership_index: Some(1),
            defragmenting: false,
            membership_term: Some(1),
        };
        ("b".into(), 7, Ok(a))
    }

    fn silent() -> Answer {
        ("c".into(), 8, Err("connection refused".into()))
    }

    #[test]
    fn a_member_the_cluster_knows_is_refused_whatever_the_state() {
        for state in ["new", "existing"] {
            let cfg = config(state);
            let all: Vec<u64> = cfg.members.iter().map(|m| m.id).collect();
            let err = decide(&cfg, &[answer(&cfg, true, all), silent()]).unwrap_err();
            assert!(matches!(err, JoinError::Rejoin { .. }), "{state}: {err}");
            assert!(err.to_string().contains("must not rejoin under its old id"), "{err}");
        }
    }

    #[test]
    fn a_new_member_starts_when_nobody_knows_it_or_nobody_answers() {
        let cfg = config("new");
        let all: Vec<u64> = cfg.members.iter().map(|m| m.id).collect();
        decide(&cfg, &[answer(&cfg, false, all), silent()]).unwrap();
        decide(&cfg, &[silent(), silent()]).unwrap();
        decide(&cfg, &[]).unwrap();
    }

    #[test]
    fn existing_needs_a_cluster_that_lists_the_member() {
        let cfg = config("existing");
        let all: Vec<u64> = cfg.members.iter().map(|m| m.id).collect();
        decide(&cfg, &[answer(&cfg, false, all.clone()), silent()]).unwrap();
        let others: Vec<u64> = all.iter().copied().filter(|id| *id != cfg.id).collect();
        let err = decide(&cfg, &[answer(&cfg, false, others), silent()]).unwrap_err();
        assert!(matches!(err, JoinError::NotAMember { .. }), "{err}");
        let err = decide(&cfg, &[silent(), silent()]).unwrap_err();
        assert!(err.to_string().contains("no member of --initial-cluster answered (c: connection refused"), "{err}");
        // The cluster's id is its own: a cluster grown by adding members has
        // another id than this member's --initial-cluster makes.
        let mut grown = answer(&cfg, false, all);
        if let Ok(a) = &mut grown.2 {
            a.cluster_id ^= 1;
        }
        decide(&cfg, &[grown, silent()]).unwrap();
        let err = decide(&cfg, &[answer(&cfg, false, Vec::new()), silent()]).unwrap_err();
        assert!(err.to_string().contains("b: not in a cluster yet; c: connection refused"), "{err}");
    }
}
