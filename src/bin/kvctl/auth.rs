//! `auth`, `user` and `role`: authentication and role-based access
//! control, as etcdctl's commands, with etcdctl's output.

use anyhow::{bail, Result};
use clap::Subcommand;
use kvd::client::Client;
use kvd::proto::authpb::{permission::Type as PermType, Permission};

use crate::output::Format;

/// Auth commands.
#[derive(Subcommand)]
pub enum AuthCommand {
    /// Enables authentication (adding the root role to the root user first, if needed).
    Enable,
    /// Disables authentication.
    Disable,
    /// Whether authentication is on, and the auth revision.
    Status,
}

/// User commands.
#[derive(Subcommand)]
pub enum UserCommand {
    /// Adds a user: `name` or `name:password` (the password is asked for
    /// when not given).
    Add {
        user: String,
        /// A user with no password, known by its client certificate only.
        #[arg(long)]
        no_password: bool,
        /// Read the password from standard input, without prompting twice.
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        interactive: bool,
    },
    /// Shows a user's roles (and, with --detail, their permissions).
    Get {
        user: String,
        #[arg(long)]
        detail: bool,
    },
    /// Lists the users.
    List,
    /// Deletes a user.
    Delete { user: String },
    /// Changes a user's password (asked for).
    Passwd {
        user: String,
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        interactive: bool,
    },
    /// Grants a role to a user.
    GrantRole { user: String, role: String },
    /// Revokes a role from a user.
    RevokeRole { user: String, role: String },
}

/// Role commands.
#[derive(Subcommand)]
pub enum RoleCommand {
    /// Adds a role.
    Add { role: String },
    /// Shows a role's permissions.
    Get { role: String },
    /// Lists the roles.
    List,
    /// Deletes a role.
    Delete { role: String },
    /// Grants a permission (read, write or readwrite) on a key, a range
    /// [key, endkey), a prefix (--prefix) or every key from key on
    /// (--from-key) to a role.
    GrantPermission {
        role: String,
        perm: String,
        key: String,
        endkey: Option<String>,
        #[arg(long)]
        prefix: bool,
        #[arg(long)]
        from_key: bool,
    },
    /// Revokes a permission from a role.
    RevokePermission {
        role: String,
        key: String,
        endkey: Option<String>,
        #[arg(long)]
        prefix: bool,
        #[arg(long)]
        from_key: bool,
    },
}

/// Reads a password from the terminal without echo (or a line of standard
/// input when it is not a terminal).
pub fn read_password(prompt: &str) -> Result<String> {
    use std::io::IsTerminal;
    if !std::io::stdin().is_terminal() {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).map_err(|e| anyhow::anyhow!("reading the password: {e}"))?;
        return Ok(line.trim_end_matches(['\n', '\r']).to_string());
    }
    rpassword::prompt_password(prompt).map_err(|e| anyhow::anyhow!("reading the password: {e}"))
}

/// `name` or `name:password` as etcdctl's `--user` takes it, asking for a
/// password that is not given.
pub fn user_and_password(user: &str, password: Option<&str>) -> Result<(String, String)> {
    if let Some(p) = password {
        return Ok((user.to_string(), p.to_string()));
    }
    match user.split_once(':') {
        Some((name, password)) => Ok((name.to_string(), password.to_string())),
        None => Ok((user.to_string(), read_password("Password: ")?)),
    }
}

/// The range end `endkey`, `--prefix` or `--from-key` name, as etcdctl
/// makes it.
fn range_end(key: &str, endkey: Option<&str>, prefix: bool, from_key: bool) -> Result<Vec<u8>> {
    match (endkey, prefix, from_key) {
        (Some(_), true, _) | (Some(_), _, true) => bail!("unexpected endkey with --prefix or --from-key"),
        (_, true, true) => bail!("--prefix and --from-key cannot be set at the same time, choose one"),
        (Some(end), false, false) => Ok(end.as_bytes().to_vec()),
        (None, true, false) => Ok(kvd::mvcc::keys::prefix_end(key.as_bytes())),
        (None, false, true) => Ok(vec![0]),
        (None, false, false) => Ok(Vec::new()),
    }
}

pub async fn auth(client: &Client, cmd: AuthCommand, _fmt: Format) -> Result<()> {
    match cmd {
        AuthCommand::Enable => {
            // As etcdctl: the root role is made and given to root if missing.
            loop {
                match client.auth_enable().await {
                    Ok(_) => break,
                    Err(s) if s.message() == "etcdserver: root user does not have root role" => {
                        if let Err(e) = client.role_add("root").await {
                            if e.message() != "etcdserver: role name already exists" {
                                return Err(e.into());
                            }
                        }
                        client.user_grant_role("root", "root").await?;
                    }
                    Err(s) => return Err(s.into()),
                }
            }
            outln!("Authentication Enabled");
        }
        AuthCommand::Disable => {
            client.auth_disable().await?;
            outln!("Authentication Disabled");
        }
        AuthCommand::Status => {
            let s = client.auth_status().await?;
            outln!("Authentication Status: {}", s.enabled);
            outln!("AuthRevision: {}", s.auth_revision);
        }
    }
    Ok(())
}

