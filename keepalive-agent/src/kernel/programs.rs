//! Loads the embedded kernel programs with this kernel's offsets and attaches them.
//!
//! Every hook is a BTF tracepoint (`tp_btf`): stable kernel ABI, no tracefs, and allowed where
//! fentry/fexit are refused (EPERM under lockdown) and kprobes are not built. The agent has no
//! fentry or kprobe variants to fall back from; it logs once which hooks it attached.

use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, RingBuf},
    programs::{BtfTracePoint, ProgramError, ProgramFd},
};
use keepalive_ebpf::{NetnsCounters, NetnsKey, SNAPSHOT_SCRATCH_BYTES, SocketRecord, names};
use log::{info, warn};

pub use crate::kernel::hooks::{HOOKS, Hook};
use crate::kernel::{
    bpf_syscall::{BPF_OBJ_GET_INFO_BY_FD, bpf},
    counter_sweep::{CounterSweep, UNSWEPT},
    hash_walk::{self, HashWalk},
    ipvs::IpvsProgram,
    kallsyms::TimerFunctions,
    kfunc,
    layout::KernelLayout,
    maps::{TakeMapError, take_map},
    mmapped::MmapError,
    netns_slots::NetnsSlotsMap,
    tracked::TrackedMarksMap,
};

/// The kernel programs, compiled for this agent by build.rs.
pub static PROGRAMS_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/keepalive-ebpf"));

pub const PROGRAM_TYPE: &str = "tp_btf";

/// The program that attaches to a hook on a given kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Variant {
    /// Its name in the programs object.
    pub(crate) program: &'static str,
    /// Why this one, for `check` and the start-up log.
    pub(crate) why: &'static str,
    /// The program loaded instead if the kernel refuses this one.
    pub(crate) fallback: Option<&'static str>,
}

/// Why the timer programs read the socket with helper calls.
const HELPER_READS: &str = "the socket read with helper calls (no bpf_rdonly_cast before 6.2)";

impl Hook {
    /// The variant that loads on this kernel, from the tracepoint's BTF prototype; `None`
    /// when the kernel has no such tracepoint.
    pub(crate) fn variant(&self, layout: &KernelLayout) -> Option<Variant> {
        if !layout.tracepoints.contains(&self.tracepoint) {
            return None;
        }
        let typed = |program, fallback| {
            if layout.rdonly_cast.is_some() {
                Variant {
                    program,
                    why: "the socket read with typed loads (bpf_rdonly_cast, 6.2+)",
                    fallback: Some(fallback),
                }
            } else {
                Variant {
                    program: fallback,
                    why: HELPER_READS,
                    fallback: None,
                }
            }
        };
        Some(match self.tracepoint {
            "timer_expire_entry" => typed("timer_expire_entry_typed", "timer_expire_entry"),
            "timer_expire_exit" => typed("timer_expire_exit_typed", "timer_expire_exit"),
            "tcp_send_reset" if layout.send_reset_reason => Variant {
                program: "tcp_send_reset",
                why: "prototype (sk, skb, reason), 6.10+",
                fallback: None,
            },
            // Reading a third argument would be refused by the verifier.
            "tcp_send_reset" => Variant {
                program: "tcp_send_reset_without_reason",
                why: "prototype (sk, skb) before 6.10: resets without their reason",
                fallback: None,
            },
            tracepoint => Variant {
                program: tracepoint,
                why: "one prototype on every supported kernel",
                fallback: None,
            },
        })
    }
}

/// The smallest ring buffer the kernel accepts (one page), for commands that never read it.
pub const MIN_RING_BUFFER_BYTES: u32 = 4096;

