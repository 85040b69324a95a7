//! Bad input against a three-member kvd, each case sent to a real etcd 3.4
//! too: the answer (gRPC code, and etcd's message where etcd makes one) must
//! be etcd's, the server must stay up, and a client writing all along must
//! notice nothing.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut};
use kvd::client::Client;
use kvd::proto::etcdserverpb::request_op::Request as Op;
use kvd::proto::etcdserverpb::*;
use support::{get, put, wait_ready, Etcd, TestCluster, WAIT};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Code, Status};

/// What a call answered: the code, and the message (kept only where it is
/// etcd's own text, not the gRPC library's).
#[derive(Debug, PartialEq)]
enum Outcome {
    Ok,
    Failed(Code, Option<String>),
}

fn outcome<T>(r: Result<T, Status>) -> Outcome {
    match r {
        Ok(_) => Outcome::Ok,
        Err(s) => {
            let own = s.message().starts_with("etcdserver:") || s.message().starts_with("mvcc:");
            Outcome::Failed(s.code(), own.then(|| s.message().to_string()))
        }
    }
}

/// Both systems, and a writer on kvd that must see no error throughout.
struct Pair {
    etcd_client: Client,
    kvd: Client,
    cluster: TestCluster,
    etcd: Etcd,
    writer_stop: Arc<AtomicBool>,
    writer_errors: Arc<AtomicU64>,
    writer: tokio::task::JoinHandle<u64>,
}

impl Pair {
    async fn start() -> Pair {
        let etcd = Etcd::start();
        let etcd_client = Client::new(std::slice::from_ref(&etcd.client), Duration::from_secs(2)).unwrap();
        wait_ready(&etcd_client).await;
        let cluster = TestCluster::start(3, |_| {}).await;
        let kvd = cluster.client_all();
        let writer_stop = Arc::new(AtomicBool::new(false));
        let writer_errors = Arc::new(AtomicU64::new(0));
        let bystander = cluster.client_all();
        let (stop, errors) = (writer_stop.clone(), writer_errors.clone());
        let writer = tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                match bystander.put(put(&format!("bystander/{}", n % 100), "v")).await {
                    Ok(_) => n += 1,
                    Err(e) => {
                        eprintln!("the bystander's put failed: {e}");
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            n
        });
        Pair { etcd_client, kvd, cluster, etcd, writer_stop, writer_errors, writer }
    }

    /// Runs `call` on both and checks that kvd answers as etcd does.
    async fn same<T, F, Fut>(&self, what: &str, call: F) -> Outcome
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let expected = outcome(call(self.etcd_client.clone_handle()).await);
        let got = outcome(call(self.kvd.clone_handle()).await);
        assert_eq!(got, expected, "{what}: kvd answered {got:?}, etcd {expected:?}");
        got
    }

    async fn finish(self) {
        self.writer_stop.store(true, Ordering::Relaxed);
        let puts = self.writer.await.unwrap();
        assert!(puts > 0, "the bystander wrote nothing");
        assert_eq!(self.writer_errors.load(Ordering::Relaxed), 0, "a bystander's write failed");
        // Every member is still up and serving.
        for i in 0..3 {
            self.cluster.client(i).range(get("bystander/0")).await.expect("member serves after the bad input");
        }
        self.cluster.shutdown().await;
    }
}

fn txn(ops: Vec<RequestOp>) -> TxnRequest {
    TxnRequest { compare: Vec::new(), success: ops, failure: Vec::new() }
}

