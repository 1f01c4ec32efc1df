//! `tcp_send_reset` and `tcp_receive_reset`: mark the socket that is about to close on this CPU,
//! so the close record can say a reset was sent (with its reason) or received.

use aya_ebpf::{
    helpers::generated::bpf_skc_to_tcp_sock,
    macros::{btf_tracepoint, map},
    maps::PerCpuArray,
    programs::BtfTracePointContext,
};
use keepalive_ebpf::{record_flags, tcp_state};

use crate::socket::{SockFields, Typed, sock_field};

/// The last reset sent or received on this CPU, consumed by the `TCP_CLOSE` that follows it in
/// `tcp_reset` / `tcp_keepalive_timer` / `tcp_abort`.
#[map]
pub(crate) static RESET_CONTEXT: PerCpuArray<ResetContext> = PerCpuArray::with_max_entries(1, 0);

#[repr(C)]
pub(crate) struct ResetContext {
    pub(crate) sk: u64,
    pub(crate) flags: u8,
    pub(crate) reason: u32,
    /// At `tcp_receive_reset`, before `tcp_reset` purges the write queue.
    pub(crate) packets_out: u32,
}

#[inline(always)]
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
pub(crate) fn tcp_receive_reset(ctx: BtfTracePointContext) -> i32 {
    let sk: *const u8 = ctx.arg(0);
    // One checked load through the typed `tcp_sock`, not a helper read (`bpf_probe_read_kernel`
    // was half of this program's samples in `cargo xtask profile`'s RST churn).
    // SAFETY: the helper checks its argument (a BTF-typed socket) and returns NULL for anything
    // but a full TCP socket.
    let tp = unsafe { bpf_skc_to_tcp_sock(sk as *mut _) } as *const u8;
    let packets_out = if tp.is_null() {
        0
    } else {
        Typed(tp).load::<u32>(offset!(tcp_packets_out))
    };
    note_reset(sk, record_flags::RESET_RECEIVED, 0, packets_out);
    0
}

/// 6.10+: `(sk, skb, reason)`. The socket may be a listener, request or timewait socket (or
/// NULL), whose reset leaves no mark ([`may_close_next`]); a connection's address is kept, to
/// match its close next on this CPU.
#[btf_tracepoint(function = "tcp_send_reset")]
pub(crate) fn tcp_send_reset(ctx: BtfTracePointContext) -> i32 {
    let sk: *const u8 = ctx.arg(0);
    if may_close_next(sk) {
        note_reset(sk, record_flags::RESET_SENT, ctx.arg(2), 0);
    }
    0
}

/// Before 6.10 the tracepoint is `(sk, skb)`: the verifier refuses a read of a third argument,
/// so this variant records the reset without a reason (the agent's layout says which to load).
#[btf_tracepoint(function = "tcp_send_reset")]
pub(crate) fn tcp_send_reset_without_reason(ctx: BtfTracePointContext) -> i32 {
    let sk: *const u8 = ctx.arg(0);
    if may_close_next(sk) {
        note_reset(sk, record_flags::RESET_SENT, 0, 0);
    }
    0
}

/// Whether a close of `sk` may still follow this reset, to consume the mark: not when the
/// socket is closed already. A `SO_LINGER` 0 close (`tcp_disconnect`), a close with unread data
/// and an abort on data after shutdown move the socket to `TCP_CLOSE` first and send the reset
/// after, so the mark would outlive the socket and wait for the next one given its address (a
/// freed socket's memory goes to the next one allocated on that CPU), whose close would then
/// say it sent a reset, and skip the filter for orderly closes. Nor a listener's, a request's
/// or a timewait socket's, which never reach the close hook's `TCP_CLOSE` as a connection.
#[inline(always)]
fn may_close_next(sk: *const u8) -> bool {
    if sk.is_null() {
        return false;
    }
    // `skc_state` is a member of the `sock_common` every kind of socket begins with.
    let state = sock_field::<u8>(sk, offset!(skc_state));
    !matches!(
        state,
        tcp_state::CLOSE | tcp_state::LISTEN | tcp_state::TIME_WAIT | tcp_state::NEW_SYN_RECV
    )
}
