//! Thousands of keepalive connections probing in the same jiffy, when the agent starts: they
//! all enter its connection table with its first records, and their owner lookups overflow the
//! attribution worker's queue (4096 jobs). Each connection whose lookup was refused must ask
//! again at its next expiry. Run against the agent of 61df5e7 (`KEEPALIVE_AGENT_BIN`), from
//! before that existed, this test failed with 6 902 of the 12 000 series still without an owner
//! after 30 s; only a probe going unanswered, or the close, would have asked again.
//!
//! Alone in its file: the synchronized probes and ACKs overflow loopback's per-CPU receive
//! backlog, which would drop segments of other tests running beside it.

use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, ensure};
use keepalive_tests::{Agent, DEADLINE, Netns, kernel_only, kernel_tests_enabled, wait_until};

const CONN_PROBES: &str = "tcp_keepalive_connection_probes_total";
const REFUSED: &str = "keepalive_agent_attribution_requests_dropped_total";

/// Three times what the worker's queue holds: with fewer, the connections refused were mostly
/// those whose probes the loopback backlog dropped, which ask again anyway when a probe goes
/// unanswered, and the old code passed.
const CONNECTIONS: usize = 12_000;
/// Pairs per holder process (two descriptors each, under the 20 000 a process may hold).
const PAIRS_PER_HOLDER: usize = 6000;

/// A process holding connection pairs in a namespace (`hook-cost --hold`), which turns keepalive
/// on for all of them at once when told; killed on drop.
struct Holder(Child);

impl Holder {
    fn connect(ns: &Netns, pairs: usize) -> anyhow::Result<Holder> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_hook-cost"))
            .args(["--hold", &format!("/run/netns/{}", ns.name())])
            .arg(pairs.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("spawning hook-cost --hold")?;
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().context("holder stdout")?).read_line(&mut line)?;
        let holder = Holder(child);
        ensure!(
            line.trim() == "ready",
            "the holder failed before connecting its {pairs} pairs: {line:?}"
        );
        Ok(holder)
    }

    /// Keepalive on every client: probe after 1 s idle, every 1 s, against answering peers.
    fn start_probing(&mut self) -> anyhow::Result<()> {
        let stdin = self.0.stdin.as_mut().context("holder stdin")?;
        writeln!(stdin, "go")?;
        Ok(stdin.flush()?)
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn connections_whose_owner_lookup_a_full_queue_refused_get_their_owner_at_the_next_expiry()
-> anyhow::Result<()> {
    let test =
        "connections_whose_owner_lookup_a_full_queue_refused_get_their_owner_at_the_next_expiry";
    if !kernel_tests_enabled(test) || kernel_only() {
        return Ok(());
    }
    let ns = Netns::new("ownerburst")?;
    let netns = ns.inum().to_string();
    let mut holders = (0..CONNECTIONS / PAIRS_PER_HOLDER)
        .map(|_| Holder::connect(&ns, PAIRS_PER_HOLDER))
        .collect::<anyhow::Result<Vec<_>>>()?;
    // Every client then probes once a second, all in the same jiffy.
    for holder in &mut holders {
        holder.start_probing()?;
    }
    std::thread::sleep(Duration::from_secs(2));
    let max_series = (CONNECTIONS * 2).to_string();
    let agent = Agent::start_with_args(&["--connections.max-series", &max_series])?;
    let mut last = String::new();
    let result = wait_until(DEADLINE, "every connection's series with its owner", || {
        let metrics = agent.scrape()?;
        let series = metrics.matching(CONN_PROBES, &[("netns", netns.as_str())]);
        let without_owner = series
            .iter()
            .filter(|s| matches!(s.label("cgroup_id"), None | Some("" | "0")))
            .count();
        let refused = metrics.value(REFUSED, &[] as &[(&str, &str)]);
        last = format!(
            "{} series, {without_owner} without an owner; {refused} owner lookups refused",
            series.len()
        );
        Ok(series.len() == CONNECTIONS && without_owner == 0)
    });
    eprintln!("{test}: {last}");
    drop(holders);
    result.map_err(|err| anyhow::anyhow!("{err}: {last}\nagent log:\n{}", agent.log()))
}
