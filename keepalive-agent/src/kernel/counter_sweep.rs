//! The counter sweep: runs `counter_sweep` (keepalive-ebpf's timer.rs) on every CPU, so that
//! the probes of keepalive expiries the kernel ran no program for are counted even when no
//! later expiry in their namespace runs on that CPU (the burst came last, the pod went away).
//!
//! Each run must happen in an interrupt on its CPU, never in a task there: a timer softirq
//! could then run an expiry in the middle of it, and both would move the same slot. The kernel
//! runs a test run in an interrupt only when the caller is on another CPU, so this thread
//! moves itself between two CPUs it may run on: from the first it sweeps every other CPU, from
//! the second the first. A process confined to one CPU cannot have that CPU swept.

use std::{
    io,
    os::fd::AsFd as _,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use aya::{
    Ebpf,
    maps::{MapData, MapError, PerCpuArray},
    programs::ProgramFd,
};
use keepalive_ebpf::{names, sweep_totals};
use log::{debug, info, warn};

use super::{
    bpf_syscall::{ProgramLoadError, TestRunError, load_for_test_run, test_run_on_cpu},
    maps::{TakeMapError, take_map},
};

/// Why the counter sweep cannot run.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SweepError {
    #[error("cannot load the counter sweep program ({name}): {0}", name = names::COUNTER_SWEEP_PROGRAM)]
    Load(#[source] ProgramLoadError),
    #[error(transparent)]
    Totals(#[from] TakeMapError),
    #[error("cannot read what the counter sweep did ({name}): {0}", name = names::COUNTER_SWEEP_TOTALS_MAP)]
    ReadTotals(#[source] MapError),
    #[error("cannot list the online CPUs ({0}): {1}")]
    OnlineCpus(&'static str, #[source] io::Error),
    #[error("cannot read which CPUs the agent may run on (sched_getaffinity): {0}")]
    Affinity(#[source] io::Error),
    #[error("cannot move the counter sweep's thread to CPU {cpu} (sched_setaffinity): {source}")]
    Pin { cpu: u32, source: io::Error },
    #[error("counter sweep on CPU {cpu}: {source}")]
    Run { cpu: u32, source: TestRunError },
}

/// What the sweeps did since the agent started, for the metrics.
#[derive(Debug, Default)]
pub(crate) struct SweepTotals {
    /// Sweeps of every CPU that completed.
    pub(crate) sweeps: AtomicU64,
    /// Probes they added to their namespaces' totals (the kernel's count, after the last sweep).
    pub(crate) probes: AtomicU64,
    /// Runs that interrupted a keepalive expiry on their CPU, which then waited for the next
    /// sweep (the kernel's count, after the last sweep).
    pub(crate) busy: AtomicU64,
    /// Sweeps that failed (logged).
    pub(crate) failures: AtomicU64,
}

/// The loaded program and the map it counts in.
pub(crate) struct CounterSweep {
    program: ProgramFd,
    kernel_totals: PerCpuArray<MapData, u64>,
    totals: Arc<SweepTotals>,
}

impl std::fmt::Debug for CounterSweep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CounterSweep").finish_non_exhaustive()
    }
}

impl CounterSweep {
    /// Loads the program from `ebpf` (it shares the timer programs' per-CPU context map).
    pub(crate) fn load(ebpf: &mut Ebpf) -> Result<Self, SweepError> {
        Ok(Self {
            program: load_for_test_run(ebpf, names::COUNTER_SWEEP_PROGRAM)
                .map_err(SweepError::Load)?,
            kernel_totals: take_map(ebpf, names::COUNTER_SWEEP_TOTALS_MAP)?,
            totals: Arc::default(),
        })
    }

    /// What the sweeps did, shared with the thread [`Self::spawn`] starts.
    pub(crate) fn totals(&self) -> Arc<SweepTotals> {
        Arc::clone(&self.totals)
    }

    /// Sweeps every online CPU once, from the calling thread, which it leaves on one of the CPUs
    /// the process may run on. Returns the CPU it could not sweep, when the process may run on
    /// that one only.
    pub(crate) fn sweep(&self) -> Result<Option<u32>, SweepError> {
        let online =
            aya::util::online_cpus().map_err(|(what, err)| SweepError::OnlineCpus(what, err))?;
        let allowed = process_cpus().map_err(SweepError::Affinity)?;
        let mut homes = allowed.iter().copied().filter(|cpu| online.contains(cpu));
        let Some(first) = homes.next() else {
            return Err(SweepError::Affinity(io::Error::other(
                "none of the CPUs the agent may run on is online",
            )));
        };
        let second = homes.next();
        pin(first)?;
        for &cpu in online.iter().filter(|&&cpu| cpu != first) {
            self.run_on(cpu)?;
        }
        match second {
            Some(second) => {
                pin(second)?;
                self.run_on(first)?;
                Ok(None)
            }
            None => Ok(Some(first)),
        }
    }

    fn run_on(&self, cpu: u32) -> Result<(), SweepError> {
        match test_run_on_cpu(self.program.as_fd(), cpu) {
            Ok(_) => Ok(()),
            // Gone offline since the list was read: its slots wait until it is back.
            Err(TestRunError(err)) if err.raw_os_error() == Some(libc::ENXIO) => Ok(()),
            Err(source) => Err(SweepError::Run { cpu, source }),
        }
    }

    /// The kernel's count at `index` ([`sweep_totals`]), summed over the CPUs.
    fn kernel_total(&self, index: u32) -> Result<u64, SweepError> {
        let values = self
            .kernel_totals
            .get(&index, 0)
            .map_err(SweepError::ReadTotals)?;
        Ok(values.iter().sum())
    }

    /// Sweeps every CPU each `interval` (`--netns.counter-sweep-interval`) on a thread of its
    /// own, for as long as the process runs. A sweep that fails is logged and tried again at
    /// the next interval.
    pub(crate) fn spawn(self, interval: Duration) -> io::Result<thread::JoinHandle<()>> {
        thread::Builder::new()
            .name("counter-sweep".into())
            .spawn(move || self.run_forever(interval))
    }

    fn run_forever(self, interval: Duration) {
        let mut failing = false;
        let mut told_unreachable = false;
        let mut next = Instant::now();
        loop {
            next += interval;
            let swept = self.sweep().and_then(|unreachable| {
                let probes = self.kernel_total(sweep_totals::PROBES)?;
                let busy = self.kernel_total(sweep_totals::BUSY)?;
                Ok((unreachable, probes, busy))
            });
            match swept {
                Ok((unreachable, probes, busy)) => {
                    let before = self.totals.probes.swap(probes, Ordering::Relaxed);
                    self.totals.busy.store(busy, Ordering::Relaxed);
                    self.totals.sweeps.fetch_add(1, Ordering::Relaxed);
                    if failing {
                        info!("the counter sweep runs again");
                        failing = false;
                    }
                    if let Some(cpu) = unreachable
                        && !told_unreachable
                    {
                        warn!(
                            "the agent may run on CPU {cpu} only, so the counter sweep cannot \
                             run there: probes of keepalive expiries the kernel ran no program \
                             for on it are counted only at a later expiry in their namespace \
                             there (give the agent a second CPU in its cpuset)"
                        );
                        told_unreachable = true;
                    }
                    if probes != before {
                        debug!(
                            "counter sweep: {} probes of unseen expiries added",
                            probes.wrapping_sub(before)
                        );
                    }
                }
                Err(err) => {
                    self.totals.failures.fetch_add(1, Ordering::Relaxed);
                    if !failing {
                        warn!(
                            "{err}; probes of keepalive expiries the kernel ran no program for \
                             are counted only at a later expiry in their namespace on the same \
                             CPU (retrying every {})",
                            humantime::format_duration(interval)
                        );
                        failing = true;
                    }
                }
            }
            // After a stall (a suspended VM), sweep again at once rather than catch up.
            let now = Instant::now();
            if next > now {
                thread::sleep(next - now);
            } else {
                next = now;
            }
        }
    }
}

/// The CPUs the process may run on: its main thread's affinity (this thread's own is pinned).
fn process_cpus() -> io::Result<Vec<u32>> {
    // SAFETY: an all-zero cpu_set_t is an empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a cpu_set_t of the size passed, written by the kernel.
    let ret = unsafe {
        libc::sched_getaffinity(
            libc::getpid(),
            std::mem::size_of::<libc::cpu_set_t>(),
            &raw mut set,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    let max = 8 * std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: CPU_ISSET reads the set within its size.
    Ok((0..max)
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .map(|cpu| cpu as u32)
        .collect())
}

/// Moves the calling thread to `cpu` (the kernel migrates it before returning).
fn pin(cpu: u32) -> Result<(), SweepError> {
    // SAFETY: an all-zero cpu_set_t is an empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if cpu as usize >= 8 * std::mem::size_of::<libc::cpu_set_t>() {
        return Err(SweepError::Pin {
            cpu,
            source: io::Error::other("past the CPUs a cpu_set_t holds (CPU_SETSIZE)"),
        });
    }
    // SAFETY: `cpu` is below the set's size, checked above.
    unsafe { libc::CPU_SET(cpu as usize, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed; 0 is the calling thread.
    let ret = unsafe {
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &raw const set)
    };
    if ret != 0 {
        return Err(SweepError::Pin {
            cpu,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}
