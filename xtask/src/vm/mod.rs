//! `cargo xtask vm`: the agent on the kernels fleets run. For each kernel of the matrix (Debian
//! packages chosen by pattern, see `kernels.rs`), boot it in qemu (TCG: this machine's KVM cannot
//! run these guests) with an initramfs holding busybox, the static agent and the scenario program
//! (`tests/src/bin/guest-scenarios.rs`), and compare the agent's figures with the guest kernel's
//! own counters, scenario by scenario. Prints the matrix, writes it as markdown, and fails on any
//! mismatch.
//!
//! `--update-btf-fixtures` instead stores every matrix kernel's BTF (and this machine's) under
//! `keepalive-agent/tests/btf/`, so layout code can be unit-tested against real kernels.

mod btf;
mod cpio;
mod deb;
mod fixtures;
mod initramfs;
mod kernels;
mod modules;
mod qemu;
mod report;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{env, setup::Setup};

/// Where downloaded packages, extracted kernels and the private bullseye apt state are kept
/// between runs (outside the repository: packages are never committed).
const DEFAULT_CACHE: &str = "/var/cache/keepalive-agent";
const CACHE_ENV: &str = "KEEPALIVE_VM_CACHE";
/// The guests' second CPU (each has two), isolated in one extra boot.
const ISOLATED_CPU: u32 = 1;

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct VmArgs {
    /// Only these kernels of the matrix (repeatable): 5.10, 6.1-pre-backport, 6.1,
    /// 6.12-pre-backport, 6.12.
    #[arg(long = "kernel", value_name = "ID")]
    pub kernels: Vec<String>,
    /// Guests booted at the same time. Each gets 2 vCPUs under TCG, so more than 2 on a 2-core
    /// machine only stretches every guest's timing.
    #[arg(long, default_value_t = 2)]
    pub jobs: usize,
    /// Seconds a guest may run before it is killed and counted as failed.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// Where packages and kernels are cached ($KEEPALIVE_VM_CACHE, else /var/cache/keepalive-agent).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Markdown copy of the matrix (default target/kernel-matrix.md).
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Do not boot anything: store the BTF of every matrix kernel and of this machine as
    /// compressed fixtures in keepalive-agent/tests/btf/.
    #[arg(long)]
    pub update_btf_fixtures: bool,
}

impl Default for VmArgs {
    fn default() -> Self {
        Self {
            kernels: Vec::new(),
            jobs: 2,
            timeout: 300,
            cache_dir: None,
            output: None,
            update_btf_fixtures: false,
        }
    }
}

pub(crate) fn vm(setup: &Setup, args: &VmArgs) -> Result<()> {
    let started = Instant::now();
    let cache = cache_dir(args)?;
    let kernels = kernels::pick(setup, &cache, &args.kernels)?;
    if args.update_btf_fixtures {
        return fixtures::update(setup, &kernels);
    }

    let work = setup.env.root.join("target/vm");
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let initrd = initramfs::build(setup, &work)?;
    // Every kernel once, and the last one again with a CPU isolated (`nohz_full`), whose sweep
    // must leave that CPU alone: the pairs of guests have a free slot for a sixth.
    let mut boots: Vec<qemu::Boot> = kernels
        .iter()
        .map(|kernel| qemu::Boot {
            kernel,
            isolated_cpu: None,
        })
        .collect();
    if let Some(kernel) = kernels.last() {
        boots.push(qemu::Boot {
            kernel,
            isolated_cpu: Some(ISOLATED_CPU),
        });
    }
    let guests = qemu::run_all(
        &boots,
        &initrd,
        &work,
        args.jobs.max(1),
        Duration::from_secs(args.timeout),
    )?;
    let matrix = report::Matrix::new(&boots, &guests);
    print!("{}", matrix.text());
    let output = args
        .output
        .clone()
        .unwrap_or_else(|| setup.env.root.join("target/kernel-matrix.md"));
    std::fs::write(&output, matrix.markdown())
        .with_context(|| format!("writing {}", output.display()))?;
    println!(
        "matrix written to {} (whole run {:.0} s)",
        output.display(),
        started.elapsed().as_secs_f64()
    );
    let failures = matrix.failures();
    if failures > 0 {
        bail!(
            "{failures} guest(s) of the matrix show a mismatch or did not finish; the console \
             logs are in {}",
            work.display()
        );
    }
    Ok(())
}

fn cache_dir(args: &VmArgs) -> Result<PathBuf> {
    let dir = args
        .cache_dir
        .clone()
        .or_else(|| std::env::var_os(CACHE_ENV).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE));
    std::fs::create_dir_all(&dir).with_context(|| {
        format!(
            "cannot create the kernel cache {}: run as root, or point {CACHE_ENV} (or \
             --cache-dir) at a writable directory",
            dir.display()
        )
    })?;
    Ok(dir)
}

/// Runs `cmd`, failing with its stderr; returns stdout as bytes.
fn output_bytes(cmd: &mut std::process::Command) -> Result<Vec<u8>> {
    let shown = env::display(cmd);
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("failed to start `{shown}`"))?;
    if !out.status.success() {
        bail!(
            "`{shown}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

/// [`output_bytes`] as text.
fn output_text(cmd: &mut std::process::Command) -> Result<String> {
    Ok(String::from_utf8_lossy(&output_bytes(cmd)?).into_owned())
}

/// Writes `bytes` to `path` through a temporary file in the same directory, so an interrupted
/// run never leaves a truncated file that a later run would take for a cached one.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

/// Runs `cmd` with `input` on its stdin and collects its output (stderr too). `package` names
/// what to install when the program is missing.
fn pipe_through(
    cmd: &mut std::process::Command,
    input: &[u8],
    package: &str,
) -> Result<std::process::Output> {
    use std::{io::Write as _, process::Stdio};

    let shown = env::display(cmd);
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| {
            format!("starting `{shown}`: install {package} (`cargo xtask setup` does)")
        })?;
    let mut stdin = child.stdin.take().context("child stdin")?;
    let input = input.to_vec();
    // Feed from a thread: the child's output would fill its pipe while we are still writing.
    let feeder = std::thread::spawn(move || stdin.write_all(&input));
    let out = child
        .wait_with_output()
        .with_context(|| format!("waiting for `{shown}`"))?;
    feeder
        .join()
        .map_err(|_| anyhow::anyhow!("feeding `{shown}` panicked"))?
        .with_context(|| format!("writing to `{shown}`"))?;
    Ok(out)
}
