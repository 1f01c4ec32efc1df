//! `inet_sock_set_state` to `TCP_CLOSE` (the tracepoint inside `tcp_done`).

use aya_ebpf::{
    bindings::BPF_RB_NO_WAKEUP,
    helpers::generated::bpf_skc_to_tcp_sock,
    macros::{btf_tracepoint, map},
    maps::{Array, PerCpuArray, ring_buf::RingBufEntry},
    programs::BtfTracePointContext,
};
use aya_log_ebpf::warn;
use keepalive_ebpf::{
    CloseContext, CloseFacts, DropReason, IPPROTO_TCP, NOT_A_DROP, NetnsCounters, RecordKind,
    RecordSlots, SocketRecord, Uncounted, ablation::ablated, classify_close, idle_kill_candidate,
    last_received, may_be_idle_kill, record_flags, silence_before_send, tcp_state,
};

use crate::{
    reset::RESET_CONTEXT,
    socket::{
        EBUSY, EVENTS, KEEPALIVE_RST_REASON, SockFields, Typed, add, conntrack_timeout_typed,
        count_reserve_failure, emit, idle_kill_jiffies, may_be_tracked, netns_counters,
        netns_counters_of, netns_key, report_keepalive_off, smallest_threshold, snapshot,
        snapshot_typed, sock_field, uncounted, wakeup_flags, zero_record,
    },
    timer::TIMER_CONTEXT,
};

