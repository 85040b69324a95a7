//! `kvctl`: the command-line client of kvd, with etcdctl's verbs, flags and
//! output formats. It works against etcd too.

/// `println!` that ends kvctl quietly once its reader has gone away
/// (`kvctl get --prefix / | head`), where `println!` would panic.
macro_rules! outln {
    () => { $crate::write_line(format_args!("")) };
    ($($arg:tt)*) => { $crate::write_line(format_args!($($arg)*)) };
}

mod auth;
mod bench;
mod bench_lease;
mod cluster;
mod coord;
mod kv;
mod output;
mod snapshot;
mod txn;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use kvd::client::Client;
use output::Format;

/// Writes a line to stdout for [`outln!`]. A reader that has gone away ends
/// kvctl with exit code 0, as it ends ripgrep; any other failure to write is
/// reported, exit code 1.
fn write_line(args: std::fmt::Arguments) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let written = stdout.write_fmt(args).and_then(|_| stdout.write_all(b"\n"));
    match written {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => {
            eprintln!("Error: writing the output: {e}");
            std::process::exit(1);
        }
    }
}

#[derive(Parser)]
#[command(name = "kvctl", version, about = "Command-line client for kvd (and any etcd v3 server)")]
struct Cli {
    /// Comma-separated endpoints (host:port or http://host:port).
    #[arg(long, global = true, env = "KVCTL_ENDPOINTS", default_value = "127.0.0.1:2379")]
    endpoints: String,
    /// Output format.
    #[arg(short = 'w', long = "write-out", global = true, value_enum, default_value = "simple")]
    write_out: Format,
    /// Time to wait for a connection, e.g. 2s or 500ms.
    #[arg(long, global = true, default_value = "2s", value_parser = parse_duration)]
    dial_timeout: Duration,
    /// Time to wait for a command, e.g. 5s.
    #[arg(long, global = true, default_value = "5s", value_parser = parse_duration)]
    command_timeout: Duration,
    /// CA certificates (PEM) to check TLS servers against.
    #[arg(long, global = true, env = "KVCTL_CACERT")]
    cacert: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for servers that check client certificates.
    #[arg(long = "cert", id = "tls_cert", global = true, env = "KVCTL_CERT", requires = "tls_key")]
    cert: Option<std::path::PathBuf>,
    /// Private key (PEM) of --cert.
    #[arg(long = "key", id = "tls_key", global = true, env = "KVCTL_KEY", requires = "tls_cert")]
    key: Option<std::path::PathBuf>,
    /// Accept any server certificate: the connection is encrypted, but to a
    /// server that is not checked (as etcdctl's flag; for --auto-tls members).
    #[arg(long, global = true, env = "KVCTL_INSECURE_SKIP_TLS_VERIFY")]
    insecure_skip_tls_verify: bool,
    /// User name, or `name:password`, to authenticate as (the password is
    /// asked for when not given here or with --password).
    #[arg(long = "user", id = "auth_user", global = true, env = "KVCTL_USER")]
    user: Option<String>,
    /// Password of --user.
    #[arg(long = "password", id = "auth_password", global = true, env = "KVCTL_PASSWORD", requires = "auth_user")]
    password: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Puts the given key into the store.
    Put(kv::PutArgs),
    /// Gets the key or a range of keys.
    Get(kv::GetArgs),
    /// Removes the specified key or range of keys [key, range_end).
    Del(kv::DelArgs),
    /// Txn processes all the requests in one transaction.
    Txn(txn::TxnArgs),
    /// Compacts the event history.
    Compaction(kv::CompactionArgs),
    /// Membership commands.
    #[command(subcommand)]
    Member(cluster::MemberCommand),
    /// Endpoint commands.
    #[command(subcommand)]
    Endpoint(cluster::EndpointCommand),
    /// Alarm commands.
    #[command(subcommand)]
    Alarm(cluster::AlarmCommand),
    /// Defragments each endpoint's storage.
    Defrag {
        /// Use all members' client URLs instead of --endpoints.
        #[arg(long)]
        cluster: bool,
    },
    /// Hands leadership to another member; one of --endpoints must be the leader.
    MoveLeader {
        /// The new leader's member ID, in hex.
        transferee: String,
    },
    /// Watches events on a key or prefix.
    Watch(coord::WatchArgs),
    /// Lease commands.
    #[command(subcommand)]
    Lease(coord::LeaseCommand),
    /// Acquires a named lock (and runs a command while holding it).
    Lock(coord::LockArgs),
    /// Campaigns in a named election, or observes it with -l.
    Elect(coord::ElectArgs),
    /// Snapshot commands: save, status, restore.
    #[command(subcommand)]
    Snapshot(snapshot::SnapshotCommand),
    /// Authentication: enable, disable, status.
    #[command(subcommand)]
    Auth(auth::AuthCommand),
    /// User commands.
    #[command(subcommand)]
    User(auth::UserCommand),
    /// Role commands.
    #[command(subcommand)]
    Role(auth::RoleCommand),
    /// Load generator: put, range, txn-put or watch-latency, against kvd or etcd.
    Bench(bench::BenchArgs),
    /// Prints a shell completion script for kvctl (or kvd), e.g.
    /// `source <(kvctl completion bash)`.
    Completion(CompletionArgs),
}

