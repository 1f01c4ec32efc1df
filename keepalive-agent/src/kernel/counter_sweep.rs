//! The counter sweep: runs `counter_sweep` (keepalive-ebpf's timer.rs) on every CPU, so that
//! the probes of keepalive expiries the kernel ran no program for are counted even when no
//! later expiry in their namespace runs on that CPU (the burst came last, the pod went away).
//!
//! Each run must happen in an interrupt on its CPU, never in a task there: a timer softirq
//! could then run an expiry in the middle of it, and both would move the same slot. The kernel
//! runs a test run in an interrupt only when the caller is on another CPU, so this thread
//! moves itself between two CPUs it may run on: from the first it sweeps every other CPU, from
//! the second the first. A process confined to one CPU cannot have that CPU swept. CPUs the
//! kernel keeps other work off (`isolcpus`, `nohz_full`, isolated cpuset partitions) are left
//! alone: the interrupt would disturb what was given them (logged). A thread
//! moved since it pinned itself (hotplug, a cpuset written) may be on the CPU it asks for: the
//! program then recognises the thread that made the run, by its id in the agent's PID
//! namespace, and reads nothing; [`CounterSweep::load`] checks that it does, here.

use std::{
    io,
    os::fd::AsFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use aya::{
    Ebpf,
    maps::{MapData, MapError, PerCpuArray},
    programs::ProgramFd,
};
use keepalive_ebpf::{SweepContext, names, sweep_totals};
use log::{debug, info, warn};

use super::{
    bpf_syscall::{ProgramLoadError, TestRunError, load_for_test_run, test_run, test_run_on_cpu},
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
    #[error("cannot read which CPUs are isolated ({0}): {1}")]
    IsolatedCpus(&'static str, #[source] io::Error),
    #[error("cannot read which CPUs the agent may run on (sched_getaffinity): {0}")]
    Affinity(#[source] io::Error),
    #[error("cannot move the counter sweep's thread to CPU {cpu} (sched_setaffinity): {source}")]
    Pin { cpu: u32, source: io::Error },
    #[error("counter sweep on CPU {cpu}: {source}")]
    Run { cpu: u32, source: TestRunError },
    #[error(
        "cannot tell which PID namespace the agent is in (stat {PIDNS_PATH}): {0}; the agent \
         needs a /proc mounted"
    )]
    PidNamespace(#[source] io::Error),
    #[error("cannot check the counter sweep's guard against its own thread: {0}")]
    GuardRun(#[source] TestRunError),
    #[error(
        "the counter sweep's program does not recognise the thread that runs it (thread \
         {thread} in PID namespace {dev:#x}:{ino}, by bpf_get_ns_current_pid_tgid): a run the \
         kernel made in that thread could count a keepalive expiry's probes twice, so the \
         sweep stays off"
    )]
    Unguarded { thread: u64, dev: u64, ino: u64 },
}

/// What goes uncounted without the sweep, for the operator.
pub(crate) const UNSWEPT: &str = "probes of keepalive expiries the kernel ran no program for \
     are counted only at a later expiry in their namespace on the same CPU";

/// The agent's PID namespace, whose device and inode number name it to the kernel.
const PIDNS_PATH: &str = "/proc/self/ns/pid";

/// What the sweeps did since the agent started, for the metrics.
#[derive(Debug, Default)]
pub(crate) struct SweepTotals {
    /// Sweeps of every CPU that completed.
    pub(crate) sweeps: AtomicU64,
    /// Probes they added to their namespaces' totals (the kernel's count, after the last sweep).
    pub(crate) probes: AtomicU64,
    /// Runs that read nothing, so that their CPU waited for the next sweep: they interrupted a
    /// timer program in the middle of a slot, or the kernel ran them in the sweeping thread
    /// (the kernel's counts, after the last sweep).
    pub(crate) busy: AtomicU64,
    /// Sweeps that failed (logged).
    pub(crate) failures: AtomicU64,
}

/// The loaded program and the map it counts in.
pub(crate) struct CounterSweep {
    program: ProgramFd,
    kernel_totals: PerCpuArray<MapData, u64>,
    totals: Arc<SweepTotals>,
    /// The agent's PID namespace as the program's context names it.
    pidns: (u64, u64),
}

impl std::fmt::Debug for CounterSweep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CounterSweep").finish_non_exhaustive()
    }
}