/// Whether the agent's table may hold the closing connection ([`may_be_tracked`]), by its
/// ports. `inet_sport`, not `skc_num`: `inet_put_port` zeroed that before this tracepoint (the
/// socket is unhashed first); through the typed `tcp_sock`, since it lies past `struct sock`.
#[inline(always)]
fn closing_may_be_tracked(sk: *const u8, tp: Typed) -> bool {
    may_be_tracked(
        u16::from_be(sock_field::<u16>(sk, offset!(skc_dport))),
        u16::from_be(tp.load::<u16>(offset!(inet_sport))),
    )
}

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
    // `sk` is BTF-typed (`struct sock *`) here, and these three fields are members of
    // `struct sock`: plain loads the verifier checks against the type, no helper call.
    if sock_field::<u16>(sk, offset!(sk_protocol)) != IPPROTO_TCP {
        return 0;
    }
    // Decide whether to report from the per-CPU contexts and two fields, before the snapshot:
    // orderly closes of sockets without keepalive are the bulk of closes on a busy host and
    // tell the agent nothing.
    let sk_flags = sock_field::<u64>(sk, offset!(skc_flags));
    let sk_err = sock_field::<i32>(sk, offset!(sk_err));
    let mut context = CloseContext::None as u8;
    // `packets_out` as the timer or the reset found it, before an abort purged it; not an
    // `Option`: LLVM leaves a `None`'s payload unwritten and may still load it, a read of
    // uninitialized stack that the 5.10 verifier refuses.
    let (mut write_timer_event, mut packets_out, mut packets_out_known) = (0, 0u32, false);
    if let Some(tctx) = TIMER_CONTEXT.get_ptr_mut(0) {
        // SAFETY: per-CPU slot.
        let tctx = unsafe { &mut *tctx };
        if tctx.timer != 0 && tctx.sk == sk as u64 {
            context = tctx.kind;
            tctx.closed = 1;
            if tctx.kind == CloseContext::WriteTimer as u8 {
                write_timer_event = tctx.write_timer_event;
                packets_out = tctx.packets_out;
                packets_out_known = true;
            }
        }
    }
    let (mut reset_flags, mut reset_reason) = (0, 0);
    if let Some(reset) = RESET_CONTEXT.get_ptr_mut(0) {
        // SAFETY: per-CPU slot.
        let reset = unsafe { &mut *reset };
        if reset.sk == sk as u64 {
            reset_flags = reset.flags;
            reset_reason = reset.reason;
            if reset.flags & record_flags::RESET_RECEIVED != 0 {
                packets_out = reset.packets_out;
                packets_out_known = true;
            }
            reset.sk = 0;
        }
    }
    let orderly = context == CloseContext::None as u8
        && reset_flags & (record_flags::RESET_RECEIVED | record_flags::RESET_SENT) == 0
        && sk_err == 0
        && matches!(
            old_state,
            tcp_state::FIN_WAIT2 | tcp_state::CLOSING | tcp_state::LAST_ACK | tcp_state::TIME_WAIT
        );
    if orderly && sk_flags & (1 << offset!(sock_flag_keepopen)) == 0 {
        return 0;
    }
    // SAFETY: read of our own static (see `offset!`).
    let keepalive_rst_reason = unsafe { core::ptr::read_volatile(&raw const KEEPALIVE_RST_REASON) };
    let seen = CloseSeen {
        old_state,
        context,
        write_timer_event,
        sk_flags,
        sk_err,
        packets_out,
        packets_out_known,
        reset_received: reset_flags & record_flags::RESET_RECEIVED != 0,
        keepalive_reset_sent: reset_flags & record_flags::RESET_SENT != 0
            && reset_reason == keepalive_rst_reason,
    };
    let keepalive_on = sk_flags & (1 << offset!(sock_flag_keepopen)) != 0;
    if keepalive_on && context != CloseContext::KeepaliveTimer as u8 && !report_keepalive_off() {
        // A keepalive connection the agent's table does not hold (see `TRACKED`: it never
        // probed, or the agent let it go): its orderly close tells it nothing, nor does its
        // drop, unless that may be an idle kill or is a keepalive drop. Counted and not sent,
        // like a connection's without keepalive (RST churn of short connections: every one of Go's has
        // `SO_KEEPALIVE`). An early return of its own, nothing computed here kept past it, so
        // the paths below are the ones the older verifiers already walk within their million
        // instructions: folded into the reporting decision below, 5.10 went past it.
        // SAFETY: as below.
        let tp = unsafe { bpf_skc_to_tcp_sock(sk as *mut _) } as *const u8;
        if !tp.is_null() && !closing_may_be_tracked(sk, Typed(tp)) {
            if orderly {
                count_typed(Typed(tp), None);
                return 0;
            }
            if counted_not_sent(&seen, tp, true) {
                return 0;
            }
        }
    }

    // SAFETY: the helper checks its argument (a BTF-typed socket) and returns NULL for anything
    // but a full TCP socket.
    let tp = unsafe { bpf_skc_to_tcp_sock(sk as *mut _) } as *const u8;
    // Counted either way; sent for a keepalive connection (but see above), for any when asked
    // (see `report_keepalive_off`), and for a drop that may be an idle kill (see
    // `idle_kill_candidate`).
    let mut send = keepalive_on || report_keepalive_off();
    if !send && !tp.is_null() {
        if counted_not_sent(&seen, tp, false) {
            return 0;
        }
        send = true;
    }

    // The record is written where it is sent: reserved in the ring buffer, not built on the
    // stack and copied in (`bpf_ringbuf_output`), which costs 25-45 ns more per record
    // (hook-cost, record write rows). A build without the ring write builds it on the stack
    // and sends nothing.
    let mut unsent = core::mem::MaybeUninit::<SocketRecord>::uninit();
    let mut entry = if const { ablated("ring-write") } {
        None
    } else {
        match EVENTS.reserve::<SocketRecord>(0) {
            Some(entry) => Some(entry),
            None => {
                // The ring is full: the close is still counted, as one not sent is (the totals
                // do not depend on the ring), and the record's loss is counted.
                count_without_record(&seen, tp, keepalive_on);
                count_reserve_failure();
                return 0;
            }
        }
    };
    let rec = match &mut entry {
        Some(entry) => entry.as_mut_ptr(),
        None => unsent.as_mut_ptr(),
    };
    zero_record(rec);
    // SAFETY: every byte was written just above, and all-zero is a valid record (integers only).
    let rec = unsafe { &mut *rec };
    rec.kind = RecordKind::Close as u8;
    let snapped = if tp.is_null() {
        snapshot(sk, rec)
    } else {
        snapshot_typed(Typed(tp), rec)
    };
    match snapped {
        Ok(()) => {}
        Err(EBUSY) => {
            discard(entry);
            uncounted(Uncounted::CloseCopyBusy);
            return 0;
        }
        Err(_) => {
            discard(entry);
            uncounted(Uncounted::CloseUnreadable);
            warn!(&ctx, "close: cannot read the socket; offsets wrong?");
            return 0;
        }
    }
    rec.state = old_state;
    rec.context = context;
    rec.write_timer_event = write_timer_event;
    if packets_out_known {
        rec.packets_out = packets_out;
    }
    rec.flags |= reset_flags;
    rec.reset_reason_sent = reset_reason;
    let verdict = classify_close(&CloseFacts {
        old_state,
        context,
        write_timer_event,
        orphan: rec.flags & record_flags::ORPHAN != 0,
        keepalive_on: rec.flags & record_flags::KEEPALIVE_ON != 0,
        probes_out: rec.probes_out_before,
        packets_out: rec.packets_out,
        send_window: rec.snd_wnd,
        reset_received: seen.reset_received,
        keepalive_reset_sent: seen.keepalive_reset_sent,
        sk_err: rec.sk_err,
    });
    rec.drop_reason = verdict.map_or(NOT_A_DROP, |reason| reason as u32);
    if !tp.is_null()
        && may_be_idle_kill(
            verdict,
            silence_before_send(rec.last_received_jiffies(), rec.lsndtime),
        )
    {
        // An idle kill's threshold is the timeout's one use (see `snapshot_typed`).
        rec.conntrack_timeout = conntrack_timeout_typed(tp);
    }
    count_close(netns_counters(rec), verdict);
    // A socket the typed helper refused, without keepalive, is counted here and sent only if
    // it may be an idle kill.
    if !send
        && !idle_kill_candidate(
            verdict,
            silence_before_send(rec.last_received_jiffies(), rec.lsndtime),
            smallest_threshold(idle_kill_jiffies(), rec.conntrack_timeout),
        )
    {
        discard(entry);
        return 0;
    }
    if let Some(entry) = entry {
        entry.submit(wakeup_flags());
    }
    0
}

