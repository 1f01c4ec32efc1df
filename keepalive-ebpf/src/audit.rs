//! The keepalive configuration audit's walk of every TCP socket: the kernel's own TCP hash
//! tables (`tcp_hashinfo`), established and listening, which hold the sockets of every network
//! namespace. Unlike `iter/tcp` (one namespace, the creator's) or `iter/task_file` (the creator's
//! PID namespace), the walk depends on neither namespace, so the agent sees every socket from a
//! pod without host PID or setns.
//!
//! The agent runs the program with `BPF_PROG_TEST_RUN` (raw tracepoints support it from 5.10;
//! the program is never attached). Each run reads the [`AuditCursor`], visits at most
//! [`STEPS`] buckets or sockets under the RCU read lock the test run holds (the hash chains are
//! RCU `hlist_nulls` lists, as the kernel's own lockless lookups walk them), writes one record
//! per full socket and saves where it stopped.

use aya_ebpf::{
    bindings::BPF_RB_NO_WAKEUP,
    helpers::bpf_get_current_task,
    macros::{map, raw_tracepoint},
    maps::{Array, RingBuf},
    programs::RawTracePointContext,
};
use keepalive_ebpf::{AuditCursor, RecordKind, SocketRecord, audit_table, tcp_state};

use crate::socket::{read, snapshot};

/// Buckets plus sockets one run visits. The verifier walks every iteration of a bounded loop,
/// so this keeps the program within 5.10's limits; the agent runs it as often as needed.
const STEPS: u32 = 48;

#[map]
static AUDIT_CURSOR: Array<AuditCursor> = Array::with_max_entries(1, 0);

/// Records of one run ([`STEPS`] at most), drained by the agent before the next run.
#[map]
static AUDIT_RECORDS: RingBuf = RingBuf::with_byte_size(64 * 1024, 0);

/// One table: where its buckets start, how many, the size of one and where in it the chain's
/// head is.
struct Table {
    buckets: u64,
    count: u32,
    stride: u64,
    head: u64,
}

/// The tables of the running task's network namespace: the agent runs the program
/// (`BPF_PROG_TEST_RUN` runs it in the caller's context), and every namespace shares
/// `tcp_hashinfo` unless it was created with tables of its own (`tcp_child_ehash_entries`).
#[inline(always)]
fn hashinfo() -> Result<u64, i64> {
    // SAFETY: no preconditions; the task is only read through bpf_probe_read_kernel.
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let nsproxy = read::<u64>(task, offset!(task_nsproxy))? as *const u8;
    let net = read::<u64>(nsproxy, offset!(nsproxy_net_ns))? as *const u8;
    read::<u64>(net, offset!(net_tcp_hashinfo))
}

#[inline(always)]
fn table(hashinfo: *const u8, which: u32) -> Result<Table, i64> {
    if which == audit_table::ESTABLISHED {
        return Ok(Table {
            buckets: read::<u64>(hashinfo, offset!(hashinfo_ehash))?,
            count: read::<u32>(hashinfo, offset!(hashinfo_ehash_mask))?.wrapping_add(1),
            stride: offset!(ehash_bucket_size) as u64,
            head: 0,
        });
    }
    let inline = offset!(listen_inline_buckets) as u32;
    let (buckets, count) = if inline != 0 {
        (hashinfo as u64 + offset!(hashinfo_listen) as u64, inline)
    } else {
        (
            read::<u64>(hashinfo, offset!(hashinfo_listen))?,
            read::<u32>(hashinfo, offset!(hashinfo_lhash2_mask))?.wrapping_add(1),
        )
    };
    Ok(Table {
        buckets,
        count,
        stride: offset!(listen_bucket_size) as u64,
        head: offset!(listen_bucket_head) as u64,
    })
}

#[inline(always)]
fn chain_head(t: &Table, bucket: u32) -> u64 {
    read::<u64>(
        (t.buckets + u64::from(bucket) * t.stride + t.head) as *const u8,
        0,
    )
    // An unreadable head ends the bucket (odd: a nulls marker).
    .unwrap_or(1)
}

