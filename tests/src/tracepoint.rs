//! The kernel's own count of keepalive timer expiries, independent of the agent: a perf
//! tracepoint event on `timer:timer_expire_entry` per CPU, filtered to `tcp_keepalive_timer`.
//!
//! On this machine's 6.18 kernel, when tens of thousands of keepalive timers expire in the same
//! jiffy, the kernel sometimes runs none of the BPF programs attached to the hook for a whole
//! burst of expiries, while a perf event on the same tracepoint counts every one of them (and
//! the programs' run count and recursion misses do not show it). Comparing this count with
//! the agent's `tcp_keepalive_timer_expiries_total` tells those expiries apart from anything the
//! agent loses itself.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{Context, bail};
use keepalive_agent::kernel::kallsyms::TimerFunctions;

const TRACEFS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];
const EXPIRY_EVENT: &str = "timer/timer_expire_entry";
const CLOSE_EVENT: &str = "sock/inet_sock_set_state";
const PERF_TYPE_TRACEPOINT: u32 = 2;
/// `PERF_ATTR_SIZE_VER0`: type, size, config, sample period, sample type, read format, flags.
const ATTR_SIZE: u32 = 64;
const PERF_EVENT_IOC_ENABLE: libc::Ioctl = 0x2400;
const PERF_EVENT_IOC_SET_FILTER: libc::Ioctl = 0x4008_2406;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;
/// Bit 0 of `perf_event_attr`'s flags word (its sixth `u64`).
const ATTR_FLAG_DISABLED: u64 = 1;

/// Counts `timer_expire_entry` hits for `tcp_keepalive_timer` on every CPU from its creation.
#[derive(Debug)]
pub struct KeepaliveExpiryCount(TracepointCount);

impl KeepaliveExpiryCount {
    /// Opens one counting event per online CPU. Needs root (or CAP_PERFMON) and tracefs, for
    /// the tracepoint's id.
    pub fn start() -> anyhow::Result<Self> {
        TracepointCount::start(EXPIRY_EVENT, &keepalive_expiry_filter()?).map(Self)
    }

    /// Keepalive timer expiries on all CPUs since [`Self::start`].
    pub fn read(&self) -> anyhow::Result<u64> {
        self.0.read()
    }
}

/// The perf filter of `timer_expire_entry` hits for `tcp_keepalive_timer`: the address the
/// agent's programs filter on, read the way the agent reads it.
fn keepalive_expiry_filter() -> anyhow::Result<String> {
    let function = TimerFunctions::from_proc()?.keepalive;
    Ok(format!("function == 0x{function:x}"))
}

/// Hits of a tracepoint that pass a filter, on every CPU from its creation.
#[derive(Debug)]
struct TracepointCount {
    per_cpu: Vec<OwnedFd>,
}

