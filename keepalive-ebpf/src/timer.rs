//! `timer_expire_entry`/`timer_expire_exit`, kept only for `tcp_keepalive_timer` (probes) and
//! `tcp_write_timer` (so a close inside it is a retransmission or zero-window timeout).

use core::sync::atomic::{Ordering, compiler_fence};

use aya_ebpf::bindings::bpf_pidns_info;
use aya_ebpf::helpers::{bpf_get_ns_current_pid_tgid, bpf_ktime_get_ns};
use aya_ebpf::{
    macros::{btf_tracepoint, map, raw_tracepoint},
    maps::PerCpuArray,
    programs::{BtfTracePointContext, RawTracePointContext},
};
use aya_log_ebpf::warn;
use keepalive_ebpf::{
    AF_INET, COUNTER_SET_SLOTS, COUNTER_SLOTS, CloseContext, CounterSlot, ExpirySpan, NetnsKey,
    RecordKind, SweepContext, TimerContext, Uncounted, counter_slot, expiry_enters_table,
    record_flags, sweep_totals,
};

use crate::socket::{
    EBUSY, HelperRead, KEEPALIVE_TIMER_FN, SockFields, Typed, WRITE_TIMER_FN, add,
    existing_netns_counters, expiry_snapshot, expiry_snapshot_typed, mark_tracked, may_be_tracked,
    netns_counters, read, read_or_zero, report_keepalive_off, send_expiry, store_netns_cookie,
    typed_tcp_sock, uncounted,
};

/// More probes than one CPU's keepalive timers send between two expiries the programs see
/// (about a million, from half a million expiries skipped in a row): a gap this large is a
/// wrong read, not probes.
const UNSEEN_PROBES_BOUND: u64 = 1 << 20;

/// The TCP timer callback running on this CPU (timer callbacks do not nest on one CPU).
#[map]
pub(crate) static TIMER_CONTEXT: PerCpuArray<TimerContext> = PerCpuArray::with_max_entries(1, 0);

/// Reads the socket with helper calls: kernels without `bpf_rdonly_cast` (before 6.2).
#[btf_tracepoint(function = "timer_expire_entry")]
pub(crate) fn timer_expire_entry(ctx: BtfTracePointContext) -> i32 {
    entry::<false>(&ctx)
}

/// Reads the socket with typed loads ([`typed_tcp_sock`]), where the kernel has the kfunc.
#[btf_tracepoint(function = "timer_expire_entry")]
pub(crate) fn timer_expire_entry_typed(ctx: BtfTracePointContext) -> i32 {
    entry::<true>(&ctx)
}

#[btf_tracepoint(function = "timer_expire_exit")]
pub(crate) fn timer_expire_exit(ctx: BtfTracePointContext) -> i32 {
    exit::<false>(&ctx)
}

#[btf_tracepoint(function = "timer_expire_exit")]
pub(crate) fn timer_expire_exit_typed(ctx: BtfTracePointContext) -> i32 {
    exit::<true>(&ctx)
}