fn put_op(key: &[u8]) -> RequestOp {
    RequestOp { request: Some(Op::RequestPut(PutRequest { key: key.to_vec(), ..Default::default() })) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_kv_requests_get_etcds_answers() {
    let p = Pair::start().await;
    let empty = PutRequest::default();
    p.same("put with an empty key", |c| {
        let r = empty.clone();
        async move { c.put(r).await }
    })
    .await;
    p.same("range with an empty key", |c| async move { c.range(RangeRequest::default()).await }).await;
    p.same("delete with an empty key", |c| async move { c.delete_range(DeleteRangeRequest::default()).await }).await;

    // Bytes that are not text round-trip exactly.
    for key in [b"nul\0key".to_vec(), vec![0xff], vec![0xff, 0xfe, 0x80, 0x00], b"\xc3\x28".to_vec()] {
        let value = [key.clone(), vec![0u8, 0xff, 0xc0]].concat();
        for c in [&p.etcd_client, &p.kvd] {
            c.put(PutRequest { key: key.clone(), value: value.clone(), ..Default::default() }).await.unwrap();
            let got = c.range(RangeRequest { key: key.clone(), ..Default::default() }).await.unwrap();
            assert_eq!(got.kvs[0].value, value, "value of {key:?}");
            assert_eq!(got.kvs[0].key, key);
        }
    }

    // Requests around --max-request-bytes (1.5 MiB): etcd refuses those a
    // little over with its own message, and far over at the gRPC layer.
    for size in [1024 * 1024 + 512 * 1024 + 1, 4 * 1024 * 1024 + 1, 64 * 1024 * 1024] {
        let big = PutRequest { key: b"big".to_vec(), value: vec![b'x'; size], ..Default::default() };
        let o = p
            .same(&format!("put of {size} bytes"), |c| {
                let r = big.clone();
                async move { c.put(r).await }
            })
            .await;
        assert_ne!(o, Outcome::Ok, "a put of {size} bytes was taken");
    }

    let many: Vec<RequestOp> = (0..129).map(|i| put_op(format!("k{i}").as_bytes())).collect();
    p.same("txn over --max-txn-ops", |c| {
        let t = txn(many.clone());
        async move { c.txn(t).await }
    })
    .await;
    p.same("txn writing one key twice", |c| async move { c.txn(txn(vec![put_op(b"d"), put_op(b"d")])).await }).await;

    // range_end edge cases, on the same data in both.
    for c in [&p.etcd_client, &p.kvd] {
        for k in ["a", "b", "c", "\u{7f}"] {
            c.put(put(k, "v")).await.unwrap();
        }
        c.put(PutRequest { key: vec![0xff, 0xff], value: b"v".to_vec(), ..Default::default() }).await.unwrap();
    }
    let ends: [(&[u8], &[u8]); 5] =
        [(b"a", b""), (b"a", b"\0"), (b"c", b"a"), (b"\xff\xff", b"\0"), (b"\xff", &[0xff, 0xff, 0xff])];
    for (key, end) in ends {
        let req = RangeRequest { key: key.to_vec(), range_end: end.to_vec(), keys_only: true, ..Default::default() };
        let a = p
            .etcd_client
            .range(req.clone())
            .await
            .map(|r| (r.kvs.iter().map(|kv| kv.key.clone()).collect::<Vec<_>>(), r.count));
        let b = p.kvd.range(req).await.map(|r| (r.kvs.iter().map(|kv| kv.key.clone()).collect::<Vec<_>>(), r.count));
        // Only keys both wrote are compared (kvd also holds the bystander's).
        let mine = |r: Result<(Vec<Vec<u8>>, i64), Status>| {
            r.map(|(keys, _)| keys.into_iter().filter(|k| !k.starts_with(b"bystander/")).collect::<Vec<_>>())
                .map_err(|s| s.code())
        };
        assert_eq!(mine(b), mine(a), "range {key:?}..{end:?}");
    }

    p.same("negative limit", |c| async move {
        c.range(RangeRequest { key: b"a".to_vec(), limit: -1, ..Default::default() }).await
    })
    .await;
    p.same("negative revision", |c| async move {
        c.range(RangeRequest { key: b"a".to_vec(), revision: -5, ..Default::default() }).await
    })
    .await;
    p.same("future revision", |c| async move {
        c.range(RangeRequest { key: b"a".to_vec(), revision: 1 << 40, ..Default::default() }).await
    })
    .await;
    for c in [&p.etcd_client, &p.kvd] {
        let rev = c.put(put("a", "w")).await.unwrap().header.unwrap().revision;
        c.compact(CompactionRequest { revision: rev, physical: true }).await.unwrap();
    }
    p.same("compacted revision", |c| async move {
        c.range(RangeRequest { key: b"a".to_vec(), revision: 2, ..Default::default() }).await
    })
    .await;
    p.same("compaction at a compacted revision", |c| async move {
        c.compact(CompactionRequest { revision: 2, physical: false }).await
    })
    .await;
    p.same("compaction at a future revision", |c| async move {
        c.compact(CompactionRequest { revision: 1 << 40, physical: false }).await
    })
    .await;
    p.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_lease_requests_get_etcds_answers() {
    let p = Pair::start().await;
    let unknown = 0x1234_5678_i64;
    p.same("put with an unknown lease", |c| async move {
        c.put(PutRequest { key: b"l".to_vec(), lease: unknown, ..Default::default() }).await
    })
    .await;
    p.same("revoke lease 0", |c| async move { c.lease_revoke(0).await }).await;
    p.same("revoke an unknown lease", |c| async move { c.lease_revoke(unknown).await }).await;
    p.same("grant a TTL over the maximum", |c| async move { c.lease_grant(9_000_000_001, 0).await }).await;
    p.same("grant a negative TTL", |c| async move { c.lease_grant(-5, 0).await }).await;
    p.same("grant with a chosen id", |c| async move { c.lease_grant(60, 777).await }).await;
    p.same("grant the same id again", |c| async move { c.lease_grant(60, 777).await }).await;
    for c in [&p.etcd_client, &p.kvd] {
        let ttl = c.lease_time_to_live(unknown, true).await.unwrap();
        assert_eq!(ttl.ttl, -1, "time to live of an unknown lease");
        assert_eq!(c.lease_keep_alive_once(unknown).await.unwrap(), 0, "keep-alive of an unknown lease");
    }
    // An expired lease is as unknown as one never granted.
    let short = p.kvd.lease_grant(1, 0).await.unwrap().id;
    let deadline = std::time::Instant::now() + WAIT;
    while p.kvd.lease_time_to_live(short, false).await.unwrap().ttl != -1 {
        assert!(std::time::Instant::now() < deadline, "a 1 s lease never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let err = p.kvd.put(PutRequest { key: b"l".to_vec(), lease: short, ..Default::default() }).await.unwrap_err();
    assert_eq!((err.code(), err.message()), (Code::NotFound, "etcdserver: requested lease not found"));
    p.finish().await;
}

/// Sends raw bytes as a gRPC request body, to test what the server does with
/// a body that is not the message it expects.
#[derive(Clone, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }
    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

async fn raw_call(url: &str, path: &'static str, body: Vec<u8>) -> Result<Vec<u8>, Status> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_string()).unwrap().connect().await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.map_err(|e| Status::unavailable(e.to_string()))?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
    grpc.unary(tonic::Request::new(body), path, RawCodec).await.map(|r| r.into_inner())
}

/// Writes garbage to a port and reads until the server closes the connection
/// (or a second passes).
fn garbage(addr: SocketAddr, bytes: &[u8]) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let _ = s.write_all(bytes);
    let mut buf = [0u8; 1024];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_messages_garbage_and_floods_leave_every_other_client_unharmed() {
    let p = Pair::start().await;
    let kvd_url = format!("http://{}", p.cluster.client_addrs[0]);
    // Not a PutRequest: a truncated varint, a wrong wire type, a length past
    // the end.
    for body in [vec![0x0a], vec![0x0a, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff], vec![0x0f, 1, 2]] {
        let etcd = raw_call(&p.etcd.client.clone(), "/etcdserverpb.KV/Put", body.clone()).await;
        let kvd = raw_call(&kvd_url, "/etcdserverpb.KV/Put", body.clone()).await;
        assert_eq!(
            kvd.as_ref().map_err(|s| s.code()).err(),
            etcd.as_ref().map_err(|s| s.code()).err(),
            "malformed put {body:?}: kvd {kvd:?}, etcd {etcd:?}"
        );
        assert!(kvd.is_err(), "a malformed put was taken");
    }
    // A method that does not exist.
    let unknown = raw_call(&kvd_url, "/etcdserverpb.KV/Nope", Vec::new()).await.unwrap_err();
    assert_eq!(unknown.code(), Code::Unimplemented);

    // Garbage on the client and peer ports of every member.
    let junk: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8).collect();
    for addr in p.cluster.client_addrs.iter().chain(&p.cluster.peer_addrs).copied() {
        tokio::task::spawn_blocking({
            let junk = junk.clone();
            move || {
                garbage(addr, &junk);
                garbage(addr, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x04\x08\x00\x00\x00\x00\x00garbage");
                garbage(addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
            }
        })
        .await
        .unwrap();
    }

    // A flood of idle connections to one member.
    let addr = p.cluster.client_addrs[1];
    let idle: Vec<TcpStream> = (0..300).filter_map(|_| TcpStream::connect(addr).ok()).collect();
    assert!(idle.len() >= 250, "connections refused early: {}", idle.len());
    p.cluster.client(1).put(put("after-flood", "v")).await.expect("a put through the flooded member");
    drop(idle);

    // A flood of watchers: many streams, many watches each.
    let mut streams = Vec::new();
    for i in 0..50 {
        let mut s = p
            .cluster
            .client(i % 3)
            .watch(WatchCreateRequest { key: b"w".to_vec(), range_end: b"x".to_vec(), ..Default::default() })
            .await
            .expect("watch");
        assert!(s.next().await.unwrap().unwrap().created);
        streams.push(s);
    }
    p.kvd.put(put("w1", "v")).await.unwrap();
    for s in &mut streams {
        let r = tokio::time::timeout(WAIT, s.next()).await.expect("event").unwrap().unwrap();
        assert_eq!(r.events.len(), 1);
    }
    drop(streams);
    p.finish().await;
}
