//! Which closes of keepalive connections the kernel sends to the agent (issue 10). The agent's
//! connection table holds only connections that had a keepalive expiry, so the orderly close of
//! one that never had one tells it nothing: the kernel counts it and sends nothing. A connection
//! that did have one is sent at its close, and its series leaves with it.
//!
//! Alone in its file: it counts the agent's close records, to which every connection closing on
//! the host adds, and cargo runs test binaries one at a time.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::ensure;
use keepalive_tests::{Churn, DEADLINE, Netns, TestEnv, set_keepalive, wait_until};

const V4: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const V6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);
const KEEPALIVE: &str = "TCPKeepAlive";
const CLOSE_RECORDS: &str = "keepalive_agent_events_total";
const PROBES: &str = "tcp_keepalive_connection_probes_total";
/// Short keepalive connections closed before their first expiry (Linux's default idle, 2 h).
const SHORT: usize = 2000;

#[test]
fn closes_of_keepalive_connections_that_never_expired_are_not_sent() -> anyhow::Result<()> {
    let test = "closes_of_keepalive_connections_that_never_expired_are_not_sent";
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

    let records_before = agent.scrape()?.value(CLOSE_RECORDS, &[("kind", "close")]);
    ns.run(|| -> anyhow::Result<()> {
        for _ in 0..SHORT {
            // Orderly, with `SO_KEEPALIVE` on the client: the server's FIN first.
            Churn::Keepalive.connect_and_close(&listener)?;
        }
        Ok(())
    })??;
    // The known connections close the same way; their series leave once their closes arrive.
    for pair in known {
        drop(pair.server);
        drop(pair.client);
    }
    wait_until(
        DEADLINE,
        "the known connections' closes to remove their series",
        || {
            let m = agent.scrape()?;
            Ok(labels.iter().all(|l| m.matching(PROBES, l).is_empty()))
        },
    )?;
    let sent = agent.scrape()?.value(CLOSE_RECORDS, &[("kind", "close")]) - records_before;
    // The known connections' closes, and those of any other keepalive connection of the host
    // closing meanwhile; never one per short connection, as before.
    ensure!(
        sent >= 2.0 && sent < (SHORT / 10) as f64,
        "{sent} close records for {SHORT} short keepalive connections and two known ones"
    );
    eprintln!(
        "{test}: {sent} close records for {SHORT} short keepalive connections and two known ones"
    );
    Ok(())
}
