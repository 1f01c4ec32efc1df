//! The deployment proven end to end on this machine: the agent scraped by a real Prometheus
//! (Debian package) evaluating the shipped rules, alerts delivered to a real Alertmanager, a
//! keepalive-induced disconnect caused in a private network namespace; the scrape checked by
//! `promtool check metrics`; the agent run with exactly the DaemonSet's capabilities; its
//! memory footprint held against the DaemonSet's limit.
//!
//! Everything listens on 127.0.0.1 only. Prometheus scrapes and evaluates every second so the
//! alert fires within seconds: the shipped KeepaliveConnectionDropped and KeepaliveDisconnects
//! rules have no `for`, so the shipped file is loaded unchanged.

use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keepalive_agent::sweep_metric;
use keepalive_tests::agent::http_get_accept;
use keepalive_tests::deploy::{
    ScratchDir, Server, agent_as_in_daemonset, daemonset_container, deploy_path, json_label, poll,
    read_yaml, tool_available,
};
use keepalive_tests::{
    Agent, DEADLINE, Netns, TcpPair, TestEnv, kernel_tests_enabled,
    middlebox::{Blackhole, connect, middlebox, send},
    set_keepalive, skip_or_fail, wait_closed, wait_until,
};
use serde_json::Value as Json;

type TestResult = anyhow::Result<()>;

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// Probe after 2 s idle, every second, give up after 3: the drop comes about 5 s after
/// keepalive is enabled, after a few scrapes that saw the namespace's drop counters at 0.
const IDLE: i32 = 2;
const INTVL: i32 = 1;
const CNT: i32 = 3;
const DROP_ALERT: &str = "KeepaliveConnectionDropped";

/// The middlebox idle timeout of the idle-kill part, in seconds, and its threshold's name: the
/// middlebox namespace's own conntrack timeout, which the agent reads there unasked.
const IDLE_TIMEOUT: u64 = 2;
const IDLE_THRESHOLD: &str = "conntrack";

/// Creates a connection in `ns` whose peer stops answering, and waits until the kernel's
/// keepalive kills it. Returns the pair (its addresses name the connection).
fn keepalive_killed_connection(ns: &Netns) -> anyhow::Result<TcpPair> {
    let listener = ns.listen(LOOPBACK)?;
    let pair = ns.connect_pair(&listener)?;
    // Everything the server end sends is dropped: to the client its peer is a dead host.
    let blackhole = ns.blackhole_replies_from_port(pair.server_port())?;
    set_keepalive(&pair.client, IDLE, INTVL, CNT)?;
    let err = wait_closed(&pair.client, DEADLINE, "client")?;
    assert_eq!(
        err,
        libc::ETIMEDOUT,
        "client should die of keepalive timeout"
    );
    drop(blackhole);
    Ok(pair)
}

fn prometheus_config(agent: &Agent, alertmanager: &Server) -> String {
    format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
         rule_files:\n  - {rules}\n\
         alerting:\n  alertmanagers:\n    - static_configs:\n        - targets: ['{am}']\n\
         scrape_configs:\n  - job_name: keepalive-agent\n    static_configs:\n      \
         - targets: ['{agent}']\n",
        rules = deploy_path("prometheus/keepalive-rules.yml").display(),
        am = alertmanager.addr(),
        agent = agent.addr(),
    )
}

/// Alertmanager with one receiver that delivers nowhere: the test reads its API.
const ALERTMANAGER_CONFIG: &str = "route:\n  receiver: api-only\n  group_wait: 0s\n  \
    group_interval: 1s\n  repeat_interval: 1h\nreceivers:\n  - name: api-only\n";

/// Whether `object`'s labels include every `(key, value)`.
fn has_labels(object: &Json, want: &[(&str, String)]) -> bool {
    want.iter()
        .all(|(key, value)| json_label(object, key) == Some(value.as_str()))
}

