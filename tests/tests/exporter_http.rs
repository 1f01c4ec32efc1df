//! The HTTP face operators and scrapers meet. `/metrics` negotiates its format as Go's client
//! library does: the classic text format 0.0.4 to a client that does not ask for OpenMetrics
//! (curl, promtool, Telegraf), OpenMetrics to one that does (Prometheus); each answer's
//! Content-Type names its body's format and the plain answer passes `promtool check metrics`.
//! `/` is a landing page linking the endpoints and naming the build.

use std::process::{Command, Stdio};

use anyhow::{Context as _, ensure};
use keepalive_tests::agent::{HttpResponse, http_request};
use keepalive_tests::deploy::tool_available;
use keepalive_tests::{Agent, kernel_tests_enabled, skip_or_fail};

/// What Prometheus 2.42 (Debian 12's) sends when it scrapes (scrape/scrape.go).
const PROMETHEUS_2_42_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,\
    application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
/// What Prometheus 2.49 and later send with native histograms enabled: protobuf first, which
/// the agent does not serve, so the next preference (OpenMetrics 1.0.0) must win.
const PROMETHEUS_PROTOBUF_FIRST_ACCEPT: &str = "application/vnd.google.protobuf;\
    proto=io.prometheus.client.MetricFamily;encoding=delimited;q=0.7,\
    application/openmetrics-text;version=1.0.0;q=0.5,\
    application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2";

fn scrape(agent: &Agent, accept: Option<&str>) -> anyhow::Result<HttpResponse> {
    let headers: Vec<(&str, &str)> = accept.map(|a| ("Accept", a)).into_iter().collect();
    let response = http_request(agent.addr(), "/metrics", &headers)?;
    ensure!(
        response.status == 200,
        "/metrics answered {} to Accept {accept:?}",
        response.status
    );
    Ok(response)
}

fn assert_classic_text(response: &HttpResponse, client: &str) {
    assert_eq!(
        response.content_type.as_deref(),
        Some("text/plain; version=0.0.4; charset=utf-8"),
        "{client}"
    );
    assert!(
        !response.body.contains("# EOF"),
        "{client}: OpenMetrics body"
    );
    assert!(
        response
            .body
            .contains("# TYPE keepalive_agent_build_info gauge\n"),
        "{client}: the info metric must be a gauge in 0.0.4:\n{}",
        response.body
    );
}

fn assert_openmetrics(response: &HttpResponse, client: &str) {
    assert_eq!(
        response.content_type.as_deref(),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        "{client}"
    );
    assert!(response.body.ends_with("# EOF\n"), "{client}: no # EOF");
    assert!(
        response
            .body
            .contains("# TYPE keepalive_agent_build info\n"),
        "{client}:\n{}",
        response.body
    );
}

#[test]
fn metrics_are_classic_text_unless_the_client_asks_for_openmetrics() -> anyhow::Result<()> {
    let test = "metrics_are_classic_text_unless_the_client_asks_for_openmetrics";
    if !kernel_tests_enabled(test)
        || !tool_available(test, "promtool", "--version", "Debian package prometheus")
    {
        return Ok(());
    }
    let agent = match Agent::start() {
        Ok(agent) => agent,
        Err(e) => {
            skip_or_fail(test, &format!("the agent did not start: {e:#}"));
            return Ok(());
        }
    };

    let plain = scrape(&agent, None)?;
    assert_classic_text(&plain, "no Accept header");
    assert_classic_text(&scrape(&agent, Some("*/*"))?, "Accept: */*");
    assert_openmetrics(
        &scrape(&agent, Some(PROMETHEUS_2_42_ACCEPT))?,
        "Prometheus 2.42",
    );
    assert_openmetrics(
        &scrape(&agent, Some(PROMETHEUS_PROTOBUF_FIRST_ACCEPT))?,
        "Prometheus with protobuf first",
    );
    let openmetrics_only = scrape(&agent, Some("application/openmetrics-text"))?;
    assert_eq!(
        openmetrics_only.content_type.as_deref(),
        Some("application/openmetrics-text; version=0.0.1; charset=utf-8")
    );
    assert!(openmetrics_only.body.ends_with("# EOF\n"));

    // What `curl -s .../metrics | promtool check metrics` does.
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning promtool")?;
    std::io::Write::write_all(
        &mut child.stdin.take().context("promtool stdin")?,
        plain.body.as_bytes(),
    )?;
    let output = child.wait_with_output()?;
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() && report.trim().is_empty(),
        "promtool check metrics on the plain scrape:\n{report}"
    );
    Ok(())
}

/// `revision="..."` of `keepalive_agent_build_info`.
fn build_info_revision(exposition: &str) -> Option<String> {
    let line = exposition
        .lines()
        .find(|line| line.starts_with("keepalive_agent_build_info{"))?;
    let start = line.find("revision=\"")? + "revision=\"".len();
    let end = start + line[start..].find('"')?;
    Some(line[start..end].to_owned())
}

#[test]
fn landing_page_links_the_endpoints_and_names_the_revision_build_info_carries() -> anyhow::Result<()>
{
    let test = "landing_page_links_the_endpoints_and_names_the_revision_build_info_carries";
    if !kernel_tests_enabled(test) {
        return Ok(());
    }
    let agent = match Agent::start_with_args(&["--web.telemetry-path", "/v1/keepalive"]) {
        Ok(agent) => agent,
        Err(e) => {
            skip_or_fail(test, &format!("the agent did not start: {e:#}"));
            return Ok(());
        }
    };
    let landing = http_request(agent.addr(), "/", &[])?;
    assert_eq!(landing.status, 200);
    assert_eq!(
        landing.content_type.as_deref(),
        Some("text/html; charset=utf-8")
    );
    let metrics = http_request(agent.addr(), "/v1/keepalive", &[])?;
    assert_eq!(metrics.status, 200);
    let revision =
        build_info_revision(&metrics.body).context("keepalive_agent_build_info has no revision")?;
    // A commit (abbreviated by git, so at least 7 hex digits) or `unknown` outside git.
    assert!(
        revision == "unknown"
            || (revision.len() >= 7 && revision.chars().all(|c| c.is_ascii_hexdigit())),
        "revision {revision:?}"
    );
    for needle in [
        "href=\"/v1/keepalive\"",
        "href=\"/healthz\"",
        "href=\"/readyz\"",
        &format!("revision {revision}"),
    ] {
        assert!(
            landing.body.contains(needle),
            "{needle:?} missing from the landing page:\n{}",
            landing.body
        );
    }
    // Every link on the page answers.
    for path in ["/healthz", "/readyz"] {
        assert_eq!(http_request(agent.addr(), path, &[])?.status, 200, "{path}");
    }
    Ok(())
}
