//! Kernel side of keepalive-agent: stable (BTF) tracepoints only, because fentry and kprobes are
//! refused on many locked-down hosts. The data path:
//!
//! - `timer_expire_entry`/`timer_expire_exit` bracket every kernel timer callback. We keep only
//!   `tcp_keepalive_timer` (snapshot the socket at entry, re-read `icsk_probes_out` at exit: a
//!   rise means `tcp_write_wakeup` sent a probe) and `tcp_write_timer` (so an abort can be
//!   attributed to the retransmission/zero-window timer).
//! - `inet_sock_set_state` to `TCP_CLOSE` is the tracepoint inside `tcp_done`; the timer or reset
//!   that was running on this CPU for the same socket says why it closed.
//! - `tcp_send_reset`/`tcp_receive_reset` mark the socket that is about to close on this CPU.
//!
//! Records go to userspace through one ring buffer; a failed reserve is counted per CPU.
//!
//! One module per hook family: [`timer`], [`close`], [`reset`], [`audit`] and [`ipvs`] (the
//! last two run on demand, never attached); [`socket`] holds what they share (the offsets, the
//! socket snapshot, the ring buffer).
#![no_std]
#![no_main]
// `atomic_xadd`: the only atomic add the BPF target offers (see `socket::add`). This crate is
// only ever built for BPF, with the nightly toolchain `-Z build-std` needs anyway.
#![feature(core_intrinsics)]
#![expect(internal_features, reason = "core_intrinsics, for atomic_xadd")]

/// A field's offset from the `.rodata` the agent fills in before load (see `socket::OFFSETS`).
macro_rules! offset {
    ($field:ident) => {
        // SAFETY: reads a field of our own static; volatile so the compiler does not fold the
        // zero initialiser the loader replaces.
        unsafe { core::ptr::read_volatile(&raw const crate::socket::OFFSETS.$field) as usize }
    };
}

mod audit;
mod close;
mod ipvs;
mod reset;
mod socket;
mod timer;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