/// Reads a cursor field through the map value. Volatile, so the compiler keeps the loop's
/// state in the map value instead of registers: a load from a map value is an unknown scalar to
/// the verifier, so every iteration looks alike to it except for the loop counter, and states
/// prune. With the state in registers (a known `seen` of 0, 1, 2, ...) older verifiers (5.10,
/// 6.1, 6.12) explored every combination and gave up at a million instructions.
macro_rules! get {
    ($c:ident . $field:ident) => {
        // SAFETY: `$c` points to the map value, valid for the whole run.
        unsafe { core::ptr::read_volatile(&raw const (*$c).$field) }
    };
}

macro_rules! set {
    ($c:ident . $field:ident, $value:expr) => {{
        let value = $value;
        // SAFETY: as for `get!`.
        unsafe { core::ptr::write_volatile(&raw mut (*$c).$field, value) }
    }};
}

/// One run over the table the cursor names, from where the last one stopped.
#[raw_tracepoint]
pub(crate) fn audit_hash_walk(_ctx: RawTracePointContext) -> i32 {
    let Some(c) = AUDIT_CURSOR.get_ptr_mut(0) else {
        return 1;
    };
    set!(c.emitted, 0);
    set!(c.unreadable, 0);
    set!(c.full, 0);
    set!(c.error, 0);
    let t = match hashinfo().and_then(|h| {
        set!(c.hashinfo, h);
        table(h as *const u8, get!(c.table))
    }) {
        Ok(t) => t,
        Err(err) => {
            set!(c.error, err as i32);
            set!(c.done, 1);
            return 0;
        }
    };
    set!(c.buckets, t.count);
    let bucket = get!(c.bucket);
    if bucket >= t.count {
        set!(c.done, 1);
        return 0;
    }
    // Re-walk the bucket's chain from its head, skipping what earlier runs visited.
    set!(c.node, chain_head(&t, bucket));
    set!(c.seen, 0);
    for _ in 0..STEPS {
        let node = get!(c.node);
        if node & 1 != 0 || node == 0 {
            // End of chain: the next bucket.
            let bucket = get!(c.bucket).wrapping_add(1);
            set!(c.bucket, bucket);
            set!(c.skip, 0);
            set!(c.seen, 0);
            if bucket >= t.count {
                set!(c.done, 1);
                return 0;
            }
            set!(c.node, chain_head(&t, bucket));
            continue;
        }
        let seen = get!(c.seen);
        if seen >= get!(c.skip) {
            let sk = node.wrapping_sub(offset!(skc_nulls_node) as u64) as *const u8;
            match visit(sk) {
                Visit::Written => set!(c.emitted, get!(c.emitted).wrapping_add(1)),
                Visit::Skipped => {}
                Visit::Unreadable => set!(c.unreadable, get!(c.unreadable).wrapping_add(1)),
                Visit::Full => {
                    set!(c.full, 1);
                    set!(c.skip, seen);
                    return 0;
                }
            }
        }
        set!(c.seen, seen.wrapping_add(1));
        set!(c.node, read::<u64>(node as *const u8, 0).unwrap_or(1));
    }
    set!(c.skip, get!(c.seen));
    0
}

enum Visit {
    Written,
    Skipped,
    Unreadable,
    Full,
}

#[inline(always)]
fn visit(sk: *const u8) -> Visit {
    // Time-wait and request sockets share the established table but are not full sockets:
    // nothing keepalive-related in them, and `struct sock` fields past theirs are not theirs.
    let Ok(state) = read::<u8>(sk, offset!(skc_state)) else {
        return Visit::Unreadable;
    };
    if matches!(state, tcp_state::TIME_WAIT | tcp_state::NEW_SYN_RECV) {
        return Visit::Skipped;
    }
    let mut rec = SocketRecord {
        kind: RecordKind::Audit as u8,
        ..SocketRecord::default()
    };
    if snapshot(sk, &mut rec).is_err() {
        return Visit::Unreadable;
    }
    // Nobody waits on this buffer: the agent drains it after the run returns.
    match AUDIT_RECORDS.output::<SocketRecord>(&rec, BPF_RB_NO_WAKEUP as u64) {
        Ok(()) => Visit::Written,
        Err(_) => Visit::Full,
    }
}
