//! What every program shares: the offsets and timer addresses the agent writes before load, the
//! socket snapshot, and the ring buffer with its loss counter.

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_NOEXIST, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_jiffies64, bpf_ktime_get_ns,
        generated::bpf_probe_read_kernel as bpf_probe_read_kernel_raw,
    },
    macros::map,
    maps::{Array, HashMap, PerCpuArray, RingBuf},
};
use keepalive_ebpf::{
    AF_INET6, DropReason, ExpiryRecord, KernelOffsets, NETNS_COUNTER_SLOTS, NETNS_COUNTERS_MAX,
    NetnsCounterSlot, NetnsCounters, NetnsKey, SNAPSHOT_REGIONS as SNAPSHOT_REGION_COUNT,
    SNAPSHOT_SCRATCH_BYTES, SnapshotRegion, SocketRecord, TrackedEpochs, TrackedMarks, Uncounted,
    ablation::{SHORT_RECORD_BYTES, ablated},
    netns_counter_slot, record_flags, tracked_slot,
};

/// Written by the agent before load (`.rodata` is frozen, so the verifier sees constants).
#[unsafe(no_mangle)]
pub(crate) static OFFSETS: KernelOffsets = unsafe { core::mem::zeroed() };
/// Addresses of `tcp_keepalive_timer` and `tcp_write_timer` from `/proc/kallsyms`.
#[unsafe(no_mangle)]
pub(crate) static KEEPALIVE_TIMER_FN: u64 = 0;
#[unsafe(no_mangle)]
pub(crate) static WRITE_TIMER_FN: u64 = 0;

/// `struct tcp_sock`'s BTF id, for [`typed_tcp_sock`]; written by the agent before load where
/// the kernel has `bpf_rdonly_cast`.
#[unsafe(no_mangle)]
pub(crate) static TCP_SOCK_BTF_ID: u32 = 0;

/// The socket behind a plain address, typed as `struct tcp_sock *` by the kfunc
/// `bpf_rdonly_cast` (6.2+): the verifier then checks each load against the type and turns it
/// into a load that reads 0 if it faults, with no helper call and no copy. The kfunc itself
/// costs nothing: the verifier replaces the call with a register move. Compiled as a call of
/// helper [`keepalive_ebpf::RDONLY_CAST_CALL`], which the agent rewrites into the kfunc call
/// before load; only programs the agent loads where the kernel has the kfunc may use it.
#[inline(always)]
pub(crate) fn typed_tcp_sock(sk: *const u8) -> Typed {
    // SAFETY: a call the agent rewrites into `bpf_rdonly_cast(void *, u32 btf_id)`, which only
    // retypes its argument; the BTF id comes from frozen `.rodata`, a constant the verifier
    // checks names a struct.
    unsafe {
        let cast: unsafe extern "C" fn(*const u8, u32) -> *const u8 =
            core::mem::transmute(keepalive_ebpf::RDONLY_CAST_CALL as usize);
        Typed(cast(
            sk,
            core::ptr::read_volatile(&raw const TCP_SOCK_BTF_ID),
        ))
    }
}

/// Default size; the agent overrides it with `--ring-buffer.bytes`.
#[map]
pub(crate) static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

#[map]
pub(crate) static RESERVE_FAILURES: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// `SK_RST_REASON_TCP_KEEPALIVE_TIMEOUT`, or `u32::MAX` before 6.12 (no active-reset reasons).
#[unsafe(no_mangle)]
pub(crate) static KEEPALIVE_RST_REASON: u32 = u32::MAX;
/// Records a CPU submits without waking the agent before the next one wakes it; until then
/// records wait for the agent's poll timer. Written by the agent before load: a quarter of the
/// ring in the largest records, shared by the online CPUs. The count is not reset when the
/// agent drains on its timer, so a CPU may wake it with less unread: one wakeup per this many
/// records at most, against one per record without the flag.
#[unsafe(no_mangle)]
pub(crate) static WAKEUP_RECORDS: u64 = 1;

/// Per CPU: records submitted since this CPU last woke the agent.
#[map]
static UNWOKEN_RECORDS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// 0: a close of a connection without `SO_KEEPALIVE` is counted in `NETNS_COUNTERS` and not
/// sent to the agent (it never probed, so no per-connection state of the agent waits for it),
/// nor is a keepalive connection's close or expiry without a probe that its table does not
/// hold ([`TRACKED`]); 1: sent too, for per-connection series of every drop, the event stream,
/// or aggregates by workload. Written by the agent before load.
#[unsafe(no_mangle)]
pub(crate) static REPORT_KEEPALIVE_OFF: u8 = 0;

/// Whether every close and keepalive expiry goes to the agent (see [`REPORT_KEEPALIVE_OFF`]).
#[inline(always)]
pub(crate) fn report_keepalive_off() -> bool {
    // SAFETY: read of our own static (see `offset!`).
    unsafe { core::ptr::read_volatile(&raw const REPORT_KEEPALIVE_OFF) != 0 }
}

/// The smallest node-wide middlebox idle timeout in jiffies (`--idle-timeout-threshold`, IPVS's),
/// 0 for none: a drop on a send after at least this much silence
/// (`keepalive_ebpf::idle_kill_candidate`) is sent to the agent whatever `REPORT_KEEPALIVE_OFF`
/// says, since it may be an idle kill. A map, not a load-time constant: the agent rewrites it
/// when the node's thresholds change (IPVS set up after it started). Read only for drops after
/// a silence.
#[map]
static IDLE_KILL_JIFFIES: Array<u32> = Array::with_max_entries(1, 0);

/// [`IDLE_KILL_JIFFIES`].
#[inline(always)]
pub(crate) fn idle_kill_jiffies() -> u32 {
    IDLE_KILL_JIFFIES.get(0).copied().unwrap_or(0)
}

