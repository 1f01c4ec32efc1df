use anyhow::Context as _;
use clap::{Parser, Subcommand};
use keepalive_agent::cmd::{
    check::{self, CheckConfig},
    run::{self, RunConfig},
    sockets::{self, SocketsConfig},
    watch::{self, WatchConfig},
};
use keepalive_agent::logging::{self, LogConfig};

/// Shows what the kernel's TCP keepalive machinery does, per connection, as Prometheus metrics:
/// probes sent, probes unanswered, and which connections the kernel dropped and why.
#[derive(Debug, Parser)]
#[command(
    version = concat!(env!("CARGO_PKG_VERSION"), " (revision ", env!("KEEPALIVE_GIT_REVISION"), ")"),
    about
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    log: LogConfig,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Load the eBPF programs (needs root, or CAP_BPF + CAP_PERFMON + CAP_SYSLOG) and serve
    /// metrics until interrupted. Follows every network namespace on the host.
    // Boxed: its flags make it several times the size of the other commands'.
    Run(Box<RunConfig>),
    /// List every TCP connection on the host (all network namespaces) with its effective
    /// keepalive settings — the socket's own TCP_KEEPIDLE/TCP_KEEPINTVL/TCP_KEEPCNT, else its
    /// namespace's net.ipv4.tcp_keepalive_* sysctls — TCP_USER_TIMEOUT, unanswered probes, and
    /// how long a dead peer could go unnoticed. Like `ss -o`, from one walk of the kernel's
    /// sockets; attaches no hook. Needs root (or CAP_BPF + CAP_PERFMON + CAP_SYSLOG).
    Sockets(SocketsConfig),
    /// Preflight: can `run` work on this machine? Checks the kernel version, BTF, each hook's
    /// BTF tracepoint and the variant that would be attached, permissions, /proc/kallsyms,
    /// tracefs (not needed) and the tick rate; prints one line per check and, for each missing
    /// prerequisite, what to do. Exits non-zero when something is missing.
    Check(CheckConfig),
    /// Print keepalive activity live, one line per event, like `tcpstates`: probes sent,
    /// probe streaks answered, and connections the kernel dropped (with the reason and the
    /// error the application saw). Loads its own programs; filter by port, address, network
    /// namespace or pod. Needs root (or CAP_BPF + CAP_PERFMON + CAP_SYSLOG).
    Watch(WatchConfig),
}

/// The hidden entry point `cargo xtask package` runs: `keepalive-agent generate-docs DIR`. Not
/// a clap subcommand, because clap_complete offers hidden subcommands in the completions it
/// writes, and this one is for packaging, not for operators.
const GENERATE_DOCS: &str = "generate-docs";

fn main() -> std::process::ExitCode {
    let mut args = std::env::args_os().skip(1);
    if args.next().is_some_and(|first| first == GENERATE_DOCS) {
        return match (args.next(), args.next()) {
            (Some(dir), None) => match generate_docs(std::path::Path::new(&dir)) {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("error: {}", one_line(&err));
                    std::process::ExitCode::FAILURE
                }
            },
            _ => {
                eprintln!("usage: keepalive-agent {GENERATE_DOCS} DIR");
                std::process::ExitCode::from(2)
            }
        };
    }
    let command = match Cli::try_parse() {
        Ok(cli) => {
            if let Err(err) = logging::init(&cli.log) {
                eprintln!("error: cannot install the logger: {err}");
                return std::process::ExitCode::FAILURE;
            }
            cli.command
        }
        Err(err) if !err.use_stderr() => {
            // --help and --version.
            let _ = err.print();
            return std::process::ExitCode::SUCCESS;
        }
        Err(err)
            if err.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand =>
        {
            // No command at all: the help is the answer.
            let _ = err.print();
            return std::process::ExitCode::from(2);
        }
        Err(err) => {
            // clap's first line names the flag, the value and why; the usage lines after it
            // would bury that in a service log.
            let rendered = err.render().to_string();
            let reason = rendered
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("invalid arguments");
            eprintln!("{reason} (see --help)");
            return std::process::ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(run(command));
    // Dropping the runtime would wait for every blocking task, however long: an audit walk, an
    // event write stuck on a dead disk. `run` already shut down what matters; the rest has
    // this long, so the agent exits within the DaemonSet's grace period.
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN);
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", one_line(&err));
            std::process::ExitCode::FAILURE
        }
    }
}

/// Writes what a package ships besides the binary, generated from the same clap definitions
/// the binary parses with, so they cannot drift: `DIR/man/keepalive-agent.1` and one page per
/// command (`keepalive-agent-run.1`, ...), and `DIR/completions/` for bash, zsh and fish, named
/// as each shell's vendor completion directory expects.
fn generate_docs(dir: &std::path::Path) -> anyhow::Result<()> {
    use clap::CommandFactory as _;
    use clap_complete::Shell;

    let name = "keepalive-agent";
    let man = dir.join("man");
    let completions = dir.join("completions");
    for sub in [&man, &completions] {
        std::fs::create_dir_all(sub)
            .with_context(|| format!("creating {} (is DIR writable?)", sub.display()))?;
    }
    clap_mangen::generate_to(Cli::command().name(name), &man)
        .with_context(|| format!("writing the man pages to {}", man.display()))?;
    for (shell, file) in [
        (Shell::Bash, name.to_owned()),
        (Shell::Zsh, format!("_{name}")),
        (Shell::Fish, format!("{name}.fish")),
    ] {
        // Into memory first: clap_complete panics when its writer fails.
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), name, &mut script);
        let path = completions.join(file);
        std::fs::write(&path, script).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// What the runtime's leftover blocking tasks get at exit (see `run::SHUTDOWN_DEADLINE`).
const RUNTIME_SHUTDOWN: std::time::Duration = std::time::Duration::from_secs(1);

/// Every context, outermost first, on one line so a service log keeps the whole reason. Errors
/// whose message already quotes their source would repeat it; a cause already said is skipped.
fn one_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string().replace('\n', " ");
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run(config) => run::run(*config).await.context("keepalive-agent run"),
        Command::Check(config) => check::run(config).await.context("keepalive-agent check"),
        Command::Watch(config) => watch::run(config).await.context("keepalive-agent watch"),
        Command::Sockets(config) => tokio::task::spawn_blocking(move || sockets::run(&config))
            .await
            .context("keepalive-agent sockets")?
            .context("keepalive-agent sockets"),
    }
}
