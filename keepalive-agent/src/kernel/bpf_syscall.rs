//! The `bpf(2)` commands aya 0.14 does not wrap (a program's test run, the run statistics in
//! its info), for the rooms of `kernel/` that need them, and the tests' profiler (a program's
//! line information and BTF).

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
};

use aya::{
    Ebpf,
    programs::{ProgramError, ProgramFd, RawTracePoint},
};

/// `enum bpf_cmd` in include/uapi/linux/bpf.h (the libc crate does not have it).
pub(crate) const BPF_PROG_TEST_RUN: libc::c_long = 10;
pub const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
pub const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
pub const BPF_BTF_GET_FD_BY_ID: libc::c_long = 19;

/// `bpf(cmd, attr, size_of::<A>())`: the command's non-negative result, or the kernel's error.
///
/// # Safety
/// `attr` must be the prefix of `union bpf_attr` that `cmd` reads, and every pointer in it valid
/// for what `cmd` reads or writes through it.
pub unsafe fn bpf<A>(cmd: libc::c_long, attr: &mut A) -> io::Result<libc::c_long> {
    // SAFETY: the caller's contract; `attr` is alive and exactly `size_of::<A>()` bytes long.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            std::mem::size_of::<A>(),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `union bpf_attr` as `BPF_PROG_TEST_RUN` reads it, up to `cpu` (5.10's layout; the kernel
/// zero-fills what a shorter attribute leaves out).
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
}

/// A test run the kernel refused.
#[derive(Debug, thiserror::Error)]
#[error("BPF_PROG_TEST_RUN on a raw tracepoint program (Linux 5.10+): {0}")]
pub(crate) struct TestRunError(#[source] pub(crate) io::Error);

/// Why a program to test-run could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ProgramLoadError {
    #[error("the kernel programs object has no {0}: agent built from mismatched sources")]
    Missing(&'static str),
    #[error(transparent)]
    Load(ProgramError),
}

/// Loads the raw tracepoint program `name` of `ebpf` (never attached: the verifier checks it
/// now, not at its first run) and returns a descriptor of it to test-run.
pub(crate) fn load_for_test_run(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<ProgramFd, ProgramLoadError> {
    let program: &mut RawTracePoint = ebpf
        .program_mut(name)
        .ok_or(ProgramLoadError::Missing(name))?
        .try_into()
        .map_err(ProgramLoadError::Load)?;
    program.load().map_err(ProgramLoadError::Load)?;
    program
        .fd()
        .and_then(|fd| fd.try_clone().map_err(ProgramError::from))
        .map_err(ProgramLoadError::Load)
}

/// `BPF_F_TEST_RUN_ON_CPU` in include/uapi/linux/bpf.h.
const BPF_F_TEST_RUN_ON_CPU: u32 = 1;

/// Runs a raw tracepoint program once on `cpu` (Linux 5.10+), with `args` as its tracepoint
/// arguments (at most 12). From a thread on another CPU, the kernel runs it there in an
/// interrupt (`smp_call_function_single`), with interrupts off; on the caller's own CPU, in the
/// caller's context.
pub(crate) fn test_run_on_cpu(
    program: BorrowedFd<'_>,
    cpu: u32,
    args: &[u64],
) -> Result<(), TestRunError> {
    run_raw_tracepoint(program, args, Some(cpu))
}

/// Runs a raw tracepoint program once with `BPF_PROG_TEST_RUN` (Linux 5.10+), in the caller's
/// context, with `args` as its tracepoint arguments (at most 12): programs that take their
/// question from a map or `args` and answer in a map.
pub(crate) fn test_run(program: BorrowedFd<'_>, args: &[u64]) -> Result<(), TestRunError> {
    run_raw_tracepoint(program, args, None)
}

/// [`test_run`] and [`test_run_on_cpu`]: one `BPF_PROG_TEST_RUN`, on `cpu` when given
/// (`BPF_F_TEST_RUN_ON_CPU`).
fn run_raw_tracepoint(
    program: BorrowedFd<'_>,
    args: &[u64],
    cpu: Option<u32>,
) -> Result<(), TestRunError> {
    let mut attr = TestRunAttr {
        prog_fd: program.as_raw_fd() as u32,
        ctx_size_in: std::mem::size_of_val(args) as u32,
        ctx_in: if args.is_empty() {
            0
        } else {
            args.as_ptr() as u64
        },
        flags: if cpu.is_some() {
            BPF_F_TEST_RUN_ON_CPU
        } else {
            0
        },
        cpu: cpu.unwrap_or(0),
        ..TestRunAttr::default()
    };
    // SAFETY: `attr` is a valid, initialised `bpf_attr` prefix of the size passed, alive for
    // the call; the kernel reads `ctx_size_in` bytes at `ctx_in`, which is `args`, alive for
    // the call, and no other memory (no data).
    unsafe { bpf(BPF_PROG_TEST_RUN, &mut attr) }
        .map(drop)
        .map_err(TestRunError)
}
