//! Authentication and role-based access control, as etcd's.
//!
//! The auth state (whether auth is on, the users with their bcrypt
//! password hashes and roles, the roles with their key permissions, and the
//! auth revision that every change raises) is replicated: every change is a
//! command in the Raft log, applied here on every member alike, and kept as
//! records in the state tree, so it survives restarts and travels in
//! snapshots and backups.
//!
//! A request is checked as etcd checks it:
//! - reads (Range, a Txn that only reads, a watch) against the member's
//!   applied state when they are served;
//! - writes when they are applied, against the auth state of that point in
//!   the log: a command carries its user and the auth revision its member
//!   saw ([`AuthStamp`]); one that an auth change overtook is refused with
//!   "revision of auth store is old", and etcd's clients ask again;
//! - administration (compaction, membership, alarms, defragment, hashes,
//!   snapshots, leadership moves, users and roles) needs the root role.
//!
//! With `--auth-token jwt,...`, tokens are JWTs ([`Jwt`]) that every
//! member verifies with the public key on its own.
//!
//! Simple tokens are issued through the log like etcd's: the member that
//! checked the password proposes the token, and every member that applies
//! it knows it, so a client may use it on any member. Tokens live in memory
//! ([`Tokens`]) and lapse after `--auth-token-ttl` without use; a restarted
//! member has only those the log replays to it, and a client whose token it
//! does not know gets "invalid auth token" and authenticates again.

mod jwt;
mod tokens;

pub use jwt::Jwt;

pub use tokens::{Tokens, DEFAULT_TOKEN_TTL};

use std::collections::BTreeMap;

use prost::Message;

use crate::error::Error;
use crate::mvcc::{Batch, MvccStore};
use crate::proto::authpb::{permission::Type as PermType, Permission, Role, User};
use crate::proto::etcdserverpb::{request_op, TxnRequest};
use crate::proto::kvdpb::{auth_change::Change, command, AuthStamp};

/// The user and role that may do everything.
pub const ROOT: &str = "root";

/// Prefix of the auth records in the state tree: then `u` and a user's
/// name (value: its `authpb.User`), `r` and a role's name (its
/// `authpb.Role`), `e` (whether auth is on: one byte) or `v` (the auth
/// revision, u64 big-endian).
pub const AUTH: u8 = b'U';

fn record(kind: u8, name: &[u8]) -> Vec<u8> {
    let mut key = vec![AUTH, kind];
    key.extend_from_slice(name);
    key
}

/// What a client request presented: a token (gRPC metadata `token`, or the
/// gateway's `Authorization` header) and the common name of its TLS client
/// certificate, if it sent one.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    pub token: Option<String>,
    pub common_name: Option<String>,
}

impl Credentials {
    /// The token of a request's headers.
    pub fn from_headers(headers: &http::HeaderMap) -> Credentials {
        let token = headers
            .get("token")
            .or_else(|| headers.get(http::header::AUTHORIZATION))
            .and_then(|v| v.to_str().ok())
            .filter(|t| !t.is_empty())
            .map(String::from);
        Credentials { token, common_name: None }
    }
}

tokio::task_local! {
    /// The credentials of the client request a task serves. Unset in the
    /// member's own tasks, whose requests are not checked.
    pub static CREDENTIALS: Credentials;
}

/// Who a request comes from, as far as auth is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Who {
    /// The member itself (lease expiry, publishing, its own alarms,
    /// automatic compaction), or any request while auth is off: not checked.
    Member,
    /// A client with credentials, or none (`user` empty), and the auth
    /// revision it was known at.
    Client { user: String, revision: u64 },
}

/// A client as the checks see it, borrowed from a [`Who`] or a stamp.
#[derive(Debug, Clone, Copy)]
struct Caller<'a> {
    user: &'a str,
    revision: u64,
}

impl Who {
    /// The client, if this is one (the member itself is not checked).
    fn caller(&self) -> Option<Caller<'_>> {
        match self {
            Who::Member => None,
            Who::Client { user, revision } => Some(Caller { user, revision: *revision }),
        }
    }

    /// The stamp a write carries.
    pub fn stamp(&self) -> Option<AuthStamp> {
        match self {
            Who::Member => None,
            Who::Client { user, revision } => Some(AuthStamp { user: user.clone(), revision: *revision }),
        }
    }
}