/// Which connections the agent's table may hold ([`TrackedMarks`]): the orderly close of a
/// keepalive connection whose slot does not hold a live mark tells the agent nothing and is
/// counted without being sent (the bulk of the closes of short keepalive connections, Go's
/// default dialer's), and so is a drop that is neither a keepalive drop nor an idle-kill
/// candidate; so is a keepalive expiry that neither probed nor found probes unanswered
/// (traffic flowing). Mmapped by the agent, which moves the epochs on and renews its connections'
/// marks. Bytes, not bits: a byte store needs no atomic read-modify-write (5.12+) to keep
/// another CPU's mark.
#[map]
static TRACKED: Array<TrackedMarks> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// The epochs and the slot of the connection with these ports ([`tracked_slot`]).
#[inline(always)]
fn tracked(remote_port: u16, local_port: u16) -> Option<(TrackedEpochs, *mut u8)> {
    let marks = TRACKED.get_ptr_mut(0)?;
    let index = tracked_slot(remote_port, local_port);
    // SAFETY: a map value; `index` is below the slots' length (`tracked_slot`'s arithmetic
    // bounds it, and the verifier follows that arithmetic). The epochs are one aligned `u32`
    // the agent writes in one store.
    unsafe {
        let epochs = TrackedEpochs::from_bits(core::ptr::read_volatile(
            (&raw const (*marks).epochs).cast::<u32>(),
        ));
        Some((epochs, (&raw mut (*marks).slots).cast::<u8>().add(index)))
    }
}

/// Marks the connection with these ports as one the agent's table may hold (see [`TRACKED`]).
#[inline(always)]
pub(crate) fn mark_tracked(remote_port: u16, local_port: u16) {
    if let Some((epochs, slot)) = tracked(remote_port, local_port) {
        let mark = epochs.mark();
        // SAFETY: a byte of the map value (see `tracked`); a plain byte load and store. Stored
        // only when it changes: a connection expires again and again, and a store would take
        // the line from the CPUs that hold it.
        unsafe {
            if core::ptr::read_volatile(slot) != mark {
                core::ptr::write_volatile(slot, mark);
            }
        }
    }
}

/// Whether the agent's table may hold the connection with these ports (see [`TRACKED`]);
/// `true` when the map cannot tell.
#[inline(always)]
pub(crate) fn may_be_tracked(remote_port: u16, local_port: u16) -> bool {
    match tracked(remote_port, local_port) {
        // SAFETY: as in `mark_tracked`.
        Some((epochs, slot)) => epochs.holds(unsafe { core::ptr::read_volatile(slot) }),
        None => true,
    }
}

/// Exact counters per namespace, bumped with atomic adds (shared by every CPU; contention is
/// per namespace and rare next to the rest of a hook).
#[map]
pub(crate) static NETNS_COUNTERS: HashMap<NetnsKey, NetnsCounters> =
    HashMap::with_max_entries(NETNS_COUNTERS_MAX, 0);

/// The namespaces' counters the agent placed where no hash finds them (see
/// [`NetnsCounterSlot`]).
#[map]
static NETNS_SLOTS: Array<NetnsCounterSlot> =
    Array::with_max_entries(NETNS_COUNTER_SLOTS as u32, BPF_F_MMAPABLE);

#[map]
static NETNS_INSERTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[map]
pub(crate) static NETNS_COUNTERS_FULL: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[map]
pub(crate) static UNCOUNTED: PerCpuArray<u64> = PerCpuArray::with_max_entries(Uncounted::COUNT, 0);

/// Counts an event the programs saw but could not add to the namespace totals.
#[inline(always)]
pub(crate) fn uncounted(why: Uncounted) {
    if let Some(count) = UNCOUNTED.get_ptr_mut(why as u32) {
        // SAFETY: per-CPU slot, and BPF programs are not preempted on their CPU.
        unsafe { *count += 1 };
    }
}

/// The counters of a record's namespace, created at 0 on its first event; `None` when the map
/// is full (counted).
#[inline(always)]
pub(crate) fn netns_counters(rec: &SocketRecord) -> Option<*mut NetnsCounters> {
    netns_counters_of(NetnsKey {
        cookie: rec.netns_cookie,
        inum: rec.netns,
        _pad: 0,
    })
}

/// The value a new namespace's counters start from. Passed by address (a map value the verifier
/// knows): built on the stack, `NetnsCounters::default()` compiled to the BPF target's
/// byte-by-byte `memset` loop, 5 instructions per byte of it that the 5.10 and 6.1 verifiers
/// walk again on every path that inserts a namespace, which put the close program past their
/// million-instruction limit.
static ZERO_COUNTERS: NetnsCounters = NetnsCounters {
    created_ns: 0,
    expiries: 0,
    probes: 0,
    orderly_closes: 0,
    drops: [0; DropReason::COUNT],
};

/// [`netns_counters`] by key.
#[inline(always)]
// The zero value by address, not by value: a copy would be built on the stack (see
// `ZERO_COUNTERS`).
#[allow(clippy::needless_borrows_for_generic_args)]
pub(crate) fn netns_counters_of(key: NetnsKey) -> Option<*mut NetnsCounters> {
    if const { ablated("counters") } {
        return None;
    }
    // Map values stay valid while the program runs (RCU); a deletion by the agent meanwhile
    // only loses this add, for a namespace it forgot.
    if let Some(counters) = existing_netns_counters(&key) {
        return Some(counters);
    }
    // Another CPU may insert the same key first: NOEXIST keeps its counts.
    let inserted = NETNS_COUNTERS
        .insert(key, &ZERO_COUNTERS, BPF_NOEXIST as u64)
        .is_ok();
    if !inserted && NETNS_COUNTERS.get_ptr(key).is_none() {
        if let Some(count) = NETNS_COUNTERS_FULL.get_ptr_mut(0) {
            // SAFETY: per-CPU slot, and BPF programs are not preempted on their CPU.
            unsafe { *count += 1 };
        }
        return None;
    }
    let counters = NETNS_COUNTERS.get_ptr_mut(key)?;
    if inserted {
        // Stamped once, by the program that inserted it: what tells the agent which of two
        // namespaces on one inode is the live one (see `NetnsCounters::created_ns`).
        // SAFETY: a map value, valid while the program runs (see above).
        unsafe { core::ptr::write_volatile(&raw mut (*counters).created_ns, bpf_ktime_get_ns()) };
        if let Some(inserts) = NETNS_INSERTS.get_ptr_mut(0) {
            // SAFETY: per-CPU slot; a program nested on this CPU can at worst lose one count,
            // and any later insert moves it again (the agent looks for a change).
            unsafe { *inserts += 1 };
        }
    }
    Some(counters)
}

