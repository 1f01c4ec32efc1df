//! The shipped Prometheus rules (deploy/prometheus/keepalive-rules.yml): valid for promtool,
//! every alert unit-tested both firing and not firing, every runbook link resolves.

use std::collections::BTreeSet;

use keepalive_tests::deploy::{deploy_path, read_yaml, repo_root, run_tool, tool_available};
use serde_yaml_ng::Value as Yaml;

type TestResult = anyhow::Result<()>;

const RULES: &str = "prometheus/keepalive-rules.yml";
const RULE_TESTS: &str = "prometheus/keepalive-rules.test.yml";
const PROMTOOL_PACKAGE: &str = "Debian package prometheus";

/// Alert names defined in the rules file.
fn alert_names(rules: &Yaml) -> BTreeSet<String> {
    rules["groups"]
        .as_sequence()
        .into_iter()
        .flatten()
        .flat_map(|group| group["rules"].as_sequence().into_iter().flatten())
        .filter_map(|rule| rule["alert"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn shipped_rules_pass_promtool_check_rules() -> TestResult {
    let test = "shipped_rules_pass_promtool_check_rules";
    if !tool_available(test, "promtool", "--version", PROMTOOL_PACKAGE) {
        return Ok(());
    }
    let rules = deploy_path(RULES);
    let (ok, output) = run_tool(
        "promtool",
        &["check", "rules", &rules.to_string_lossy()],
        None,
    )?;
    assert!(ok, "promtool check rules failed:\n{output}");
    let alerts = alert_names(&read_yaml(&rules)?);
    assert!(
        output.contains(&format!("SUCCESS: {} rules found", alerts.len())),
        "promtool saw a different number of rules than the {} alerts: {output}",
        alerts.len()
    );
    Ok(())
}

#[test]
fn every_alert_has_promtool_unit_tests_that_pass() -> TestResult {
    let test = "every_alert_has_promtool_unit_tests_that_pass";
    if !tool_available(test, "promtool", "--version", PROMTOOL_PACKAGE) {
        return Ok(());
    }
    let alerts = alert_names(&read_yaml(&deploy_path(RULES))?);
    let required = [
        "KeepaliveConnectionDropped",
        "KeepaliveIdleKill",
        "KeepaliveDisconnects",
        "KeepaliveProbesUnanswered",
        "KeepaliveIdleAboveMiddleboxTimeout",
        "KeepaliveAgentDown",
        "KeepaliveAgentHookNotAttached",
        "KeepaliveAgentEventsLost",
        "KeepaliveAgentEventsUncounted",
        "KeepaliveAgentConnectionsVanished",
    ];
    for name in required {
        assert!(alerts.contains(name), "the rules lost alert {name}");
    }

    // Every alert needs a case where it fires and one where it does not.
    let tests = read_yaml(&deploy_path(RULE_TESTS))?;
    let mut firing = BTreeSet::new();
    let mut silent = BTreeSet::new();
    for case in tests["tests"].as_sequence().into_iter().flatten() {
        for check in case["alert_rule_test"].as_sequence().into_iter().flatten() {
            let name = check["alertname"].as_str().unwrap_or_default().to_owned();
            let expected = check["exp_alerts"].as_sequence().map_or(0, Vec::len);
            if expected > 0 {
                firing.insert(name);
            } else {
                silent.insert(name);
            }
        }
    }
    for name in &alerts {
        assert!(firing.contains(name), "no unit test where {name} fires");
        assert!(
            silent.contains(name),
            "no unit test where {name} stays silent"
        );
    }

    let dir = deploy_path("prometheus");
    let (ok, output) = run_tool(
        "promtool",
        &["test", "rules", "keepalive-rules.test.yml"],
        Some(&dir),
    )?;
    assert!(ok, "promtool test rules failed:\n{output}");
    assert!(output.contains("SUCCESS"), "{output}");
    Ok(())
}

#[test]
fn every_alert_has_summary_description_and_a_runbook_section_that_exists() -> TestResult {
    let rules = read_yaml(&deploy_path(RULES))?;
    let runbook_anchors = markdown_anchors(&std::fs::read_to_string(
        repo_root().join("docs/runbook.md"),
    )?);
    for group in rules["groups"].as_sequence().into_iter().flatten() {
        for rule in group["rules"].as_sequence().into_iter().flatten() {
            let Some(name) = rule["alert"].as_str() else {
                continue;
            };
            let annotations = &rule["annotations"];
            for key in ["summary", "description", "runbook_url"] {
                assert!(
                    annotations[key]
                        .as_str()
                        .is_some_and(|v| !v.trim().is_empty()),
                    "{name} has no {key}"
                );
            }
            let severity = rule["labels"]["severity"].as_str().unwrap_or_default();
            assert!(
                ["critical", "warning", "info"].contains(&severity),
                "{name}: severity {severity:?}"
            );
            let url = annotations["runbook_url"].as_str().unwrap_or_default();
            let (file, anchor) = url.split_once('#').unwrap_or((url, ""));
            assert_eq!(file, "docs/runbook.md", "{name}: runbook_url {url}");
            assert_eq!(
                anchor,
                name.to_lowercase(),
                "{name}: anchor should be the alert name"
            );
            assert!(
                runbook_anchors.contains(anchor),
                "{name}: docs/runbook.md has no heading for #{anchor}"
            );
        }
    }
    Ok(())
}

/// GitHub-style anchors of the markdown headings: lower-case, spaces to `-`, punctuation out.
fn markdown_anchors(markdown: &str) -> BTreeSet<String> {
    markdown
        .lines()
        .filter_map(|line| line.strip_prefix('#'))
        .map(|heading| {
            heading
                .trim_start_matches('#')
                .trim()
                .to_lowercase()
                .chars()
                .filter_map(|c| match c {
                    ' ' => Some('-'),
                    c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                    _ => None,
                })
                .collect()
        })
        .collect()
}
