//! Why did a connection end? One pure function over a [`CloseEvent`]; the reasons are defined,
//! with the kernel path behind each, in ARCHITECTURE.md.

use keepalive_ebpf::{CloseFacts, classify_close};

use crate::record::decoder::CloseEvent;

/// Defined with the kernel programs, which count drops by it.
pub(crate) use keepalive_ebpf::DropReason;

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

/// The kernel programs classify every close they report with the same function
/// ([`keepalive_ebpf::classify_close`]) to count it; the agent runs it again on the decoded
/// record for the connection's own series.
pub(crate) fn classify(close: &CloseEvent, reasons: ResetReasons) -> CloseOutcome {
    let facts = CloseFacts {
        old_state: close.old_state,
        context: close.context as u8,
        write_timer_event: close.write_timer_event,
        orphan: close.orphan,
        keepalive_on: close.settings.enabled,
        probes_out: close.probes_out,
        packets_out: close.packets_out,
        send_window: close.send_window,
        reset_received: close.reset_received,
        keepalive_reset_sent: close.reset_sent_reason.is_some()
            && close.reset_sent_reason == reasons.keepalive_timeout,
        sk_err: close.sk_err,
    };
    match classify_close(&facts) {
        Some(reason) => CloseOutcome::Dropped(reason),
        None => CloseOutcome::Orderly,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keepalive_ebpf::{CloseContext, icsk_timer, tcp_state};

    const ETIMEDOUT: i32 = libc::ETIMEDOUT;
    const ECONNABORTED: i32 = libc::ECONNABORTED;
    const ECONNRESET: i32 = libc::ECONNRESET;
    const ECONNREFUSED: i32 = libc::ECONNREFUSED;
    const EPIPE: i32 = libc::EPIPE;
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
