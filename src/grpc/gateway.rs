//! etcd's HTTP/JSON gateway on the client port: `GET /version`, and the
//! unary RPCs of the etcd v3 API as `POST /v3/<service>/<method>` (and under
//! `/v3beta/`, as etcd 3.4 also serves them), with the JSON etcd's gateway
//! speaks. The JSON mapping is derived from the proto definitions at build
//! time (pbjson): the proto field names, 64-bit integers as strings, bytes
//! as base64, enums by name, zero values left out; unknown fields are
//! ignored, as etcd's gateway does.
//!
//! Each request is answered by the same service code as its gRPC call, so
//! limits, checks and errors are the same. An error is answered as etcd's
//! gateway answers it: the HTTP status of its gRPC code and
//! `{"error": …, "message": …, "code": …}`. The watch and lease keep-alive
//! streams take request objects from the body, one after another, and answer
//! one `{"result": …}` object per line, sent as each response comes, as do
//! election observe and snapshot. Unknown paths get 404.

use std::future::Future;
use std::sync::Arc;

use http_body_util::BodyExt;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::{Code, Status};

use super::auth::AuthService;
use super::cluster::ClusterService;
use super::election::ElectionService;
use super::kv::KvService;
use super::lease::LeaseService;
use super::lock::LockService;
use super::maintenance::{MaintenanceService, API_VERSION};
use super::watch::WatchService;
use crate::node::Member;
use crate::proto::etcdserverpb::auth_server::Auth;
use crate::proto::etcdserverpb::cluster_server::Cluster;
use crate::proto::etcdserverpb::kv_server::Kv;
use crate::proto::etcdserverpb::lease_server::Lease;
use crate::proto::etcdserverpb::maintenance_server::Maintenance;
use crate::proto::v3electionpb::election_server::Election;
use crate::proto::v3lockpb::lock_server::Lock;

type Reply = http::Response<tonic::body::Body>;

/// The services the gateway calls, one of each.
pub struct Gateway {
    kv: KvService,
    lease: LeaseService,
    cluster: ClusterService,
    maintenance: MaintenanceService,
    lock: LockService,
    election: ElectionService,
    auth: AuthService,
    watch: WatchService,
    /// Largest body taken: what gRPC takes.
    max_body: usize,
}