/// An empty program on `timer_expire_entry`, for benchmarks only.
pub const BASELINE_PROGRAM: &str = "timer_entry_baseline";
/// Benchmarks only: on `timer_expire_entry`, one typed load from a keepalive expiry's socket
/// and nothing else (needs the agent's prepared object: the keepalive callback's address and
/// the typed cast).
pub const SOCKET_LOAD_PROGRAM: &str = "timer_entry_socket_load";
/// An empty program on `inet_sock_set_state`, for benchmarks only.
pub const CLOSE_BASELINE_PROGRAM: &str = "close_baseline";
/// Benchmarks only: starts timing a keepalive expiry on `timer_expire_entry`
/// ([`keepalive_ebpf::ExpirySpan`]).
pub const EXPIRY_SPAN_IN_PROGRAM: &str = "expiry_span_in";
/// Benchmarks only: ends it on `timer_expire_exit`.
pub const EXPIRY_SPAN_OUT_PROGRAM: &str = "expiry_span_out";
/// Benchmarks only: the per-CPU [`keepalive_ebpf::ExpirySpan`] sums.
pub const EXPIRY_SPAN_MAP: &str = "EXPIRY_SPAN";
/// Benchmarks only: on `inet_sock_set_state`, a zeroed close record per TCP close written into
/// the ring buffer as the agent writes one ([`RECORDS_MAP`]).
pub const RECORD_RING_PROGRAM: &str = "close_record_ring";
/// The ring buffer the programs write records to (its size: [`open_programs`]).
///
/// [`open_programs`]: super::open_programs
pub const RECORDS_MAP: &str = names::EVENTS_MAP;
/// Benchmarks only: the same record per TCP close reserved in the ring buffer and written there.
pub const RECORD_RESERVE_PROGRAM: &str = "close_record_reserve";
/// Benchmarks only: the same record per TCP close written in place into this CPU's
/// [`keepalive_ebpf::RecordSlots`] ([`RECORD_SLOTS_MAP`]), as a per-CPU ring would.
pub const RECORD_SLOT_PROGRAM: &str = "close_record_slot";
pub const RECORD_SLOTS_MAP: &str = "RECORD_SLOTS";
/// Benchmarks only: keepalive expiries counted by a classic (perf-event) tracepoint program on
/// `timer:timer_expire_entry`, into the per-CPU `u64` of [`EXPIRY_CLASSIC_MAP`].
pub const EXPIRY_CLASSIC_PROGRAM: &str = "expiry_count_classic";
pub const EXPIRY_CLASSIC_MAP: &str = "EXPIRY_CLASSIC";
/// Tests only: moves to `TCP_CLOSE` of sockets with a port in [`CLOSE_CLASSIC_PORTS_MAP`] (an
/// array of two `u16`, host order, 0 for none), counted by a classic tracepoint program on
/// `sock:inet_sock_set_state` into the per-CPU `u64` of [`CLOSE_CLASSIC_MAP`].
pub const CLOSE_CLASSIC_PROGRAM: &str = "close_count_classic";
pub const CLOSE_CLASSIC_MAP: &str = "CLOSE_CLASSIC";
pub const CLOSE_CLASSIC_PORTS_MAP: &str = "CLOSE_CLASSIC_PORTS";

