//! The Auth API of a member, and who each request comes from (see
//! [`crate::auth`]).

use std::sync::Arc;
use std::time::Duration;

use super::{Member, Write};
use crate::auth::{AuthState, Need, Tokens, Who, CREDENTIALS};
use crate::error::Error;
use crate::proto::authpb::Permission;
use crate::proto::etcdserverpb::{
    AuthDisableRequest, AuthEnableRequest, AuthRoleAddRequest, AuthRoleDeleteRequest, AuthRoleGetRequest,
    AuthRoleGetResponse, AuthRoleGrantPermissionRequest, AuthRoleListResponse, AuthRoleRevokePermissionRequest,
    AuthStatusResponse, AuthUserAddRequest, AuthUserChangePasswordRequest, AuthUserDeleteRequest, AuthUserGetRequest,
    AuthUserGetResponse, AuthUserGrantRoleRequest, AuthUserListResponse, AuthUserRevokeRoleRequest,
    AuthenticateRequest, AuthenticateResponse, ResponseHeader,
};
use crate::proto::kvdpb::{auth_change::Change, command, command_result, AuthChange, AuthToken};

/// Password checks that run at once on a member: bcrypt is meant to be
/// slow, and a burst of them must leave CPU for everything else.
const CONCURRENT_PASSWORD_CHECKS: usize = 2;

/// Failed logins of a user that are checked at full speed. After them,
/// the user is locked for a while after each failure, twice as long each
/// time up to [`MAX_LOCK`]: attempts while it is locked are refused
/// without their password being looked at, so a password cannot be guessed
/// at line rate. A successful login (or the lock running out) ends it.
const FREE_FAILURES: u32 = 3;
const FIRST_LOCK: Duration = Duration::from_millis(100);
const MAX_LOCK: Duration = Duration::from_secs(5);

/// The failures of one user: how many in a row, and until when it is
/// locked.
#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    locked_until: std::time::Instant,
}

/// The throttle on password checks.
#[derive(Debug)]
pub struct Logins {
    checks: tokio::sync::Semaphore,
    failures: std::sync::Mutex<std::collections::HashMap<String, Failures>>,
    /// Attempts refused unchecked because their user was locked.
    pub refused: std::sync::atomic::AtomicU64,
    /// Passwords checked with bcrypt.
    pub checked: std::sync::atomic::AtomicU64,
    /// bcrypt's cost for the passwords this member hashes.
    pub bcrypt_cost: u32,
    /// The keys of `--auth-token jwt,...`; simple tokens without.
    pub jwt: Option<Arc<crate::auth::Jwt>>,
}

