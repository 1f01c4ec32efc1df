//! Kernel side of keepalive-agent: stable (BTF) tracepoints only, because fentry and kprobes are
//! refused on many locked-down hosts. The data path:
//!
//! - `timer_expire_entry`/`timer_expire_exit` bracket every kernel timer callback. We keep only
//!   `tcp_keepalive_timer` (snapshot the socket at entry, re-read `icsk_probes_out` at exit: a
//!   rise means `tcp_write_wakeup` sent a probe) and `tcp_write_timer` (so an abort can be
//!   attributed to the retransmission/zero-window timer).
//! - `inet_sock_set_state` to `TCP_CLOSE` is the tracepoint inside `tcp_done`; the timer or reset
//!   that was running on this CPU for the same socket says why it closed.
//! - `tcp_send_reset`/`tcp_receive_reset` mark the socket that is about to close on this CPU.
//! - `inet_sk_error_report` on a closed socket carries the error the application sees.
//!
//! Records go to userspace through one ring buffer; a failed reserve is counted per CPU.
#![no_std]
#![no_main]

use aya_ebpf::{
    helpers::{bpf_jiffies64, bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::{btf_tracepoint, map},
    maps::{PerCpuArray, RingBuf},
    programs::BtfTracePointContext,
};
use aya_log_ebpf::warn;
use keepalive_ebpf::{
    AF_INET, AF_INET6, CloseContext, IPPROTO_TCP, KernelOffsets, RecordKind, SocketRecord,
    record_flags, tcp_state,
};

/// Written by the agent before load (`.rodata` is frozen, so the verifier sees constants).
#[unsafe(no_mangle)]
static OFFSETS: KernelOffsets = unsafe { core::mem::zeroed() };
/// Addresses of `tcp_keepalive_timer` and `tcp_write_timer` from `/proc/kallsyms`.
#[unsafe(no_mangle)]
static KEEPALIVE_TIMER_FN: u64 = 0;
#[unsafe(no_mangle)]
static WRITE_TIMER_FN: u64 = 0;

/// Default size; the agent overrides it with `--ring-buffer.bytes`.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

#[map]
static RESERVE_FAILURES: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// The TCP timer callback running on this CPU (timer callbacks do not nest on one CPU).
#[map]
static TIMER_CONTEXT: PerCpuArray<TimerContext> = PerCpuArray::with_max_entries(1, 0);

/// The last reset sent or received on this CPU, consumed by the `TCP_CLOSE` that follows it in
/// `tcp_reset` / `tcp_keepalive_timer` / `tcp_abort`.
#[map]
static RESET_CONTEXT: PerCpuArray<ResetContext> = PerCpuArray::with_max_entries(1, 0);

#[repr(C)]
struct TimerContext {
    /// The `timer_list` being run; 0 when no TCP timer callback is running.
    timer: u64,
    sk: u64,
    /// A `CloseContext` value.
    kind: u8,
    closed: u8,
    /// Write timer: `icsk_pending` and `packets_out` at entry, before an abort purges them.
    write_timer_event: u8,
    packets_out: u32,
    snapshot: SocketRecord,
}

#[repr(C)]
struct ResetContext {
    sk: u64,
    flags: u8,
    reason: u32,
    /// At `tcp_receive_reset`, before `tcp_reset` purges the write queue.
    packets_out: u32,
}

macro_rules! offset {
    ($field:ident) => {
        // SAFETY: reads a field of our own static; volatile so the compiler does not fold the
        // zero initialiser the loader replaces.
        unsafe { core::ptr::read_volatile(&raw const OFFSETS.$field) as usize }
    };
}

#[inline(always)]
fn read<T>(base: *const u8, offset: usize) -> Result<T, i64> {
    // SAFETY: bpf_probe_read_kernel copes with any address; TCP sockets come from a
    // SLAB_TYPESAFE_BY_RCU cache, so a stale pointer reads another socket, never faults.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(offset) as *const T).map_err(i64::from) }
}

/// Copies what the classifier and the metrics need from a `struct tcp_sock`.
#[inline(always)]
fn snapshot(sk: *const u8, rec: &mut SocketRecord) -> Result<(), i64> {
    rec.sk = sk as u64;
    // SAFETY: helpers without preconditions.
    rec.ktime_ns = unsafe { bpf_ktime_get_ns() };
    rec.jiffies = unsafe { bpf_jiffies64() };
    rec.family = read::<u16>(sk, offset!(skc_family))?;
    rec.state = read::<u8>(sk, offset!(skc_state))?;
    rec.local_port = u16::from_be(read::<u16>(sk, offset!(inet_sport))?);
    rec.remote_port = u16::from_be(read::<u16>(sk, offset!(skc_dport))?);
    if rec.family == AF_INET6 {
        rec.local_addr = read::<[u8; 16]>(sk, offset!(skc_v6_rcv_saddr))?;
        rec.remote_addr = read::<[u8; 16]>(sk, offset!(skc_v6_daddr))?;
    } else {
        rec.local_addr = [0; 16];
        rec.remote_addr = [0; 16];
        let local = read::<[u8; 4]>(sk, offset!(skc_rcv_saddr))?;
        let remote = read::<[u8; 4]>(sk, offset!(skc_daddr))?;
        rec.local_addr[..4].copy_from_slice(&local);
        rec.remote_addr[..4].copy_from_slice(&remote);
    }
    let net = read::<u64>(sk, offset!(skc_net))? as *const u8;
    rec.netns = read::<u32>(net, offset!(net_ns_inum))?;
    rec.sysctl_keepalive_time = read::<u32>(net, offset!(net_keepalive_time))?;
    rec.sysctl_keepalive_intvl = read::<u32>(net, offset!(net_keepalive_intvl))?;
    rec.sysctl_keepalive_probes = read::<u8>(net, offset!(net_keepalive_probes))?;

    let sk_flags = read::<u64>(sk, offset!(skc_flags))?;
    rec.flags = 0;
    if sk_flags & (1 << offset!(sock_flag_keepopen)) != 0 {
        rec.flags |= record_flags::KEEPALIVE_ON;
    }
    if sk_flags & (1 << offset!(sock_flag_dead)) != 0 {
        rec.flags |= record_flags::ORPHAN;
    }
    rec.probes_out_before = read::<u8>(sk, offset!(icsk_probes_out))?;
    rec.probes_out_after = rec.probes_out_before;
    rec.user_timeout_ms = read::<u32>(sk, offset!(icsk_user_timeout))?;
    rec.lrcvtime = read::<u32>(sk, offset!(icsk_ack_lrcvtime))?;
    rec.keepalive_time = read::<u32>(sk, offset!(tcp_keepalive_time))?;
    rec.keepalive_intvl = read::<u32>(sk, offset!(tcp_keepalive_intvl))?;
    rec.keepalive_probes = read::<u8>(sk, offset!(tcp_keepalive_probes))?;
    rec.rcv_tstamp = read::<u32>(sk, offset!(tcp_rcv_tstamp))?;
    rec.packets_out = read::<u32>(sk, offset!(tcp_packets_out))?;
    rec.snd_wnd = read::<u32>(sk, offset!(tcp_snd_wnd))?;
    rec.sk_err = read::<i32>(sk, offset!(sk_err))?;
    rec.sk_err_soft = read::<i32>(sk, offset!(sk_err_soft))?;
    // Ownership: both optional (no cgroup data, or an orphan without a file).
    rec.cgroup_id = read::<u64>(sk, offset!(sk_cgroup))
        .and_then(|cgroup| read::<u64>(cgroup as *const u8, offset!(cgroup_kn)))
        .and_then(|kn| read::<u64>(kn as *const u8, offset!(kernfs_node_id)))
        .unwrap_or(0);
    rec.socket_ino = match read::<u64>(sk, offset!(sk_socket)) {
        Ok(0) | Err(_) => 0,
        Ok(socket) => read::<u64>(socket as *const u8, offset!(socket_ino)).unwrap_or(0),
    };
    Ok(())
}

#[inline(always)]
fn emit(rec: &SocketRecord) {
    match EVENTS.reserve::<SocketRecord>(0) {
        Some(mut entry) => {
            entry.write(*rec);
            entry.submit(0);
        }
        None => {
            if let Some(count) = RESERVE_FAILURES.get_ptr_mut(0) {
                // SAFETY: per-CPU slot, and BPF programs are not preempted on their CPU.
                unsafe { *count += 1 };
            }
        }
    }
}

#[btf_tracepoint(function = "timer_expire_entry")]
pub fn timer_expire_entry(ctx: BtfTracePointContext) -> i32 {
    let timer: *const u8 = ctx.arg(0);
    // This hook fires for every kernel timer: one direct load through the BTF-typed pointer and
    // two compares decide, without a helper call.
    let function_offset = offset!(timer_function);
    // SAFETY: the verifier checks this load against `struct timer_list`.
    let function = unsafe { core::ptr::read_volatile(timer.add(function_offset) as *const u64) };
    // SAFETY: reads of our own statics (see `offset!`).
    let (keepalive_fn, write_fn) = unsafe {
        (
            core::ptr::read_volatile(&raw const KEEPALIVE_TIMER_FN),
            core::ptr::read_volatile(&raw const WRITE_TIMER_FN),
        )
    };
    let (kind, timer_offset) = if function == keepalive_fn {
        (CloseContext::KeepaliveTimer, offset!(keepalive_timer))
    } else if function == write_fn {
        (CloseContext::WriteTimer, offset!(write_timer))
    } else {
        return 0;
    };
    let Some(tctx) = TIMER_CONTEXT.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: per-CPU slot owned by the timer callback now running on this CPU.
    let tctx = unsafe { &mut *tctx };
    // The socket is the timer's container (`timer_container_of(sk, t, sk_timer)` in the kernel).
    let sk = timer.wrapping_sub(timer_offset);
    tctx.timer = timer as u64;
    tctx.sk = sk as u64;
    tctx.kind = kind as u8;
    tctx.closed = 0;
    if kind == CloseContext::WriteTimer {
        tctx.write_timer_event = read::<u8>(sk, offset!(icsk_pending)).unwrap_or(0);
        tctx.packets_out = read::<u32>(sk, offset!(tcp_packets_out)).unwrap_or(0);
    } else {
        tctx.snapshot.kind = RecordKind::KeepaliveTimer as u8;
        tctx.snapshot.context = CloseContext::KeepaliveTimer as u8;
        if snapshot(sk, &mut tctx.snapshot).is_err() {
            // No address in the message: the verifier refuses arithmetic on the pointer.
            warn!(
                &ctx,
                "keepalive timer: cannot read the socket; offsets wrong?"
            );
            tctx.timer = 0;
        }
    }
    0
}

#[btf_tracepoint(function = "timer_expire_exit")]
pub fn timer_expire_exit(ctx: BtfTracePointContext) -> i32 {
    let timer: u64 = ctx.arg(0);
    let Some(tctx) = TIMER_CONTEXT.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: per-CPU slot, see timer_expire_entry.
    let tctx = unsafe { &mut *tctx };
    if tctx.timer != timer || timer == 0 {
        return 0;
    }
    tctx.timer = 0;
    if tctx.kind != CloseContext::KeepaliveTimer as u8 {
        return 0;
    }
    let rec = &mut tctx.snapshot;
    if tctx.closed != 0 {
        // The socket may be freed by now (the callback's sock_put, or tcp_done on an orphan):
        // the close record already carries its final state.
        rec.flags |= record_flags::CLOSED_IN_TIMER;
    } else {
        let sk = tctx.sk as *const u8;
        // Re-read only if the slot still holds the same connection (SLAB_TYPESAFE_BY_RCU reuse).
        let same = match (
            read::<u16>(sk, offset!(inet_sport)),
            read::<u16>(sk, offset!(skc_dport)),
            read::<[u8; 4]>(sk, offset!(skc_daddr)),
        ) {
            (Ok(sport), Ok(dport), Ok(daddr)) => {
                u16::from_be(sport) == rec.local_port
                    && u16::from_be(dport) == rec.remote_port
                    && (rec.family != AF_INET
                        || daddr
                            == [
                                rec.remote_addr[0],
                                rec.remote_addr[1],
                                rec.remote_addr[2],
                                rec.remote_addr[3],
                            ])
            }
            _ => false,
        };
        match read::<u8>(sk, offset!(icsk_probes_out)) {
            Ok(after) if same => rec.probes_out_after = after,
            _ => rec.flags |= record_flags::EXIT_UNVERIFIED,
        }
    }
    emit(rec);
    0
}

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: BtfTracePointContext) -> i32 {
    let new_state: i32 = ctx.arg(2);
    if new_state != tcp_state::CLOSE as i32 {
        return 0;
    }
    let sk: *const u8 = ctx.arg(0);
    let old_state: i32 = ctx.arg(1);
    let old_state = old_state as u8;
    // A listener or a request socket closing is not a connection ending.
    if matches!(
        old_state,
        tcp_state::LISTEN | tcp_state::CLOSE | tcp_state::SYN_RECV | tcp_state::NEW_SYN_RECV
    ) {
        return 0;
    }
    match read::<u16>(sk, offset!(sk_protocol)) {
        Ok(IPPROTO_TCP) => {}
        _ => return 0,
    }
    let mut rec = SocketRecord {
        kind: RecordKind::Close as u8,
        ..SocketRecord::default()
    };
    if snapshot(sk, &mut rec).is_err() {
        warn!(&ctx, "close: cannot read the socket; offsets wrong?");
        return 0;
    }
    rec.state = old_state;
    rec.context = CloseContext::None as u8;
    if let Some(tctx) = TIMER_CONTEXT.get_ptr_mut(0) {
        // SAFETY: per-CPU slot.
        let tctx = unsafe { &mut *tctx };
        if tctx.timer != 0 && tctx.sk == sk as u64 {
            rec.context = tctx.kind;
            tctx.closed = 1;
            if tctx.kind == CloseContext::WriteTimer as u8 {
                rec.write_timer_event = tctx.write_timer_event;
                rec.packets_out = tctx.packets_out;
            }
        }
    }
    if let Some(reset) = RESET_CONTEXT.get_ptr_mut(0) {
        // SAFETY: per-CPU slot.
        let reset = unsafe { &mut *reset };
        if reset.sk == sk as u64 {
            rec.flags |= reset.flags;
            rec.reset_reason_sent = reset.reason;
            if reset.flags & record_flags::RESET_RECEIVED != 0 {
                rec.packets_out = reset.packets_out;
            }
            reset.sk = 0;
        }
    }
    // Orderly closes of sockets without keepalive are the bulk of closes on a busy host and
    // tell the agent nothing: drop them here.
    let orderly = rec.context == CloseContext::None as u8
        && rec.flags & (record_flags::RESET_RECEIVED | record_flags::RESET_SENT) == 0
        && rec.sk_err == 0
        && matches!(
            old_state,
            tcp_state::FIN_WAIT2 | tcp_state::CLOSING | tcp_state::LAST_ACK | tcp_state::TIME_WAIT
        );
    if orderly && rec.flags & record_flags::KEEPALIVE_ON == 0 {
        return 0;
    }
    emit(&rec);
    0
}

