//! `build`, `run`, `test` and `bench`: each runs setup and the build first.

use std::{
    ffi::{OsStr, OsString},
    path::PathBuf,
    process::ExitCode,
};

use anyhow::{Context as _, Result, bail};

use crate::{
    env::{self, ARM64},
    setup::{self, Setup},
};

/// Tells the integration tests and the benchmark which agent binary to run.
const AGENT_BIN_ENV: &str = "KEEPALIVE_AGENT_BIN";
/// Built by the agent's build.rs for the BPF target only; host-side commands leave it out.
const EBPF_PACKAGE: &str = "keepalive-ebpf";

/// Setup, then build the agent (whose build.rs compiles and embeds the eBPF programs).
pub(crate) fn build() -> Result<(Setup, PathBuf)> {
    let setup = setup::setup()?;
    let bin = build_agent(&setup)?;
    Ok((setup, bin))
}

/// `cargo xtask build`: the agent, and with `arm64` the static aarch64 agent as well.
pub(crate) fn build_command(arm64: bool) -> Result<()> {
    let (setup, _) = build()?;
    if arm64 {
        header(&format!(
            "build: the static agent for {} (cross gcc, see env::ARM64)",
            ARM64.rust_target
        ));
        let bin = crate::image::build_static_agent(&setup, &ARM64)?;
        crate::image::ensure_static(&bin, &ARM64)?;
        println!(
            "built: {} (static, aarch64; runs here as `qemu-aarch64-static {} --version`)",
            bin.display(),
            bin.display()
        );
    }
    Ok(())
}

fn build_agent(setup: &Setup) -> Result<PathBuf> {
    header("build: cargo build --release -p keepalive-agent");
    env::run(
        setup
            .command("cargo")
            .args(["build", "--release", "-p", "keepalive-agent"]),
    )
    .context("building keepalive-agent failed")?;
    let bin = setup.env.agent_bin();
    if !bin.is_file() {
        bail!("the build succeeded but {} does not exist", bin.display());
    }
    println!("built: {}", bin.display());
    Ok(bin)
}

/// Build, then run `keepalive-agent run ARGS...` in the foreground as root. On success this
/// process is replaced by the agent, so the agent's exit status is ours.
pub(crate) fn run(args: &[OsString]) -> Result<ExitCode> {
    use std::os::unix::process::CommandExt as _;

    let (setup, bin) = build()?;
    let mut cmd = if env::is_root() {
        setup.command(&bin)
    } else if let Some(sudo) = setup.env.which(OsStr::new("sudo")) {
        println!("note: not root; running the agent via sudo -E");
        let mut cmd = setup.command(sudo);
        cmd.arg("-E").arg(&bin);
        cmd
    } else {
        bail!(
            "the agent must run as root (it loads eBPF programs) and sudo is not installed; \
             run as root: {} run ...",
            bin.display()
        );
    };
    cmd.arg("run").args(args);
    header(&format!("run: {}", env::display(&cmd)));
    let err = cmd.exec();
    Err(err).with_context(|| format!("failed to start {}", bin.display()))
}

/// Build, then fmt, clippy (host crates, then the eBPF crate for the BPF target), then tests.
pub(crate) fn test(args: &[OsString]) -> Result<()> {
    let (setup, bin) = build()?;

    step("fmt", "cargo fmt --all -- --check", || {
        env::run(
            setup
                .command("cargo")
                .args(["fmt", "--all", "--", "--check"]),
        )
    })?;

    step(
        "clippy (host)",
        "cargo clippy --workspace --exclude keepalive-ebpf --all-targets --release -- -D warnings",
        || {
            env::run(setup.command("cargo").args([
                "clippy",
                "--workspace",
                "--exclude",
                EBPF_PACKAGE,
                "--all-targets",
                "--release",
                "--",
                "-D",
                "warnings",
            ]))
        },
    )?;

    let ebpf_clippy = format!(
        "cargo +{} clippy -p {EBPF_PACKAGE} --target bpfel-unknown-none -Z build-std=core \
         --release -- -D warnings",
        setup.toolchain
    );
    step("clippy (eBPF)", &ebpf_clippy, || {
        let mut cmd = setup.command("cargo");
        cmd.current_dir(setup.env.root.join(EBPF_PACKAGE))
            // The same cfg aya-build gives the eBPF build, so clippy sees the same code.
            .env(
                "CARGO_ENCODED_RUSTFLAGS",
                format!("--cfg=bpf_target_arch=\"{}\"", std::env::consts::ARCH),
            )
            .arg(format!("+{}", setup.toolchain))
            .args([
                "clippy",
                "-p",
                EBPF_PACKAGE,
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--release",
                "--",
                "-D",
                "warnings",
            ]);
        env::run(&mut cmd)
    })?;

    // The image test (tests/tests/deploy_image.rs) runs the agent from this image.
    step("image", "cargo xtask image", || {
        crate::image::build_image(&setup).map(drop)
    })?;

    // The package test (tests/tests/deploy_package.rs) installs this package into a scratch root.
    step("package", "cargo xtask package", || {
        crate::package::build_package(&setup).map(drop)
    })?;

    // The image step built the arm64 agent's dependencies in this profile, so this compiles
    // little more than the test harness.
    step(
        "unit tests (arm64)",
        &format!(
            "cargo test --release -p keepalive-agent --lib --target {} (under qemu-user)",
            ARM64.rust_target
        ),
        || {
            env::run(
                ARM64
                    .cross_env(&mut setup.command("cargo"))
                    .args(["test", "--release", "-p", "keepalive-agent", "--lib"])
                    .args(["--target", ARM64.rust_target]),
            )
            .with_context(|| {
                format!(
                    "the agent's unit tests failed on aarch64 under {} (Debian's \
                     qemu-user-static, installed by `cargo xtask setup`): a test that passes on \
                     the host and fails only here depends on the architecture or on something \
                     qemu-user emulates differently",
                    ARM64.runner().unwrap_or("the host")
                )
            })
        },
    )?;

    step(
        "test",
        "cargo test --workspace --exclude keepalive-ebpf --release",
        || {
            env::run(
                setup
                    .command("cargo")
                    .env(AGENT_BIN_ENV, &bin)
                    .args([
                        "test",
                        "--workspace",
                        "--exclude",
                        EBPF_PACKAGE,
                        "--release",
                    ])
                    .args(args),
            )
        },
    )?;

    step(
        "fuzz",
        &format!(
            "cargo +{} fuzz run TARGET -- -max_total_time={FUZZ_SECONDS} (each target in fuzz/)",
            setup.toolchain
        ),
        || fuzz(&setup),
    )?;

    // Last: the slowest step, and the only one that downloads (kernels, cached afterwards).
    step(
        "kernel matrix",
        "cargo xtask vm (Debian kernels in qemu)",
        || crate::vm::vm(&setup, &crate::vm::VmArgs::default()),
    )?;

    println!("\n== all test steps passed");
    Ok(())
}