fn new_password(user: &str, interactive: bool) -> Result<String> {
    if !interactive {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
        return Ok(line.trim_end_matches(['\n', '\r']).to_string());
    }
    let first = read_password(&format!("Password of {user}: "))?;
    let again = read_password(&format!("Type password of {user} again for confirmation: "))?;
    if first != again {
        bail!("given password doesn't match");
    }
    Ok(first)
}

pub async fn user(client: &Client, cmd: UserCommand, _fmt: Format) -> Result<()> {
    match cmd {
        UserCommand::Add { user, no_password, interactive } => {
            let (name, password) = match (user.split_once(':'), no_password) {
                (_, true) => (user.clone(), String::new()),
                (Some((n, p)), false) => (n.to_string(), p.to_string()),
                (None, false) => (user.clone(), new_password(&user, interactive)?),
            };
            client.user_add(&name, &password, no_password).await?;
            outln!("User {name} created");
        }
        UserCommand::Get { user, detail } => {
            let resp = client.user_get(&user).await?;
            outln!("User: {user}");
            if detail {
                for role in &resp.roles {
                    outln!("");
                    print_role(role, &client.role_get(role).await?.perm);
                }
            } else {
                outln!("Roles: {}", resp.roles.join(" "));
            }
        }
        UserCommand::List => {
            for u in client.user_list().await?.users {
                outln!("{u}");
            }
        }
        UserCommand::Delete { user } => {
            client.user_delete(&user).await?;
            outln!("User {user} deleted");
        }
        UserCommand::Passwd { user, interactive } => {
            let password = new_password(&user, interactive)?;
            client.user_change_password(&user, &password).await?;
            outln!("Password updated");
        }
        UserCommand::GrantRole { user, role } => {
            client.user_grant_role(&user, &role).await?;
            outln!("Role {role} is granted to user {user}");
        }
        UserCommand::RevokeRole { user, role } => {
            client.user_revoke_role(&user, &role).await?;
            outln!("Role {role} is revoked from user {user}");
        }
    }
    Ok(())
}

/// A role's permissions as etcdctl prints them.
fn print_role(role: &str, perms: &[Permission]) {
    outln!("Role {role}");
    let line = |p: &Permission| {
        let (key, end) = (String::from_utf8_lossy(&p.key), String::from_utf8_lossy(&p.range_end));
        if p.range_end.is_empty() {
            return format!("\t{key}");
        }
        let mut s = if p.range_end == [0] { format!("\t[{key}, <open ended>") } else { format!("\t[{key}, {end})") };
        if kvd::mvcc::keys::prefix_end(&p.key) == p.range_end {
            s.push_str(&format!(" (prefix {key})"));
        }
        s
    };
    for (title, kinds) in
        [("KV Read:", [PermType::Read, PermType::Readwrite]), ("KV Write:", [PermType::Write, PermType::Readwrite])]
    {
        outln!("{title}");
        for p in perms.iter().filter(|p| kinds.iter().any(|k| *k as i32 == p.perm_type)) {
            outln!("{}", line(p));
        }
    }
}

pub async fn role(client: &Client, cmd: RoleCommand, _fmt: Format) -> Result<()> {
    match cmd {
        RoleCommand::Add { role } => {
            client.role_add(&role).await?;
            outln!("Role {role} created");
        }
        RoleCommand::Get { role } => print_role(&role, &client.role_get(&role).await?.perm),
        RoleCommand::List => {
            for r in client.role_list().await?.roles {
                outln!("{r}");
            }
        }
        RoleCommand::Delete { role } => {
            client.role_delete(&role).await?;
            outln!("Role {role} deleted");
        }
        RoleCommand::GrantPermission { role, perm, key, endkey, prefix, from_key } => {
            let perm_type = match perm.to_ascii_lowercase().as_str() {
                "read" => PermType::Read,
                "write" => PermType::Write,
                "readwrite" => PermType::Readwrite,
                other => bail!("invalid permission type {other}"),
            };
            let range_end = range_end(&key, endkey.as_deref(), prefix, from_key)?;
            let perm = Permission { perm_type: perm_type as i32, key: key.into_bytes(), range_end };
            client.role_grant_permission(&role, perm).await?;
            outln!("Role {role} updated");
        }
        RoleCommand::RevokePermission { role, key, endkey, prefix, from_key } => {
            let end = range_end(&key, endkey.as_deref(), prefix, from_key)?;
            client.role_revoke_permission(&role, key.as_bytes(), &end).await?;
            if end.is_empty() {
                outln!("Permission of key {key} is revoked from role {role}");
            } else {
                let shown =
                    if end == [0] { "<open ended>".to_string() } else { String::from_utf8_lossy(&end).into_owned() };
                outln!("Permission of range [{key}, {shown}) is revoked from role {role}");
            }
        }
    }
    Ok(())
}