/// `timer_expire_entry`: the socket read through [`typed_tcp_sock`] when `TYPED`, else with
/// helper calls.
#[inline(always)]
fn entry<const TYPED: bool>(ctx: &BtfTracePointContext) -> i32 {
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
    if tctx.timer != 0 && tctx.kind == CloseContext::KeepaliveTimer as u8 {
        // The last keepalive expiry on this CPU ran its entry and not its exit.
        uncounted(Uncounted::ExpiryExitMissed);
    }
    tctx.timer = timer as u64;
    tctx.sk = sk as u64;
    tctx.kind = kind as u8;
    tctx.closed = 0;
    if kind == CloseContext::WriteTimer {
        if TYPED {
            let tp = typed_tcp_sock(sk);
            tctx.write_timer_event = tp.load::<u8>(offset!(icsk_pending));
            tctx.packets_out = tp.load::<u32>(offset!(tcp_packets_out));
        } else {
            tctx.write_timer_event = read::<u8>(sk, offset!(icsk_pending)).unwrap_or(0);
            tctx.packets_out = read::<u32>(sk, offset!(tcp_packets_out)).unwrap_or(0);
        }
    } else {
        tctx.snapshot.kind = RecordKind::KeepaliveTimer as u8;
        tctx.snapshot.context = CloseContext::KeepaliveTimer as u8;
        let snapshot = if TYPED {
            expiry_snapshot_typed(typed_tcp_sock(sk), &mut tctx.snapshot)
        } else {
            expiry_snapshot(sk, &mut tctx.snapshot)
        };
        match snapshot {
            Ok(send) => {
                tctx.keepalive_mib = 0;
                let cookie = tctx.snapshot.netns_cookie;
                // A sweep in an interrupt here would find a slot half taken.
                set_counting(&raw mut tctx.counting, 1);
                let found = keepalive_mib(tctx, send.net, cookie);
                set_counting(&raw mut tctx.counting, 0);
                if let Some(at) = found
                    && let Some(before) = load_mib::<TYPED>(at)
                {
                    tctx.keepalive_mib = at;
                    tctx.keepalive_mib_before = before;
                }
            }
            Err(err) => {
                // Still this expiry's context, so the exit neither counts it nor takes it for
                // one the entry missed; no socket, so a close inside it gets no timer context.
                tctx.kind = CloseContext::None as u8;
                tctx.sk = 0;
                if err == EBUSY {
                    uncounted(Uncounted::ExpiryCopyBusy);
                    return 0;
                }
                uncounted(Uncounted::ExpiryUnreadable);
                // No address in the message: the verifier refuses arithmetic on the pointer.
                warn!(
                    ctx,
                    "keepalive timer: cannot read the socket; offsets wrong?"
                );
            }
        }
    }
    0
}