/// What a request does with a range of keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    Read,
    Write,
}

/// The replicated auth state.
#[derive(Debug, Clone)]
pub struct AuthState {
    pub enabled: bool,
    pub revision: u64,
    pub users: BTreeMap<String, User>,
    pub roles: BTreeMap<String, Role>,
}

impl Default for AuthState {
    fn default() -> Self {
        // etcd's auth revision starts at 1.
        AuthState { enabled: false, revision: 1, users: BTreeMap::new(), roles: BTreeMap::new() }
    }
}

fn corrupt(what: &str) -> Error {
    Error::internal(format!("corrupt auth record: {what}"))
}

impl AuthState {
    /// Loads the auth records of the state tree.
    pub fn load(tree: &sled::Tree) -> Result<AuthState, Error> {
        let mut state = AuthState::default();
        for item in tree.scan_prefix([AUTH]) {
            let (k, v) = item?;
            match k.get(1) {
                Some(b'e') => state.enabled = v.first() == Some(&1),
                Some(b'v') => {
                    state.revision = u64::from_be_bytes(v.as_ref().try_into().map_err(|_| corrupt("revision"))?)
                }
                Some(b'u') => {
                    let user = User::decode(v.as_ref()).map_err(|_| corrupt("user"))?;
                    state.users.insert(String::from_utf8_lossy(&user.name).into_owned(), user);
                }
                Some(b'r') => {
                    let role = Role::decode(v.as_ref()).map_err(|_| corrupt("role"))?;
                    state.roles.insert(String::from_utf8_lossy(&role.name).into_owned(), role);
                }
                _ => return Err(corrupt("unknown kind")),
            }
        }
        Ok(state)
    }

    fn bump(&mut self, batch: &mut Batch) {
        self.revision += 1;
        batch.insert(record(b'v', b""), self.revision.to_be_bytes());
    }

    fn save_user(&self, name: &str, batch: &mut Batch) {
        match self.users.get(name) {
            Some(u) => batch.insert(record(b'u', name.as_bytes()), u.encode_to_vec()),
            None => batch.remove(record(b'u', name.as_bytes())),
        }
    }

    fn save_role(&self, name: &str, batch: &mut Batch) {
        match self.roles.get(name) {
            Some(r) => batch.insert(record(b'r', name.as_bytes()), r.encode_to_vec()),
            None => batch.remove(record(b'r', name.as_bytes())),
        }
    }

    fn user_mut(&mut self, name: &str) -> Result<&mut User, Error> {
        self.users.get_mut(name).ok_or(Error::UserNotFound)
    }