/// Gives a reserved record back to the ring buffer unsent (its space is skipped by the reader).
#[inline(always)]
fn discard(entry: Option<RingBufEntry<SocketRecord>>) {
    if let Some(entry) = entry {
        entry.discard(BPF_RB_NO_WAKEUP as u64);
    }
}

/// What the close hook found before reading the socket for a record.
struct CloseSeen {
    old_state: u8,
    context: u8,
    write_timer_event: u8,
    sk_flags: u64,
    sk_err: i32,
    /// `packets_out` as the timer or the reset found it (when `packets_out_known`).
    packets_out: u32,
    packets_out_known: bool,
    reset_received: bool,
    keepalive_reset_sent: bool,
}

/// Classifies a close from the few fields the classifier and the namespace's key need (one
/// typed load each, instead of the whole record) and, unless it may be an idle kill (see
/// `idle_kill_candidate`) or is a keepalive drop, counts it: then it is not sent (`true`).
#[inline(always)]
fn counted_not_sent(seen: &CloseSeen, tp: *const u8, keepalive_on: bool) -> bool {
    let c = Typed(tp);
    let verdict = classify_typed(seen, c, keepalive_on);
    let idle_kill = verdict.is_some() && {
        let received = last_received(
            c.load::<u32>(offset!(icsk_ack_lrcvtime)),
            c.load::<u32>(offset!(tcp_rcv_tstamp)),
        );
        let silence = silence_before_send(received, c.load::<u32>(offset!(tcp_lsndtime)));
        // No silence (a reset answering a connection that just talked, the bulk of RST churn)
        // can be no idle kill: the conntrack read is skipped.
        let threshold = if silence == 0 {
            0
        } else {
            smallest_threshold(idle_kill_jiffies(), conntrack_timeout_typed(tp))
        };
        idle_kill_candidate(verdict, silence, threshold)
    };
    // A keepalive drop is what the agent is for, its expiry seen or not (a zero-window probe
    // counts in `icsk_probes_out` too).
    if idle_kill || verdict.is_some_and(DropReason::is_keepalive) {
        return false;
    }
    count_typed(c, verdict);
    true
}

/// [`classify_close`] from the few fields it needs, one typed load each.
#[inline(always)]
fn classify_typed(seen: &CloseSeen, c: Typed, keepalive_on: bool) -> Option<DropReason> {
    classify_close(&CloseFacts {
        old_state: seen.old_state,
        context: seen.context,
        write_timer_event: seen.write_timer_event,
        orphan: seen.sk_flags & (1 << offset!(sock_flag_dead)) != 0,
        keepalive_on,
        probes_out: c.load::<u8>(offset!(icsk_probes_out)),
        packets_out: if seen.packets_out_known {
            seen.packets_out
        } else {
            c.load::<u32>(offset!(tcp_packets_out))
        },
        send_window: c.load::<u32>(offset!(tcp_snd_wnd)),
        reset_received: seen.reset_received,
        keepalive_reset_sent: seen.keepalive_reset_sent,
        sk_err: seen.sk_err,
    })
}

