//! `tcp_send_reset` and `tcp_receive_reset`: mark the socket that is about to close on this CPU,
//! so the close record can say a reset was sent (with its reason) or received.

use aya_ebpf::{
    macros::{btf_tracepoint, map},
    maps::PerCpuArray,
    programs::BtfTracePointContext,
};
use keepalive_ebpf::record_flags;

use crate::socket::read;

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
    let packets_out = read::<u32>(sk, offset!(tcp_packets_out)).unwrap_or(0);
    note_reset(sk, record_flags::RESET_RECEIVED, 0, packets_out);
    0
}

/// 6.10+: `(sk, skb, reason)`. The socket may be a listener, request or timewait socket (or
/// NULL): only its address is kept, to match the full socket that closes next on this CPU.
#[btf_tracepoint(function = "tcp_send_reset")]
pub(crate) fn tcp_send_reset(ctx: BtfTracePointContext) -> i32 {
    note_reset(ctx.arg(0), record_flags::RESET_SENT, ctx.arg(2), 0);
    0
}

/// Before 6.10 the tracepoint is `(sk, skb)`: the verifier refuses a read of a third argument,
/// so this variant records the reset without a reason (the agent's layout says which to load).
#[btf_tracepoint(function = "tcp_send_reset")]
pub(crate) fn tcp_send_reset_without_reason(ctx: BtfTracePointContext) -> i32 {
    note_reset(ctx.arg(0), record_flags::RESET_SENT, 0, 0);
    0
}