impl TracepointCount {
    /// `event` is `category/name` under tracefs' `events`; `filter` in the kernel's event
    /// filter syntax, on the event's fields.
    fn start(event: &str, filter: &str) -> anyhow::Result<Self> {
        let id = tracepoint_id(event)?;
        let filter = std::ffi::CString::new(filter)?;
        // SAFETY: sysconf has no preconditions.
        let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as i32;
        let mut per_cpu = Vec::new();
        for cpu in 0..cpus {
            let mut attr = [0u64; ATTR_SIZE as usize / 8];
            attr[0] = u64::from(PERF_TYPE_TRACEPOINT) | (u64::from(ATTR_SIZE) << 32);
            attr[1] = id;
            // `disabled`: counting starts at PERF_EVENT_IOC_ENABLE, once the filter is set;
            // enabled at once, it would count every timer until then as a keepalive one.
            attr[5] = ATTR_FLAG_DISABLED;
            // SAFETY: `attr` is a zero-filled perf_event_attr of ATTR_SIZE bytes (counting
            // only: no sampling).
            let fd = unsafe {
                libc::syscall(
                    libc::SYS_perf_event_open,
                    attr.as_ptr(),
                    -1 as libc::pid_t,
                    cpu,
                    -1 as libc::c_int,
                    PERF_FLAG_FD_CLOEXEC,
                )
            };
            if fd < 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("perf_event_open({event}, cpu {cpu})"));
            }
            // SAFETY: a descriptor perf_event_open just returned, owned by nobody else.
            let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
            // SAFETY: the filter is a NUL-terminated string that outlives the call.
            if unsafe { libc::ioctl(fd.as_raw_fd(), PERF_EVENT_IOC_SET_FILTER, filter.as_ptr()) }
                != 0
            {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("PERF_EVENT_IOC_SET_FILTER {filter:?} on {event}"));
            }
            // SAFETY: ioctl on our own perf descriptor.
            if unsafe { libc::ioctl(fd.as_raw_fd(), PERF_EVENT_IOC_ENABLE, 0) } != 0 {
                return Err(std::io::Error::last_os_error()).context("PERF_EVENT_IOC_ENABLE");
            }
            per_cpu.push(fd);
        }
        Ok(Self { per_cpu })
    }

    /// Hits on all CPUs since [`Self::start`].
    fn read(&self) -> anyhow::Result<u64> {
        let mut total = 0;
        for fd in &self.per_cpu {
            let mut count = 0u64;
            // SAFETY: reads 8 bytes into `count`, the counting event's value.
            let n = unsafe { libc::read(fd.as_raw_fd(), (&raw mut count).cast(), 8) };
            if n != 8 {
                return Err(std::io::Error::last_os_error()).context("reading a perf counter");
            }
            total += count;
        }
        Ok(total)
    }
}

fn tracepoint_id(event: &str) -> anyhow::Result<u64> {
    for root in TRACEFS {
        let path = format!("{root}/events/{event}/id");
        if let Ok(text) = std::fs::read_to_string(&path) {
            return text
                .trim()
                .parse()
                .with_context(|| format!("{path}: {text:?}"));
        }
    }
    bail!("tracefs is not mounted (no events/{event}/id under {TRACEFS:?})")
}

/// Keepalive expiries the kernel ran none of the agent's programs for, over a window: the perf
/// count against the expiries the agent's programs ran for, which is the growth of each
/// namespace's `tcp_keepalive_timer_expiries_total` (a namespace the agent forgets inside the
/// window takes its growth with it, which only makes the figure larger; one it forgot before,
/// whose inode a new namespace took, counts from 0) plus the expiries the programs saw and
/// could not count themselves (`keepalive_agent_kernel_uncounted_total`, except
/// `entry_not_run` and `exit_not_run`: the kernel skipped one of that expiry's programs). So the
/// agent's own losses are never taken for the kernel's.
#[derive(Debug)]
pub struct ExpiriesNotRun {
    count: KeepaliveExpiryCount,
    before: Seen,
}

impl ExpiriesNotRun {
    /// Reads the agent first, then opens the perf count: an expiry in between is in the
    /// agent's growth and not in perf's count, so the figure errs low (stricter), never high.
    pub fn open(agent: &crate::Agent) -> anyhow::Result<Self> {
        let before = Seen::scrape(agent)?;
        let count = KeepaliveExpiryCount::start()?;
        Ok(Self { count, before })
    }

    /// Expiries counted by perf since [`Self::open`] that the agent's programs did not see.
    pub fn close(&self, agent: &crate::Agent) -> anyhow::Result<u64> {
        Ok(self.counts(agent)?.not_run())
    }

    /// Both counts since [`Self::open`]; perf is read first, for the same reason.
    pub fn counts(&self, agent: &crate::Agent) -> anyhow::Result<ExpiryCounts> {
        let hits = self.count.read()?;
        let now = Seen::scrape(agent)?;
        Ok(ExpiryCounts {
            hits,
            seen: now.since(&self.before),
        })
    }
}

