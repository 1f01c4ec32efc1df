//! What every program shares: the offsets and timer addresses the agent writes before load, the
//! socket snapshot, and the ring buffer with its loss counter.

use aya_ebpf::{
    bindings::{BPF_NOEXIST, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{bpf_jiffies64, bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::map,
    maps::{HashMap, PerCpuArray, RingBuf},
};
use keepalive_ebpf::{
    AF_INET6, KernelOffsets, NETNS_COUNTERS_MAX, NetnsCounters, NetnsKey, SocketRecord,
    record_flags,
};

/// Written by the agent before load (`.rodata` is frozen, so the verifier sees constants).
#[unsafe(no_mangle)]
pub(crate) static OFFSETS: KernelOffsets = unsafe { core::mem::zeroed() };
/// Addresses of `tcp_keepalive_timer` and `tcp_write_timer` from `/proc/kallsyms`.
#[unsafe(no_mangle)]
pub(crate) static KEEPALIVE_TIMER_FN: u64 = 0;
#[unsafe(no_mangle)]
pub(crate) static WRITE_TIMER_FN: u64 = 0;

/// Default size; the agent overrides it with `--ring-buffer.bytes`.
#[map]
pub(crate) static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

#[map]
pub(crate) static RESERVE_FAILURES: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// `SK_RST_REASON_TCP_KEEPALIVE_TIMEOUT`, or `u32::MAX` before 6.12 (no active-reset reasons).
#[unsafe(no_mangle)]
pub(crate) static KEEPALIVE_RST_REASON: u32 = u32::MAX;
/// Unread bytes past which a submit wakes the agent; below it records wait for the agent's
/// poll timer. Written by the agent before load (a quarter of the ring).
#[unsafe(no_mangle)]
pub(crate) static WAKEUP_BYTES: u64 = 0;

/// Exact counters per namespace, bumped with atomic adds (shared by every CPU; contention is
/// per namespace and rare next to the rest of a hook).
#[map]
pub(crate) static NETNS_COUNTERS: HashMap<NetnsKey, NetnsCounters> =
    HashMap::with_max_entries(NETNS_COUNTERS_MAX, 0);

#[map]
pub(crate) static NETNS_COUNTERS_FULL: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// The counters of a record's namespace, created at 0 on its first event; `None` when the map
/// is full (counted).
#[inline(always)]
pub(crate) fn netns_counters(rec: &SocketRecord) -> Option<*mut NetnsCounters> {
    let key = NetnsKey {
        cookie: rec.netns_cookie,
        inum: rec.netns,
        _pad: 0,
    };
    // Map values stay valid while the program runs (RCU); a deletion by the agent meanwhile
    // only loses this add, for a namespace it forgot.
    if let Some(counters) = NETNS_COUNTERS.get_ptr_mut(key) {
        return Some(counters);
    }
    // Another CPU may insert the same key first: NOEXIST keeps its counts.
    if NETNS_COUNTERS
        .insert(key, NetnsCounters::default(), BPF_NOEXIST as u64)
        .is_err()
        && NETNS_COUNTERS.get_ptr(key).is_none()
    {
        if let Some(count) = NETNS_COUNTERS_FULL.get_ptr_mut(0) {
            // SAFETY: per-CPU slot, and BPF programs are not preempted on their CPU.
            unsafe { *count += 1 };
        }
        return None;
    }
    NETNS_COUNTERS.get_ptr_mut(key)
}

/// Adds `n` to a counter shared by every CPU. The BPF target has no compare-and-swap, so
/// `AtomicU64::fetch_add` does not exist there; the intrinsic with its result unused compiles to
/// the plain atomic add (`lock *(u64 *)(r + off) += r`) every kernel accepts, not the fetch
/// variant that needs 5.12.
#[inline(always)]
pub(crate) fn add(counter: *mut u64, n: u64) {
    // SAFETY: an aligned u64 inside a map value, only ever updated atomically.
    let _ = unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            counter, n,
        )
    };
}

#[inline(always)]
pub(crate) fn read<T>(base: *const u8, offset: usize) -> Result<T, i64> {
    // SAFETY: bpf_probe_read_kernel copes with any address; TCP sockets come from a
    // SLAB_TYPESAFE_BY_RCU cache, so a stale pointer reads another socket, never faults.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(offset) as *const T).map_err(i64::from) }
}

/// Copies what the classifier and the metrics need from a `struct tcp_sock`.
#[inline(always)]
pub(crate) fn snapshot(sk: *const u8, rec: &mut SocketRecord) -> Result<(), i64> {
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
    rec.netns_cookie = read::<u64>(net, offset!(net_cookie)).unwrap_or(0);
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

/// Sends a record to the agent. Without a flag, each submit that finds the agent caught up
/// queues an irq_work to wake it (an interrupt a hypervisor handles, per record under churn);
/// instead records wait for the agent's poll timer until a quarter of the ring is unread.
#[inline(always)]
pub(crate) fn emit(rec: &SocketRecord) {
    match EVENTS.reserve::<SocketRecord>(0) {
        Some(mut entry) => {
            entry.write(*rec);
            // SAFETY: read of our own static (see `offset!`).
            let wakeup_bytes = unsafe { core::ptr::read_volatile(&raw const WAKEUP_BYTES) };
            let flags = if EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= wakeup_bytes {
                BPF_RB_FORCE_WAKEUP
            } else {
                BPF_RB_NO_WAKEUP
            };
            entry.submit(flags as u64);
        }
        None => {
            if let Some(count) = RESERVE_FAILURES.get_ptr_mut(0) {
                // SAFETY: per-CPU slot, and BPF programs are not preempted on their CPU.
                unsafe { *count += 1 };
            }
        }
    }
}
