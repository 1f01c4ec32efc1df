//! Ring-buffer record → typed event. The only place that interprets [`SocketRecord`] bytes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use keepalive_ebpf::{
    AF_INET, AF_INET6, CloseContext, EXPIRY_KTIME_SHIFT, ExpiryRecord, RecordKind, SocketRecord,
    record_flags,
};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum DecodeError {
    #[error(
        "ring buffer record is {0} bytes, expected {full} (or {v4}/{v6} for a keepalive expiry): agent and kernel programs were built from different sources",
        full = SocketRecord::SIZE,
        v4 = ExpiryRecord::IPV4_BYTES,
        v6 = ExpiryRecord::IPV6_BYTES
    )]
    Size(usize),
    #[error(
        "ring buffer record of kind {kind} is {bytes} bytes, which that kind never is: agent and kernel programs were built from different sources"
    )]
    Layout { kind: u8, bytes: usize },
    #[error("unknown record kind {0}")]
    Kind(u8),
    #[error("unknown close context {0}")]
    Context(u8),
    #[error("unknown address family {0}")]
    Family(u16),
}

/// Where a connection lives: its namespace and both ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Endpoints {
    /// Network namespace inode number.
    pub netns: u32,
    /// `net_cookie` of the namespace: tells a new namespace from a deleted one whose inode it
    /// reuses (0 where the kernel has not generated one).
    pub netns_cookie: u64,
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

/// The keepalive settings the kernel would apply: the socket's own, else the namespace's sysctl.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepaliveSettings {
    pub enabled: bool,
    /// `TCP_KEEPIDLE`, in jiffies.
    pub idle_jiffies: u32,
    /// `TCP_KEEPINTVL`, in jiffies.
    pub interval_jiffies: u32,
    /// `TCP_KEEPCNT`.
    pub probes: u8,
    /// `TCP_USER_TIMEOUT` in milliseconds; 0 = unset.
    pub user_timeout_ms: u32,
}

/// Who owns the socket, as the kernel knows it: attribution starts from these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct SocketOwner {
    /// cgroup v2 id (inode of the cgroup directory); 0 when unknown.
    pub cgroup_id: u64,
    /// Inode of the socket's file (`socket:[INO]` in /proc/PID/fd); 0 for orphans.
    pub socket_ino: u64,
}

/// One expiry of `tcp_keepalive_timer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepaliveExpiry {
    pub sk: u64,
    pub endpoints: Endpoints,
    pub owner: SocketOwner,
    /// `icsk_probes_out` when the timer started: probes still unanswered an interval later.
    pub probes_out_before: u8,
    /// `icsk_probes_out` when the timer finished, if it could be read safely.
    pub probes_out_after: Option<u8>,
    /// Probes sent in this expiry (see [`SocketRecord::probes_sent`]).
    pub probes_sent: u8,
    /// The connection was aborted inside this expiry.
    pub closed_in_timer: bool,
    pub settings: KeepaliveSettings,
    /// When it ran: [`ExpiryRecord::ktime`], see [`KernelTime::Expiry`].
    pub ktime: u32,
}

/// When the kernel acted, on `bpf_ktime_get_ns`'s clock (`CLOCK_MONOTONIC`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KernelTime {
    /// A close record's nanoseconds, whole.
    Ns(u64),
    /// A keepalive expiry's [`ExpiryRecord::ktime`]: the low 32 bits of its 1.024 µs units.
    Expiry(u32),
}

impl KernelTime {
    /// Nanoseconds on that clock, given a reading of it taken after the record was written
    /// (for an expiry, less than 73 minutes after: its stamp wraps then). An expiry's is exact
    /// to 1.024 µs.
    pub(crate) fn ns(self, monotonic_now_ns: u64) -> u64 {
        match self {
            Self::Ns(ns) => ns,
            Self::Expiry(stamp) => {
                let now = monotonic_now_ns >> EXPIRY_KTIME_SHIFT;
                let age = u64::from((now as u32).wrapping_sub(stamp));
                now.saturating_sub(age) << EXPIRY_KTIME_SHIFT
            }
        }
    }
}