/// Whether `req` is for the gateway rather than for gRPC: anything that is
/// not a gRPC call.
pub fn is_http(req: &http::Request<tonic::body::Body>) -> bool {
    !req.headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

impl Gateway {
    /// A gateway for `member`.
    pub fn new(member: Arc<Member>, progress_interval: std::time::Duration) -> Gateway {
        let max_body = member.limits.max_request_bytes + super::GRPC_OVERHEAD_BYTES;
        Gateway {
            watch: WatchService::new(member.clone(), progress_interval),
            kv: KvService::new(member.clone()),
            lease: LeaseService::new(member.clone()),
            cluster: ClusterService::new(member.clone()),
            maintenance: MaintenanceService::new(member.clone()),
            lock: LockService::new(member.clone()),
            election: ElectionService::new(member.clone()),
            auth: AuthService::new(member),
            max_body,
        }
    }

    /// Answers one HTTP request.
    pub async fn serve(&self, req: http::Request<tonic::body::Body>) -> Reply {
        let path = req.uri().path().to_string();
        if path == "/version" {
            if req.method() != http::Method::GET {
                return plain(http::StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed\n");
            }
            let body = serde_json::json!({ "etcdserver": API_VERSION, "etcdcluster": CLUSTER_VERSION });
            return json(http::StatusCode::OK, body.to_string());
        }
        let Some(route) = path.strip_prefix("/v3/").or_else(|| path.strip_prefix("/v3beta/")) else {
            return plain(http::StatusCode::NOT_FOUND, "Not Found\n");
        };
        let route = route.trim_end_matches('/').to_string();
        if !known(&route) {
            return plain(http::StatusCode::NOT_FOUND, "Not Found\n");
        }
        if req.method() != http::Method::POST {
            return plain(http::StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed\n");
        }
        match route.as_str() {
            "watch" => return streamed(self.watch.open(Box::pin(objects(req.into_body(), self.max_body)))).await,
            "lease/keepalive" => {
                return streamed(self.lease.keep_alive(Box::pin(objects(req.into_body(), self.max_body)))).await
            }
            _ => {}
        }
        let body = match read_body(req.into_body(), self.max_body).await {
            Ok(body) => body,
            Err(status) => return error(&status),
        };
        self.route(&route, &body).await
    }

    async fn route(&self, route: &str, body: &[u8]) -> Reply {
        macro_rules! call {
            ($svc:ident . $method:ident) => {
                unary(body, |r| self.$svc.$method(tonic::Request::new(r))).await
            };
        }
        match route {
            "kv/range" => call!(kv.range),
            "kv/put" => call!(kv.put),
            "kv/deleterange" => call!(kv.delete_range),
            "kv/txn" => call!(kv.txn),
            "kv/compaction" => call!(kv.compact),
            "lease/grant" => call!(lease.lease_grant),
            "lease/revoke" | "kv/lease/revoke" => call!(lease.lease_revoke),
            "lease/timetolive" | "kv/lease/timetolive" => call!(lease.lease_time_to_live),
            "lease/leases" | "kv/lease/leases" => call!(lease.lease_leases),
            "cluster/member/add" => call!(cluster.member_add),
            "cluster/member/remove" => call!(cluster.member_remove),
            "cluster/member/update" => call!(cluster.member_update),
            "cluster/member/list" => call!(cluster.member_list),
            "cluster/member/promote" => call!(cluster.member_promote),
            "maintenance/alarm" => call!(maintenance.alarm),
            "maintenance/status" => call!(maintenance.status),
            "maintenance/defragment" => call!(maintenance.defragment),
            "maintenance/hash" => call!(maintenance.hash),
            "maintenance/transfer-leadership" => call!(maintenance.move_leader),
            "lock/lock" => call!(lock.lock),
            "lock/unlock" => call!(lock.unlock),
            "election/campaign" => call!(election.campaign),
            "election/proclaim" => call!(election.proclaim),
            "election/leader" => call!(election.leader),
            "election/resign" => call!(election.resign),
            "election/observe" => server_stream(body, |r| self.election.observe(tonic::Request::new(r))).await,
            "maintenance/snapshot" => server_stream(body, |r| self.maintenance.snapshot(tonic::Request::new(r))).await,
            "auth/enable" => call!(auth.auth_enable),
            "auth/disable" => call!(auth.auth_disable),
            "auth/status" => call!(auth.auth_status),
            "auth/authenticate" => call!(auth.authenticate),
            "auth/user/add" => call!(auth.user_add),
            "auth/user/get" => call!(auth.user_get),
            "auth/user/list" => call!(auth.user_list),
            "auth/user/delete" => call!(auth.user_delete),
            "auth/user/changepw" => call!(auth.user_change_password),
            "auth/user/grant" => call!(auth.user_grant_role),
            "auth/user/revoke" => call!(auth.user_revoke_role),
            "auth/role/add" => call!(auth.role_add),
            "auth/role/get" => call!(auth.role_get),
            "auth/role/list" => call!(auth.role_list),
            "auth/role/delete" => call!(auth.role_delete),
            "auth/role/grant" => call!(auth.role_grant_permission),
            "auth/role/revoke" => call!(auth.role_revoke_permission),
            r => error(&Status::unimplemented(format!("kvd's HTTP gateway does not serve /v3/{r}"))),
        }
    }
}

/// The cluster version `/version` reports: the etcd API kvd implements.
/// etcd's clients gate features on it (Patroni picks the `/v3` prefix for
/// 3.4 and later).
const CLUSTER_VERSION: &str = "3.4.0";

/// Every path etcd 3.4's gateway has, below `/v3/`.
const ROUTES: &[&str] = &[
    "kv/range",
    "kv/put",
    "kv/deleterange",
    "kv/txn",
    "kv/compaction",
    "watch",
    "lease/grant",
    "lease/revoke",
    "kv/lease/revoke",
    "lease/keepalive",
    "lease/timetolive",
    "kv/lease/timetolive",
    "lease/leases",
    "kv/lease/leases",
    "cluster/member/add",
    "cluster/member/remove",
    "cluster/member/update",
    "cluster/member/list",
    "cluster/member/promote",
    "maintenance/alarm",
    "maintenance/status",
    "maintenance/defragment",
    "maintenance/hash",
    "maintenance/snapshot",
    "maintenance/transfer-leadership",
    "lock/lock",
    "lock/unlock",
    "election/campaign",
    "election/proclaim",
    "election/leader",
    "election/observe",
    "election/resign",
    "auth/enable",
    "auth/disable",
    "auth/status",
    "auth/authenticate",
    "auth/user/add",
    "auth/user/get",
    "auth/user/list",
    "auth/user/delete",
    "auth/user/changepw",
    "auth/user/grant",
    "auth/user/revoke",
    "auth/role/add",
    "auth/role/get",
    "auth/role/list",
    "auth/role/delete",
    "auth/role/grant",
    "auth/role/revoke",
];

fn known(route: &str) -> bool {
    ROUTES.contains(&route)
}

/// A request of type `Req` from `body` (empty or `null` means `{}`, as
/// Go's decoder leaves the request as it was on `null`).
fn decode<Req: DeserializeOwned>(body: &[u8]) -> Result<Req, Status> {
    let body = if body.trim_ascii().is_empty() || body.trim_ascii() == b"null" { &b"{}"[..] } else { body };
    serde_json::from_slice(body).map_err(|e| Status::invalid_argument(e.to_string()))
}

/// Decodes a request of type `Req` from `body` (empty means `{}`), calls
/// `f`, and answers its response or error as JSON.
async fn unary<Req, Resp, F, Fut>(body: &[u8], f: F) -> Reply
where
    Req: DeserializeOwned,
    Resp: Serialize,
    F: FnOnce(Req) -> Fut,
    Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
{
    let req: Req = match decode(body) {
        Ok(req) => req,
        Err(status) => return error(&status),
    };
    match f(req).await {
        Ok(resp) => match serde_json::to_string(resp.get_ref()) {
            Ok(text) => json(http::StatusCode::OK, text),
            Err(e) => error(&Status::internal(e.to_string())),
        },
        Err(status) => error(&status),
    }
}

/// Decodes a request of type `Req` from `body`, calls `f`, and answers the
/// stream it returns as [`streamed`] does.
async fn server_stream<Req, Resp, S, F, Fut>(body: &[u8], f: F) -> Reply
where
    Req: DeserializeOwned,
    Resp: Serialize + Send + 'static,
    S: futures::Stream<Item = Result<Resp, Status>> + Send + 'static,
    F: FnOnce(Req) -> Fut,
    Fut: Future<Output = Result<tonic::Response<S>, Status>>,
{
    let req: Req = match decode(body) {
        Ok(req) => req,
        Err(status) => return error(&status),
    };
    match f(req).await {
        Ok(resp) => streamed(resp.into_inner()).await,
        Err(status) => error(&status),
    }
}

/// The JSON objects of `body`, one after another, each decoded as it
/// arrives; at most `max` bytes of one object are held. A malformed one
/// ends the stream with an error.
fn objects<T>(body: tonic::body::Body, max: usize) -> impl futures::Stream<Item = Result<T, Status>> + Send
where
    T: DeserializeOwned + Send + 'static,
{
    futures::stream::unfold((body, Vec::<u8>::new(), false), move |(mut body, mut buf, done)| async move {
        loop {
            let start = buf.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(buf.len());
            buf.drain(..start);
            if !buf.is_empty() {
                let mut values = serde_json::Deserializer::from_slice(&buf).into_iter::<T>();
                match values.next() {
                    Some(Ok(value)) => {
                        let used = values.byte_offset();
                        buf.drain(..used);
                        return Some((Ok(value), (body, buf, done)));
                    }
                    Some(Err(e)) if e.is_eof() && !done => {}
                    Some(Err(e)) => {
                        // Nothing more is read after a malformed object.
                        return Some((Err(Status::unknown(e.to_string())), (body, Vec::new(), true)));
                    }
                    None => {}
                }
            }
            if done {
                return None;
            }
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        buf.extend_from_slice(&data);
                        if buf.len() > max {
                            let status = Status::resource_exhausted("grpc: received message larger than max");
                            return Some((Err(status), (body, Vec::new(), true)));
                        }
                    }
                }
                Some(Err(e)) => return Some((Err(Status::unknown(e.to_string())), (body, Vec::new(), true))),
                None => {
                    if buf.is_empty() {
                        return None;
                    }
                    // Parse what is left once more, knowing no more comes.
                    return Some((
                        serde_json::from_slice::<T>(&buf).map_err(|e| Status::unknown(e.to_string())),
                        (body, Vec::new(), true),
                    ));
                }
            }
        }
    })
}