/// How long each fuzz target runs in `cargo xtask test`: long enough to get past the seed
/// corpus into new paths, short enough for every test run.
const FUZZ_SECONDS: u32 = 25;

/// Runs every target `cargo fuzz list` names for [`FUZZ_SECONDS`], starting from the corpus kept
/// in the repository (fuzz/corpus/TARGET, read only); what the run finds goes to
/// target/fuzz-corpus/TARGET. A crash fails the step and libFuzzer prints the input to replay.
fn fuzz(setup: &Setup) -> Result<()> {
    let fuzz_dir = setup.env.root.join("fuzz");
    let nightly = format!("+{}", setup.toolchain);
    let list = env::output(setup.command("cargo").current_dir(&fuzz_dir).args([
        nightly.as_str(),
        "fuzz",
        "list",
    ]))
    .context("`cargo fuzz list` failed (is cargo-fuzz installed? `cargo xtask setup`)")?;
    let targets: Vec<&str> = list
        .lines()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect();
    if targets.is_empty() {
        bail!(
            "`cargo fuzz list` names no target in {}",
            fuzz_dir.display()
        );
    }
    for target in targets {
        let found = setup.env.root.join("target/fuzz-corpus").join(target);
        std::fs::create_dir_all(&found).with_context(|| format!("creating {}", found.display()))?;
        println!("fuzz: {target} for {FUZZ_SECONDS}s");
        env::run(
            setup
                .command("cargo")
                .current_dir(&fuzz_dir)
                .args([nightly.as_str(), "fuzz", "run", target])
                .arg(&found)
                .arg(fuzz_dir.join("corpus").join(target))
                .arg("--")
                .arg(format!("-max_total_time={FUZZ_SECONDS}"))
                .arg("-timeout=10"),
        )
        .with_context(|| format!("fuzz target {target} failed"))?;
    }
    Ok(())
}

/// Build, then run the hook-cost benchmark against the built agent.
pub(crate) fn bench(args: &[OsString]) -> Result<()> {
    let (setup, bin) = build()?;
    step(
        "bench",
        "cargo run --release -p keepalive-tests --bin hook-cost",
        || {
            let mut cmd = setup.command("cargo");
            cmd.env(AGENT_BIN_ENV, &bin).args([
                "run",
                "--release",
                "-p",
                "keepalive-tests",
                "--bin",
                "hook-cost",
            ]);
            if !args.is_empty() {
                cmd.arg("--").args(args);
            }
            env::run(&mut cmd)
        },
    )
}

/// `cargo xtask profile`: see its help in main.rs.
pub(crate) fn profile(args: &[OsString]) -> Result<()> {
    let (setup, bin) = build()?;
    step(
        "profile",
        "cargo build --release -p keepalive-tests --bins, then target/release/program-profile",
        || {
            env::run(setup.command("cargo").args([
                "build",
                "--release",
                "-p",
                "keepalive-tests",
                "--bins",
            ]))
            .context("building hook-cost and program-profile failed")?;
            let profiler = bin.with_file_name("program-profile");
            let mut cmd = setup.command(&profiler);
            cmd.env(AGENT_BIN_ENV, &bin).args(args);
            env::run(&mut cmd)
        },
    )
}