impl KeepaliveExpiry {
    /// `tcp_write_wakeup` sent a probe. Not `icsk_probes_out` rising: an ACK processed on
    /// another CPU before the timer's exit hook zeroes it again.
    pub fn probe_sent(&self) -> bool {
        !self.closed_in_timer && self.probes_sent > 0
    }
}

/// The socket moved to `TCP_CLOSE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseEvent {
    pub sk: u64,
    pub endpoints: Endpoints,
    pub owner: SocketOwner,
    /// The state it left.
    pub old_state: u8,
    pub context: CloseContext,
    pub reset_received: bool,
    /// `enum sk_rst_reason` of a reset sent on the way to closing.
    pub reset_sent_reason: Option<u32>,
    pub orphan: bool,
    pub settings: KeepaliveSettings,
    pub probes_out: u8,
    /// In flight before the abort purged the write queue (see [`SocketRecord::packets_out`]).
    pub packets_out: u32,
    /// Closed inside the write timer: the `ICSK_TIME_*` event it was running.
    pub write_timer_event: u8,
    pub send_window: u32,
    pub sk_err: i32,
    pub sk_err_soft: i32,
    pub ktime_ns: u64,
    pub jiffies: u64,
    pub last_received_jiffies: u32,
    /// `tcp_sock.lsndtime`: new data last sent, retransmissions included (32-bit jiffies).
    pub last_sent_jiffies: u32,
    /// `tcp_sock.retrans_stamp`: when the segment being retransmitted first went out
    /// (`CLOCK_MONOTONIC` milliseconds, low 32 bits), 0 when none is.
    pub retrans_stamp: u32,
    /// The namespace's conntrack established timeout (jiffies) when conntrack tracks the
    /// namespace's connections of this family, else 0; 0 too when the close cannot be an idle kill
    /// (`keepalive_ebpf::may_be_idle_kill`; the kernel reads the timeout only for those).
    pub conntrack_timeout_jiffies: u32,
    /// `icsk_probes_tstamp`: when the probe timer first ran for data waiting unsent (32-bit
    /// jiffies), 0 when it has not (or the kernel lacks the member).
    pub probes_tstamp: u32,
}

impl CloseEvent {
    /// Seconds the connection was silent before the send that died (see
    /// [`keepalive_ebpf::silence_before_send`]): 0 when it received something after that send.
    pub fn silence_before_send_seconds(&self, hz: u32) -> f64 {
        let silent = keepalive_ebpf::silence_before_send(
            self.last_received_jiffies,
            self.first_send_jiffies(hz),
        );
        crate::kernel::hz::jiffies_to_seconds(u64::from(silent), hz)
    }

    /// When the send that died first went out (32-bit jiffies). `lsndtime` moves with every
    /// retransmission, so a send being retransmitted is dated by `retrans_stamp` instead: its
    /// age in milliseconds on the clock of `ktime_ns`, back from this close, one
    /// retransmission timeout after the send. A send this host refused never left, and the
    /// probe timer's attempts moved `lsndtime` instead: `probes_tstamp` dates its first
    /// attempt, one probe timeout after the send. A stamp older than the last segment received
    /// belongs to an earlier episode (or `retrans_stamp` is in microseconds, 6.7+
    /// `tcp_usec_ts`), and `lsndtime` stands.
    pub fn first_send_jiffies(&self, hz: u32) -> u32 {
        let now = self.jiffies as u32;
        let since_received = now.wrapping_sub(self.last_received_jiffies);
        if self.retrans_stamp != 0 {
            let now_ms = (self.ktime_ns / 1_000_000) as u32;
            let age_ms = u64::from(now_ms.wrapping_sub(self.retrans_stamp));
            let age = age_ms * u64::from(hz) / 1000;
            if age <= u64::from(since_received) {
                return now.wrapping_sub(age as u32);
            }
        }
        if self.probes_tstamp != 0 && now.wrapping_sub(self.probes_tstamp) <= since_received {
            return self.probes_tstamp;
        }
        self.last_sent_jiffies
    }