    /// Applies one change, as etcd's auth store does, writing its records
    /// into `batch`; answers the auth revision after it.
    pub fn apply(&mut self, change: Change, tokens: &Tokens, batch: &mut Batch) -> Result<u64, Error> {
        match change {
            Change::Enable(_) => {
                if !self.enabled {
                    let root = self.users.get(ROOT).ok_or(Error::RootUserNotExist)?;
                    if !has_root_role(root) {
                        return Err(Error::RootRoleNotExist);
                    }
                    self.enabled = true;
                    batch.insert(record(b'e', b""), [1]);
                    tracing::info!("authentication enabled");
                }
            }
            Change::Disable(_) => {
                if self.enabled {
                    self.enabled = false;
                    batch.insert(record(b'e', b""), [0]);
                    tokens.clear();
                    tracing::info!("authentication disabled");
                }
            }
            Change::UserAdd(r) => {
                if r.name.is_empty() {
                    return Err(Error::UserEmpty);
                }
                if self.users.contains_key(&r.name) {
                    return Err(Error::UserAlreadyExist);
                }
                let no_password = r.options.as_ref().is_some_and(|o| o.no_password);
                let user = User {
                    name: r.name.clone().into_bytes(),
                    // The member that took the request hashed it.
                    password: if no_password { Vec::new() } else { r.password.into_bytes() },
                    roles: Vec::new(),
                    options: r.options,
                };
                self.users.insert(r.name.clone(), user);
                self.save_user(&r.name, batch);
                self.bump(batch);
            }
            Change::UserDelete(r) => {
                if self.enabled && r.name == ROOT {
                    return Err(Error::InvalidAuthMgmt);
                }
                if self.users.remove(&r.name).is_none() {
                    return Err(Error::UserNotFound);
                }
                self.save_user(&r.name, batch);
                tokens.invalidate_user(&r.name);
                self.bump(batch);
            }
            Change::UserChangePassword(r) => {
                let user = self.user_mut(&r.name)?;
                user.password = r.password.into_bytes();
                self.save_user(&r.name, batch);
                tokens.invalidate_user(&r.name);
                self.bump(batch);
            }
            Change::UserGrantRole(r) => {
                if !self.users.contains_key(&r.user) {
                    return Err(Error::UserNotFound);
                }
                if r.role != ROOT && !self.roles.contains_key(&r.role) {
                    return Err(Error::RoleNotFound);
                }
                let user = self.user_mut(&r.user)?;
                if let Err(at) = user.roles.binary_search(&r.role) {
                    user.roles.insert(at, r.role);
                    self.save_user(&r.user, batch);
                    self.bump(batch);
                }
            }
            Change::UserRevokeRole(r) => {
                if self.enabled && r.name == ROOT && r.role == ROOT {
                    return Err(Error::InvalidAuthMgmt);
                }
                let user = self.user_mut(&r.name)?;
                let at = user.roles.binary_search(&r.role).map_err(|_| Error::RoleNotGranted)?;
                user.roles.remove(at);
                self.save_user(&r.name, batch);
                self.bump(batch);
            }
            Change::RoleAdd(r) => {
                if r.name.is_empty() {
                    return Err(Error::RoleEmpty);
                }
                if self.roles.contains_key(&r.name) {
                    return Err(Error::RoleAlreadyExist);
                }
                self.roles
                    .insert(r.name.clone(), Role { name: r.name.clone().into_bytes(), key_permission: Vec::new() });
                self.save_role(&r.name, batch);
                self.bump(batch);
            }
            Change::RoleDelete(r) => {
                if self.enabled && r.role == ROOT {
                    return Err(Error::InvalidAuthMgmt);
                }
                if self.roles.remove(&r.role).is_none() {
                    return Err(Error::RoleNotFound);
                }
                self.save_role(&r.role, batch);
                // The role goes from every user that had it.
                let holders: Vec<String> =
                    self.users.iter().filter(|(_, u)| u.roles.contains(&r.role)).map(|(n, _)| n.clone()).collect();
                for name in holders {
                    if let Some(u) = self.users.get_mut(&name) {
                        u.roles.retain(|role| *role != r.role);
                    }
                    self.save_user(&name, batch);
                }
                self.bump(batch);
            }
            Change::RoleGrantPermission(r) => {
                let perm = r.perm.unwrap_or_default();
                let role = self.roles.get_mut(&r.name).ok_or(Error::RoleNotFound)?;
                let same = |p: &Permission| p.key == perm.key && p.range_end == perm.range_end;
                match role.key_permission.iter_mut().find(|p| same(p)) {
                    Some(p) => p.perm_type = perm.perm_type,
                    None => {
                        let at = role
                            .key_permission
                            .partition_point(|p| (&p.key, &p.range_end) < (&perm.key, &perm.range_end));
                        role.key_permission.insert(at, perm);
                    }
                }
                self.save_role(&r.name, batch);
                self.bump(batch);
            }
            Change::RoleRevokePermission(r) => {
                let role = self.roles.get_mut(&r.role).ok_or(Error::RoleNotFound)?;
                let at = role
                    .key_permission
                    .iter()
                    .position(|p| p.key == r.key && p.range_end == r.range_end)
                    .ok_or(Error::PermissionNotGranted)?;
                role.key_permission.remove(at);
                self.save_role(&r.role, batch);
                self.bump(batch);
            }
            Change::Token(t) => {
                // The user may have gone, or auth been turned off, since the
                // password was checked.
                if !self.enabled {
                    return Err(Error::AuthNotEnabled);
                }
                if !self.users.contains_key(&t.user) {
                    return Err(Error::AuthFailed);
                }
                tokens.insert(t.token, t.user);
            }
        }
        Ok(self.revision)
    }

    /// Whether `who` may do `need` on `[key, range_end)` (`range_end` empty:
    /// the key alone; `"\0"`: every key from `key` on), as etcd's
    /// `isOpPermitted` decides.
    pub fn check_range(&self, who: &Who, key: &[u8], range_end: &[u8], need: Need) -> Result<(), Error> {
        who.caller().map_or(Ok(()), |c| self.range_ok(c, key, range_end, need))
    }

