use super::*;
use crate::proto::authpb::UserAddOptions;
use crate::proto::etcdserverpb::{
    AuthDisableRequest, AuthEnableRequest, AuthRoleAddRequest, AuthRoleDeleteRequest, AuthRoleGrantPermissionRequest,
    AuthRoleRevokePermissionRequest, AuthUserAddRequest, AuthUserDeleteRequest, AuthUserGrantRoleRequest,
    AuthUserRevokeRoleRequest, Compare, PutRequest, RangeRequest, RequestOp,
};
use crate::proto::kvdpb::AuthToken;

fn apply(state: &mut AuthState, change: Change) -> Result<u64, Error> {
    state.apply(change, &Tokens::default(), &mut Batch::default())
}

fn user_add(name: &str) -> Change {
    Change::UserAdd(AuthUserAddRequest { name: name.into(), password: "hash".into(), options: None })
}

fn grant_role(user: &str, role: &str) -> Change {
    Change::UserGrantRole(AuthUserGrantRoleRequest { user: user.into(), role: role.into() })
}

fn grant(role: &str, t: PermType, key: &str, end: &str) -> Change {
    Change::RoleGrantPermission(AuthRoleGrantPermissionRequest {
        name: role.into(),
        perm: Some(Permission { perm_type: t as i32, key: key.into(), range_end: end.into() }),
    })
}

fn who(state: &AuthState, user: &str) -> Who {
    Who::Client { user: user.into(), revision: state.revision }
}

/// Root, and alice with the role `app`, enabled.
fn enabled() -> AuthState {
    let mut s = AuthState::default();
    for c in [
        user_add("root"),
        grant_role("root", "root"),
        user_add("alice"),
        Change::RoleAdd(AuthRoleAddRequest { name: "app".into() }),
        grant_role("alice", "app"),
        Change::Enable(AuthEnableRequest {}),
    ] {
        apply(&mut s, c).unwrap();
    }
    s
}

#[test]
fn enabling_needs_root_with_the_root_role() {
    let mut s = AuthState::default();
    assert_eq!(apply(&mut s, Change::Enable(AuthEnableRequest {})), Err(Error::RootUserNotExist));
    apply(&mut s, user_add("root")).unwrap();
    assert_eq!(apply(&mut s, Change::Enable(AuthEnableRequest {})), Err(Error::RootRoleNotExist));
    // The root role need not be added first.
    apply(&mut s, grant_role("root", "root")).unwrap();
    apply(&mut s, Change::Enable(AuthEnableRequest {})).unwrap();
    assert!(s.enabled);
    // Root stays root while auth is on.
    let delete_root = Change::UserDelete(AuthUserDeleteRequest { name: "root".into() });
    assert_eq!(apply(&mut s, delete_root.clone()), Err(Error::InvalidAuthMgmt));
    let revoke = Change::UserRevokeRole(AuthUserRevokeRoleRequest { name: "root".into(), role: "root".into() });
    assert_eq!(apply(&mut s, revoke.clone()), Err(Error::InvalidAuthMgmt));
    apply(&mut s, Change::Disable(AuthDisableRequest {})).unwrap();
    apply(&mut s, revoke).unwrap();
    apply(&mut s, delete_root).unwrap();
}

#[test]
fn changes_answer_etcds_errors_and_raise_the_revision() {
    let mut s = AuthState::default();
    let start = s.revision;
    assert_eq!(apply(&mut s, user_add("")), Err(Error::UserEmpty));
    apply(&mut s, user_add("bob")).unwrap();
    assert_eq!(apply(&mut s, user_add("bob")), Err(Error::UserAlreadyExist));
    assert_eq!(apply(&mut s, grant_role("bob", "nope")), Err(Error::RoleNotFound));
    assert_eq!(apply(&mut s, grant_role("carol", "root")), Err(Error::UserNotFound));
    assert_eq!(apply(&mut s, Change::RoleAdd(AuthRoleAddRequest { name: String::new() })), Err(Error::RoleEmpty));
    apply(&mut s, Change::RoleAdd(AuthRoleAddRequest { name: "r".into() })).unwrap();
    assert_eq!(apply(&mut s, Change::RoleAdd(AuthRoleAddRequest { name: "r".into() })), Err(Error::RoleAlreadyExist));
    apply(&mut s, grant_role("bob", "r")).unwrap();
    let before = s.revision;
    // Granting a role the user has changes nothing.
    apply(&mut s, grant_role("bob", "r")).unwrap();
    assert_eq!(s.revision, before);
    let revoke =
        |role: &str| Change::UserRevokeRole(AuthUserRevokeRoleRequest { name: "bob".into(), role: role.into() });
    assert_eq!(apply(&mut s, revoke("other")), Err(Error::RoleNotGranted));
    let revoke_perm = Change::RoleRevokePermission(AuthRoleRevokePermissionRequest {
        role: "r".into(),
        key: b"k".to_vec(),
        range_end: vec![],
    });
    assert_eq!(apply(&mut s, revoke_perm.clone()), Err(Error::PermissionNotGranted));
    apply(&mut s, grant("r", PermType::Read, "k", "")).unwrap();
    apply(&mut s, revoke_perm).unwrap();
    // Deleting a role takes it from its users.
    apply(&mut s, Change::RoleDelete(AuthRoleDeleteRequest { role: "r".into() })).unwrap();
    assert!(s.users["bob"].roles.is_empty());
    assert_eq!(s.revision, start + 6);
    let no_password = AuthUserAddRequest {
        name: "cert".into(),
        password: "ignored".into(),
        options: Some(UserAddOptions { no_password: true }),
    };
    apply(&mut s, Change::UserAdd(no_password)).unwrap();
    assert!(s.users["cert"].password.is_empty());
}

