//! The peer port against strangers: raw peer requests without a member's
//! identity, with another cluster's, or from a member id the cluster does not
//! have, are refused and change nothing; forwarded writes are held to the
//! client port's limits; and a second cluster pointed at one of our members
//! disturbs nobody.

mod support;

use std::time::Duration;

use clap::Parser;
use kvd::proto::etcdserverpb::request_op::Request as Op;
use kvd::proto::etcdserverpb::{PutRequest, RangeRequest, RequestOp, TxnRequest};
use kvd::proto::kvdpb::peer_client::PeerClient;
use kvd::proto::kvdpb::{command, Command, MemberAttributes, RaftPayload};
use kvd::raft::leader::{Forwarded, Proposal};
use kvd::raft::network::{CLUSTER_HEADER, FROM_HEADER, TO_HEADER};
use kvd::raft::{decode, encode, NodeId, Request, Response};
use openraft::raft::VoteRequest;
use openraft::Vote;
use prost::Message;
use support::{put, TestCluster};
use tonic::transport::Channel;

fn command(op: command::Op) -> Vec<u8> {
    Command { op: Some(op), stamp: None }.encode_to_vec()
}

fn proposal(op: command::Op) -> RaftPayload {
    RaftPayload { data: encode(&Proposal { command: command(op), alone: false }).unwrap() }
}

fn stray_put() -> command::Op {
    command::Op::Put(PutRequest { key: b"stray".to_vec(), value: b"x".to_vec(), ..Default::default() })
}

/// A request carrying the identity headers given (hex), any of them left out.
fn with(ids: [Option<u64>; 3], payload: RaftPayload) -> tonic::Request<RaftPayload> {
    let mut req = tonic::Request::new(payload);
    for (name, value) in [CLUSTER_HEADER, FROM_HEADER, TO_HEADER].into_iter().zip(ids) {
        if let Some(v) = value {
            req.metadata_mut().insert(name, format!("{v:x}").parse().unwrap());
        }
    }
    req
}

async fn peer(c: &TestCluster, i: usize) -> PeerClient<Channel> {
    PeerClient::connect(format!("http://{}", c.peer_addrs[i])).await.unwrap()
}