#[derive(Debug, thiserror::Error)]
pub enum ProgramsError {
    #[error(
        "loading the kernel programs failed (needs root or CAP_BPF+CAP_PERFMON, and a kernel with BTF): {0}"
    )]
    Load(#[source] aya::EbpfError),
    #[error("cannot prepare the typed timer programs: {0}")]
    Kfunc(#[from] kfunc::PatchError),
    #[error("cannot load the audit's hash-table walk program: {0}")]
    LoadAudit(#[source] hash_walk::LoadError),
    #[error(transparent)]
    TakeMap(#[from] TakeMapError),
    #[error(transparent)]
    Mmap(#[from] MmapError),
    #[error(
        "the socket fields the programs read end {0} bytes into struct tcp_sock on this kernel, \
         beyond the programs' {SNAPSHOT_SCRATCH_BYTES}-byte copy: report this kernel version \
         so the copy can grow"
    )]
    SocketTooLarge(u32),
    #[error("the kernel programs object has no {0}: agent built from mismatched sources")]
    Missing(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error(
        "this kernel has no tracepoint {hook} (no btf_trace_{hook} in its BTF), needed for {role}"
    )]
    Absent {
        hook: &'static str,
        role: &'static str,
    },
    #[error("cannot attach to tracepoint {hook} ({role}): {source}")]
    Attach {
        hook: &'static str,
        role: &'static str,
        #[source]
        source: ProgramError,
    },
}

#[derive(Debug)]
pub struct HookStatus {
    pub hook: Hook,
    pub attached: bool,
    /// Why it did not attach.
    pub(crate) error: Option<String>,
    /// The attached program, for what the kernel counts of its runs ([`recursion_misses`]).
    pub(crate) program: Option<ProgramFd>,
    /// Its name in the programs object (which variant attached); empty when none did.
    pub program_name: &'static str,
}

/// How many times the kernel skipped the program behind `fd` because it was already running on
/// that CPU (`bpf_prog_info.recursion_misses`, 5.12+): hook hits it never saw. `None` on
/// kernels that do not report it.
pub fn recursion_misses(fd: &ProgramFd) -> std::io::Result<Option<u64>> {
    use std::os::fd::{AsFd, AsRawFd};
    // `struct bpf_prog_info` up to `recursion_misses` (byte 208, added in 5.12): the kernel
    // fills what it has of the length given and reports how much that was.
    const RECURSION_MISSES: usize = 208 / 8;
    let mut info = [0u64; RECURSION_MISSES + 1];
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut attr = InfoAttr {
        bpf_fd: fd.as_fd().as_raw_fd() as u32,
        info_len: std::mem::size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: `attr` is `union bpf_attr`'s `info` member; the kernel writes at most `info_len`
    // bytes to `info`, which is that long.
    unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) }?;
    Ok(((attr.info_len as usize) > RECURSION_MISSES * 8).then_some(info[RECURSION_MISSES]))
}

pub struct KernelPrograms {
    /// Keeps programs and links alive.
    pub ebpf: Ebpf,
    pub hooks: Vec<HookStatus>,
    /// The audit's walk (see `crate::audit::walk`); `None`: audit off.
    pub(crate) audit: Option<HashWalk>,
    /// The read of IPVS's TCP timeout; `None` when it did not load (logged).
    pub(crate) ipvs: Option<IpvsProgram>,
    /// The sweep that counts probes of unrun expiries no later expiry counts; `None` when it
    /// did not load (logged). `run` starts it.
    pub(crate) counter_sweep: Option<CounterSweep>,
    /// The smallest node-wide threshold, below which the close program does not send a drop
    /// without keepalive as a possible idle kill.
    pub(crate) idle_kill_filter: IdleKillFilter,
    pub events: RingBuf<MapData>,
    pub reserve_failures: PerCpuArray<MapData, u64>,
    /// The exact per-namespace counters and the count of namespaces that found them full.
    pub netns_counters: NetnsCounterMaps,
    /// Which connections the table may hold, for the close program; renewed by `run`.
    pub tracked: TrackedMarksMap,
}

/// [`names::NETNS_COUNTERS_MAP`], [`names::NETNS_SLOTS_MAP`], [`names::NETNS_INSERTS_MAP`],
/// [`names::NETNS_COUNTERS_FULL_MAP`] and [`names::UNCOUNTED_MAP`].
pub struct NetnsCounterMaps {
    pub counters: HashMap<MapData, NetnsKey, NetnsCounters>,
    pub(crate) slots: NetnsSlotsMap,
    pub inserts: PerCpuArray<MapData, u64>,
    pub full: PerCpuArray<MapData, u64>,
    pub uncounted: PerCpuArray<MapData, u64>,
}

/// [`names::IDLE_KILL_JIFFIES_MAP`].
pub(crate) struct IdleKillFilter(Array<MapData, u32>);

impl IdleKillFilter {
    /// `smallest`: the smallest node-wide middlebox idle timeout, `None` for none (then only
    /// each namespace's conntrack timeout makes a drop without keepalive a possible idle kill).
    pub(crate) fn set(&mut self, smallest: Option<f64>, hz: u32) -> Result<(), MapError> {
        let jiffies = smallest.map_or(0, |seconds| super::seconds_to_jiffies(seconds, hz));
        self.0.set(0, jiffies, 0)
    }
}

impl KernelPrograms {
    pub fn all_required_attached(&self) -> bool {
        self.hooks.iter().all(|s| s.attached || !s.hook.required)
    }
}

/// Which closes (and keepalive expiries without a probe) the kernel programs send to the agent.
/// Every close and expiry is counted in the kernel either way (`tcp_connection_drops_total`
/// and `tcp_keepalive_timer_expiries_total` stay exact).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloseReports {
    /// Only closes of connections with `SO_KEEPALIVE` the agent's table may hold (they probed:
    /// see `TrackedMarks`), keepalive drops, and drops that may be idle kills: a connection
    /// without keepalive never probed, nor did one the table does not hold, so nothing in the
    /// agent waits for their closes but a per-connection drop series. Under connection churn
    /// (RST closes of short connections, with keepalive or not) this keeps the agent idle.
    /// Likewise an expiry that neither probed nor found probes unanswered (traffic flowing) is
    /// sent only for a connection the table may hold.
    KeepaliveOn,
    /// Every close the programs report, and every keepalive expiry (per-connection series of
    /// every drop, the event stream, aggregates by workload).
    All,
}

