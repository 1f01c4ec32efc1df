//! A small parser for the Prometheus / OpenMetrics text exposition format, enough to read the
//! agent's `/metrics`: `name{k="v",...} value [timestamp]` lines, `#` lines ignored.

use anyhow::{Context, bail};

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    /// The value of label `key`, if present.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// True when every `(key, value)` in `want` is one of this sample's labels. Labels the sample
    /// has beyond `want` do not matter.
    pub fn matches<K: AsRef<str>, V: AsRef<str>>(&self, want: &[(K, V)]) -> bool {
        want.iter()
            .all(|(k, v)| self.label(k.as_ref()) == Some(v.as_ref()))
    }
}

/// The agent's counts of events its kernel programs saw but could not add to the totals, and
/// of program runs the kernel skipped.
pub const UNCOUNTED_METRICS: [&str; 2] = [
    "keepalive_agent_kernel_uncounted_total",
    "keepalive_agent_program_recursion_misses_total",
];

/// A parsed scrape.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    samples: Vec<Sample>,
    raw: String,
}

impl Metrics {
    /// Parses a whole exposition. Fails on a line it cannot read, naming the line.
    pub fn parse(text: &str) -> anyhow::Result<Metrics> {
        let mut samples = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let sample =
                parse_line(line).with_context(|| format!("metrics line {}: {line:?}", i + 1))?;
            samples.push(sample);
        }
        Ok(Metrics {
            samples,
            raw: text.to_owned(),
        })
    }

    /// Every series of `names` that is higher here than in `before` (0 where `before` lacks
    /// it), as its label values and the increase, or "none".
    pub fn growth_since(&self, before: &Metrics, names: &[&str]) -> String {
        let mut grew = Vec::new();
        for &name in names {
            for sample in self.samples(name) {
                let was = before
                    .samples(name)
                    .into_iter()
                    .find(|b| b.labels == sample.labels)
                    .map_or(0.0, |b| b.value);
                if sample.value > was {
                    let labels: Vec<&str> = sample.labels.iter().map(|(_, v)| v.as_str()).collect();
                    grew.push(format!("{} {}", labels.join(" "), sample.value - was));
                }
            }
        }
        if grew.is_empty() {
            "none".to_owned()
        } else {
            grew.join(", ")
        }
    }

    /// Every sample of metric `name` (the full sample name, e.g. `tcp_keepalive_probes_total`).
    pub fn samples(&self, name: &str) -> Vec<&Sample> {
        self.samples.iter().filter(|s| s.name == name).collect()
    }

    /// Samples of `name` carrying every label in `labels`.
    pub fn matching<K: AsRef<str>, V: AsRef<str>>(
        &self,
        name: &str,
        labels: &[(K, V)],
    ) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|s| s.name == name && s.matches(labels))
            .collect()
    }

    /// Sum of the samples of `name` carrying every label in `labels`; 0 when there are none.
    pub fn value<K: AsRef<str>, V: AsRef<str>>(&self, name: &str, labels: &[(K, V)]) -> f64 {
        self.matching(name, labels).iter().map(|s| s.value).sum()
    }

    /// All samples.
    pub fn all(&self) -> &[Sample] {
        &self.samples
    }

    /// The text as scraped.
    pub fn raw(&self) -> &str {
        &self.raw
    }

    /// The raw lines mentioning `key="value"` (for failure messages).
    pub fn lines_with_label(&self, key: &str, value: &str) -> String {
        let needle = format!("{key}=\"{}\"", escape_label_value(value));
        self.raw
            .lines()
            .filter(|l| l.contains(&needle))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// [`Self::lines_with_label`] without the per-connection series (hundreds in a big test),
    /// with a line saying how many were left out.
    pub fn aggregate_lines_with_label(&self, key: &str, value: &str) -> String {
        let all = self.lines_with_label(key, value);
        let (connection, aggregate): (Vec<&str>, Vec<&str>) = all
            .lines()
            .filter(|l| !l.contains("_bucket{"))
            .partition(|l| l.starts_with("tcp_keepalive_connection_"));
        format!(
            "{}\n({} per-connection series and the histogram buckets left out)",
            aggregate.join("\n"),
            connection.len()
        )
    }

    /// The agent's own counters that are not zero (`keepalive_agent_*`, not info series).
    pub fn self_lines(&self) -> String {
        self.raw
            .lines()
            .filter(|l| {
                l.starts_with("keepalive_agent_")
                    && !l.contains("_info{")
                    && !l.ends_with(" 0")
                    && !l.contains("_bucket{")
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn escape_label_value(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn parse_line(line: &str) -> anyhow::Result<Sample> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .context("no value after the metric name")?;
    let name = &line[..name_end];
    if name.is_empty() {
        bail!("empty metric name");
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after_brace) = rest.strip_prefix('{') {
        let (parsed, after) = parse_labels(after_brace)?;
        labels = parsed;
        rest = after;
    }
    let value_text = rest
        .split_whitespace()
        .next()
        .context("missing sample value")?;
    let value = value_text
        .parse::<f64>()
        .with_context(|| format!("bad sample value {value_text:?}"))?;
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Parses `k="v",k2="v2"}` (the opening brace already consumed); returns the labels and the text
/// after the closing brace.
fn parse_labels(mut s: &str) -> anyhow::Result<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        s = s.trim_start_matches(|c: char| c == ',' || c.is_whitespace());
        if let Some(after) = s.strip_prefix('}') {
            return Ok((labels, after));
        }
        let eq = s.find('=').context("label without '='")?;
        let key = s[..eq].trim().to_owned();
        s = s[eq + 1..].trim_start();
        s = s
            .strip_prefix('"')
            .context("label value does not start with '\"'")?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            match chars.next() {
                None => bail!("unterminated label value"),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => bail!("unterminated escape in label value"),
                },
                Some((_, c)) => value.push(c),
            }
        };
        labels.push((key, value));
        s = &s[end + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_labels_values_and_skips_comments() {
        let text = "# HELP tcp_keepalive_probes_total Probes.\n\
                    # TYPE tcp_keepalive_probes counter\n\
                    tcp_keepalive_probes_total{netns=\"4026531840\"} 3\n\
                    tcp_keepalive_probes_total{netns=\"4026532000\"} 4.0 1700000000\n\
                    keepalive_agent_ringbuf_reserve_failures_total 0\n\
                    weird{a=\"q\\\"uo\\\\te\\n\",b=\"x,y}\"} +Inf\n\
                    # EOF\n";
        let m = Metrics::parse(text).expect("parse");
        assert_eq!(m.all().len(), 4);
        assert_eq!(
            m.value("tcp_keepalive_probes_total", &[("netns", "4026531840")]),
            3.0
        );
        let none: &[(&str, &str)] = &[];
        assert_eq!(m.value("tcp_keepalive_probes_total", none), 7.0);
        assert_eq!(
            m.value("keepalive_agent_ringbuf_reserve_failures_total", none),
            0.0
        );
        assert_eq!(m.value("absent", none), 0.0);
        let weird = m.samples("weird");
        assert_eq!(weird[0].label("a"), Some("q\"uo\\te\n"));
        assert_eq!(weird[0].label("b"), Some("x,y}"));
        assert!(weird[0].value.is_infinite());
        assert_eq!(
            m.lines_with_label("netns", "4026532000"),
            "tcp_keepalive_probes_total{netns=\"4026532000\"} 4.0 1700000000"
        );
    }

    #[test]
    fn rejects_garbage() {
        assert!(Metrics::parse("name{a=\"b\" 1").is_err());
        assert!(Metrics::parse("name{a=b} 1").is_err());
        assert!(Metrics::parse("name notanumber").is_err());
    }
}
