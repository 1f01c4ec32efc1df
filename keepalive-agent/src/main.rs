use anyhow::Context as _;
use clap::{Parser, Subcommand};
use keepalive_agent::agent::{self, RunConfig};

/// Shows what the kernel's TCP keepalive machinery does, per connection, as Prometheus metrics:
/// probes sent, probes unanswered, and which connections the kernel dropped and why.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Load the eBPF programs (needs root, or CAP_BPF + CAP_PERFMON + CAP_SYSLOG) and serve
    /// metrics until interrupted. Follows every network namespace on the host.
    Run(RunConfig),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match Cli::parse().command {
        Command::Run(config) => agent::run(config).await.context("keepalive-agent run"),
    }
}
