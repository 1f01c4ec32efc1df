//! SIGTERM, what the kubelet sends a DaemonSet pod first: the agent stops reading the ring
//! buffer, detaches its programs, puts the records still in the ring through the pipeline,
//! closes the event stream after its last event, and exits 0.
//!
//! The drops are made right before the signal. The agent reads the ring buffer every 50 ms
//! unless a CPU has written its share of a quarter of the ring since it last woke the agent,
//! so when the signal arrives the records of the last drops are still in the ring: without the
//! final drain their events are missing from the file.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, ensure};
use keepalive_tests::{
    Agent, Conn, DEADLINE, Netns, TCP_CLOSE, kernel_only, kernel_tests_enabled, programs_of,
    set_linger_zero, skip_or_fail, so_error, tcp_state, wait_until,
};
use serde_json::Value;

const V4: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// Connections aborted just before the signal: two drop records each (the server's
/// `local_abort`, the client's `reset_received`), far below the records per CPU that would wake
/// the agent (a quarter of the default 4 MiB ring in 176-byte records, shared by the CPUs:
/// 2 978 each on 2 CPUs; the programs' count starts at 0 with the agent).
const CONNECTIONS: usize = 300;

/// The events file, removed on drop.
struct EventsFile(PathBuf);

impl Drop for EventsFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Every loaded BPF program, as bpftool's JSON; `None` without bpftool.
fn loaded_programs() -> anyhow::Result<Option<Vec<Value>>> {
    let output = match Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
    {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).context("running bpftool"),
    };
    ensure!(
        output.status.success(),
        "bpftool prog show: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(Some(
        serde_json::from_slice(&output.stdout).context("bpftool's JSON")?,
    ))
}

#[test]
fn sigterm_drains_the_ring_buffer_into_the_event_stream_then_exits_0() -> anyhow::Result<()> {
    let test = "sigterm_drains_the_ring_buffer_into_the_event_stream_then_exits_0";
    if !kernel_tests_enabled(test) || kernel_only() {
        return Ok(());
    }
    let events = EventsFile(std::env::temp_dir().join(format!(
        "keepalive-events-shutdown-{}.jsonl",
        std::process::id()
    )));
    let events_arg = events.0.to_str().context("temp paths are UTF-8")?;
    let mut agent = match Agent::start_with_args(&["--events", events_arg]) {
        Ok(agent) => agent,
        Err(e) => {
            skip_or_fail(test, &format!("the agent did not start: {e:#}"));
            return Ok(());
        }
    };
    let programs = programs_of(agent.pid())?;
    ensure!(
        !programs.is_empty(),
        "the running agent holds no BPF program descriptor"
    );

    let ns = Netns::new("shutdown")?;
    let netns = ns.inum();
    let listener = ns.listen(V4)?;
    let pairs = ns.connect_pairs(&listener, CONNECTIONS)?;
    // Every drop the kernel makes: an abortive close of each server end (SO_LINGER 0 sends a
    // RST), which resets its client.
    let mut expected: HashMap<(u16, u16), &str> = HashMap::new();
    let mut clients = Vec::with_capacity(CONNECTIONS);
    for pair in pairs {
        set_linger_zero(&pair.server)?;
        drop(pair.server);
        expected.insert(ports(&pair.server_conn), "local_abort");
        expected.insert(ports(&pair.client_conn), "reset_received");
        clients.push(pair.client);
    }
    // Without sleeping (a 50 ms sleep would let the agent read the ring before the signal):
    // the resets are processed in softirq right after each close, so this is quick.
    let waiting = Instant::now();
    loop {
        let mut open = 0;
        for client in &clients {
            if tcp_state(client)? != TCP_CLOSE {
                open += 1;
            }
        }
        if open == 0 {
            break;
        }
        ensure!(
            waiting.elapsed() < DEADLINE,
            "{open} clients never received their reset"
        );
        std::thread::yield_now();
    }
    let status = agent.signal_and_wait(libc::SIGTERM)?;
    for client in &clients {
        ensure!(
            so_error(client)? == libc::ECONNRESET,
            "a client closed without ECONNRESET"
        );
    }
    let log = agent.log();
    ensure!(status.success(), "after SIGTERM: {status}; log:\n{log}");
    let drained = log
        .lines()
        .find(|l| l.contains("records left in the ring buffer"))
        .with_context(|| format!("no line about the final drain in the log:\n{log}"))?;
    eprintln!("{test}: {drained}");
    if drained.contains(" 0 records left") {
        eprintln!(
            "{test}: the agent had read every record before the signal: this run did not \
             exercise the final drain"
        );
    }
    ensure!(
        log.contains("event stream closed"),
        "the event stream was not closed:\n{log}"
    );

    // Whole lines only, and every drop of the namespace in them, once, with its reason.
    let text = std::fs::read_to_string(&events.0)?;
    ensure!(
        text.is_empty() || text.ends_with('\n'),
        "the events file ends in the middle of a line"
    );
    let mut seen: HashMap<(u16, u16), Vec<String>> = HashMap::new();
    for line in text.lines() {
        let event: Value =
            serde_json::from_str(line).with_context(|| format!("not a JSON line: {line}"))?;
        if event["netns"] != netns || event["event"] != "drop" {
            continue;
        }
        let port = |key: &str| {
            event[key]
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .with_context(|| format!("{key} in {line}"))
        };
        seen.entry((port("local_port")?, port("remote_port")?))
            .or_default()
            .push(event["reason"].as_str().unwrap_or("").to_owned());
    }
    let mut missing = Vec::new();
    for (conn, reason) in &expected {
        match seen.get(conn).map(Vec::as_slice) {
            Some([only]) if only == reason => {}
            other => missing.push(format!("{conn:?}: want one {reason} drop, got {other:?}")),
        }
    }
    ensure!(
        missing.is_empty(),
        "{} of {} drops wrong or missing in the events file after SIGTERM (first: {:?}); \
         agent log:\n{log}",
        missing.len(),
        expected.len(),
        missing.first()
    );
    ensure!(
        seen.len() == expected.len(),
        "the events file has drops of connections this test did not make"
    );

    // The kernel frees a program after its last reference and an RCU grace period.
    match loaded_programs()? {
        Some(_) => wait_until(DEADLINE, "the agent's BPF programs to be unloaded", || {
            let loaded = loaded_programs()?.unwrap_or_default();
            Ok(!loaded
                .iter()
                .filter_map(|p| p["id"].as_u64().and_then(|id| u32::try_from(id).ok()))
                .any(|id| programs.contains(&id)))
        })?,
        None => eprintln!("{test}: no bpftool, not checking that the programs are unloaded"),
    }
    Ok(())
}

fn ports(conn: &Conn) -> (u16, u16) {
    (conn.local.port(), conn.remote.port())
}