/// Whether [`load`] loads the counter sweep's program (and checks its guard, a verifier pass
/// and one run): only a command that runs the sweep needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SweepProgram {
    Load,
    /// `watch`, and `run --netns.counter-sweep-interval off`.
    Skip,
}

/// Creates the maps and prepares the programs with this kernel's offsets; loads nothing into
/// the kernel's program table yet.
pub(crate) fn open(
    layout: &KernelLayout,
    timers: &TimerFunctions,
    btf: &Btf,
    ring_buffer_bytes: u32,
    closes: CloseReports,
) -> Result<Ebpf, ProgramsError> {
    // No kernel reports u32::MAX as a reset reason: the close program's comparison never
    // matches where the kernel has no keepalive reason.
    let keepalive_rst_reason = layout.rst_reason_keepalive_timeout.unwrap_or(u32::MAX);
    let wakeup_records = wakeup_records(ring_buffer_bytes, program_cpus());
    let snapshot_bytes = layout.offsets.snapshot_bytes();
    if snapshot_bytes > SNAPSHOT_SCRATCH_BYTES {
        return Err(ProgramsError::SocketTooLarge(snapshot_bytes));
    }
    let snapshot_regions = layout.offsets.snapshot_regions();
    let expiry_regions = layout.offsets.expiry_regions();
    let report_keepalive_off = u8::from(closes == CloseReports::All);
    // The typed timer programs' kfunc calls, rewritten for this kernel (see `kfunc`); where the
    // kernel has no `bpf_rdonly_cast` they stay helper calls no kernel has, in programs that
    // are not loaded.
    let (object, tcp_sock_btf_id) = match layout.rdonly_cast {
        Some(cast) => (
            std::borrow::Cow::Owned(kfunc::patch(PROGRAMS_OBJECT, cast.func)?.0),
            cast.tcp_sock,
        ),
        None => (std::borrow::Cow::Borrowed(PROGRAMS_OBJECT), 0),
    };
    // aya 0.14's `EbpfLoader::new` parses the kernel BTF itself; handing it ours frees that
    // copy at once, and every later program load reuses ours.
    EbpfLoader::new()
        .btf(Some(btf))
        .override_global(names::OFFSETS_GLOBAL, &layout.offsets, true)
        .override_global(names::KEEPALIVE_TIMER_FN_GLOBAL, &timers.keepalive, true)
        .override_global(names::WRITE_TIMER_FN_GLOBAL, &timers.write, true)
        .override_global(
            names::KEEPALIVE_RST_REASON_GLOBAL,
            &keepalive_rst_reason,
            true,
        )
        .override_global(names::WAKEUP_RECORDS_GLOBAL, &wakeup_records, true)
        .override_global(
            names::REPORT_KEEPALIVE_OFF_GLOBAL,
            &report_keepalive_off,
            true,
        )
        .override_global(names::SNAPSHOT_REGIONS_GLOBAL, &snapshot_regions, true)
        .override_global(names::EXPIRY_REGIONS_GLOBAL, &expiry_regions, true)
        .override_global(names::TCP_SOCK_BTF_ID_GLOBAL, &tcp_sock_btf_id, true)
        .map_max_entries(names::EVENTS_MAP, ring_buffer_bytes)
        .load(&object)
        .map_err(ProgramsError::Load)
}

