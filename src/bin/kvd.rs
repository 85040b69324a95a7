//! `kvd`: one member of a kvd cluster.

use clap::Parser;
use kvd::config::Config;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,openraft=warn,sled=warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = Config::parse();
    if let Err(e) = run(config).await {
        eprintln!("kvd: error: {e}");
        std::process::exit(1);
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let validated = config.validate()?;
    let server = kvd::server::start(validated).await?;
    tokio::select! {
        r = shutdown_signal() => r?,
        why = server.fatal() => {
            // Nothing is lost by stopping here: only writes on disk were
            // acknowledged. Restart the member once the cause is fixed.
            anyhow::bail!("raft stopped: {why}; restart this member once the cause is fixed")
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