/// The counters of namespace `key` if it has any: at its slot when the agent placed it there
/// (see [`NetnsCounterSlot`]), else its entry in the hash map.
#[inline(always)]
pub(crate) fn existing_netns_counters(key: &NetnsKey) -> Option<*mut NetnsCounters> {
    if let Some(slot) = NETNS_SLOTS.get_ptr_mut(netns_counter_slot(key) as u32) {
        // SAFETY: a map value, valid while the program runs; the agent writes these words
        // with single aligned stores, so each load sees one whole value. `inum` first: the
        // agent writes it last, after the rest (a slot it cleared has 0 there).
        let placed = unsafe {
            core::ptr::read_volatile(&raw const (*slot).key.inum) == key.inum
                && core::ptr::read_volatile(&raw const (*slot).key.cookie) == key.cookie
                && core::ptr::read_volatile(&raw const (*slot).counters.created_ns) != 0
        };
        if placed {
            // SAFETY: as above.
            return Some(unsafe { &raw mut (*slot).counters });
        }
    }
    NETNS_COUNTERS.get_ptr_mut(key)
}

/// Adds `n` to a counter shared by every CPU. The BPF target has no compare-and-swap, so
/// `AtomicU64::fetch_add` does not exist there; the intrinsic with its result unused compiles to
/// the plain atomic add (`lock *(u64 *)(r + off) += r`) every kernel accepts, not the fetch
/// variant that needs 5.12.
#[inline(always)]
pub(crate) fn add(counter: *mut u64, n: u64) {
    if const { ablated("counter-adds") } {
        // The counter's line is still loaded, shared with the other CPUs' loads: what is left
        // out is the add, and the line's trips between the CPUs that make it.
        // SAFETY: as below.
        let _ = unsafe { core::ptr::read_volatile(counter) };
        return;
    }
    // SAFETY: an aligned u64 inside a map value, only ever updated atomically.
    let _ = unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            counter, n,
        )
    };
}