    /// Seconds from the last segment received to this close: the silence the keepalive timer
    /// measures. The stamps are 32-bit jiffies (`tcp_jiffies32`); wrapping subtraction survives
    /// the wrap.
    pub fn silent_seconds(&self, hz: u32) -> f64 {
        let silent = (self.jiffies as u32).wrapping_sub(self.last_received_jiffies);
        crate::kernel::hz::jiffies_to_seconds(u64::from(silent), hz)
    }
}

/// One socket seen by the audit's walk of the TCP hash tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AuditedSocket {
    pub sk: u64,
    pub endpoints: Endpoints,
    pub owner: SocketOwner,
    pub state: u8,
    pub settings: KeepaliveSettings,
    /// `icsk_probes_out`: keepalive (or zero-window) probes currently unanswered.
    pub probes_out: u8,
    pub jiffies: u64,
    pub last_received_jiffies: u32,
    /// `tcp_sock.lsndtime`: data last sent (32-bit jiffies).
    pub last_sent_jiffies: u32,
    /// As [`CloseEvent::conntrack_timeout_jiffies`].
    pub conntrack_timeout_jiffies: u32,
}

impl AuditedSocket {
    /// Jiffies since the connection last carried data either way (the last segment received,
    /// or data sent): how long a middlebox between the peers has seen it idle, up to the
    /// keepalive probes and bare ACKs it also saw.
    pub(crate) fn silent_jiffies(&self) -> u32 {
        let now = self.jiffies as u32;
        now.wrapping_sub(self.last_received_jiffies)
            .min(now.wrapping_sub(self.last_sent_jiffies))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Event {
    KeepaliveExpiry(KeepaliveExpiry),
    Close(CloseEvent),
    Audit(AuditedSocket),
}

impl Event {
    pub(crate) fn endpoints(&self) -> &Endpoints {
        match self {
            Self::KeepaliveExpiry(e) => &e.endpoints,
            Self::Close(e) => &e.endpoints,
            Self::Audit(e) => &e.endpoints,
        }
    }

    /// Label value for per-kind event counters.
    pub(crate) fn kind_name(&self) -> &'static str {
        match self {
            Self::KeepaliveExpiry(_) => "keepalive_timer",
            Self::Close(_) => "close",
            Self::Audit(_) => "audit",
        }
    }
}

/// One record as the ring buffer holds it: a [`SocketRecord`], or a keepalive expiry's
/// [`ExpiryRecord`] (shorter for IPv4), told apart by their length. An expiry's record has no
/// kind or family of its own (its length says both), so any bytes of an expiry's two lengths
/// decode.
pub(crate) fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    match bytes.len() {
        SocketRecord::SIZE => {
            // SAFETY: length checked; SocketRecord is plain integers, any bit pattern is valid,
            // and read_unaligned does not require the ring buffer's alignment.
            let rec: SocketRecord = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
            decode_record(&rec)
        }
        len @ (ExpiryRecord::IPV4_BYTES | ExpiryRecord::IPV6_BYTES) => {
            let mut rec = ExpiryRecord::default();
            // SAFETY: at most `ExpiryRecord::SIZE` bytes into a record of plain integers (any
            // bit pattern is valid); the rest stays 0.
            unsafe {
                std::ptr::copy_nonoverlapping(bytes.as_ptr(), (&raw mut rec).cast::<u8>(), len);
            }
            Ok(decode_expiry(&rec, len))
        }
        other => Err(DecodeError::Size(other)),
    }
}

