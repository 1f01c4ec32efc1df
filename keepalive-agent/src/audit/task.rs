//! The agent's periodic keepalive configuration audit: walk every TCP socket at start and then
//! every `--audit.interval`, and hand the summary to [`AuditCollector`] for the next scrape.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use log::{debug, info, warn};
use tokio::time::MissedTickBehavior;

use crate::{
    audit::summary::{AuditCollector, AuditState, AuditSummary},
    audit::walk,
    export::labels::AggregateLabels,
    kernel::hash_walk::HashWalk,
    kernel::ipvs::{self, IpvsProgram},
    kernel::programs::IdleKillFilter,
    record::decoder::AuditedSocket,
    track::{
        idle_kill::{self, IdleThreshold, NodeThresholds, Scope},
        namespaces::NamespaceIdentity,
        tracker::Tracker,
    },
};

/// The label set each audited socket is counted under (see [`AuditSummary::new`]).
pub(crate) type AuditGroup = Arc<dyn Fn(&AuditedSocket) -> AggregateLabels + Send + Sync>;

/// `keepalive-agent run` flags of the audit.
#[derive(Debug, Clone, clap::Args)]
pub struct AuditConfig {
    /// How often to walk every TCP socket for the keepalive configuration metrics
    /// (tcp_keepalive_sockets, tcp_keepalive_idle_seconds, ...); the first walk runs at start.
    /// Each walk's duration is exported as keepalive_agent_audit_duration_seconds.
    #[arg(long = "audit.interval", default_value = "60s", value_parser = parse_interval)]
    pub interval: Duration,
    /// A middlebox idle timeout on this node's paths, as NAME=SECONDS (repeat the flag for
    /// several): a load balancer's, e.g. aws-nlb=350, gcp-lb=600, azure-lb=240. Added to what
    /// the node knows itself: each namespace's conntrack established timeout where conntrack
    /// tracks it (threshold "conntrack"), and IPVS's when the node balances TCP services with
    /// it ("ipvs": its TCP timeout read from the kernel every --audit.interval, 900 s where it
    /// cannot be read). A threshold of either name replaces the one found. Keepalive-on
    /// connections whose idle time is at or above a threshold are counted in
    /// tcp_keepalive_idle_at_or_above_threshold_sockets (the middlebox forgets them before
    /// their first probe); a drop after at least this much silence is an idle kill
    /// (tcp_idle_kills_total).
    #[arg(long = "idle-timeout-threshold", value_name = "NAME=SECONDS")]
    pub idle_timeout_thresholds: Vec<IdleThreshold>,
}

/// The node's middlebox idle timeouts: the operator's (`given`), and IPVS's when the node
/// balances TCP services with it and none is named `ipvs` (`proc_root`: the host's procfs):
/// its TCP established timeout as `read_ipvs_timeout` finds it in the kernel (kube-proxy's
/// `--ipvs-tcp-timeout`), else its default. Conntrack's is not here: it is per namespace, read
/// by the kernel programs with each record ([`idle_kill::CONNTRACK`]). Logs where IPVS's came
/// from.
pub(crate) fn node_thresholds<E: std::fmt::Display>(
    given: &[IdleThreshold],
    proc_root: &Path,
    hz: u32,
    read_ipvs_timeout: impl FnOnce() -> Result<ipvs::TcpTimeout, E>,
) -> Vec<IdleThreshold> {
    let (thresholds, note) = node_thresholds_noted(given, proc_root, hz, read_ipvs_timeout);
    if let Some(note) = note {
        note.log();
    }
    thresholds
}

/// What the agent says about a threshold it found (or could not).
#[derive(Debug)]
pub(crate) enum Note {
    Info(String),
    Warn(String),
}

impl Note {
    fn log(&self) {
        match self {
            Self::Info(text) => info!("{text}"),
            Self::Warn(text) => warn!("{text}"),
        }
    }
}