/// Counts a close whose record the ring buffer has no room for, from the fields the classifier
/// and the namespace's key need, as [`counted_not_sent`] counts one it does not send.
#[inline(always)]
fn count_without_record(seen: &CloseSeen, tp: *const u8, keepalive_on: bool) {
    if tp.is_null() {
        uncounted(Uncounted::CloseUnreadable);
        return;
    }
    let c = Typed(tp);
    count_typed(c, classify_typed(seen, c, keepalive_on));
}

/// [`count_close`] for a socket read through the typed `tcp_sock`, whose namespace gives the
/// counters' key; a namespace that cannot be read counts as such.
#[inline(always)]
fn count_typed(c: Typed, verdict: Option<DropReason>) {
    match netns_key(c) {
        Ok(key) => count_close(netns_counters_of(key), verdict),
        Err(_) => uncounted(Uncounted::CloseUnreadable),
    }
}

/// Adds a close to its namespace's counters: to its drop reason, or else to the orderly ones.
#[inline(always)]
fn count_close(counters: Option<*mut NetnsCounters>, verdict: Option<DropReason>) {
    if let Some(counters) = counters {
        // SAFETY: a map value (see `netns_counters`).
        unsafe {
            match verdict {
                Some(reason) => {
                    // The index is a u8 enum below COUNT; the mask tells the verifier so. Read
                    // back through a volatile load first: LLVM knows the enum's range and
                    // dropped the mask as redundant on the path of a close the ring had no
                    // room for, and 5.10's verifier refused the add (the byte could be 255).
                    let index =
                        core::ptr::read_volatile(&(reason as usize)) & (DropReason::COUNT - 1);
                    add(&raw mut (*counters).drops[index], 1);
                }
                None => add(&raw mut (*counters).orderly_closes, 1),
            }
        }
    }
}

/// Does nothing. Never attached by the agent: the benchmark attaches it to
/// `inet_sock_set_state` to measure the per-hit floor of a tp_btf program on that hook.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub(crate) fn close_baseline(_ctx: BtfTracePointContext) -> i32 {
    0
}

/// Whether this hit moves a TCP socket to `TCP_CLOSE`: the new-state and protocol checks of
/// [`inet_sock_set_state`] (which checks the old state between them), for the bench programs
/// that write a record per close.
#[inline(always)]
fn tcp_close(ctx: &BtfTracePointContext) -> bool {
    let new_state: i32 = ctx.arg(2);
    let sk: *const u8 = ctx.arg(0);
    new_state == tcp_state::CLOSE as i32
        && sock_field::<u16>(sk, offset!(sk_protocol)) == IPPROTO_TCP
}

/// Benchmarks only, never attached by the agent: at each TCP close, a zeroed close record
/// copied in the way the agent's programs wrote their records until they reserved them in the
/// ring (on the stack, then [`emit`] into the ring buffer, with its wakeup count), and nothing
/// else. Against [`close_record_reserve`] and
/// [`close_record_slot`], in the same run: what the ring buffer's write costs, and what it
/// costs over plain stores (`hook-cost`, record write rows).
#[btf_tracepoint(function = "inet_sock_set_state")]
pub(crate) fn close_record_ring(ctx: BtfTracePointContext) -> i32 {
    if !tcp_close(&ctx) {
        return 0;
    }
    let mut rec = core::mem::MaybeUninit::<SocketRecord>::uninit();
    zero_record(rec.as_mut_ptr());
    // SAFETY: every byte was written just above, and all-zero is a valid record.
    let rec = unsafe { rec.assume_init_mut() };
    rec.kind = RecordKind::Close as u8;
    emit(rec);
    0
}

