//! Booting the matrix kernels under qemu's TCG, a few at a time, each with a deadline.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Mutex, atomic::AtomicUsize, atomic::Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use super::kernels::Kernel;

/// How a guest ended, and what it printed.
pub(super) struct Guest {
    pub console: String,
    pub console_path: PathBuf,
    pub seconds: f64,
    /// Set when qemu did not power off by itself: killed at the deadline, or failed to start.
    pub problem: Option<String>,
}

/// Boots every kernel with `initrd`, `jobs` guests at a time; results in the kernels' order.
pub(super) fn run_all(
    kernels: &[Kernel],
    initrd: &Path,
    work: &Path,
    jobs: usize,
    timeout: Duration,
) -> Result<Vec<Guest>> {
    println!(
        "booting {} kernel(s), {jobs} at a time, {} s deadline each",
        kernels.len(),
        timeout.as_secs()
    );
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Guest>>> = Mutex::new((0..kernels.len()).map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..jobs.min(kernels.len()) {
            scope.spawn(|| {
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    let Some(kernel) = kernels.get(index) else {
                        break;
                    };
                    let guest = boot(kernel, initrd, work, timeout);
                    println!(
                        "guest {} ({}) ended after {:.0} s{}",
                        kernel.id,
                        kernel.release,
                        guest.seconds,
                        guest
                            .problem
                            .as_deref()
                            .map(|p| format!(": {p}"))
                            .unwrap_or_default()
                    );
                    if let Ok(mut results) = results.lock() {
                        results[index] = Some(guest);
                    }
                }
            });
        }
    });
    results
        .into_inner()
        .map_err(|_| anyhow::anyhow!("a guest thread panicked"))?
        .into_iter()
        .map(|g| g.context("a guest was never booted"))
        .collect()
}

fn boot(kernel: &Kernel, initrd: &Path, work: &Path, timeout: Duration) -> Guest {
    let console_path = work.join(format!("{}.console.log", kernel.id));
    let started = Instant::now();
    let problem = match run_qemu(kernel, initrd, &console_path, timeout) {
        Ok(problem) => problem,
        Err(err) => Some(format!("{err:#}")),
    };
    let console = std::fs::read(&console_path)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default();
    Guest {
        console,
        console_path,
        seconds: started.elapsed().as_secs_f64(),
        problem,
    }
}

/// Runs qemu to completion; `Ok(Some(..))` when it had to be killed or exited with an error.
fn run_qemu(
    kernel: &Kernel,
    initrd: &Path,
    console: &Path,
    timeout: Duration,
) -> Result<Option<String>> {
    let _ = std::fs::remove_file(console);
    let log = console.with_extension("qemu.log");
    let stderr = std::fs::File::create(&log).with_context(|| format!("{}", log.display()))?;
    // TCG: this machine's /dev/kvm cannot run these guests. panic=-1 plus -no-reboot turns a
    // guest panic (pid 1 dying) into qemu exiting instead of hanging until the deadline.
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-machine", "q35", "-smp", "2", "-m", "2G"])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args([
            "-append",
            "console=ttyS0 panic=-1 quiet random.trust_cpu=on",
            "-display",
            "none",
            "-no-reboot",
            "-nic",
            "none",
        ])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .context(
            "starting qemu-system-x86_64: install qemu-system-x86 (`cargo xtask setup` does)",
        )?;
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().context("waiting for qemu")? {
            let qemu_log = std::fs::read_to_string(&log).unwrap_or_default();
            return Ok((!status.success())
                .then(|| format!("qemu exited with {status}: {}", qemu_log.trim())));
        }
        if started.elapsed() >= timeout {
            // Our own child, by its handle.
            let _ = child.kill();
            let _ = child.wait();
            return Ok(Some(format!(
                "killed after the {} s deadline",
                timeout.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}
