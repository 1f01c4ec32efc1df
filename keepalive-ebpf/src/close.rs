//! `inet_sock_set_state` to `TCP_CLOSE` (the tracepoint inside `tcp_done`), and
//! `inet_sk_error_report` on a closed socket.

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};
use aya_log_ebpf::warn;
use keepalive_ebpf::{
    CloseContext, IPPROTO_TCP, RecordKind, SocketRecord, record_flags, tcp_state,
};

use crate::{
    reset::RESET_CONTEXT,
    socket::{emit, read, snapshot},
    timer::TIMER_CONTEXT,
};

#[btf_tracepoint(function = "inet_sock_set_state")]
pub(crate) fn inet_sock_set_state(ctx: BtfTracePointContext) -> i32 {
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

#[btf_tracepoint(function = "inet_sk_error_report")]
pub(crate) fn inet_sk_error_report(ctx: BtfTracePointContext) -> i32 {
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
