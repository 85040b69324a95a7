//! The Auth service: etcd's authentication and role-based access control
//! (see [`crate::auth`]).

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::node::Member;
use crate::proto::etcdserverpb::auth_server::Auth;
use crate::proto::etcdserverpb::*;

/// The Auth service of one member.
pub struct AuthService {
    member: Arc<Member>,
}

impl AuthService {
    /// A service for `member`.
    pub fn new(member: Arc<Member>) -> Self {
        AuthService { member }
    }
}

#[tonic::async_trait]
impl Auth for AuthService {
    async fn auth_enable(&self, req: Request<AuthEnableRequest>) -> Result<Response<AuthEnableResponse>, Status> {
        let header = self.member.auth_enable(req.into_inner()).await?;
        Ok(Response::new(AuthEnableResponse { header }))
    }

    async fn auth_disable(&self, req: Request<AuthDisableRequest>) -> Result<Response<AuthDisableResponse>, Status> {
        let header = self.member.auth_disable(req.into_inner()).await?;
        Ok(Response::new(AuthDisableResponse { header }))
    }

    async fn auth_status(&self, _req: Request<AuthStatusRequest>) -> Result<Response<AuthStatusResponse>, Status> {
        Ok(Response::new(self.member.auth_status().await?))
    }

    async fn authenticate(&self, req: Request<AuthenticateRequest>) -> Result<Response<AuthenticateResponse>, Status> {
        Ok(Response::new(self.member.authenticate(req.into_inner()).await?))
    }

    async fn user_add(&self, req: Request<AuthUserAddRequest>) -> Result<Response<AuthUserAddResponse>, Status> {
        let header = self.member.user_add(req.into_inner()).await?;
        Ok(Response::new(AuthUserAddResponse { header }))
    }

    async fn user_get(&self, req: Request<AuthUserGetRequest>) -> Result<Response<AuthUserGetResponse>, Status> {
        Ok(Response::new(self.member.user_get(req.into_inner()).await?))
    }

    async fn user_list(&self, _req: Request<AuthUserListRequest>) -> Result<Response<AuthUserListResponse>, Status> {
        Ok(Response::new(self.member.user_list().await?))
    }

    async fn user_delete(
        &self,
        req: Request<AuthUserDeleteRequest>,
    ) -> Result<Response<AuthUserDeleteResponse>, Status> {
        let header = self.member.user_delete(req.into_inner()).await?;
        Ok(Response::new(AuthUserDeleteResponse { header }))
    }

    async fn user_change_password(
        &self,
        req: Request<AuthUserChangePasswordRequest>,
    ) -> Result<Response<AuthUserChangePasswordResponse>, Status> {
        let header = self.member.user_change_password(req.into_inner()).await?;
        Ok(Response::new(AuthUserChangePasswordResponse { header }))
    }

    async fn user_grant_role(
        &self,
        req: Request<AuthUserGrantRoleRequest>,
    ) -> Result<Response<AuthUserGrantRoleResponse>, Status> {
        let header = self.member.user_grant_role(req.into_inner()).await?;
        Ok(Response::new(AuthUserGrantRoleResponse { header }))
    }

    async fn user_revoke_role(
        &self,
        req: Request<AuthUserRevokeRoleRequest>,
    ) -> Result<Response<AuthUserRevokeRoleResponse>, Status> {
        let header = self.member.user_revoke_role(req.into_inner()).await?;
        Ok(Response::new(AuthUserRevokeRoleResponse { header }))
    }

    async fn role_add(&self, req: Request<AuthRoleAddRequest>) -> Result<Response<AuthRoleAddResponse>, Status> {
        let header = self.member.role_add(req.into_inner()).await?;
        Ok(Response::new(AuthRoleAddResponse { header }))
    }

    async fn role_get(&self, req: Request<AuthRoleGetRequest>) -> Result<Response<AuthRoleGetResponse>, Status> {
        Ok(Response::new(self.member.role_get(req.into_inner()).await?))
    }

    async fn role_list(&self, _req: Request<AuthRoleListRequest>) -> Result<Response<AuthRoleListResponse>, Status> {
        Ok(Response::new(self.member.role_list().await?))
    }

    async fn role_delete(
        &self,
        req: Request<AuthRoleDeleteRequest>,
    ) -> Result<Response<AuthRoleDeleteResponse>, Status> {
        let header = self.member.role_delete(req.into_inner()).await?;
        Ok(Response::new(AuthRoleDeleteResponse { header }))
    }

    async fn role_grant_permission(
        &self,
        req: Request<AuthRoleGrantPermissionRequest>,
    ) -> Result<Response<AuthRoleGrantPermissionResponse>, Status> {
        let header = self.member.role_grant_permission(req.into_inner()).await?;
        Ok(Response::new(AuthRoleGrantPermissionResponse { header }))
    }

    async fn role_revoke_permission(
        &self,
        req: Request<AuthRoleRevokePermissionRequest>,
    ) -> Result<Response<AuthRoleRevokePermissionResponse>, Status> {
        let header = self.member.role_revoke_permission(req.into_inner()).await?;
        Ok(Response::new(AuthRoleRevokePermissionResponse { header }))
    }
}