/// `timer_expire_exit`: the socket read through [`typed_tcp_sock`] when `TYPED`.
#[inline(always)]
fn exit<const TYPED: bool>(ctx: &BtfTracePointContext) -> i32 {
    let timer: u64 = ctx.arg(0);
    let Some(tctx) = TIMER_CONTEXT.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: per-CPU slot, see timer_expire_entry.
    let tctx = unsafe { &mut *tctx };
    if timer == 0 {
        return 0;
    }
    if tctx.timer != timer {
        // The entry program did not run for this expiry. Only keepalive expiries matter: one
        // load through the BTF-typed pointer, as at entry (a timer freed by its callback reads
        // whatever reused the memory, never a fault).
        let timer = timer as *const u8;
        let function_offset = offset!(timer_function);
        // SAFETY: the verifier checks this load against `struct timer_list`.
        let function =
            unsafe { core::ptr::read_volatile(timer.add(function_offset) as *const u64) };
        // SAFETY: read of our own static (see `offset!`).
        if function == unsafe { core::ptr::read_volatile(&raw const KEEPALIVE_TIMER_FN) } {
            uncounted(Uncounted::ExpiryEntryMissed);
        }
        return 0;
    }
    tctx.timer = 0;
    if tctx.kind != CloseContext::KeepaliveTimer as u8 {
        return 0;
    }
    // Counted whatever became of the socket: the counter belongs to its namespace, and only
    // this callback runs on this CPU between the two hooks.
    let after = if tctx.keepalive_mib == 0 {
        None
    } else {
        load_mib::<TYPED>(tctx.keepalive_mib)
    };
    // tcp_write_wakeup sends at most two probes (an urgent-pointer probe, then the probe); more
    // means the counter read is not TCPKeepAlive.
    let probes = after.and_then(
        |after| match after.wrapping_sub(tctx.keepalive_mib_before) {
            sent @ 0..=2 => Some(sent as u8),
            _ => None,
        },
    );
    // Probes counted on this CPU in this namespace since the last expiry the programs saw end
    // here: only keepalive callbacks count TCPKeepAlive, and every one the programs saw is
    // counted by its own exit, so these are the probes of expiries the kernel ran the
    // programs for only in part or not at all (it skips them now and then in bursts,
    // README "Exact totals and the kernel"). The bound keeps a wrong read from adding a wild
    // number.
    let mut unseen = 0;
    let mut unseen_since = 0;
    // This expiry's probes a counter sweep already added (see below).
    let mut swept = 0;
    // The slot the entry found the counter through (nothing but a sweep writes it in between).
    let ktime_ns = tctx.snapshot.ktime_ns;
    let (mib, before) = (tctx.keepalive_mib, tctx.keepalive_mib_before);
    // From the slot's read to the end of its update, a sweep in an interrupt leaves it alone:
    // it would count again what this exit is about to.
    set_counting(&raw mut tctx.counting, 1);
    // SAFETY: a slot of our per-CPU context ([`slot_of`]), apart from the snapshot borrowed
    // below; through a pointer, so that both may be used until the namespace's counters are.
    let slot = unsafe { &mut *(slot_of(tctx, tctx.counter_slot as usize) as *mut CounterSlot) };
    let mut seen_now = false;
    if mib != 0 && slot.at == mib {
        match (probes, after) {
            (Some(sent), Some(after)) => {
                if slot.seen > before {
                    // A sweep ran between the entry and here and moved the memory past
                    // `before` (nothing else can: a slot taken starts from 0): it added what
                    // the counter had grown by then, this expiry's probes included if they
                    // were sent by then. Whatever a later sweep did to `seen_ns`.
                    swept = (slot.seen - before).min(u64::from(sent));
                } else if slot.seen_ns != 0 {
                    let gap = before - slot.seen;
                    if gap < UNSEEN_PROBES_BOUND {
                        unseen = gap;
                        unseen_since = slot.seen_ns;
                    } else {
                        uncounted(Uncounted::ExpiryCounterUnreadable);
                    }
                } else if slot.seen == 0 {
                    // The slot's first expiry (`keepalive_mib` took it with no memory).
                    slot.before_first_seen = before;
                }
                slot.seen = after;
                slot.seen_ns = ktime_ns;
                seen_now = true;
            }
            _ => slot.seen_ns = 0,
        }
    }
    let rec = &mut tctx.snapshot;
    rec.probes_sent = probes.unwrap_or(0);
    if probes.is_none() {
        rec.flags |= record_flags::EXIT_UNVERIFIED;
        uncounted(Uncounted::ExpiryCounterUnreadable);
    }
    if tctx.closed != 0 {
        // The socket may be freed by now (the callback's sock_put, or tcp_done on an orphan):
        // the close record already carries its final state.
        rec.flags |= record_flags::CLOSED_IN_TIMER;
    } else {
        let sk = tctx.sk as *const u8;
        // Re-read only if the slot still holds the same connection (SLAB_TYPESAFE_BY_RCU reuse).
        let ((local_port, remote_port, daddr, head_ok), (after, after_ok)) = if TYPED {
            let tp = typed_tcp_sock(sk);
            (
                connection_typed(tp),
                (tp.load::<u8>(offset!(icsk_probes_out)), true),
            )
        } else {
            (
                connection(sk),
                read_or_zero::<u8>(sk, offset!(icsk_probes_out)),
            )
        };
        let same = head_ok
            && local_port == rec.local_port
            && remote_port == rec.remote_port
            && (rec.family != AF_INET
                || daddr
                    == [
                        rec.remote_addr[0],
                        rec.remote_addr[1],
                        rec.remote_addr[2],
                        rec.remote_addr[3],
                    ]);
        if same && after_ok {
            rec.probes_out_after = after;
        } else {
            // Its probes are counted all the same; what the socket says after is not known.
            rec.flags |= record_flags::EXIT_UNVERIFIED;
        }
    }
    if let Some(counters) = netns_counters(rec) {
        // SAFETY: a map value (see `netns_counters`).
        unsafe {
            add(&raw mut (*counters).expiries, 1);
            let created = core::ptr::read_volatile(&raw const (*counters).created_ns);
            if created == 0 || created > unseen_since {
                unseen = 0;
            }
            let probes = u64::from(rec.probes_sent) - swept + unseen;
            if probes != 0 {
                add(&raw mut (*counters).probes, probes);
            }
            // An entry this exit created (the namespace's first expiry or close, or one the
            // retention sweep had deleted) is newer than this expiry's start, yet no probe on
            // this CPU came between its `after` and now: the next gap here belongs to it.
            if seen_now && created > slot.seen_ns {
                slot.seen_ns = created;
            }
        }
    }
    set_counting(&raw mut tctx.counting, 0);
    // Only connections the agent's table takes in may be tracked. A connection with traffic
    // expires every idle without a probe, and its close stays in the kernel.
    if expiry_enters_table(rec.probes_sent, rec.probes_out_before) {
        mark_tracked(rec.remote_port, rec.local_port);
    } else if !report_keepalive_off() && !may_be_tracked(rec.remote_port, rec.local_port) {
        // Nor is such an expiry sent, counted above: the table neither takes the connection in
        // nor holds it, and only the event stream and aggregates by workload
        // (`report_keepalive_off`) read every expiry. Most keepalive expiries of a busy node
        // are these (every connection with traffic, once per idle).
        return 0;
    }
    send_expiry(&tctx.snapshot, &mut tctx.expiry);
    0
}

