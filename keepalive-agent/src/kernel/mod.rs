//! Everything the agent knows about the running kernel, and the only room that talks to it:
//! struct layout and hook prototypes from BTF ([`layout`]), timer callback addresses
//! ([`kallsyms`]), the tick rate ([`hz`]), whether the node uses IPVS and its TCP timeout
//! ([`ipvs`]), the embedded programs and how they are loaded ([`programs`]), and the audit's
//! walk program ([`hash_walk`]), and the marks of which connections the table may hold
//! ([`tracked`]).
//!
//! A command opens one [`Session`]: the kernel's BTF is read from disk once, parsed once by
//! btf-rs for the layout (then dropped) and once by aya for the loader and every program load.

pub mod bpf_syscall;
pub(crate) mod counter_sweep;
pub mod hash_walk;
pub(crate) mod hooks;
pub(crate) mod hz;
pub(crate) mod ipvs;
pub mod kallsyms;
pub mod kfunc;
pub(crate) mod layout;
pub mod maps;
pub(crate) mod mmapped;
pub(crate) mod netns_slots;
pub mod programs;
pub mod tracked;

use std::path::Path;

use hz::HzError;
use kallsyms::{KallsymsError, TimerFunctions};
use layout::{KernelLayout, LayoutError};
use programs::{KernelPrograms, ProgramsError};