impl CounterSweep {
    /// Loads the program from `ebpf` (it shares the timer programs' per-CPU context map), and
    /// checks that it recognises a run made in the thread that asks for it (one run in this
    /// thread that only says so and sweeps nothing).
    pub(crate) fn load(ebpf: &mut Ebpf) -> Result<Self, SweepError> {
        let sweep = Self {
            program: load_for_test_run(ebpf, names::COUNTER_SWEEP_PROGRAM)
                .map_err(SweepError::Load)?,
            kernel_totals: take_map(ebpf, names::COUNTER_SWEEP_TOTALS_MAP)?,
            totals: Arc::default(),
            pidns: pid_namespace().map_err(SweepError::PidNamespace)?,
        };
        let check = SweepContext {
            check_only: 1,
            ..sweep.context()
        };
        let before = sweep.kernel_total(sweep_totals::RECOGNISED)?;
        test_run(sweep.program.as_fd(), &check.args()).map_err(SweepError::GuardRun)?;
        if sweep.kernel_total(sweep_totals::RECOGNISED)? != before + 1 {
            return Err(SweepError::Unguarded {
                thread: check.thread,
                dev: check.pidns_dev,
                ino: check.pidns_ino,
            });
        }
        Ok(sweep)
    }

    /// The program's context for runs asked for by the calling thread.
    fn context(&self) -> SweepContext {
        SweepContext {
            // SAFETY: gettid has no preconditions.
            thread: unsafe { libc::gettid() } as u64,
            pidns_dev: self.pidns.0,
            pidns_ino: self.pidns.1,
            check_only: 0,
        }
    }

    /// What the sweeps did, shared with the thread [`Self::spawn`] starts.
    pub(crate) fn totals(&self) -> Arc<SweepTotals> {
        Arc::clone(&self.totals)
    }

    /// Sweeps every online CPU that is not isolated once, from the calling thread, which it
    /// leaves on one of the CPUs the process may run on.
    pub(crate) fn sweep(&self) -> Result<Round, SweepError> {
        let online =
            aya::util::online_cpus().map_err(|(what, err)| SweepError::OnlineCpus(what, err))?;
        let mut left_alone = isolated_cpus()?;
        left_alone.retain(|cpu| online.contains(cpu));
        let allowed = process_cpus().map_err(SweepError::Affinity)?;
        let plan = Plan::new(&online, &allowed, &left_alone).ok_or_else(|| {
            SweepError::Affinity(io::Error::other(
                "none of the CPUs the agent may run on is online",
            ))
        })?;
        // The program reads nothing when the kernel runs it in this thread (see
        // `counter_sweep`): moved since it pinned itself, it may be on the CPU it asks for.
        let context = self.context().args();
        // Every CPU is tried; the first failure is reported after.
        let mut failed = None;
        pin(plan.home)?;
        for &cpu in &plan.from_home {
            if let Err(err) = self.run_on(cpu, &context) {
                failed.get_or_insert(err);
            }
        }
        if let Some(second) = plan.second_home {
            pin(second)?;
            if let Err(err) = self.run_on(plan.home, &context) {
                failed.get_or_insert(err);
            }
            // Back home: the thread waits for the next round there, not on the second CPU.
            pin(plan.home)?;
        }
        let unreachable = plan.unreachable;
        match failed {
            Some(err) => Err(err),
            None => Ok(Round {
                unreachable,
                left_alone,
            }),
        }
    }

    fn run_on(&self, cpu: u32, context: &[u64]) -> Result<(), SweepError> {
        match test_run_on_cpu(self.program.as_fd(), cpu, context) {
            Ok(_) => Ok(()),
            // Gone offline since the list was read: its slots wait until it is back.
            Err(TestRunError(err)) if err.raw_os_error() == Some(libc::ENXIO) => Ok(()),
            Err(source) => Err(SweepError::Run { cpu, source }),
        }
    }

    /// Updates [`SweepTotals::probes`] and [`SweepTotals::busy`] from the kernel's counts.
    fn read_totals(&self) -> Result<(), SweepError> {
        let probes = self.kernel_total(sweep_totals::PROBES)?;
        let busy =
            self.kernel_total(sweep_totals::BUSY)? + self.kernel_total(sweep_totals::IN_CALLER)?;
        let before = self.totals.probes.swap(probes, Ordering::Relaxed);
        self.totals.busy.store(busy, Ordering::Relaxed);
        if probes != before {
            debug!(
                "counter sweep: {} probes of unseen expiries added",
                probes.wrapping_sub(before)
            );
        }
        Ok(())
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
    /// own, until [`SweepThread::stop`]. A sweep that fails is logged and tried again at the
    /// next interval.
    pub(crate) fn spawn(self, interval: Duration) -> io::Result<SweepThread> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let handle = thread::Builder::new()
            .name("counter-sweep".into())
            .spawn(move || self.run(interval, &stopping))?;
        Ok(SweepThread { stop, handle })
    }