/// Records each CPU submits before one wakes the agent at once: together, the CPUs have then
/// filled at most a quarter of the ring (counting every record at the largest size, with its
/// 8-byte header), so a burst has three quarters left while the agent wakes; below it the
/// agent's poll timer ([`crate::record::ring_reader::POLL_INTERVAL`]) reads the records.
pub(crate) fn wakeup_records(ring_buffer_bytes: u32, cpus: u32) -> u64 {
    let largest = (SocketRecord::SIZE + RINGBUF_HEADER_BYTES) as u64;
    (u64::from(ring_buffer_bytes / 4) / largest / u64::from(cpus.max(1))).max(1)
}

/// The ring buffer's header before each record (`BPF_RINGBUF_HDR_SZ`).
const RINGBUF_HEADER_BYTES: usize = 8;

/// CPUs running programs now (each has its own count, see [`wakeup_records`]). Online, not
/// possible: a VM with room for hot-plugged CPUs lists far more possible CPUs than it runs,
/// which would wake the agent every few records; a CPU brought online later only lets the
/// ring fill a little past a quarter before a wakeup. The possible CPUs if the online list
/// cannot be read, and 1024 if neither can, which only makes wakeups more frequent.
fn program_cpus() -> u32 {
    let count = aya::util::online_cpus()
        .map(|cpus| cpus.len())
        .or_else(|_| aya::util::nr_cpus());
    count
        .ok()
        .and_then(|n| u32::try_from(n).ok())
        .filter(|&n| n > 0)
        .unwrap_or(1024)
}

/// Loads the audit's walk ([`hash_walk`]).
pub(crate) fn load_audit(ebpf: &mut Ebpf) -> Result<HashWalk, ProgramsError> {
    hash_walk::load(ebpf).map_err(ProgramsError::LoadAudit)
}