#[test]
fn keepalive_drop_reaches_prometheus_tsdb_and_its_alert_reaches_alertmanager_with_connection_labels()
-> TestResult {
    let test = "keepalive_drop_reaches_prometheus_tsdb_and_its_alert_reaches_alertmanager_with_connection_labels";
    if !tool_available(test, "prometheus", "--version", "Debian package prometheus")
        || !tool_available(
            test,
            "prometheus-alertmanager",
            "--version",
            "Debian package prometheus-alertmanager",
        )
    {
        return Ok(());
    }
    // The agent as the DaemonSet runs it, in a pod network namespace of its own; Prometheus and
    // Alertmanager run in that namespace too, as if they scraped the pod's address.
    // The idle kill below is named by the middlebox namespace's conntrack timeout, a few
    // seconds, which the agent reads from that namespace unasked. A load balancer's threshold
    // is given too, as operators do: above every silence here, it names no kill, and it gives
    // every namespace the at-or-above series KeepaliveIdleAboveMiddleboxTimeout reads from the
    // first audit walk on (the middlebox namespace does not exist yet then).
    let Some(env) =
        TestEnv::start_as_daemonset_with_args(test, &["--idle-timeout-threshold", "e2e-lb=3600"])
    else {
        return Ok(());
    };
    let Some(agent) = env.agent() else {
        return Ok(());
    };
    let pod = agent.endpoint().netns();
    let started = Instant::now();
    let scratch = ScratchDir::new("e2e")?;
    let dir = &scratch.0;
    fs::write(dir.join("alertmanager.yml"), ALERTMANAGER_CONFIG)?;
    let alertmanager = Server::start_in(
        pod,
        "alertmanager",
        "prometheus-alertmanager",
        &[
            "--config.file=alertmanager.yml".into(),
            format!("--storage.path={}", dir.join("am-data").display()),
            "--web.listen-address={addr}".into(),
            // No gossip port: a single instance, and nothing listens beyond loopback.
            "--cluster.listen-address=".into(),
        ],
        dir,
        "/-/ready",
    )?;
    fs::write(
        dir.join("prometheus.yml"),
        prometheus_config(agent, &alertmanager),
    )?;
    let prometheus = Server::start_in(
        pod,
        "prometheus",
        "prometheus",
        &[
            "--config.file=prometheus.yml".into(),
            format!("--storage.tsdb.path={}", dir.join("prom-data").display()),
            "--web.listen-address={addr}".into(),
        ],
        dir,
        "/-/ready",
    )?;
    // The shipped rules loaded: every group is there.
    let rules = prometheus.get_json("/api/v1/rules")?;
    let groups = rules["data"]["groups"].as_array().map_or(0, Vec::len);
    assert_eq!(groups, 2, "rule groups loaded: {rules}");
    poll(DEADLINE, "Prometheus to scrape the agent", || {
        let up = prometheus.query("up{job=\"keepalive-agent\"}")?;
        Ok(match up.first().map(|s| s["value"][1].clone()) {
            Some(Json::String(v)) if v == "1" => Ok(()),
            other => Err(format!("{other:?}")),
        })
    })?;

    // A connection through a conntrack middlebox goes silent while the keepalive kill runs.
    let mbox = middlebox("e2e-idle", IDLE_TIMEOUT, Blackhole::None)?;
    let mbox_listener = mbox.run(|| std::net::TcpListener::bind("127.0.0.1:8080"))??;
    let silent = connect(&mbox, &mbox_listener, None)?;

    let ns = Netns::new("e2e")?;
    let netns = ns.inum().to_string();
    let pair = keepalive_killed_connection(&ns)?;
    let client = pair.client_conn;
    eprintln!("{test}: connection {client:?} in netns {netns} killed by keepalive");

    // The drop is in the TSDB: the namespace's counter and the connection's own series.
    let drops =
        format!("tcp_connection_drops_total{{netns=\"{netns}\",reason=\"keepalive_timeout\"}}");
    // A new namespace starts from 0 even when the kernel gave it the inode of a deleted one
    // (the agent tells them apart by `net_cookie`).
    let expected = "1".to_owned();
    poll(
        DEADLINE,
        &format!("{drops} == {expected} in Prometheus"),
        || {
            let result = prometheus.query(&drops)?;
            Ok(match result.first().map(|s| s["value"][1].clone()) {
                Some(Json::String(v)) if v == expected => Ok(()),
                other => Err(format!("{other:?}")),
            })
        },
    )?;
    let connection = format!(
        "tcp_keepalive_connection_probes_total{{netns=\"{netns}\",reason=\"keepalive_timeout\",\
         local_port=\"{}\",remote_port=\"{}\"}}",
        client.local.port(),
        client.remote.port()
    );
    let series = prometheus.query(&connection)?;
    assert_eq!(series.len(), 1, "{connection}: {series:?}");
    assert_eq!(
        series[0]["value"][1],
        CNT.to_string(),
        "probes on the connection"
    );

    let want = [
        ("alertname", DROP_ALERT.to_owned()),
        ("netns", netns.clone()),
        ("reason", "keepalive_timeout".to_owned()),
        ("local_addr", client.local.ip().to_string()),
        ("local_port", client.local.port().to_string()),
        ("remote_addr", client.remote.ip().to_string()),
        ("remote_port", client.remote.port().to_string()),
        ("severity", "warning".to_owned()),
    ];
    // Firing in Prometheus...
    poll(
        DEADLINE,
        &format!("{DROP_ALERT} firing in Prometheus"),
        || {
            let alerts = prometheus.get_json("/api/v1/alerts")?;
            let list = alerts["data"]["alerts"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            Ok(
                match list
                    .iter()
                    .find(|a| has_labels(a, &want) && a["state"] == "firing")
                {
                    Some(_) => Ok(()),
                    None => Err(format!("{list:?}")),
                },
            )
        },
    )?;
    // ...and received by Alertmanager, with the connection's labels and the annotations.
    let filter = keepalive_tests::deploy::url_encode(&format!("alertname=\"{DROP_ALERT}\""));
    let delivered = poll(DEADLINE, &format!("{DROP_ALERT} in Alertmanager"), || {
        let alerts = alertmanager.get_json(&format!("/api/v2/alerts?filter={filter}"))?;
        let list = alerts.as_array().cloned().unwrap_or_default();
        Ok(match list.iter().find(|a| has_labels(a, &want)) {
            Some(alert) => Ok(alert.clone()),
            None => Err(format!("{list:?}")),
        })
    })?;
    assert_eq!(
        delivered["annotations"]["runbook_url"],
        "docs/runbook.md#keepaliveconnectiondropped"
    );
    let summary = delivered["annotations"]["summary"]
        .as_str()
        .unwrap_or_default();
    assert!(
        summary.contains(&format!("{}:{}", client.local.ip(), client.local.port())),
        "{summary}"
    );
    assert_eq!(delivered["status"]["state"], "active", "{delivered}");

    // The namespace-level alert fires too.
    poll(
        DEADLINE,
        "KeepaliveDisconnects firing in Prometheus",
        || {
            let alerts = prometheus.get_json("/api/v1/alerts")?;
            let list = alerts["data"]["alerts"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let want = [
                ("alertname", "KeepaliveDisconnects".to_owned()),
                ("netns", netns.clone()),
            ];
            Ok(match list.iter().find(|a| has_labels(a, &want)) {
                Some(_) => Ok(()),
                None => Err(format!("{list:?}")),
            })
        },
    )?;

    // The silent connection's next send dies: an idle kill, alerted per connection.
    let forgotten = Duration::from_secs(2 * IDLE_TIMEOUT);
    std::thread::sleep(forgotten.saturating_sub(silent.last_received.elapsed()));
    send(&silent)?;
    assert_eq!(
        wait_closed(&silent.client, DEADLINE, "idle-killed client")?,
        libc::ECONNRESET
    );
    let idle_kill = [
        ("alertname", "KeepaliveIdleKill".to_owned()),
        ("netns", mbox.inum().to_string()),
        ("local_port", silent.conn.local.port().to_string()),
        ("threshold", IDLE_THRESHOLD.to_owned()),
        ("died_by", "reset".to_owned()),
        ("keepalive", "off".to_owned()),
    ];
    poll(DEADLINE, "KeepaliveIdleKill firing in Prometheus", || {
        let alerts = prometheus.get_json("/api/v1/alerts")?;
        let list = alerts["data"]["alerts"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        Ok(match list.iter().find(|a| has_labels(a, &idle_kill)) {
            Some(_) => Ok(()),
            None => Err(format!("{list:?}")),
        })
    })?;

    // Every metric the alerts and the dashboard use is one the agent really exports (they are
    // all in the TSDB now): a renamed metric cannot leave an alert that never fires.
    let dashboard: Json = serde_json::from_str(&fs::read_to_string(deploy_path(
        "grafana/keepalive-agent-dashboard.json",
    ))?)?;
    let names = prometheus.get_json("/api/v1/label/__name__/values")?;
    let stored: Vec<&str> = names["data"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Json::as_str)
        .collect();
    let rules = read_yaml(&deploy_path("prometheus/keepalive-rules.yml"))?;
    let alert_exprs = rules["groups"]
        .as_sequence()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_sequence().into_iter().flatten())
        .filter_map(|r| r["expr"].as_str().map(str::to_owned));
    let panel_exprs = dashboard["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter_map(|t| t["expr"].as_str().map(str::to_owned));
    for expr in alert_exprs.chain(panel_exprs) {
        for metric in metric_names(&expr) {
            assert!(
                stored.contains(&metric.as_str()),
                "{metric} (in `{expr}`) is not exported by the agent; Prometheus has: {stored:?}"
            );
        }
    }

    // The dashboard's queries are valid PromQL against this Prometheus, and the panels about
    // drops and detection time have data.
    for panel in dashboard["panels"].as_array().cloned().unwrap_or_default() {
        for target in panel["targets"].as_array().cloned().unwrap_or_default() {
            let expr = target["expr"]
                .as_str()
                .unwrap_or_default()
                .replace("$__rate_interval", "1m")
                .replace("$instance", ".*");
            let result = prometheus.query(&expr);
            assert!(
                result.is_ok(),
                "panel {}: {expr}: {result:?}",
                panel["title"]
            );
            let title = panel["title"].as_str().unwrap_or_default();
            if title.starts_with("Connection drops") || title.starts_with("Dead-peer") {
                assert!(!result?.is_empty(), "panel {title} has no data: {expr}");
            }
        }
    }
    eprintln!("{test}: end to end in {:?}", started.elapsed());
    Ok(())
}

/// Metric names in a PromQL expression: identifiers outside label matchers, strings and range
/// selectors that are neither functions (followed by `(`), keywords nor numbers.
fn metric_names(expr: &str) -> Vec<String> {
    // Binary operators, modifiers and aggregation operators (the latter may precede `by`).
    const KEYWORDS: [&str; 23] = [
        "and",
        "or",
        "unless",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "offset",
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
    ];
    // Blank out {...}, [...] and "..." so label names and values are not taken for metrics.
    let mut plain = String::with_capacity(expr.len());
    let mut closing = None;
    for c in expr.chars() {
        match (closing, c) {
            (None, '{') => closing = Some('}'),
            (None, '[') => closing = Some(']'),
            (None, '"') => closing = Some('"'),
            (Some(end), c) if c == end => closing = None,
            (None, c) => plain.push(c),
            _ => {}
        }
        if closing.is_some() {
            plain.push(' ');
        }
    }
    let mut names = Vec::new();
    let mut at = 0;
    while let Some(offset) = plain[at..].find(|c: char| c.is_ascii_alphabetic() || c == '_') {
        let start = at + offset;
        let len = plain[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(plain.len() - start);
        let token = &plain[start..start + len];
        let after = plain[start + len..].trim_start();
        // Identifiers in the parenthesised list after `by`/`without`/`on`/`ignoring` are labels:
        // walk back over `label, label, (` to the word before the parenthesis.
        let before = plain[..start].trim_end_matches(|c: char| {
            c.is_ascii_alphanumeric() || c == '_' || c == ',' || c.is_whitespace()
        });
        let grouping = before.strip_suffix('(').is_some_and(|b| {
            [
                "by",
                "without",
                "on",
                "ignoring",
                "group_left",
                "group_right",
            ]
            .iter()
            .any(|k| b.trim_end().ends_with(k))
        });
        let is_number = token.starts_with(|c: char| c.is_ascii_digit());
        if !after.starts_with('(') && !KEYWORDS.contains(&token) && !grouping && !is_number {
            names.push(token.to_owned());
        }
        at = start + len;
    }
    names
}

#[test]
fn metric_names_are_told_apart_from_functions_labels_and_keywords() {
    assert_eq!(
        metric_names(
            "sum by (instance, netns) (rate(tcp_keepalive_probes_total{job=\"a\", x=~\"b\"}[$__rate_interval]))"
        ),
        ["tcp_keepalive_probes_total"]
    );
    assert_eq!(
        metric_names("up{job=\"k\"} == 0 or absent(up{job=\"k\"})"),
        ["up", "up"]
    );
    assert_eq!(
        metric_names("topk(10, sum by (remote_addr, remote_port) (g{reason=\"\"}))"),
        ["g"]
    );
}

#[test]
fn agent_scrape_after_a_keepalive_drop_passes_promtool_check_metrics() -> TestResult {
    let test = "agent_scrape_after_a_keepalive_drop_passes_promtool_check_metrics";
    if !tool_available(test, "promtool", "--version", "Debian package prometheus") {
        return Ok(());
    }
    let Some(env) = TestEnv::start(test) else {
        return Ok(());
    };
    let Some(agent) = env.agent() else {
        return Ok(());
    };
    let ns = Netns::new("promtool")?;
    let pair = keepalive_killed_connection(&ns)?;
    // Wait until the drop, its histogram observation and the connection's series are exported,
    // so every metric family has samples to lint.
    let netns = ns.inum().to_string();
    let needle = format!("local_port=\"{}\"", pair.client_conn.local.port());
    let body = poll(DEADLINE, "the dropped connection in the scrape", || {
        let (code, body) = http_get_accept(agent.addr(), "/metrics", "text/plain; version=0.0.4")?;
        anyhow::ensure!(code == 200, "/metrics answered {code}");
        let exported = body.contains(&needle)
            && body.contains(&format!(
                "tcp_keepalive_dead_peer_detection_seconds_count{{netns=\"{netns}\""
            ));
        Ok(if exported { Ok(body) } else { Err(body) })
    })?;
    assert!(!body.contains("# EOF"), "0.0.4 text was asked for");
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), body.as_bytes())?;
    let out = child.wait_with_output()?;
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool check metrics reported problems:\n{report}\nscrape:\n{body}"
    );
    Ok(())
}

fn proc_sys(key: &str) -> anyhow::Result<i64> {
    Ok(fs::read_to_string(format!("/proc/sys/kernel/{key}"))?
        .trim()
        .parse()?)
}

#[test]
fn agent_is_ready_with_only_the_daemonset_capabilities_and_fails_without_cap_syslog() -> TestResult
{
    let test = "agent_is_ready_with_only_the_daemonset_capabilities_and_fails_without_cap_syslog";
    if !kernel_tests_enabled(test)
        || !tool_available(test, "setpriv", "--version", "Debian package util-linux")
    {
        return Ok(());
    }
    let (kptr_restrict, perf_paranoid) =
        (proc_sys("kptr_restrict")?, proc_sys("perf_event_paranoid")?);
    if kptr_restrict >= 2 {
        skip_or_fail(
            test,
            "kernel.kptr_restrict=2 hides kallsyms addresses from everyone",
        );
        return Ok(());
    }
    {
        // Its own network, PID and mount namespaces, the manifest's mounts, capabilities, args.
        let agent = Agent::start_as_daemonset(&[])?;
        let (code, body) = agent.get("/metrics")?;
        assert_eq!(code, 200);
        let detached: Vec<&str> = body
            .lines()
            .filter(|l| l.starts_with("keepalive_agent_hook_attached{") && l.ends_with(" 0"))
            .collect();
        assert!(
            detached.is_empty(),
            "hooks not attached with the DaemonSet's capabilities: {detached:?}\n{}",
            agent.log()
        );
        // The counter sweep loads only if its program recognises its own thread by its id in
        // the pod's PID namespace (checked at load), and then sweeps.
        let none: &[(&str, &str)] = &[];
        let swept = wait_until(DEADLINE, "the agent's first counter sweep", || {
            Ok(agent.scrape()?.value(sweep_metric::ROUNDS, none) >= 1.0)
        });
        assert!(
            swept.is_ok(),
            "no counter sweep with the DaemonSet's PID namespace and capabilities: {swept:?}\n{}",
            agent.log()
        );
    }

    // kallsyms_show_value(): with kptr_restrict=1, or 0 with perf_event_paranoid >= 2, only
    // CAP_SYSLOG reveals the addresses the programs filter timers by.
    if kptr_restrict == 0 && perf_paranoid < 2 {
        eprintln!(
            "{test}: kallsyms addresses are public here (paranoid {perf_paranoid}); not checking the failure"
        );
        return Ok(());
    }
    let (capabilities, args) = daemonset_container()?;
    let scratch = ScratchDir::new("caps")?;
    let without: Vec<String> = capabilities.into_iter().filter(|c| c != "syslog").collect();
    // A real port: the agent refuses port 0, which Prometheus could not know.
    let addr = keepalive_tests::free_loopback_port()?.to_string();
    let args: Vec<String> = agent_as_in_daemonset(&scratch.0, &without, &args)
        .into_iter()
        .map(|a| a.replace("{addr}", &addr))
        .collect();
    let mut child = Command::new("unshare")
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            panic!("the agent kept running without CAP_SYSLOG");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = child.wait_with_output()?;
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        !status.success(),
        "the agent started without CAP_SYSLOG:\n{log}"
    );
    assert!(
        log.contains("kallsyms") && log.contains("CAP_SYSLOG"),
        "{log}"
    );
    Ok(())
}