/// A member of `struct sock` loaded through the BTF-typed pointer a tracepoint gives
/// (`inet_sock_set_state`, `tcp_send_reset`); a faulting load reads 0, the verifier's
/// probe-load semantics.
#[inline(always)]
pub(crate) fn sock_field<T: Copy>(sk: *const u8, offset: usize) -> T {
    // SAFETY: the verifier checks the load against `struct sock` (offsets come from frozen
    // `.rodata`, so it sees constants).
    unsafe { core::ptr::read_volatile(sk.wrapping_add(offset) as *const T) }
}

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
        bpf_probe_read_kernel_raw(
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

/// `KernelOffsets::snapshot_regions`, written by the agent before load.
#[unsafe(no_mangle)]
pub(crate) static SNAPSHOT_REGIONS: [SnapshotRegion; SNAPSHOT_REGION_COUNT] =
    [SnapshotRegion { start: 0, len: 0 }; SNAPSHOT_REGION_COUNT];
/// `KernelOffsets::expiry_regions`, written by the agent before load.
#[unsafe(no_mangle)]
pub(crate) static EXPIRY_REGIONS: [SnapshotRegion; SNAPSHOT_REGION_COUNT] =
    [SnapshotRegion { start: 0, len: 0 }; SNAPSHOT_REGION_COUNT];

/// A per-CPU copy of the start of a socket, so the snapshot costs one helper call instead of one
/// per field. Two per CPU: a program in process context (a `close()`) can be interrupted by a
/// softirq whose program (a timer expiry, a close on receive) needs one too.
#[repr(C)]
pub(crate) struct SockCopy {
    busy: u64,
    bytes: [u64; SNAPSHOT_SCRATCH_BYTES as usize / 8],
}

#[map]
static SOCK_COPY: PerCpuArray<SockCopy> = PerCpuArray::with_max_entries(2, 0);

/// Both copies of this CPU are in use (never seen: it takes a third nesting level).
pub(crate) const EBUSY: i64 = -16;

#[inline(always)]
fn take_copy() -> Option<*mut SockCopy> {
    for slot in 0..2 {
        if let Some(copy) = SOCK_COPY.get_ptr_mut(slot) {
            // SAFETY: per-CPU slot; the busy flag keeps a nested program off it.
            unsafe {
                if (*copy).busy == 0 {
                    (*copy).busy = 1;
                    return Some(copy);
                }
            }
        }
    }
    None
}

/// A field of the copy. Offsets come from frozen `.rodata`, so the verifier checks each load
/// against the copy's size; kernel fields are naturally aligned, and so is the copy.
#[inline(always)]
fn field<T: Copy>(copy: *const u8, offset: usize) -> T {
    // SAFETY: inside the copy (the verifier refuses the program otherwise).
    unsafe { core::ptr::read(copy.wrapping_add(offset) as *const T) }
}

/// A field and whether it could be read (0 when not). Unlike a `Result` matched later, the
/// value is always defined: LLVM otherwise computes with the value's register before the
/// success check, leaving it unset on the failure path, which the 5.10 and 6.1 verifiers refuse
/// ("R9 !read_ok").
#[inline(always)]
pub(crate) fn read_or_zero<T: Copy>(base: *const u8, offset: usize) -> (T, bool) {
    // SAFETY: all-zero is a valid value of the plain integers and byte arrays read here.
    let mut value: T = unsafe { core::mem::zeroed() };
    // SAFETY: bpf_probe_read_kernel copes with any source address (see `read`).
    let ret = unsafe {
        bpf_probe_read_kernel_raw(
            (&raw mut value).cast(),
            core::mem::size_of::<T>() as u32,
            base.wrapping_add(offset).cast(),
        )
    };
    (value, ret == 0)
}

/// Copies what the classifier and the metrics need from a `struct tcp_sock`: one read per
/// region of the socket (`SNAPSHOT_REGIONS`, up to 8 reads instead of one read per field or
/// of the whole 2.3 KiB), then the namespace's fields and the owner's ids.
#[inline(always)]
pub(crate) fn snapshot(sk: *const u8, rec: &mut SocketRecord) -> Result<(), i64> {
    snapshot_then::<true, _>(sk, rec, |_| ())
}

/// What the keepalive timer's entry needs besides the record, taken from the snapshot's copy
/// instead of another read of the socket.
pub(crate) struct SendState {
    /// `skc_net`: the namespace whose `TCPKeepAlive` counts this expiry's probes.
    pub(crate) net: *const u8,
}

/// What a keepalive expiry needs of the socket (`KernelOffsets::expiry_fields`, copied by
/// `EXPIRY_REGIONS`), and the [`SendState`] from the same copy. The record's other fields
/// (timestamps, errors, window, conntrack timeout) are left as they are: its
/// `ExpiryRecord` does not carry them. Only the timer asks for it: the audit walk's program,
/// given even unused extra loads, was laid out with a loop head after its latch, which the 5.10
/// and 6.1 verifiers refuse ("back-edge").
#[inline(always)]
pub(crate) fn expiry_snapshot(sk: *const u8, rec: &mut SocketRecord) -> Result<SendState, i64> {
    snapshot_then::<false, _>(sk, rec, |c| SendState {
        net: field::<u64>(c, offset!(skc_net)) as *const u8,
    })
}

/// [`expiry_snapshot`] without a copy, from a socket typed by [`typed_tcp_sock`].
#[inline(always)]
pub(crate) fn expiry_snapshot_typed(tp: Typed, rec: &mut SocketRecord) -> Result<SendState, i64> {
    fill_record::<false, false>(tp, rec)?;
    Ok(SendState {
        net: tp.load::<u64>(offset!(skc_net)) as *const u8,
    })
}

/// Takes a per-CPU copy, snapshots the socket through it (every field when `FULL`, else a
/// keepalive expiry's), lets `then` load more fields from the filled copy, and releases the
/// copy.
#[inline(always)]
fn snapshot_then<const FULL: bool, T>(
    sk: *const u8,
    rec: &mut SocketRecord,
    then: impl FnOnce(*const u8) -> T,
) -> Result<T, i64> {
    let copy = take_copy().ok_or(EBUSY)?;
    let result = snapshot_from_copy::<FULL>(sk, copy, rec).map(|()| {
        // SAFETY: `copy` is our per-CPU slot, filled above and not yet released.
        then(unsafe { (&raw const (*copy).bytes).cast::<u8>() })
    });
    // SAFETY: our slot, taken above.
    unsafe { (*copy).busy = 0 };
    result
}

/// How a program reads a field of an object a socket points to (its namespace, its cgroup).
pub(crate) trait Follow: Copy {
    /// The field at `offset` from `object`, a pointer loaded from the socket (or a map).
    fn follow<T: Copy>(self, object: *const u8, offset: usize) -> Result<T, i64>;
}

/// Through a helper (`bpf_probe_read_kernel`): for a pointer that is a plain number to the
/// verifier.
#[derive(Clone, Copy)]
pub(crate) struct HelperRead;

impl Follow for HelperRead {
    #[inline(always)]
    fn follow<T: Copy>(self, object: *const u8, offset: usize) -> Result<T, i64> {
        read(object, offset)
    }
}

/// Where a snapshot loads the socket's fields from: the per-CPU copy ([`Copied`]) or, where
/// the hook gives one, the socket itself through a BTF-typed pointer ([`Typed`]).
pub(crate) trait SockFields: Follow {
    /// The field at `offset` from the start of the socket.
    fn load<T: Copy>(self, offset: usize) -> T;
    /// The socket's address, for the record.
    fn sk(self) -> u64;
    /// The namespace's `sysctl_tcp_keepalive_{time,intvl,probes}`: [`each_keepalive_sysctl`].
    #[inline(always)]
    fn keepalive_sysctls(self, net: *const u8) -> Result<(u32, u32, u8), i64> {
        each_keepalive_sysctl(self, net)
    }
}

/// The namespace's `sysctl_tcp_keepalive_{time,intvl,probes}`, one [`SockFields::follow`] each.
#[inline(always)]
fn each_keepalive_sysctl(c: impl SockFields, net: *const u8) -> Result<(u32, u32, u8), i64> {
    Ok((
        c.follow::<u32>(net, offset!(net_keepalive_time))?,
        c.follow::<u32>(net, offset!(net_keepalive_intvl))?,
        c.follow::<u8>(net, offset!(net_keepalive_probes))?,
    ))
}

/// The per-CPU copy of the socket's regions, which sit at their own offsets in it.
#[derive(Clone, Copy)]
struct Copied {
    sk: *const u8,
    copy: *const u8,
}

/// A pointer from the copy is a plain number to the verifier: a helper reads through it.
impl Follow for Copied {
    #[inline(always)]
    fn follow<T: Copy>(self, object: *const u8, offset: usize) -> Result<T, i64> {
        HelperRead.follow(object, offset)
    }
}

impl SockFields for Copied {
    #[inline(always)]
    fn load<T: Copy>(self, offset: usize) -> T {
        field(self.copy, offset)
    }
    #[inline(always)]
    fn sk(self) -> u64 {
        self.sk as u64
    }
    /// One read where the three lie together (`time`, `intvl`, `probes`, as in every kernel's
    /// `netns_ipv4` so far): through a plain number each [`Self::follow`] is a helper call.
    #[inline(always)]
    fn keepalive_sysctls(self, net: *const u8) -> Result<(u32, u32, u8), i64> {
        let time = offset!(net_keepalive_time);
        if offset!(net_keepalive_intvl) != time + 4 || offset!(net_keepalive_probes) != time + 8 {
            return each_keepalive_sysctl(self, net);
        }
        let [time, intvl, probes] = read::<[u32; 3]>(net, time)?;
        // `probes` is a u8: the low byte of its little-endian word.
        Ok((time, intvl, probes as u8))
    }
}

/// A `struct tcp_sock *` the verifier knows the type of (from `bpf_skc_to_tcp_sock`): each field
/// is one load it checks against the type, with no helper call and no copy. A load that faults
/// reads 0, as `bpf_probe_read_kernel` would fail.
#[derive(Clone, Copy)]
pub(crate) struct Typed(pub(crate) *const u8);

/// A pointer member loaded through a typed pointer is typed too (`struct net *`,
/// `struct cgroup *`): one more checked load.
impl Follow for Typed {
    #[inline(always)]
    fn follow<T: Copy>(self, object: *const u8, offset: usize) -> Result<T, i64> {
        // SAFETY: as in `load`, against the type of `object`'s member.
        Ok(unsafe { core::ptr::read_volatile(object.wrapping_add(offset) as *const T) })
    }
}

impl SockFields for Typed {
    #[inline(always)]
    fn load<T: Copy>(self, offset: usize) -> T {
        // SAFETY: the verifier checks the load against `struct tcp_sock` (offsets come from
        // frozen `.rodata`, so it sees constants); volatile, so LLVM does not merge two
        // neighbouring fields into one load that spans members, which the verifier refuses.
        unsafe { core::ptr::read_volatile(self.0.wrapping_add(offset) as *const T) }
    }
    #[inline(always)]
    fn sk(self) -> u64 {
        self.0 as u64
    }
    // `keepalive_sysctls` keeps the trait's three checked loads: one load spanning the three
    // members would be refused.
}

/// [`conntrack_timeout`] through a BTF-typed `struct tcp_sock *`. A call of its own (a static
/// function, so the verifier checks it with the caller's typed pointer), for the close
/// program's verification: inlined, it multiplied the paths the 5.10 and 6.1 verifiers walk.
#[inline(never)]
pub(crate) fn conntrack_timeout_typed(tp: *const u8) -> u32 {
    conntrack_timeout(Typed(tp))
}

/// The smaller of two thresholds in jiffies, 0 meaning none.
#[inline(always)]
pub(crate) fn smallest_threshold(a: u32, b: u32) -> u32 {
    match (a, b) {
        (0, x) | (x, 0) => x,
        (a, b) => a.min(b),
    }
}

/// The namespace's conntrack established timeout in jiffies when conntrack is attached to the
/// namespace for the socket's family, else 0: the idle timeout of the middlebox the namespace
/// itself is (see [`SocketRecord::conntrack_timeout`]). Attached: defragmentation has users
/// (one load, which most namespaces stop at) and conntrack's confirm hook is registered (see
/// [`conntrack_confirms`]; TPROXY and `xt_socket` enable defragmentation without conntrack).
#[inline(always)]
fn conntrack_timeout(c: impl SockFields) -> u32 {
    if offset!(net_ct_tcp_established) == 0 {
        return 0;
    }
    let net = c.load::<u64>(offset!(skc_net)) as *const u8;
    // A dual-stack socket talking to an IPv4 peer (`::ffff:a.b.c.d`, the JVM's default) sends
    // IPv4 packets, which IPv4's conntrack tracks.
    let ipv6 = c.load::<u16>(offset!(skc_family)) == AF_INET6
        && !(c.load::<u64>(offset!(skc_v6_daddr)) == 0
            && c.load::<u32>(offset!(skc_v6_daddr) + 8) == V4_MAPPED_WORD);
    let (users, local_in) = if ipv6 {
        (
            defrag_users(c, net, offset!(net_defrag_ipv6)),
            offset!(net_hooks_ipv6_local_in),
        )
    } else {
        (
            defrag_users(c, net, offset!(net_defrag_ipv4)),
            offset!(net_hooks_ipv4_local_in),
        )
    };
    if users == 0 {
        return 0;
    }
    if offset!(nf_hook_entry_size) != 0 && !conntrack_confirms(net, local_in) {
        return 0;
    }
    c.follow::<u32>(net, offset!(net_ct_tcp_established))
        .unwrap_or(0)
}

/// Bytes 8..12 of an IPv4-mapped IPv6 address (`0, 0, 0xff, 0xff`), loaded as a little-endian
/// `u32`.
const V4_MAPPED_WORD: u32 = 0xffff_0000;

/// More `NF_INET_LOCAL_IN` hooks than any namespace registers (conntrack's, defragmentation's,
/// a few chains): a bound for the verifier, and a list longer than this is not trusted.
const MAX_NF_HOOKS: usize = 64;

/// Whether the namespace's last `NF_INET_LOCAL_IN` hook (the list is sorted by priority) has
/// conntrack's confirm priority, `NF_IP_PRI_CONNTRACK_CONFIRM` (`INT_MAX`), which nothing else
/// registers at: conntrack is attached for that family. Its `nf_hook_ops` pointer lies past the
/// `nf_hook_entry` array (`nf_hook_entries_get_hook_ops`), at an offset the entry count decides:
/// helper reads, not typed loads.
#[inline(always)]
fn conntrack_confirms(net: *const u8, local_in: usize) -> bool {
    if local_in == 0 {
        return false;
    }
    let entries = match read::<u64>(net, local_in) {
        Ok(0) | Err(_) => return false,
        Ok(entries) => entries as *const u8,
    };
    let count = match read::<u16>(entries, 0) {
        Ok(count) if count > 0 && usize::from(count) <= MAX_NF_HOOKS => usize::from(count),
        _ => return false,
    };
    let last_ops = offset!(nf_hook_entries_hooks)
        + count * offset!(nf_hook_entry_size)
        + (count - 1) * core::mem::size_of::<u64>();
    match read::<u64>(entries, last_ops) {
        Ok(ops) if ops != 0 => {
            read::<i32>(ops as *const u8, offset!(nf_hook_ops_priority)) == Ok(i32::MAX)
        }
        _ => false,
    }
}

/// `net.nf.defrag_ipv{4,6}_users` at `at` (0 when the kernel has neither member), read as the
/// `bool` it was before 5.13: a 4-byte load of a 1-byte member is refused by the verifier.
#[inline(always)]
fn defrag_users(c: impl SockFields, net: *const u8, at: usize) -> u32 {
    if at == 0 {
        0
    } else if offset!(net_defrag_is_bool) != 0 {
        c.follow::<u8>(net, at).map_or(0, u32::from)
    } else {
        c.follow::<u32>(net, at).unwrap_or(0)
    }
}

/// [`snapshot`] without a copy, from a BTF-typed `struct tcp_sock *`, and without the
/// namespace's conntrack timeout: the close program reads it ([`conntrack_timeout_typed`]) only
/// for a drop that may be an idle kill (`keepalive_ebpf::may_be_idle_kill`), its one use. Most
/// closes sent are not: orderly closes with `SO_KEEPALIVE` (Go's default), resets right after
/// traffic. On a node with conntrack (every Kubernetes node) it is three helper reads and two
/// more loads.
#[inline(always)]
pub(crate) fn snapshot_typed(tp: Typed, rec: &mut SocketRecord) -> Result<(), i64> {
    fill_record::<true, false>(tp, rec)
}

// A call of its own: inlined into the close program its temporaries would push that program's
// stack past BPF's 512 bytes (LLVM does not share stack slots across inlined scopes well).
#[inline(never)]
fn snapshot_from_copy<const FULL: bool>(
    sk: *const u8,
    copy: *mut SockCopy,
    rec: &mut SocketRecord,
) -> Result<(), i64> {
    // SAFETY: `copy` is our per-CPU slot.
    let c = unsafe { (&raw mut (*copy).bytes).cast::<u8>() };
    // One read per region, each to its own offset in the copy. Written out (not a loop) so
    // each region's bounds are constants the verifier checks against the copy's size.
    macro_rules! copy_region {
        ($i:literal) => {{
            // SAFETY: read of our own static (see `offset!`).
            let region = unsafe {
                if FULL {
                    core::ptr::read_volatile(&raw const SNAPSHOT_REGIONS[$i])
                } else {
                    core::ptr::read_volatile(&raw const EXPIRY_REGIONS[$i])
                }
            };
            if region.len != 0 {
                let at = region.start as usize;
                // SAFETY: bpf_probe_read_kernel copes with any source address; TCP sockets
                // come from a SLAB_TYPESAFE_BY_RCU cache, so a stale pointer reads another
                // socket, never faults. The destination is inside the copy (verifier-checked).
                let ret = unsafe {
                    bpf_probe_read_kernel_raw(
                        c.wrapping_add(at).cast(),
                        region.len,
                        sk.wrapping_add(at).cast(),
                    )
                };
                if ret != 0 {
                    return Err(ret);
                }
            }
        }};
    }
    copy_region!(0);
    copy_region!(1);
    copy_region!(2);
    copy_region!(3);
    copy_region!(4);
    copy_region!(5);
    copy_region!(6);
    copy_region!(7);
    fill_record::<FULL, FULL>(
        Copied {
            sk,
            copy: c.cast_const(),
        },
        rec,
    )
}

/// The record's socket fields, then the namespace's and the owner's through their pointers:
/// all of them when `FULL` (the namespace's conntrack timeout only with `CONNTRACK` too), else
/// a keepalive expiry's (`KernelOffsets::expiry_fields`).
// Not inlined, for the close program's stack (see `snapshot_from_copy`).
#[inline(never)]
fn fill_record<const FULL: bool, const CONNTRACK: bool>(
    c: impl SockFields,
    rec: &mut SocketRecord,
) -> Result<(), i64> {
    rec.sk = c.sk();
    // SAFETY: helpers without preconditions.
    rec.ktime_ns = unsafe { bpf_ktime_get_ns() };
    // A keepalive expiry's record carries no jiffies (`ExpiryRecord`): one helper call less.
    // SAFETY: as above.
    rec.jiffies = if FULL { unsafe { bpf_jiffies64() } } else { 0 };
    rec.family = c.load::<u16>(offset!(skc_family));
    rec.state = c.load::<u8>(offset!(skc_state));
    rec.local_port = u16::from_be(c.load::<u16>(offset!(inet_sport)));
    rec.remote_port = u16::from_be(c.load::<u16>(offset!(skc_dport)));
    if rec.family == AF_INET6 {
        rec.local_addr = c.load::<[u8; 16]>(offset!(skc_v6_rcv_saddr));
        rec.remote_addr = c.load::<[u8; 16]>(offset!(skc_v6_daddr));
    } else {
        let local = (&raw mut rec.local_addr).cast::<u64>();
        let remote = (&raw mut rec.remote_addr).cast::<u64>();
        // SAFETY: two 8-byte words in each 16-byte address, 8-byte aligned in the record (it
        // starts with three u64s); stores, not `[0; 16]`, for the reason in `zero_record`.
        unsafe {
            core::ptr::write_volatile(local, 0);
            core::ptr::write_volatile(local.add(1), 0);
            core::ptr::write_volatile(remote, 0);
            core::ptr::write_volatile(remote.add(1), 0);
        }
        // The IPv4 addresses in network order, as the kernel keeps them, in the first 4 bytes.
        let (local_v4, remote_v4) = (
            c.load::<u32>(offset!(skc_rcv_saddr)),
            c.load::<u32>(offset!(skc_daddr)),
        );
        // SAFETY: the first 4 bytes of each address, as above.
        unsafe {
            core::ptr::write_volatile(local.cast::<u32>(), local_v4);
            core::ptr::write_volatile(remote.cast::<u32>(), remote_v4);
        }
    }
    let net = c.load::<u64>(offset!(skc_net)) as *const u8;
    rec.netns = c.follow::<u32>(net, offset!(net_ns_inum))?;
    store_netns_cookie(c, net, &raw mut rec.netns_cookie);

    let sk_flags = c.load::<u64>(offset!(skc_flags));
    rec.flags = 0;
    if sk_flags & (1 << offset!(sock_flag_keepopen)) != 0 {
        rec.flags |= record_flags::KEEPALIVE_ON;
    }
    if sk_flags & (1 << offset!(sock_flag_dead)) != 0 {
        rec.flags |= record_flags::ORPHAN;
    }
    rec.probes_out_before = c.load::<u8>(offset!(icsk_probes_out));
    rec.probes_out_after = rec.probes_out_before;
    rec.user_timeout_ms = c.load::<u32>(offset!(icsk_user_timeout));
    rec.keepalive_time = c.load::<u32>(offset!(tcp_keepalive_time));
    rec.keepalive_intvl = c.load::<u32>(offset!(tcp_keepalive_intvl));
    rec.keepalive_probes = c.load::<u8>(offset!(tcp_keepalive_probes));
    // An expiry's record carries only the effective values: where the socket sets all three
    // (as Go's dialer and many proxies do) the namespace's are not read.
    if FULL || rec.keepalive_time == 0 || rec.keepalive_intvl == 0 || rec.keepalive_probes == 0 {
        (
            rec.sysctl_keepalive_time,
            rec.sysctl_keepalive_intvl,
            rec.sysctl_keepalive_probes,
        ) = c.keepalive_sysctls(net)?;
    } else {
        (
            rec.sysctl_keepalive_time,
            rec.sysctl_keepalive_intvl,
            rec.sysctl_keepalive_probes,
        ) = (0, 0, 0);
    }
    rec.packets_out = c.load::<u32>(offset!(tcp_packets_out));
    if FULL {
        rec.lrcvtime = c.load::<u32>(offset!(icsk_ack_lrcvtime));
        rec.rcv_tstamp = c.load::<u32>(offset!(tcp_rcv_tstamp));
        rec.lsndtime = c.load::<u32>(offset!(tcp_lsndtime));
        rec.retrans_stamp = c.load::<u32>(offset!(tcp_retrans_stamp));
        rec.probes_tstamp = if offset!(icsk_probes_tstamp) != 0 {
            c.load::<u32>(offset!(icsk_probes_tstamp))
        } else {
            0
        };
        rec.snd_wnd = c.load::<u32>(offset!(tcp_snd_wnd));
        rec.sk_err = c.load::<i32>(offset!(sk_err));
        rec.sk_err_soft = c.load::<i32>(offset!(sk_err_soft));
    }
    // Ownership: both optional (no cgroup data, or an orphan without a file).
    rec.cgroup_id = if const { ablated("cgroup") } {
        0
    } else {
        let cgroup = c.load::<u64>(offset!(sk_cgroup));
        c.follow::<u64>(cgroup as *const u8, offset!(cgroup_kn))
            .and_then(|kn| c.follow::<u64>(kn as *const u8, offset!(kernfs_node_id)))
            .unwrap_or(0)
    };
    // Not for a keepalive expiry, which never asks for it: two more reads per expiry.
    rec.conntrack_timeout = if FULL && CONNTRACK {
        conntrack_timeout(c)
    } else {
        0
    };
    rec.socket_ino = if offset!(sk_ino) != 0 {
        c.load::<u64>(offset!(sk_ino))
    } else {
        match c.load::<u64>(offset!(sk_socket)) {
            0 => 0,
            // A helper even from a typed socket: the inode lies past `struct socket`, in the
            // `socket_alloc` around it, where the verifier would refuse a typed load.
            socket => read::<u64>(socket as *const u8, offset!(socket_ino)).unwrap_or(0),
        }
    };
    Ok(())
}

/// Writes the namespace's cookie (see [`SocketRecord::netns_cookie`]) to `cookie`, 0 when it
/// cannot be read. Stored in each branch (volatile): merged into one value, LLVM kept it in a
/// stack slot that only one branch writes, and 5.10's verifier refuses that read on the other.
#[inline(always)]
pub(crate) fn store_netns_cookie(c: impl Follow, net: *const u8, cookie: *mut u64) {
    // SAFETY: `cookie` points into a record or key the caller owns, alive for this call.
    unsafe { core::ptr::write_volatile(cookie, 0) };
    if offset!(net_cookie_lazy) != 0 {
        if let Ok(mix) = c.follow::<u32>(net, offset!(net_hash_mix)) {
            // SAFETY: as above.
            unsafe { core::ptr::write_volatile(cookie, (1 << 32) | u64::from(mix)) };
        }
    } else if let Ok(value) = c.follow::<u64>(net, offset!(net_cookie)) {
        // SAFETY: as above.
        unsafe { core::ptr::write_volatile(cookie, value) };
    }
}

/// The key of the socket's namespace in `NETNS_COUNTERS`, without a snapshot.
#[inline(always)]
pub(crate) fn netns_key(c: impl SockFields) -> Result<NetnsKey, i64> {
    let net = c.load::<u64>(offset!(skc_net)) as *const u8;
    let mut key = NetnsKey {
        cookie: 0,
        inum: c.follow::<u32>(net, offset!(net_ns_inum))?,
        _pad: 0,
    };
    store_netns_cookie(c, net, &raw mut key.cookie);
    Ok(key)
}

/// Sets every byte of `rec` to 0 with 8-byte stores. `SocketRecord::default()` (or `[0; N]`)
/// compiles to a call of the BPF target's `memset`, a loop that stores one byte per five
/// instructions: about 750 instructions for one record, on every reported close. Volatile, so
/// LLVM does not turn the stores back into that call.
#[inline(always)]
pub(crate) fn zero_record(rec: *mut SocketRecord) {
    const _: () = assert!(SocketRecord::SIZE == 21 * 8);
    let words = rec.cast::<u64>();
    macro_rules! zero {
        ($($i:literal)*) => {$(
            // SAFETY: word $i of the record, which is 8-byte aligned (it starts with a u64).
            unsafe { core::ptr::write_volatile(words.add($i), 0) };
        )*};
    }
    zero!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20);
}

