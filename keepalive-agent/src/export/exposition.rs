//! Which exposition format a scrape gets, negotiated from its `Accept` header the way Go's
//! client library does it (`expfmt.NegotiateIncludingOpenMetrics`): the classic text format
//! 0.0.4 unless the client asks for OpenMetrics. Scrapers that know only 0.0.4 (`promtool
//! check metrics`, `curl`, agents built on the Go text parser) send no `Accept` or `*/*`;
//! Prometheus lists OpenMetrics first and gets it.
//!
//! Both encoders are prometheus-client's (`encoding::text` for OpenMetrics,
//! `encoding::prometheus_text` for 0.0.4), so a metric type the crate learns is encoded right in
//! both formats without code here.

use prometheus_client::registry::Registry;

/// The formats the agent can answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// The classic text format, version 0.0.4.
    Text,
    /// OpenMetrics text, labelled with the version the client asked for (the body is the same:
    /// what differs between 0.0.1 and 1.0.0 is nothing the agent exports).
    OpenMetrics { version_1_0_0: bool },
}

impl Format {
    pub(crate) fn content_type(self) -> &'static str {
        match self {
            Format::Text => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            Format::OpenMetrics {
                version_1_0_0: true,
            } => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::OpenMetrics {
                version_1_0_0: false,
            } => "application/openmetrics-text; version=0.0.1; charset=utf-8",
        }
    }

    pub(crate) fn encode(self, registry: &Registry) -> Result<String, std::fmt::Error> {
        let mut body = String::new();
        match self {
            Format::Text => {
                prometheus_client::encoding::prometheus_text::encode(&mut body, registry)?
            }
            Format::OpenMetrics { .. } => {
                prometheus_client::encoding::text::encode(&mut body, registry)?;
            }
        }
        Ok(body)
    }
}

/// One media range of an `Accept` header.
struct MediaRange<'a> {
    kind: &'a str,
    subtype: &'a str,
    version: Option<&'a str>,
    quality: f32,
}

impl MediaRange<'_> {
    /// `*/*` sorts after `text/*`, which sorts after `text/plain` (RFC 9110 §12.5.1).
    fn specificity(&self) -> u8 {
        u8::from(self.kind != "*") + u8::from(self.subtype != "*")
    }
}

/// Parses `accept` into its media ranges, most preferred first: by quality, then specificity,
/// then the order the client wrote them in (Go's goautoneg does the same).
fn media_ranges(accept: &str) -> Vec<MediaRange<'_>> {
    let mut ranges: Vec<MediaRange<'_>> = accept
        .split(',')
        .filter_map(|range| {
            let mut parts = range.split(';').map(str::trim);
            let (kind, subtype) = parts.next()?.split_once('/')?;
            let mut media = MediaRange {
                kind: kind.trim(),
                subtype: subtype.trim(),
                version: None,
                quality: 1.0,
            };
            for param in parts {
                let Some((key, value)) = param.split_once('=') else {
                    continue;
                };
                let value = value.trim().trim_matches('"');
                match key.trim() {
                    "q" => media.quality = value.parse().unwrap_or(0.0),
                    "version" => media.version = Some(value),
                    _ => {}
                }
            }
            Some(media)
        })
        .collect();
    // Stable: equal ranges keep the client's order.
    ranges.sort_by(|a, b| {
        b.quality
            .total_cmp(&a.quality)
            .then(b.specificity().cmp(&a.specificity()))
    });
    ranges
}

/// The format to answer a scrape whose `Accept` header is `accept` (empty when absent).
pub(crate) fn negotiate(accept: &str) -> Format {
    for range in media_ranges(accept) {
        if range.quality <= 0.0 {
            continue;
        }
        let kind = (
            range.kind.to_ascii_lowercase(),
            range.subtype.to_ascii_lowercase(),
        );
        match (kind.0.as_str(), kind.1.as_str(), range.version) {
            ("text", "plain", None | Some("0.0.4")) => return Format::Text,
            ("application", "openmetrics-text", None | Some("0.0.1")) => {
                return Format::OpenMetrics {
                    version_1_0_0: false,
                };
            }
            ("application", "openmetrics-text", Some("1.0.0")) => {
                return Format::OpenMetrics {
                    version_1_0_0: true,
                };
            }
            // Protobuf (asked for by Prometheus with native histograms on) is not served; the
            // next range the client accepts is.
            _ => {}
        }
    }
    Format::Text
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::{counter::Counter, info::Info};

    use super::*;

    /// What Prometheus 2.42 sends (scrape/scrape.go, `scrapeAcceptHeader`).
    const PROMETHEUS_2_42: &str = "application/openmetrics-text;version=1.0.0,\
        application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
    /// What Prometheus 2.49 and later send with native histograms on: protobuf first.
    const PROMETHEUS_PROTOBUF_FIRST: &str = "application/vnd.google.protobuf;\
        proto=io.prometheus.client.MetricFamily;encoding=delimited;q=0.7,\
        application/openmetrics-text;version=1.0.0;q=0.5,\
        application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2";

    #[test]
    fn clients_that_do_not_ask_for_openmetrics_get_the_classic_text_format() {
        for accept in [
            "",
            "*/*",
            "text/plain",
            "text/plain; version=0.0.4",
            "text/*",
        ] {
            assert_eq!(negotiate(accept), Format::Text, "{accept:?}");
        }
        // Unknown versions and refused types fall through to the default, as in Go.
        assert_eq!(
            negotiate("application/openmetrics-text; version=2.0.0"),
            Format::Text
        );
        assert_eq!(
            negotiate("application/openmetrics-text;q=0, text/plain;q=0.1"),
            Format::Text
        );
    }

    #[test]
    fn prometheus_and_openmetrics_clients_get_openmetrics() {
        let v1 = Format::OpenMetrics {
            version_1_0_0: true,
        };
        assert_eq!(negotiate(PROMETHEUS_2_42), v1);
        assert_eq!(negotiate(PROMETHEUS_PROTOBUF_FIRST), v1);
        assert_eq!(
            negotiate("application/openmetrics-text"),
            Format::OpenMetrics {
                version_1_0_0: false
            }
        );
        // Quality beats order.
        assert_eq!(
            negotiate("text/plain;version=0.0.4;q=0.3, application/openmetrics-text;version=1.0.0"),
            v1
        );
    }

    #[test]
    fn classic_text_names_counter_and_info_families_by_their_samples() {
        let mut registry = Registry::default();
        let drops = Counter::<u64>::default();
        drops.inc();
        registry.register("drops", "Drops", drops);
        registry.register("build", "Build", Info::new(vec![("version", "1")]));
        let text = Format::Text.encode(&registry).unwrap();
        assert_eq!(
            text,
            "# HELP drops_total Drops.\n# TYPE drops_total counter\ndrops_total 1\n\
             # HELP build_info Build.\n# TYPE build_info gauge\nbuild_info{version=\"1\"} 1\n"
        );
        let openmetrics = Format::OpenMetrics {
            version_1_0_0: true,
        }
        .encode(&registry)
        .unwrap();
        assert!(openmetrics.contains("# TYPE build info\n"));
        assert!(openmetrics.ends_with("# EOF\n"));
    }
}
