//! Booting the matrix kernels under qemu's TCG, a few at a time, each with a deadline.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Mutex, atomic::AtomicUsize, atomic::Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use super::kernels::Kernel;

/// One guest to boot: a matrix kernel, and the CPU its command line isolates, if any.
pub(super) struct Boot<'a> {
    pub kernel: &'a Kernel,
    /// Booted with `nohz_full=<cpu>`: the counter sweep must leave that CPU alone, and say so.
    pub isolated_cpu: Option<u32>,
}

impl Boot<'_> {
    /// What this boot adds to the kernel's command line: `nohz_full=1`.
    pub(super) fn parameter(&self) -> Option<String> {
        self.isolated_cpu.map(|cpu| format!("nohz_full={cpu}"))
    }

    /// `6.12`, or `6.12 nohz_full=1`.
    pub(super) fn name(&self) -> String {
        with_parameter(self.kernel.id, self.parameter())
    }

    /// Where its console is written: `6.12.console.log`, `6.12-nohz_full.console.log`.
    fn console_path(&self, work: &Path) -> PathBuf {
        match self.isolated_cpu {
            None => work.join(format!("{}.console.log", self.kernel.id)),
            Some(_) => work.join(format!("{}-nohz_full.console.log", self.kernel.id)),
        }
    }

    fn command_line(&self) -> String {
        with_parameter(
            "console=ttyS0 panic=-1 quiet random.trust_cpu=on",
            self.parameter(),
        )
    }
}

/// `text`, then ` parameter` if there is one.
pub(super) fn with_parameter(text: &str, parameter: Option<String>) -> String {
    match parameter {
        None => text.to_owned(),
        Some(parameter) => format!("{text} {parameter}"),
    }
}

/// How a guest ended, and what it printed.
pub(super) struct Guest {
    pub console: String,
    pub console_path: PathBuf,
    pub seconds: f64,
    /// Set when qemu did not power off by itself: killed at the deadline, or failed to start.
    pub problem: Option<String>,
    /// The earlier boots that died of a kernel text-patching trap, after which the kernel was
    /// booted again (at most [`TEXT_PATCHING_BOOTS`] boots in all): what each console showed,
    /// and where it was kept.
    pub earlier_boots: Vec<String>,
}

