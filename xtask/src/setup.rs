//! `cargo xtask setup`: install what a fresh machine lacks, idempotently.
//!
//! Prints one line per check: `ok: ...` when nothing is needed, `installing: ...` (or
//! `mounting: ...`) when it acts, `warn: ...` for what is not fatal.

use std::{ffi::OsStr, path::Path};

use anyhow::{Context as _, Result, bail};

use crate::env::{self, Env};

/// Debian packages the project needs, by purpose.
const DEBIAN_PACKAGES: &[&str] = &[
    // bpf-linker: built against the system LLVM 22 (llvm-config, libLLVM) and its link deps.
    "llvm-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    // Kernel tests: firewall rules (nft) and network namespaces / addresses (ip).
    "nftables",
    "iproute2",
    // Benchmark: reads per-program run time and run counts.
    "bpftool",
    // `cargo xtask profile`: samples the programs (perf record, perf script).
    "linux-perf",
    // Deployment tests: promtool and a real Prometheus and Alertmanager (deploy/prometheus);
    // buildah builds the container image without a daemon (`cargo xtask image`).
    "prometheus",
    "prometheus-alertmanager",
    "buildah",
    // The static agent's C code (ring, the TLS of --web.config.file) compiled for musl:
    // x86_64-linux-musl-gcc, which cc-rs looks for.
    "musl-tools",
    // The arm64 agent: Debian's aarch64 gcc links it and compiles ring's C code; qemu-user runs
    // its unit tests and `--version` on this x86_64 host (env::ARM64).
    "gcc-aarch64-linux-gnu",
    "qemu-user-static",
    // Kernel matrix (`cargo xtask vm`): Debian kernels booted under qemu's TCG with a busybox
    // initramfs (`cpio -t` checks the archive xtask writes); gzip, xz and zstd unpack each
    // kernel's bzImage payload and its IPVS modules, compress the initramfs and the BTF test
    // fixtures.
    "qemu-system-x86",
    "busybox-static",
    "cpio",
    "xz-utils",
    "zstd",
    "gzip",
    // The package test (`cargo xtask package`, tests/tests/deploy_package.rs): systemd-analyze
    // verify checks the unit, strace shows the agent stays inside what the unit's seccomp
    // settings allow; dpkg-deb and dpkg, which build and install the package, come with every
    // Debian system.
    "systemd",
    "strace",
    // `cargo xtask package` strips the agent it packages.
    "binutils",
];

/// The LLVM major that bpf-linker is built against; the nightly toolchain must match it.
const LLVM_MAJOR: &str = "22";
/// A nightly known to ship LLVM 22, installed when `nightly` is on another major.
const PINNED_NIGHTLY: &str = "nightly-2026-05-20";
/// Where Debian's llvm-22 puts llvm-config, which bpf-linker's build looks up in PATH.
const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";
const TRACEFS: &str = "/sys/kernel/tracing";

/// What setup found: the nightly toolchain for the eBPF build, and the environment for children.
pub(crate) struct Setup {
    pub env: Env,
    pub toolchain: String,
}

impl Setup {
    /// A command in the workspace root with PATH including cargo's bin directory and
    /// KEEPALIVE_BPF_TOOLCHAIN naming the nightly toolchain, and without KEEPALIVE_EBPF_ABLATE:
    /// an agent built with it set in the shell would be missing parts of its programs.
    pub(crate) fn command(&self, program: impl AsRef<OsStr>) -> std::process::Command {
        let mut cmd = self.env.command(program);
        cmd.env(env::TOOLCHAIN_ENV, &self.toolchain)
            .env_remove(env::ABLATE_ENV);
        cmd
    }
}

pub(crate) fn setup() -> Result<Setup> {
    let env = Env::new()?;
    debian_packages(&env)?;
    let toolchain = nightly_toolchain(&env)?;
    components(
        &env,
        Some(&toolchain),
        &["rust-src", "clippy"],
        "-Z build-std=core and the eBPF clippy step",
    )?;
    components(&env, None, &["rustfmt", "clippy"], "fmt and clippy steps")?;
    bpf_linker(&env)?;
    cargo_fuzz(&env)?;
    crate::deploy_tools::deploy_tools(&env)?;
    tracefs();
    println!("ok: setup done; eBPF toolchain is {toolchain}");
    Ok(Setup { env, toolchain })
}

