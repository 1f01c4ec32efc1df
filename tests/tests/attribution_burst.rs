//! Thousands of keepalive connections probing in the same jiffy, when the agent starts: they
//! all enter its connection table with its first records, and their owner lookups overflow the
//! attribution worker's queue (4096 jobs). Each connection whose lookup was refused must be
//! asked again. Run against the agent of 61df5e7 (`KEEPALIVE_AGENT_BIN`), from before any
//! asking again, this test failed with 6 902 of the 12 000 series still without an owner after
//! 30 s; only a probe going unanswered, or the close, would have asked again.
//!
//! Then the connections stop expiring (a 1 h idle) as soon as every one has a series, as
//! healthy connections with the default 2 h idle would: a refused lookup must be asked again
//! without waiting for the connection's next expiry. The agent of 52f7139, which asked again
//! only at the next expiry, fails that.
//!
//! Alone in its file: the synchronized probes and ACKs overflow loopback's per-CPU receive
//! backlog, which would drop segments of other tests running beside it.

use std::path::Path;
use std::time::Duration;

use keepalive_tests::{
    Agent, DEADLINE, Netns, holder::Holders, kernel_only, kernel_tests_enabled, wait_until,
};

const CONN_PROBES: &str = "tcp_keepalive_connection_probes_total";
const REFUSED: &str = "keepalive_agent_attribution_requests_dropped_total";

/// Three times what the worker's queue holds: with fewer, the connections refused were mostly
/// those whose probes the loopback backlog dropped, which ask again anyway when a probe goes
/// unanswered, and the old code passed.
const CONNECTIONS: usize = 12_000;

#[test]
fn connections_whose_owner_lookup_a_full_queue_refused_get_their_owner_without_another_expiry()
-> anyhow::Result<()> {
    let test = "connections_whose_owner_lookup_a_full_queue_refused_get_their_owner_without_another_expiry";
    if !kernel_tests_enabled(test) || kernel_only() {
        return Ok(());
    }
    let ns = Netns::new("ownerburst")?;
    let netns = ns.inum().to_string();
    let mut holders =
        Holders::connect(Path::new(env!("CARGO_BIN_EXE_hook-cost")), &ns, CONNECTIONS)?;
    // Every client then probes once a second against answering peers, all in the same jiffy.
    holders.start_probing()?;
    std::thread::sleep(Duration::from_secs(2));
    let max_series = (CONNECTIONS * 2).to_string();
    let agent = Agent::start_with_args(&["--connections.max-series", &max_series])?;
    let entered = wait_until(DEADLINE, "every connection to have a series", || {
        let metrics = agent.scrape()?;
        Ok(metrics
            .matching(CONN_PROBES, &[("netns", netns.as_str())])
            .len()
            == CONNECTIONS)
    });
    // No further expiry asks again from here.
    let quieted = holders.quiet();
    let mut last = String::new();
    let result = entered.and(quieted).and_then(|()| {
        wait_until(DEADLINE, "every connection's series with its owner", || {
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
        })
    });
    eprintln!("{test}: {last}");
    let closed = holders.close();
    result.map_err(|err| anyhow::anyhow!("{err}: {last}\nagent log:\n{}", agent.log()))?;
    closed
}