fn decode_expiry(rec: &ExpiryRecord, bytes: usize) -> Event {
    let (local, remote) = if bytes == ExpiryRecord::IPV6_BYTES {
        let v6 = |at: usize| {
            let octets: [u8; 16] = rec.addrs[at..at + 16].try_into().expect("16 bytes");
            IpAddr::V6(Ipv6Addr::from(octets))
        };
        (v6(0), v6(16))
    } else {
        let v4 = |at: usize| {
            let a = &rec.addrs[at..at + 4];
            IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]))
        };
        (v4(0), v4(4))
    };
    let endpoints = Endpoints {
        netns: rec.netns,
        netns_cookie: rec.netns_cookie,
        local: SocketAddr::new(local, rec.local_port),
        remote: SocketAddr::new(remote, rec.remote_port),
    };
    let flag = |bit: u8| rec.flags & bit != 0;
    let verified = !flag(record_flags::EXIT_UNVERIFIED) && !flag(record_flags::CLOSED_IN_TIMER);
    Event::KeepaliveExpiry(KeepaliveExpiry {
        sk: rec.sk,
        endpoints,
        owner: SocketOwner {
            cgroup_id: rec.cgroup_id,
            socket_ino: u64::from(rec.socket_ino),
        },
        probes_out_before: rec.probes_out_before,
        probes_out_after: verified.then_some(rec.probes_out_after),
        probes_sent: if verified { rec.probes_sent() } else { 0 },
        closed_in_timer: flag(record_flags::CLOSED_IN_TIMER),
        settings: KeepaliveSettings {
            enabled: flag(record_flags::KEEPALIVE_ON),
            idle_jiffies: rec.idle_jiffies,
            interval_jiffies: rec.interval_jiffies,
            probes: rec.probes,
            user_timeout_ms: rec.user_timeout_ms,
        },
        ktime: rec.ktime,
    })
}

fn decode_record(rec: &SocketRecord) -> Result<Event, DecodeError> {
    let kind = RecordKind::from_u8(rec.kind).ok_or(DecodeError::Kind(rec.kind))?;
    let endpoints = endpoints(rec)?;
    let flag = |bit: u8| rec.flags & bit != 0;
    let owner = SocketOwner {
        cgroup_id: rec.cgroup_id,
        socket_ino: rec.socket_ino,
    };
    let settings = KeepaliveSettings {
        enabled: flag(record_flags::KEEPALIVE_ON),
        idle_jiffies: rec.idle_jiffies(),
        interval_jiffies: rec.interval_jiffies(),
        probes: rec.probes(),
        user_timeout_ms: rec.user_timeout_ms,
    };
    // `keepalive_time_elapsed` measures from the newer of the two receive stamps.
    let last_received_jiffies = rec.last_received_jiffies();
    Ok(match kind {
        // The timer's exit sends an `ExpiryRecord`, never this layout.
        RecordKind::KeepaliveTimer => {
            return Err(DecodeError::Layout {
                kind: rec.kind,
                bytes: SocketRecord::SIZE,
            });
        }
        RecordKind::Close => Event::Close(CloseEvent {
            sk: rec.sk,
            endpoints,
            owner,
            old_state: rec.state,
            context: CloseContext::from_u8(rec.context).ok_or(DecodeError::Context(rec.context))?,
            reset_received: flag(record_flags::RESET_RECEIVED),
            reset_sent_reason: flag(record_flags::RESET_SENT).then_some(rec.reset_reason_sent),
            orphan: flag(record_flags::ORPHAN),
            settings,
            probes_out: rec.probes_out_before,
            packets_out: rec.packets_out,
            write_timer_event: rec.write_timer_event,
            send_window: rec.snd_wnd,
            sk_err: rec.sk_err,
            sk_err_soft: rec.sk_err_soft,
            ktime_ns: rec.ktime_ns,
            jiffies: rec.jiffies,
            last_received_jiffies,
            last_sent_jiffies: rec.lsndtime,
            retrans_stamp: rec.retrans_stamp,
            conntrack_timeout_jiffies: rec.conntrack_timeout,
            probes_tstamp: rec.probes_tstamp,
        }),
        RecordKind::Audit => Event::Audit(AuditedSocket {
            sk: rec.sk,
            endpoints,
            owner,
            state: rec.state,
            settings,
            probes_out: rec.probes_out_before,
            jiffies: rec.jiffies,
            last_received_jiffies,
            last_sent_jiffies: rec.lsndtime,
            conntrack_timeout_jiffies: rec.conntrack_timeout,
        }),
    })
}