/// Copies a record built elsewhere into the ring buffer: only the bench's `close_record_ring`
/// now, since the close program reserves its record in the ring and fills it there.
#[inline(always)]
pub(crate) fn emit(rec: &SocketRecord) {
    output::<SocketRecord>(rec);
}

/// Sends the keepalive expiry whose snapshot is `rec` to the agent, written where it is sent:
/// reserved in the ring buffer at its family's length ([`ExpiryRecord::ring_len`]: an IPv4
/// record stops after its addresses) and filled there, where filling it elsewhere and copying it
/// in (`bpf_ringbuf_output`) costs 25-45 ns more per record (hook-cost, record write rows). Each
/// branch reserves a constant length, for the verifier. A record that does not fit is counted
/// (the expiry and its probes are counted before, in the namespace's counters). A build without
/// the ring write fills `unsent` instead and sends nothing.
#[inline(always)]
pub(crate) fn send_expiry(rec: &SocketRecord, unsent: &mut ExpiryRecord) {
    if const { ablated("ring-write") } {
        unsent.fill_from(rec);
        return;
    }
    macro_rules! reserve_and_fill {
        ($reserved:ty, |$to:ident| $fill:expr) => {
            match EVENTS.reserve::<$reserved>(0) {
                Some(mut entry) => {
                    let $to = entry.as_mut_ptr().cast::<ExpiryRecord>();
                    // SAFETY: the reservation is 8-byte aligned and `size_of::<$reserved>()`
                    // long, which is what `$fill` writes (asserted below for each).
                    unsafe { $fill };
                    entry.submit(wakeup_flags());
                }
                None => count_reserve_failure(),
            }
        };
    }
    const _: () = assert!(
        size_of::<[u64; SHORT_RECORD_BYTES / 8]>() == ExpiryRecord::HEAD_BYTES
            && size_of::<[u64; ExpiryRecord::IPV4_BYTES / 8]>() == ExpiryRecord::IPV4_BYTES
    );
    if const { ablated("short-records") } {
        reserve_and_fill!(
            [u64; SHORT_RECORD_BYTES / 8],
            |to| ExpiryRecord::write_head(to, rec)
        );
    } else if rec.family == AF_INET6 {
        reserve_and_fill!(ExpiryRecord, |to| {
            ExpiryRecord::write_head(to, rec);
            ExpiryRecord::write_ipv6_addrs(to, rec);
        });
    } else {
        reserve_and_fill!([u64; ExpiryRecord::IPV4_BYTES / 8], |to| {
            ExpiryRecord::write_head(to, rec);
            ExpiryRecord::write_ipv4_addrs(to, rec);
        });
    }
}

