//! Why did a connection end? One pure function over a [`CloseEvent`]; the reasons are defined,
//! with the kernel path behind each, in ARCHITECTURE.md.

use keepalive_ebpf::{CloseContext, icsk_timer, tcp_state};

use crate::record::decoder::CloseEvent;

const ETIMEDOUT: i32 = libc::ETIMEDOUT;
const ECONNABORTED: i32 = libc::ECONNABORTED;
const ECONNRESET: i32 = libc::ECONNRESET;
const ECONNREFUSED: i32 = libc::ECONNREFUSED;
const EPIPE: i32 = libc::EPIPE;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    KeepaliveTimeout,
    KeepaliveReset,
    RetransmitTimeout,
    ZeroWindowTimeout,
    ConnectTimeout,
    ResetReceived,
    LocalAbort,
    Other,
}

impl DropReason {
    pub const ALL: [Self; 8] = [
        Self::KeepaliveTimeout,
        Self::KeepaliveReset,
        Self::RetransmitTimeout,
        Self::ZeroWindowTimeout,
        Self::ConnectTimeout,
        Self::ResetReceived,
        Self::LocalAbort,
        Self::Other,
    ];

    /// The keepalive drops: silence is what the kernel measured, so they have a dead-peer
    /// detection time.
    pub const KEEPALIVE: [Self; 2] = [Self::KeepaliveTimeout, Self::KeepaliveReset];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::KeepaliveTimeout => "keepalive_timeout",
            Self::KeepaliveReset => "keepalive_reset",
            Self::RetransmitTimeout => "retransmit_timeout",
            Self::ZeroWindowTimeout => "zero_window_timeout",
            Self::ConnectTimeout => "connect_timeout",
            Self::ResetReceived => "reset_received",
            Self::LocalAbort => "local_abort",
            Self::Other => "other",
        }
    }
}

impl std::fmt::Display for DropReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloseOutcome {
    /// FIN handshake completed, or the application gave up a connection it no longer wanted.
    Orderly,
    Dropped(DropReason),
}

/// `enum sk_rst_reason` values that matter here, resolved by name from BTF (absent before 6.12).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ResetReasons {
    pub keepalive_timeout: Option<u32>,
}