/// This CPU's per-CPU offset: how far this CPU's copy of a per-CPU object lies from the
/// object's address as allocated, the same for every per-CPU object. Programs have no
/// `__per_cpu_offset` (not in kallsyms without `CONFIG_KALLSYMS_ALL`, nor in BTF), so it is
/// measured on our own per-CPU map: where its element is on this CPU, less the element's
/// allocated address (`bpf_array.pptrs[0]`). Once per CPU; 0 (never a real offset on SMP)
/// stays unknown and is measured again.
#[inline(always)]
fn cpu_offset(tctx: &mut TimerContext) -> Option<u64> {
    if tctx.cpu_offset != 0 {
        return Some(tctx.cpu_offset);
    }
    let map = address_of((&raw const TIMER_CONTEXT).cast())?;
    let allocated = read::<u64>(map as *const u8, offset!(bpf_array_pptrs)).ok()?;
    let here = address_of((tctx as *const TimerContext).cast())?;
    tctx.cpu_offset = here.wrapping_sub(allocated);
    Some(tctx.cpu_offset)
}

/// A pointer's value as a number the program may do arithmetic on. The verifier keeps a map
/// pointer typed whatever the program does with it, except through memory a helper wrote: so
/// a helper copies it from the stack.
#[inline(always)]
fn address_of(pointer: *const u8) -> Option<u64> {
    read::<u64>((&raw const pointer).cast(), 0).ok()
}

/// Slot `index` of this CPU's namespaces ([`TimerContext::counters`]).
#[inline(always)]
fn slot_of(tctx: &mut TimerContext, index: usize) -> &mut CounterSlot {
    // SAFETY: masked to the array's length (a power of two), which the verifier sees too; not
    // indexed, since a bounds check's panic path ends without an exit, which it refuses.
    unsafe { &mut *tctx.counters.as_mut_ptr().add(index & (COUNTER_SLOTS - 1)) }
}

/// Where this CPU's `TCPKeepAlive` of namespace `net` (whose cookie is `cookie`) is, and the
/// namespace's slot, in `tctx.counter_slot` (the address: [`keepalive_counter`]). A namespace may
/// be in any slot of the set [`counter_slot`] picks (so it takes more namespaces than the set
/// has slots, picking one set, to push one out); the counter is worked out again only when
/// none holds it, into the slot whose namespace was seen longest ago. A namespace freed and
/// another allocated at its address has another cookie (`hash_mix` on 5.10: 1 in 2^32 that two
/// draws match), and an unknown cookie (0) is never taken for a match.
#[inline(always)]
fn keepalive_mib(tctx: &mut TimerContext, net: *const u8, cookie: u64) -> Option<u64> {
    let set = counter_slot(cookie) & !(COUNTER_SET_SLOTS - 1);
    // The slot whose namespace's last expiry seen here is oldest (0, none known, is oldest).
    let (mut index, mut oldest_ns) = (set, u64::MAX);
    for way in 0..COUNTER_SET_SLOTS {
        let slot = slot_of(tctx, set | way);
        if cookie != 0 && slot.cookie == cookie && slot.net == net as u64 {
            let at = slot.at;
            tctx.counter_slot = (set | way) as u32;
            return Some(at);
        }
        if slot.seen_ns < oldest_ns {
            (index, oldest_ns) = (set | way, slot.seen_ns);
        }
    }
    // The exit reads the slot only if the counter is found (`keepalive_mib` not 0).
    tctx.counter_slot = index as u32;
    let at = keepalive_counter(net, cpu_offset(tctx)?)?;
    // Each time a namespace takes a slot, a helper read of the counter itself: a typed load
    // that faults reads 0 at both hooks, which would count no probe without saying so.
    read::<u64>(at as *const u8, 0).ok()?;
    if slot_of(tctx, index).net != 0 {
        tctx.slots_taken_over += 1;
    }
    let slot = slot_of(tctx, index);
    slot.net = net as u64;
    slot.cookie = cookie;
    slot.at = at;
    // No memory yet; and a `seen` past this namespace's counter would read as a sweep's (exit).
    slot.seen = 0;
    slot.seen_ns = 0;
    slot.before_first_seen = 0;
    Some(at)
}