#[test]
fn ranges_are_allowed_only_when_the_roles_cover_all_of_them() {
    let mut s = enabled();
    for c in [
        grant("app", PermType::Read, "a", "c"),
        grant("app", PermType::Read, "c", "e"),
        grant("app", PermType::Write, "w", ""),
        grant("app", PermType::Readwrite, "z", "\0"),
    ] {
        apply(&mut s, c).unwrap();
    }
    let alice = who(&s, "alice");
    let read = |key: &str, end: &str| s.check_range(&alice, key.as_bytes(), end.as_bytes(), Need::Read);
    let write = |key: &str, end: &str| s.check_range(&alice, key.as_bytes(), end.as_bytes(), Need::Write);
    // Two grants that touch cover the range across them.
    assert_eq!(read("b", "d"), Ok(()));
    assert_eq!(read("a", "e"), Ok(()));
    assert_eq!(read("a", "f"), Err(Error::PermissionDenied));
    assert_eq!(read("d", ""), Ok(()));
    assert_eq!(write("b", ""), Err(Error::PermissionDenied));
    assert_eq!(write("w", ""), Ok(()));
    assert_eq!(write("w", "x"), Err(Error::PermissionDenied), "a key grant is that key alone");
    assert_eq!(read("zz", "\0"), Ok(()));
    assert_eq!(write("z", "\0"), Ok(()));
    assert_eq!(read("y", "\0"), Err(Error::PermissionDenied));
    // Root may do anything; nobody and the unknown nothing; a stale
    // revision is told so.
    assert_eq!(s.check_range(&who(&s, "root"), b"", b"\0", Need::Write), Ok(()));
    assert_eq!(s.check_range(&who(&s, ""), b"a", b"", Need::Read), Err(Error::UserEmpty));
    assert_eq!(s.check_range(&who(&s, "mallory"), b"a", b"", Need::Read), Err(Error::PermissionDenied));
    let stale = Who::Client { user: "alice".into(), revision: s.revision - 1 };
    assert_eq!(s.check_range(&stale, b"a", b"", Need::Read), Err(Error::AuthOldRevision));
    // The member itself is never held back.
    assert_eq!(s.check_range(&Who::Member, b"", b"\0", Need::Write), Ok(()));
}

#[test]
fn administration_needs_root_and_txns_every_part() {
    let mut s = enabled();
    apply(&mut s, grant("app", PermType::Readwrite, "k", "")).unwrap();
    assert_eq!(s.check_admin(&who(&s, "alice")), Err(Error::PermissionDenied));
    assert_eq!(s.check_admin(&who(&s, "root")), Ok(()));
    assert_eq!(s.check_admin(&who(&s, "")), Err(Error::UserEmpty));
    assert_eq!(s.check_admin(&who(&s, "ghost")), Err(Error::UserNotFound));
    assert_eq!(s.check_user_get(&who(&s, "alice"), "alice"), Ok(()));
    assert_eq!(s.check_user_get(&who(&s, "alice"), "root"), Err(Error::PermissionDenied));
    assert_eq!(s.check_role_get(&who(&s, "alice"), "app"), Ok(()));
    let put = |key: &str| RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key: key.into(),
            value: b"v".to_vec(),
            ..Default::default()
        })),
    };
    let range = |key: &str| RequestOp {
        request: Some(request_op::Request::RequestRange(RangeRequest { key: key.into(), ..Default::default() })),
    };
    let cmp = |key: &str| Compare { key: key.into(), ..Default::default() };
    let t = |compare: Vec<Compare>, success: Vec<RequestOp>, failure: Vec<RequestOp>| TxnRequest {
        compare,
        success,
        failure,
    };
    let alice = who(&s, "alice");
    assert_eq!(s.check_txn(&alice, &t(vec![cmp("k")], vec![put("k")], vec![range("k")])), Ok(()));
    assert_eq!(s.check_txn(&alice, &t(vec![cmp("x")], vec![put("k")], vec![])), Err(Error::PermissionDenied));
    assert_eq!(s.check_txn(&alice, &t(vec![], vec![], vec![put("x")])), Err(Error::PermissionDenied));
    let nested = RequestOp { request: Some(request_op::Request::RequestTxn(t(vec![], vec![range("x")], vec![]))) };
    assert_eq!(s.check_txn(&alice, &t(vec![], vec![nested], vec![])), Err(Error::PermissionDenied));
}

#[test]
fn tokens_are_issued_only_to_users_while_auth_is_on() {
    let mut s = AuthState::default();
    let tokens = Tokens::default();
    let token = |user: &str| Change::Token(AuthToken { user: user.into(), token: format!("t-{user}") });
    assert_eq!(s.apply(token("root"), &tokens, &mut Batch::default()), Err(Error::AuthNotEnabled));
    s = enabled();
    assert_eq!(s.apply(token("ghost"), &tokens, &mut Batch::default()), Err(Error::AuthFailed));
    s.apply(token("alice"), &tokens, &mut Batch::default()).unwrap();
    assert_eq!(tokens.user_of("t-alice").as_deref(), Some("alice"));
    // Deleting the user takes its tokens.
    s.apply(Change::UserDelete(AuthUserDeleteRequest { name: "alice".into() }), &tokens, &mut Batch::default())
        .unwrap();
    assert_eq!(tokens.user_of("t-alice"), None);
}
