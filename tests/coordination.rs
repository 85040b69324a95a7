//! Watches, leases and elections on in-process clusters, under the faults
//! that matter to them: leader changes, member restarts, client reconnects,
//! slow readers and holders that die.

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvd::client::{Client, LeaseState};
use kvd::proto::etcdserverpb::{CompactionRequest, PutRequest, RangeRequest, WatchCreateRequest, WatchResponse};
use kvd::proto::mvccpb::event::EventType;
use support::{get, put, TestCluster, WAIT};
use tokio::sync::Mutex;

/// Election timeout the test clusters run with (support sets 500 ms).
const ELECTION: Duration = Duration::from_millis(500);

fn prefix_watch(prefix: &str, start: i64) -> WatchCreateRequest {
    WatchCreateRequest {
        key: prefix.into(),
        range_end: kvd::mvcc::keys::prefix_end(prefix.as_bytes()),
        start_revision: start,
        ..Default::default()
    }
}

/// Puts through `client` until `n` are acknowledged; returns their revisions.
/// Puts that fail (a member going down mid-call) are retried under a new
/// key: they may or may not have been applied.
async fn write(client: &Client, tag: &str, n: usize) -> Vec<i64> {
    let mut revs = Vec::new();
    let mut attempt = 0;
    while revs.len() < n {
        attempt += 1;
        match client.put(put(&format!("w/{tag}-{attempt}"), "v")).await {
            Ok(r) => revs.push(r.header.unwrap().revision),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    revs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watch_misses_nothing_and_repeats_nothing_across_leader_change_restart_and_reconnect() {
    let mut c = TestCluster::start(3, |_| {}).await;
    let leader = c.wait_leader().await;
    let follower = (leader + 1) % 3;
    // The watcher prefers a follower; when that member goes, its client
    // reconnects elsewhere and resumes.
    let order = [follower, leader, (leader + 2) % 3];
    let watch_client = Client::new(
        &order.iter().map(|i| format!("http://{}", c.client_addrs[*i])).collect::<Vec<_>>(),
        Duration::from_secs(1),
    )
    .unwrap();
    let mut stream = watch_client.watch(prefix_watch("w/", 0)).await.expect("watch");
    let created = stream.next().await.unwrap().unwrap();
    assert!(created.created);
    let start = created.header.unwrap().revision + 1;
    let events: Arc<Mutex<Vec<i64>>> = Default::default();
    let collected = events.clone();
    let reader = tokio::spawn(async move {
        while let Some(resp) = stream.next().await {
            let resp: WatchResponse = resp.expect("watch response");
            assert!(!resp.canceled, "watch cancelled: {}", resp.cancel_reason);
            let mut got = collected.lock().await;
            for e in resp.events {
                assert_eq!(e.r#type, EventType::Put as i32);
                got.push(e.kv.unwrap().mod_revision);
            }
        }
    });

    let writer = c.client_all();
    let mut acked = write(&writer, "a", 20).await;
    // The leader dies; a new one is elected.
    c.stop(leader).await;
    c.wait_leader().await;
    acked.extend(write(&writer, "b", 20).await);
    c.restart(leader).await;
    acked.extend(write(&writer, "c", 20).await);
    // The member the watcher is connected to dies: the client reconnects.
    c.stop(follower).await;
    c.wait_leader().await;
    acked.extend(write(&writer, "d", 20).await);
    c.restart(follower).await;
    acked.extend(write(&writer, "e", 20).await);

    let last = *acked.iter().max().unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let got = events.lock().await.clone();
        if got.last() >= Some(&last) {
            // Every revision once, in order: the watched prefix is the only
            // thing written, so revisions are contiguous.
            let expected: Vec<i64> = (start..=*got.last().unwrap()).collect();
            assert_eq!(got, expected, "events out of order, missing or repeated");
            let seen: BTreeSet<i64> = got.into_iter().collect();
            assert!(acked.iter().all(|r| seen.contains(r)), "an acknowledged write has no event");
            break;
        }
        assert!(Instant::now() < deadline, "watch stalled at {:?} of {last}", got.last());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    reader.abort();
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watch_on_a_compacted_revision_is_cancelled_with_the_compact_revision() {
    let c = TestCluster::start(3, |_| {}).await;
    let client = c.client_all();
    let mut revs = Vec::new();
    for i in 0..6 {
        revs.push(client.put(put(&format!("w/{i}"), "v")).await.unwrap().header.unwrap().revision);
    }
    client.compact(CompactionRequest { revision: revs[3], physical: false }).await.unwrap();
    // Each member serves watches from its own state: wait until every one
    // has applied the compaction.
    let leader = c.wait_leader().await;
    let target = c.applied(leader);
    for i in 0..3 {
        c.wait_applied(i, target).await;
    }
    for i in 0..3 {
        let mut s = c.client(i).watch(prefix_watch("w/", revs[1])).await.unwrap();
        assert!(s.next().await.unwrap().unwrap().created);
        let cancel = s.next().await.unwrap().unwrap();
        assert!(cancel.canceled, "member {i}");
        assert_eq!(cancel.compact_revision, revs[3]);
        // From the compacted revision itself, history is still there.
        let mut s = c.client(i).watch(prefix_watch("w/", revs[3])).await.unwrap();
        assert!(s.next().await.unwrap().unwrap().created);
        let mut got = Vec::new();
        while got.len() < 3 {
            let r = s.next().await.unwrap().unwrap();
            got.extend(r.events.iter().map(|e| e.kv.as_ref().unwrap().mod_revision));
        }
        assert_eq!(got, revs[3..].to_vec());
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_watcher_is_caught_up_from_history_not_skipped() {
    let c = TestCluster::start(3, |_| {}).await;
    let client = c.client(0);
    let mut s = client.watch(prefix_watch("w/", 0)).await.unwrap();
    let start = s.next().await.unwrap().unwrap().header.unwrap().revision + 1;
    // Far more revisions than the member buffers for watchers, and more
    // bytes than the connection holds, while the watcher reads nothing.
    let writer = Arc::new(c.client_all());
    let total = 3200;
    put_many(&writer, total, "").await;
    let mut got = Vec::new();
    while got.len() < total {
        let r = tokio::time::timeout(WAIT, s.next()).await.expect("events keep coming").unwrap().unwrap();
        assert!(!r.canceled);
        got.extend(r.events.iter().map(|e| e.kv.as_ref().unwrap().mod_revision));
    }
    let expected: Vec<i64> = (start..start + total as i64).collect();
    assert_eq!(got, expected);
    c.shutdown().await;
}

/// Puts `total` keys `w/{t}-{i}` from 16 writers through `writer`; returns
/// each key with its revision. Values of 4 KiB, so that the events of a
/// watch not read soon fill the connection's flow-control window.
async fn put_many(writer: &Arc<Client>, total: usize, tag: &str) -> Vec<(String, i64)> {
    let mut tasks = Vec::new();
    for t in 0..16 {
        let (w, tag) = (writer.clone(), tag.to_string());
        tasks.push(tokio::spawn(async move {
            let mut done = Vec::new();
            for i in 0..total / 16 {
                let key = format!("w/{t}-{tag}{i}");
                let req = PutRequest { key: key.clone().into(), value: vec![b'x'; 4096], ..Default::default() };
                done.push((key, w.put(req).await.expect("put").header.unwrap().revision));
            }
            done
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watches_sharing_a_slow_stream_each_get_every_event_once_in_order() {
    use kvd::proto::etcdserverpb::watch_client::WatchClient;
    use kvd::proto::etcdserverpb::watch_request::RequestUnion;
    use kvd::proto::etcdserverpb::WatchRequest;
    let c = TestCluster::start(3, |_| {}).await;
    let (requests, rx) = tokio::sync::mpsc::channel(4);
    let create = |id: i64, w: WatchCreateRequest| {
        let requests = requests.clone();
        async move {
            let r = WatchCreateRequest { watch_id: id, ..w };
            requests.send(WatchRequest { request_union: Some(RequestUnion::CreateRequest(r)) }).await.unwrap()
        }
    };
    // 1: the prefix from now on; 2: [w/0, w/5) from now on.
    create(1, prefix_watch("w/", 0)).await;
    create(2, WatchCreateRequest { key: "w/0".into(), range_end: "w/5".into(), ..Default::default() }).await;
    let channel = kvd::client::channel(&format!("http://{}", c.client_addrs[1]), WAIT, None).unwrap();
    let mut s =
        WatchClient::new(channel).watch(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    let mut start = 0;
    for _ in 0..2 {
        let created = s.message().await.unwrap().unwrap();
        assert!(created.created && !created.canceled);
        start = created.header.unwrap().revision + 1;
    }
    // Far more revisions than the member buffers for watchers, while the
    // client reads nothing; halfway, a third watch of the prefix from the
    // start, with previous values, which replays history meanwhile.
    let writer = Arc::new(c.client_all());
    let mut written = put_many(&writer, 800, "a").await;
    create(3, WatchCreateRequest { prev_kv: true, ..prefix_watch("w/", start) }).await;
    written.extend(put_many(&writer, 800, "b").await);
    written.sort_by_key(|(_, rev)| *rev);
    let all: Vec<i64> = written.iter().map(|(_, rev)| *rev).collect();
    let some: Vec<i64> =
        written.iter().filter(|(k, _)| k.as_str() >= "w/0" && k.as_str() < "w/5").map(|(_, rev)| *rev).collect();
    assert!(!some.is_empty() && some.len() < all.len());
    let mut got: std::collections::BTreeMap<i64, Vec<i64>> = Default::default();
    let done = |got: &std::collections::BTreeMap<i64, Vec<i64>>| {
        [(1, all.len()), (2, some.len()), (3, all.len())].iter().all(|(id, n)| got.get(id).map_or(0, Vec::len) >= *n)
    };
    while !done(&got) {
        let r = tokio::time::timeout(WAIT, s.message()).await.expect("events keep coming").unwrap().unwrap();
        assert!(!r.canceled, "watch {} cancelled: {}", r.watch_id, r.cancel_reason);
        for e in &r.events {
            let kv = e.kv.as_ref().unwrap();
            // Each key is put once: only the third watch has previous values, and none.
            assert!(e.prev_kv.is_none());
            got.entry(r.watch_id).or_default().push(kv.mod_revision);
        }
    }
    assert_eq!(got[&1], all, "watch 1");
    assert_eq!(got[&2], some, "watch 2");
    assert_eq!(got[&3], all, "watch 3");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_quiet_watches_that_asked_get_progress_notifications() {
    use kvd::proto::etcdserverpb::watch_client::WatchClient;
    use kvd::proto::etcdserverpb::watch_request::RequestUnion;
    use kvd::proto::etcdserverpb::WatchRequest;
    let interval = Duration::from_millis(400);
    let c = TestCluster::start(3, |args| {
        args.extend(["--experimental-watch-progress-notify-interval".to_string(), "400ms".to_string()])
    })
    .await;
    let (requests, rx) = tokio::sync::mpsc::channel(4);
    for (id, key, notify) in [(1, "p/", true), (2, "p/", false), (3, "q/", true)] {
        let create = WatchCreateRequest { watch_id: id, progress_notify: notify, ..prefix_watch(key, 0) };
        requests.send(WatchRequest { request_union: Some(RequestUnion::CreateRequest(create)) }).await.unwrap();
    }
    let channel = kvd::client::channel(&format!("http://{}", c.client_addrs[2]), WAIT, None).unwrap();
    let mut s =
        WatchClient::new(channel).watch(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    // Puts under p/ one after another for eight intervals, then none:
    // watch 1 has events and no notification until the puts stop; watch 3
    // sees no events and is notified throughout; watch 2 never is.
    let client = c.client_all();
    let writing_until = Instant::now() + 8 * interval;
    let writer = tokio::spawn(async move {
        let mut rev = 0;
        while Instant::now() < writing_until {
            rev = client.put(put("p/k", "v")).await.unwrap().header.unwrap().revision;
        }
        rev
    });
    let mut notified: Vec<(i64, i64, Instant)> = Vec::new();
    loop {
        let r = tokio::time::timeout(WAIT, s.message()).await.expect("the stream answers").unwrap().unwrap();
        if r.created || !r.events.is_empty() {
            continue;
        }
        assert!(!r.canceled);
        notified.push((r.watch_id, r.header.unwrap().revision, Instant::now()));
        // Done once watch 1 has been notified, which it is once the puts stop.
        if r.watch_id == 1 {
            break;
        }
    }
    let rev = writer.await.unwrap();
    assert!(notified.iter().all(|(id, _, _)| *id != 2), "{notified:?}");
    assert!(notified.iter().filter(|(id, _, at)| *id == 3 && *at < writing_until).count() >= 2, "{notified:?}");
    let (_, at_rev, at) = notified.iter().find(|(id, _, _)| *id == 1).unwrap();
    assert!(*at > writing_until, "watch 1 notified while it had events: {notified:?}");
    assert_eq!(*at_rev, rev, "a notification says how far the watch is");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_of_a_dead_holder_vanish_within_ttl_and_an_election_timeout_and_not_before() {
    let c = TestCluster::start(3, |_| {}).await;
    let client = c.client_all();
    let ttl = 2;
    let session = client.session(ttl).await.unwrap();
    client
        .put(PutRequest { key: "held".into(), value: "v".into(), lease: session.id(), ..Default::default() })
        .await
        .unwrap();
    // Alive while keep-alives arrive: three TTLs.
    let until = Instant::now() + Duration::from_secs(3 * ttl as u64);
    while Instant::now() < until {
        assert_eq!(client.range(get("held")).await.unwrap().kvs.len(), 1, "expired while kept alive");
        assert!(matches!(session.state(), LeaseState::Alive(_)));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The holder dies: no more keep-alives. One last renewal marks the start.
    drop(session);
    let lease = client.lease_leases().await.unwrap().leases[0].id;
    let last_renewal = Instant::now();
    assert_eq!(client.lease_keep_alive_once(lease).await.unwrap(), ttl);
    let bound = Duration::from_secs(ttl as u64) + ELECTION;
    loop {
        let present = client.range(get("held")).await.unwrap().kvs.len() == 1;
        let elapsed = last_renewal.elapsed();
        if !present {
            println!("key vanished {elapsed:?} after the last renewal (TTL {ttl}s, bound {bound:?})");
            assert!(elapsed >= Duration::from_secs(ttl as u64) - Duration::from_millis(100), "expired early");
            assert!(elapsed <= bound, "took {elapsed:?}, more than TTL + one election timeout");
            break;
        }
        assert!(elapsed <= bound + Duration::from_millis(500), "key still there after {elapsed:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lease_kept_alive_through_a_follower_survives_the_leader_being_killed() {
    let mut c = TestCluster::start(3, |_| {}).await;
    let leader = c.wait_leader().await;
    let follower = (leader + 1) % 3;
    let via_follower = c.client(follower);
    // Long enough that keep-alives delayed by the failover (and by a loaded
    // test machine) still arrive within the TTL.
    let ttl = 4;
    let session = via_follower.session(ttl).await.unwrap();
    via_follower
        .put(PutRequest { key: "svc".into(), value: "v".into(), lease: session.id(), ..Default::default() })
        .await
        .unwrap();
    c.stop(leader).await;
    let new_leader = c.wait_leader().await;
    assert_ne!(new_leader, leader);
    // Two TTLs later the lease and its key are still there.
    let until = Instant::now() + Duration::from_secs(2 * ttl as u64);
    while Instant::now() < until {
        assert_eq!(via_follower.range(get("svc")).await.unwrap().kvs.len(), 1, "lease expired after failover");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(matches!(session.state(), LeaseState::Alive(_)), "the client saw its lease lost");
    let ttl_left = via_follower.lease_time_to_live(session.id(), true).await.unwrap();
    assert!(ttl_left.ttl > 0 && ttl_left.keys == vec![b"svc".to_vec()], "{ttl_left:?}");
    session.close(&via_follower).await.unwrap();
    assert!(via_follower.range(get("svc")).await.unwrap().kvs.is_empty(), "revoking deletes the key");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn election_and_lock_handles_hand_over_in_order_with_growing_fencing_tokens() {
    let c = TestCluster::start(3, |_| {}).await;
    let clients: Vec<Client> = (0..3).map(|i| c.client(i)).collect();
    let mut sessions = Vec::new();
    for cl in &clients {
        sessions.push(cl.session(5).await.unwrap());
    }
    // Observe from the start.
    let mut observe = clients[0].observe(b"svc").await.unwrap();
    let e0 = clients[0].election("svc", &sessions[0]);
    let lead0 = e0.campaign(b"r0").await.unwrap();
    // Two more candidates wait their turn.
    let e1 = clients[1].election("svc", &sessions[1]);
    let e2 = clients[2].election("svc", &sessions[2]);
    let c1 = tokio::spawn(async move { (e1.campaign(b"r1").await, e1) });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let c2 = tokio::spawn(async move { (e2.campaign(b"r2").await, e2) });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!c1.is_finished() && !c2.is_finished(), "a second leader while the first leads");
    e0.proclaim(&lead0, b"r0-v2").await.unwrap();
    assert_eq!(e0.leader().await.unwrap().kv.unwrap().value, b"r0-v2");
    e0.resign(lead0.clone()).await.unwrap();
    let (lead1, e1) = c1.await.unwrap();
    let lead1 = lead1.unwrap();
    assert!(lead1.rev() > lead0.rev());
    assert!(!c2.is_finished());
    // The first leader can no longer proclaim.
    assert!(e0.proclaim(&lead0, b"stale").await.unwrap_err().message().contains("election: not leader"));
    e1.resign(lead1.clone()).await.unwrap();
    let (lead2, _e2) = c2.await.unwrap();
    assert!(lead2.unwrap().rev() > lead1.rev());
    let mut seen = Vec::new();
    while seen.len() < 4 {
        let r = tokio::time::timeout(WAIT, observe.message()).await.unwrap().unwrap().unwrap();
        seen.push(r.kv.unwrap().value);
    }
    assert_eq!(seen, [b"r0".to_vec(), b"r0-v2".to_vec(), b"r1".to_vec(), b"r2".to_vec()]);

    // Locks: one holder at a time, tokens grow.
    let l0 = clients[0].lock_handle("job", &sessions[0]);
    let g0 = l0.lock().await.unwrap();
    let l1 = clients[1].lock_handle("job", &sessions[1]);
    let waiter = tokio::spawn(async move { (l1.lock().await, l1) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished(), "two holders of one lock");
    let r0 = g0.rev;
    l0.unlock(g0).await.unwrap();
    let (g1, _l1) = waiter.await.unwrap();
    assert!(g1.unwrap().rev > r0);
    c.shutdown().await;
}

/// A leader cut off from the others still counts its lease deadlines down;
/// when it learns it was replaced, its own expiry decisions must not reach
/// the new leader, which is keeping the lease alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deposed_leader_does_not_expire_a_lease_the_new_leader_keeps_alive() {
    let c = TestCluster::start(3, |_| {}).await;
    let old = c.wait_leader().await;
    let others: Vec<usize> = (0..3).filter(|&i| i != old).collect();
    let via = c.client(others[0]);
    let ttl = 2;
    let lease = via.lease_grant(ttl, 0).await.unwrap().id;
    via.put(PutRequest { key: "held".into(), value: "v".into(), lease, ..Default::default() }).await.unwrap();

    // Cut the leader off, both ways.
    let ids: Vec<u64> = (0..3).map(|i| c.member(i).member.id).collect();
    for &o in &others {
        c.member(old).member.network.block(ids[o]);
        c.member(o).member.network.block(ids[old]);
    }
    // A new leader among the others.
    let deadline = Instant::now() + WAIT;
    let new = loop {
        let found = others.iter().copied().find(|&o| {
            let m = c.member(o).member.raft.metrics().borrow().clone();
            m.current_leader == Some(ids[o]) && m.state.is_leader()
        });
        if let Some(n) = found {
            break n;
        }
        assert!(Instant::now() < deadline, "no new leader");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Keep the lease alive through the new leader well past the old one's
    // deadline, then heal: the old leader steps down, and whatever it had
    // decided about the lease must stay with it.
    let keep = |until: Instant| {
        let via = via.clone_handle();
        async move {
            while Instant::now() < until {
                assert!(via.lease_keep_alive_once(lease).await.unwrap() > 0, "the lease was lost while kept alive");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    };
    keep(Instant::now() + Duration::from_secs(3 * ttl as u64)).await;
    for &o in &others {
        c.member(old).member.network.heal();
        c.member(o).member.network.heal();
    }
    let until = Instant::now() + Duration::from_secs(2 * ttl as u64);
    let keeper = tokio::spawn(keep(until));
    while Instant::now() < until {
        assert_eq!(via.range(get("held")).await.unwrap().kvs.len(), 1, "the deposed leader expired the lease");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    keeper.await.unwrap();
    assert_ne!(new, old);
    c.shutdown().await;
}

/// Keep-alives on the leader share a heartbeat round that confirmed its
/// leadership for a quarter of an election timeout, instead of a round
/// each; a leader cut off from the others answers none once that has
/// passed since it was cut off.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keep_alives_share_a_recent_confirmation_of_leadership_and_a_cut_off_leader_renews_nothing() {
    use std::sync::atomic::Ordering;

    let c = TestCluster::start(3, |_| {}).await;
    let leader = c.wait_leader().await;
    let client = c.client(leader);
    let lease = client.lease_grant(60, 0).await.unwrap().id;
    let rounds = &c.member(leader).member.metrics.leadership_rounds;
    let before = rounds.load(Ordering::Relaxed);
    for _ in 0..50 {
        assert_eq!(client.lease_keep_alive_once(lease).await.unwrap(), 60);
    }
    let taken = rounds.load(Ordering::Relaxed) - before;
    assert!(taken < 50, "50 keep-alives one at a time took {taken} heartbeat rounds");

    // Cut the leader off, both ways.
    let ids: Vec<u64> = (0..3).map(|i| c.member(i).member.id).collect();
    for o in (0..3).filter(|&o| o != leader) {
        c.member(leader).member.network.block(ids[o]);
        c.member(o).member.network.block(ids[leader]);
    }
    let grace = c.member(leader).member.lessor.grace();
    assert!(grace > Duration::ZERO);
    // The last round began before the cut: past the grace, a keep-alive
    // needs a round, which no quorum answers.
    tokio::time::sleep_until((Instant::now() + grace).into()).await;
    for _ in 0..3 {
        let answer = tokio::time::timeout(Duration::from_secs(2), client.lease_keep_alive_once(lease)).await;
        assert!(
            !matches!(answer, Ok(Ok(ttl)) if ttl > 0),
            "a leader cut off for longer than the grace ({grace:?}) renewed a lease: {answer:?}"
        );
    }
    for i in 0..3 {
        c.member(i).member.network.heal();
    }
    c.shutdown().await;
}

/// `kvctl lock NAME -- CMD` releases the lock and revokes its lease however
/// it ends: here the command cannot even start, and the next holder must not
/// wait for the lease's TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kvctl_lock_releases_the_lock_when_its_command_cannot_start() {
    let c = TestCluster::start(3, |_| {}).await;
    let eps: Vec<String> = c.client_addrs.iter().map(|a| a.to_string()).collect();
    let kvctl = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_kvctl"))
            .arg("--endpoints")
            .arg(eps.join(","))
            .args(args)
            .output()
            .expect("run kvctl")
    };
    let out = kvctl(&["lock", "deploy", "--", "/nonexistent/command"]);
    assert_eq!(out.status.code(), Some(1), "kvctl reports the command that could not start");
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot run"), "{out:?}");
    let all = c.client_all();
    let held =
        all.range(RangeRequest { key: b"deploy/".to_vec(), range_end: b"deploy0".to_vec(), ..Default::default() });
    assert!(held.await.expect("range").kvs.is_empty(), "no key of the failed attempt holds the lock");
    let leases = kvctl(&["lease", "list"]);
    assert!(String::from_utf8_lossy(&leases.stdout).contains("found 0 leases"), "its lease is revoked: {leases:?}");
    // The next holder takes the lock at once, well within the 60 s TTL.
    let started = std::time::Instant::now();
    let out = kvctl(&["lock", "deploy", "--", "true"]);
    assert!(out.status.success(), "{out:?}");
    assert!(started.elapsed() < std::time::Duration::from_secs(20), "the next holder waited {:?}", started.elapsed());
    c.shutdown().await;
}

/// A keep-alive stream through a follower answers every renewal of a burst,
/// though many are under way at once, in order, each with its own lease's
/// TTL (0 for a lease never granted), and the answers still due when the
/// client stops sending arrive before the stream ends. The follower renews
/// them in batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_keep_alive_stream_answers_every_renewal_of_a_burst_through_a_follower() {
    use kvd::proto::etcdserverpb::lease_client::LeaseClient;
    use kvd::proto::etcdserverpb::LeaseKeepAliveRequest;
    use std::sync::atomic::Ordering;

    let c = TestCluster::start(3, |_| {}).await;
    let leader = c.wait_leader().await;
    let follower = (leader + 1) % 3;
    let client = c.client(follower);
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(client.lease_grant(60, 0).await.unwrap().id);
    }
    let never_granted = 0x7ead_0001;
    let mut asked: Vec<i64> = (0..2000).map(|i| ids[i % ids.len()]).collect();
    asked.push(never_granted);
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", c.client_addrs[follower]))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let requests = tokio_stream::iter(asked.clone().into_iter().map(|id| LeaseKeepAliveRequest { id }));
    let mut answers = LeaseClient::new(channel).lease_keep_alive(requests).await.unwrap().into_inner();
    let mut got = Vec::new();
    while let Some(a) = tokio::time::timeout(WAIT, answers.message()).await.expect("answers keep coming").unwrap() {
        if a.id == never_granted {
            assert_eq!(a.ttl, 0, "a lease never granted answers TTL 0");
        } else {
            assert!(a.ttl > 0 && a.ttl <= 60, "lease {:x} answered TTL {}", a.id, a.ttl);
        }
        got.push(a.id);
    }
    assert_eq!(got, asked, "one answer per renewal asked for, in the order asked, as etcd answers");
    // The follower renewed them together, not with a call to the leader
    // each.
    let metrics = &c.member(follower).member.metrics;
    let (renewals, batches) =
        (metrics.lease_renewals.load(Ordering::Relaxed), metrics.lease_renewal_batches.load(Ordering::Relaxed));
    assert_eq!(renewals, 2001);
    assert!(batches < 100, "{renewals} keep-alives in {batches} batches");
    c.shutdown().await;
}

/// Keep-alives sent through a follower while leadership moves away from the
/// leader and then to that follower itself: each is answered with its
/// lease's TTL, in order, and the stream never fails, since a batch under
/// way when the leader changes is asked again of the next one (a renewal
/// may be repeated safely).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keep_alives_through_a_follower_are_answered_across_leader_changes() {
    use kvd::proto::etcdserverpb::lease_client::LeaseClient;
    use kvd::proto::etcdserverpb::LeaseKeepAliveRequest;
    use std::sync::atomic::{AtomicBool, Ordering};

    let c = TestCluster::start(3, |_| {}).await;
    let leader = c.wait_leader().await;
    let via = (leader + 1) % 3;
    let other = (leader + 2) % 3;
    let client = c.client(via);
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(client.lease_grant(60, 0).await.unwrap().id);
    }
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", c.client_addrs[via]))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let mut answers = LeaseClient::new(channel)
        .lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    // Keep-alives go until told to stop; the sender waits whenever the
    // member is behind.
    let done = Arc::new(AtomicBool::new(false));
    let sender = {
        let (done, ids) = (done.clone(), ids.clone());
        tokio::spawn(async move {
            let mut sent = Vec::new();
            while !done.load(Ordering::Relaxed) {
                let id = ids[sent.len() % ids.len()];
                if tx.send(LeaseKeepAliveRequest { id }).await.is_err() {
                    break;
                }
                sent.push(id);
            }
            sent
        })
    };
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        while let Some(a) = answers.message().await.expect("the keep-alive stream never fails") {
            assert!(a.ttl > 0 && a.ttl <= 60, "lease {:x} answered TTL {}", a.id, a.ttl);
            got.push(a.id);
        }
        got
    });
    let metrics = &c.member(via).member.metrics;
    let renewed = |n: usize| async move {
        let from = metrics.lease_renewal_batches.load(Ordering::Relaxed);
        let deadline = Instant::now() + WAIT;
        while metrics.lease_renewal_batches.load(Ordering::Relaxed) < from + n as u64 {
            assert!(Instant::now() < deadline, "keep-alives stopped being renewed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    renewed(5).await;
    let to = c.member(other).member.id;
    c.client(leader).move_leader(to).await.expect("move-leader away");
    assert_eq!(c.wait_leader().await, other);
    renewed(5).await;
    let to = c.member(via).member.id;
    c.client(other).move_leader(to).await.expect("move-leader to the member the keep-alives reach");
    assert_eq!(c.wait_leader().await, via);
    renewed(5).await;
    done.store(true, Ordering::Relaxed);
    let sent = sender.await.unwrap();
    let got = tokio::time::timeout(WAIT, reader).await.expect("every answer came").unwrap();
    assert_eq!(got, sent, "one answer per keep-alive, in the order sent");
    assert!(sent.len() > 100, "only {} keep-alives were sent", sent.len());
    c.shutdown().await;
}

/// More leases than the leader revokes at once, expiring together: every
/// one is revoked and takes its key with it, the rest following as the
/// first revocations apply, and the leases' keys go no sooner than their
/// TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn more_leases_than_are_revoked_at_once_all_expire_with_their_keys() {
    let c = TestCluster::start(3, |_| {}).await;
    let leader = c.wait_leader().await;
    let leases = 2 * kvd::node::lease::MAX_REVOKING + 500;
    let ttl = 6;
    let tasks = 32;
    let granted_at = Instant::now();
    let mut granting = tokio::task::JoinSet::new();
    for t in 0..tasks {
        let client = c.client(leader);
        granting.spawn(async move {
            for i in (t..leases).step_by(tasks) {
                let id = client.lease_grant(ttl, 0).await.expect("grant").id;
                let key = format!("storm/{i:05}");
                client
                    .put(PutRequest { key: key.into(), value: "v".into(), lease: id, ..Default::default() })
                    .await
                    .expect("put");
            }
        });
    }
    while let Some(done) = granting.join_next().await {
        done.expect("granting task");
    }
    let client = c.client(leader);
    let count = || async {
        let req = RangeRequest {
            key: "storm/".into(),
            range_end: kvd::mvcc::keys::prefix_end(b"storm/"),
            count_only: true,
            ..Default::default()
        };
        client.range(req).await.expect("count").count
    };
    let left = count().await;
    if granted_at.elapsed() < Duration::from_secs(ttl as u64) {
        assert_eq!(left, leases as i64, "keys went before their lease's TTL");
    }
    let until = Instant::now() + WAIT + Duration::from_secs(ttl as u64);
    loop {
        let left = count().await;
        if left == 0 {
            break;
        }
        assert!(Instant::now() < until, "{left} keys of expired leases are still there");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let still = client.lease_leases().await.expect("leases").leases.len();
    assert_eq!(still, 0, "leases still granted after they expired");
    c.shutdown().await;
}