/// The address of namespace `net`'s `TCPKeepAlive` on the CPU whose per-CPU offset is `cpu`:
/// its `net_statistics` (a per-CPU pointer, read with a helper so that it is a number) plus
/// the offset; `None` when the pointer cannot be read or is not set yet.
#[inline(always)]
fn keepalive_counter(net: *const u8, cpu: u64) -> Option<u64> {
    let statistics = read::<u64>(net, offset!(net_mib_statistics)).ok()?;
    (statistics != 0).then(|| {
        statistics
            .wrapping_add(cpu)
            .wrapping_add(offset!(mib_tcp_keepalive) as u64)
    })
}

/// The counter at `at`: a typed load where the kernel has `bpf_rdonly_cast` (which reads 0 if
/// it faults: [`keepalive_mib`] checked the address with a helper read once per namespace),
/// else a helper read.
#[inline(always)]
fn load_mib<const TYPED: bool>(at: u64) -> Option<u64> {
    if TYPED {
        // Any struct serves as the cast's type: offset 0 of `struct tcp_sock` is an 8-byte
        // member (`skc_addrpair`), so the verifier accepts an 8-byte load there.
        Some(typed_tcp_sock(at as *const u8).load::<u64>(0))
    } else {
        read::<u64>(at as *const u8, 0).ok()
    }
}

/// Never attached: the agent runs it on each CPU in turn (`BPF_PROG_TEST_RUN` with
/// `BPF_F_TEST_RUN_ON_CPU`, from a thread on another CPU, so it runs in that CPU's interrupt
/// with interrupts off, `kernel/counter_sweep.rs`) to add the probes of the expiries the kernel
/// ran no program for after the last one it did in a namespace on that CPU: the exits count a
/// gap only at the namespace's next expiry seen there, and there may be none (the burst came
/// last, the pod went away). Each slot whose counter grew since is checked to be its
/// namespace's, still alive, before its growth is added, and its memory moves up to the
/// counter: an expiry it came in the middle of (after its entry) then counts only what grew
/// after (its exit's `swept`). Counts what it added, and a run that interrupted a timer program
/// in the middle of a slot, in [`COUNTER_SWEEP_TOTALS`].
#[raw_tracepoint]
pub(crate) fn counter_sweep(ctx: RawTracePointContext) -> i32 {
    // The test run's context names the sweeping thread. The kernel runs the program in that
    // thread, with interrupts on, when the thread is on the CPU asked for (it was moved since
    // it pinned itself: hotplug, a cpuset change), and a timer softirq could then run a whole
    // expiry between this program's read of a slot and its update of it. The thread's id is
    // its id in the agent's PID namespace (a pod's, in the DaemonSet), which only that
    // namespace's view of the current task can match.
    let sweeper = SweepContext {
        thread: ctx.arg(0),
        pidns_dev: ctx.arg(1),
        pidns_ino: ctx.arg(2),
        check_only: ctx.arg(3),
    };
    let mut current = bpf_pidns_info { pid: 0, tgid: 0 };
    // SAFETY: the helper writes `size` bytes to `current`, on our stack.
    let found = unsafe {
        bpf_get_ns_current_pid_tgid(
            sweeper.pidns_dev,
            sweeper.pidns_ino,
            &raw mut current,
            core::mem::size_of::<bpf_pidns_info>() as u32,
        )
    } == 0;
    if found && u64::from(current.pid) == sweeper.thread {
        let why = if sweeper.check_only != 0 {
            sweep_totals::RECOGNISED
        } else {
            sweep_totals::IN_CALLER
        };
        add_to_sweep_totals(why, 1);
        return 0;
    }
    if sweeper.check_only != 0 {
        return 0;
    }
    let Some(tctx) = TIMER_CONTEXT.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: per-CPU slot; this run has the CPU to itself (interrupts off), and a timer
    // program it interrupted in the middle of a slot says so in `counting`.
    let tctx = unsafe { &mut *tctx };
    if tctx.counting != 0 {
        add_to_sweep_totals(sweep_totals::BUSY, 1);
        return 0;
    }
    // 0: no keepalive expiry has found a counter on this CPU yet, so no slot holds one.
    let cpu = tctx.cpu_offset;
    if cpu == 0 {
        return 0;
    }
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let mut added = 0;
    let mut index = 0;
    while index < COUNTER_SLOTS {
        let slot = slot_of(tctx, index);
        index += 1;
        if slot.seen_ns == 0 {
            continue;
        }
        // Read before the namespace is checked, which is only worth doing when it grew: the
        // value of a freed counter is never used (a namespace found alive below was alive
        // here too).
        let Ok(counter) = read::<u64>(slot.at as *const u8, 0) else {
            slot.seen_ns = 0;
            continue;
        };
        let gap = counter.wrapping_sub(slot.seen);
        if gap == 0 {
            continue;
        }
        let inum = match namespace_alive(slot, cpu) {
            Alive::Yes(inum) => inum,
            Alive::Unsure => continue,
            Alive::No => {
                slot.seen_ns = 0;
                continue;
            }
        };
        if gap >= UNSEEN_PROBES_BOUND {
            uncounted(Uncounted::ExpiryCounterUnreadable);
            slot.seen_ns = 0;
            continue;
        }
        let key = NetnsKey {
            cookie: slot.cookie,
            inum,
            _pad: 0,
        };
        // Not created here: no entry means the agent's retention sweep deleted an idle
        // namespace's, whose next entry starts from what happens after it (as at an exit).
        if let Some(counters) = existing_netns_counters(&key) {
            // SAFETY: a map value, valid while the program runs.
            let created = unsafe { core::ptr::read_volatile(&raw const (*counters).created_ns) };
            if created != 0 && created <= slot.seen_ns {
                // SAFETY: as above.
                add(unsafe { &raw mut (*counters).probes }, gap);
                added += gap;
            }
        }
        slot.seen = counter;
        slot.seen_ns = now;
    }
    if added != 0 {
        add_to_sweep_totals(sweep_totals::PROBES, added);
    }
    0
}

