//! Idle kills (issue 13) by a real middlebox: Linux conntrack and NAT, on loopback inside network
//! namespaces the test creates. An nftables `nat` output rule sends `127.0.0.2:80` to the server
//! on `127.0.0.1:8080`, and the namespace's conntrack forgets an established flow after
//! `TIMEOUT` seconds of silence (`nf_conntrack_tcp_loose=0`, so it does not pick the flow up
//! again mid-stream). The client's next send is then no longer translated: it reaches
//! `127.0.0.2:80`, where nothing listens, and the reset comes back (`ECONNRESET` at once); with
//! `ct state invalid drop` it is dropped instead, until `TCP_USER_TIMEOUT` (`ETIMEDOUT`). Dropped
//! in the output chain, the send fails on the client's own host and the kernel runs its probe
//! timer (`zero_window_timeout` with the window open); dropped in the input chain, the segment
//! left and was lost on the way, as behind a real middlebox (`retransmit_timeout`).

use std::io::Read as _;
use std::net::TcpListener;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use keepalive_tests::{
    Conn, DEADLINE, Expectations, Netns, TestEnv,
    middlebox::{Blackhole, connect, defragmenting_without_conntrack, middlebox, send},
    set_user_timeout, sockets_json, wait_closed,
};

/// The middlebox's idle timeout. The agent is given no threshold: it reads the timeout from
/// each namespace where conntrack is attached, as the threshold named `conntrack`.
const TIMEOUT: u64 = 3;
const THRESHOLD: &str = "conntrack";
/// Silence before the client's send: twice the timeout, so the flow is surely forgotten.
const SILENCE: Duration = Duration::from_secs(2 * TIMEOUT);
/// Keepalive idle above the timeout (no probe before the send), and below it (probes keep the
/// flow alive).
const IDLE_ABOVE: i32 = 10;
const IDLE_BELOW: i32 = 1;
/// How long a blackholed send is retried before the kernel gives up (`TCP_USER_TIMEOUT`).
const USER_TIMEOUT_MS: i32 = 2000;

type TestResult = anyhow::Result<()>;

/// The agent's figure of a connection's idle-kill series.
fn conn_figure(env: &TestEnv, name: &str, netns: u64, conn: &Conn) -> anyhow::Result<f64> {
    let metrics = env.agent().context("agent")?.scrape()?;
    let labels = conn.labels(netns);
    let samples = metrics.matching(name, &labels);
    ensure!(samples.len() == 1, "{name} for {conn:?}: {samples:?}");
    Ok(samples[0].value)
}

/// What a connection's idle-kill series must say besides the threshold (`TIMEOUT`).
struct Figures {
    /// The test's silence; the agent's may differ by 0.5 s (the bound).
    silence: f64,
    keepalive_idle: f64,
    suggested: f64,
}

fn check_kill_figures(env: &TestEnv, netns: u64, conn: &Conn, expected: Figures) -> TestResult {
    let figure = |name| conn_figure(env, name, netns, conn);
    let agent = figure("tcp_connection_idle_kill_silence_seconds")?;
    let silence = expected.silence;
    eprintln!(
        "{}: {conn:?}: agent says silent {agent:.3} s, the test measured {silence:.3} s",
        env.test()
    );
    ensure!(
        (agent - silence).abs() <= 0.5,
        "{conn:?}: agent {agent:.3} s, test {silence:.3} s"
    );
    for (name, want) in [
        ("tcp_connection_idle_kill_threshold_seconds", TIMEOUT as f64),
        (
            "tcp_connection_idle_kill_keepalive_idle_seconds",
            expected.keepalive_idle,
        ),
        (
            "tcp_connection_idle_kill_suggested_keepalive_idle_seconds",
            expected.suggested,
        ),
    ] {
        let got = figure(name)?;
        ensure!(got == want, "{conn:?}: {name} {got}, expected {want}");
    }
    Ok(())
}