/// The ring-buffer bytes the kernel programs write for a record whose snapshot is `rec`: a
/// keepalive expiry's [`ExpiryRecord`] (its [`ExpiryRecord::ring_len`] bytes), any other kind
/// whole. What the tests and the userspace benchmark feed [`decode`].
pub(crate) fn encode(rec: &SocketRecord) -> Vec<u8> {
    fn bytes_of<T>(value: &T, len: usize) -> Vec<u8> {
        assert!(len <= std::mem::size_of::<T>());
        // SAFETY: `len` bytes of a plain `#[repr(C)]` record without implicit padding.
        unsafe { std::slice::from_raw_parts((&raw const *value).cast::<u8>(), len) }.to_vec()
    }
    if rec.kind == RecordKind::KeepaliveTimer as u8 {
        let mut expiry = ExpiryRecord::default();
        expiry.fill_from(rec);
        bytes_of(&expiry, ExpiryRecord::ring_len(rec.family))
    } else {
        bytes_of(rec, SocketRecord::SIZE)
    }
}

fn endpoints(rec: &SocketRecord) -> Result<Endpoints, DecodeError> {
    let addr = |bytes: [u8; 16]| -> Result<IpAddr, DecodeError> {
        match rec.family {
            AF_INET => Ok(IpAddr::V4(Ipv4Addr::new(
                bytes[0], bytes[1], bytes[2], bytes[3],
            ))),
            AF_INET6 => Ok(IpAddr::V6(Ipv6Addr::from(bytes))),
            other => Err(DecodeError::Family(other)),
        }
    };
    Ok(Endpoints {
        netns: rec.netns,
        netns_cookie: rec.netns_cookie,
        local: SocketAddr::new(addr(rec.local_addr)?, rec.local_port),
        remote: SocketAddr::new(addr(rec.remote_addr)?, rec.remote_port),
    })
}

/// Records for other modules' unit tests, so each test states only what it changes.
#[cfg(test)]
pub(crate) mod fixtures {
    use keepalive_ebpf::{CloseContext, tcp_state};

    use super::*;