/// Everything the agent runs: every hook attached, the audit iterator loaded, the maps taken.
pub(crate) fn load(
    layout: &KernelLayout,
    timers: &TimerFunctions,
    btf: &Btf,
    ring_buffer_bytes: u32,
    closes: CloseReports,
    sweep: SweepProgram,
) -> Result<KernelPrograms, ProgramsError> {
    let mut ebpf = open(layout, timers, btf, ring_buffer_bytes, closes)?;

    match aya_log::EbpfLogger::init(&mut ebpf) {
        Ok(logger) => spawn_kernel_log(logger),
        Err(err) => warn!("kernel-side diagnostics unavailable: {err}"),
    }

    let audit = match load_audit(&mut ebpf) {
        Ok(walk) => {
            info!("keepalive configuration audit: {}", hash_walk::DESCRIPTION);
            Some(walk)
        }
        Err(err) => {
            warn!("{err}; the keepalive configuration audit is off");
            None
        }
    };
    let mut hooks = Vec::with_capacity(HOOKS.len());
    for hook in HOOKS {
        let variant = hook.variant(layout);
        let attached = match (attach(&mut ebpf, btf, hook, variant), variant) {
            (
                Err(err),
                Some(Variant {
                    fallback: Some(fallback),
                    ..
                }),
            ) => {
                warn!("{err}; loading {fallback} instead");
                attach(
                    &mut ebpf,
                    btf,
                    hook,
                    Some(Variant {
                        program: fallback,
                        why: "the kernel refused the typed variant: the socket read with helper \
                              calls",
                        fallback: None,
                    }),
                )
            }
            (attached, _) => attached,
        };
        match attached {
            Ok(variant) => {
                info!(
                    "attached {} as {PROGRAM_TYPE} with {} ({}): {}",
                    hook.tracepoint, variant.program, variant.why, hook.role
                );
                let program = ebpf
                    .program(variant.program)
                    .and_then(|program| program.fd().ok())
                    .and_then(|fd| fd.try_clone().ok());
                hooks.push(HookStatus {
                    hook,
                    attached: true,
                    error: None,
                    program,
                    program_name: variant.program,
                });
            }
            Err(err) if !hook.required => {
                warn!("{err}; continuing without it");
                hooks.push(HookStatus {
                    hook,
                    attached: false,
                    error: Some(err.to_string()),
                    program: None,
                    program_name: "",
                });
            }
            Err(err) => return Err(err),
        }
    }

    let attached = hooks.iter().filter(|s| s.attached).count();
    info!(
        "{attached}/{} hooks attached as {PROGRAM_TYPE}: BTF tracepoints are stable kernel ABI, need \
         no tracefs, and load where fentry/kprobes are refused; no fentry/kprobe variant is used",
        hooks.len()
    );

    let ipvs = match IpvsProgram::load(&mut ebpf) {
        Ok(program) => Some(program),
        Err(err) => {
            warn!(
                "{err}; IPVS's TCP timeout cannot be read (the ipvs threshold, if the node uses \
                 IPVS, is its default)"
            );
            None
        }
    };
    let counter_sweep = match sweep {
        SweepProgram::Skip => None,
        SweepProgram::Load => match CounterSweep::load(&mut ebpf) {
            Ok(sweep) => Some(sweep),
            Err(err) => {
                warn!("{err}; {UNSWEPT}");
                None
            }
        },
    };
    let idle_kill_filter = IdleKillFilter(take_map(&mut ebpf, names::IDLE_KILL_JIFFIES_MAP)?);
    let events: RingBuf<MapData> = take_map(&mut ebpf, names::EVENTS_MAP)?;
    let reserve_failures = take_map(&mut ebpf, names::RESERVE_FAILURES_MAP)?;
    let counters = take_map(&mut ebpf, names::NETNS_COUNTERS_MAP)?;
    let slots = NetnsSlotsMap::take(&mut ebpf)?;
    let inserts = take_map(&mut ebpf, names::NETNS_INSERTS_MAP)?;
    let full = take_map(&mut ebpf, names::NETNS_COUNTERS_FULL_MAP)?;
    let uncounted = take_map(&mut ebpf, names::UNCOUNTED_MAP)?;
    let tracked = TrackedMarksMap::take(&mut ebpf)?;
    Ok(KernelPrograms {
        ebpf,
        hooks,
        audit,
        ipvs,
        counter_sweep,
        idle_kill_filter,
        events,
        reserve_failures,
        netns_counters: NetnsCounterMaps {
            counters,
            slots,
            inserts,
            full,
            uncounted,
        },
        tracked,
    })
}