/// `256Mi`-style Kubernetes quantity in bytes (binary suffixes only, as the DaemonSet uses).
fn quantity_bytes(quantity: &str) -> anyhow::Result<u64> {
    let (number, unit) = quantity.split_at(
        quantity
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(quantity.len()),
    );
    let scale = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        other => anyhow::bail!("unsupported quantity unit {other:?} in {quantity}"),
    };
    Ok(number.parse::<u64>()? * scale)
}

#[test]
fn agent_peak_memory_and_bpf_maps_fit_the_daemonset_memory_limit() -> TestResult {
    let test = "agent_peak_memory_and_bpf_maps_fit_the_daemonset_memory_limit";
    let Some(env) = TestEnv::start(test) else {
        return Ok(());
    };
    let Some(agent) = env.agent() else {
        return Ok(());
    };
    let ds = read_yaml(&deploy_path("kubernetes/daemonset.yaml"))?;
    let resources = &ds["spec"]["template"]["spec"]["containers"][0]["resources"];
    let limit = quantity_bytes(resources["limits"]["memory"].as_str().unwrap_or_default())?;
    let request = quantity_bytes(resources["requests"]["memory"].as_str().unwrap_or_default())?;

    // Some keepalive traffic first: 50 probing connections and one drop.
    let ns = Netns::new("footprint")?;
    let listener = ns.listen(LOOPBACK)?;
    let pairs = ns.connect_pairs(&listener, 50)?;
    for pair in &pairs {
        set_keepalive(&pair.client, 1, 1, 3)?;
    }
    keepalive_killed_connection(&ns)?;
    agent.scrape()?;

    let pid = agent.pid();
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let (peak_rss, rss) = (kib("VmHWM:") * 1024, kib("VmRSS:") * 1024);
    // BPF maps are charged to the loader's memory cgroup; fdinfo says how much each takes.
    let mut map_bytes = 0u64;
    for entry in fs::read_dir(format!("/proc/{pid}/fd"))? {
        let entry = entry?;
        let target = fs::read_link(entry.path()).unwrap_or_default();
        if target.to_string_lossy() == "anon_inode:bpf-map" {
            let info = fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                entry.file_name().to_string_lossy()
            ))?;
            map_bytes += info
                .lines()
                .find_map(|l| l.strip_prefix("memlock:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    eprintln!(
        "{test}: agent peak RSS {:.1} MiB, RSS now {:.1} MiB, BPF maps {:.1} MiB; DaemonSet \
         request {:.0} MiB, limit {:.0} MiB",
        mib(peak_rss),
        mib(rss),
        mib(map_bytes),
        mib(request),
        mib(limit)
    );
    assert!(map_bytes > 0, "no BPF maps found in /proc/{pid}/fd");
    assert!(
        peak_rss + map_bytes < limit,
        "the agent needs more than the DaemonSet's memory limit"
    );
    assert!(
        rss + map_bytes < request,
        "steady-state footprint exceeds the memory request"
    );
    Ok(())
}
