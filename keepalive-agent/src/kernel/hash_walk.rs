//! The audit's program: a walk of the kernel's TCP hash tables (`tcp_hashinfo`), which hold
//! every TCP socket of every network namespace. It is loaded like the hooks but never attached:
//! the agent runs it on demand with `BPF_PROG_TEST_RUN`, one bounded run at a time, each
//! continuing where the last one stopped ([`AuditCursor`]). What a walk does with the records
//! is `crate::audit::walk`.

use std::os::fd::AsFd as _;

use aya::{
    Ebpf,
    maps::{Array, MapData, RingBuf},
    programs::ProgramFd,
};
use keepalive_ebpf::{AuditCursor, names};

use crate::kernel::{
    bpf_syscall::{ProgramLoadError, TestRunError, load_for_test_run, test_run},
    maps::{TakeMapError, take_map},
};

/// What a kernel needs for the walk, for `check` and the start-up log.
pub(crate) const DESCRIPTION: &str = "a walk of the kernel's TCP hash tables (tcp_hashinfo: \
     established and listening), run with BPF_PROG_TEST_RUN: every TCP socket of every network \
     namespace, whatever the agent's own network and PID namespace; needs CAP_BPF+CAP_PERFMON";

/// The loaded walk program, its cursor and its record buffer. Holds its own program descriptor,
/// so it stays usable however long the rest of the programs object lives.
pub(crate) struct HashWalk {
    program: ProgramFd,
    cursor: Array<MapData, AuditCursor>,
    /// Records of the latest run, drained by the caller before the next one.
    pub(crate) records: RingBuf<MapData>,
}

impl std::fmt::Debug for HashWalk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HashWalk").finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Program(#[from] ProgramLoadError),
    #[error(transparent)]
    Map(#[from] TakeMapError),
}

/// Loads the walk program into the kernel (the verifier checks it now, not at the first audit)
/// and takes its maps out of `ebpf`.
pub(crate) fn load(ebpf: &mut Ebpf) -> Result<HashWalk, LoadError> {
    let program = load_for_test_run(ebpf, names::AUDIT_PROGRAM)?;
    Ok(HashWalk {
        program,
        cursor: take_map(ebpf, names::AUDIT_CURSOR_MAP)?,
        records: take_map(ebpf, names::AUDIT_RECORDS_MAP)?,
    })
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum RunError {
    #[error("setting the audit cursor: {0}")]
    SetCursor(#[source] aya::maps::MapError),
    #[error("reading the audit cursor: {0}")]
    GetCursor(#[source] aya::maps::MapError),
    #[error("running the audit program: {0}")]
    TestRun(#[source] TestRunError),
}

impl HashWalk {
    /// One run from `cursor`: returns the cursor as the program left it. The records it wrote
    /// are in [`Self::records`].
    pub(crate) fn run(&mut self, cursor: AuditCursor) -> Result<AuditCursor, RunError> {
        self.cursor.set(0, cursor, 0).map_err(RunError::SetCursor)?;
        test_run(self.program.as_fd(), &[]).map_err(RunError::TestRun)?;
        self.cursor.get(&0, 0).map_err(RunError::GetCursor)
    }
}