fn attach(
    ebpf: &mut Ebpf,
    btf: &Btf,
    hook: Hook,
    variant: Option<Variant>,
) -> Result<Variant, ProgramsError> {
    let variant = variant.ok_or(ProgramsError::Absent {
        hook: hook.tracepoint,
        role: hook.role,
    })?;
    let attach_error = |source| ProgramsError::Attach {
        hook: hook.tracepoint,
        role: hook.role,
        source,
    };
    let program: &mut BtfTracePoint = ebpf
        .program_mut(variant.program)
        .ok_or(ProgramsError::Missing(variant.program))?
        .try_into()
        .map_err(attach_error)?;
    program.load(hook.tracepoint, btf).map_err(attach_error)?;
    program.attach().map_err(attach_error)?;
    Ok(variant)
}

fn spawn_kernel_log(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns its ring buffer descriptor for as long as the AsyncFd owns it.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let mut logger = match registered {
        Ok(logger) => logger,
        Err(err) => {
            warn!("kernel-side diagnostics unavailable: {err}");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = logger.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::layout::fixtures::fixture;
    use keepalive_ebpf::SnapshotRegion;

    /// The program each hook loads with on the kernels of the matrix, from their stored BTF.
    fn programs(btf: &str) -> Vec<Option<&'static str>> {
        let layout = fixture(btf);
        HOOKS
            .iter()
            .map(|hook| hook.variant(&layout).map(|v| v.program))
            .collect()
    }

    #[test]
    fn the_snapshot_regions_cover_every_field_within_the_copy_on_every_matrix_kernel() {
        for btf in [
            "5.10.262_5.10.0-46-cloud-amd64.btf.zst",
            "6.1.190_6.1.0-54-cloud-amd64.btf.zst",
            "6.1.192_6.1.0-57-cloud-amd64.btf.zst",
            "6.12.111_6.12.111+deb12-cloud-amd64.btf.zst",
            "6.12.117_6.12.117+deb12-cloud-amd64.btf.zst",
            "6.18.44_6.18.44-fc-v1045.btf.zst",
        ] {
            let offsets = fixture(btf).offsets;
            assert!(offsets.snapshot_bytes() <= SNAPSHOT_SCRATCH_BYTES, "{btf}");
            let full = offsets.snapshot_regions();
            let expiry = offsets.expiry_regions();
            let covered = |regions: &[SnapshotRegion], offset: u32, size: u32| {
                regions
                    .iter()
                    .any(|r| r.start <= offset && offset + size <= r.start + r.len)
            };
            for (regions, fields) in [
                (&full, &offsets.snapshot_fields()[..]),
                (&expiry, &offsets.expiry_fields()[..]),
            ] {
                for &(offset, size) in fields {
                    assert!(
                        covered(regions, offset, size),
                        "{btf}: field at {offset} not copied"
                    );
                }
                assert!(
                    covered(regions, offsets.sk_cgroup, 8)
                        && covered(regions, offsets.sk_socket, 8)
                );
                assert!(
                    offsets.sk_ino == 0 || covered(regions, offsets.sk_ino, 8),
                    "{btf}: sk_ino"
                );
            }
            let bytes = |regions: &[SnapshotRegion]| regions.iter().map(|r| r.len).sum::<u32>();
            // Far less than the whole socket: the point of copying by region.
            assert!(
                bytes(&full) < offsets.snapshot_bytes() / 3,
                "{btf}: {} bytes in {full:?}",
                bytes(&full)
            );
            // An expiry copies less than a full snapshot: what it leaves out lies elsewhere.
            assert!(
                bytes(&expiry) < bytes(&full),
                "{btf}: expiry {expiry:?}, full {full:?}"
            );
            // The exit's one read of the connection (`timer::connection`).
            assert!(
                offsets.skc_daddr == 0 && offsets.skc_dport + 2 <= 16 && offsets.skc_num + 2 <= 16
            );
            // The sysctls' one read (`Copied::keepalive_sysctls`).
            assert_eq!(
                (offsets.net_keepalive_intvl, offsets.net_keepalive_probes),
                (
                    offsets.net_keepalive_time + 4,
                    offsets.net_keepalive_time + 8
                ),
                "{btf}"
            );
        }
    }

    #[test]
    fn the_cpus_wake_the_agent_before_a_quarter_of_the_ring_is_full() {
        let record = (SocketRecord::SIZE + RINGBUF_HEADER_BYTES) as u64;
        for (ring, cpus) in [(1 << 20, 2), (1 << 20, 64), (1 << 24, 1), (4096, 8)] {
            let each = wakeup_records(ring, cpus);
            assert!(each >= 1);
            // Every CPU one record short of waking: at most a quarter of the ring unread.
            if each > 1 {
                assert!((each - 1) * record * u64::from(cpus) <= u64::from(ring / 4));
            }
        }
        // `watch`'s default ring and `run`'s on two CPUs: hundreds or thousands of records per
        // wakeup, not one.
        assert_eq!(wakeup_records(1 << 20, 2), 744);
        assert_eq!(wakeup_records(4 << 20, 2), 2978);
        // A ring too small to share: every record wakes.
        assert_eq!(wakeup_records(4096, 8), 1);
    }

    #[test]
    fn old_kernels_load_the_reset_hook_without_reason_and_the_timer_hooks_without_the_kfunc() {
        let common = |send_reset| {
            vec![
                Some("timer_expire_entry"),
                Some("timer_expire_exit"),
                Some("inet_sock_set_state"),
                Some(send_reset),
                Some("tcp_receive_reset"),
            ]
        };
        let typed = |send_reset| {
            let mut programs = common(send_reset);
            programs[0] = Some("timer_expire_entry_typed");
            programs[1] = Some("timer_expire_exit_typed");
            programs
        };
        let without = "tcp_send_reset_without_reason";
        // bpf_rdonly_cast came with 6.2.
        for old in [
            "5.10.262_5.10.0-46-cloud-amd64.btf.zst",
            "6.1.190_6.1.0-54-cloud-amd64.btf.zst",
            "6.1.192_6.1.0-57-cloud-amd64.btf.zst",
        ] {
            assert_eq!(programs(old), common(without), "{old}");
        }
        for new in [
            "6.12.111_6.12.111+deb12-cloud-amd64.btf.zst",
            "6.12.117_6.12.117+deb12-cloud-amd64.btf.zst",
            "6.18.44_6.18.44-fc-v1045.btf.zst",
        ] {
            assert_eq!(programs(new), typed("tcp_send_reset"), "{new}");
        }
    }

    /// The timer program's per-CPU slots of namespaces (`keepalive_ebpf::counter_slot`): 128
    /// namespaces with consecutive cookies, from any start, get a slot each, and 64 whose
    /// cookies lie 1 to 11 apart (other namespace types created between, on 6.18) never put
    /// more in one set than it has slots, so none pushes another out.
    #[test]
    fn namespaces_created_in_turn_get_slots_of_their_own() {
        use keepalive_ebpf::{COUNTER_SET_SLOTS, COUNTER_SLOTS, counter_slot};
        for first in [1u64, 1_000, 123_456] {
            let slots: std::collections::HashSet<usize> =
                (first..first + 128).map(counter_slot).collect();
            assert!(slots.iter().all(|&slot| slot < COUNTER_SLOTS));
            assert_eq!(slots.len(), 128, "from cookie {first}");
            for apart in 1..=11 {
                let mut per_set = std::collections::HashMap::new();
                for i in 0..64 {
                    let set = counter_slot(first + i * apart) / COUNTER_SET_SLOTS;
                    *per_set.entry(set).or_insert(0) += 1;
                }
                let most = per_set.values().max().copied().unwrap_or(0);
                assert!(
                    most <= COUNTER_SET_SLOTS,
                    "{apart} apart from {first}: {most}"
                );
            }
        }
    }
}
