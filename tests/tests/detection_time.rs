//! How long a dead peer went unnoticed: the agent's `tcp_keepalive_dead_peer_detection_seconds`
//! against the test's own clock, from the last segment the client received to the abort.

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use keepalive_tests::{DEADLINE, Netns, TestEnv, set_keepalive, wait_closed};

const HISTOGRAM: &str = "tcp_keepalive_dead_peer_detection_seconds";

#[test]
fn dead_peer_detection_time_equals_the_silence_the_test_measured() -> anyhow::Result<()> {
    let test = "dead_peer_detection_time_equals_the_silence_the_test_measured";
    let Some(env) = TestEnv::start(test) else {
        return Ok(());
    };
    let ns = Netns::new("detect")?;
    let listener = ns.listen(IpAddr::V4(Ipv4Addr::LOCALHOST))?;
    let mut pair = ns.connect_pair(&listener)?;
    // Keepalive after 2 s of silence, then 2 probes 1 s apart: the kernel aborts about 4 s
    // after the last segment it received.
    set_keepalive(&pair.client, 2, 1, 2)?;

    pair.server.write_all(b"last words")?;
    let mut buf = [0u8; 10];
    pair.client.read_exact(&mut buf)?;
    let last_received = Instant::now();
    let _blackhole = ns.blackhole_replies_from_port(pair.server_port())?;
    let err = wait_closed(&pair.client, DEADLINE, "client")?;
    let silence = last_received.elapsed();
    assert_eq!(err, libc::ETIMEDOUT, "client must time out, not {err}");
    eprintln!("{test}: the test measured {silence:?} of silence before the abort");

    let Some(agent) = env.agent() else {
        return Ok(());
    };
    let netns = ns.inum().to_string();
    let labels = [("netns", netns.as_str()), ("reason", "keepalive_timeout")];
    let count = format!("{HISTOGRAM}_count");
    // The agent's own wait: a timeout keeps its log (a CI run once timed out here).
    agent.wait_until(
        Duration::from_secs(30),
        "the detection-time observation",
        || Ok(agent.scrape()?.value(&count, &labels) >= 1.0),
    )?;
    let metrics = agent.scrape()?;
    assert_eq!(metrics.value(&count, &labels), 1.0);
    let observed = metrics.value(&format!("{HISTOGRAM}_sum"), &labels);
    // The kernel stamped the last segment just before the test's read returned, and the test
    // saw the abort just after it happened; jiffies are 4 ms here. Allow for both.
    let measured = silence.as_secs_f64();
    assert!(
        (observed - measured).abs() < 0.5,
        "agent says {observed:.3} s, the test measured {measured:.3} s"
    );
    // With 2 s idle and 2 probes 1 s apart, the observation lands in the (2, 5] bucket.
    // `le` compared as a number: the classic text format writes `5`, OpenMetrics `5.0`.
    let bucket = |le: f64| -> f64 {
        metrics
            .samples(&format!("{HISTOGRAM}_bucket"))
            .into_iter()
            .filter(|s| {
                s.label("netns") == Some(netns.as_str())
                    && s.label("reason") == Some("keepalive_timeout")
                    && s.label("le").and_then(|v| v.parse::<f64>().ok()) == Some(le)
            })
            .map(|s| s.value)
            .sum()
    };
    assert_eq!(bucket(2.0), 0.0);
    assert_eq!(bucket(5.0), 1.0);
    Ok(())
}