    fn range_ok(&self, c: Caller, key: &[u8], range_end: &[u8], need: Need) -> Result<(), Error> {
        if !self.enabled {
            return Ok(());
        }
        if c.user.is_empty() {
            return Err(Error::UserEmpty);
        }
        if c.revision < self.revision {
            return Err(Error::AuthOldRevision);
        }
        let Some(u) = self.users.get(c.user) else { return Err(Error::PermissionDenied) };
        if has_root_role(u) || self.covers(u, key, range_end, need) {
            Ok(())
        } else {
            Err(Error::PermissionDenied)
        }
    }

    /// Whether `who` has the root role, as etcd's `IsAdminPermitted`
    /// decides.
    pub fn check_admin(&self, who: &Who) -> Result<(), Error> {
        who.caller().map_or(Ok(()), |c| self.admin_ok(c))
    }

    fn admin_ok(&self, c: Caller) -> Result<(), Error> {
        if !self.enabled {
            return Ok(());
        }
        if c.user.is_empty() {
            return Err(Error::UserEmpty);
        }
        let u = self.users.get(c.user).ok_or(Error::UserNotFound)?;
        if has_root_role(u) {
            Ok(())
        } else {
            Err(Error::PermissionDenied)
        }
    }

    /// Whether `who` may read the user `name`: root may read any, a user
    /// itself.
    pub fn check_user_get(&self, who: &Who, name: &str) -> Result<(), Error> {
        match (self.check_admin(who), who) {
            (Ok(()), _) => Ok(()),
            (Err(_), Who::Client { user, .. }) if user == name => Ok(()),
            (Err(e), _) => Err(e),
        }
    }

    /// Whether `who` may read the role `name`: root may read any, a user
    /// those it has.
    pub fn check_role_get(&self, who: &Who, name: &str) -> Result<(), Error> {
        match (self.check_admin(who), who) {
            (Ok(()), _) => Ok(()),
            (Err(_), Who::Client { user, .. })
                if self.users.get(user).is_some_and(|u| u.roles.iter().any(|r| r == name)) =>
            {
                Ok(())
            }
            (Err(e), _) => Err(e),
        }
    }

    /// Whether `who` may read and write what a Txn names: every compare and
    /// range needs READ, every put and delete WRITE (and READ with
    /// `prev_kv`), at any depth.
    pub fn check_txn(&self, who: &Who, t: &TxnRequest) -> Result<(), Error> {
        who.caller().map_or(Ok(()), |c| self.txn_ok(c, t))
    }

    fn txn_ok(&self, c: Caller, t: &TxnRequest) -> Result<(), Error> {
        for cmp in &t.compare {
            self.range_ok(c, &cmp.key, &cmp.range_end, Need::Read)?;
        }
        for op in t.success.iter().chain(&t.failure) {
            match &op.request {
                Some(request_op::Request::RequestRange(r)) => self.range_ok(c, &r.key, &r.range_end, Need::Read)?,
                Some(request_op::Request::RequestPut(p)) => self.put_ok(c, &p.key, p.prev_kv)?,
                Some(request_op::Request::RequestDeleteRange(d)) => {
                    self.delete_ok(c, &d.key, &d.range_end, d.prev_kv)?
                }
                Some(request_op::Request::RequestTxn(inner)) => self.txn_ok(c, inner)?,
                None => {}
            }
        }
        Ok(())
    }

    /// A put needs WRITE on its key, and READ too with `prev_kv`.
    fn put_ok(&self, c: Caller, key: &[u8], prev_kv: bool) -> Result<(), Error> {
        self.range_ok(c, key, &[], Need::Write)?;
        if prev_kv {
            self.range_ok(c, key, &[], Need::Read)?;
        }
        Ok(())
    }

    /// A delete needs WRITE on its range, and READ too with `prev_kv`.
    fn delete_ok(&self, c: Caller, key: &[u8], range_end: &[u8], prev_kv: bool) -> Result<(), Error> {
        self.range_ok(c, key, range_end, Need::Write)?;
        if prev_kv {
            self.range_ok(c, key, range_end, Need::Read)?;
        }
        Ok(())
    }

