//! `GET /metrics` and `GET /health` on the client port, over HTTP/1.1 or
//! HTTP/2, as etcd serves them beside its gRPC API, so that monitoring set
//! up for etcd scrapes kvd unchanged.
//!
//! - `/metrics`: Prometheus text format. The names are etcd's where kvd has
//!   the same quantity (`etcd_server_has_leader`, `etcd_server_is_leader`,
//!   `etcd_server_proposals_applied_total`, `etcd_mvcc_db_total_size_in_bytes`,
//!   `etcd_debugging_mvcc_keys_total`, …) and `process_resident_memory_bytes`;
//!   `kvd_` names for the rest; then the counters and histograms of
//!   [`crate::metrics`]. This layer counts the client RPCs for them: started
//!   when a request comes in, handled when its answer's status goes out.
//! - `/health`: `{"health":"true"}` with status 200 when the member knows a
//!   leader and a linearizable read goes through within a second, as etcd's
//!   quorum read does; `{"health":"false"}` with status 503 otherwise.
//!
//! Every plain HTTP request (anything but gRPC) first passes the CORS and
//! host checks of [`super::http_access`]; gRPC calls go on to the services.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use super::http_access::HttpAccess;
use crate::auth::{Credentials, CREDENTIALS};
use crate::metrics::{self, Metrics};
use crate::node::Member;

/// How long `/health` waits for a linearizable read.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(1);

/// Wraps the gRPC services with the HTTP endpoints of [`self`](self).
pub fn layer<S>(
    member: Arc<Member>,
    progress_interval: Duration,
    access: HttpAccess,
) -> impl tower::Layer<S, Service = HttpEndpoints<S>> + Clone {
    let gateway = Arc::new(super::gateway::Gateway::new(member.clone(), progress_interval));
    let access = Arc::new(access);
    tower::layer::layer_fn(move |inner| HttpEndpoints {
        inner,
        member: member.clone(),
        gateway: gateway.clone(),
        access: access.clone(),
    })
}

/// The gRPC services `S` with `/metrics`, `/health` and etcd's JSON gateway
/// in front.
#[derive(Clone)]
pub struct HttpEndpoints<S> {
    inner: S,
    member: Arc<Member>,
    gateway: Arc<super::gateway::Gateway>,
    access: Arc<HttpAccess>,
}

type Reply = http::Response<tonic::body::Body>;

impl<S> tower::Service<http::Request<tonic::body::Body>> for HttpEndpoints<S>
where
    S: tower::Service<http::Request<tonic::body::Body>, Response = Reply>,
    S::Future: Send + 'static,
{
    type Response = Reply;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Reply, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let credentials = credentials(&req);
        if super::gateway::is_http(&req) {
            let origin = match self.access.check(&req) {
                Ok(origin) => origin,
                Err(answer) => return Box::pin(async move { Ok(*answer) }),
            };
            let member = self.member.clone();
            let gateway = self.gateway.clone();
            return Box::pin(CREDENTIALS.scope(credentials, async move {
                let mut resp = match (req.method() == http::Method::GET, req.uri().path()) {
                    (true, "/metrics") => text(http::StatusCode::OK, METRICS_TYPE, metrics(&member)),
                    (true, "/health") => health(&member).await,
                    _ => gateway.serve(req).await,
                };
                super::http_access::allow(&mut resp, origin);
                Ok(resp)
            }));
        }
        // A method kvd does not serve gets Unimplemented from the gRPC router
        // with no message; the answer is given one that says what kvd lacks.
        let path = req.uri().path().to_string();
        let Some(method) = self.member.metrics.grpc.start(&path) else {
            let answer = self.inner.call(req);
            return Box::pin(CREDENTIALS.scope(credentials, async move {
                let mut resp = answer.await?;
                super::name_unimplemented(&path, resp.headers_mut());
                Ok(resp)
            }));
        };
        let handled = Handled { metrics: self.member.metrics.clone(), method, done: false };
        // A unary call's answer is whole once it is ready.
        let started = metrics::is_timed(method).then(Instant::now);
        let answer = self.inner.call(req);
        Box::pin(CREDENTIALS.scope(credentials, async move {
            let mut resp = answer.await?;
            if let Some(started) = started {
                handled.metrics.slow.note(&path, started.elapsed());
            }
            super::name_unimplemented(&path, resp.headers_mut());
            Ok(counted(resp, handled))
        }))
    }
}

/// Counts one RPC as handled, with its status code, once: with the code the
/// answer ends with, or as canceled if it is dropped before that (its
/// client went away).
struct Handled {
    metrics: Arc<Metrics>,
    method: usize,
    done: bool,
}

impl Handled {
    fn finish(&mut self, code: usize) {
        if !self.done {
            self.done = true;
            self.metrics.grpc.handled(self.method, code);
        }
    }
}