    fn run(self, interval: Duration, stop: &AtomicBool) {
        let mut failing = false;
        let mut told_unreachable = false;
        let mut told_left_alone = Vec::new();
        let mut next = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            next += interval;
            // What the kernel counted is read after every round, one that failed on some CPU
            // too: the others added their probes all the same.
            let swept = self.sweep();
            let read = self.read_totals();
            match swept.and_then(|round| read.map(|()| round)) {
                Ok(Round {
                    unreachable,
                    left_alone,
                }) => {
                    self.totals.sweeps.fetch_add(1, Ordering::Relaxed);
                    if left_alone != told_left_alone {
                        if !left_alone.is_empty() {
                            warn!(
                                "the counter sweep leaves the isolated CPUs {} alone (isolcpus, \
                                 nohz_full or an isolated cpuset partition): {UNSWEPT}",
                                cpu_list(&left_alone)
                            );
                        }
                        told_left_alone = left_alone;
                    }
                    if failing {
                        info!("the counter sweep runs again");
                        failing = false;
                    }
                    if let Some(cpu) = unreachable
                        && !told_unreachable
                    {
                        warn!(
                            "the counter sweep cannot run on CPU {cpu}, {}: {UNSWEPT}",
                            unreachable_why(cpu)
                        );
                        told_unreachable = true;
                    }
                }
                Err(err) => {
                    self.totals.failures.fetch_add(1, Ordering::Relaxed);
                    if !failing {
                        warn!(
                            "{err}; {UNSWEPT} (retrying every {})",
                            humantime::format_duration(interval)
                        );
                        failing = true;
                    }
                }
            }
            // After a stall (a suspended VM), sweep again at once rather than catch up. Parked,
            // not asleep, so that `stop` ends the wait.
            let now = Instant::now();
            if next > now {
                thread::park_timeout(next - now);
            } else {
                next = now;
            }
        }
    }
}

/// Where the sweeping thread runs in a round, and what it sweeps from there.
#[derive(Debug, PartialEq, Eq)]
struct Plan {
    /// Where the thread lives, and sweeps every other CPU from: the first CPU the process may
    /// run on that is not isolated (an isolated one only when no other is: the thread's work
    /// disturbs that CPU too).
    home: u32,
    /// The online CPUs it sweeps from `home`: not `home`, none isolated.
    from_home: Vec<u32>,
    /// Where it moves to sweep `home`: a second CPU the process may run on, not isolated.
    second_home: Option<u32>,
    /// `home`, when no such second CPU exists and `home` is not isolated itself.
    unreachable: Option<u32>,
}

impl Plan {
    /// `None` when the process may run on no online CPU.
    fn new(online: &[u32], allowed: &[u32], isolated: &[u32]) -> Option<Plan> {
        let mut homes: Vec<u32> = allowed
            .iter()
            .copied()
            .filter(|cpu| online.contains(cpu))
            .collect();
        // A stable sort keeps the others' order.
        homes.sort_by_key(|cpu| isolated.contains(cpu));
        let home = *homes.first()?;
        let from_home = online
            .iter()
            .copied()
            .filter(|&cpu| cpu != home && !isolated.contains(&cpu))
            .collect();
        let (second_home, unreachable) = if isolated.contains(&home) {
            (None, None)
        } else {
            match homes.get(1) {
                Some(&second) if !isolated.contains(&second) => (Some(second), None),
                _ => (None, Some(home)),
            }
        };
        Some(Plan {
            home,
            from_home,
            second_home,
            unreachable,
        })
    }
}

/// What a sweep of every CPU could not do.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Round {
    /// The CPU it could not sweep: the thread's home, when the process may run on no other
    /// CPU that is not isolated.
    pub(crate) unreachable: Option<u32>,
    /// The isolated CPUs it left alone ([`isolated_cpus`]).
    pub(crate) left_alone: Vec<u32>,
}

impl Round {
    /// What the round did, for the operator (`check --load`).
    pub(crate) fn summary(&self) -> String {
        let left_alone = cpu_list(&self.left_alone);
        match (self.unreachable, self.left_alone.is_empty()) {
            (None, true) => "counter sweep ran on every CPU".to_owned(),
            (None, false) => {
                format!("counter sweep ran on every CPU but the isolated {left_alone}, left alone")
            }
            (Some(cpu), isolated_none) => format!(
                "counter sweep ran, but not on CPU {cpu}, {}{}",
                unreachable_why(cpu),
                if isolated_none {
                    String::new()
                } else {
                    format!(", nor on the isolated {left_alone}, left alone")
                }
            ),
        }
    }
}

