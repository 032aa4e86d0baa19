//! `ferryd`: the ferry agent.

use clap::Parser;
use std::path::PathBuf;

/// ferry agent: runs VMs under QEMU and migrates them between hosts.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Configuration file (TOML).
    #[arg(
        long,
        short,
        env = "FERRYD_CONFIG",
        default_value = "/etc/ferry/ferryd.toml"
    )]
    config: PathBuf,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    if args.log_json {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .json()
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    let cfg = ferry_agent::config::AgentConfig::load(&args.config)?;
    ferry_agent::failpoint::setup();
    ferry_agent::server::run(cfg).await
}
