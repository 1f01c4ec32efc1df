//! Developer tasks for keepalive-agent, run as `cargo xtask <command>`.
//!
//! Every command first runs `setup`, which installs what a fresh Debian machine lacks (system
//! packages, a nightly toolchain on the LLVM major bpf-linker was built for, bpf-linker itself)
//! and picks the nightly toolchain the agent's build.rs uses to compile the eBPF programs.

mod deploy_tools;
mod env;
mod image;
mod package;
mod setup;
mod tasks;
mod vm;

use std::{ffi::OsString, process::ExitCode};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Build, run, test, package and benchmark keepalive-agent",
    long_about = "Build, run, test and benchmark keepalive-agent.\n\n\
        Every command runs `setup` first, so a fresh Debian machine only needs rustup and \
        `cargo xtask <command>` (as root, or with the Debian packages already installed)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what this machine lacks: Debian packages, a nightly toolchain on LLVM 22 with
    /// rust-src and clippy, rustfmt and clippy on the active toolchain, bpf-linker, and mount
    /// tracefs. Idempotent: prints one line per check.
    Setup,
    /// Setup, then build target/release/keepalive-agent (with the eBPF programs embedded).
    Build {
        /// Also build the static arm64 agent,
        /// target/aarch64-unknown-linux-musl/release/keepalive-agent (Debian's cross gcc).
        #[arg(long)]
        arm64: bool,
    },
    /// Build, then run `keepalive-agent run ARGS...` in the foreground, as root (via `sudo -E`
    /// when not root). Exits with the agent's status.
    Run {
        /// Arguments for `keepalive-agent run` (put them after `--`).
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARGS"
        )]
        args: Vec<OsString>,
    },
    /// Build, then run fmt check, clippy (host crates and the eBPF crate), the image, the agent's
    /// unit tests on arm64 (qemu-user), `cargo test`, each fuzz target for a bounded time (fuzz/)
    /// and the kernel matrix.
    /// KEEPALIVE_REQUIRE_KERNEL is passed through to the tests unchanged.
    Test {
        /// Extra arguments appended to `cargo test` (put them after `--`).
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARGS"
        )]
        args: Vec<OsString>,
    },
    /// Setup, then build the container image (deploy/Containerfile, FROM scratch) with buildah:
    /// a static musl agent tagged localhost/keepalive-agent:<version> (amd64) and
    /// :<version>-arm64, and the manifest list of both, :<version>-multiarch.
    Image,
    /// Setup, then build the Debian package for plain VMs: the static musl agent, the hardened
    /// systemd unit (deploy/systemd/), /etc/default/keepalive-agent (a conffile), man pages and
    /// bash/zsh/fish completions generated from the CLI, as
    /// target/package/keepalive-agent_<version>_amd64.deb.
    Package,
    /// Build, then run the hook-cost benchmark (`keepalive-tests --bin hook-cost`).
    Bench {
        /// Arguments for the hook-cost benchmark (put them after `--`).
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARGS"
        )]
        args: Vec<OsString>,
    },
    /// Build, then profile the agent's kernel programs (`keepalive-tests --bin program-profile`):
    /// `perf record -a -g` while hook-cost runs 50 000 probing connections, then while it runs
    /// its churn workloads, and each program's samples by source line (and by the helper they
    /// were in), from the kernel's line information for the programs' JIT code. perf's data
    /// and hook-cost's output are kept in target/profile/.
    Profile {
        /// Arguments for program-profile (after `--`): --workload expiries|closes (repeatable),
        /// --top N lines per program (12), --out DIR.
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARGS"
        )]
        args: Vec<OsString>,
    },
    /// Build the agent without parts of its kernel programs as well as with them, then run the
    /// hook-cost benchmark against each, alternately (`--pairs` pairs, the order swapped every
    /// pair): what a part costs is the difference between the figures of the two runs of a pair.
    /// The agent without them is target/ablate/keepalive-agent-without-<parts>; it warns when
    /// it starts, and target/release/keepalive-agent is the agent as built again afterwards.
    Ablate {
        /// Comma-separated parts to leave out: ring-write (no record reaches the ring buffer),
        /// counters (no namespace counter is looked up or added to), counter-adds (the
        /// namespace's counters are looked up but not added to), cgroup (the socket's
        /// cgroup is not read), short-records (every keepalive expiry record is reserved
        /// and written at the length that fills one cache line with its header).
        parts: String,
        /// Pairs of runs.
        #[arg(long, default_value_t = 2)]
        pairs: u32,
        /// Arguments for the hook-cost benchmark (after `--`); without any, the per-hook rows
        /// only: --rounds 0 --seconds 3 --connections 1000 --pipeline-connections 10
        /// --probing-connections 0 --sync-connections ''.
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARGS"
        )]
        args: Vec<OsString>,
    },
    /// Setup, then the kernel matrix: Debian's 5.10, 6.1 and 6.12 kernels (newest, and newest
    /// before the icsk_keepalive_timer backport) booted in qemu with the static agent and the
    /// scenario program; prints kernel vs agent figures per scenario, writes
    /// target/kernel-matrix.md, fails on any mismatch. Packages are cached in
    /// /var/cache/keepalive-agent ($KEEPALIVE_VM_CACHE).
    Vm(vm::VmArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup => setup::setup().map(|_| ExitCode::SUCCESS),
        Command::Build { arm64 } => tasks::build_command(arm64).map(|()| ExitCode::SUCCESS),
        Command::Run { args } => tasks::run(&args),
        Command::Test { args } => tasks::test(&args).map(|()| ExitCode::SUCCESS),
        Command::Image => setup::setup()
            .and_then(|setup| image::build_image(&setup))
            .map(|_| ExitCode::SUCCESS),
        Command::Package => setup::setup()
            .and_then(|setup| package::build_package(&setup))
            .map(|_| ExitCode::SUCCESS),
        Command::Bench { args } => tasks::bench(&args).map(|()| ExitCode::SUCCESS),
        Command::Profile { args } => tasks::profile(&args).map(|()| ExitCode::SUCCESS),
        Command::Ablate { parts, pairs, args } => {
            tasks::ablate(&parts, pairs, &args).map(|()| ExitCode::SUCCESS)
        }
        Command::Vm(args) => setup::setup()
            .and_then(|setup| vm::vm(&setup, &args))
            .map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Command {
        Cli::try_parse_from(std::iter::once("xtask").chain(args.iter().copied()))
            .expect("parses")
            .command
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
    }

    #[test]
    fn run_passes_args_after_double_dash() {
        let Command::Run { args } = parse(&["run", "--", "--listen", "0.0.0.0:9000", "-v"]) else {
            panic!("not run");
        };
        assert_eq!(args, ["--listen", "0.0.0.0:9000", "-v"]);
        let Command::Run { args } = parse(&["run"]) else {
            panic!("not run");
        };
        assert!(args.is_empty());
    }

    #[test]
    fn build_takes_arm64() {
        assert!(matches!(parse(&["build"]), Command::Build { arm64: false }));
        assert!(matches!(
            parse(&["build", "--arm64"]),
            Command::Build { arm64: true }
        ));
    }

    #[test]
    fn vm_takes_kernels_and_fixture_mode() {
        let Command::Vm(args) =
            parse(&["vm", "--kernel", "6.1", "--kernel", "5.10", "--jobs", "1"])
        else {
            panic!("not vm");
        };
        assert_eq!(args.kernels, ["6.1", "5.10"]);
        assert_eq!(args.jobs, 1);
        assert!(!args.update_btf_fixtures);
        let Command::Vm(args) = parse(&["vm", "--update-btf-fixtures"]) else {
            panic!("not vm");
        };
        assert!(args.update_btf_fixtures);
    }

    #[test]
    fn test_passes_cargo_test_args() {
        let Command::Test { args } = parse(&["test", "--", "-p", "keepalive-tests", "--", "x"])
        else {
            panic!("not test");
        };
        assert_eq!(args, ["-p", "keepalive-tests", "--", "x"]);
    }
}
