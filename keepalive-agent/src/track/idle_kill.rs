//! Idle kills (issue 13): a connection that sat silent longer than a middlebox between the peers
//! remembers an idle flow (a NAT, a load balancer, a conntrack table), then died on its next send,
//! by the reset the middlebox (or the host behind it) answered with, or by retransmissions that
//! went unanswered. Keepalive with an idle time below that middlebox's timeout would have kept
//! the flow alive. One pure function over a dropped [`CloseEvent`], like the classifier.

use std::{
    collections::HashSet,
    fmt,
    net::SocketAddr,
    str::FromStr,
    sync::{Arc, RwLock},
};

use crate::{
    kernel::hz::jiffies_to_seconds, record::decoder::CloseEvent, track::classifier::DropReason,
};

/// A middlebox idle timeout (`--idle-timeout-threshold NAME=SECONDS`): a connection idle longer
/// than this is forgotten by the middlebox, and later packets are dropped or reset.
#[derive(Debug, Clone, PartialEq)]
pub struct IdleThreshold {
    pub name: String,
    pub seconds: f64,
    /// The connections it applies to; `None`: every connection (a flag's, a load balancer the
    /// operator knows the node is behind).
    pub scope: Option<Arc<Scope>>,
}

/// The connections a middlebox sits in front of, by endpoint: IPVS's Services, whose clients
/// have a virtual address as their peer and whose backends have a destination as their own.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scope {
    pub remote: HashSet<SocketAddr>,
    pub local: HashSet<SocketAddr>,
}

impl IdleThreshold {
    /// Whether the middlebox is on the path of a connection between `local` and `remote`.
    pub(crate) fn applies_to(&self, local: SocketAddr, remote: SocketAddr) -> bool {
        // A dual-stack socket to an IPv4 peer shows it as ::ffff:a.b.c.d; IPVS lists a.b.c.d.
        let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
        self.scope.as_ref().is_none_or(|scope| {
            scope.remote.contains(&canonical(remote)) || scope.local.contains(&canonical(local))
        })
    }
}

impl FromStr for IdleThreshold {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let usage = "expected NAME=SECONDS, e.g. aws-nlb=350";
        let (name, seconds) = s.split_once('=').ok_or_else(|| format!("{s:?}: {usage}"))?;
        let valid_name = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !valid_name {
            return Err(format!(
                "{name:?}: the name becomes a label value; use letters, digits, '-', '_' or '.' ({usage})"
            ));
        }
        let seconds: f64 = seconds
            .parse()
            .map_err(|_| format!("{seconds:?} is not a number of seconds ({usage})"))?;
        if !(seconds.is_finite() && seconds > 0.0) {
            return Err(format!("{seconds} must be a positive number of seconds"));
        }
        Ok(Self {
            name: name.to_owned(),
            seconds,
            scope: None,
        })
    }
}

impl fmt::Display for IdleThreshold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.name, self.seconds)
    }
}

/// The node-wide thresholds in force (the flags' and IPVS's), shared by the tracker, the audit
/// and the metrics. Replaced whole when what the node reports changes: IPVS set up or retuned
/// after the agent started (kube-proxy starts with it on a new node).
#[derive(Debug, Clone, Default)]
pub(crate) struct NodeThresholds(Arc<RwLock<Arc<[IdleThreshold]>>>);

impl NodeThresholds {
    #[cfg(test)]
    pub(crate) fn new(thresholds: Vec<IdleThreshold>) -> Self {
        Self(Arc::new(RwLock::new(thresholds.into())))
    }