/// Keepalive expiries the kernel ran no BPF program for, over a window, for a command that
/// exports no count of the expiries its programs saw (`watch`): the perf count against that of
/// a classic tracepoint program the test attaches to the same hook (`expiry_count_classic`),
/// which the kernel skips together with every other program there (README, "Exact totals and
/// the kernel").
pub struct ExpiriesNotRunByAnyProgram(ClassicWitness);

impl ExpiriesNotRunByAnyProgram {
    /// See [`ClassicWitness::open`].
    pub fn open() -> anyhow::Result<Self> {
        use keepalive_agent::kernel::programs::{
            EXPIRY_CLASSIC_MAP, EXPIRY_CLASSIC_PROGRAM, MIN_RING_BUFFER_BYTES,
        };
        let object = keepalive_agent::kernel::open_programs(MIN_RING_BUFFER_BYTES)
            .context("preparing the programs object")?;
        ClassicWitness::open(
            object,
            EXPIRY_CLASSIC_PROGRAM,
            EXPIRY_CLASSIC_MAP,
            EXPIRY_EVENT,
            &keepalive_expiry_filter()?,
        )
        .map(Self)
    }

    /// Expiries counted by perf since [`Self::open`] that the classic program did not see.
    pub fn not_run(&self) -> anyhow::Result<u64> {
        let (hits, seen) = self.0.counts()?;
        Ok(hits.saturating_sub(seen))
    }
}

/// Closes (moves to `TCP_CLOSE`) of TCP sockets with one of up to two ports, local or remote,
/// that the kernel ran no BPF program for, over a window: a perf count of
/// `sock:inet_sock_set_state` with that filter against the count of a classic tracepoint
/// program the test attaches to the same hook (`close_count_classic`), which the kernel skips
/// together with the agent's close program. For a test that expects an exact number of drops.
pub struct ClosesNotRunByAnyProgram(ClassicWitness);

impl ClosesNotRunByAnyProgram {
    /// The classic program counts the closes on `ports`; see [`ClassicWitness::open`].
    pub fn open(ports: &[u16]) -> anyhow::Result<Self> {
        use keepalive_agent::kernel::programs::{
            CLOSE_CLASSIC_MAP, CLOSE_CLASSIC_PORTS_MAP, CLOSE_CLASSIC_PROGRAM,
            MIN_RING_BUFFER_BYTES,
        };
        anyhow::ensure!(
            (1..=2).contains(&ports.len()) && !ports.contains(&0),
            "the close witness takes one or two ports, none 0: {ports:?}"
        );
        let mut object = keepalive_agent::kernel::open_programs(MIN_RING_BUFFER_BYTES)
            .context("preparing the programs object")?;
        let mut slots: aya::maps::Array<_, u16> = aya::maps::Array::try_from(
            object
                .map_mut(CLOSE_CLASSIC_PORTS_MAP)
                .context("classic program's port map missing from the object")?,
        )?;
        for (slot, &port) in ports.iter().enumerate() {
            slots.set(slot as u32, port, 0)?;
        }
        let ports = ports
            .iter()
            .map(|p| format!("sport == {p} || dport == {p}"))
            .collect::<Vec<_>>()
            .join(" || ");
        // `TCP_CLOSE` and `IPPROTO_TCP`.
        let filter = format!("newstate == 7 && protocol == 6 && ({ports})");
        ClassicWitness::open(
            object,
            CLOSE_CLASSIC_PROGRAM,
            CLOSE_CLASSIC_MAP,
            CLOSE_EVENT,
            &filter,
        )
        .map(Self)
    }

    /// See [`ClassicWitness::counts`].
    pub fn counts(&self) -> anyhow::Result<(u64, u64)> {
        self.0.counts()
    }
}

/// A classic tracepoint program of the programs object counting the hits of a hook that pass
/// a filter, beside a perf counting event with the same filter: the kernel runs no program for
/// some hits (README, "Exact totals and the kernel"), and perf counts every one.
struct ClassicWitness {
    count: TracepointCount,
    classic: aya::maps::PerCpuArray<aya::maps::MapData, u64>,
    before: u64,
    /// Keeps the classic program attached.
    _object: aya::Ebpf,
}

