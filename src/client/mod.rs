//! The Rust client for kvd (and any etcd v3 server): the etcd v3 KV, Cluster
//! and Maintenance calls over gRPC, failing over between endpoints.
//!
//! A call goes to the endpoint that last answered. If that endpoint cannot be
//! reached, or answers that it has no leader, the call moves on to the next;
//! a call whose outcome is unknown (the server timed out after taking it) is
//! not repeated, so a write is never applied twice by the client.

pub mod coord;
pub use coord::{Election, Leadership, LeaseState, Lock, LockGuard, Session, WatchStream};

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::proto::etcdserverpb::cluster_client::ClusterClient;
use crate::proto::etcdserverpb::kv_client::KvClient;
use crate::proto::etcdserverpb::maintenance_client::MaintenanceClient;
use crate::proto::etcdserverpb::*;

/// Whether a failed call certainly never reached a server: its channel could
/// not connect. Plain-text channels say "tcp connect error"; TLS channels,
/// whose connector is kvd's own, give the socket's error ("Connection
/// refused (os error 111)").
pub fn not_sent(status: &Status) -> bool {
    status.message().starts_with("Service was not ready")
        || (status.code() == Code::Unavailable && status.message().to_ascii_lowercase().contains("connect"))
}

fn retryable(status: &Status) -> bool {
    not_sent(status)
        || (status.code() == Code::Unavailable && status.message() == crate::error::Error::NoLeader.to_string())
}

/// Whether a call that only reads may go to the next endpoint: any
/// Unavailable or broken connection will do (tonic reports the latter as
/// Unknown "transport error", e.g. from a member that was being killed),
/// since repeating a read changes nothing.
fn read_retryable(status: &Status) -> bool {
    broken(status) || status.code() == Code::Unavailable || retryable(status)
}

/// Whether the connection failed under a call (tonic reports that as Unknown
/// "transport error" or Cancelled, with the transport's error as source),
/// rather than the server answering with an error.
pub fn broken(status: &Status) -> bool {
    std::error::Error::source(status).is_some_and(|e| e.is::<tonic::transport::Error>())
}

/// What a failed call's status says went wrong, for a person: for a
/// connection that failed, its deepest cause ("connection refused", "cannot
/// resolve host: …") rather than tonic's "transport error"; else the
/// server's message (or its code, when the message is empty).
pub fn describe(status: &Status) -> String {
    let mut chain = Vec::new();
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        chain.push(e.to_string());
        source = e.source();
    }
    if let Some(deepest) = chain.last() {
        let cause = deepest.split(" (os error").next().unwrap_or(deepest);
        let mut cause = cause.to_string();
        // "Connection refused" reads as etcd's "connection refused"; an
        // acronym ("TLS handshake ...") keeps its capitals.
        let acronym = cause.chars().nth(1).is_some_and(|c| c.is_uppercase());
        if let (Some(first), false) = (cause.get(..1), acronym) {
            cause = first.to_lowercase() + &cause[1..];
        }
        if chain.iter().any(|e| e.contains("dns error")) {
            return format!("cannot resolve host: {cause}");
        }
        if cause.contains("frame with invalid size") {
            // What an HTTP/2 client reading a TLS answer sees.
            return format!("{cause} (the server may expect TLS: use an https:// endpoint)");
        }
        if cause.contains("InvalidContentType") {
            // What a TLS client reading a plain-text answer sees.
            return format!("{cause} (the server may not serve TLS: use an http:// endpoint)");
        }
        return cause;
    }
    if status.message().is_empty() {
        format!("{:?} with no message", status.code())
    } else {
        status.message().to_string()
    }
}

/// A connection that sends the client's auth token with every call.
pub type Conn = InterceptedService<Channel, TokenSlot>;

/// The token a client sends as the `token` metadata of each call, as etcd's
/// clients do; shared by every connection of the client.
#[derive(Debug, Clone, Default)]
pub struct TokenSlot(std::sync::Arc<std::sync::RwLock<Option<tonic::metadata::AsciiMetadataValue>>>);

impl TokenSlot {
    fn set(&self, token: Option<tonic::metadata::AsciiMetadataValue>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = token;
    }

    fn is_set(&self) -> bool {
        self.0.read().unwrap_or_else(|e| e.into_inner()).is_some()
    }
}

