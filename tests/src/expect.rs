//! What the agent's metrics for one network namespace should say.

use crate::metrics::Metrics;
use crate::sock::{Conn, TcpPair};

pub const PROBES: &str = "tcp_keepalive_probes_total";
pub const DROPS: &str = "tcp_connection_drops_total";
pub const CONN_PROBES: &str = "tcp_keepalive_connection_probes_total";
pub const CONN_UNANSWERED: &str = "tcp_keepalive_connection_unanswered_probes";
pub const AUDIT_SOCKETS: &str = "tcp_keepalive_sockets";
pub const IDLE_KILLS: &str = "tcp_idle_kills_total";
pub const CONN_IDLE_KILL_SILENCE: &str = "tcp_connection_idle_kill_silence_seconds";

/// Every `reason` of `tcp_connection_drops_total`.
pub const DROP_REASONS: [&str; 8] = [
    "keepalive_timeout",
    "keepalive_reset",
    "retransmit_timeout",
    "zero_window_timeout",
    "connect_timeout",
    "reset_received",
    "local_abort",
    "other",
];

#[derive(Debug, Clone)]
enum Check {
    /// Sum of the matching samples equals the value (absent series count as 0).
    Value {
        name: &'static str,
        labels: Vec<(String, String)>,
        expected: f64,
    },
    /// Sum of the matching samples is within `min..=max`; `why` explains the range.
    Range {
        name: &'static str,
        labels: Vec<(String, String)>,
        min: f64,
        max: f64,
        why: String,
    },
    /// At least one matching sample exists.
    Present {
        name: &'static str,
        labels: Vec<(String, String)>,
    },
    /// A connection's series carry no `reason` label (it was not dropped).
    NotDropped { conn: Conn },
    /// A connection has no per-connection series at all.
    NoSeries { conn: Conn },
}

/// A set of checks on one namespace's series, all of which must hold in the same scrape.
#[derive(Debug, Clone)]
pub struct Expectations {
    netns: u64,
    checks: Vec<Check>,
    explicit_reasons: Vec<&'static str>,
    other_drops_zero: bool,
    /// The kernel may have run no program for any of the namespace's keepalive expiries (at
    /// least as many went unrun as the probes it sent): then nothing created its counters, and
    /// its drop series may be absent, though not half there.
    may_be_unseen: bool,
}

impl Expectations {
    pub fn netns(&self) -> u64 {
        self.netns
    }

    /// Expectations about namespace `netns` (its inode number).
    pub fn for_netns(netns: u64) -> Expectations {
        Expectations {
            netns,
            checks: Vec::new(),
            explicit_reasons: Vec::new(),
            other_drops_zero: false,
            may_be_unseen: false,
        }
    }

    fn ns_labels(&self) -> Vec<(String, String)> {
        vec![("netns".to_owned(), self.netns.to_string())]
    }

    fn value(mut self, name: &'static str, labels: Vec<(String, String)>, expected: u64) -> Self {
        self.checks.push(Check::Value {
            name,
            labels,
            expected: expected as f64,
        });
        self
    }

    /// `tcp_keepalive_probes_total{netns}` == n.
    pub fn probes(self, n: u64) -> Self {
        let labels = self.ns_labels();
        self.value(PROBES, labels, n)
    }

    /// `tcp_keepalive_probes_total{netns}` == n, or up to `not_run` below it: probes sent in
    /// keepalive expiries the kernel ran none of the agent's programs for (see
    /// [`crate::tracepoint`]). Each such expiry sends at most one probe here (no urgent data).
    pub fn probes_unless_not_run(self, n: u64, not_run: u64) -> Self {
        self.probes(n).probes_short_by_at_most(not_run)
    }