/// [`node_thresholds`], with what it would log returned instead.
fn node_thresholds_noted<E: std::fmt::Display>(
    given: &[IdleThreshold],
    proc_root: &Path,
    hz: u32,
    read_ipvs_timeout: impl FnOnce() -> Result<ipvs::TcpTimeout, E>,
) -> (Vec<IdleThreshold>, Option<Note>) {
    let mut thresholds = given.to_vec();
    if given.iter().any(|t| t.name == idle_kill::IPVS) {
        return (thresholds, None);
    }
    let default = ipvs::DEFAULT_TCP_TIMEOUT_SECONDS;
    let note = match ipvs::tcp_services(proc_root) {
        Ok(Some(services)) => {
            let (seconds, note) = match read_ipvs_timeout() {
                Ok(ipvs::TcpTimeout::Jiffies(jiffies)) if jiffies > 0 && hz > 0 => {
                    let seconds = f64::from(jiffies) / f64::from(hz);
                    let note = Note::Info(format!(
                        "this node balances TCP services with IPVS: idle-timeout threshold \
                         ipvs={seconds} (its TCP established timeout, read from the kernel)"
                    ));
                    (seconds, note)
                }
                Ok(found) => {
                    let why = match found {
                        ipvs::TcpTimeout::NotBuilt => "this kernel has no IPVS".to_owned(),
                        ipvs::TcpTimeout::NotLoaded => "the ip_vs module is not loaded".to_owned(),
                        ipvs::TcpTimeout::Jiffies(j) => {
                            format!("its TCP timeout reads {j} jiffies")
                        }
                    };
                    let note = Note::Warn(format!(
                        "{} lists TCP services, but {why}: idle-timeout threshold \
                         ipvs={default} (IPVS's default); give --idle-timeout-threshold \
                         ipvs=SECONDS if kube-proxy sets --ipvs-tcp-timeout",
                        proc_root.join("1/net/ip_vs").display(),
                    ));
                    (default, note)
                }
                Err(e) => {
                    let note = Note::Warn(format!(
                        "this node balances TCP services with IPVS, but its TCP timeout could \
                         not be read ({e}): idle-timeout threshold ipvs={default} (IPVS's \
                         default); give --idle-timeout-threshold ipvs=SECONDS if kube-proxy \
                         sets --ipvs-tcp-timeout"
                    ));
                    (default, note)
                }
            };
            thresholds.push(IdleThreshold {
                name: idle_kill::IPVS.to_owned(),
                seconds,
                // A firewall-mark service may carry any connection.
                scope: (!services.fwmark).then(|| {
                    Arc::new(Scope {
                        remote: services.virtual_endpoints,
                        local: services.real_servers,
                    })
                }),
            });
            Some(note)
        }
        Ok(None) => None,
        Err(e) => Some(Note::Warn(format!(
            "cannot tell whether this node uses IPVS ({}: {}): no ipvs idle-timeout threshold; \
             give --idle-timeout-threshold ipvs=SECONDS if it does",
            proc_root.join("1/net/ip_vs").display(),
            crate::files::io_reason(&e)
        ))),
    };
    (thresholds, note)
}

/// Keeps the node's thresholds current: at start, then every audit interval, IPVS is looked
/// for and its timeout read again, so IPVS set up after the agent (kube-proxy starting with it
/// on a new node) or retuned later is taken without a restart.
pub(crate) struct ThresholdRefresh {
    pub(crate) given: Vec<IdleThreshold>,
    pub(crate) proc_root: PathBuf,
    pub(crate) hz: u32,
    /// `None` when the IPVS program did not load (logged): IPVS's default then.
    pub(crate) ipvs: Option<IpvsProgram>,
    pub(crate) filter: IdleKillFilter,
    pub(crate) shared: NodeThresholds,
}

impl ThresholdRefresh {
    /// Reads what the node reports now and puts it in force: in the shared thresholds and the
    /// close program's filter. Logs only a change. Blocking (BPF test runs, a BTF parse the
    /// first time IPVS is found).
    pub(crate) fn refresh(&mut self) {
        let ipvs = &mut self.ipvs;
        let (now, note) = node_thresholds_noted(&self.given, &self.proc_root, self.hz, || {
            ipvs.as_mut()
                .map_or(Err(ipvs::TimeoutError::ProgramOff), IpvsProgram::read)
        });
        let smallest = now.iter().map(|t| t.seconds).min_by(f64::total_cmp);
        let before = describe_thresholds(&self.shared.get());
        let described = describe_thresholds(&now);
        if !self.shared.replace(now) {
            return;
        }
        // Services come and go all the time on a busy cluster: only a new timeout is news.
        if before != described {
            if let Some(note) = note {
                note.log();
            }
            info!("idle-timeout thresholds in force: {described}");
        }
        if let Err(e) = self.filter.set(smallest, self.hz) {
            warn!(
                "setting the close program's idle-kill filter: {e}; drops without keepalive \
                 after a silence above {smallest:?} s may not reach the agent"
            );
        }
    }