#[derive(clap::Args)]
struct CompletionArgs {
    /// The shell.
    #[arg(value_enum)]
    shell: clap_complete::Shell,
    /// The program to complete.
    #[arg(value_enum, default_value = "kvctl")]
    program: Program,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Program {
    Kvctl,
    Kvd,
}

/// Writes the completion script of `args.program` for `args.shell`.
fn completion(args: &CompletionArgs) {
    use clap::CommandFactory;
    let (mut command, name) = match args.program {
        Program::Kvctl => (Cli::command(), "kvctl"),
        Program::Kvd => (kvd::config::Config::command(), "kvd"),
    };
    clap_complete::generate(args.shell, &mut command, name, &mut std::io::stdout());
}

/// The TLS settings `--cacert`, `--cert`, `--key` and
/// `--insecure-skip-tls-verify` give, if any; checked here, so that a file
/// that cannot be used is named before any endpoint is tried.
fn client_tls(cli: &Cli) -> Result<Option<kvd::client::ClientTls>, String> {
    if cli.cacert.is_none() && cli.cert.is_none() && !cli.insecure_skip_tls_verify {
        return Ok(None);
    }
    let tls = kvd::client::ClientTls {
        ca: cli.cacert.clone(),
        identity: cli.cert.clone().zip(cli.key.clone()),
        skip_verify: cli.insecure_skip_tls_verify,
    };
    tls.config()?;
    Ok(Some(tls))
}

pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.find(|c: char| !c.is_ascii_digit() && c != '.').map(|i| s.split_at(i)).unwrap_or((s, "s"));
    let n: f64 = num.parse().map_err(|_| format!("invalid duration {s:?}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("invalid duration unit in {s:?} (use ms, s or m)")),
    };
    Ok(Duration::from_secs_f64(secs))
}

/// jemalloc, as in `kvd`: under `kvctl bench put` from 64 clients glibc's
/// malloc and free took a tenth of kvctl's CPU.
#[cfg(unix)]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    // A member's runtime, the LIFO slot off (see kvd::runtime): the next
    // requests of the clients a connection's answers woke go out together,
    // in one socket write, rather than one each.
    match kvd::runtime::build(None) {
        Ok(runtime) => runtime.block_on(run()),
        Err(e) => {
            eprintln!("Error: could not start the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Completion(args) = &cli.command {
        completion(args);
        return ExitCode::SUCCESS;
    }
    let endpoints: Vec<String> =
        cli.endpoints.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
    let tls = match client_tls(&cli) {
        Ok(tls) => tls,
        Err(e) => {
            eprintln!("Error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let client = match Client::with_tls(&endpoints, cli.dial_timeout, tls.as_ref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("Error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let client = match &cli.user {
        None => client,
        Some(user) => match auth::user_and_password(user, cli.password.as_deref()) {
            Ok((name, password)) => client.with_user(&name, &password),
            Err(e) => {
                eprintln!("Error: {e}");
                return ExitCode::FAILURE;
            }
        },
    };
    let fmt = cli.write_out;
    // Commands that run until interrupted have no command timeout.
    let long_running = match &cli.command {
        Command::Watch(_) | Command::Lock(_) | Command::Elect(_) | Command::Bench(_) => true,
        // A file is read and written locally, for as long as that takes;
        // save has the command timeout, as in etcdctl.
        Command::Snapshot(c) => snapshot::is_local(c),
        Command::Lease(c) => coord::lease_is_long_running(c),
        _ => false,
    };
    let run = async {
        match cli.command {
            Command::Put(a) => kv::put(&client, a, fmt).await,
            Command::Get(a) => kv::get(&client, a, fmt).await,
            Command::Del(a) => kv::del(&client, a, fmt).await,
            Command::Txn(a) => txn::run(&client, a, fmt).await,
            Command::Compaction(a) => kv::compaction(&client, a, fmt).await,
            Command::Member(c) => cluster::member(&client, c, fmt).await,
            Command::Endpoint(c) => cluster::endpoint(&client, c, fmt, cli.command_timeout).await,
            Command::MoveLeader { transferee } => cluster::move_leader(&client, &transferee).await,
            Command::Alarm(c) => cluster::alarm(&client, c).await,
            Command::Defrag { cluster } => cluster::defrag(&client, cluster, cli.dial_timeout).await,
            Command::Watch(a) => coord::watch(&client, a, fmt).await,
            Command::Lease(c) => coord::lease(&client, c, fmt).await,
            Command::Lock(a) => coord::lock(&client, a).await,
            Command::Elect(a) => coord::elect(&client, a).await,
            Command::Snapshot(c) => snapshot::run(&client, c, fmt).await,
            Command::Bench(a) => bench::run(&client, a, fmt, cli.dial_timeout).await,
            Command::Auth(c) => auth::auth(&client, c, fmt).await,
            Command::User(c) => auth::user(&client, c, fmt).await,
            Command::Role(c) => auth::role(&client, c, fmt).await,
            Command::Completion(_) => Ok(()),
        }
    };
    let result = if long_running {
        run.await
    } else {
        match tokio::time::timeout(cli.command_timeout, run).await {
            Ok(r) => r,
            Err(_) => Err(anyhow::anyhow!("context deadline exceeded")),
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {}", output::error_text(&e, &client));
            ExitCode::FAILURE
        }
    }
}