impl ClassicWitness {
    /// Loads `program` of `object`, attaches it to `event` (`category/name`) and reads its
    /// per-CPU count, `map`; then opens the perf count with `filter`, which must select what
    /// the program counts. A hit in between is in the program's growth and not in perf's, so
    /// the difference errs low (stricter), never high.
    fn open(
        mut object: aya::Ebpf,
        program: &str,
        map: &str,
        event: &str,
        filter: &str,
    ) -> anyhow::Result<Self> {
        let classic = aya::maps::PerCpuArray::try_from(
            object
                .take_map(map)
                .with_context(|| format!("classic count map {map} missing from the object"))?,
        )?;
        let loaded: &mut aya::programs::TracePoint = object
            .program_mut(program)
            .with_context(|| {
                format!("classic tracepoint program {program} missing from the object")
            })?
            .try_into()?;
        loaded.load()?;
        let (category, name) = event.split_once('/').context("event without a category")?;
        loaded
            .attach(category, name)
            .with_context(|| format!("attaching {program} to {event}"))?;
        let before = classic_total(&classic)?;
        Ok(Self {
            count: TracepointCount::start(event, filter)?,
            classic,
            before,
            _object: object,
        })
    }

    /// Hits since [`Self::open`]: counted by perf (every one the kernel ran), and seen by the
    /// classic program. Perf is read first, for the reason in [`Self::open`].
    fn counts(&self) -> anyhow::Result<(u64, u64)> {
        let hits = self.count.read()?;
        let seen = classic_total(&self.classic)?.saturating_sub(self.before);
        Ok((hits, seen))
    }
}

/// The classic program's count, summed over CPUs.
fn classic_total(counts: &aya::maps::PerCpuArray<aya::maps::MapData, u64>) -> anyhow::Result<u64> {
    Ok(counts.get(&0, 0)?.iter().sum())
}

/// What the agent's programs ran for, as the agent exports it.
#[derive(Debug)]
struct Seen {
    /// `tcp_keepalive_timer_expiries_total` by label set (`netns`, and workload labels
    /// when aggregated).
    per_netns: std::collections::HashMap<Vec<(String, String)>, f64>,
    /// Keepalive expiries the programs could not count (every cause but the kernel's skips,
    /// `entry_not_run` and `exit_not_run`).
    uncounted: f64,
}

impl Seen {
    fn scrape(agent: &crate::Agent) -> anyhow::Result<Self> {
        let metrics = agent.scrape()?;
        let per_netns = metrics
            .samples(EXPIRIES)
            .into_iter()
            .map(|s| (s.labels.clone(), s.value))
            .collect();
        let uncounted = metrics
            .matching(UNCOUNTED, &[("event", "keepalive_expiry")])
            .into_iter()
            .filter(|s| !matches!(s.label("cause"), Some("entry_not_run" | "exit_not_run")))
            .map(|s| s.value)
            .sum();
        Ok(Self {
            per_netns,
            uncounted,
        })
    }

    fn since(&self, earlier: &Seen) -> u64 {
        let grown: f64 = self
            .per_netns
            .iter()
            .map(|(netns, &now)| match earlier.per_netns.get(netns) {
                Some(&then) if then <= now => now - then,
                // New, or a new namespace on a forgotten one's inode.
                _ => now,
            })
            .sum();
        (grown + (self.uncounted - earlier.uncounted).max(0.0)) as u64
    }
}

/// Keepalive expiries over one window.
#[derive(Debug, Clone, Copy)]
pub struct ExpiryCounts {
    /// Counted by the perf event: every one the kernel ran.
    pub hits: u64,
    /// Seen by the agent's programs.
    pub seen: u64,
}

impl ExpiryCounts {
    pub fn not_run(&self) -> u64 {
        self.hits.saturating_sub(self.seen)
    }
}

const EXPIRIES: &str = "tcp_keepalive_timer_expiries_total";
const UNCOUNTED: &str = "keepalive_agent_kernel_uncounted_total";
