//! Which closes of keepalive connections the kernel sends to the agent (issue 10). The agent's
//! connection table holds only connections that probed, so the close of one that never had a
//! keepalive expiry, orderly or a drop, tells it nothing it needs: the kernel counts it (drops
//! by reason, exact) and sends nothing. A connection that probed is sent at its close: its
//! series leaves with it, or, for a drop, takes the drop's reason. (`tracked_marks` covers the
//! connections that expired without probing, and those the table let go.)
//!
//! Alone in its file: it counts the agent's close records, to which every connection closing on
//! the host adds, and cargo runs test binaries one at a time.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::ensure;
use keepalive_tests::{
    Churn, ClosesNotRunByAnyProgram, DEADLINE, Netns, TestEnv, set_keepalive, set_linger_zero,
    wait_until,
};

const V4: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const V6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);
const KEEPALIVE: &str = "TCPKeepAlive";
const CLOSE_RECORDS: &str = "keepalive_agent_events_total";
const PROBES: &str = "tcp_keepalive_connection_probes_total";
const DROPS: &str = "tcp_connection_drops_total";
/// Short keepalive connections closed before their first expiry (Linux's default idle, 2 h),
/// each way: orderly, then with a reset.
const SHORT: usize = 2000;

#[test]
fn closes_of_keepalive_connections_that_never_expired_are_counted_not_sent() -> anyhow::Result<()> {
    let test = "closes_of_keepalive_connections_that_never_expired_are_counted_not_sent";
    let Some(env) = TestEnv::start(test) else {
        return Ok(());
    };
    let Some(agent) = env.agent() else {
        eprintln!("{test}: kernel-only mode, nothing to check (it is about the agent's records)");
        return Ok(());
    };
    let ns = Netns::new("close-reports")?;
    let listener = ns.listen(V4)?;
    let netns = ns.inum();

    // Connections the agent knows, IPv4 and IPv6: they probed.
    let listener6 = ns.listen(V6)?;
    let known = [ns.connect_pair(&listener)?, ns.connect_pair(&listener6)?];
    let before = ns.tcp_ext()?;
    for pair in &known {
        set_keepalive(&pair.client, 1, 1, 3)?;
    }
    wait_until(
        DEADLINE,
        "the known connections to probe twice each",
        || Ok(ns.tcp_ext()?.delta(&before, KEEPALIVE) >= 4),
    )?;
    let labels: Vec<_> = known.iter().map(|p| p.client_conn.labels(netns)).collect();
    wait_until(DEADLINE, "the known connections' probe series", || {
        let m = agent.scrape()?;
        Ok(labels.iter().all(|l| !m.matching(PROBES, l).is_empty()))
    })?;

    let drops = |reason: &str| -> anyhow::Result<f64> {
        let netns = netns.to_string();
        Ok(agent
            .scrape()?
            .value(DROPS, &[("netns", netns.as_str()), ("reason", reason)]))
    };
    // Every close below has one of the two listeners' ports.
    let witness = ClosesNotRunByAnyProgram::open(&[
        listener.local_addr()?.port(),
        listener6.local_addr()?.port(),
    ])?;
    let (aborts_before, resets_before) = (drops("local_abort")?, drops("reset_received")?);
    let records_before = agent.scrape()?.value(CLOSE_RECORDS, &[("kind", "close")]);
    ns.run(|| -> anyhow::Result<()> {
        for _ in 0..SHORT {
            // Orderly, with `SO_KEEPALIVE` on the client: the server's FIN first.
            Churn::Keepalive.connect_and_close(&listener)?;
            // `SO_KEEPALIVE` on both ends, the client's `SO_LINGER` 0: two drops.
            Churn::ResetKeepalive.connect_and_close(&listener)?;
        }
        Ok(())
    })??;
    // The known connections close each way too: the IPv4 one orderly (its series leaves once
    // its close arrives), the IPv6 one by the server's reset (its client's series stays, as a
    // drop). Their servers have no `SO_KEEPALIVE`: never sent.
    let [orderly, reset] = known;
    drop(orderly.server);
    drop(orderly.client);
    set_linger_zero(&reset.server)?;
    drop(reset.server);
    let mut reset_drop = labels[1].clone();
    reset_drop.push(("reason".to_owned(), "reset_received".to_owned()));
    wait_until(
        DEADLINE,
        "the known connections' closes: one series gone, one a reset_received drop",
        || {
            let m = agent.scrape()?;
            Ok(m.matching(PROBES, &labels[0]).is_empty()
                && !m.matching(PROBES, &reset_drop).is_empty())
        },
    )?;
    drop(reset.client);
    let sent = agent.scrape()?.value(CLOSE_RECORDS, &[("kind", "close")]) - records_before;
    // The known connections' closes, and those of any other keepalive connection of the host
    // closing meanwhile; never one per short connection, as before.
    ensure!(
        sent >= 2.0 && sent < (SHORT / 10) as f64,
        "{sent} close records for {} short keepalive connections and two known ones",
        2 * SHORT
    );
    // Not sent, yet counted: both ends of every reset churn connection (and the known reset's
    // two ends).
    let (aborts, resets) = (
        drops("local_abort")? - aborts_before,
        drops("reset_received")? - resets_before,
    );
    // Exact, but for closes the kernel ran no program for at all (it does that to keepalive
    // expiries now and then: README, "Exact totals and the kernel"), which no count of the
    // agent can hold.
    let (hits, seen) = witness.counts()?;
    let unrun = hits.saturating_sub(seen);
    // Both ends of every connection close: a count far below that is a broken witness.
    ensure!(
        hits >= 4 * SHORT as u64,
        "perf counted {hits} closes on the listeners' ports for {} connections",
        2 * SHORT
    );
    let expected = (SHORT + 1) as f64;
    ensure!(
        aborts <= expected
            && resets <= expected
            && 2.0 * expected - aborts - resets <= unrun as f64,
        "drops counted in the namespace: {aborts} local_abort and {resets} reset_received, \
         expected {} each, less at most the {unrun} closes on the listeners' ports the kernel ran \
         no program for",
        SHORT + 1
    );
    eprintln!(
        "{test}: {sent} close records for {} short keepalive connections and two known ones; \
         {aborts} local_abort and {resets} reset_received drops counted; of {hits} closes on the \
         listeners' ports a classic program saw {seen}",
        2 * SHORT
    );
    Ok(())
}