fn note_reset(sk: *const u8, flags: u8, reason: u32, packets_out: u32) {
    if sk.is_null() {
        return;
    }
    if let Some(reset) = RESET_CONTEXT.get_ptr_mut(0) {
        // SAFETY: per-CPU slot.
        let reset = unsafe { &mut *reset };
        reset.sk = sk as u64;
        reset.flags = flags;
        reset.reason = reason;
        reset.packets_out = packets_out;
    }
}

#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn tcp_receive_reset(ctx: BtfTracePointContext) -> i32 {
    let sk: *const u8 = ctx.arg(0);
    let packets_out = read::<u32>(sk, offset!(tcp_packets_out)).unwrap_or(0);
    note_reset(sk, record_flags::RESET_RECEIVED, 0, packets_out);
    0
}

#[btf_tracepoint(function = "tcp_send_reset")]
pub fn tcp_send_reset(ctx: BtfTracePointContext) -> i32 {
    // The socket may be a listener, request or timewait socket (or NULL): only its address is
    // kept, to match the full socket that closes next on this CPU.
    note_reset(ctx.arg(0), record_flags::RESET_SENT, ctx.arg(2), 0);
    0
}

#[btf_tracepoint(function = "inet_sk_error_report")]
pub fn inet_sk_error_report(ctx: BtfTracePointContext) -> i32 {
    let sk: *const u8 = ctx.arg(0);
    // Also fires for non-fatal ICMP errors (IP_RECVERR): only a closed socket's error is fatal.
    match (
        read::<u16>(sk, offset!(sk_protocol)),
        read::<u8>(sk, offset!(skc_state)),
    ) {
        (Ok(IPPROTO_TCP), Ok(tcp_state::CLOSE)) => {}
        _ => return 0,
    }
    let mut rec = SocketRecord {
        kind: RecordKind::ErrorReport as u8,
        ..SocketRecord::default()
    };
    if snapshot(sk, &mut rec).is_ok() {
        emit(&rec);
    }
    0
}