    /// Refreshes every `interval` from now on, on the blocking pool.
    pub(crate) fn keep_current(self, interval: Duration) {
        let refresh = Arc::new(Mutex::new(self));
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
            // The first tick is immediate: the start already refreshed.
            ticker.tick().await;
            loop {
                ticker.tick().await;
                let refresh = Arc::clone(&refresh);
                let done = tokio::task::spawn_blocking(move || {
                    if let Ok(mut refresh) = refresh.lock() {
                        refresh.refresh();
                    }
                })
                .await;
                if let Err(err) = done {
                    warn!(
                        "refreshing the idle-timeout thresholds panicked ({err}); they stay as they were"
                    );
                }
            }
        });
    }
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    let interval =
        humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (e.g. 60s, 5m)"))?;
    if interval.is_zero() {
        return Err("must be longer than 0 (e.g. 60s)".to_owned());
    }
    Ok(interval)
}

/// Starts the periodic audit when its program loaded (`audit`); either way returns the
/// collector to register (its `keepalive_agent_audit_enabled` says whether audits run).
pub(crate) fn start(
    audit: Option<HashWalk>,
    hz: u32,
    config: &AuditConfig,
    thresholds: NodeThresholds,
    group: AuditGroup,
    namespaces: Arc<Mutex<NamespaceIdentity>>,
    tracker: Tracker,
) -> AuditCollector {
    let collector = AuditCollector::default();
    if let Some(program) = audit {
        if let Ok(mut state) = collector.state.lock() {
            state.enabled = true;
        }
        info!(
            "keepalive configuration audit every {}, idle-timeout thresholds: {}",
            humantime::format_duration(config.interval),
            describe_thresholds(&thresholds.get())
        );
        tokio::spawn(run(
            Walker {
                program: Arc::new(Mutex::new(program)),
                namespaces,
                tracker,
            },
            hz,
            config.interval,
            thresholds,
            group,
            collector.clone(),
        ));
    } else {
        warn!(
            "the keepalive configuration audit is off (its program did not load, see above): \
             keepalive_agent_audit_enabled is 0 and the tcp_keepalive_sockets/_idle_seconds/\
             _worst_case_detection_seconds metrics are absent"
        );
    }
    collector
}

/// The thresholds as the start-up log lists them, conntrack's per-namespace one included.
pub(crate) fn describe_thresholds(node: &[IdleThreshold]) -> String {
    node.iter()
        .map(ToString::to_string)
        .chain(
            (!node.iter().any(|t| t.name == idle_kill::CONNTRACK)).then(|| {
                "conntrack=<each namespace's nf_conntrack_tcp_timeout_established, where \
                 conntrack tracks it>"
                    .to_owned()
            }),
        )
        .collect::<Vec<_>>()
        .join(", ")
}

/// The walk program the periodic audit runs, the namespace identity each walk marks alive, and
/// the connection table each walk finds the gone connections of.
#[derive(Debug, Clone)]
pub(crate) struct Walker {
    pub(crate) program: Arc<Mutex<HashWalk>>,
    pub(crate) namespaces: Arc<Mutex<NamespaceIdentity>>,
    pub(crate) tracker: Tracker,
}

/// Runs walks forever (the first one immediately). A walk is synchronous (a series of program
/// runs, one system call each), so it runs on the blocking pool, never on the event loop.
pub(crate) async fn run(
    walker: Walker,
    hz: u32,
    interval: Duration,
    thresholds: NodeThresholds,
    group: AuditGroup,
    collector: AuditCollector,
) {
    let mut ticker = tokio::time::interval(interval);
    // A walk slower than the interval delays the next one rather than running them back to back.
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        // The thresholds in force when the walk starts.
        let thresholds = thresholds.get();
        let group = Arc::clone(&group);
        let walker = walker.clone();
        let walk = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let mut program = walker
                .program
                .lock()
                .map_err(|_| "the audit program lock is poisoned".to_owned())?;
            // A failed walk keeps the previous summary (the `Err` arm of `record`).
            let host = walk::walk_host(&mut program).map_err(|err| err.to_string())?;
            drop(program);
            // A namespace with sockets is alive even when none of them probed: its series stay
            // past --netns.retention.
            if let Ok(mut namespaces) = walker.namespaces.lock() {
                namespaces.present(
                    host.sockets
                        .iter()
                        .map(|s| (s.endpoints.netns, s.endpoints.netns_cookie)),
                    started,
                );
            }
            let vanished = walker.tracker.reconcile(&host.sockets, started);
            Ok::<_, String>(WalkOutcome {
                summary: AuditSummary::new(&host.sockets, hz, &thresholds, |s| group(s)),
                sockets: host.sockets.len(),
                namespaces: host.namespaces,
                unreadable: host.unreadable,
                vanished,
                took: started.elapsed(),
            })
        })
        .await
        .unwrap_or_else(|err| Err(format!("the audit walk panicked: {err}")));
        let Ok(mut state) = collector.state.lock() else {
            warn!("audit metrics lock poisoned; stopping the keepalive configuration audit");
            return;
        };
        record(&mut state, walk);
    }
}

