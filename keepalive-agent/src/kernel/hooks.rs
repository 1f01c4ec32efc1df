//! The kernel hooks the agent attaches to, as plain data: the BTF layout checks which of them
//! this kernel has, and program loading picks each one's variant.

/// A kernel hook: the tracepoint, and whether the agent can work without it.
#[derive(Debug, Clone, Copy)]
pub struct Hook {
    pub tracepoint: &'static str,
    pub required: bool,
    /// What is lost without it.
    pub role: &'static str,
}

pub const HOOKS: [Hook; 5] = [
    Hook {
        tracepoint: "timer_expire_entry",
        required: true,
        role: "keepalive timer expiries (probes sent, unanswered probes)",
    },
    Hook {
        tracepoint: "timer_expire_exit",
        required: true,
        role: "probes sent by each keepalive timer expiry",
    },
    Hook {
        tracepoint: "inet_sock_set_state",
        required: true,
        role: "connection teardown (drops and their reasons)",
    },
    Hook {
        tracepoint: "tcp_send_reset",
        required: false,
        role: "confirmation of keepalive aborts by their RST reason",
    },
    Hook {
        tracepoint: "tcp_receive_reset",
        required: false,
        role: "resets received (falls back to the socket error)",
    },
];