impl tonic::service::Interceptor for TokenSlot {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(token) = self.0.read().unwrap_or_else(|e| e.into_inner()).clone() {
            req.metadata_mut().insert("token", token);
        }
        Ok(req)
    }
}

/// Whether a call failed for want of a (fresh) token: the client
/// authenticates again and repeats it once, as etcd's clients do.
fn needs_token(status: &Status) -> bool {
    refused_for_token(status.message())
}

/// Whether an error message (or a watch's cancel reason, which ends with
/// one) says that the call wanted a (fresh) token.
fn refused_for_token(message: &str) -> bool {
    use crate::error::Error;
    [Error::InvalidAuthToken, Error::AuthOldRevision, Error::UserEmpty]
        .iter()
        .any(|e| message.ends_with(&e.to_string()))
}

/// The Auth service's calls: each builds its request once and sends it
/// with `call` (may change something) or `read_call` (only reads).
macro_rules! auth_calls {
    ($($(#[$doc:meta])* $name:ident($($arg:ident: $ty:ty),*) -> $resp:ident, $kind:ident $rpc:ident($req:expr);)*) => {$(
        $(#[$doc])*
        pub async fn $name(&self, $($arg: $ty),*) -> Result<$resp, Status> {
            let req = $req;
            self.$kind(|ch| {
                let req = req.clone();
                async move { crate::proto::etcdserverpb::auth_client::AuthClient::new(ch).$rpc(req).await }
            })
            .await
        }
    )*};
}

/// A client of a kvd (or etcd) cluster.
pub struct Client {
    endpoints: Vec<String>,
    channels: Vec<Channel>,
    /// The token calls carry, once authenticated.
    token: TokenSlot,
    /// The user name and password to authenticate with.
    credentials: Option<(String, String)>,
    current: AtomicUsize,
    max_message_bytes: usize,
    /// Each endpoint tried by the last call that failed, with what it said.
    failures: std::sync::Mutex<Vec<(String, String)>>,
    /// The TLS settings it was made with.
    tls: Option<ClientTls>,
}

/// Turns `host:port` into `http://host:port`; keeps URLs as they are.
pub fn endpoint_url(endpoint: &str) -> String {
    if endpoint.contains("://") {
        endpoint.to_string()
    } else {
        format!("http://{endpoint}")
    }
}

/// TLS settings of a client, as etcdctl's `--cacert`, `--cert`, `--key` and
/// `--insecure-skip-tls-verify` give them. With any of them set, an endpoint
/// given as `host:port` is reached over TLS; an `https://` endpoint always is.
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    /// A file of CA certificates (PEM) to check servers against; without
    /// it, the system's trusted roots.
    pub ca: Option<std::path::PathBuf>,
    /// Files of a client certificate and its key (PEM), for servers that ask
    /// for one.
    pub identity: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// Accept any server certificate (the connection is still encrypted).
    pub skip_verify: bool,
}

impl ClientTls {
    /// The rustls configuration these settings make; an error names the
    /// flag and file that could not be used.
    pub fn config(&self) -> Result<std::sync::Arc<rustls::ClientConfig>, String> {
        use crate::tls::{KeyPair, Trust};
        let trust = match (&self.ca, self.skip_verify) {
            (_, true) => Trust::Anything,
            (Some(ca), false) => Trust::from_file("cacert", ca).map_err(|e| e.to_string())?,
            (None, false) => Trust::System,
        };
        let identity = match &self.identity {
            Some((cert, key)) => Some(KeyPair::from_files("cert", cert, "key", key).map_err(|e| e.to_string())?),
            None => None,
        };
        crate::tls::client_config(trust, identity).map_err(|e| e.to_string())
    }
}

/// A lazily connecting channel to `endpoint` (`host:port`, `http://` or
/// `https://`), over TLS when it is https:// or `tls` is given.
pub fn channel(endpoint: &str, dial_timeout: Duration, tls: Option<&ClientTls>) -> Result<Channel, String> {
    let url = match (endpoint.contains("://"), tls) {
        (false, Some(_)) => format!("https://{endpoint}"),
        _ => endpoint_url(endpoint),
    };
    if !url.starts_with("http://") && !url.starts_with("https://") {
        return Err(format!("endpoint {endpoint}: only http:// and https:// endpoints (or host:port) are supported"));
    }
    let ep = Endpoint::from_shared(crate::tls::plain_url(&url))
        .map_err(|err| format!("bad endpoint {endpoint:?}: {err}"))?
        .connect_timeout(dial_timeout)
        .tcp_nodelay(true);
    Ok(match url.starts_with("https://") {
        true => crate::tls::channel(ep, tls.cloned().unwrap_or_default().config()?, None),
        false => ep.connect_lazy(),
    })
}

impl Client {
    /// A client of the given endpoints (`host:port` or `http://host:port`).
    /// Connections are made on first use.
    pub fn new(endpoints: &[String], dial_timeout: Duration) -> Result<Client, String> {
        Self::with_tls(endpoints, dial_timeout, None)
    }

    /// A client of the given endpoints that reaches `https://` endpoints
    /// (and, when `tls` is given, `host:port` ones too) over TLS.
    pub fn with_tls(endpoints: &[String], dial_timeout: Duration, tls: Option<&ClientTls>) -> Result<Client, String> {
        if endpoints.is_empty() {
            return Err("no endpoints given".into());
        }
        let channels = endpoints.iter().map(|e| channel(e, dial_timeout, tls)).collect::<Result<_, _>>()?;
        Ok(Client {
            endpoints: endpoints.to_vec(),
            channels,
            current: AtomicUsize::new(0),
            max_message_bytes: 256 * 1024 * 1024,
            failures: Default::default(),
            tls: tls.cloned(),
            token: TokenSlot::default(),
            credentials: None,
        })
    }

    /// This client, authenticating as `user` with `password` before its
    /// first call and again whenever the server no longer knows its token.
    pub fn with_user(mut self, user: &str, password: &str) -> Client {
        self.credentials = Some((user.to_string(), password.to_string()));
        self
    }

    /// `channel` with this client's token on every call.
    pub fn intercept(&self, channel: Channel) -> Conn {
        InterceptedService::new(channel, self.token.clone())
    }

    fn conn(&self, idx: usize) -> Conn {
        self.intercept(self.channels[idx].clone())
    }

    /// The connection to the endpoint at `index`, for calls to one member
    /// (no failover), once the client has a token if it has credentials.
    async fn conn_at(&self, index: usize) -> Result<Conn, Status> {
        self.token_ready().await?;
        let channel = self.channels.get(index).ok_or_else(|| Status::invalid_argument("no such endpoint"))?;
        Ok(self.intercept(channel.clone()))
    }

    /// Authenticates, if the client has credentials and no token yet.
    pub(crate) async fn token_ready(&self) -> Result<(), Status> {
        if self.credentials.is_some() && !self.token.is_set() {
            self.authenticate().await?;
        }
        Ok(())
    }

    /// Authenticates with the client's credentials (if it has any) at the
    /// first endpoint that answers, and keeps the token for later calls.
    pub async fn authenticate(&self) -> Result<(), Status> {
        use crate::proto::etcdserverpb::auth_client::AuthClient;
        let Some((name, password)) = &self.credentials else { return Ok(()) };
        let n = self.channels.len();
        let start = self.current.load(Ordering::Relaxed);
        let mut last = None;
        for i in 0..n {
            let idx = (start + i) % n;
            let req = AuthenticateRequest { name: name.clone(), password: password.clone() };
            match AuthClient::new(self.channels[idx].clone()).authenticate(req).await {
                Ok(resp) => {
                    let token =
                        resp.into_inner().token.parse().map_err(|_| Status::internal("a token that is not ASCII"))?;
                    self.token.set(Some(token));
                    return Ok(());
                }
                Err(s) if retryable(&s) => last = Some(s),
                Err(s) => return Err(s),
            }
        }
        Err(last.unwrap_or_else(|| Status::unavailable("no endpoint answered")))
    }

    /// The endpoints, in order.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// The TLS settings it was made with, if any.
    pub fn tls(&self) -> Option<&ClientTls> {
        self.tls.as_ref()
    }

    /// A client of other endpoints with the same TLS settings.
    pub fn for_endpoints(&self, endpoints: &[String], dial_timeout: Duration) -> Result<Client, String> {
        Self::with_tls(endpoints, dial_timeout, self.tls.as_ref())
    }

    /// A call that may change something: it moves to the next endpoint only
    /// if it certainly was not taken (or the member had no leader).
    async fn call<T, F, Fut>(&self, f: F) -> Result<T, Status>
    where
        F: Fn(Conn) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.call_retrying(retryable, f).await
    }

    /// A call that only reads: it moves to the next endpoint on any
    /// Unavailable or broken connection.
    async fn read_call<T, F, Fut>(&self, f: F) -> Result<T, Status>
    where
        F: Fn(Conn) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.call_retrying(read_retryable, f).await
    }

    async fn call_retrying<T, F, Fut>(&self, retry: fn(&Status) -> bool, f: F) -> Result<T, Status>
    where
        F: Fn(Conn) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.token_ready().await?;
        match self.call_each(retry, &f).await {
            Err(s) if self.credentials.is_some() && needs_token(&s) => {
                self.authenticate().await?;
                self.call_each(retry, &f).await
            }
            answer => answer,
        }
    }

    async fn call_each<T, F, Fut>(&self, retry: fn(&Status) -> bool, f: &F) -> Result<T, Status>
    where
        F: Fn(Conn) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let n = self.channels.len();
        let start = self.current.load(Ordering::Relaxed);
        let mut last = None;
        let mut tried = Vec::new();
        for i in 0..n {
            let idx = (start + i) % n;
            match f(self.conn(idx)).await {
                Ok(resp) => {
                    self.current.store(idx, Ordering::Relaxed);
                    return Ok(resp.into_inner());
                }
                Err(s) => {
                    tried.push((self.endpoints[idx].clone(), self.with_hint(idx, describe(&s))));
                    if !retry(&s) {
                        *self.failures.lock().unwrap_or_else(|p| p.into_inner()) = tried;
                        return Err(s);
                    }
                    last = Some(s);
                }
            }
        }
        *self.failures.lock().unwrap_or_else(|p| p.into_inner()) = tried;
        Err(last.unwrap_or_else(|| Status::unavailable("no endpoint answered")))
    }

    /// `why` endpoint `idx` failed, with a hint where a plain-text client
    /// meets a TLS port: the server's TLS alert then breaks the HTTP/2
    /// connection under the first request (a broken pipe, or the connection
    /// closed, depending on timing).
    fn with_hint(&self, idx: usize, why: String) -> String {
        let plain = self.tls.is_none() && !self.endpoints[idx].starts_with("https://");
        if plain && (why.contains("broken pipe") || why.ends_with("connection closed")) {
            return format!("{why} (the server may expect TLS: use an https:// endpoint)");
        }
        why
    }

    /// Says what went wrong with `status`, the error of this client's last
    /// failed call: which endpoint answered what, and when every endpoint
    /// failed, each of them (e.g. `every endpoint failed: 127.0.0.1:1:
    /// connection refused; 127.0.0.1:2: connection refused`). A server's
    /// own error message (a compacted revision, a key not found) is given
    /// as it is, as etcdctl gives it.
    pub fn explain(&self, status: &Status) -> String {
        let tried = self.failures.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let ours = tried.last().is_some_and(|(_, why)| why.starts_with(&describe(status)));
        let server_said = std::error::Error::source(status).is_none()
            && !status.message().is_empty()
            && status.code() != Code::Unimplemented;
        if !ours || server_said {
            return describe(status);
        }
        let each: Vec<String> = tried.iter().map(|(ep, why)| format!("{ep}: {why}")).collect();
        if each.len() > 1 && each.len() == self.endpoints.len() {
            format!("every endpoint failed: {}", each.join("; "))
        } else {
            each.last().cloned().unwrap_or_default()
        }
    }

    fn kv(&self, ch: Conn) -> KvClient<Conn> {
        KvClient::new(ch)
            .max_decoding_message_size(self.max_message_bytes)
            .max_encoding_message_size(self.max_message_bytes)
    }

    auth_calls! {
        /// AuthEnable.
        auth_enable() -> AuthEnableResponse, call auth_enable(AuthEnableRequest {});
        /// AuthDisable.
        auth_disable() -> AuthDisableResponse, call auth_disable(AuthDisableRequest {});
        /// AuthStatus.
        auth_status() -> AuthStatusResponse, read_call auth_status(AuthStatusRequest {});
        /// UserAdd (`no_password`: a user known by its client certificate only).
        user_add(name: &str, password: &str, no_password: bool) -> AuthUserAddResponse, call user_add(
            AuthUserAddRequest {
                name: name.to_string(),
                password: password.to_string(),
                options: Some(crate::proto::authpb::UserAddOptions { no_password }),
            }
        );
        /// UserGet.
        user_get(name: &str) -> AuthUserGetResponse, read_call user_get(AuthUserGetRequest { name: name.to_string() });
        /// UserList.
        user_list() -> AuthUserListResponse, read_call user_list(AuthUserListRequest {});
        /// UserDelete.
        user_delete(name: &str) -> AuthUserDeleteResponse, call user_delete(AuthUserDeleteRequest { name: name.to_string() });
        /// UserChangePassword.
        user_change_password(name: &str, password: &str) -> AuthUserChangePasswordResponse, call user_change_password(
            AuthUserChangePasswordRequest { name: name.to_string(), password: password.to_string() }
        );
        /// UserGrantRole.
        user_grant_role(user: &str, role: &str) -> AuthUserGrantRoleResponse, call user_grant_role(
            AuthUserGrantRoleRequest { user: user.to_string(), role: role.to_string() }
        );
        /// UserRevokeRole.
        user_revoke_role(user: &str, role: &str) -> AuthUserRevokeRoleResponse, call user_revoke_role(
            AuthUserRevokeRoleRequest { name: user.to_string(), role: role.to_string() }
        );
        /// RoleAdd.
        role_add(name: &str) -> AuthRoleAddResponse, call role_add(AuthRoleAddRequest { name: name.to_string() });
        /// RoleGet.
        role_get(name: &str) -> AuthRoleGetResponse, read_call role_get(AuthRoleGetRequest { role: name.to_string() });
        /// RoleList.
        role_list() -> AuthRoleListResponse, read_call role_list(AuthRoleListRequest {});
        /// RoleDelete.
        role_delete(name: &str) -> AuthRoleDeleteResponse, call role_delete(AuthRoleDeleteRequest { role: name.to_string() });
        /// RoleGrantPermission.
        role_grant_permission(name: &str, perm: crate::proto::authpb::Permission) -> AuthRoleGrantPermissionResponse,
            call role_grant_permission(AuthRoleGrantPermissionRequest { name: name.to_string(), perm: Some(perm) });
        /// RoleRevokePermission.
        role_revoke_permission(name: &str, key: &[u8], range_end: &[u8]) -> AuthRoleRevokePermissionResponse,
            call role_revoke_permission(AuthRoleRevokePermissionRequest {
                role: name.to_string(),
                key: key.to_vec(),
                range_end: range_end.to_vec(),
            });
    }

    /// Range (get).
    pub async fn range(&self, req: RangeRequest) -> Result<RangeResponse, Status> {
        self.read_call(|ch| {
            let req = req.clone();
            async move { self.kv(ch).range(req).await }
        })
        .await
    }

    /// Put.
    pub async fn put(&self, req: PutRequest) -> Result<PutResponse, Status> {
        self.call(|ch| {
            let req = req.clone();
            async move { self.kv(ch).put(req).await }
        })
        .await
    }

    /// DeleteRange.
    pub async fn delete_range(&self, req: DeleteRangeRequest) -> Result<DeleteRangeResponse, Status> {
        self.call(|ch| {
            let req = req.clone();
            async move { self.kv(ch).delete_range(req).await }
        })
        .await
    }

    /// Txn.
    pub async fn txn(&self, req: TxnRequest) -> Result<TxnResponse, Status> {
        self.call(|ch| {
            let req = req.clone();
            async move { self.kv(ch).txn(req).await }
        })
        .await
    }

    /// Compact.
    pub async fn compact(&self, req: CompactionRequest) -> Result<CompactionResponse, Status> {
        self.call(|ch| async move { self.kv(ch).compact(req).await }).await
    }

    /// MemberList.
    pub async fn member_list(&self) -> Result<MemberListResponse, Status> {
        self.read_call(|ch| async move { ClusterClient::new(ch).member_list(MemberListRequest::default()).await }).await
    }

    /// MemberAdd: a member with `peer_urls`, as a learner or a voter.
    pub async fn member_add(&self, peer_urls: Vec<String>, is_learner: bool) -> Result<MemberAddResponse, Status> {
        let req = MemberAddRequest { peer_ur_ls: peer_urls, is_learner };
        self.call(|ch| {
            let req = req.clone();
            async move { ClusterClient::new(ch).member_add(req).await }
        })
        .await
    }

    /// MemberRemove.
    pub async fn member_remove(&self, id: u64) -> Result<MemberRemoveResponse, Status> {
        self.call(|ch| async move { ClusterClient::new(ch).member_remove(MemberRemoveRequest { id }).await }).await
    }

    /// MemberUpdate: new peer URLs for member `id`.
    pub async fn member_update(&self, id: u64, peer_urls: Vec<String>) -> Result<MemberUpdateResponse, Status> {
        let req = MemberUpdateRequest { id, peer_ur_ls: peer_urls };
        self.call(|ch| {
            let req = req.clone();
            async move { ClusterClient::new(ch).member_update(req).await }
        })
        .await
    }

    /// MemberPromote.
    pub async fn member_promote(&self, id: u64) -> Result<MemberPromoteResponse, Status> {
        self.call(|ch| async move { ClusterClient::new(ch).member_promote(MemberPromoteRequest { id }).await }).await
    }

    /// Alarm (GET lists alarms, DEACTIVATE disarms them).
    pub async fn alarm(&self, req: AlarmRequest) -> Result<AlarmResponse, Status> {
        self.call(|ch| async move { MaintenanceClient::new(ch).alarm(req).await }).await
    }

    /// Defragment of the endpoint at `index` (no failover).
    pub async fn defragment_of(&self, index: usize) -> Result<DefragmentResponse, Status> {
        let ch = self.conn_at(index).await?;
        MaintenanceClient::new(ch).defragment(DefragmentRequest::default()).await.map(|r| r.into_inner())
    }

    /// HashKV of the endpoint at `index` at `revision` (0: the latest; no
    /// failover).
    pub async fn hash_kv_of(&self, index: usize, revision: i64) -> Result<HashKvResponse, Status> {
        let ch = self.conn_at(index).await?;
        MaintenanceClient::new(ch).hash_kv(HashKvRequest { revision }).await.map(|r| r.into_inner())
    }

    /// MoveLeader, to the first endpoint (only the leader takes it).
    pub async fn move_leader(&self, target_id: u64) -> Result<MoveLeaderResponse, Status> {
        self.call(|ch| async move { MaintenanceClient::new(ch).move_leader(MoveLeaderRequest { target_id }).await })
            .await
    }

    /// Status of the endpoint at `index` (no failover: it asks that member).
    pub async fn status_of(&self, index: usize) -> Result<StatusResponse, Status> {
        let ch = self.conn_at(index).await?;
        MaintenanceClient::new(ch).status(StatusRequest::default()).await.map(|r| r.into_inner())
    }

    /// A snapshot of the data of the member at endpoint `index` (no
    /// failover): the stream of its chunks, the last one its SHA-256.
    pub async fn snapshot_of(&self, index: usize) -> Result<tonic::Streaming<SnapshotResponse>, Status> {
        let ch = self.conn_at(index).await?;
        let mut client = MaintenanceClient::new(ch).max_decoding_message_size(usize::MAX);
        client.snapshot(SnapshotRequest::default()).await.map(|r| r.into_inner())
    }

    /// A linearizable get of `key` on the endpoint at `index` (no failover),
    /// which is how etcd clients check an endpoint's health.
    pub async fn get_on(&self, index: usize, key: &[u8]) -> Result<RangeResponse, Status> {
        let ch = self.conn_at(index).await?;
        self.kv(ch).range(RangeRequest { key: key.to_vec(), ..Default::default() }).await.map(|r| r.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_connection_was_not_sent_over_plain_text_or_tls() {
        assert!(not_sent(&Status::unavailable("tcp connect error")));
        assert!(not_sent(&Status::unavailable("Connection refused (os error 111)")));
        assert!(!not_sent(&Status::unavailable("etcdserver: request timed out")));
        assert!(!not_sent(&Status::invalid_argument("Connection refused (os error 111)")));
    }
}