    /// Whether the caller may write every key attached to lease `id` (to put
    /// with it, or to revoke it).
    fn lease_keys_ok(&self, c: Caller, store: &MvccStore, id: i64) -> Result<(), Error> {
        if let Some(lease) = store.lease(id) {
            for key in &lease.keys {
                self.range_ok(c, key, &[], Need::Write)?;
            }
        }
        Ok(())
    }

    /// Checks a command when it is applied, against this state: the
    /// permissions of the user its stamp names. Commands with no stamp are
    /// the members' own.
    pub fn check_command(&self, stamp: Option<&AuthStamp>, op: &command::Op, store: &MvccStore) -> Result<(), Error> {
        let Some(stamp) = stamp else { return Ok(()) };
        if !self.enabled {
            return Ok(());
        }
        let c = Caller { user: &stamp.user, revision: stamp.revision };
        match op {
            command::Op::Put(p) => {
                self.put_ok(c, &p.key, p.prev_kv)?;
                if p.lease != 0 {
                    self.lease_keys_ok(c, store, p.lease)?;
                }
                Ok(())
            }
            command::Op::DeleteRange(d) => self.delete_ok(c, &d.key, &d.range_end, d.prev_kv),
            command::Op::Txn(t) => self.txn_ok(c, t),
            command::Op::LeaseRevoke(r) => self.lease_keys_ok(c, store, r.id),
            command::Op::Compact(_) | command::Op::Alarm(_) => self.admin_ok(c),
            command::Op::Auth(change) => match &change.change {
                Some(Change::Enable(_) | Change::Token(_)) | None => Ok(()),
                Some(_) => self.admin_ok(c),
            },
            command::Op::LeaseGrant(_)
            | command::Op::Publish(_)
            | command::Op::LeaseExpire(_)
            | command::Op::Batch(_) => Ok(()),
        }
    }

    /// Whether `user`'s roles give `need` on all of `[key, range_end)`.
    fn covers(&self, user: &User, key: &[u8], range_end: &[u8], need: Need) -> bool {
        let wanted = interval(key, range_end);
        let mut granted: Vec<Interval> = user
            .roles
            .iter()
            .filter_map(|r| self.roles.get(r))
            .flat_map(|r| &r.key_permission)
            .filter(|p| gives(p.perm_type, need))
            .map(|p| interval(&p.key, &p.range_end))
            .filter(|(start, end)| end.as_ref().is_none_or(|e| e > start))
            .collect();
        granted.sort();
        // Merge touching and overlapping grants, then look for one that
        // holds the whole request.
        let mut merged: Vec<Interval> = Vec::new();
        for (start, end) in granted {
            if let Some((_, last_end)) = merged.last_mut() {
                if last_end.as_ref().is_none_or(|e| *e >= start) {
                    match (last_end.as_ref(), end) {
                        (None, _) => {}
                        (Some(_), None) => *last_end = None,
                        (Some(le), Some(e)) if e > *le => *last_end = Some(e),
                        (Some(_), Some(_)) => {}
                    }
                    continue;
                }
            }
            merged.push((start, end));
        }
        merged.iter().any(|(start, end)| {
            *start <= wanted.0
                && match (end, &wanted.1) {
                    (None, _) => true,
                    (Some(_), None) => false,
                    (Some(e), Some(w)) => e >= w,
                }
        })
    }
}

/// `[start, end)`, with no end for "every key from start on".
type Interval = (Vec<u8>, Option<Vec<u8>>);

fn interval(key: &[u8], range_end: &[u8]) -> Interval {
    match range_end {
        [] => {
            let mut end = key.to_vec();
            end.push(0);
            (key.to_vec(), Some(end))
        }
        [0] => (key.to_vec(), None),
        end => (key.to_vec(), Some(end.to_vec())),
    }
}

fn gives(perm_type: i32, need: Need) -> bool {
    match PermType::try_from(perm_type) {
        Ok(PermType::Readwrite) => true,
        Ok(PermType::Read) => need == Need::Read,
        Ok(PermType::Write) => need == Need::Write,
        Err(_) => false,
    }
}

fn has_root_role(user: &User) -> bool {
    user.roles.iter().any(|r| r == ROOT)
}

#[cfg(test)]
mod tests;
