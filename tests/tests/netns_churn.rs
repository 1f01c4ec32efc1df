//! Namespace churn, as pods come and go: 300 network namespaces created and deleted in batches,
//! each with a keepalive connection that probes. The kernel hands a deleted namespace's inode to
//! the next namespace created, so this checks that
//! - every namespace's `tcp_keepalive_probes_total` equals its own `TcpExt` `TCPKeepAlive`, also
//!   when its inode was used by a namespace deleted a moment before (a series reset by
//!   `net_cookie`, not inherited),
//! - once `--netns.retention` has passed, no series of a dead namespace is left,
//! - the number of series stays bounded by the namespaces alive (printed with the agent's RSS).

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::os::unix::fs::MetadataExt as _;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use keepalive_tests::{
    DEADLINE, Expectations, Metrics, Netns, TcpPair, TestEnv, agent::vm_rss_kib, disable_keepalive,
    set_keepalive, wait_until,
};

const V4: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const KEEPALIVE: &str = "TCPKeepAlive";

const NAMESPACES: usize = 300;
const BATCH: usize = 30;
/// Short, so the test sees dead namespaces expire; long enough that a namespace created right
/// after a deletion normally probes while the dead one's series still exist, so the reset by
/// `net_cookie` (not the retention) is what keeps it from inheriting them.
const RETENTION: &str = "10s";
const RETENTION_SECS: u64 = 10;
/// Most series one namespace of this test can have: the probe counter, 8 drop reasons, a
/// connection's 2 series, the audit's per-namespace metrics (2 socket counts, two histograms of
/// 16 buckets + `+Inf`, `_sum`, `_count`, 4 thresholds) and, once it probed, the two keepalive
/// reasons' dead-peer detection histograms (19 series each). Rounded up.
const MAX_SERIES_PER_NAMESPACE: usize = 100;

type TestResult = anyhow::Result<()>;

/// One churned namespace: a healthy keepalive connection on its loopback.
struct Member {
    ns: Netns,
    _listener: TcpListener,
    pair: TcpPair,
}

impl Member {
    fn new(tag: &str) -> anyhow::Result<Member> {
        let ns = Netns::new(tag)?;
        let listener = ns.listen(V4)?;
        let pair = ns.connect_pair(&listener)?;
        // Probe after 1 s idle, every 1 s; the peer answers, so it probes until told to stop.
        set_keepalive(&pair.client, 1, 1, 3)?;
        Ok(Member {
            ns,
            _listener: listener,
            pair,
        })
    }

    /// Stops the keepalive timer and returns the namespace's `TCPKeepAlive`: a new namespace's
    /// counters start at 0, so this is every probe the namespace ever sent.
    fn stop_probing(&self) -> anyhow::Result<u64> {
        disable_keepalive(&self.pair.client)?;
        Ok(self.ns.tcp_ext()?.get(KEEPALIVE))
    }
}

/// Inodes of the network namespaces alive on the host now (other tests' too): `ip netns` mounts
/// and every process's namespace. A deleted inode found here belongs to a live namespace again.
fn live_namespace_inodes() -> HashSet<u64> {
    let mut inodes = HashSet::new();
    let mut add = |path: std::path::PathBuf| {
        if let Ok(meta) = std::fs::metadata(&path) {
            inodes.insert(meta.ino());
        }
    };
    if let Ok(dir) = std::fs::read_dir("/run/netns") {
        dir.flatten().for_each(|e| add(e.path()));
    }
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            if entry
                .file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
            {
                add(entry.path().join("ns/net"));
            }
        }
    }
    inodes
}

/// Series (any metric) whose `netns` label is one of `inodes`.
fn series_of<'m>(m: &'m Metrics, inodes: &HashSet<u64>) -> Vec<&'m keepalive_tests::Sample> {
    m.all()
        .iter()
        .filter(|s| {
            s.label("netns")
                .and_then(|v| v.parse::<u64>().ok())
                .is_some_and(|n| inodes.contains(&n))
        })
        .collect()
}

fn netns_series_count(m: &Metrics) -> usize {
    m.all()
        .iter()
        .filter(|s| s.label("netns").is_some())
        .count()
}