    /// Every probe count (`tcp_keepalive_probes_total`, `tcp_keepalive_connection_probes_total`)
    /// expected exact may be up to `not_run` below it: probes sent in keepalive expiries the
    /// kernel ran none of the agent's programs for. No-op when `not_run` is 0.
    pub fn probes_short_by_at_most(mut self, not_run: u64) -> Self {
        if not_run == 0 {
            return self;
        }
        for check in &mut self.checks {
            if let Check::Value {
                name: name @ (PROBES | CONN_PROBES),
                labels,
                expected,
            } = check
            {
                if *name == PROBES && *expected <= not_run as f64 {
                    self.may_be_unseen = true;
                }
                *check = Check::Range {
                    name,
                    labels: std::mem::take(labels),
                    min: (*expected - not_run as f64).max(0.0),
                    max: *expected,
                    why: format!("{expected}; {not_run} keepalive expiries ran no program"),
                };
            }
        }
        self
    }

    /// `tcp_connection_drops_total{netns,reason}` == n. The series must exist (every reason is
    /// initialised to 0 once the namespace is seen).
    pub fn drops(mut self, reason: &'static str, n: u64) -> Self {
        assert!(DROP_REASONS.contains(&reason), "unknown reason {reason}");
        let mut labels = self.ns_labels();
        labels.push(("reason".to_owned(), reason.to_owned()));
        self.explicit_reasons.push(reason);
        self.checks.push(Check::Present {
            name: DROPS,
            labels: labels.clone(),
        });
        self.value(DROPS, labels, n)
    }

    /// Every reason not named in a `drops()` call is 0 (and present).
    pub fn other_drops_zero(mut self) -> Self {
        self.other_drops_zero = true;
        self
    }

    /// `tcp_keepalive_sockets{netns,keepalive}` == n: connections the latest audit walk found
    /// with keepalive `"on"` or `"off"`.
    pub fn audit_sockets(self, keepalive: &'static str, n: u64) -> Self {
        let mut labels = self.ns_labels();
        labels.push(("keepalive".to_owned(), keepalive.to_owned()));
        self.value(AUDIT_SOCKETS, labels, n)
    }

    /// `tcp_keepalive_idle_at_or_above_threshold_sockets{netns,threshold}` == n: keepalive-on
    /// connections of the latest audit walk whose idle is at or above that threshold, among
    /// those it applies to.
    pub fn audit_at_or_above(self, threshold: &str, n: u64) -> Self {
        let mut labels = self.ns_labels();
        labels.push(("threshold".to_owned(), threshold.to_owned()));
        self.value(
            "tcp_keepalive_idle_at_or_above_threshold_sockets",
            labels,
            n,
        )
    }

    /// `tcp_keepalive_connection_probes_total{conn}` == n (whatever the reason label).
    pub fn conn_probes(self, conn: &Conn, n: u64) -> Self {
        let labels = conn.labels(self.netns);
        self.value(CONN_PROBES, labels.clone(), n)
            .present(CONN_PROBES, labels)
    }

    /// `tcp_keepalive_connection_unanswered_probes{conn}` == n (whatever the reason label).
    pub fn conn_unanswered(self, conn: &Conn, n: u64) -> Self {
        let labels = conn.labels(self.netns);
        self.value(CONN_UNANSWERED, labels.clone(), n)
            .present(CONN_UNANSWERED, labels)
    }

    /// `tcp_idle_kills_total{netns,threshold,died_by}` == n (absent counts as 0: a series
    /// appears with its first idle kill).
    pub fn idle_kills(self, threshold: &str, died_by: &str, n: u64) -> Self {
        let mut labels = self.ns_labels();
        labels.push(("threshold".to_owned(), threshold.to_owned()));
        labels.push(("died_by".to_owned(), died_by.to_owned()));
        self.value(IDLE_KILLS, labels, n)
    }

    /// The connection has an idle-kill series for `threshold`, `died_by` and `keepalive`
    /// (`"on"`/`"off"`).
    pub fn conn_idle_kill(
        self,
        conn: &Conn,
        threshold: &str,
        died_by: &str,
        keepalive: &str,
    ) -> Self {
        let mut labels = conn.labels(self.netns);
        for (key, value) in [
            ("threshold", threshold),
            ("died_by", died_by),
            ("keepalive", keepalive),
        ] {
            labels.push((key.to_owned(), value.to_owned()));
        }
        self.present(CONN_IDLE_KILL_SILENCE, labels)
    }

