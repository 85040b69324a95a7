//! `kvd`: one member of a kvd cluster.

use clap::Parser;
use kvd::config::{Config, Validated};
use tracing_subscriber::EnvFilter;

/// jemalloc rather than glibc's malloc: under put from 64 clients glibc's
/// free lists (`_int_malloc`, `unlink_chunk`, `malloc_consolidate`) took a
/// sixth of every member's CPU, much of it for sled's nodes and batches.
#[cfg(unix)]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings: a background thread gives pages freed and left
/// unused for a second back to the system, so that a member's resident size
/// falls after a burst of writes without any call from kvd (with glibc kvd
/// called `malloc_trim` itself once it went quiet).
#[cfg(unix)]
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8] = b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

fn main() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    // RUST_LOG, when set, says what to log, and nothing is left out.
    let (filter, quiet) = match EnvFilter::try_from_default_env() {
        Ok(filter) => (filter, None),
        Err(_) => (EnvFilter::new(kvd::logging::DEFAULT_LOG), Some(kvd::logging::PeerNoise)),
    };
    tracing_subscriber::registry().with(filter).with(quiet).with(fmt).init();
    let config = Config::try_parse().unwrap_or_else(|e| bad_flags(e));
    let validated = config.validate().unwrap_or_else(|e| fail(e.into()));
    let runtime = kvd::runtime::build(config.worker_threads).unwrap_or_else(|e| fail(e.into()));
    if let Err(e) = runtime.block_on(serve(validated)) {
        // Exits at once, without waiting for the runtime's tasks to wind down.
        fail(e);
    }
}

/// Flags clap cannot parse: one line and exit code 1, as for every other
/// refusal to start; `--help` and `--version` print as clap prints them.
fn bad_flags(e: clap::Error) -> ! {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        e.exit();
    }
    let text = e.to_string();
    let first = text.lines().next().unwrap_or_default();
    eprintln!("kvd: error: {} (see kvd --help)", first.trim_start_matches("error: "));
    std::process::exit(1);
}

fn fail(e: anyhow::Error) -> ! {
    eprintln!("kvd: error: {e}");
    std::process::exit(1);
}

async fn serve(validated: Validated) -> anyhow::Result<()> {
    let server = kvd::server::start(validated).await?;
    tokio::select! {
        r = shutdown_signal() => r?,
        why = server.fatal() => {
            // Nothing is lost by stopping here: only writes on disk were
            // acknowledged.
            anyhow::bail!("{why}")
        }
    }
    tracing::info!("shutting down");
    server.shutdown().await;
    Ok(())
}

async fn shutdown_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    Ok(())
}