/// Boots every guest with `initrd`, `jobs` at a time; results in the boots' order.
pub(super) fn run_all(
    boots: &[Boot],
    initrd: &Path,
    work: &Path,
    jobs: usize,
    timeout: Duration,
) -> Result<Vec<Guest>> {
    println!(
        "booting {} guest(s), {jobs} at a time, {} s deadline each",
        boots.len(),
        timeout.as_secs()
    );
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Guest>>> = Mutex::new((0..boots.len()).map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..jobs.min(boots.len()) {
            scope.spawn(|| {
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    let Some(planned) = boots.get(index) else {
                        break;
                    };
                    let guest = boot(planned, initrd, work, timeout);
                    println!(
                        "guest {} ({}) ended after {:.0} s{}",
                        planned.name(),
                        planned.kernel.release,
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

/// Boots a guest may take when each dies of a text-patching trap ([`text_patching_trap`]): in
/// one matrix run on 6.12.118 with `nohz_full=1` two boots in a row did, one in `check --load`
/// and one while the scenarios ran, and the next matrix run of the same build matched.
pub(crate) const TEXT_PATCHING_BOOTS: usize = 3;

fn boot(planned: &Boot, initrd: &Path, work: &Path, timeout: Duration) -> Guest {
    let mut earlier_boots = Vec::new();
    loop {
        let mut guest = boot_once(planned, initrd, work, timeout);
        let trap = match text_patching_trap(&guest.console) {
            Some(trap) if earlier_boots.len() + 1 < TEXT_PATCHING_BOOTS => trap,
            _ => {
                guest.earlier_boots = earlier_boots;
                return guest;
            }
        };
        // Enabling a tracepoint rewrites a jump in kernel text while other CPUs run it, through
        // a temporary int3 that the kernel's handler must recognise. Under TCG a vCPU has been
        // seen to hit that int3 after the kernel stopped expecting it (6.12.111 and 6.12.118,
        // call_timer_fn, when the agent attaches or detaches its timer programs), which panics
        // the guest. That is the emulator and the kernel's patching, not the agent's programs:
        // boot once more, and say so in the report.
        let boot = earlier_boots.len() + 1;
        let kept = guest
            .console_path
            .with_extension(format!("boot-{boot}.log"));
        // The next boot writes the same path: a console that cannot be kept is said so, not
        // named as kept.
        let kept = match std::fs::rename(&guest.console_path, &kept) {
            Ok(()) => format!("console kept in {}", kept.display()),
            Err(err) => format!("console not kept: renaming it failed: {err}"),
        };
        println!(
            "guest {} ({}): boot {boot} {trap}; booting it again",
            planned.name(),
            planned.kernel.release
        );
        earlier_boots.push(format!("boot {boot} panicked: {trap} ({kept})"));
    }
}

/// A kernel oops on an int3 trap outside any BPF program (JIT padding is int3 too, so a trap
/// inside a program is the agent's and is never retried): the RIP line that names where.
fn text_patching_trap(console: &str) -> Option<String> {
    let mut lines = console.lines().skip_while(|l| !l.contains("Oops: int3"));
    lines.next()?;
    let rip = lines.find(|l| l.contains("RIP:"))?;
    let at = rip.split_once("RIP:")?.1.trim();
    if at.contains("bpf_prog") {
        return None;
    }
    Some(format!("int3 trap in kernel text at {at}"))
}

fn boot_once(planned: &Boot, initrd: &Path, work: &Path, timeout: Duration) -> Guest {
    let console_path = planned.console_path(work);
    let started = Instant::now();
    let problem = match run_qemu(planned, initrd, &console_path, timeout) {
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
        earlier_boots: Vec::new(),
    }
}

/// Runs qemu to completion; `Ok(Some(..))` when it had to be killed or exited with an error.
fn run_qemu(
    planned: &Boot,
    initrd: &Path,
    console: &Path,
    timeout: Duration,
) -> Result<Option<String>> {
    let kernel = planned.kernel;
    let _ = std::fs::remove_file(console);
    // The shared archive, then this kernel's IPVS modules: the kernel unpacks both.
    let own_initrd = console.with_extension("initramfs.gz");
    let mut bytes = std::fs::read(initrd).with_context(|| format!("{}", initrd.display()))?;
    bytes.extend(
        std::fs::read(&kernel.ipvs_modules)
            .with_context(|| format!("{}", kernel.ipvs_modules.display()))?,
    );
    std::fs::write(&own_initrd, bytes).with_context(|| format!("{}", own_initrd.display()))?;
    let log = console.with_extension("qemu.log");
    let stderr = std::fs::File::create(&log).with_context(|| format!("{}", log.display()))?;
    // TCG: this machine's /dev/kvm cannot run these guests. panic=-1 plus -no-reboot turns a
    // guest panic (pid 1 dying) into qemu exiting instead of hanging until the deadline.
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-machine", "q35", "-smp", "2", "-m", "2G"])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(&own_initrd)
        .arg("-append")
        .arg(planned.command_line())
        .args(["-display", "none", "-no-reboot", "-nic", "none"])
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

#[cfg(test)]
mod tests {
    use super::text_patching_trap;

    #[test]
    fn only_an_int3_trap_outside_bpf_programs_is_a_text_patching_trap() {
        let patching = "[ 8.0] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI\n[ 8.0] CPU: 1\n\
                        [ 8.0] RIP: 0010:call_timer_fn+0x1d/0x120\n";
        assert_eq!(
            text_patching_trap(patching).as_deref(),
            Some("int3 trap in kernel text at 0010:call_timer_fn+0x1d/0x120")
        );
        let in_program =
            "Oops: int3: 0000 [#1]\nRIP: 0010:bpf_prog_1234_timer_expire_en+0x40/0x90\n";
        assert_eq!(text_patching_trap(in_program), None);
        assert_eq!(
            text_patching_trap("BUG: kernel NULL pointer dereference\nRIP: 0010:x\n"),
            None
        );
        assert_eq!(text_patching_trap("KAT-DONE 11 11\n"), None);
    }
}