/// Does nothing. Never attached by the agent: the benchmark (`cargo xtask bench`) attaches it
/// to `timer_expire_entry` to measure the per-hit floor of a tp_btf program on that hook, so
/// the costs it reports are ours alone.
#[btf_tracepoint(function = "timer_expire_entry")]
pub fn timer_entry_baseline(_ctx: BtfTracePointContext) -> i32 {
    0
}

/// `iter/tcp`: called once per TCP socket of every namespace, then once with a NULL socket.
/// Writes one audit record per full socket to the iterator's seq file; the agent reads them
/// from the iterator's file descriptor. Context: `struct bpf_iter__tcp { meta; sk_common; uid }`.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub fn audit_tcp(ctx: *mut core::ffi::c_void) -> i32 {
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
    if snapshot(sk, &mut rec).is_err() {
        return 0;
    }
    // Time-wait and request sockets are not full TCP sockets: nothing keepalive-related in them.
    if matches!(rec.state, tcp_state::TIME_WAIT | tcp_state::NEW_SYN_RECV) {
        return 0;
    }
    // SAFETY: `meta->seq` is the first member of `struct bpf_iter_meta` (trusted pointer), and
    // the record lives on this stack for the duration of the call.
    unsafe {
        let seq = *meta as *mut aya_ebpf::bindings::seq_file;
        aya_ebpf::helpers::generated::bpf_seq_write(
            seq,
            (&raw const rec).cast(),
            SocketRecord::SIZE as u32,
        );
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