/// Benchmarks only, never attached by the agent: at each TCP close, the same record reserved in
/// the ring buffer, zeroed there and submitted (`bpf_ringbuf_reserve`, `bpf_ringbuf_submit`):
/// no copy from the stack, but two helper calls where [`emit`] makes one.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub(crate) fn close_record_reserve(ctx: BtfTracePointContext) -> i32 {
    if !tcp_close(&ctx) {
        return 0;
    }
    match EVENTS.reserve::<SocketRecord>(0) {
        Some(mut entry) => {
            let rec = entry.as_mut_ptr();
            zero_record(rec);
            // SAFETY: the reserved record, every byte of it written just above.
            unsafe { (*rec).kind = RecordKind::Close as u8 };
            entry.submit(wakeup_flags());
        }
        None => count_reserve_failure(),
    }
    0
}

/// Benchmarks only: where [`close_record_slot`] writes.
#[map]
static RECORD_SLOTS: PerCpuArray<RecordSlots> = PerCpuArray::with_max_entries(1, 0);

/// Benchmarks only, never attached by the agent: at each TCP close, a zeroed close record
/// written in place into the next of this CPU's [`RecordSlots`], whose head it advances: the
/// stores a per-CPU ring would make, without a lock, an atomic or a helper call. Nobody reads
/// the slots, so their lines stay in this CPU's cache: a floor under such a ring, whose reader
/// on another CPU would take the lines away (what that costs per byte, `cargo xtask ablate
/// short-records` measures on the ring buffer).
#[btf_tracepoint(function = "inet_sock_set_state")]
pub(crate) fn close_record_slot(ctx: BtfTracePointContext) -> i32 {
    if !tcp_close(&ctx) {
        return 0;
    }
    if let Some(slots) = RECORD_SLOTS.get_ptr_mut(0) {
        // SAFETY: per-CPU slot. The index is masked below the slots' count, for the verifier.
        unsafe {
            let head = (*slots).head;
            let rec = (&raw mut (*slots).records[(head as usize) & (RecordSlots::COUNT - 1)]);
            zero_record(rec);
            (*rec).kind = RecordKind::Close as u8;
            (*slots).head = head + 1;
        }
    }
    0
}

/// Tests only, never attached by the agent: see [`close_count_classic`].
#[map]
static CLOSE_CLASSIC: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Tests only: the ports (host order) whose closes [`close_count_classic`] counts; 0 matches
/// none.
#[map]
static CLOSE_CLASSIC_PORTS: Array<u16> = Array::with_max_entries(CLOSE_CLASSIC_PORT_SLOTS, 0);

const CLOSE_CLASSIC_PORT_SLOTS: u32 = 2;

/// Tests only, never attached by the agent: counts moves of TCP sockets to `TCP_CLOSE` whose
/// local or remote port is one of [`CLOSE_CLASSIC_PORTS`], as a classic (perf-event) tracepoint
/// program. Against a perf counting event with the same filter, a test tells the closes the
/// kernel ran no program for (as it sometimes does for keepalive expiries: see
/// `expiry_count_classic`) from closes the agent's program saw. Returns 1 for the same reason.
#[unsafe(no_mangle)]
#[unsafe(link_section = "tracepoint/sock/inet_sock_set_state")]
pub(crate) fn close_count_classic(ctx: *mut core::ffi::c_void) -> u32 {
    // The event's record (tracefs `events/sock/inet_sock_set_state/format`, unchanged since
    // 4.16): `newstate` at 20, `sport` and `dport` (host order) at 24 and 26, `protocol` at 30.
    let at = |offset: usize| ctx.cast::<u8>().wrapping_add(offset);
    // SAFETY: the verifier checks these context loads against the record's size.
    let (newstate, sport, dport, protocol) = unsafe {
        (
            core::ptr::read_volatile(at(20).cast::<i32>()),
            core::ptr::read_volatile(at(24).cast::<u16>()),
            core::ptr::read_volatile(at(26).cast::<u16>()),
            core::ptr::read_volatile(at(30).cast::<u16>()),
        )
    };
    if newstate != i32::from(tcp_state::CLOSE) || protocol != IPPROTO_TCP {
        return 1;
    }
    let matches = |slot: u32| {
        CLOSE_CLASSIC_PORTS
            .get(slot)
            .is_some_and(|&port| port != 0 && (port == sport || port == dport))
    };
    if (matches(0) || matches(1))
        && let Some(count) = CLOSE_CLASSIC.get_ptr_mut(0)
    {
        // SAFETY: per-CPU slot; the kernel runs no classic tracepoint program inside another
        // on one CPU (`bpf_prog_active`).
        unsafe { *count += 1 };
    }
    1
}
