//! The `bpf(2)` commands aya 0.14 does not wrap (a program's test run, the run statistics in
//! its info), for the rooms of `kernel/` that need them.

use std::io;

/// `enum bpf_cmd` in include/uapi/linux/bpf.h (the libc crate does not have it).
pub(crate) const BPF_PROG_TEST_RUN: libc::c_long = 10;
pub(crate) const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// `bpf(cmd, attr, size_of::<A>())`: the command's non-negative result, or the kernel's error.
///
/// # Safety
/// `attr` must be the prefix of `union bpf_attr` that `cmd` reads, and every pointer in it valid
/// for what `cmd` reads or writes through it.
pub(crate) unsafe fn bpf<A>(cmd: libc::c_long, attr: &mut A) -> io::Result<libc::c_long> {
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