/// What [`counter_sweep`] did on each CPU (indices in [`sweep_totals`]), read by the agent
/// after each sweep.
#[map]
static COUNTER_SWEEP_TOTALS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(sweep_totals::COUNT, 0);

#[inline(always)]
fn add_to_sweep_totals(index: u32, n: u64) {
    if let Some(total) = COUNTER_SWEEP_TOTALS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, written only by this program, which runs with interrupts off.
        unsafe { *total += n };
    }
}

/// The cookie of namespace `net` as the programs key it ([`store_netns_cookie`]), 0 when it
/// cannot be read (never a namespace's).
#[inline(always)]
fn namespace_cookie(net: *const u8) -> u64 {
    let mut cookie = 0;
    store_netns_cookie(HelperRead, net, &raw mut cookie);
    cookie
}

/// Sets [`TimerContext::counting`] (at `counting`) with a store the compiler keeps in its
/// place: volatile, between two compiler fences, so that no load or store of a slot moves
/// across it.
#[inline(always)]
fn set_counting(counting: *mut u8, value: u8) {
    compiler_fence(Ordering::SeqCst);
    // SAFETY: a field of our per-CPU context.
    unsafe { core::ptr::write_volatile(counting, value) };
    compiler_fence(Ordering::SeqCst);
}

/// Whether a slot's namespace ([`counter_sweep`]) is still the one it took, alive, with its
/// counter where the slot says.
enum Alive {
    /// Yes; its inode number (the rest of its counters' key).
    Yes(u32),
    /// Freed (or freed and its memory reused): the slot forgets it.
    No,
    /// Its neighbours on the namespace list were moving: asked again at the next sweep.
    Unsure,
}

/// A namespace is freed only after it left `net_namespace_list` (`list_del_rcu`, which poisons
/// `list.prev`) and an RCU grace period passed, which cannot end while this CPU runs with
/// interrupts off: found on the list here, its counter is not freed before this run ends. A
/// struct freed and reused by another namespace has another cookie.
#[inline(always)]
fn namespace_alive(slot: &CounterSlot, cpu: u64) -> Alive {
    let net = slot.net as *const u8;
    if slot.cookie == 0 || namespace_cookie(net) != slot.cookie {
        return Alive::No;
    }
    let list = slot.net.wrapping_add(offset!(net_list) as u64);
    // Reading through a poisoned `prev` faults; a live one points back at the namespace, unless
    // a neighbour is being added or removed on another CPU right now.
    let Ok(prev) = read::<u64>(net, offset!(net_list) + 8) else {
        return Alive::No;
    };
    match read::<u64>(prev as *const u8, 0) {
        Err(_) => return Alive::No,
        Ok(next) if next != list => return Alive::Unsure,
        Ok(_) => {}
    }
    // Read again now that it is known to be on the list: a struct freed and reused between
    // the first read and the list's is another namespace's.
    if namespace_cookie(net) != slot.cookie {
        return Alive::No;
    }
    match (
        keepalive_counter(net, cpu),
        read::<u32>(net, offset!(net_ns_inum)),
    ) {
        (Some(at), Ok(inum)) if at == slot.at => Alive::Yes(inum),
        _ => Alive::No,
    }
}