pub(crate) fn classify(close: &CloseEvent, reasons: ResetReasons) -> CloseOutcome {
    use CloseOutcome::{Dropped, Orderly};
    use DropReason::*;

    let old = close.old_state;
    // `icsk_probes_out` counts keepalive and zero-window probes only (retransmissions count in
    // `icsk_retransmits`); zero-window probing needs a closed send window, and keepalive never
    // probes with data in flight (`packets_out` as it was before the abort purged it).
    let keepalive_probing = close.settings.enabled
        && close.probes_out > 0
        && close.packets_out == 0
        && close.send_window > 0;
    let zero_window_probing = close.probes_out > 0 && close.send_window == 0;
    let keepalive_reset_sent =
        close.reset_sent_reason.is_some() && close.reset_sent_reason == reasons.keepalive_timeout;

    match close.context {
        // tcp_keepalive_timer → tcp_write_err → tcp_done. The same timer also ends orphaned
        // FIN_WAIT2 sockets (tcp_fin_timeout), which the application had already closed.
        CloseContext::KeepaliveTimer if old == tcp_state::FIN_WAIT2 && close.orphan => {
            return Orderly;
        }
        CloseContext::KeepaliveTimer => return Dropped(KeepaliveTimeout),
        // tcp_write_timer_handler runs the event in icsk_pending: ICSK_TIME_PROBE0 →
        // tcp_probe_timer (zero-window probes exhausted), ICSK_TIME_RETRANS →
        // tcp_retransmit_timer → tcp_write_timeout (retransmits or SYN retries exhausted).
        CloseContext::WriteTimer if old == tcp_state::SYN_SENT => return Dropped(ConnectTimeout),
        CloseContext::WriteTimer if close.write_timer_event == icsk_timer::PROBE0 => {
            return Dropped(ZeroWindowTimeout);
        }
        CloseContext::WriteTimer => return Dropped(RetransmitTimeout),
        CloseContext::None => {}
    }
    if keepalive_reset_sent {
        return Dropped(KeepaliveTimeout);
    }
    // tcp_reset: the peer's RST. Matched on this CPU, or recognised by the error it leaves when
    // the close was seen elsewhere (a preempted backlog run).
    let reset_errno = matches!(close.sk_err, ECONNRESET | EPIPE | ECONNREFUSED);
    if close.reset_received || reset_errno {
        return if keepalive_probing {
            Dropped(KeepaliveReset)
        } else {
            Dropped(ResetReceived)
        };
    }
    match close.sk_err {
        // tcp_abort (SOCK_DESTROY, `ss -K`).
        ECONNABORTED => return Dropped(LocalAbort),
        // A timeout whose timer was not seen on this CPU: decide from the socket (the write
        // queue is already purged, so only the probe counters and the window are left).
        ETIMEDOUT if old == tcp_state::SYN_SENT => return Dropped(ConnectTimeout),
        ETIMEDOUT if keepalive_probing => return Dropped(KeepaliveTimeout),
        ETIMEDOUT if zero_window_probing => return Dropped(ZeroWindowTimeout),
        ETIMEDOUT => return Dropped(RetransmitTimeout),
        _ => {}
    }
    match old {
        _ if close.sk_err != 0 => Dropped(Other),
        // The FIN exchange finished (tcp_time_wait, or the last ACK in LAST_ACK).
        tcp_state::FIN_WAIT2 | tcp_state::CLOSING | tcp_state::LAST_ACK | tcp_state::TIME_WAIT => {
            Orderly
        }
        // Only an abort goes straight from these states to CLOSE without an error: close() with
        // unread data, SO_LINGER 0, or connect(AF_UNSPEC) — the RST goes out after the move.
        tcp_state::ESTABLISHED | tcp_state::CLOSE_WAIT | tcp_state::FIN_WAIT1 => {
            Dropped(LocalAbort)
        }
        // close() during connect(): the application gave up before there was a connection.
        tcp_state::SYN_SENT => Orderly,
        _ => Dropped(Other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::decoder::fixtures;

    const KEEPALIVE_TIMEOUT_REASON: u32 = 15;
    const TCP_STATE_REASON: u32 = 14;
    const REASONS: ResetReasons = ResetReasons {
        keepalive_timeout: Some(KEEPALIVE_TIMEOUT_REASON),
    };

    /// A close with no timer, reset or error: each test adds what its case has.
    fn close(old_state: u8) -> CloseEvent {
        CloseEvent {
            old_state,
            context: CloseContext::None,
            probes_out: 0,
            sk_err: 0,
            ..fixtures::keepalive_abort()
        }
    }

    fn outcome(c: CloseEvent) -> CloseOutcome {
        classify(&c, REASONS)
    }

    #[test]
    fn abort_inside_keepalive_timer_is_keepalive_timeout() {
        let mut c = close(tcp_state::ESTABLISHED);
        c.context = CloseContext::KeepaliveTimer;
        c.probes_out = 3;
        c.sk_err = ETIMEDOUT;
        c.reset_sent_reason = Some(KEEPALIVE_TIMEOUT_REASON);
        assert_eq!(
            outcome(c),
            CloseOutcome::Dropped(DropReason::KeepaliveTimeout)
        );
    }

    #[test]
    fn keepalive_rst_reason_alone_still_means_keepalive_timeout() {
        let mut c = close(tcp_state::ESTABLISHED);
        c.reset_sent_reason = Some(KEEPALIVE_TIMEOUT_REASON);
        c.sk_err = ETIMEDOUT;
        assert_eq!(
            outcome(c),
            CloseOutcome::Dropped(DropReason::KeepaliveTimeout)
        );
    }

    #[test]
    fn orphan_fin_wait2_timeout_is_not_a_drop() {
        let mut c = close(tcp_state::FIN_WAIT2);
        c.context = CloseContext::KeepaliveTimer;
        c.orphan = true;
        c.reset_sent_reason = Some(TCP_STATE_REASON);
        assert_eq!(outcome(c), CloseOutcome::Orderly);
    }

    #[test]
    fn rst_answering_a_keepalive_probe_is_keepalive_reset() {
        let mut c = close(tcp_state::ESTABLISHED);
        c.reset_received = true;
        c.probes_out = 1;
        c.sk_err = ECONNRESET;
        assert_eq!(
            outcome(c),
            CloseOutcome::Dropped(DropReason::KeepaliveReset)
        );
    }

    #[test]
    fn rst_during_traffic_is_reset_received() {
        let mut c = close(tcp_state::ESTABLISHED);
        c.reset_received = true;
        c.sk_err = ECONNRESET;
        assert_eq!(outcome(c), CloseOutcome::Dropped(DropReason::ResetReceived));
        // Probes out but data in flight: retransmission, not keepalive, was waiting.
        let mut c = close(tcp_state::ESTABLISHED);
        c.reset_received = true;
        c.probes_out = 2;
        c.packets_out = 4;
        assert_eq!(outcome(c), CloseOutcome::Dropped(DropReason::ResetReceived));
        // Zero-window probing also leaves probes out, with a closed window.
        let mut c = close(tcp_state::ESTABLISHED);
        c.reset_received = true;
        c.probes_out = 2;
        c.send_window = 0;
        assert_eq!(outcome(c), CloseOutcome::Dropped(DropReason::ResetReceived));
    }

    #[test]
    fn reset_errno_without_matched_tracepoint_is_still_a_reset() {
        let mut c = close(tcp_state::CLOSE_WAIT);
        c.sk_err = EPIPE;
        assert_eq!(outcome(c), CloseOutcome::Dropped(DropReason::ResetReceived));
        let mut c = close(tcp_state::SYN_SENT);
        c.sk_err = ECONNREFUSED;
        assert_eq!(outcome(c), CloseOutcome::Dropped(DropReason::ResetReceived));
    }

    #[test]
    fn write_timer_aborts_split_by_the_event_it_ran() {
        let mut c = close(tcp_state::ESTABLISHED);
        c.context = CloseContext::WriteTimer;
        c.write_timer_event = icsk_timer::RETRANS;
        c.packets_out = 3;
        c.sk_err = ETIMEDOUT;
        assert_eq!(
            outcome(c),
            CloseOutcome::Dropped(DropReason::RetransmitTimeout)
        );
        c.write_timer_event = icsk_timer::PROBE0;
        c.packets_out = 0;
        c.send_window = 0;
        assert_eq!(
            outcome(c),
            CloseOutcome::Dropped(DropReason::ZeroWindowTimeout)
        );
        let mut c = close(tcp_state::SYN_SENT);
        c.context = CloseContext::WriteTimer;
        c.write_timer_event = icsk_timer::RETRANS;
        c.packets_out = 1;
        c.sk_err = ETIMEDOUT;
        assert_eq!(
            outcome(c),
            CloseOutcome::Dropped(DropReason::ConnectTimeout)
        );
    }

    #[test]
    fn timeout_seen_without_its_timer_is_decided_from_the_socket() {
        // The write queue is already purged: nothing in flight is left to look at.
        let mut c = close(tcp_state::ESTABLISHED);
        c.sk_err = ETIMEDOUT;
        assert_eq!(
            outcome(c),
            CloseOutcome::Dropped(DropReason::RetransmitTimeout)
        );
        let mut c = close(tcp_state::ESTABLISHED);
        c.sk_err = ETIMEDOUT;
        c.probes_out = 3;
        assert_eq!(
            outcome(c),
            CloseOutcome::Dropped(DropReason::KeepaliveTimeout)
        );
        let mut c = close(tcp_state::ESTABLISHED);
        c.sk_err = ETIMEDOUT;
        c.probes_out = 4;
        c.send_window = 0;
        assert_eq!(
            outcome(c),
            CloseOutcome::Dropped(DropReason::ZeroWindowTimeout)
        );
    }

    #[test]
    fn sock_destroy_is_local_abort() {
        let mut c = close(tcp_state::ESTABLISHED);
        c.sk_err = ECONNABORTED;
        c.reset_sent_reason = Some(TCP_STATE_REASON);
        assert_eq!(outcome(c), CloseOutcome::Dropped(DropReason::LocalAbort));
    }

    #[test]
    fn abortive_close_without_error_is_local_abort() {
        assert_eq!(
            outcome(close(tcp_state::ESTABLISHED)),
            CloseOutcome::Dropped(DropReason::LocalAbort)
        );
    }

    #[test]
    fn fin_handshake_is_orderly() {
        for state in [
            tcp_state::FIN_WAIT2,
            tcp_state::CLOSING,
            tcp_state::LAST_ACK,
            tcp_state::TIME_WAIT,
        ] {
            assert_eq!(
                outcome(close(state)),
                CloseOutcome::Orderly,
                "state {state}"
            );
        }
    }

    #[test]
    fn unexplained_error_is_other() {
        let mut c = close(tcp_state::ESTABLISHED);
        c.sk_err = libc::EHOSTUNREACH;
        assert_eq!(outcome(c), CloseOutcome::Dropped(DropReason::Other));
    }

    #[test]
    fn keepalive_reason_unknown_on_old_kernels_does_not_match_other_resets() {
        let mut c = close(tcp_state::ESTABLISHED);
        c.reset_sent_reason = Some(0);
        c.sk_err = ECONNABORTED;
        let old_kernel = ResetReasons {
            keepalive_timeout: None,
        };
        assert_eq!(
            classify(&c, old_kernel),
            CloseOutcome::Dropped(DropReason::LocalAbort)
        );
    }
}