#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionError {
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error("cannot parse the kernel BTF for the program loader ({path}): {0}", path = layout::VMLINUX_BTF_PATH)]
    LoaderBtf(#[source] aya::BtfError),
    #[error("finding the TCP timer callbacks: {0}")]
    Kallsyms(#[from] KallsymsError),
    #[error("measuring the kernel tick rate (CONFIG_HZ): {0}")]
    Hz(#[from] HzError),
}

/// Why a one-off read of IPVS's TCP timeout failed: the programs object did not open, or the
/// IPVS program did not answer. Here rather than in [`ipvs`], which the program loader imports.
#[derive(Debug, thiserror::Error)]
pub(crate) enum IpvsReadError {
    #[error("opening the kernel programs object: {0}")]
    Open(#[source] ProgramsError),
    #[error(transparent)]
    Read(#[from] ipvs::TimeoutError),
}

/// Gives freed heap pages back to the kernel. A BTF parse allocates tens of MiB in small pieces
/// and frees them below longer-lived allocations, where glibc keeps them resident until asked;
/// called after each parse is dropped, so start-up does not hold two parses' worth at once.
pub(crate) fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim has no preconditions; it only returns free pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Why [`open_programs`] failed.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct OpenProgramsError(#[from] OpenFailure);

#[derive(Debug, thiserror::Error)]
enum OpenFailure {
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error(transparent)]
    Programs(#[from] ProgramsError),
}

/// The programs object prepared with this kernel's offsets and timer callbacks, with nothing
/// loaded: for benchmarks, which load from it the programs they measure with. Its ring buffer
/// ([`programs::RECORDS_MAP`]) holds `ring_buffer_bytes` (a power of two, at least a page);
/// [`programs::MIN_RING_BUFFER_BYTES`] where nothing writes to it.
pub fn open_programs(ring_buffer_bytes: u32) -> Result<aya::Ebpf, OpenProgramsError> {
    let session = |e: SessionError| OpenProgramsError(OpenFailure::Session(e));
    let bytes = layout::read_vmlinux_btf().map_err(|e| session(e.into()))?;
    let layout = KernelLayout::from_btf_bytes(&bytes).map_err(|e| session(e.into()))?;
    let timers = TimerFunctions::from_proc().map_err(|e| session(e.into()))?;
    let btf = aya::Btf::parse(&bytes, aya::Endianness::default())
        .map_err(|e| session(SessionError::LoaderBtf(e)))?;
    programs::open(
        &layout,
        &timers,
        &btf,
        ring_buffer_bytes,
        programs::CloseReports::KeepaliveOn,
    )
    .map_err(|e| OpenProgramsError(OpenFailure::Programs(e)))
}

/// The running kernel as the commands need it, read once.
pub(crate) struct Session {
    pub(crate) layout: KernelLayout,
    pub(crate) timers: TimerFunctions,
    /// CONFIG_HZ: receive stamps and keepalive settings are in jiffies.
    pub(crate) hz: u32,
    /// Handed to aya's loader and to every program load, so aya does not parse it again.
    btf: aya::Btf,
}

impl Session {
    /// Reads the kernel's BTF, the timer callbacks and the tick rate (from `timer_list`).
    /// Blocking: measuring HZ takes a second.
    pub(crate) fn open(timer_list: &Path) -> Result<Self, SessionError> {
        let bytes = layout::read_vmlinux_btf()?;
        let layout = KernelLayout::from_btf_bytes(&bytes)?;
        release_freed_memory();
        let timers = TimerFunctions::from_proc()?;
        let hz = hz::kernel_hz_from(timer_list)?;
        Self::new(&bytes, layout, timers, hz)
    }

    /// A session from parts already read (`check` reads them one by one to report each):
    /// `btf` is the raw BTF `layout` was computed from.
    pub(crate) fn new(
        btf: &[u8],
        layout: KernelLayout,
        timers: TimerFunctions,
        hz: u32,
    ) -> Result<Self, SessionError> {
        let btf =
            aya::Btf::parse(btf, aya::Endianness::default()).map_err(SessionError::LoaderBtf)?;
        Ok(Self {
            layout,
            timers,
            hz,
            btf,
        })
    }

    /// Every hook attached, the audit's walk, the IPVS read and (if asked) the counter sweep
    /// loaded, the maps taken. Possible
    /// idle kills without keepalive are not sent until [`KernelPrograms::idle_kill_filter`] is
    /// set.
    pub(crate) fn load(
        &self,
        ring_buffer_bytes: u32,
        closes: programs::CloseReports,
        sweep: programs::SweepProgram,
    ) -> Result<KernelPrograms, ProgramsError> {
        programs::load(
            &self.layout,
            &self.timers,
            &self.btf,
            ring_buffer_bytes,
            closes,
            sweep,
        )
    }

    /// IPVS's TCP established timeout in the host's network namespace, read once by the IPVS
    /// program ([`ipvs::IpvsProgram`]), for commands that do not keep the programs loaded.
    pub(crate) fn ipvs_tcp_timeout(&self) -> Result<ipvs::TcpTimeout, IpvsReadError> {
        let mut ebpf = self.open_for_one_off().map_err(IpvsReadError::Open)?;
        Ok(ipvs::IpvsProgram::load(&mut ebpf)?.read()?)
    }

    /// Only the audit's walk, for a one-off audit: nothing is attached to a hook.
    pub(crate) fn load_audit_only(&self) -> Result<hash_walk::HashWalk, ProgramsError> {
        let mut ebpf = self.open_for_one_off()?;
        // The walk holds its own program descriptor and maps: the object can go.
        programs::load_audit(&mut ebpf)
    }

    /// The programs object with nothing loaded and the smallest ring buffer, for a command
    /// that runs one program and reads no records.
    fn open_for_one_off(&self) -> Result<aya::Ebpf, ProgramsError> {
        programs::open(
            &self.layout,
            &self.timers,
            &self.btf,
            programs::MIN_RING_BUFFER_BYTES,
            programs::CloseReports::KeepaliveOn,
        )
    }
}

/// `seconds` in jiffies of a `hz` kernel, at least 1 (0 means "off" to the programs) and at
/// most `u32::MAX` (the 32-bit stamps the programs compare).
pub(crate) fn seconds_to_jiffies(seconds: f64, hz: u32) -> u32 {
    (seconds * f64::from(hz)).clamp(1.0, f64::from(u32::MAX)) as u32
}
