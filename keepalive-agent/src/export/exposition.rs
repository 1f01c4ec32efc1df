//! The classic Prometheus text format (version 0.0.4), derived from the OpenMetrics text the
//! registry encodes. Prometheus itself negotiates OpenMetrics; tools that only read 0.0.4 —
//! `promtool check metrics`, older scrapers — ask for it with
//! `Accept: text/plain; version=0.0.4`.
//!
//! The two formats differ, for what the agent exports, in: counter and info family names (the
//! OpenMetrics `# TYPE` line names the family without `_total` / `_info`, 0.0.4 names the
//! sample), the `info` and `unknown` types (0.0.4: `gauge`, `untyped`), exemplars, `# UNIT`
//! and the closing `# EOF`. Sample lines are otherwise the same.

use std::collections::HashMap;

/// The 0.0.4 content type.
pub(crate) const TEXT_0_0_4: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether a request's `Accept` header asks for 0.0.4 rather than OpenMetrics.
pub(crate) fn wants_text_0_0_4(accept: &str) -> bool {
    accept.contains("version=0.0.4") && !accept.contains("application/openmetrics-text")
}

/// Converts an OpenMetrics exposition to the 0.0.4 text format.
pub(crate) fn openmetrics_to_text(openmetrics: &str) -> String {
    // Family name → OpenMetrics type, from the `# TYPE` lines (HELP comes before TYPE).
    let types: HashMap<&str, &str> = openmetrics
        .lines()
        .filter_map(|line| {
            let mut words = line.strip_prefix("# TYPE ")?.split(' ');
            Some((words.next()?, words.next()?))
        })
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some((keyword, rest)) = line
            .strip_prefix("# HELP ")
            .map(|rest| ("HELP", rest))
            .or_else(|| line.strip_prefix("# TYPE ").map(|rest| ("TYPE", rest)))
        {
            let (family, text) = rest.split_once(' ').unwrap_or((rest, ""));
            let kind = types.get(family).copied().unwrap_or("unknown");
            let name = match kind {
                "counter" => format!("{family}_total"),
                "info" => format!("{family}_info"),
                _ => family.to_owned(),
            };
            let text = if keyword == "TYPE" {
                match kind {
                    "info" => "gauge",
                    "counter" | "gauge" | "histogram" | "summary" => kind,
                    _ => "untyped",
                }
            } else {
                text
            };
            out.push_str(&format!("# {keyword} {name} {text}\n"));
            continue;
        }
        // An exemplar follows the value as ` # {labels} value`; 0.0.4 has none.
        let sample = line.split_once(" # ").map_or(line, |(sample, _)| sample);
        out.push_str(sample);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_info_families_are_named_by_their_samples() {
        let openmetrics = "# HELP drops Drops.\n# TYPE drops counter\n\
            drops_total{reason=\"x\"} 1 # {trace_id=\"a\"} 1\n\
            # HELP build Build.\n# TYPE build info\nbuild_info{version=\"1\"} 1\n\
            # HELP up Up.\n# TYPE up gauge\n# UNIT up \nup 1\n\
            # HELP d Detection.\n# TYPE d histogram\nd_bucket{le=\"+Inf\"} 0\nd_sum 0\nd_count 0\n\
            # TYPE odd unknown\nodd 2\n# EOF\n";
        assert_eq!(
            openmetrics_to_text(openmetrics),
            "# HELP drops_total Drops.\n# TYPE drops_total counter\ndrops_total{reason=\"x\"} 1\n\
             # HELP build_info Build.\n# TYPE build_info gauge\nbuild_info{version=\"1\"} 1\n\
             # HELP up Up.\n# TYPE up gauge\nup 1\n\
             # HELP d Detection.\n# TYPE d histogram\nd_bucket{le=\"+Inf\"} 0\nd_sum 0\nd_count 0\n\
             # TYPE odd untyped\nodd 2\n"
        );
    }

    #[test]
    fn prometheus_gets_openmetrics_and_only_an_explicit_0_0_4_request_gets_text() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
            version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert!(!wants_text_0_0_4(prometheus));
        assert!(!wants_text_0_0_4("*/*"));
        assert!(!wants_text_0_0_4("text/plain"));
        assert!(wants_text_0_0_4("text/plain; version=0.0.4"));
    }
}