/// One walk of every namespace.
#[derive(Debug)]
struct WalkOutcome {
    summary: AuditSummary,
    sockets: usize,
    namespaces: usize,
    /// Sockets freed while the walk read them.
    unreadable: u64,
    /// Live connections of the agent's table this walk took for gone.
    vanished: usize,
    took: Duration,
}

fn record(state: &mut AuditState, walk: Result<WalkOutcome, String>) {
    match walk {
        Ok(outcome) => {
            debug!(
                "audit walk: {} TCP sockets in {} namespaces ({} freed while read), {:?}",
                outcome.sockets, outcome.namespaces, outcome.unreadable, outcome.took
            );
            if outcome.vanished > 0 {
                info!(
                    "{} tracked connections removed: two audit walks in a row did not find \
                     their socket, so their close never reached the agent \
                     (keepalive_agent_connections_vanished_total)",
                    outcome.vanished
                );
            }
            state.latest = Some(outcome.summary);
            state.last_sockets = outcome.sockets;
            state.last_duration = Some(outcome.took);
        }
        // The previous summary stays: the sockets did not change because a read failed.
        Err(err) => {
            warn!("keepalive configuration audit walk failed: {err}");
            state.errors += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipvs_threshold_given_replaces_the_one_found() {
        let dir = std::env::temp_dir().join(format!("keepalive-task-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("1/net")).expect("mkdir");
        let given: Vec<IdleThreshold> = vec!["aws-nlb=350".parse().expect("threshold")];
        let hz = 250;
        let read =
            || -> Result<_, ipvs::TimeoutError> { Ok(ipvs::TcpTimeout::Jiffies(1234 * 250)) };
        let unused = || -> Result<ipvs::TcpTimeout, ipvs::TimeoutError> {
            panic!("IPVS's timeout read without a TCP service or with ipvs given")
        };
        let without_service = node_thresholds(&given, &dir, hz, unused);
        std::fs::write(dir.join("1/net/ip_vs"), "TCP  0A600001:01BB rr\n").expect("write");
        let found = node_thresholds(&given, &dir, hz, read);
        let unreadable = node_thresholds(&given, &dir, hz, || Err(ipvs::TimeoutError::NoTcp));
        let not_loaded = node_thresholds(&given, &dir, hz, || -> Result<_, ipvs::TimeoutError> {
            Ok(ipvs::TcpTimeout::NotLoaded)
        });
        let own: Vec<IdleThreshold> = vec!["ipvs=300".parse().expect("threshold")];
        let replaced = node_thresholds(&own, &dir, hz, unused);
        std::fs::remove_dir_all(&dir).expect("clean up");
        let names = |t: &[IdleThreshold]| t.iter().map(ToString::to_string).collect::<Vec<_>>();
        assert_eq!(names(&without_service), ["aws-nlb=350"]);
        assert_eq!(names(&found), ["aws-nlb=350", "ipvs=1234"]);
        // What the kernel does not say is IPVS's default.
        assert_eq!(names(&unreadable), ["aws-nlb=350", "ipvs=900"]);
        assert_eq!(names(&not_loaded), ["aws-nlb=350", "ipvs=900"]);
        assert_eq!(names(&replaced), ["ipvs=300"]);
        assert!(describe_thresholds(&found).contains("conntrack=<each namespace's"));
        assert!(!describe_thresholds(&["conntrack=60".parse().expect("t")]).contains('<'));
    }

    #[test]
    fn a_failed_walk_keeps_the_previous_summary_and_is_counted() {
        let mut state = AuditState::default();
        record(
            &mut state,
            Ok(WalkOutcome {
                summary: AuditSummary::default(),
                sockets: 3,
                namespaces: 2,
                unreadable: 0,
                vanished: 0,
                took: Duration::from_millis(2),
            }),
        );
        assert_eq!(state.errors, 0);
        record(&mut state, Err("the audit walk panicked".to_owned()));
        assert_eq!(state.errors, 1);
        assert_eq!(state.last_sockets, 3);
        assert_eq!(state.latest, Some(AuditSummary::default()));
    }
}
