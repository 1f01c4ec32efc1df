//! A namespace that sends the agent no record, on the inode of one that did. Its closes are all
//! counted in the kernel and none sent (a reset connection that never probed), so only the
//! kernel's per-namespace counters show it: the agent must show its counts, not the dead
//! namespace's, and replace the dead namespace's series (here the keepalive reset's detection
//! histogram) as a record from the new namespace would. Its own binary: another test's
//! namespaces would take the freed inode.

use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Context as _, ensure};
use keepalive_tests::{
    DEADLINE, Expectations, Metrics, Netns, TcpPair, TestEnv, set_keepalive, set_linger_zero,
    wait_closed, wait_until,
};

const V4: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// Swept every 3 s (a quarter of it): the dead namespace's series would outlive the new
/// namespace's start by far more than one sweep if only the retention removed them.
const RETENTION: &str = "12s";
const FORGOTTEN: &str = "keepalive_agent_namespaces_forgotten_total";
const DETECTION_COUNT: &str = "tcp_keepalive_dead_peer_detection_seconds_count";

type TestResult = anyhow::Result<()>;

fn forgotten_as_reused(m: &Metrics) -> f64 {
    m.value(FORGOTTEN, &[("cause", "inode_reused")])
}

fn keepalive_resets_detected(m: &Metrics, inode: u64) -> f64 {
    m.value(
        DETECTION_COUNT,
        &[
            ("netns", inode.to_string().as_str()),
            ("reason", "keepalive_reset"),
        ],
    )
}

#[test]
fn a_namespace_without_records_replaces_the_dead_one_on_its_inode() -> TestResult {
    let test = "a_namespace_without_records_replaces_the_dead_one_on_its_inode";
    let Some(env) = TestEnv::start_with_agent_args(test, &["--netns.retention", RETENTION]) else {
        return Ok(());
    };
    let agent = env.agent().context("this test needs the agent")?;

    // The old namespace: a probe answered with RST by a peer that lost its socket, a drop the
    // agent gets a record of.
    let old = Netns::new("reuse-old")?;
    let inode = old.inum();
    {
        let listener = old.listen(V4)?;
        let TcpPair {
            client,
            server,
            server_conn,
            ..
        } = old.connect_pair(&listener)?;
        let mut no_rst = old.drop_resets_from_port(server_conn.local.port())?;
        drop(listener);
        set_linger_zero(&server)?;
        drop(server);
        no_rst.remove()?;
        set_keepalive(&client, 1, 1, 3)?;
        wait_closed(&client, DEADLINE, "the old namespace's client")?;
    }
    env.expect_agent(
        "the old namespace's keepalive reset",
        &Expectations::for_netns(inode)
            .probes(1)
            .drops("keepalive_reset", 1),
    )?;
    // The kernel's counters are read at scrape; the drop's record may still be on its way.
    wait_until(DEADLINE, "the old namespace's detection series", || {
        Ok(keepalive_resets_detected(&agent.scrape()?, inode) == 1.0)
    })?;
    let before = agent.scrape()?;
    drop(old);

    // The kernel frees the inode once the namespace's cleanup work ran and gives the lowest
    // free one to the next namespace: keep every other one alive until it comes back. That
    // work is one queue for the whole host, after an RCU grace period, which the namespaces an
    // earlier test deleted may still be in (a fresh-clone CI once waited more than 30 s right
    // after netns_churn, for a reason not established), so the wait is longer than the other
    // tests'.
    let mut others = Vec::new();
    let mut new = None;
    wait_until(
        4 * DEADLINE,
        "a new namespace on the old one's inode",
        || {
            let ns = Netns::new("reuse-new")?;
            if ns.inum() == inode {
                new = Some(ns);
                return Ok(true);
            }
            others.push(ns);
            Ok(false)
        },
    )
    .with_context(|| format!("{} other namespaces created meanwhile", others.len()))?;
    let new = new.context("wait_until returned without a namespace")?;
    eprintln!(
        "{test}: inode {inode} came back after {} other namespaces",
        others.len()
    );

    // A reset connection without keepalive: counted in the kernel (reset received, and the
    // peer's abortive close a local abort), sent to nobody.
    {
        let listener = new.listen(V4)?;
        let TcpPair { client, server, .. } = new.connect_pair(&listener)?;
        set_linger_zero(&server)?;
        drop(server);
        wait_closed(&client, DEADLINE, "the new namespace's client")?;
    }
    env.expect_agent(
        "the new namespace's counts, not the old one's",
        &Expectations::for_netns(inode)
            .probes(0)
            .drops("reset_received", 1)
            .drops("local_abort", 1)
            .drops("keepalive_reset", 0),
    )?;
    wait_until(
        DEADLINE,
        "the old namespace's series replaced by the sweep",
        || {
            let m = agent.scrape()?;
            Ok(
                forgotten_as_reused(&m) == forgotten_as_reused(&before) + 1.0
                    && keepalive_resets_detected(&m, inode) == 0.0,
            )
        },
    )
    .with_context(|| {
        format!(
            "agent series for netns {inode}:\n{}",
            agent
                .scrape()
                .map(|m| m.lines_with_label("netns", &inode.to_string()))
                .unwrap_or_default()
        )
    })?;
    let log = agent.log();
    ensure!(
        log.contains(&format!("netns {inode} now belongs to a new namespace"))
            && log.contains("from the kernel's counters"),
        "the agent did not say the kernel's counters showed the new namespace:\n{log}"
    );
    Ok(())
}