    /// The connection's series exist with `reason="<reason>"`.
    pub fn conn_dropped(self, conn: &Conn, reason: &'static str) -> Self {
        assert!(DROP_REASONS.contains(&reason), "unknown reason {reason}");
        let mut labels = conn.labels(self.netns);
        labels.push(("reason".to_owned(), reason.to_owned()));
        self.present(CONN_PROBES, labels.clone())
            .present(CONN_UNANSWERED, labels)
    }

    /// The pair's client was aborted by its keepalive timer after `probes` unanswered probes,
    /// and the server got the RST (`reset_received`); nothing else dropped. The server has no
    /// `SO_KEEPALIVE`, so (by the agent's default) its drop is in the namespace's total only,
    /// with no series of its own.
    pub fn keepalive_timeout(netns: u64, pair: &TcpPair, probes: u64) -> Self {
        Self::for_netns(netns)
            .probes(probes)
            .drops("keepalive_timeout", 1)
            .drops("reset_received", 1)
            .other_drops_zero()
            .conn_probes(&pair.client_conn, probes)
            .conn_unanswered(&pair.client_conn, probes)
            .conn_dropped(&pair.client_conn, "keepalive_timeout")
            .conn_without_series(&pair.server_conn)
    }

    /// The pair's client was ended by its write timer (`retransmit_timeout` or
    /// `zero_window_timeout`) after `probes` keepalive probes; no RST, so the server lives on.
    pub fn write_timer_drop(netns: u64, pair: &TcpPair, probes: u64, reason: &'static str) -> Self {
        Self::for_netns(netns)
            .probes(probes)
            .drops(reason, 1)
            .other_drops_zero()
            .conn_probes(&pair.client_conn, probes)
            .conn_dropped(&pair.client_conn, reason)
            .conn_not_dropped(&pair.server_conn)
    }

    /// [`Self::write_timer_drop`] of a keepalive client that never probed (its keepalive timer
    /// ran only with data in flight, when it sends nothing): the agent's table never held it,
    /// so its drop is counted in the namespace and has no per-connection series (see
    /// `TrackedMarks` in `keepalive-ebpf`).
    pub fn write_timer_drop_unprobed(netns: u64, pair: &TcpPair, reason: &'static str) -> Self {
        Self::for_netns(netns)
            .probes(0)
            .drops(reason, 1)
            .other_drops_zero()
            .conn_without_series(&pair.client_conn)
            .conn_not_dropped(&pair.server_conn)
    }

    /// The connection's series (if any) have no `reason` label.
    pub fn conn_not_dropped(mut self, conn: &Conn) -> Self {
        self.checks.push(Check::NotDropped { conn: *conn });
        self
    }

    /// The connection has no per-connection series: what the agent does by default with a
    /// connection without `SO_KEEPALIVE`, or one that never probed, even once dropped.
    pub fn conn_without_series(mut self, conn: &Conn) -> Self {
        self.checks.push(Check::NoSeries { conn: *conn });
        self
    }

    fn present(mut self, name: &'static str, labels: Vec<(String, String)>) -> Self {
        self.checks.push(Check::Present { name, labels });
        self
    }

    fn all_checks(&self) -> Vec<Check> {
        let mut checks = self.checks.clone();
        if self.other_drops_zero {
            for reason in DROP_REASONS {
                if !self.explicit_reasons.contains(&reason) {
                    let mut labels = self.ns_labels();
                    labels.push(("reason".to_owned(), reason.to_owned()));
                    checks.push(Check::Present {
                        name: DROPS,
                        labels: labels.clone(),
                    });
                    checks.push(Check::Value {
                        name: DROPS,
                        labels,
                        expected: 0.0,
                    });
                }
            }
        }
        checks
    }

