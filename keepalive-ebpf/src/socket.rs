//! What every program shares: the offsets and timer addresses the agent writes before load, the
//! socket snapshot, and the ring buffer with its loss counter.

use aya_ebpf::{
    helpers::{bpf_jiffies64, bpf_ktime_get_ns, generated::bpf_probe_read_kernel},
    macros::map,
    maps::{PerCpuArray, RingBuf},
};
use keepalive_ebpf::{AF_INET6, KernelOffsets, SocketRecord, record_flags};

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

/// Reads a `T` at `base + offset`. The destination is zeroed first: LLVM may load it before
/// checking the helper's result, and verifiers before 6.x refuse a read of stack the program
/// never wrote ("invalid read from stack"), even on the path that discards it.
#[inline(always)]
pub(crate) fn read<T>(base: *const u8, offset: usize) -> Result<T, i64> {
    let mut value = core::mem::MaybeUninit::<T>::zeroed();
    // SAFETY: bpf_probe_read_kernel copes with any address (TCP sockets come from a
    // SLAB_TYPESAFE_BY_RCU cache, so a stale pointer reads another socket, never faults) and
    // writes at most `size_of::<T>()` bytes into `value`.
    let ret = unsafe {
        bpf_probe_read_kernel(
            value.as_mut_ptr().cast(),
            core::mem::size_of::<T>() as u32,
            base.wrapping_add(offset).cast(),
        )
    };
    if ret == 0 {
        // SAFETY: the helper filled every byte; the programs read only plain integers and
        // byte arrays, valid for any bit pattern (and zero is valid too).
        Ok(unsafe { value.assume_init() })
    } else {
        Err(ret)
    }
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
    // Stored in each branch (volatile): merged into one value, LLVM kept it in a stack slot
    // that only one branch writes, and 5.10's verifier refuses that read on the other.
    let cookie = &raw mut rec.netns_cookie;
    // SAFETY: `cookie` points into `rec`, alive for this call.
    unsafe { core::ptr::write_volatile(cookie, 0) };
    if offset!(net_cookie_lazy) != 0 {
        if let Ok(mix) = read::<u32>(net, offset!(net_hash_mix)) {
            // SAFETY: as above.
            unsafe { core::ptr::write_volatile(cookie, (1 << 32) | u64::from(mix)) };
        }
    } else if let Ok(value) = read::<u64>(net, offset!(net_cookie)) {
        // SAFETY: as above.
        unsafe { core::ptr::write_volatile(cookie, value) };
    }
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
pub(crate) fn emit(rec: &SocketRecord) {
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