    /// The thresholds now.
    pub(crate) fn get(&self) -> Arc<[IdleThreshold]> {
        match self.0.read() {
            Ok(thresholds) => Arc::clone(&thresholds),
            // Only a panic while replacing poisons it; what it holds is still whole.
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Puts `thresholds` in force; whether they differ from the ones before.
    pub(crate) fn replace(&self, thresholds: Vec<IdleThreshold>) -> bool {
        let mut current = match self.0.write() {
            Ok(current) => current,
            Err(poisoned) => poisoned.into_inner(),
        };
        if current[..] == thresholds[..] {
            return false;
        }
        *current = thresholds.into();
        true
    }
}

/// The threshold the kernel reads from each connection's namespace: its conntrack established
/// timeout (`nf_conntrack_tcp_timeout_established`), when conntrack is attached to the namespace.
/// A `--idle-timeout-threshold` of this name replaces it everywhere.
pub(crate) const CONNTRACK: &str = "conntrack";

/// The threshold of IPVS, when the node balances TCP services with it (see
/// `audit::task::node_thresholds`).
pub(crate) const IPVS: &str = "ipvs";

/// The thresholds that apply to one connection: the node's (`--idle-timeout-threshold`, IPVS
/// for connections to or behind its Services) and its namespace's conntrack timeout.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Applicable<'a> {
    node: &'a [IdleThreshold],
    /// The connection's own and its peer's endpoints, for thresholds with a [`Scope`].
    local: SocketAddr,
    remote: SocketAddr,
    /// The namespace's conntrack established timeout, when conntrack tracks the namespace's
    /// connections and no node threshold is named [`CONNTRACK`].
    conntrack_seconds: Option<f64>,
}

impl<'a> Applicable<'a> {
    /// [`Self::with_seconds`] from the record's `conntrack_timeout` (jiffies; 0 when conntrack
    /// does not track the connection's namespace).
    pub(crate) fn new(
        node: &'a [IdleThreshold],
        (local, remote): (SocketAddr, SocketAddr),
        conntrack_jiffies: u32,
        hz: u32,
    ) -> Self {
        Self::with_seconds(
            node,
            (local, remote),
            (conntrack_jiffies != 0).then(|| jiffies_to_seconds(u64::from(conntrack_jiffies), hz)),
        )
    }

    /// The node's thresholds that apply between `local` and `remote`, and the namespace's
    /// conntrack timeout (`None`: not tracked), which a node threshold named [`CONNTRACK`]
    /// replaces.
    pub(crate) fn with_seconds(
        node: &'a [IdleThreshold],
        (local, remote): (SocketAddr, SocketAddr),
        conntrack_seconds: Option<f64>,
    ) -> Self {
        Self {
            node,
            local,
            remote,
            conntrack_seconds: conntrack_seconds
                .filter(|_| !node.iter().any(|t| t.name == CONNTRACK)),
        }
    }

    /// The namespace's conntrack threshold, when it applies.
    pub(crate) fn conntrack_seconds(self) -> Option<f64> {
        self.conntrack_seconds
    }

    /// Every applicable threshold as (name, seconds).
    pub(crate) fn iter(self) -> impl Iterator<Item = (&'a str, f64)> {
        self.node
            .iter()
            .filter(move |t| t.applies_to(self.local, self.remote))
            .map(|t| (t.name.as_str(), t.seconds))
            .chain(self.conntrack_seconds.map(|seconds| (CONNTRACK, seconds)))
    }
}

/// How the send after the silence died.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IdleKillHow {
    /// Answered by a reset: the middlebox forgot the flow and the packet reached a host (or the
    /// middlebox itself) that knows no such connection.
    Reset,
    /// Never answered: the middlebox drops what it does not know, and the send's retransmissions
    /// ran out (`TCP_USER_TIMEOUT` or `tcp_retries2`). When the dropping firewall is on this
    /// host's output path, the send itself fails and the kernel's probe timer runs out instead
    /// (`zero_window_timeout` with the peer's window open).
    Timeout,
}

impl IdleKillHow {
    pub(crate) const ALL: [Self; 2] = [Self::Reset, Self::Timeout];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Reset => "reset",
            Self::Timeout => "timeout",
        }
    }
}