    /// Human-readable descriptions of the checks that fail on `m`; empty when all hold.
    pub fn mismatches(&self, m: &Metrics) -> Vec<String> {
        let mut out = Vec::new();
        let unseen = self.may_be_unseen
            && m.matching(PROBES, &self.ns_labels()).is_empty()
            && m.matching(DROPS, &self.ns_labels()).is_empty();
        for check in self.all_checks() {
            match check {
                Check::Value {
                    name,
                    labels,
                    expected,
                } => {
                    let got = m.value(name, &labels);
                    if got != expected {
                        out.push(format!("{name}{}: {expected}, got {got}", fmt(&labels)));
                    }
                }
                Check::Range {
                    name,
                    labels,
                    min,
                    max,
                    why,
                } => {
                    let got = m.value(name, &labels);
                    if got < min || got > max {
                        out.push(format!(
                            "{name}{}: {min}..={max} ({why}), got {got}",
                            fmt(&labels)
                        ));
                    }
                }
                Check::Present { name, labels } => {
                    if m.matching(name, &labels).is_empty() && !(unseen && name == DROPS) {
                        out.push(format!("{name}{}: present, got no series", fmt(&labels)));
                    }
                }
                Check::NoSeries { conn } => {
                    let labels = conn.labels(self.netns);
                    for name in [CONN_PROBES, CONN_UNANSWERED] {
                        for s in m.matching(name, &labels) {
                            out.push(format!(
                                "{name}{}: no series expected, got one with reason={:?}",
                                fmt(&labels),
                                s.label("reason")
                            ));
                        }
                    }
                }
                Check::NotDropped { conn } => {
                    let labels = conn.labels(self.netns);
                    for name in [CONN_PROBES, CONN_UNANSWERED] {
                        for s in m.matching(name, &labels) {
                            if let Some(reason) = s.label("reason") {
                                out.push(format!(
                                    "{name}{}: no reason label, got reason={reason:?}",
                                    fmt(&labels)
                                ));
                            }
                        }
                    }
                }
            }
        }
        out
    }
}