/// Every peer RPC, sent to member `i` with `ids`, is refused with a message
/// containing `why`.
async fn every_rpc_refused(c: &TestCluster, i: usize, ids: [Option<u64>; 3], why: &str) {
    let mut p = peer(c, i).await;
    let vote = VoteRequest::new(Vote::new(1_000, ids[1].unwrap_or(1)), None);
    let vote = RaftPayload { data: encode(&vote).unwrap() };
    let empty = RaftPayload::default();
    let renewals = RaftPayload { data: encode(&vec![1i64, 2, 3]).unwrap() };
    let batch = RaftPayload { data: encode(&vec![Proposal { command: command(stray_put()), alone: false }]).unwrap() };
    let answers = [
        ("Forward", p.forward(with(ids, proposal(stray_put()))).await.map(drop)),
        ("ForwardBatch", p.forward_batch(with(ids, batch.clone())).await.map(drop)),
        ("Vote", p.vote(with(ids, vote.clone())).await.map(drop)),
        ("AppendEntries", p.append_entries(with(ids, vote.clone())).await.map(drop)),
        ("InstallSnapshot", p.install_snapshot(with(ids, vote)).await.map(drop)),
        ("Lease", p.lease(with(ids, empty.clone())).await.map(drop)),
        ("LeaseRenewals", p.lease_renewals(with(ids, renewals.clone())).await.map(drop)),
        ("ReadIndex", p.read_index(with(ids, empty.clone())).await.map(drop)),
    ];
    for (rpc, answer) in answers {
        let status = answer.expect_err(rpc);
        assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{rpc}: {status:?}");
        assert!(status.message().contains(why), "{rpc}: {status:?}");
    }
    let stream_req = |first: RaftPayload| {
        let mut req = tonic::Request::new(tokio_stream::iter(vec![first]));
        for (name, value) in [CLUSTER_HEADER, FROM_HEADER, TO_HEADER].into_iter().zip(ids) {
            if let Some(v) = value {
                req.metadata_mut().insert(name, format!("{v:x}").parse().unwrap());
            }
        }
        req
    };
    let status = p.append_entries_stream(stream_req(empty)).await.map(drop).expect_err("AppendEntriesStream");
    assert!(status.message().contains(why), "AppendEntriesStream: {status:?}");
    let status = p.forward_stream(stream_req(batch)).await.map(drop).expect_err("ForwardStream");
    assert!(status.message().contains(why), "ForwardStream: {status:?}");
    let status = p.read_index_stream(stream_req(RaftPayload::default())).await.map(drop).expect_err("ReadIndexStream");
    assert!(status.message().contains(why), "ReadIndexStream: {status:?}");
    let status = p.lease_renewals_stream(stream_req(renewals)).await.map(drop).expect_err("LeaseRenewalsStream");
    assert!(status.message().contains(why), "LeaseRenewalsStream: {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn strangers_on_the_peer_port_are_refused_and_change_nothing() {
    let c = TestCluster::start(3, |_| {}).await;
    let leader = c.wait_leader().await;
    for i in 0..10 {
        c.client(leader).put(put(&format!("k{i}"), "v")).await.unwrap();
    }
    let before = c.member(leader).member.raft.metrics().borrow().current_term;
    let cluster = c.member(0).member.cluster_id;
    let ids: Vec<NodeId> = (0..3).map(|i| c.member(i).member.id).collect();
    let follower = (leader + 1) % 3;
    let other = (leader + 2) % 3;

    for i in [leader, follower] {
        let me = ids[i];
        every_rpc_refused(&c, i, [None, None, None], "without member identity").await;
        every_rpc_refused(&c, i, [Some(cluster ^ 1), Some(ids[other]), Some(me)], "cluster ID mismatch").await;
        every_rpc_refused(&c, i, [Some(cluster), Some(ids[other]), Some(me ^ 1)], "member ID mismatch").await;
        every_rpc_refused(&c, i, [Some(cluster), Some(0xbad), Some(me)], "member bad is not a member").await;
    }

    // With a member's identity, a Raft message must carry that member's own
    // vote, and forwarded writes meet the client port's limits.
    let mut p = peer(&c, leader).await;
    let someone_else = VoteRequest::new(Vote::new(before + 5, ids[follower]), None);
    let as_other = [Some(cluster), Some(ids[other]), Some(ids[leader])];
    let status = p.vote(with(as_other, RaftPayload { data: encode(&someone_else).unwrap() })).await.unwrap_err();
    assert!(status.message().contains("with the vote of"), "{status:?}");

    let ops = (0..200)
        .map(|i| RequestOp {
            request: Some(Op::RequestPut(PutRequest {
                key: format!("big{i}").into_bytes(),
                value: b"x".to_vec(),
                ..Default::default()
            })),
        })
        .collect();
    let big = TxnRequest { compare: vec![], success: ops, failure: vec![] };
    let forwarded = |op| {
        let mut p = p.clone();
        async move {
            let answer = p.forward(with(as_other, proposal(op))).await.unwrap().into_inner();
            decode::<Forwarded<Response>>(&answer.data).unwrap()
        }
    };
    let answer = forwarded(command::Op::Txn(big)).await;
    assert!(matches!(answer, Forwarded::Failed(kvd::error::Error::TooManyOps)), "{answer:?}");
    let answer = forwarded(command::Op::Put(PutRequest::default())).await;
    assert!(matches!(answer, Forwarded::Failed(kvd::error::Error::EmptyKey)), "{answer:?}");
    let forged = command::Op::Publish(MemberAttributes {
        id: ids[follower],
        name: "evil".into(),
        client_urls: vec!["http://127.0.0.1:1".into()],
    });
    let answer = forwarded(forged).await;
    assert!(matches!(answer, Forwarded::Failed(kvd::error::Error::ForwardRefused(_))), "{answer:?}");
    let junk = RaftPayload { data: encode(&Proposal { command: vec![0xff; 7], alone: false }).unwrap() };
    let answer = p.forward(with(as_other, junk)).await.unwrap().into_inner();
    let answer: Forwarded<Response> = decode(&answer.data).unwrap();
    assert!(matches!(answer, Forwarded::Failed(kvd::error::Error::ForwardRefused(_))), "{answer:?}");
    // Keep-alives from a member: a lease nobody granted answers TTL 0; more
    // than a batch holds, or bytes that are no list of ids, are refused.
    let renew = |ids: Vec<i64>| {
        let mut p = p.clone();
        async move {
            let payload = RaftPayload { data: encode(&ids).unwrap() };
            let answer = p.lease_renewals(with(as_other, payload)).await.unwrap().into_inner();
            decode::<Forwarded<Vec<i64>>>(&answer.data).unwrap()
        }
    };
    let answer = renew(vec![0x7ead_0002]).await;
    assert!(matches!(&answer, Forwarded::Done(ttls) if ttls == &[0]), "{answer:?}");
    let answer = renew(vec![1; kvd::lease::MAX_RENEWALS + 1]).await;
    assert!(format!("{answer:?}").contains("keep-alives in one call"), "{answer:?}");
    let status = p.lease_renewals(with(as_other, RaftPayload { data: vec![0xff; 5] })).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    // A message over the peer size limit is refused by the gRPC layer.
    let huge = RaftPayload { data: vec![0; 64 * 1024 * 1024] };
    let status = p.forward(with(as_other, huge)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");

    // Nothing changed: the same leader in the same term, no stray keys, the
    // member list as published, and the cluster still takes writes.
    assert_eq!(c.wait_leader().await, leader);
    assert_eq!(c.member(leader).member.raft.metrics().borrow().current_term, before);
    let client = c.client(follower);
    for key in ["stray", "big0", ""] {
        let got = client.range(RangeRequest { key: key.as_bytes().to_vec(), ..Default::default() });
        assert!(got.await.map(|r| r.kvs.is_empty()).unwrap_or(true), "{key:?} was written");
    }
    let members = client.member_list().await.unwrap();
    assert!(members.members.iter().all(|m| m.name != "evil"), "{members:?}");
    client.put(put("after", "v")).await.unwrap();
    let keys = client.range(RangeRequest { key: b"k".to_vec(), range_end: b"l".to_vec(), ..Default::default() });
    assert_eq!(keys.await.unwrap().kvs.len(), 10);
    c.shutdown().await;
}

/// A second cluster (another token) whose `--initial-cluster` names one of
/// our members' peer URL: it elects its own leader among its two members and
/// sends ours votes and entries, which are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_foreign_cluster_pointed_at_a_member_disturbs_nobody() {
    let logs = support::logs();
    let c = TestCluster::start(3, |_| {}).await;
    let leader = c.wait_leader().await;
    for i in 0..10 {
        c.client(leader).put(put(&format!("k{i}"), "v")).await.unwrap();
    }
    let term = c.member(leader).member.raft.metrics().borrow().current_term;
    let target = (leader + 1) % 3;

    let ports = kvd_testkit::free_ports(4);
    let peer_urls = [format!("http://127.0.0.1:{}", ports[0]), format!("http://127.0.0.1:{}", ports[1])];
    let initial = format!("f0={},f1={},m{target}=http://{}", peer_urls[0], peer_urls[1], c.peer_addrs[target]);
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let starts = (0..2).map(|i| {
        let client = format!("http://127.0.0.1:{}", ports[2 + i]);
        let config = kvd::config::Config::parse_from([
            "kvd",
            "--name",
            &format!("f{i}"),
            "--data-dir",
            &dirs[i].path().join("data").display().to_string(),
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            &peer_urls[i],
            "--initial-advertise-peer-urls",
            &peer_urls[i],
            "--initial-cluster",
            &initial,
            "--initial-cluster-token",
            "another-cluster",
            "--heartbeat-interval",
            "50",
            "--election-timeout",
            "500",
        ]);
        kvd::server::start(config.validate().unwrap())
    });
    let foreign: Vec<_> = futures::future::join_all(starts).await.into_iter().map(|s| s.unwrap()).collect();
    // The foreign cluster elects a leader of its own and commits an entry.
    let deadline = std::time::Instant::now() + support::WAIT;
    let foreign_leader = loop {
        if let Some(l) = foreign.iter().find(|s| s.member.leader() == Some(s.member.id)) {
            break l;
        }
        assert!(std::time::Instant::now() < deadline, "the foreign cluster elected no leader");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    foreign_leader.member.put(put("theirs", "1")).await.unwrap();
    // Let it send our member heartbeats for a while.
    for _ in 0..20 {
        foreign_leader.member.put(put("theirs", "2")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    assert_eq!(c.wait_leader().await, leader);
    for i in 0..3 {
        let m = c.member(i).member.raft.metrics().borrow().clone();
        assert_eq!(m.current_term, term, "member {i} moved to another term");
        assert!(m.running_state.is_ok(), "member {i} stopped: {:?}", m.running_state);
    }
    let client = c.client(target);
    let theirs = client.range(RangeRequest { key: b"theirs".to_vec(), ..Default::default() }).await.unwrap();
    assert!(theirs.kvs.is_empty());
    let ours = client.range(RangeRequest { key: b"k".to_vec(), range_end: b"l".to_vec(), ..Default::default() });
    assert_eq!(ours.await.unwrap().kvs.len(), 10);
    client.put(put("after", "v")).await.unwrap();
    // Our member said why, once per foreign member in each few seconds
    // rather than once per message.
    let mut lines = 0;
    for s in &foreign {
        let from = format!("refused a peer request from member {:x}", s.member.id);
        let said = logs.lines_with(&[&from, "request cluster ID mismatch"]);
        lines += said.len();
    }
    assert!((1..=4).contains(&lines), "{lines} refusal lines for the foreign members");
    for s in foreign {
        s.shutdown().await;
    }
    c.shutdown().await;
}

/// A follower's streams of forwarded writes, of read index requests and of
/// keep-alives are checked when they open and again for each message: once
/// its member is removed, the next write on the open stream is refused and
/// not made, and the next read index request or keep-alive refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forward_stream_of_a_removed_member_is_refused_write_by_write() {
    let c = TestCluster::start(3, |_| {}).await;
    let leader = c.wait_leader().await;
    let gone = (leader + 1) % 3;
    let (cluster, from, to) = (c.member(0).member.cluster_id, c.member(gone).member.id, c.member(leader).member.id);
    let write = |key: &str| {
        let put =
            command::Op::Put(PutRequest { key: key.as_bytes().to_vec(), value: b"v".to_vec(), ..Default::default() });
        RaftPayload { data: encode(&vec![Proposal { command: command(put), alone: false }]).unwrap() }
    };
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    for (name, value) in [(CLUSTER_HEADER, cluster), (FROM_HEADER, from), (TO_HEADER, to)] {
        req.metadata_mut().insert(name, format!("{value:x}").parse().unwrap());
    }
    let mut answers = peer(&c, leader).await.forward_stream(req).await.expect("a member's stream opens").into_inner();
    tx.send(write("before")).await.unwrap();
    let answer = answers.message().await.expect("answered").expect("an answer");
    let answer: Vec<Forwarded<Response>> = decode(&answer.data).unwrap();
    assert!(matches!(answer.as_slice(), [Forwarded::Done(_)]), "{answer:?}");

    let as_member = |rx| {
        let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        for (name, value) in [(CLUSTER_HEADER, cluster), (FROM_HEADER, from), (TO_HEADER, to)] {
            req.metadata_mut().insert(name, format!("{value:x}").parse().unwrap());
        }
        req
    };
    let (ask, asked) = tokio::sync::mpsc::channel(1);
    let mut reads = peer(&c, leader).await.read_index_stream(as_member(asked)).await.expect("it opens").into_inner();
    for _ in 0..2 {
        ask.send(RaftPayload::default()).await.unwrap();
        let answer = reads.message().await.expect("answered").expect("an answer");
        let answer: Forwarded<Option<u64>> = decode(&answer.data).unwrap();
        assert!(matches!(answer, Forwarded::Done(Some(i)) if i > 0), "{answer:?}");
    }
    let lease = c.client(leader).lease_grant(60, 0).await.unwrap().id;
    let renewal = RaftPayload { data: encode(&vec![lease]).unwrap() };
    let (renew, renewals) = tokio::sync::mpsc::channel(1);
    let mut renewed =
        peer(&c, leader).await.lease_renewals_stream(as_member(renewals)).await.expect("it opens").into_inner();
    renew.send(renewal.clone()).await.unwrap();
    let answer = renewed.message().await.expect("answered").expect("an answer");
    let answer: Forwarded<Vec<i64>> = decode(&answer.data).unwrap();
    assert!(matches!(answer, Forwarded::Done(ref ttls) if ttls == &[60]), "{answer:?}");

    c.client(leader).member_remove(from).await.unwrap();
    tx.send(write("after")).await.unwrap();
    let refused = answers.message().await.expect_err("refused once removed");
    assert!(refused.message().contains("is not a member of this cluster"), "{refused:?}");
    ask.send(RaftPayload::default()).await.unwrap();
    let refused = reads.message().await.expect_err("refused once removed");
    assert!(refused.message().contains("is not a member of this cluster"), "{refused:?}");
    renew.send(renewal).await.unwrap();
    let refused = renewed.message().await.expect_err("refused once removed");
    assert!(refused.message().contains("is not a member of this cluster"), "{refused:?}");
    let client = c.client(leader);
    for (key, made) in [("before", 1), ("after", 0)] {
        let range = RangeRequest { key: key.as_bytes().to_vec(), ..Default::default() };
        assert_eq!(client.range(range).await.unwrap().kvs.len(), made, "{key}");
    }
    c.shutdown().await;
}

/// A member that has applied a member's removal refuses it, even while a
/// member that has not yet heard of the removal still lists it: only a
/// membership newer than its own can vouch for a sender it does not list.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_removed_member_is_refused_while_a_member_behind_still_lists_it() {
    let c = TestCluster::start(4, |_| {}).await;
    let leader = c.wait_leader().await;
    let others: Vec<usize> = (0..4).filter(|i| *i != leader).collect();
    let (gone, behind, asked) = (others[0], others[1], others[2]);
    let id = |i: usize| c.member(i).member.id;
    let lists = |i: usize, member: NodeId| {
        c.member(i).member.raft.metrics().borrow().membership_config.membership().nodes().any(|(n, _)| *n == member)
    };
    // The member behind hears nothing more from the leader.
    c.member(leader).member.network.block(id(behind));
    c.client(leader).member_remove(id(gone)).await.expect("member remove");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while lists(asked, id(gone)) {
        assert!(std::time::Instant::now() < deadline, "the removal never reached member {asked}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(lists(behind, id(gone)), "the member behind heard of the removal");
    let cluster = c.member(0).member.cluster_id;
    every_rpc_refused(&c, asked, [Some(cluster), Some(id(gone)), Some(id(asked))], "is not a member of this cluster")
        .await;
    assert!(lists(behind, id(gone)), "the member behind heard of the removal before the end");
    c.member(leader).member.network.heal();
    c.shutdown().await;
}

/// A member that fell behind may hold a membership that a deposed leader
/// appended and that was never committed: one that still lists a member
/// removed since, at an index after the removal's. Its term is older than
/// the removal's, so it vouches for no one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deposed_leaders_membership_left_on_a_member_behind_vouches_for_no_one() {
    // No member campaigns by itself while the test runs: only the one it
    // makes campaign can win.
    let c = TestCluster::start(5, |args| {
        let at = args.iter().position(|a| a == "--election-timeout").expect("set");
        args[at + 1] = "3000".into();
    })
    .await;
    let old = c.wait_leader().await;
    let others: Vec<usize> = (0..5).filter(|i| *i != old).collect();
    let id = |i: usize| c.member(i).member.id;
    let block = |from: usize, to: &[usize]| to.iter().for_each(|t| c.member(from).member.network.block(id(*t)));
    let metrics = |i: usize| c.member(i).member.raft.metrics().borrow().clone();
    let last = |i: usize| metrics(i).last_log_index;
    // `behind` keeps the deposed leader's log. The old leader reaches only
    // it from now on: writes, then a membership change, none of them
    // committed, go there alone (straight to Raft, so that each is an entry
    // of its own).
    c.client(old).put(put("before", "v")).await.expect("put");
    wait_until("every member has every entry", || (0..5).all(|i| last(i) == last(old))).await;
    let behind = others[0];
    block(old, &others[1..]);
    // `next` leads next, so it has the longest log of the three left (an
    // entry on its way when the old leader stopped sending may have reached
    // some of them only); `gone` is removed by it, `asked` is sent the
    // removed member's requests.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut rest = others[1..].to_vec();
    rest.sort_by_key(|i| std::cmp::Reverse(last(*i)));
    let (next, gone, asked) = (rest[0], rest[1], rest[2]);
    let mut stray = Vec::new();
    for _ in 0..6 {
        let appended = last(old);
        let raft = c.member(old).member.raft.clone();
        stray.push(tokio::spawn(async move { raft.client_write(Request(command(stray_put()))).await.map(drop) }));
        wait_until("the old leader appends the write", || last(old) > appended).await;
    }
    let raft = c.member(old).member.raft.clone();
    let learner = tokio::spawn(async move {
        raft.add_learner(0xfeed, openraft::BasicNode::new("http://127.0.0.1:9"), false).await.map(drop)
    });
    let lists = |i: usize, member: NodeId| metrics(i).membership_config.membership().nodes().any(|(n, _)| *n == member);
    wait_until("the member behind appends the old leader's membership", || lists(behind, 0xfeed)).await;
    let stale = metrics(behind).membership_config.log_id().expect("a membership");

    // The member behind hears from no one from now on, and no one but
    // `next` can win an election: the old leader is cut off, and the others
    // reach only the member behind, which refuses them (its log is longer),
    // and wait 3 s before they campaign.
    block(old, &[behind]);
    block(behind, &[old, next, gone, asked]);
    block(next, &[behind]);
    block(gone, &[old, next, asked, behind]);
    block(asked, &[old, next, gone]);
    let elected = async {
        while metrics(next).current_leader != Some(id(next)) {
            let _ = c.member(next).member.raft.trigger().elect().await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(30), elected).await.is_err() {
        for i in 0..5 {
            let m = metrics(i);
            eprintln!("{i} {:?} vote {} leader {:?} last {:?}", m.state, m.vote, m.current_leader, m.last_log_index);
        }
        panic!("the next member leads within 30 s");
    }
    c.client(next).member_remove(id(gone)).await.expect("member remove");
    wait_until("the member asked applies the removal", || {
        let applied = c.member(asked).member.state.applied_membership().index;
        !lists(asked, id(gone)) && metrics(asked).membership_config.log_id().map(|l| l.index) == Some(applied)
    })
    .await;
    let removal = metrics(asked).membership_config.log_id().expect("a membership");
    assert!(removal.leader_id.term > stale.leader_id.term, "{removal} after {stale}");
    assert!(stale.index >= removal.index, "the stale membership {stale} comes after the removal {removal}");
    assert!(
        lists(behind, id(gone)) && *metrics(behind).membership_config.log_id() == Some(stale),
        "the member behind moved"
    );

    let cluster = c.member(0).member.cluster_id;
    every_rpc_refused(&c, asked, [Some(cluster), Some(id(gone)), Some(id(asked))], "is not a member of this cluster")
        .await;
    assert_eq!(*metrics(behind).membership_config.log_id(), Some(stale), "the member behind moved before the end");
    for i in 0..5 {
        c.member(i).member.network.heal();
    }
    learner.abort();
    for s in stray {
        s.abort();
    }
    c.shutdown().await;
}

/// Waits, up to 20 s, until `done`.
async fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "{what}: not within 20 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