impl Logins {
    /// A throttle that hashes with `bcrypt_cost` and issues JWTs with `jwt`
    /// if given.
    pub fn new(bcrypt_cost: u32, jwt: Option<Arc<crate::auth::Jwt>>) -> Logins {
        Logins {
            checks: tokio::sync::Semaphore::new(CONCURRENT_PASSWORD_CHECKS),
            failures: Default::default(),
            refused: Default::default(),
            checked: Default::default(),
            bcrypt_cost,
            jwt,
        }
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Failures>> {
        self.failures.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a login of `user`: how much longer it is locked, if it is;
    /// else the attempt is counted as a failure until it succeeds, so that
    /// attempts made at the same moment see the lock it may set.
    fn begin(&self, user: &str) -> Option<Duration> {
        let now = std::time::Instant::now();
        let mut failures = self.failures();
        if let Some(left) = failures.get(user).and_then(|f| f.locked_until.checked_duration_since(now)) {
            if !left.is_zero() {
                return Some(left);
            }
        }
        // Users that stopped failing long ago are forgotten now and then.
        if failures.len() > 10_000 {
            failures.retain(|_, f| f.locked_until + MAX_LOCK > now);
        }
        let f = failures.entry(user.to_string()).or_insert(Failures { count: 0, locked_until: now });
        f.count = f.count.saturating_add(1);
        if let Some(extra) = f.count.checked_sub(FREE_FAILURES) {
            f.locked_until = now + (FIRST_LOCK * 2u32.saturating_pow(extra.min(16))).min(MAX_LOCK);
        }
        None
    }

    /// How many failed logins in a row `user` has.
    fn failed_in_a_row(&self, user: &str) -> u32 {
        self.failures().get(user).map_or(0, |f| f.count)
    }
}

/// One auth change and what it answers: the auth revision after it.
struct AuthWrite(Change);

impl Write for AuthWrite {
    type Output = u64;
    fn into_op(self) -> command::Op {
        command::Op::Auth(AuthChange { change: Some(self.0) })
    }
    fn output(result: command_result::Result) -> Option<u64> {
        match result {
            command_result::Result::AuthRevision(r) => Some(r),
            _ => None,
        }
    }
}

impl Member {
    /// Who the request this task serves comes from: the member itself
    /// outside a client request; else the user its token (while auth is on)
    /// or its client certificate names, or no user, with the auth revision
    /// it is checked at. A token this member does not know is refused.
    pub fn who(&self) -> Result<Who, Error> {
        CREDENTIALS.try_with(|credentials| self.who_with(credentials)).unwrap_or(Ok(Who::Member))
    }

    fn who_with(&self, credentials: &crate::auth::Credentials) -> Result<Who, Error> {
        let state = self.state.read();
        let revision = state.auth.revision;
        if !state.auth.enabled {
            return Ok(Who::Client { user: String::new(), revision });
        }
        let user = match (&credentials.token, &credentials.common_name, &self.logins.jwt) {
            // A JWT names the revision it was issued at; a request under an
            // older one than the member's is told so, and asks again.
            (Some(token), _, Some(jwt)) => {
                let (user, issued_at) = jwt.verify(token).ok_or(Error::InvalidAuthToken)?;
                return Ok(Who::Client { user, revision: issued_at });
            }
            (Some(token), _, None) => state.tokens.user_of(token).ok_or(Error::InvalidAuthToken)?,
            (None, Some(cn), _) => cn.clone(),
            (None, None, _) => String::new(),
        };
        Ok(Who::Client { user, revision })
    }

    /// Checks the request this task serves with `check`, against the auth
    /// state this member applied.
    pub fn authorize(&self, check: impl FnOnce(&AuthState, &Who) -> Result<(), Error>) -> Result<(), Error> {
        let who = self.who()?;
        if who == Who::Member {
            return Ok(());
        }
        let state = self.state.read();
        check(&state.auth, &who)
    }

    /// Whether the request may read `[key, range_end)`.
    pub fn authorize_read(&self, key: &[u8], range_end: &[u8]) -> Result<(), Error> {
        self.authorize(|auth, who| auth.check_range(who, key, range_end, Need::Read))
    }

    /// Whether the request comes from root (or auth is off).
    pub fn authorize_admin(&self) -> Result<(), Error> {
        self.authorize(|auth, who| auth.check_admin(who))
    }

    /// The tokens this member knows.
    pub fn tokens(&self) -> Arc<Tokens> {
        self.state.read().tokens.clone()
    }

    fn auth_header(&self) -> Option<ResponseHeader> {
        let mut header = None;
        self.fill_header(&mut header);
        header
    }

    async fn change_auth(&self, change: Change) -> Result<Option<ResponseHeader>, Error> {
        let revision = self.write(AuthWrite(change)).await?;
        let mut header = self.auth_header();
        // A member that forwarded the change to the leader may not have
        // applied it yet: the answer names the auth revision it made.
        if let Some(h) = header.as_mut() {
            h.auth_revision = h.auth_revision.max(revision);
        }
        Ok(header)
    }

    /// AuthEnable.
    pub async fn auth_enable(&self, req: AuthEnableRequest) -> Result<Option<ResponseHeader>, Error> {
        self.change_auth(Change::Enable(req)).await
    }

    /// AuthDisable: root only.
    pub async fn auth_disable(&self, req: AuthDisableRequest) -> Result<Option<ResponseHeader>, Error> {
        self.change_auth(Change::Disable(req)).await
    }

    /// AuthStatus: whether auth is on, and the auth revision.
    pub async fn auth_status(&self) -> Result<AuthStatusResponse, Error> {
        self.read_barrier().await?;
        let (enabled, auth_revision) = {
            let state = self.state.read();
            (state.auth.enabled, state.auth.revision)
        };
        Ok(AuthStatusResponse { header: self.auth_header(), enabled, auth_revision })
    }

    /// Authenticate: checks the password (throttled per user, see
    /// [`Logins`]), then issues a token through the log, so that every
    /// member knows it.
    pub async fn authenticate(&self, req: AuthenticateRequest) -> Result<AuthenticateResponse, Error> {
        // The users and whether auth is on as the cluster has them now, as
        // etcd's Authenticate (a log entry) sees them.
        self.read_barrier().await?;
        let user = {
            let state = self.state.read();
            if !state.auth.enabled {
                return Err(Error::AuthNotEnabled);
            }
            state.auth.users.get(&req.name).map(|u| (u.password.clone(), u.options.is_some_and(|o| o.no_password)))
        };
        // An unknown user is refused at once, with no record of it: names
        // a stranger makes up cost the member nothing to remember.
        let Some((hash, no_password)) = user else {
            tracing::warn!(user = %req.name, "authentication failed: no such user");
            return Err(Error::AuthFailed);
        };
        // A user without a password logs in by certificate only.
        if no_password {
            return Err(Error::NoPasswordUser);
        }
        if let Some(left) = self.logins.begin(&req.name) {
            self.logins.refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(user = %req.name, locked_ms = left.as_millis() as u64, "authentication refused: too many failed logins for this user");
            return Err(Error::AuthFailed);
        }
        let ok = {
            let _permit = self.logins.checks.acquire().await.map_err(|_| Error::Stopped)?;
            self.logins.checked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let password = req.password.clone();
            tokio::task::spawn_blocking(move || {
                std::str::from_utf8(&hash).ok().is_some_and(|h| bcrypt::verify(password, h).unwrap_or(false))
            })
            .await
            .unwrap_or(false)
        };
        if !ok {
            let failed = self.logins.failed_in_a_row(&req.name);
            // Never the password.
            tracing::warn!(user = %req.name, failed, "authentication failed");
            return Err(Error::AuthFailed);
        }
        self.logins.failures().remove(&req.name);
        if let Some(jwt) = &self.logins.jwt {
            let revision = self.state.read().auth.revision;
            let token = jwt.sign(&req.name, revision).map_err(|e| Error::internal(format!("issuing a JWT: {e}")))?;
            return Ok(AuthenticateResponse { header: self.auth_header(), token });
        }
        let token = Tokens::generate();
        let issue = Change::Token(AuthToken { user: req.name, token: token.clone() });
        self.write(AuthWrite(issue)).await?;
        Ok(AuthenticateResponse { header: self.auth_header(), token })
    }

    async fn hash(&self, password: String) -> Result<String, Error> {
        let cost = self.logins.bcrypt_cost;
        tokio::task::spawn_blocking(move || bcrypt::hash(password, cost))
            .await
            .map_err(|e| Error::internal(format!("hashing a password: {e}")))?
            .map_err(|e| Error::internal(format!("hashing a password: {e}")))
    }

    /// UserAdd: the password is hashed here, before it is proposed.
    pub async fn user_add(&self, mut req: AuthUserAddRequest) -> Result<Option<ResponseHeader>, Error> {
        // Only root may add users: refused before the slow hash.
        self.authorize_admin()?;
        if req.name.is_empty() {
            return Err(Error::UserEmpty);
        }
        if req.options.is_some_and(|o| o.no_password) {
            req.password.clear();
        } else {
            if req.password.is_empty() {
                return Err(Error::PasswordEmpty);
            }
            req.password = self.hash(std::mem::take(&mut req.password)).await?;
        }
        self.change_auth(Change::UserAdd(req)).await
    }

    /// UserDelete.
    pub async fn user_delete(&self, req: AuthUserDeleteRequest) -> Result<Option<ResponseHeader>, Error> {
        self.change_auth(Change::UserDelete(req)).await
    }

    /// UserChangePassword: hashed here, as for UserAdd.
    pub async fn user_change_password(
        &self,
        mut req: AuthUserChangePasswordRequest,
    ) -> Result<Option<ResponseHeader>, Error> {
        self.authorize_admin()?;
        req.password = self.hash(std::mem::take(&mut req.password)).await?;
        self.change_auth(Change::UserChangePassword(req)).await
    }

    /// UserGrantRole.
    pub async fn user_grant_role(&self, req: AuthUserGrantRoleRequest) -> Result<Option<ResponseHeader>, Error> {
        self.change_auth(Change::UserGrantRole(req)).await
    }

    /// UserRevokeRole.
    pub async fn user_revoke_role(&self, req: AuthUserRevokeRoleRequest) -> Result<Option<ResponseHeader>, Error> {
        self.change_auth(Change::UserRevokeRole(req)).await
    }

    /// RoleAdd.
    pub async fn role_add(&self, req: AuthRoleAddRequest) -> Result<Option<ResponseHeader>, Error> {
        self.change_auth(Change::RoleAdd(req)).await
    }

    /// RoleDelete.
    pub async fn role_delete(&self, req: AuthRoleDeleteRequest) -> Result<Option<ResponseHeader>, Error> {
        self.change_auth(Change::RoleDelete(req)).await
    }

    /// RoleGrantPermission.
    pub async fn role_grant_permission(
        &self,
        req: AuthRoleGrantPermissionRequest,
    ) -> Result<Option<ResponseHeader>, Error> {
        self.change_auth(Change::RoleGrantPermission(req)).await
    }

    /// RoleRevokePermission.
    pub async fn role_revoke_permission(
        &self,
        req: AuthRoleRevokePermissionRequest,
    ) -> Result<Option<ResponseHeader>, Error> {
        self.change_auth(Change::RoleRevokePermission(req)).await
    }

    /// UserGet: root, or the user itself.
    pub async fn user_get(&self, req: AuthUserGetRequest) -> Result<AuthUserGetResponse, Error> {
        self.read_barrier().await?;
        self.authorize(|auth, who| auth.check_user_get(who, &req.name))?;
        let roles = {
            let state = self.state.read();
            state.auth.users.get(&req.name).map(|u| u.roles.clone()).ok_or(Error::UserNotFound)?
        };
        Ok(AuthUserGetResponse { header: self.auth_header(), roles })
    }

    /// UserList: root only.
    pub async fn user_list(&self) -> Result<AuthUserListResponse, Error> {
        self.read_barrier().await?;
        self.authorize_admin()?;
        let users = self.state.read().auth.users.keys().cloned().collect();
        Ok(AuthUserListResponse { header: self.auth_header(), users })
    }

    /// RoleGet: root, or a user that has the role.
    pub async fn role_get(&self, req: AuthRoleGetRequest) -> Result<AuthRoleGetResponse, Error> {
        self.read_barrier().await?;
        self.authorize(|auth, who| auth.check_role_get(who, &req.role))?;
        let perm: Vec<Permission> = {
            let state = self.state.read();
            match state.auth.roles.get(&req.role) {
                Some(role) => role.key_permission.clone(),
                // The root role needs no record to be granted.
                None if req.role == crate::auth::ROOT => Vec::new(),
                None => return Err(Error::RoleNotFound),
            }
        };
        Ok(AuthRoleGetResponse { header: self.auth_header(), perm })
    }

    /// RoleList: root only.
    pub async fn role_list(&self) -> Result<AuthRoleListResponse, Error> {
        self.read_barrier().await?;
        self.authorize_admin()?;
        let roles = self.state.read().auth.roles.keys().cloned().collect();
        Ok(AuthRoleListResponse { header: self.auth_header(), roles })
    }
}
