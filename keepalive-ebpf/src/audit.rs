//! `iter/tcp`: the keepalive configuration audit's walk of every TCP socket.

use keepalive_ebpf::{RecordKind, SocketRecord, tcp_state};

use crate::socket::snapshot;

/// `iter/tcp`: called once per TCP socket of every namespace, then once with a NULL socket.
/// Writes one audit record per full socket to the iterator's seq file; the agent reads them
/// from the iterator's file descriptor. Context: `struct bpf_iter__tcp { meta; sk_common; uid }`.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub(crate) fn audit_tcp(ctx: *mut core::ffi::c_void) -> i32 {
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