impl Drop for Handled {
    fn drop(&mut self) {
        self.finish(metrics::CANCELED);
    }
}

/// The code of a `grpc-status` header or trailer.
fn status_code(headers: &http::HeaderMap) -> Option<usize> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// The answer, set to count its RPC handled when it ends: at once when it
/// carries its status in its headers (an error before any message), else
/// when its body's trailers go out.
fn counted(resp: Reply, mut handled: Handled) -> Reply {
    if let Some(code) = status_code(resp.headers()) {
        handled.finish(code);
        return resp;
    }
    resp.map(|inner| tonic::body::Body::new(CountedBody { inner, handled }))
}

/// A gRPC answer's body that counts its RPC handled when it ends.
struct CountedBody {
    inner: tonic::body::Body,
    handled: Handled,
}

impl http_body::Body for CountedBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    self.handled.finish(status_code(trailers).unwrap_or(metrics::UNKNOWN));
                }
            }
            Poll::Ready(Some(Err(status))) => self.handled.finish(status.code() as usize),
            // Ended without trailers: not a whole gRPC answer.
            Poll::Ready(None) => self.handled.finish(metrics::UNKNOWN),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The credentials a request presents: its token, and the common name of
/// the client certificate of its TLS connection.
fn credentials<B>(req: &http::Request<B>) -> Credentials {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    let mut credentials = Credentials::from_headers(req.headers());
    credentials.common_name = req
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|info| info.peer_certs())
        .and_then(|certs| certs.first().and_then(|der| crate::tls::common_name(der)));
    credentials
}

/// `/health`'s answer.
async fn health(member: &Member) -> Reply {
    let healthy = member.leader().is_some()
        && matches!(tokio::time::timeout(HEALTH_TIMEOUT, member.read_barrier()).await, Ok(Ok(())));
    let (status, body) = if healthy {
        (http::StatusCode::OK, r#"{"health":"true"}"#)
    } else {
        (http::StatusCode::SERVICE_UNAVAILABLE, r#"{"health":"false"}"#)
    };
    text(status, "text/plain; charset=utf-8", format!("{body}\n"))
}

/// The content type of Prometheus' text format.
const METRICS_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

fn text(status: http::StatusCode, content_type: &'static str, body: String) -> Reply {
    let mut resp = http::Response::new(tonic::body::Body::new(http_body_util::Full::new(bytes::Bytes::from(body))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(content_type));
    resp
}

/// The metrics, in Prometheus text format.
fn metrics(member: &Member) -> String {
    let m = member.raft.metrics().borrow().clone();
    let leader = m.current_leader;
    let (revision, compacted, keys) = {
        let state = member.state.read();
        (state.store.revision(), state.store.compacted(), state.store.len())
    };
    let mut out = String::new();
    let mut put =
        |name: &str, kind: &str, help: &str, value: f64| metrics::write_one(&mut out, name, kind, help, value);
    put(
        "etcd_server_has_leader",
        "gauge",
        "Whether a leader exists. 1 is existence, 0 is not.",
        flag(leader.is_some()),
    );
    put("etcd_server_is_leader", "gauge", "Whether this member is the leader.", flag(leader == Some(member.id)));
    put("kvd_raft_term", "gauge", "The Raft term of this member.", m.current_term as f64);
    put(
        "etcd_server_proposals_applied_total",
        "gauge",
        "The index of the last Raft entry applied.",
        m.last_applied.map_or(0, |l| l.index) as f64,
    );
    put(
        "kvd_raft_last_log_index",
        "gauge",
        "The index of the last entry in this member's Raft log.",
        m.last_log_index.unwrap_or(0) as f64,
    );
    put(
        "kvd_raft_snapshot_index",
        "gauge",
        "The index of the last entry in this member's latest snapshot (0 before its first).",
        m.snapshot.map_or(0, |l| l.index) as f64,
    );
    put(
        "etcd_mvcc_db_total_size_in_bytes",
        "gauge",
        "Total size of the underlying database in bytes.",
        member.state.size_on_disk() as f64,
    );
    put("etcd_debugging_mvcc_keys_total", "gauge", "Total number of keys.", keys as f64);
    put("etcd_debugging_mvcc_current_revision", "gauge", "The current revision of the store.", revision as f64);
    // -1 before any compaction, as etcd says.
    let compacted = if compacted == 0 { -1 } else { compacted };
    put(
        "etcd_debugging_mvcc_compact_revision",
        "gauge",
        "The revision of the last compaction in the store.",
        compacted as f64,
    );
    put(
        "etcd_server_proposals_pending",
        "gauge",
        "The current number of pending proposals to commit.",
        member.proposals.pending() as f64,
    );
    if let Some(rss) = resident_bytes() {
        put("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", rss as f64);
    }
    member.metrics.render(&mut out);
    out
}

fn flag(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}

/// This process's resident memory, from `/proc/self/status`.
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