fn debian_packages(env: &Env) -> Result<()> {
    if env.which(OsStr::new("dpkg-query")).is_none() {
        bail!(
            "dpkg-query not found: setup supports Debian-based systems; install these packages \
             by hand: {}",
            DEBIAN_PACKAGES.join(" ")
        );
    }
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|package| !package_installed(env, package))
        .collect();
    if missing.is_empty() {
        println!("ok: Debian packages present: {}", DEBIAN_PACKAGES.join(" "));
        return Ok(());
    }
    let missing = missing.join(" ");
    if !env::is_root() {
        bail!(
            "Debian packages missing: {missing}. Run as root:\n  apt-get update && \
             DEBIAN_FRONTEND=noninteractive apt-get install -y {missing}"
        );
    }
    println!("installing: Debian packages missing: {missing} (apt-get update, apt-get install)");
    env::run(env.command("apt-get").arg("update")).context("apt-get update failed")?;
    env::run(
        env.command("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y"])
            .args(missing.split(' ')),
    )
    .context("apt-get install failed")?;
    Ok(())
}

fn package_installed(env: &Env, package: &str) -> bool {
    env::output(
        env.command("dpkg-query")
            .args(["-W", "--showformat=${Status}", package]),
    )
    .is_some_and(|status| status.trim() == "install ok installed")
}

/// Picks a nightly toolchain whose LLVM major matches bpf-linker's: `nightly` if it is on it,
/// else the pinned nightly (installed if needed).
fn nightly_toolchain(env: &Env) -> Result<String> {
    if env.which(OsStr::new("rustup")).is_none() {
        bail!(
            "rustup not found in PATH{}: install rustup first (https://rustup.rs)",
            env.cargo_bin
                .as_ref()
                .map(|bin| format!(" or {}", bin.display()))
                .unwrap_or_default()
        );
    }
    let installed = installed_toolchains(env)?;
    let mut other = None;
    for name in ["nightly", PINNED_NIGHTLY] {
        if !installed.iter().any(|t| toolchain_matches(t, name)) {
            continue;
        }
        match llvm_major(env, name) {
            Some(major) if major == LLVM_MAJOR => {
                println!("ok: toolchain {name} present with LLVM {major}");
                return Ok(name.to_owned());
            }
            Some(major) => other = Some(format!("{name} has LLVM {major}")),
            None => other = Some(format!("{name} does not run")),
        }
    }
    let why = other.unwrap_or_else(|| "no nightly toolchain installed".to_owned());
    println!(
        "installing: toolchain {PINNED_NIGHTLY} (need LLVM {LLVM_MAJOR} for bpf-linker; {why})"
    );
    env::run(env.command("rustup").args([
        "toolchain",
        "install",
        PINNED_NIGHTLY,
        "--profile",
        "minimal",
    ]))
    .context("installing the nightly toolchain failed")?;
    match llvm_major(env, PINNED_NIGHTLY) {
        Some(major) if major == LLVM_MAJOR => Ok(PINNED_NIGHTLY.to_owned()),
        Some(major) => bail!("{PINNED_NIGHTLY} reports LLVM {major}, expected {LLVM_MAJOR}"),
        None => bail!("`rustup run {PINNED_NIGHTLY} rustc -vV` failed after installing it"),
    }
}