/// A drop a middlebox idle timeout explains.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct IdleKill {
    /// The largest configured threshold at or below the silence: the middlebox whose timeout
    /// matches best (a shorter one would have killed the flow too).
    pub threshold: IdleThreshold,
    /// From the last segment received to the send that died.
    pub silence_seconds: f64,
    pub how: IdleKillHow,
    /// The connection's effective keepalive idle (`TCP_KEEPIDLE`, else the namespace's
    /// `tcp_keepalive_time`); `None` when keepalive was off.
    pub keepalive_idle_seconds: Option<f64>,
    /// A `TCP_KEEPIDLE` that keeps the flow alive through this middlebox (see [`suggested_idle`]).
    pub suggested_keepalive_idle_seconds: f64,
}

/// Whether `close`, dropped for `reason`, was an idle kill: it died on its first activity after
/// a silence at least as long as a threshold (a send answered by a reset or never answered, or
/// the first keepalive probe answered by a reset or never answered), and its keepalive (if on)
/// would not have probed before that threshold.
pub(crate) fn classify(
    close: &CloseEvent,
    reason: DropReason,
    hz: u32,
    node_thresholds: &[IdleThreshold],
) -> Option<IdleKill> {
    let settings = &close.settings;
    let keepalive_idle_seconds = settings
        .enabled
        .then(|| jiffies_to_seconds(u64::from(settings.idle_jiffies), hz));
    let (how, silence_seconds) = match reason {
        DropReason::ResetReceived => (IdleKillHow::Reset, close.silence_before_send_seconds(hz)),
        DropReason::RetransmitTimeout => {
            (IdleKillHow::Timeout, close.silence_before_send_seconds(hz))
        }
        // The probe timer with the window open: the send never left this host.
        DropReason::ZeroWindowTimeout if close.send_window > 0 => {
            (IdleKillHow::Timeout, close.silence_before_send_seconds(hz))
        }
        // The first probe after the silence (one unanswered so far: this one) answered by a
        // reset: the middlebox had forgotten the flow before keepalive spoke. Silent until the
        // reset, nothing having been received since.
        DropReason::KeepaliveReset if close.probes_out <= 1 => {
            (IdleKillHow::Reset, close.silent_seconds(hz))
        }
        // Every probe unanswered from the first, which went out one keepalive idle after the
        // last segment received. A dead peer looks the same (see the runbook).
        DropReason::KeepaliveTimeout => (IdleKillHow::Timeout, keepalive_idle_seconds?),
        _ => return None,
    };
    // With keepalive idle below every threshold the silence reaches, its probes would have kept
    // the middlebox's entry alive: something else killed it.
    let endpoints = (close.endpoints.local, close.endpoints.remote);
    let thresholds = Applicable::new(
        node_thresholds,
        endpoints,
        close.conntrack_timeout_jiffies,
        hz,
    );
    let (name, seconds) = exposed_to(silence_seconds, keepalive_idle_seconds, thresholds)?;
    let interval = jiffies_to_seconds(u64::from(settings.interval_jiffies), hz);
    Some(IdleKill {
        threshold: IdleThreshold {
            name: name.to_owned(),
            seconds,
            scope: None,
        },
        silence_seconds,
        how,
        keepalive_idle_seconds,
        suggested_keepalive_idle_seconds: suggested_idle(seconds, interval),
    })
}

/// The middlebox a connection silent for `silent_seconds` is (or was) exposed to: the largest
/// threshold at or below the silence that its keepalive (`keepalive_idle_seconds`, `None` when
/// off) would not have beaten with a probe. `None`: no threshold reached, or keepalive probes
/// come first.
pub(crate) fn exposed_to<'a>(
    silent_seconds: f64,
    keepalive_idle_seconds: Option<f64>,
    thresholds: Applicable<'a>,
) -> Option<(&'a str, f64)> {
    thresholds
        .iter()
        .filter(|&(_, seconds)| seconds <= silent_seconds)
        .filter(|&(_, seconds)| keepalive_idle_seconds.is_none_or(|idle| idle >= seconds))
        .max_by(|a, b| a.1.total_cmp(&b.1))
}