/// hook-cost's arguments for `cargo xtask ablate` without any: the per-hook rows only.
const ABLATE_DEFAULT_ARGS: [&str; 12] = [
    "--rounds",
    "0",
    "--seconds",
    "3",
    "--connections",
    "1000",
    "--pipeline-connections",
    "10",
    "--probing-connections",
    "0",
    "--sync-connections",
    "",
];

/// `cargo xtask ablate`: see its help in main.rs.
pub(crate) fn ablate(parts: &str, pairs: u32, args: &[OsString]) -> Result<()> {
    let parts = ablation_parts(parts)?;
    if pairs == 0 {
        bail!("--pairs 0 runs nothing; give at least 1");
    }
    let setup = setup::setup()?;
    let dir = setup.env.root.join("target/ablate");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // Without the parts first, then as built: target/release keeps the agent as built.
    header(&format!(
        "build: cargo build --release -p keepalive-agent, {}={parts}",
        env::ABLATE_ENV
    ));
    env::run(setup.command("cargo").env(env::ABLATE_ENV, &parts).args([
        "build",
        "--release",
        "-p",
        "keepalive-agent",
    ]))
    .context("building keepalive-agent without the parts failed")?;
    let without = dir.join(format!(
        "keepalive-agent-without-{}",
        parts.replace(',', "+")
    ));
    copy_file(&setup.env.agent_bin(), &without)?;
    let as_built = dir.join("keepalive-agent");
    copy_file(&build_agent(&setup)?, &as_built)?;
    header("build: cargo build --release -p keepalive-tests --bin hook-cost");
    env::run(setup.command("cargo").args([
        "build",
        "--release",
        "-p",
        "keepalive-tests",
        "--bin",
        "hook-cost",
    ]))
    .context("building hook-cost failed")?;
    let hook_cost = setup.env.agent_bin().with_file_name("hook-cost");
    let defaults: Vec<OsString> = ABLATE_DEFAULT_ARGS.iter().map(OsString::from).collect();
    let args = if args.is_empty() { &defaults[..] } else { args };
    let label = format!("without {parts}");
    for pair in 1..=pairs {
        let mut order = [("as built", &as_built), (label.as_str(), &without)];
        if pair % 2 == 0 {
            order.reverse();
        }
        for (name, bin) in order {
            header(&format!("pair {pair} of {pairs}: the agent {name}"));
            env::run(setup.command(&hook_cost).env(AGENT_BIN_ENV, bin).args(args))
                .with_context(|| format!("hook-cost with the agent {name} failed"))?;
        }
    }
    Ok(())
}

/// The parts `cargo xtask ablate` was given, checked against what the programs can leave out,
/// as the comma-separated list the build reads.
fn ablation_parts(parts: &str) -> Result<String> {
    let known = keepalive_ebpf::ablation::PARTS;
    let mut list = Vec::new();
    for part in parts.split(',').map(str::trim) {
        if !known.contains(&part) {
            bail!(
                "unknown part {part:?}: the kernel programs can leave out {}",
                known.join(", ")
            );
        }
        if !list.contains(&part) {
            list.push(part);
        }
    }
    Ok(list.join(","))
}

fn copy_file(from: &std::path::Path, to: &std::path::Path) -> Result<()> {
    std::fs::copy(from, to)
        .map(drop)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))
}

fn header(text: &str) {
    println!("\n== {text}");
}

/// Runs one named step with a header; on failure says which step failed. Prints how long it
/// took, so a step's share of the CI time can be read from any run's log.
fn step(name: &str, what: &str, f: impl FnOnce() -> Result<()>) -> Result<()> {
    header(&format!("{name}: {what}"));
    let started = std::time::Instant::now();
    f().with_context(|| format!("step `{name}` failed"))?;
    println!(
        "step `{name}` took {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::ablation_parts;
    use keepalive_ebpf::ablation::lists;

    #[test]
    fn ablation_parts_are_checked_and_listed_once() {
        assert_eq!(ablation_parts("ring-write").unwrap(), "ring-write");
        assert_eq!(
            ablation_parts("short-records,ring-write").unwrap(),
            "short-records,ring-write"
        );
        assert_eq!(
            ablation_parts("counters, cgroup,counters").unwrap(),
            "counters,cgroup"
        );
        let err = ablation_parts("ring-write,ringwrite")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"ringwrite\"") && err.contains("cgroup"),
            "{err}"
        );
        assert!(ablation_parts("").is_err());
    }

    #[test]
    fn the_programs_match_whole_parts_of_the_list() {
        assert!(lists("ring-write,counters", "counters"));
        assert!(lists("ring-write,counters", "ring-write"));
        assert!(!lists("ring-write,counters", "ring"));
        assert!(!lists("ring-write,counters", "cgroup"));
        assert!(!lists("", "cgroup"));
        assert!(!lists("cgroups", "cgroup"));
        // Two parts whose names share a beginning: each is left out only when named.
        assert!(!lists("counter-adds", "counters"));
        assert!(!lists("counters", "counter-adds"));
        assert!(lists("counters,counter-adds", "counter-adds"));
    }
}