fn fmt(labels: &[(String, String)]) -> String {
    let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
    format!("{{{}}}", inner.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_mismatches_and_accepts_matching_scrapes() {
        let conn = Conn {
            local: "127.0.0.1:40000".parse().expect("addr"),
            remote: "127.0.0.1:5000".parse().expect("addr"),
        };
        let e = Expectations::for_netns(42)
            .probes(3)
            .drops("keepalive_timeout", 1)
            .other_drops_zero()
            .conn_probes(&conn, 3)
            .conn_dropped(&conn, "keepalive_timeout");
        let mut text = String::from("tcp_keepalive_probes_total{netns=\"42\"} 3\n");
        for r in DROP_REASONS {
            let v = u8::from(r == "keepalive_timeout");
            text.push_str(&format!(
                "tcp_connection_drops_total{{netns=\"42\",reason=\"{r}\"}} {v}\n"
            ));
        }
        let conn_labels = "netns=\"42\",local_addr=\"127.0.0.1\",local_port=\"40000\",\
                           remote_addr=\"127.0.0.1\",remote_port=\"5000\",reason=\"keepalive_timeout\"";
        text.push_str(&format!(
            "tcp_keepalive_connection_probes_total{{{conn_labels}}} 3\n\
             tcp_keepalive_connection_unanswered_probes{{{conn_labels}}} 3\n"
        ));
        let m = Metrics::parse(&text).expect("parse");
        assert_eq!(e.mismatches(&m), Vec::<String>::new());

        let healthy = Expectations::for_netns(42).conn_not_dropped(&conn);
        assert_eq!(healthy.mismatches(&m).len(), 2);
        let untracked = Expectations::for_netns(42).conn_without_series(&conn);
        assert_eq!(untracked.mismatches(&m).len(), 2);
        let other = Conn {
            local: "127.0.0.1:40001".parse().expect("addr"),
            ..conn
        };
        let untracked = Expectations::for_netns(42).conn_without_series(&other);
        assert_eq!(untracked.mismatches(&m), Vec::<String>::new());

        let m = Metrics::parse("tcp_keepalive_probes_total{netns=\"42\"} 2\n").expect("parse");
        let problems = e.mismatches(&m);
        assert!(
            problems
                .iter()
                .any(|p| p.contains("tcp_keepalive_probes_total{netns=\"42\"}: 3, got 2"))
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("reason=\"local_abort\""))
        );
    }
    #[test]
    fn probes_may_fall_short_only_by_the_expiries_no_program_ran_for() {
        let probes = |n: u32| {
            Metrics::parse(&format!("tcp_keepalive_probes_total{{netns=\"42\"}} {n}\n"))
                .expect("parse")
        };
        let e = Expectations::for_netns(42).probes_unless_not_run(100, 10);
        for ok in [90, 95, 100] {
            assert_eq!(e.mismatches(&probes(ok)), Vec::<String>::new(), "{ok}");
        }
        for bad in [89, 101] {
            let problems = e.mismatches(&probes(bad));
            assert_eq!(problems.len(), 1, "{bad}: {problems:?}");
            assert!(problems[0].contains("90..=100"), "{problems:?}");
            assert!(problems[0].contains("10 keepalive expiries ran no program"));
        }
        // Nothing the kernel left unrun: exact.
        let exact = Expectations::for_netns(42).probes_unless_not_run(100, 0);
        assert_eq!(exact.mismatches(&probes(99)).len(), 1);
    }

    #[test]
    fn a_namespace_may_be_unseen_only_when_all_its_expiries_may_have_run_no_program() {
        let nothing = Metrics::parse("").expect("parse");
        // 2 probes, 10 expiries unrun somewhere: all of this namespace's may be among them.
        let unseen = Expectations::for_netns(42)
            .probes_unless_not_run(2, 10)
            .other_drops_zero();
        assert_eq!(unseen.mismatches(&nothing), Vec::<String>::new());
        // Seen, its drop series must all be there.
        let half = Metrics::parse(
            "tcp_keepalive_probes_total{netns=\"42\"} 2\n\
             tcp_connection_drops_total{netns=\"42\",reason=\"other\"} 0\n",
        )
        .expect("parse");
        assert_eq!(
            unseen.mismatches(&half).len(),
            7,
            "{:?}",
            unseen.mismatches(&half)
        );
        // Fewer unrun than its probes: some program ran for it, so its series must exist.
        let seen = Expectations::for_netns(42)
            .probes_unless_not_run(20, 10)
            .other_drops_zero();
        assert_eq!(
            seen.mismatches(&nothing).len(),
            9,
            "{:?}",
            seen.mismatches(&nothing)
        );
    }

    #[test]
    fn a_connections_probes_may_fall_short_by_the_same_and_other_checks_stay_exact() {
        let conn = Conn {
            local: "127.0.0.1:1000".parse().expect("addr"),
            remote: "127.0.0.1:2000".parse().expect("addr"),
        };
        let labels = "netns=\"42\",local_addr=\"127.0.0.1\",local_port=\"1000\",\
                      remote_addr=\"127.0.0.1\",remote_port=\"2000\"";
        let scrape = |probes: u32, unanswered: u32| {
            Metrics::parse(&format!(
                "tcp_keepalive_connection_probes_total{{{labels}}} {probes}\n\
                 tcp_keepalive_connection_unanswered_probes{{{labels}}} {unanswered}\n"
            ))
            .expect("parse")
        };
        let e = Expectations::for_netns(42)
            .conn_probes(&conn, 3)
            .conn_unanswered(&conn, 3)
            .probes_short_by_at_most(1);
        assert_eq!(e.mismatches(&scrape(2, 3)), Vec::<String>::new());
        assert_eq!(e.mismatches(&scrape(1, 3)).len(), 1);
        assert_eq!(e.mismatches(&scrape(4, 3)).len(), 1);
        // Unanswered probes are read from the socket, not counted: still exact.
        assert_eq!(e.mismatches(&scrape(3, 2)).len(), 1);
    }
}