/// The connection's local and remote port (host order), its IPv4 remote address, and whether
/// they could be read. One read where `skc_daddr`, `skc_dport` and `skc_num` lie in the first
/// 16 bytes of `sock_common` (every kernel so far); `skc_num` is 0 once the socket was unhashed
/// (closed on another CPU meanwhile), and `inet_sport` still holds the port then.
#[inline(always)]
fn connection(sk: *const u8) -> (u16, u16, [u8; 4], bool) {
    const HEAD: usize = 16;
    let base = offset!(skc_daddr);
    let (dport_at, num_at) = (offset!(skc_dport), offset!(skc_num));
    let (local, remote, daddr, ok) = if dport_at >= base
        && dport_at + 2 <= base + HEAD
        && num_at >= base
        && num_at + 2 <= base + HEAD
    {
        let (head, ok) = read_or_zero::<[u8; HEAD]>(sk, base);
        // SAFETY: `i + 2 <= HEAD` (checked above; the offsets are constants to the verifier
        // too). Not indexed: a bounds check's panic path ends without an exit, which the
        // verifier refuses.
        let at =
            |i: usize| unsafe { core::ptr::read_unaligned(head.as_ptr().add(i).cast::<u16>()) };
        (
            at(num_at - base),
            u16::from_be(at(dport_at - base)),
            [head[0], head[1], head[2], head[3]],
            ok,
        )
    } else {
        let (num, num_ok) = read_or_zero::<u16>(sk, num_at);
        let (dport, dport_ok) = read_or_zero::<u16>(sk, dport_at);
        let (daddr, daddr_ok) = read_or_zero::<[u8; 4]>(sk, base);
        (
            num,
            u16::from_be(dport),
            daddr,
            num_ok && dport_ok && daddr_ok,
        )
    };
    if local != 0 || !ok {
        return (local, remote, daddr, ok);
    }
    let (sport, sport_ok) = read_or_zero::<u16>(sk, offset!(inet_sport));
    (u16::from_be(sport), remote, daddr, sport_ok)
}

/// [`connection`] through typed loads: one per field, no helper call (a faulting load reads 0,
/// which no connection has as its remote port).
#[inline(always)]
fn connection_typed(tp: Typed) -> (u16, u16, [u8; 4], bool) {
    let remote = u16::from_be(tp.load::<u16>(offset!(skc_dport)));
    let daddr = tp.load::<[u8; 4]>(offset!(skc_daddr));
    let local = match tp.load::<u16>(offset!(skc_num)) {
        0 => u16::from_be(tp.load::<u16>(offset!(inet_sport))),
        num => num,
    };
    (local, remote, daddr, true)
}

/// Does nothing. Never attached by the agent: the benchmark (`cargo xtask bench`) attaches it
/// to `timer_expire_entry` to measure the per-hit floor of a tp_btf program on that hook, so
/// the costs it reports are ours alone.
#[btf_tracepoint(function = "timer_expire_entry")]
pub(crate) fn timer_entry_baseline(_ctx: BtfTracePointContext) -> i32 {
    0
}

/// The bench programs' filter on `timer_expire_entry`: the expiring timer when its callback is
/// `tcp_keepalive_timer`, from one load through the BTF-typed pointer, as the agent's entry.
#[inline(always)]
fn keepalive_timer(ctx: &BtfTracePointContext) -> Option<*const u8> {
    let timer: *const u8 = ctx.arg(0);
    let function_offset = offset!(timer_function);
    // SAFETY: the verifier checks this load against `struct timer_list` (see timer_expire_entry).
    let function = unsafe { core::ptr::read_volatile(timer.add(function_offset) as *const u64) };
    // SAFETY: read of our own static (see `offset!`).
    if function == unsafe { core::ptr::read_volatile(&raw const KEEPALIVE_TIMER_FN) } {
        Some(timer)
    } else {
        None
    }
}