/// Why `cpu` cannot be swept, and what to do.
fn unreachable_why(cpu: u32) -> String {
    format!(
        "the only CPU the agent may run on that is not isolated (give the agent a second one \
         in its cpuset: sweeping CPU {cpu} needs the thread on another)"
    )
}

/// `cpus` as a comma-separated list, for the operator.
fn cpu_list(cpus: &[u32]) -> String {
    cpus.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Where the kernel lists the CPUs it keeps other work off: `isolcpus` and isolated cpuset
/// partitions (`isolated`), and CPUs without the scheduler tick (`nohz_full`, absent in
/// kernels built without it).
const ISOLATED_LISTS: [&str; 2] = [
    "/sys/devices/system/cpu/isolated",
    "/sys/devices/system/cpu/nohz_full",
];

/// The CPUs in [`ISOLATED_LISTS`], read at each sweep (a cpuset partition may change).
fn isolated_cpus() -> Result<Vec<u32>, SweepError> {
    let mut cpus = Vec::new();
    for path in ISOLATED_LISTS {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
            Err(err) => return Err(SweepError::IsolatedCpus(path, err)),
        };
        let listed = parse_cpu_list(&text).map_err(|err| {
            SweepError::IsolatedCpus(path, io::Error::new(io::ErrorKind::InvalidData, err))
        })?;
        cpus.extend(listed);
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

/// A kernel CPU list (`0-3,8,10-11`; empty, or `(null)` for `nohz_full` unset on some
/// kernels, when none).
fn parse_cpu_list(text: &str) -> Result<Vec<u32>, String> {
    let text = text.trim();
    if text.is_empty() || text == "(null)" {
        return Ok(Vec::new());
    }
    let mut cpus = Vec::new();
    for part in text.split(',') {
        let number = |s: &str| {
            s.parse::<u32>()
                .map_err(|_| format!("{text:?}: {s:?} is not a CPU number"))
        };
        match part.split_once('-') {
            Some((from, to)) => {
                let (from, to) = (number(from)?, number(to)?);
                if from > to || to - from >= 1 << 16 {
                    return Err(format!("{text:?}: {part:?} is not a range of CPUs"));
                }
                cpus.extend(from..=to);
            }
            None => cpus.push(number(part)?),
        }
    }
    Ok(cpus)
}

/// The sweep's thread, running until [`Self::stop`].
pub(crate) struct SweepThread {
    stop: Arc<AtomicBool>,
    handle: thread::JoinHandle<()>,
}

impl SweepThread {
    /// Ends the sweeps (a round under way finishes first: milliseconds) and waits for the
    /// thread; says so if it had ended by a panic.
    pub(crate) fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.thread().unpark();
        if self.handle.join().is_err() {
            warn!("the counter sweep's thread had stopped with a panic");
        }
    }
}

/// The agent's PID namespace as `bpf_get_ns_current_pid_tgid` takes it: the kernel's device
/// number of nsfs (`MKDEV`: major above bit 20, which `stat`'s `st_dev` encodes otherwise) and
/// the namespace's inode number.
fn pid_namespace() -> io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(PIDNS_PATH)?;
    let (major, minor) = (libc::major(meta.dev()), libc::minor(meta.dev()));
    Ok(((u64::from(major) << 20) | u64::from(minor), meta.ino()))
}

/// Bytes of the CPU masks passed to the kernel: room for 8192 CPUs (a `cpu_set_t` holds 1024,
/// and `sched_getaffinity` refuses a mask shorter than the kernel's CPU count).
const MASK_BYTES: usize = 1024;

/// The CPUs the process may run on: its main thread's affinity (this thread's own is pinned).
fn process_cpus() -> io::Result<Vec<u32>> {
    let mut mask = [0u8; MASK_BYTES];
    // SAFETY: the kernel writes at most `MASK_BYTES` bytes to `mask`.
    let written = unsafe {
        libc::syscall(
            libc::SYS_sched_getaffinity,
            libc::getpid(),
            MASK_BYTES,
            mask.as_mut_ptr(),
        )
    };
    if written < 0 {
        return Err(io::Error::last_os_error());
    }
    let written = (written as usize).min(MASK_BYTES);
    Ok((0..written * 8)
        .filter(|&bit| mask[bit / 8] & (1 << (bit % 8)) != 0)
        .map(|cpu| cpu as u32)
        .collect())
}