/// A keepalive idle below `threshold`, in whole seconds: `threshold - interval` when that leaves
/// at least half the threshold (a lost first probe's retry still comes before the middlebox
/// forgets the flow), else half the threshold; at least 1.
fn suggested_idle(threshold: f64, interval: f64) -> f64 {
    let idle = if threshold - interval >= threshold / 2.0 {
        threshold - interval
    } else {
        threshold / 2.0
    };
    // Whole seconds: TCP_KEEPIDLE takes an integer, and 1 is its minimum.
    idle.floor().max(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::decoder::fixtures;

    const HZ: u32 = 250;

    fn thresholds() -> Vec<IdleThreshold> {
        ["aws-nlb=350", "gcp-lb=600", "conntrack=3"]
            .iter()
            .map(|t| t.parse().expect("threshold"))
            .collect()
    }

    /// A connection without keepalive that received its last segment at jiffy 1000 and sent
    /// at `1000 + silent_seconds`, then died for `reason`.
    fn drop_after(silent_seconds: u32) -> CloseEvent {
        let mut close = fixtures::keepalive_abort();
        close.settings.enabled = false;
        close.settings.idle_jiffies = 7200 * HZ;
        close.settings.interval_jiffies = 75 * HZ;
        close.last_received_jiffies = 1000;
        close.last_sent_jiffies = 1000 + silent_seconds * HZ;
        close.jiffies = u64::from(close.last_sent_jiffies) + 1;
        close
    }

    #[test]
    fn node_thresholds_are_replaced_whole_and_a_change_is_reported() {
        let parse = |list: &[&str]| -> Vec<IdleThreshold> {
            list.iter().map(|t| t.parse().expect("threshold")).collect()
        };
        let shared = NodeThresholds::default();
        let reader = shared.clone();
        assert!(
            !shared.replace(Vec::new()),
            "nothing to nothing is no change"
        );
        assert!(shared.replace(parse(&["aws-nlb=350", "ipvs=1234"])));
        assert!(!shared.replace(parse(&["aws-nlb=350", "ipvs=1234"])));
        let before = reader.get();
        assert!(shared.replace(parse(&["aws-nlb=350", "ipvs=1500"])));
        // A reader holding the old set keeps it whole; the next read sees the new one.
        assert_eq!(before[..], parse(&["aws-nlb=350", "ipvs=1234"])[..]);
        assert_eq!(reader.get()[..], parse(&["aws-nlb=350", "ipvs=1500"])[..]);
    }

    /// IPVS's timeout applies to a client whose peer is a Service's virtual address and to a
    /// backend that is one of its destinations, whatever the socket's family; not to others.
    #[test]
    fn a_scoped_threshold_applies_to_its_services_clients_and_backends_only() {
        let at = |s: &str| s.parse::<SocketAddr>().expect("address");
        let ipvs = IdleThreshold {
            name: IPVS.to_owned(),
            seconds: 900.0,
            scope: Some(Arc::new(Scope {
                remote: HashSet::from([at("10.96.0.1:443")]),
                local: HashSet::from([at("172.18.0.2:6443")]),
            })),
        };
        let flag: IdleThreshold = "aws-nlb=350".parse().expect("threshold");
        let pod = at("10.244.1.5:40000");
        assert!(ipvs.applies_to(pod, at("10.96.0.1:443")));
        assert!(ipvs.applies_to(
            at("[::ffff:10.244.1.5]:40000"),
            at("[::ffff:10.96.0.1]:443")
        ));
        assert!(ipvs.applies_to(at("172.18.0.2:6443"), at("10.244.1.5:40000")));
        assert!(!ipvs.applies_to(pod, at("10.96.0.1:80")));
        assert!(!ipvs.applies_to(pod, at("192.0.2.7:5432")));
        assert!(flag.applies_to(pod, at("192.0.2.7:5432")));
        let node = [flag, ipvs];
        let names = |remote: &str| -> Vec<&str> {
            Applicable::with_seconds(&node, (pod, at(remote)), None)
                .iter()
                .map(|(name, _)| name)
                .collect()
        };
        assert_eq!(names("10.96.0.1:443"), ["aws-nlb", IPVS]);
        assert_eq!(names("192.0.2.7:5432"), ["aws-nlb"]);
    }

    #[test]
    fn thresholds_parse_name_equals_seconds() {
        assert_eq!(
            "aws-nlb=350".parse::<IdleThreshold>(),
            Ok(IdleThreshold {
                name: "aws-nlb".to_owned(),
                seconds: 350.0,
                scope: None,
            })
        );
        assert!("350".parse::<IdleThreshold>().is_err());
        assert!("aws nlb=350".parse::<IdleThreshold>().is_err());
        assert!("x=-1".parse::<IdleThreshold>().is_err());
        assert!("x=abc".parse::<IdleThreshold>().is_err());
    }

    #[test]
    fn reset_after_a_long_silence_names_the_closest_threshold_below_it() {
        let kill = classify(
            &drop_after(400),
            DropReason::ResetReceived,
            HZ,
            &thresholds(),
        )
        .expect("idle kill");
        assert_eq!(kill.threshold.name, "aws-nlb");
        assert_eq!(kill.silence_seconds, 400.0);
        assert_eq!(kill.how, IdleKillHow::Reset);
        assert_eq!(kill.keepalive_idle_seconds, None);
        // 350 - 75 leaves more than half.
        assert_eq!(kill.suggested_keepalive_idle_seconds, 275.0);
    }

    /// The namespace's conntrack timeout (from the record) is a threshold of its own, unless
    /// one is given under that name.
    #[test]
    fn the_namespaces_conntrack_timeout_names_a_kill_without_any_threshold_given() {
        let mut close = drop_after(6);
        assert_eq!(classify(&close, DropReason::ResetReceived, HZ, &[]), None);
        close.conntrack_timeout_jiffies = 3 * HZ;
        let kill = classify(&close, DropReason::ResetReceived, HZ, &[]).expect("idle kill");
        assert_eq!(kill.threshold.name, CONNTRACK);
        assert_eq!(kill.threshold.seconds, 3.0);
        assert_eq!(kill.suggested_keepalive_idle_seconds, 1.0);
        // Given as a flag (here 10 s, above the silence), it replaces the namespace's.
        let given: Vec<IdleThreshold> = vec!["conntrack=10".parse().expect("threshold")];
        assert_eq!(
            classify(&close, DropReason::ResetReceived, HZ, &given),
            None
        );
    }

    #[test]
    fn retransmission_timeout_is_an_idle_kill_too() {
        let kill = classify(
            &drop_after(700),
            DropReason::RetransmitTimeout,
            HZ,
            &thresholds(),
        )
        .expect("idle kill");
        assert_eq!(kill.threshold.name, "gcp-lb");
        assert_eq!(kill.how, IdleKillHow::Timeout);
    }

    #[test]
    fn a_send_refused_on_this_host_is_a_timeout_but_a_closed_window_is_not() {
        let mut close = drop_after(400);
        close.send_window = 65535;
        let kill =
            classify(&close, DropReason::ZeroWindowTimeout, HZ, &thresholds()).expect("idle kill");
        assert_eq!(kill.how, IdleKillHow::Timeout);
        close.send_window = 0;
        assert_eq!(
            classify(&close, DropReason::ZeroWindowTimeout, HZ, &thresholds()),
            None
        );
    }

    /// Retransmissions move `lsndtime`; the send is dated by `retrans_stamp`.
    #[test]
    fn a_retransmitted_send_is_dated_by_its_first_transmission() {
        let mut close = drop_after(400);
        // Retransmitted for 15 s: lsndtime is the last retransmission.
        close.last_sent_jiffies += 15 * HZ;
        close.jiffies = u64::from(close.last_sent_jiffies) + 1;
        // First sent 15 s (and a jiffy) before the close, on the ms clock of ktime_ns.
        close.ktime_ns = 1_000_000_000_000;
        close.retrans_stamp = 1_000_000 - 15_004;
        let kill =
            classify(&close, DropReason::RetransmitTimeout, HZ, &thresholds()).expect("idle kill");
        assert_eq!(kill.silence_seconds, 400.0);
        // A stamp from before the silence (an earlier episode) is not this send's.
        close.retrans_stamp = 1_000_000 - 500_000;
        let kill =
            classify(&close, DropReason::RetransmitTimeout, HZ, &thresholds()).expect("idle kill");
        assert_eq!(kill.silence_seconds, 415.0);
    }

    /// A send this host refused never leaves: the probe timer's attempts move `lsndtime`, and
    /// its first run (`icsk_probes_tstamp`) dates the send.
    #[test]
    fn a_refused_send_is_dated_by_the_probe_timers_first_run() {
        let mut close = drop_after(400);
        close.send_window = 65535;
        // Retried for 2 s (TCP_USER_TIMEOUT): lsndtime is the last attempt.
        let first_attempt = close.last_sent_jiffies;
        close.last_sent_jiffies += 2 * HZ;
        close.jiffies = u64::from(close.last_sent_jiffies) + 1;
        close.probes_tstamp = first_attempt;
        let kill =
            classify(&close, DropReason::ZeroWindowTimeout, HZ, &thresholds()).expect("idle kill");
        assert_eq!(kill.silence_seconds, 400.0);
        // Without the stamp (a kernel without the member), the last attempt.
        close.probes_tstamp = 0;
        let kill =
            classify(&close, DropReason::ZeroWindowTimeout, HZ, &thresholds()).expect("idle kill");
        assert_eq!(kill.silence_seconds, 402.0);
        // A stamp from before the last segment received belongs to an earlier episode.
        close.probes_tstamp = 500;
        let kill =
            classify(&close, DropReason::ZeroWindowTimeout, HZ, &thresholds()).expect("idle kill");
        assert_eq!(kill.silence_seconds, 402.0);
    }

    #[test]
    fn silence_below_every_threshold_is_no_idle_kill() {
        assert_eq!(
            classify(&drop_after(2), DropReason::ResetReceived, HZ, &thresholds()),
            None
        );
    }

    /// The kernel reads the namespace's conntrack timeout into a close record only where
    /// `keepalive_ebpf::may_be_idle_kill` holds: every drop this classification can call an
    /// idle kill must be one of those, or its conntrack threshold would be missing.
    #[test]
    fn every_idle_kill_is_a_drop_the_kernel_reads_the_conntrack_timeout_for() {
        let mut kills = 0;
        for reason in DropReason::ALL {
            for silent_seconds in [0, 400] {
                for keepalive in [false, true] {
                    let mut close = drop_after(silent_seconds);
                    close.settings.enabled = keepalive;
                    close.settings.idle_jiffies = 600 * HZ;
                    close.probes_out = 1;
                    close.send_window = 1;
                    close.jiffies = u64::from(close.last_received_jiffies) + 700 * u64::from(HZ);
                    close.conntrack_timeout_jiffies = HZ;
                    let silence = keepalive_ebpf::silence_before_send(
                        close.last_received_jiffies,
                        close.last_sent_jiffies,
                    );
                    if classify(&close, reason, HZ, &thresholds()).is_some() {
                        kills += 1;
                        assert!(
                            keepalive_ebpf::may_be_idle_kill(Some(reason), silence),
                            "{reason} after {silent_seconds} s, keepalive {keepalive}"
                        );
                    }
                }
            }
        }
        // Every kind of idle kill was among them: resets, retransmissions, zero window and
        // both keepalive drops.
        assert!(kills >= 5, "{kills}");
    }

    #[test]
    fn other_reasons_are_no_idle_kill() {
        for reason in [DropReason::LocalAbort, DropReason::ConnectTimeout] {
            assert_eq!(classify(&drop_after(400), reason, HZ, &thresholds()), None);
        }
    }

    /// Keepalive idle at or above a threshold: its first probe is the first activity after the
    /// silence, and dies like a send would.
    #[test]
    fn a_first_keepalive_probe_that_died_is_an_idle_kill() {
        let clouds = &thresholds()[..2];
        let mut close = fixtures::keepalive_abort();
        close.settings.idle_jiffies = 7200 * HZ;
        close.settings.interval_jiffies = 75 * HZ;
        close.last_received_jiffies = 1000;
        close.jiffies = 1000 + 7201 * u64::from(HZ);
        close.probes_out = 1;
        let kill = classify(&close, DropReason::KeepaliveReset, HZ, clouds).expect("idle kill");
        assert_eq!(kill.threshold.name, "gcp-lb");
        assert_eq!(kill.how, IdleKillHow::Reset);
        assert_eq!(kill.silence_seconds, 7201.0);
        assert_eq!(kill.suggested_keepalive_idle_seconds, 525.0);
        // A reset answering a later probe: earlier ones went unanswered, then something else.
        close.probes_out = 2;
        assert_eq!(
            classify(&close, DropReason::KeepaliveReset, HZ, clouds),
            None
        );
        // Every probe unanswered, the first one keepalive idle after the last segment received.
        close.probes_out = 9;
        let kill = classify(&close, DropReason::KeepaliveTimeout, HZ, clouds).expect("idle kill");
        assert_eq!(kill.how, IdleKillHow::Timeout);
        assert_eq!(kill.silence_seconds, 7200.0);
        // Keepalive idle below every threshold: its probes kept the flow alive.
        close.settings.idle_jiffies = 60 * HZ;
        assert_eq!(
            classify(&close, DropReason::KeepaliveTimeout, HZ, clouds),
            None
        );
    }

    #[test]
    fn keepalive_below_the_threshold_would_have_kept_it_alive() {
        let clouds = &thresholds()[..2];
        let mut close = drop_after(400);
        close.settings.enabled = true;
        close.settings.idle_jiffies = 300 * HZ;
        assert_eq!(
            classify(&close, DropReason::ResetReceived, HZ, clouds),
            None
        );
        // Not below a 3 s conntrack timeout, though: that one explains it.
        let kill = classify(&close, DropReason::ResetReceived, HZ, &thresholds())
            .expect("keepalive idle above the conntrack threshold");
        assert_eq!(kill.threshold.name, "conntrack");
        close.settings.idle_jiffies = 7200 * HZ;
        let kill = classify(&close, DropReason::ResetReceived, HZ, clouds)
            .expect("keepalive idle above the threshold");
        assert_eq!(kill.threshold.name, "aws-nlb");
        assert_eq!(kill.keepalive_idle_seconds, Some(7200.0));
        // Silent 700 s with keepalive idle 500: too slow for aws-nlb (350), though not for
        // gcp-lb (600), which the silence also reached.
        let mut close = drop_after(700);
        close.settings.enabled = true;
        close.settings.idle_jiffies = 500 * HZ;
        let kill = classify(&close, DropReason::ResetReceived, HZ, clouds).expect("idle kill");
        assert_eq!(kill.threshold.name, "aws-nlb");
    }

    #[test]
    fn a_reply_after_the_send_is_no_silence() {
        let mut close = drop_after(400);
        close.last_received_jiffies = close.last_sent_jiffies + 10;
        assert_eq!(
            classify(&close, DropReason::ResetReceived, HZ, &thresholds()),
            None
        );
    }

    #[test]
    fn suggested_idle_stays_below_the_threshold() {
        assert_eq!(suggested_idle(350.0, 75.0), 275.0);
        // The interval would leave less than half: half the threshold.
        assert_eq!(suggested_idle(600.0, 400.0), 300.0);
        assert_eq!(suggested_idle(3.0, 1.0), 2.0);
        assert_eq!(suggested_idle(3.0, 2.0), 1.0);
        assert_eq!(suggested_idle(1.0, 75.0), 1.0);
        assert_eq!(suggested_idle(2.5, 75.0), 1.0);
    }
}