/// Answers a stream of responses as etcd's gateway does: one
/// `{"result": …}` per line, each sent as it comes; an error ends the
/// stream with etcd's error object.
async fn streamed<T, S>(responses: S) -> Reply
where
    T: Serialize + Send + 'static,
    S: futures::Stream<Item = Result<T, Status>> + Send + 'static,
{
    use futures::StreamExt;
    // Nothing is answered before the first response: an error then (the
    // first request malformed, say) is answered with its HTTP status, as
    // etcd's gateway does.
    let mut responses = Box::pin(responses);
    let first = match responses.next().await {
        Some(Err(status)) => return error(&status),
        first => first,
    };
    let responses = futures::stream::iter(first).chain(responses);
    let mut failed = false;
    let lines = responses
        .take_while(move |item| {
            let go = !failed;
            failed = item.is_err();
            std::future::ready(go)
        })
        .map(|item| {
            let line = match item {
                Ok(resp) => match serde_json::to_string(&resp) {
                    Ok(text) => format!("{{\"result\":{text}}}\n"),
                    Err(e) => error_object(&Status::internal(e.to_string())),
                },
                Err(status) => error_object(&status),
            };
            Ok::<_, std::convert::Infallible>(http_body::Frame::data(bytes::Bytes::from(line)))
        });
    let mut resp = http::Response::new(tonic::body::Body::new(http_body_util::StreamBody::new(lines)));
    resp.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    resp
}