#[test]
fn middlebox_idle_kills_are_named_with_their_threshold_and_silence() -> TestResult {
    let test = "middlebox_idle_kills_are_named_with_their_threshold_and_silence";
    // Audits every second, for the threshold's audit series below.
    let Some(env) = TestEnv::start_with_agent_args(test, &["--audit.interval", "1s"]) else {
        return Ok(());
    };
    if env.agent().is_none() {
        return Ok(()); // kernel-only mode: nothing of the agent's to check
    }
    let reset_ns = middlebox("idle-reset", TIMEOUT, Blackhole::None)?;
    let output_ns = middlebox("idle-drop-out", TIMEOUT, Blackhole::Output)?;
    let input_ns = middlebox("idle-drop-in", TIMEOUT, Blackhole::Input)?;
    let listen = |ns: &Netns| -> anyhow::Result<TcpListener> {
        Ok(ns.run(|| TcpListener::bind("127.0.0.1:8080"))??)
    };
    let reset_listener = listen(&reset_ns)?;
    let (output_listener, input_listener) = (listen(&output_ns)?, listen(&input_ns)?);
    let namespaces = [&reset_ns, &output_ns, &input_ns];
    let before = namespaces
        .iter()
        .map(|ns| ns.tcp_ext())
        .collect::<anyhow::Result<Vec<_>>>()?;

    let off = connect(&reset_ns, &reset_listener, None)?;
    let above = connect(&reset_ns, &reset_listener, Some(IDLE_ABOVE))?;
    let below = connect(&reset_ns, &reset_listener, Some(IDLE_BELOW))?;
    // The same silence in a namespace without conntrack (but defragmenting, as one with
    // conntrack does): no threshold applies there.
    let plain_ns = defragmenting_without_conntrack("idle-plain")?;
    let plain_listener = listen(&plain_ns)?;
    let plain_client = plain_ns.run(|| std::net::TcpStream::connect("127.0.0.1:8080"))??;
    let (_plain_server, _) = plain_listener.accept()?;
    // A dual-stack socket to the same NAT address (`::ffff:127.0.0.2`, as the JVM connects by
    // default): IPv4 on the wire, tracked by the namespace's IPv4 conntrack only (its table is
    // `ip`), so the threshold is that one although the socket is AF_INET6.
    let mapped_client =
        reset_ns.run(|| std::net::TcpStream::connect("[::ffff:127.0.0.2]:80"))??;
    let (_mapped_server, _) = reset_listener.accept()?;
    let refused = connect(&output_ns, &output_listener, None)?;
    let lost = connect(&input_ns, &input_listener, None)?;
    for silent in [&refused, &lost] {
        set_user_timeout(&silent.client, USER_TIMEOUT_MS)?;
    }
    std::thread::sleep(SILENCE);

    // Before the sends: `sockets` marks the connections the middlebox has forgotten.
    let (reset_inum, plain_inum) = (reset_ns.inum().to_string(), plain_ns.inum().to_string());
    let sockets = sockets_json(&["--netns", &reset_inum, "--netns", &plain_inum])?;
    let row_of = |local_port: u16, remote_port: u16| -> anyhow::Result<&serde_json::Value> {
        sockets
            .iter()
            .find(|s| s["local_port"] == local_port && s["remote_port"] == remote_port)
            .with_context(|| format!("no row for :{local_port} -> :{remote_port} in {sockets:?}"))
    };
    let risk_of = |conn: &Conn| -> anyhow::Result<serde_json::Value> {
        let row = row_of(conn.local.port(), 80)?;
        // The namespace's own conntrack timeout, read where the kernel keeps it.
        assert_eq!(row["conntrack_timeout_seconds"], TIMEOUT as f64, "{row}");
        Ok(row["idle_kill_risk"].clone())
    };
    assert_eq!(risk_of(&off.conn)?, THRESHOLD, "keepalive off");
    assert_eq!(risk_of(&above.conn)?, THRESHOLD, "keepalive idle above");
    assert_eq!(
        risk_of(&below.conn)?,
        serde_json::Value::Null,
        "keepalive idle below"
    );
    let mapped = row_of(mapped_client.local_addr()?.port(), 80)?;
    assert_eq!(
        mapped["conntrack_timeout_seconds"], TIMEOUT as f64,
        "{mapped}"
    );
    assert_eq!(mapped["idle_kill_risk"], THRESHOLD, "{mapped}");
    let plain = row_of(plain_client.local_addr()?.port(), 8080)?;
    assert_eq!(
        plain["conntrack_timeout_seconds"],
        serde_json::Value::Null,
        "{plain}"
    );
    assert_eq!(plain["idle_kill_risk"], serde_json::Value::Null, "{plain}");

    // The audit counts the keepalive-on connection whose idle (10 s) is at or above the
    // namespace's conntrack timeout; the namespace without conntrack has no threshold at all,
    // so KeepaliveIdleAboveMiddleboxTimeout cannot fire there.
    let agent = env.agent().context("agent")?;
    let at_or_above = "tcp_keepalive_idle_at_or_above_threshold_sockets";
    let reset_labels = [
        ("netns", reset_ns.inum().to_string()),
        ("threshold", THRESHOLD.to_owned()),
    ];
    let plain_labels = [("netns", plain_ns.inum().to_string())];
    let started = std::time::Instant::now();
    loop {
        let metrics = agent.scrape()?;
        let counted = metrics.matching(at_or_above, &reset_labels);
        if counted.len() == 1 && counted[0].value == 1.0 {
            let plain_series = metrics.matching(at_or_above, &plain_labels);
            ensure!(
                plain_series.is_empty(),
                "a threshold series in the namespace without conntrack: {plain_series:?}"
            );
            ensure!(
                metrics
                    .matching("tcp_keepalive_sockets", &plain_labels)
                    .len()
                    == 2,
                "the namespace without conntrack was not audited"
            );
            break;
        }
        ensure!(
            started.elapsed() < DEADLINE,
            "{at_or_above}{reset_labels:?}: {counted:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    let silence_off = send(&off)?;
    let silence_above = send(&above)?;
    let silence_refused = send(&refused)?;
    let silence_lost = send(&lost)?;
    send(&below)?;
    for (what, silent, errno) in [
        ("keepalive off", &off, libc::ECONNRESET),
        ("keepalive idle above the timeout", &above, libc::ECONNRESET),
        ("dropped on output", &refused, libc::ETIMEDOUT),
        ("dropped on input", &lost, libc::ETIMEDOUT),
    ] {
        let err = wait_closed(&silent.client, DEADLINE, what)?;
        assert_eq!(err, errno, "{what}: errno {err}");
    }
    // Keepalive below the timeout kept the flow: the server gets the send.
    let mut buf = [0u8; 4];
    let mut server = &below.server;
    server.set_read_timeout(Some(DEADLINE))?;
    server.read_exact(&mut buf)?;
    assert_eq!(&buf, b"ping");
    // Its orderly end, so the namespace's probes are final before the counters are compared.
    drop(below);

    let after = namespaces
        .iter()
        .map(|ns| ns.tcp_ext())
        .collect::<anyhow::Result<Vec<_>>>()?;
    let keepalive_probes = after[0].delta(&before[0], "TCPKeepAlive");
    assert!(
        keepalive_probes >= 3,
        "the keepalive-below connection probed {keepalive_probes} times"
    );
    for i in [1, 2] {
        assert_eq!(after[i].delta(&before[i], "TCPAbortOnTimeout"), 1);
    }
    let [reset_netns, output_netns, input_netns] = namespaces.map(Netns::inum);
    env.expect_agent(
        "idle kills by reset",
        &Expectations::for_netns(reset_netns)
            .probes(keepalive_probes)
            .drops("reset_received", 2)
            .other_drops_zero()
            .idle_kills(THRESHOLD, "reset", 2)
            .idle_kills(THRESHOLD, "timeout", 0)
            .conn_idle_kill(&off.conn, THRESHOLD, "reset", "off")
            .conn_idle_kill(&above.conn, THRESHOLD, "reset", "on"),
    )?;
    for (what, netns, silent, reason) in [
        (
            "idle kill by a send refused on output",
            output_netns,
            &refused,
            "zero_window_timeout",
        ),
        (
            "idle kill by a send lost on input",
            input_netns,
            &lost,
            "retransmit_timeout",
        ),
    ] {
        env.expect_agent(
            what,
            &Expectations::for_netns(netns)
                .probes(0)
                .drops(reason, 1)
                .other_drops_zero()
                .idle_kills(THRESHOLD, "timeout", 1)
                .idle_kills(THRESHOLD, "reset", 0)
                .conn_idle_kill(&silent.conn, THRESHOLD, "timeout", "off"),
        )?;
    }

    // Within the issue's ±0.5 s for every way of dying. A send refused on the client's own
    // host is never retransmitted; each of the probe timer's attempts moves `lsndtime`, and its
    // first run (`icsk_probes_tstamp`) dates the send, one probe timeout after it. A send lost
    // on the way is dated by its first retransmission (`retrans_stamp`). Both come a few
    // hundred milliseconds late; loopback's round trip adds nothing.
    for (netns, silent, silence, keepalive_idle, suggested) in [
        (reset_netns, &off, silence_off, 0.0, 1.0),
        (
            reset_netns,
            &above,
            silence_above,
            f64::from(IDLE_ABOVE),
            2.0,
        ),
        (output_netns, &refused, silence_refused, 0.0, 1.0),
        (input_netns, &lost, silence_lost, 0.0, 1.0),
    ] {
        // Jiffies are 4 ms here; the test's clock starts just after the read the last segment
        // completed and stops just before the send.
        check_kill_figures(
            &env,
            netns,
            &silent.conn,
            Figures {
                silence,
                keepalive_idle,
                suggested,
            },
        )?;
    }
    Ok(())
}

/// Keepalive idle above the middlebox's timeout, and nothing to send: the first keepalive probe
/// after the silence is the activity that dies.
const PROBE_IDLE: i32 = 4;

#[test]
fn a_first_keepalive_probe_after_the_timeout_dies_as_an_idle_kill() -> TestResult {
    let test = "a_first_keepalive_probe_after_the_timeout_dies_as_an_idle_kill";
    let Some(env) = TestEnv::start(test) else {
        return Ok(());
    };
    if env.agent().is_none() {
        return Ok(()); // kernel-only mode: nothing of the agent's to check
    }
    // The probe reaches 127.0.0.2:80 untranslated and the reset comes back; or the middlebox
    // drops it, and every probe after it, until the keepalive timer gives up.
    let reset_ns = middlebox("probe-reset", TIMEOUT, Blackhole::None)?;
    let lost_ns = middlebox("probe-lost", TIMEOUT, Blackhole::Input)?;
    let listen = |ns: &Netns| -> anyhow::Result<TcpListener> {
        Ok(ns.run(|| TcpListener::bind("127.0.0.1:8080"))??)
    };
    let (reset_listener, lost_listener) = (listen(&reset_ns)?, listen(&lost_ns)?);
    let (reset_before, lost_before) = (reset_ns.tcp_ext()?, lost_ns.tcp_ext()?);
    let reset = connect(&reset_ns, &reset_listener, Some(PROBE_IDLE))?;
    let lost = connect(&lost_ns, &lost_listener, Some(PROBE_IDLE))?;

    // The reset answers the first probe: the read fails then, which the test's clock takes.
    let mut buf = [0u8; 4];
    let mut client = &reset.client;
    client.set_read_timeout(Some(DEADLINE))?;
    let err = client.read(&mut buf).expect_err("the probe's reset");
    let silence_reset = reset.last_received.elapsed().as_secs_f64();
    assert_eq!(err.raw_os_error(), Some(libc::ECONNRESET), "{err}");
    let err = wait_closed(&lost.client, DEADLINE, "client whose probes were lost")?;
    assert_eq!(err, libc::ETIMEDOUT, "client whose probes were lost");
    let (reset_after, lost_after) = (reset_ns.tcp_ext()?, lost_ns.tcp_ext()?);
    assert_eq!(reset_after.delta(&reset_before, "TCPKeepAlive"), 1);
    assert_eq!(lost_after.delta(&lost_before, "TCPKeepAlive"), 3);
    assert_eq!(lost_after.delta(&lost_before, "TCPAbortOnTimeout"), 1);

    env.expect_agent(
        "idle kill by a reset answering the first probe",
        &Expectations::for_netns(reset_ns.inum())
            .probes(1)
            .drops("keepalive_reset", 1)
            .other_drops_zero()
            .idle_kills(THRESHOLD, "reset", 1)
            .idle_kills(THRESHOLD, "timeout", 0)
            .conn_idle_kill(&reset.conn, THRESHOLD, "reset", "on"),
    )?;
    env.expect_agent(
        "idle kill by unanswered probes",
        &Expectations::for_netns(lost_ns.inum())
            .probes(3)
            .drops("keepalive_timeout", 1)
            .other_drops_zero()
            .idle_kills(THRESHOLD, "timeout", 1)
            .idle_kills(THRESHOLD, "reset", 0)
            .conn_idle_kill(&lost.conn, THRESHOLD, "timeout", "on"),
    )?;

    // A reset is dated by its arrival, which the test's read saw. Unanswered probes are dated
    // by the first of them, which the kernel sends keepalive idle after the last segment
    // received: the agent reports that setting, read from the socket, as the silence (the
    // test's figure for it is that setting too).
    for (ns, silent, silence) in [
        (&reset_ns, &reset, silence_reset),
        (&lost_ns, &lost, f64::from(PROBE_IDLE)),
    ] {
        check_kill_figures(
            &env,
            ns.inum(),
            &silent.conn,
            Figures {
                silence,
                keepalive_idle: f64::from(PROBE_IDLE),
                // TIMEOUT − the 1 s keepalive interval.
                suggested: 2.0,
            },
        )?;
    }
    Ok(())
}