/// Copies `data` into the ring buffer, with this CPU's [`wakeup_flags`]; a record that does not
/// fit is counted.
#[inline(always)]
fn output<T: ?Sized>(data: &T) {
    if const { ablated("ring-write") } {
        return;
    }
    // bpf_ringbuf_output copies in the kernel: a copy in the program, from a record on the
    // stack, compiles to a byte loop the verifier refuses (and costs more).
    if EVENTS.output::<T>(data, wakeup_flags()).is_err() {
        count_reserve_failure();
    }
}

/// The flags of this CPU's next record. Without a flag, each submit that finds the agent caught
/// up queues an irq_work to wake it (an interrupt a hypervisor handles, per record under
/// churn); instead records wait for the agent's poll timer until this CPU has submitted
/// `WAKEUP_RECORDS` of them. Counted per CPU rather than asked of the ring
/// (`bpf_ringbuf_query`): that is one more helper call in every reported close and keepalive
/// expiry, where a per-CPU slot is a few loads (an inlined lookup from 6.10).
#[inline(always)]
pub(crate) fn wakeup_flags() -> u64 {
    // SAFETY: read of our own static (see `offset!`).
    let wakeup_records = unsafe { core::ptr::read_volatile(&raw const WAKEUP_RECORDS) };
    let flags = match UNWOKEN_RECORDS.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, and BPF programs are not preempted on their CPU (a nested
        // program on this CPU can at worst lose or repeat one count: a wakeup one record late
        // or early).
        Some(unwoken) => unsafe {
            *unwoken += 1;
            if *unwoken >= wakeup_records {
                *unwoken = 0;
                BPF_RB_FORCE_WAKEUP
            } else {
                BPF_RB_NO_WAKEUP
            }
        },
        None => BPF_RB_FORCE_WAKEUP,
    };
    flags as u64
}

/// Counts a record that did not fit in the ring buffer.
#[inline(always)]
pub(crate) fn count_reserve_failure() {
    if let Some(count) = RESERVE_FAILURES.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, and BPF programs are not preempted on their CPU.
        unsafe { *count += 1 };
    }
}