#[test]
fn churned_namespaces_count_only_their_own_probes_and_their_series_expire() -> TestResult {
    let test = "churned_namespaces_count_only_their_own_probes_and_their_series_expire";
    // Audit walks every second keep the namespaces that are alive (they have sockets) past the
    // short retention while the test compares them.
    let Some(env) = TestEnv::start_with_agent_args(
        test,
        &["--netns.retention", RETENTION, "--audit.interval", "1s"],
    ) else {
        return Ok(());
    };
    let agent = env.agent();
    if let Some(agent) = agent {
        let m = agent.scrape()?;
        eprintln!(
            "{test}: before: {} series with a netns label, {} series in all, agent RSS {} KiB",
            netns_series_count(&m),
            m.all().len(),
            vm_rss_kib(agent.pid())?
        );
    }

    let mut deleted: HashSet<u64> = HashSet::new();
    let mut reused = 0usize;
    for batch in 0..NAMESPACES / BATCH {
        let members = (0..BATCH)
            .map(|i| Member::new(&format!("churn{batch}-{i}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        reused += members
            .iter()
            .filter(|m| deleted.contains(&m.ns.inum()))
            .count();
        for m in &members {
            wait_until(DEADLINE, &format!("a probe in {}", m.ns.name()), || {
                Ok(m.ns.tcp_ext()?.get(KEEPALIVE) >= 1)
            })?;
        }
        let counts = members
            .iter()
            .map(Member::stop_probing)
            .collect::<anyhow::Result<Vec<_>>>()?;
        for (m, probes) in members.iter().zip(&counts) {
            env.expect_agent(
                &format!(
                    "batch {batch}: {} (inode {}{}) counts only its own probes",
                    m.ns.name(),
                    m.ns.inum(),
                    if deleted.contains(&m.ns.inum()) {
                        ", reused"
                    } else {
                        ""
                    }
                ),
                &Expectations::for_netns(m.ns.inum())
                    .probes(*probes)
                    .other_drops_zero(),
            )?;
        }
        // Closing the sockets lets each namespace go when `ip netns delete` unmounts it.
        deleted.extend(members.iter().map(|m| m.ns.inum()));
        drop(members);
    }
    eprintln!(
        "{test}: {NAMESPACES} namespaces churned over {} distinct inodes; {reused} got an inode \
         of a namespace deleted earlier",
        deleted.len()
    );
    ensure!(
        reused > 0,
        "no namespace reused the inode of a deleted one: the kernel did not recycle inodes, so \
         this test proved nothing about it"
    );

    // One more, right after the last deletions, on an inode a dead namespace had (the kernel
    // frees inodes once the namespace's cleanup work ran, so try until one comes back).
    let mut candidate = None;
    wait_until(DEADLINE, "a new namespace on a recycled inode", || {
        let m = Member::new("churn-reuse")?;
        if deleted.contains(&m.ns.inum()) {
            candidate = Some(m);
            return Ok(true);
        }
        Ok(false)
    })?;
    let reuser = candidate.context("wait_until returned without a namespace")?;
    wait_until(DEADLINE, "two probes in the reusing namespace", || {
        Ok(reuser.ns.tcp_ext()?.get(KEEPALIVE) >= 2)
    })?;
    let probes = reuser.stop_probing()?;
    eprintln!(
        "{test}: {} reuses inode {}: kernel TCPKeepAlive {probes}",
        reuser.ns.name(),
        reuser.ns.inum()
    );
    env.expect_agent(
        "a namespace on a recycled inode reports exactly its own TCPKeepAlive",
        &Expectations::for_netns(reuser.ns.inum())
            .probes(probes)
            .other_drops_zero(),
    )?;

    let Some(agent) = agent else {
        return Ok(());
    };
    let ours_alive = HashSet::from([reuser.ns.inum()]);
    let mut last_dead = 0;
    wait_until(
        Duration::from_secs(RETENTION_SECS) + DEADLINE,
        "no series of a dead namespace",
        || {
            let dead: HashSet<u64> = deleted
                .difference(&live_namespace_inodes())
                .copied()
                .collect();
            let m = agent.scrape()?;
            last_dead = series_of(&m, &dead).len();
            Ok(last_dead == 0)
        },
    )
    .with_context(|| format!("{last_dead} series of dead namespaces left"))?;
    let m = agent.scrape()?;
    let ours = series_of(&m, &deleted.union(&ours_alive).copied().collect());
    let rss = vm_rss_kib(agent.pid())?;
    eprintln!(
        "{test}: after: {} series with a netns label ({} of this test's namespaces, 1 alive), \
         {} series in all, agent RSS {rss} KiB; agent: {} namespaces with series, {} forgotten \
         for a reused inode, {} for the retention",
        netns_series_count(&m),
        ours.len(),
        m.all().len(),
        m.value("keepalive_agent_namespaces", &[] as &[(&str, &str)]),
        m.value(
            "keepalive_agent_namespaces_forgotten_total",
            &[("cause", "inode_reused")]
        ),
        m.value(
            "keepalive_agent_namespaces_forgotten_total",
            &[("cause", "retention")]
        ),
    );
    // The batches above would fail if a reused inode's old series survived; this says the reset
    // by cookie did the work, not the retention.
    ensure!(
        m.value(
            "keepalive_agent_namespaces_forgotten_total",
            &[("cause", "inode_reused")]
        ) >= 1.0,
        "no namespace was reset for a reused inode"
    );
    ensure!(
        ours.len() <= MAX_SERIES_PER_NAMESPACE * ours_alive.len(),
        "{} series for this test's namespaces with {} alive (at most {} each):\n{}",
        ours.len(),
        ours_alive.len(),
        MAX_SERIES_PER_NAMESPACE,
        ours.iter()
            .map(|s| format!("{} {:?}", s.name, s.labels))
            .collect::<Vec<_>>()
            .join("\n")
    );
    Ok(())
}