/// The body, up to `max` bytes.
async fn read_body(body: tonic::body::Body, max: usize) -> Result<Vec<u8>, Status> {
    let limited = http_body_util::Limited::new(body, max);
    match limited.collect().await {
        Ok(collected) => Ok(collected.to_bytes().to_vec()),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            Err(Status::resource_exhausted("grpc: received message larger than max"))
        }
        Err(e) => Err(Status::invalid_argument(format!("reading the request body: {e}"))),
    }
}

/// The HTTP status etcd's gateway answers a gRPC code with.
pub fn http_status(code: Code) -> http::StatusCode {
    use http::StatusCode as S;
    match code {
        Code::Ok => S::OK,
        Code::Cancelled => S::REQUEST_TIMEOUT,
        Code::Unknown | Code::Internal | Code::DataLoss => S::INTERNAL_SERVER_ERROR,
        Code::InvalidArgument | Code::OutOfRange => S::BAD_REQUEST,
        Code::DeadlineExceeded => S::GATEWAY_TIMEOUT,
        Code::NotFound => S::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => S::CONFLICT,
        Code::PermissionDenied => S::FORBIDDEN,
        Code::Unauthenticated => S::UNAUTHORIZED,
        Code::ResourceExhausted => S::TOO_MANY_REQUESTS,
        Code::FailedPrecondition => S::PRECONDITION_FAILED,
        Code::Unimplemented => S::NOT_IMPLEMENTED,
        Code::Unavailable => S::SERVICE_UNAVAILABLE,
    }
}

fn error(status: &Status) -> Reply {
    json(http_status(status.code()), error_object(status))
}

/// etcd's gateway's error object.
fn error_object(status: &Status) -> String {
    serde_json::json!({
        "error": status.message(),
        "message": status.message(),
        "code": status.code() as i32,
    })
    .to_string()
}

fn json(status: http::StatusCode, body: String) -> Reply {
    reply(status, "application/json", body)
}

fn plain(status: http::StatusCode, body: &'static str) -> Reply {
    reply(status, "text/plain; charset=utf-8", body.to_string())
}

fn reply(status: http::StatusCode, content_type: &'static str, body: String) -> Reply {
    let mut resp = http::Response::new(tonic::body::Body::new(http_body_util::Full::new(bytes::Bytes::from(body))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(content_type));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::etcdserverpb::{RangeRequest, RangeResponse, ResponseHeader};
    use crate::proto::mvccpb::KeyValue;

    #[test]
    fn json_is_etcds_mapping() {
        let resp = RangeResponse {
            header: Some(ResponseHeader { cluster_id: 1, member_id: 2, revision: 3, ..Default::default() }),
            kvs: vec![KeyValue {
                key: b"foo".to_vec(),
                value: b"bar".to_vec(),
                create_revision: 2,
                ..Default::default()
            }],
            more: false,
            count: 1,
        };
        assert_eq!(
            serde_json::to_string(&resp).unwrap(),
            r#"{"header":{"cluster_id":"1","member_id":"2","revision":"3"},"kvs":[{"key":"Zm9v","create_revision":"2","value":"YmFy"}],"count":"1"}"#
        );
        // Names as in the proto or in camelCase, numbers as strings or not,
        // unknown fields ignored.
        let req: RangeRequest =
            serde_json::from_str(r#"{"key":"Zm9v","range_end":"Zm9w","limit":"5","countOnly":true,"nope":1}"#).unwrap();
        assert_eq!(
            (req.key.as_slice(), req.range_end.as_slice(), req.limit, req.count_only),
            (&b"foo"[..], &b"fop"[..], 5, true)
        );
    }

    #[test]
    fn codes_map_to_the_statuses_of_etcds_gateway() {
        assert_eq!(http_status(Code::InvalidArgument), http::StatusCode::BAD_REQUEST);
        assert_eq!(http_status(Code::FailedPrecondition), http::StatusCode::PRECONDITION_FAILED);
        assert_eq!(http_status(Code::NotFound), http::StatusCode::NOT_FOUND);
        assert_eq!(http_status(Code::OutOfRange), http::StatusCode::BAD_REQUEST);
    }
}