/// Benchmarks only, never attached by the agent: picks the keepalive expiry out as the agent's
/// entry does, then loads one byte of the socket's first line (`skc_state`) through the typed
/// pointer and nothing else. The bench's on-CPU span (`hook-cost --span-only`) times it
/// against empty programs: what a first load from a socket line costs before the callback, a
/// large part of what the agent adds to an expiry (ARCHITECTURE, "How the cost is measured").
#[btf_tracepoint(function = "timer_expire_entry")]
pub(crate) fn timer_entry_socket_load(ctx: BtfTracePointContext) -> i32 {
    let Some(timer) = keepalive_timer(&ctx) else {
        return 0;
    };
    let sk = timer.wrapping_sub(offset!(keepalive_timer));
    // A volatile load: kept though its value is not used.
    let _state: u8 = typed_tcp_sock(sk).load(offset!(skc_state));
    0
}

/// Benchmarks only, never attached by the agent: see [`ExpirySpan`].
#[map]
static EXPIRY_SPAN: PerCpuArray<ExpirySpan> = PerCpuArray::with_max_entries(1, 0);

/// Benchmarks only. Attached before the agent starts, so on this hook it runs before the
/// agent's program: the span includes what the agent's entry costs, cache misses included.
#[btf_tracepoint(function = "timer_expire_entry")]
pub(crate) fn expiry_span_in(ctx: BtfTracePointContext) -> i32 {
    let Some(timer) = keepalive_timer(&ctx) else {
        return 0;
    };
    if let Some(span) = EXPIRY_SPAN.get_ptr_mut(0) {
        // SAFETY: per-CPU slot; timer callbacks do not nest on one CPU.
        unsafe {
            (*span).timer = timer as u64;
            (*span).start_ns = bpf_ktime_get_ns();
        }
    }
    0
}

/// Benchmarks only. Attached after the agent's programs, so it runs after the agent's exit.
#[btf_tracepoint(function = "timer_expire_exit")]
pub(crate) fn expiry_span_out(ctx: BtfTracePointContext) -> i32 {
    let timer: u64 = ctx.arg(0);
    if let Some(span) = EXPIRY_SPAN.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, see expiry_span_in.
        unsafe {
            if timer != 0 && (*span).timer == timer {
                (*span).timer = 0;
                (*span).total_ns += bpf_ktime_get_ns() - (*span).start_ns;
                (*span).expiries += 1;
            }
        }
    }
    0
}

/// Benchmarks only, never attached by the agent: see [`expiry_count_classic`].
#[map]
static EXPIRY_CLASSIC: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Benchmarks only, never attached by the agent: counts keepalive expiries as a classic
/// (perf-event) tracepoint program. The kernel runs it from the tracepoint's perf probe, not as
/// a raw-tracepoint probe like the agent's programs, and the bench compares the two counts with
/// a perf counting event's (`cargo xtask bench`, synchronized rows). Written without aya's
/// `#[tracepoint]`, whose wrapper returns 0: a classic tracepoint program returning 0 stops perf
/// from counting the event, and the bench's perf count with it.
#[unsafe(no_mangle)]
#[unsafe(link_section = "tracepoint/timer/timer_expire_entry")]
pub(crate) fn expiry_count_classic(ctx: *mut core::ffi::c_void) -> u32 {
    // `function` in the event's record: after the 8 bytes of common fields, `timer` and `now`
    // (tracefs `events/timer/timer_expire_entry/format`, unchanged since 4.x).
    // SAFETY: the verifier checks this context load against the record's size.
    let function = unsafe { core::ptr::read_volatile(ctx.cast::<u8>().add(24).cast::<u64>()) };
    // SAFETY: read of our own static (see `offset!`).
    if function == unsafe { core::ptr::read_volatile(&raw const KEEPALIVE_TIMER_FN) }
        && let Some(count) = EXPIRY_CLASSIC.get_ptr_mut(0)
    {
        // SAFETY: per-CPU slot; timer callbacks do not nest on one CPU.
        unsafe { *count += 1 };
    }
    1
}