/// Moves the calling thread to `cpu` (the kernel migrates it before returning).
fn pin(cpu: u32) -> Result<(), SweepError> {
    let mut mask = [0u8; MASK_BYTES];
    let Some(byte) = mask.get_mut(cpu as usize / 8) else {
        return Err(SweepError::Pin {
            cpu,
            source: io::Error::other("past the 8192 CPUs the agent's masks hold"),
        });
    };
    *byte = 1 << (cpu % 8);
    // SAFETY: the kernel reads `MASK_BYTES` bytes of `mask`; 0 is the calling thread.
    let ret = unsafe { libc::syscall(libc::SYS_sched_setaffinity, 0, MASK_BYTES, mask.as_ptr()) };
    if ret != 0 {
        return Err(SweepError::Pin {
            cpu,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_says_which_cpus_it_did_not_sweep_and_why() {
        let round = |unreachable, left_alone: &[u32]| {
            Round {
                unreachable,
                left_alone: left_alone.to_vec(),
            }
            .summary()
        };
        assert_eq!(round(None, &[]), "counter sweep ran on every CPU");
        assert_eq!(
            round(None, &[1, 3]),
            "counter sweep ran on every CPU but the isolated 1,3, left alone"
        );
        assert_eq!(
            round(Some(0), &[]),
            "counter sweep ran, but not on CPU 0, the only CPU the agent may run on that is not \
             isolated (give the agent a second one in its cpuset: sweeping CPU 0 needs the \
             thread on another)"
        );
        assert_eq!(
            round(Some(0), &[1]),
            "counter sweep ran, but not on CPU 0, the only CPU the agent may run on that is not \
             isolated (give the agent a second one in its cpuset: sweeping CPU 0 needs the \
             thread on another), nor on the isolated 1, left alone"
        );
    }

    #[test]
    fn the_sweeping_thread_never_runs_on_an_isolated_cpu_while_another_will_do() {
        type Cpus = &'static [u32];
        /// Online, allowed and isolated CPUs.
        type Given = (Cpus, Cpus, Cpus);
        /// Home, the CPUs swept from it, the second home and the CPU unreachable.
        type Planned = (u32, Cpus, Option<u32>, Option<u32>);
        let cases: [(Given, Planned); 5] = [
            // Nothing isolated: CPU 1 sweeps home.
            (
                ([0, 1, 2].as_slice(), &[0, 1, 2], &[]),
                (0, &[1, 2], Some(1), None),
            ),
            // nohz_full=1 on two CPUs: home cannot be swept without running on CPU 1.
            ((&[0, 1], &[0, 1], &[1]), (0, &[], None, Some(0))),
            // The first CPU isolated: home and second home are the others.
            ((&[0, 1, 2], &[0, 1, 2], &[0]), (1, &[2], Some(2), None)),
            // isolcpus=1: the process may run on CPU 0 only.
            ((&[0, 1], &[0], &[1]), (0, &[], None, Some(0))),
            // Every CPU the agent may use is isolated: it lives on one and sweeps the rest.
            ((&[0, 1, 2], &[1, 2], &[1, 2]), (1, &[0], None, None)),
        ];
        for ((online, allowed, isolated), (home, from_home, second_home, unreachable)) in cases {
            assert_eq!(
                Plan::new(online, allowed, isolated),
                Some(Plan {
                    home,
                    from_home: from_home.to_vec(),
                    second_home,
                    unreachable,
                }),
                "online {online:?}, allowed {allowed:?}, isolated {isolated:?}"
            );
        }
        assert_eq!(Plan::new(&[0], &[3], &[]), None);
    }

    #[test]
    fn cpu_lists_parse_as_the_kernel_prints_them() {
        assert_eq!(parse_cpu_list("\n"), Ok(vec![]));
        assert_eq!(parse_cpu_list("(null)\n"), Ok(vec![]));
        assert_eq!(parse_cpu_list("3\n"), Ok(vec![3]));
        assert_eq!(
            parse_cpu_list("0-2,8,10-11\n"),
            Ok(vec![0, 1, 2, 8, 10, 11])
        );
        assert!(parse_cpu_list("2-1").unwrap_err().contains("not a range"));
        assert!(
            parse_cpu_list("a")
                .unwrap_err()
                .contains("not a CPU number")
        );
        assert!(parse_cpu_list("0-99999999").is_err());
        assert_eq!(cpu_list(&[2, 3, 7]), "2,3,7");
    }
}
