//! The keepalive configuration audit's walks of every TCP socket: `iter/task_file` (5.11+, every
//! socket with a file in every namespace, from one iterator) and `iter/tcp` (the fallback: one
//! namespace per iterator).

use aya_ebpf::helpers::generated::{bpf_seq_write, bpf_sock_from_file};
use keepalive_ebpf::{AF_INET, AF_INET6, IPPROTO_TCP, RecordKind, SocketRecord, tcp_state};

use crate::socket::{read, snapshot};

/// Appends one record to the iterator's seq file; the agent reads them from the iterator's
/// file descriptor.
#[inline(always)]
fn write(meta: *const u64, rec: &SocketRecord) {
    // SAFETY: `meta->seq` is the first member of `struct bpf_iter_meta` (trusted pointer), and
    // the record lives on this stack for the duration of the call.
    unsafe {
        let seq = *meta as *mut aya_ebpf::bindings::seq_file;
        bpf_seq_write(seq, (&raw const *rec).cast(), SocketRecord::SIZE as u32);
    }
}

/// Time-wait and request sockets are not full TCP sockets: nothing keepalive-related in them.
#[inline(always)]
fn is_full_socket(rec: &SocketRecord) -> bool {
    !matches!(rec.state, tcp_state::TIME_WAIT | tcp_state::NEW_SYN_RECV)
}

/// `iter/tcp`: called once per TCP socket of the iterator creator's namespace, then once with a
/// NULL socket. Context: `struct bpf_iter__tcp { meta; sk_common; uid }`.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub(crate) fn audit_tcp(ctx: *mut core::ffi::c_void) -> i32 {
    let ctx = ctx as *const u64;
    // SAFETY: the verifier checks both context loads against `struct bpf_iter__tcp`.
    let (meta, sk) = unsafe { (*ctx as *const u64, *ctx.add(1) as *const u8) };
    if sk.is_null() {
        return 0;
    }
    let mut rec = SocketRecord {
        kind: RecordKind::Audit as u8,
        ..SocketRecord::default()
    };
    if snapshot(sk, &mut rec).is_err() || !is_full_socket(&rec) {
        return 0;
    }
    write(meta, &rec);
    0
}

/// `iter/task_file`: called once per open file of every process (threads sharing their leader's
/// file table are skipped by the kernel, `task_seq_get_next(.., skip_if_dup_files)`), then once
/// with NULLs. Context: `struct bpf_iter__task_file { meta; task; fd; file }`, each member in an
/// 8-byte slot. Unlike `iter/tcp` it is not tied to the creator's network namespace, so one
/// walk covers them all without setns; it is tied to the creator's PID namespace (the kernel
/// walks the tasks `task_active_pid_ns(current)` can see).
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task_file")]
pub(crate) fn audit_task_file(ctx: *mut core::ffi::c_void) -> i32 {
    let ctx = ctx as *const u64;
    // SAFETY: the verifier checks these context loads against `struct bpf_iter__task_file`
    // (meta at 0, task at 8, fd at 16, file at 24).
    let (meta, task, file) = unsafe {
        (
            *ctx as *const u64,
            *ctx.add(1) as *const u8,
            *ctx.add(3) as *mut aya_ebpf::bindings::file,
        )
    };
    if task.is_null() || file.is_null() {
        return 0;
    }
    // SAFETY: `file` is the context's trusted, non-NULL `struct file *` the helper requires;
    // it returns NULL for anything that is not a socket (`sock_from_file` checks `f_op`).
    let socket = unsafe { bpf_sock_from_file(file) } as *const u8;
    if socket.is_null() {
        return 0;
    }
    let Ok(sk) = read::<u64>(socket, offset!(socket_sk)) else {
        return 0;
    };
    let sk = sk as *const u8;
    if sk.is_null() {
        return 0;
    }
    // Only TCP over IPv4/IPv6 (not MPTCP's own socket, not raw or UDP sockets).
    match (
        read::<u16>(sk, offset!(sk_protocol)),
        read::<u16>(sk, offset!(skc_family)),
    ) {
        (Ok(IPPROTO_TCP), Ok(AF_INET | AF_INET6)) => {}
        _ => return 0,
    }
    let mut rec = SocketRecord {
        kind: RecordKind::Audit as u8,
        ..SocketRecord::default()
    };
    if snapshot(sk, &mut rec).is_err() || !is_full_socket(&rec) {
        return 0;
    }
    rec.pid = read::<u32>(task, offset!(task_tgid)).unwrap_or(0);
    rec.comm = read::<[u8; 16]>(task, offset!(task_comm)).unwrap_or([0; 16]);
    write(meta, &rec);
    0
}