    /// An established IPv4 loopback connection with keepalive 1 s / 1 s / 3 (at HZ 250) that the
    /// keepalive timer just aborted after 3 unanswered probes (`ETIMEDOUT`).
    pub(crate) fn keepalive_abort() -> CloseEvent {
        CloseEvent {
            sk: 1,
            endpoints: Endpoints {
                netns: 1,
                netns_cookie: 0,
                local: "127.0.0.1:1".parse().expect("address"),
                remote: "127.0.0.1:2".parse().expect("address"),
            },
            owner: SocketOwner::default(),
            old_state: tcp_state::ESTABLISHED,
            context: CloseContext::KeepaliveTimer,
            reset_received: false,
            reset_sent_reason: None,
            orphan: false,
            settings: KeepaliveSettings {
                enabled: true,
                idle_jiffies: 250,
                interval_jiffies: 250,
                probes: 3,
                user_timeout_ms: 0,
            },
            probes_out: 3,
            packets_out: 0,
            write_timer_event: 0,
            send_window: 65535,
            sk_err: libc::ETIMEDOUT,
            sk_err_soft: 0,
            ktime_ns: 0,
            jiffies: 0,
            last_received_jiffies: 0,
            last_sent_jiffies: 0,
            retrans_stamp: 0,
            conntrack_timeout_jiffies: 0,
            probes_tstamp: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> SocketRecord {
        let mut rec = SocketRecord {
            sk: 0xffff_8880_1234_5600,
            kind: RecordKind::KeepaliveTimer as u8,
            family: AF_INET,
            netns: 4026532000,
            local_port: 40000,
            remote_port: 8080,
            state: 1,
            probes_out_before: 1,
            probes_out_after: 2,
            probes_sent: 1,
            keepalive_time: 250,
            sysctl_keepalive_time: 7200 * 250,
            sysctl_keepalive_intvl: 75 * 250,
            sysctl_keepalive_probes: 9,
            flags: record_flags::KEEPALIVE_ON,
            ..SocketRecord::default()
        };
        rec.local_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        rec.remote_addr[..4].copy_from_slice(&[127, 0, 0, 2]);
        rec
    }

    #[test]
    fn keepalive_record_decodes_endpoints_and_effective_settings() {
        let Event::KeepaliveExpiry(e) = decode(&encode(&record())).unwrap() else {
            panic!("wrong kind")
        };
        assert_eq!(e.endpoints.local, "127.0.0.1:40000".parse().unwrap());
        assert_eq!(e.endpoints.remote, "127.0.0.2:8080".parse().unwrap());
        assert_eq!(e.endpoints.netns, 4026532000);
        // The socket's own idle time wins; interval and count fall back to the sysctl.
        assert_eq!(e.settings.idle_jiffies, 250);
        assert_eq!(e.settings.interval_jiffies, 75 * 250);
        assert_eq!(e.settings.probes, 9);
        assert!(e.settings.enabled);
        assert!(e.probe_sent());
    }

    #[test]
    fn a_probe_answered_before_the_exit_hook_still_counts() {
        let mut rec = record();
        // The peer's ACK zeroed icsk_probes_out on another CPU before timer_expire_exit.
        (rec.probes_out_before, rec.probes_out_after) = (0, 0);
        let Event::KeepaliveExpiry(e) = decode(&encode(&rec)).unwrap() else {
            panic!("wrong kind")
        };
        assert!(e.probe_sent());
    }

    #[test]
    fn unverified_exit_never_counts_a_probe() {
        let mut rec = record();
        rec.flags |= record_flags::EXIT_UNVERIFIED;
        let Event::KeepaliveExpiry(e) = decode(&encode(&rec)).unwrap() else {
            panic!("wrong kind")
        };
        assert_eq!(e.probes_out_after, None);
        assert!(!e.probe_sent());
    }

    #[test]
    fn close_record_carries_reset_and_context() {
        let mut rec = record();
        rec.kind = RecordKind::Close as u8;
        rec.context = CloseContext::KeepaliveTimer as u8;
        rec.flags |= record_flags::RESET_SENT;
        rec.reset_reason_sent = 15;
        rec.sk_err = 110;
        let Event::Close(c) = decode(&encode(&rec)).unwrap() else {
            panic!("wrong kind")
        };
        assert_eq!(c.context, CloseContext::KeepaliveTimer);
        assert_eq!(c.reset_sent_reason, Some(15));
        assert!(!c.reset_received);
        assert_eq!(c.sk_err, 110);
    }

    #[test]
    fn ipv6_addresses_decode() {
        let mut rec = record();
        rec.family = AF_INET6;
        rec.local_addr = Ipv6Addr::LOCALHOST.octets();
        rec.remote_addr = Ipv6Addr::LOCALHOST.octets();
        let event = decode(&encode(&rec)).unwrap();
        assert_eq!(event.endpoints().local, "[::1]:40000".parse().unwrap());
    }

    #[test]
    fn malformed_records_are_rejected() {
        assert_eq!(decode(&[0; 12]), Err(DecodeError::Size(12)));
        let mut rec = record();
        rec.kind = 99;
        assert_eq!(decode(&encode(&rec)), Err(DecodeError::Kind(99)));
        // An expiry's family is its length; a close record carries one.
        let mut rec = record();
        rec.kind = RecordKind::Close as u8;
        rec.family = 1;
        assert_eq!(decode(&encode(&rec)), Err(DecodeError::Family(1)));
    }

    #[test]
    fn last_received_is_the_newer_stamp_across_wraparound() {
        let mut rec = record();
        rec.kind = RecordKind::Close as u8;
        rec.rcv_tstamp = u32::MAX - 5;
        rec.lrcvtime = 10; // 16 jiffies later, after the wrap
        let Event::Close(c) = decode(&encode(&rec)).unwrap() else {
            panic!("wrong kind")
        };
        assert_eq!(c.last_received_jiffies, 10);
    }

    #[test]
    fn keepalive_expiries_travel_in_the_short_layout() {
        let v4 = encode(&record());
        assert_eq!(v4.len(), ExpiryRecord::IPV4_BYTES);
        // 72 bytes of the ring with its 8-byte header, so the default 4 MiB ring holds more than
        // the 50 000 expiries of a synchronized second (README, ARCHITECTURE); 88 held fewer.
        assert_eq!(ExpiryRecord::IPV4_BYTES, 64);
        let in_ring = |bytes: usize| (4 << 20) / (bytes + 8).next_multiple_of(8);
        assert_eq!(in_ring(ExpiryRecord::IPV4_BYTES), 58_254);
        assert_eq!(in_ring(80), 47_662);
        assert_eq!(in_ring(ExpiryRecord::IPV6_BYTES), 43_690);
        let mut rec = record();
        rec.family = AF_INET6;
        rec.local_addr = Ipv6Addr::LOCALHOST.octets();
        rec.remote_addr = "2001:db8::2".parse::<Ipv6Addr>().unwrap().octets();
        let v6 = encode(&rec);
        assert_eq!(v6.len(), ExpiryRecord::IPV6_BYTES);
        let Event::KeepaliveExpiry(e) = decode(&v6).unwrap() else {
            panic!("wrong kind")
        };
        assert_eq!(e.endpoints.local, "[::1]:40000".parse().unwrap());
        assert_eq!(e.endpoints.remote, "[2001:db8::2]:8080".parse().unwrap());
        // Everything the agent reads of an expiry survives the short layout.
        rec.probes_out_before = 2;
        rec.probes_out_after = 0;
        rec.probes_sent = 2;
        rec.flags = record_flags::KEEPALIVE_ON | record_flags::ORPHAN;
        rec.user_timeout_ms = 4000;
        rec.keepalive_probes = 5;
        rec.cgroup_id = u64::MAX - 1;
        rec.socket_ino = u64::from(u32::MAX);
        rec.netns_cookie = 99;
        // Ten hours after boot; the stamp has wrapped several times by then.
        let ktime_ns = 36_000_000_123_456;
        rec.ktime_ns = ktime_ns;
        let Event::KeepaliveExpiry(e) = decode(&encode(&rec)).unwrap() else {
            panic!("wrong kind")
        };
        assert_eq!(
            (e.probes_out_before, e.probes_out_after, e.probes_sent),
            (2, Some(0), 2)
        );
        assert!(e.settings.enabled && !e.closed_in_timer);
        assert_eq!((e.settings.user_timeout_ms, e.settings.probes), (4000, 5));
        assert_eq!(
            (e.owner.cgroup_id, e.owner.socket_ino),
            (u64::MAX - 1, u64::from(u32::MAX))
        );
        assert_eq!(e.endpoints.netns_cookie, 99);
        // The agent reads its clock a moment later, or an hour later: the time comes back to
        // within the stamp's 1.024 µs.
        for later in [0, 1_000, 2_000_000_000, 3_600_000_000_000] {
            let back = KernelTime::Expiry(e.ktime).ns(ktime_ns + later);
            assert!(
                back <= ktime_ns && ktime_ns - back < 1024,
                "{later}: {back}"
            );
        }
        // A socket inode that did not fit 32 bits (no kernel makes one) goes as unknown.
        rec.socket_ino = 1 << 32;
        let Event::KeepaliveExpiry(e) = decode(&encode(&rec)).unwrap() else {
            panic!("wrong kind")
        };
        assert_eq!(e.owner.socket_ino, 0);
    }

    #[test]
    fn a_layout_that_does_not_fit_the_kind_is_refused() {
        // A keepalive expiry in the full layout: the programs never write one.
        let rec = record();
        // SAFETY: the whole of a plain record without implicit padding.
        let full = unsafe {
            std::slice::from_raw_parts((&raw const rec).cast::<u8>(), SocketRecord::SIZE)
        }
        .to_vec();
        assert_eq!(
            decode(&full),
            Err(DecodeError::Layout {
                kind: RecordKind::KeepaliveTimer as u8,
                bytes: SocketRecord::SIZE
            })
        );
        // A length between the layouts'.
        assert_eq!(
            decode(&full[..ExpiryRecord::IPV6_BYTES + 8]),
            Err(DecodeError::Size(ExpiryRecord::IPV6_BYTES + 8))
        );
    }
}