/// Names from `rustup toolchain list`, e.g. `nightly-x86_64-unknown-linux-gnu`.
fn installed_toolchains(env: &Env) -> Result<Vec<String>> {
    let list = env::output(env.command("rustup").args(["toolchain", "list"]))
        .context("`rustup toolchain list` failed")?;
    Ok(list
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// Whether the installed toolchain `full` (`<name>-<host triple>`) is `name`: `nightly` must
/// not match `nightly-2026-05-20-...`.
fn toolchain_matches(full: &str, name: &str) -> bool {
    full == name
        || full
            .strip_prefix(name)
            .and_then(|rest| rest.strip_prefix('-'))
            .is_some_and(|host| !host.starts_with(|c: char| c.is_ascii_digit()))
}

/// The LLVM major version `toolchain`'s rustc reports, without installing anything.
fn llvm_major(env: &Env, toolchain: &str) -> Option<String> {
    let info = env::output(
        env.command("rustup")
            .env("RUSTUP_AUTO_INSTALL", "0")
            .args(["run", toolchain, "rustc", "-vV"]),
    )?;
    info.lines()
        .find_map(|line| line.strip_prefix("LLVM version:"))
        .and_then(|version| version.trim().split('.').next())
        .map(str::to_owned)
}

/// Installs the rustup `wanted` components `toolchain` lacks; `None` is the active toolchain
/// (the one running xtask, which runs fmt and the host clippy).
fn components(env: &Env, toolchain: Option<&str>, wanted: &[&str], why: &str) -> Result<()> {
    let active = std::env::var("RUSTUP_TOOLCHAIN").unwrap_or_else(|_| "active".to_owned());
    let name = toolchain.unwrap_or(&active);
    let mut list = env.command("rustup");
    list.args(["component", "list", "--installed"]);
    if let Some(toolchain) = toolchain {
        list.args(["--toolchain", toolchain]);
    }
    let installed = env::output(&mut list).unwrap_or_default();
    let missing: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|component| {
            !installed
                .lines()
                .any(|line| component_matches(line, component))
        })
        .collect();
    if missing.is_empty() {
        println!(
            "ok: components {} present for toolchain {name}",
            wanted.join(" ")
        );
        return Ok(());
    }
    println!(
        "installing: components {} for toolchain {name} ({why})",
        missing.join(" ")
    );
    let mut add = env.command("rustup");
    add.args(["component", "add"]).args(&missing);
    if let Some(toolchain) = toolchain {
        add.args(["--toolchain", toolchain]);
    }
    env::run(&mut add).context("adding rustup components failed")
}

/// Whether a `rustup component list --installed` line (`rust-src`,
/// `clippy-x86_64-unknown-linux-gnu`) is `component`.
fn component_matches(line: &str, component: &str) -> bool {
    let line = line.trim();
    line == component
        || line
            .strip_prefix(component)
            .and_then(|rest| rest.strip_prefix('-'))
            .is_some_and(|host| host.contains("-unknown-") || host.contains("-apple-"))
}

fn bpf_linker(env: &Env) -> Result<()> {
    let found = env.which(OsStr::new("bpf-linker"));
    let why = match &found {
        None => "not found".to_owned(),
        Some(path) => match env::output(std::process::Command::new(path).arg("--version")) {
            None => format!("{} --version fails", path.display()),
            Some(version) => match linked_llvm(env, path) {
                Some(major) if major != LLVM_MAJOR => format!(
                    "{} is linked against LLVM {major}, need {LLVM_MAJOR}",
                    path.display()
                ),
                _ => {
                    println!("ok: {} present ({})", version.trim(), path.display());
                    return Ok(());
                }
            },
        },
    };
    println!("installing: bpf-linker with LLVM {LLVM_MAJOR} ({why}; cargo install)");
    if !Path::new(LLVM_BIN).join("llvm-config").exists() {
        bail!("{LLVM_BIN}/llvm-config is missing: is llvm-{LLVM_MAJOR}-dev installed?");
    }
    let mut path = std::ffi::OsString::from(LLVM_BIN);
    path.push(":");
    path.push(env.path());
    let mut cmd = env.command("cargo");
    cmd.env("PATH", path).args([
        "install",
        "bpf-linker",
        "--locked",
        "--no-default-features",
        "--features",
        &format!("llvm-{LLVM_MAJOR}"),
    ]);
    if found.is_some() {
        cmd.arg("--force");
    }
    env::run(&mut cmd).context("installing bpf-linker failed")
}

/// cargo-fuzz, for the fuzz step of `cargo xtask test` (it drives libFuzzer on nightly).
fn cargo_fuzz(env: &Env) -> Result<()> {
    if let Some(path) = env.which(OsStr::new("cargo-fuzz")) {
        println!("ok: cargo-fuzz present ({})", path.display());
        return Ok(());
    }
    println!("installing: cargo-fuzz (not found; cargo install)");
    env::run(
        env.command("cargo")
            .args(["install", "cargo-fuzz", "--locked"]),
    )
    .context("installing cargo-fuzz failed")
}

/// The major of the shared libLLVM `binary` links against, if it links one (a static build
/// shows none).
fn linked_llvm(env: &Env, binary: &Path) -> Option<String> {
    llvm_major_in_ldd(&env::output(env.command("ldd").arg(binary))?)
}

fn llvm_major_in_ldd(ldd: &str) -> Option<String> {
    ldd.split_whitespace()
        .find_map(|word| word.strip_prefix("libLLVM.so."))
        .or_else(|| {
            ldd.split_whitespace()
                .find_map(|word| word.strip_prefix("libLLVM-"))
        })
        .and_then(|version| version.split(['.', '-']).next())
        .map(str::to_owned)
}

/// Mounts tracefs when it is missing. Not fatal: the agent attaches BTF tracepoints, which do
/// not need it; it only helps when reading `trace_pipe` by hand.
fn tracefs() {
    let dir = Path::new(TRACEFS);
    if dir.join("trace_pipe").exists() || dir.join("events").exists() {
        println!("ok: tracefs mounted at {TRACEFS}");
        return;
    }
    if !env::is_root() {
        println!(
            "warn: tracefs not mounted at {TRACEFS} (not needed by the agent); to mount it run \
             as root: mount -t tracefs nodev {TRACEFS}"
        );
        return;
    }
    println!("mounting: tracefs at {TRACEFS} (mount -t tracefs nodev {TRACEFS})");
    let status = std::process::Command::new("mount")
        .args(["-t", "tracefs", "nodev", TRACEFS])
        .status();
    match status {
        Ok(status) if status.success() => {}
        Ok(status) => println!(
            "warn: mounting tracefs failed ({status}); continuing, the agent does not need it"
        ),
        Err(err) => {
            println!("warn: cannot run mount ({err}); continuing, the agent does not need tracefs")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toolchain_names() {
        assert!(toolchain_matches(
            "nightly-x86_64-unknown-linux-gnu",
            "nightly"
        ));
        assert!(toolchain_matches("nightly", "nightly"));
        assert!(!toolchain_matches(
            "nightly-2026-05-20-x86_64-unknown-linux-gnu",
            "nightly"
        ));
        assert!(toolchain_matches(
            "nightly-2026-05-20-x86_64-unknown-linux-gnu",
            PINNED_NIGHTLY
        ));
        assert!(!toolchain_matches(
            "stable-x86_64-unknown-linux-gnu",
            "nightly"
        ));
    }

    #[test]
    fn component_names() {
        assert!(component_matches("rust-src", "rust-src"));
        assert!(component_matches(
            "clippy-x86_64-unknown-linux-gnu",
            "clippy"
        ));
        assert!(!component_matches(
            "rust-std-x86_64-unknown-linux-gnu",
            "rust-src"
        ));
        assert!(!component_matches(
            "rustfmt-x86_64-unknown-linux-gnu",
            "rust"
        ));
    }

    #[test]
    fn ldd_llvm_major() {
        let ldd = "\tlinux-vdso.so.1 (0x00007f)\n\tlibLLVM.so.22.1 => \
                   /usr/lib/llvm-22/lib/libLLVM.so.22.1 (0x00007f)\n";
        assert_eq!(llvm_major_in_ldd(ldd).as_deref(), Some("22"));
        let ldd = "\tlibLLVM-21.so => /usr/lib/llvm-21/lib/libLLVM-21.so (0x1)\n";
        assert_eq!(llvm_major_in_ldd(ldd).as_deref(), Some("21"));
        assert_eq!(
            llvm_major_in_ldd("\tlibc.so.6 => /lib/libc.so.6 (0x1)\n"),
            None
        );
    }

    #[test]
    fn packages_are_unique() {
        let mut sorted = DEBIAN_PACKAGES.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), DEBIAN_PACKAGES.len());
    }
}
