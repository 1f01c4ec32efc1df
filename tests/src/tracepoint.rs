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
const EVENT: &str = "events/timer/timer_expire_entry/id";
const PERF_TYPE_TRACEPOINT: u32 = 2;
/// `PERF_ATTR_SIZE_VER0`: type, size, config, sample period, sample type, read format, flags.
const ATTR_SIZE: u32 = 64;
const PERF_EVENT_IOC_ENABLE: libc::Ioctl = 0x2400;
const PERF_EVENT_IOC_SET_FILTER: libc::Ioctl = 0x4008_2406;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;

/// Counts `timer_expire_entry` hits for `tcp_keepalive_timer` on every CPU from its creation.
#[derive(Debug)]
pub struct KeepaliveExpiryCount {
    per_cpu: Vec<OwnedFd>,
}

impl KeepaliveExpiryCount {
    /// Opens one counting event per online CPU. Needs root (or CAP_PERFMON) and tracefs, for
    /// the tracepoint's id.
    pub fn start() -> anyhow::Result<Self> {
        let id = tracepoint_id()?;
        // The address the agent's programs filter on, read the way the agent reads it.
        let function = TimerFunctions::from_proc()?.keepalive;
        let filter = std::ffi::CString::new(format!("function == 0x{function:x}"))?;
        // SAFETY: sysconf has no preconditions.
        let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as i32;
        let mut per_cpu = Vec::new();
        for cpu in 0..cpus {
            let mut attr = [0u64; ATTR_SIZE as usize / 8];
            attr[0] = u64::from(PERF_TYPE_TRACEPOINT) | (u64::from(ATTR_SIZE) << 32);
            attr[1] = id;
            // SAFETY: `attr` is a zero-filled perf_event_attr of ATTR_SIZE bytes (counting
            // only: no sampling, enabled at once since `disabled` is 0).
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
                return Err(std::io::Error::last_os_error()).with_context(|| {
                    format!("perf_event_open(timer:timer_expire_entry, cpu {cpu})")
                });
            }
            // SAFETY: a descriptor perf_event_open just returned, owned by nobody else.
            let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
            // SAFETY: the filter is a NUL-terminated string that outlives the call.
            if unsafe { libc::ioctl(fd.as_raw_fd(), PERF_EVENT_IOC_SET_FILTER, filter.as_ptr()) }
                != 0
            {
                return Err(std::io::Error::last_os_error())
                    .context("PERF_EVENT_IOC_SET_FILTER on timer:timer_expire_entry");
            }
            // SAFETY: ioctl on our own perf descriptor.
            if unsafe { libc::ioctl(fd.as_raw_fd(), PERF_EVENT_IOC_ENABLE, 0) } != 0 {
                return Err(std::io::Error::last_os_error()).context("PERF_EVENT_IOC_ENABLE");
            }
            per_cpu.push(fd);
        }
        Ok(Self { per_cpu })
    }

    /// Keepalive timer expiries on all CPUs since [`Self::start`].
    pub fn read(&self) -> anyhow::Result<u64> {
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

fn tracepoint_id() -> anyhow::Result<u64> {
    for root in TRACEFS {
        let path = format!("{root}/{EVENT}");
        if let Ok(text) = std::fs::read_to_string(&path) {
            return text
                .trim()
                .parse()
                .with_context(|| format!("{path}: {text:?}"));
        }
    }
    bail!("tracefs is not mounted (no {EVENT} under {TRACEFS:?})")
}

/// Keepalive expiries the kernel ran none of the agent's programs for, over a window: the perf
/// count against the growth of the agent's `tcp_keepalive_timer_expiries_total` (every
/// namespace, since both count the whole host; a namespace the agent forgets inside the window
/// only makes the figure larger).
#[derive(Debug)]
pub struct ExpiriesNotRun {
    count: KeepaliveExpiryCount,
    seen_before: f64,
}

impl ExpiriesNotRun {
    /// Opens the perf count first, then reads the agent, so the window holds the agent's.
    pub fn open(agent: &crate::Agent) -> anyhow::Result<Self> {
        let count = KeepaliveExpiryCount::start()?;
        let seen_before = agent.scrape()?.value(EXPIRIES, &[] as &[(&str, &str)]);
        Ok(Self { count, seen_before })
    }

    /// Expiries counted by perf since [`Self::open`] that the agent's programs did not see.
    pub fn close(&self, agent: &crate::Agent) -> anyhow::Result<u64> {
        Ok(self.counts(agent)?.not_run())
    }

    /// Both counts since [`Self::open`].
    pub fn counts(&self, agent: &crate::Agent) -> anyhow::Result<ExpiryCounts> {
        let seen = agent.scrape()?.value(EXPIRIES, &[] as &[(&str, &str)]) - self.seen_before;
        let hits = self.count.read()?;
        Ok(ExpiryCounts {
            hits,
            seen: seen.max(0.0) as u64,
        })
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
