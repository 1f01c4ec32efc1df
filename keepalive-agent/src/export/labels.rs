//! Label sets: the aggregate counters' (`--aggregate-by`, shared with the audit metrics) and the
//! per-connection workload labels.

use std::{fmt, str::FromStr};

use crate::{attribution::Workload, record::decoder::Endpoints};

/// A label set chosen at run time: `netns` first, then what `--aggregate-by` chose. The probe
/// and drop counters and the audit metrics all use it; the drop counter adds `reason` last.
pub(crate) type AggregateLabels = Vec<(&'static str, String)>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum AggregateLabel {
    Netns,
    PodUid,
    ContainerId,
    Cgroup,
    RemotePort,
    LocalPort,
}

impl AggregateLabel {
    pub(crate) const ALL: [AggregateLabel; 6] = [
        Self::Netns,
        Self::PodUid,
        Self::ContainerId,
        Self::Cgroup,
        Self::RemotePort,
        Self::LocalPort,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Netns => "netns",
            Self::PodUid => "pod_uid",
            Self::ContainerId => "container_id",
            Self::Cgroup => "cgroup",
            Self::RemotePort => "remote_port",
            Self::LocalPort => "local_port",
        }
    }

    fn is_workload_field(self) -> bool {
        matches!(self, Self::PodUid | Self::ContainerId | Self::Cgroup)
    }
}

/// The labels of `tcp_keepalive_probes_total` and `tcp_connection_drops_total`: always `netns`
/// (so totals can be checked against the namespace's own `TcpExt` counters), plus any of
/// [`AggregateLabel`]. Unknown workload values are exported as the empty string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AggregateBy {
    /// In [`AggregateLabel::ALL`] order, `Netns` first, no duplicates.
    labels: Vec<AggregateLabel>,
}

impl Default for AggregateBy {
    fn default() -> Self {
        Self {
            labels: vec![AggregateLabel::Netns],
        }
    }
}

impl fmt::Display for AggregateBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.labels.iter().map(|l| l.as_str()).collect();
        f.write_str(&names.join(","))
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("--aggregate-by: unknown label {0:?}; accepted (comma-separated): {accepted}", accepted = accepted_labels())]
pub struct UnknownAggregateLabel(pub String);

fn accepted_labels() -> String {
    AggregateBy {
        labels: AggregateLabel::ALL.to_vec(),
    }
    .to_string()
}

impl FromStr for AggregateBy {
    type Err = UnknownAggregateLabel;

    fn from_str(list: &str) -> Result<Self, Self::Err> {
        let mut labels = vec![AggregateLabel::Netns];
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let label = AggregateLabel::ALL
                .into_iter()
                .find(|l| l.as_str() == name)
                .ok_or_else(|| UnknownAggregateLabel(name.to_owned()))?;
            labels.push(label);
        }
        labels.sort_unstable();
        labels.dedup();
        Ok(Self { labels })
    }
}

impl AggregateBy {
    /// Whether any chosen label comes from the socket's cgroup.
    pub fn needs_workload(&self) -> bool {
        self.labels.iter().any(|l| l.is_workload_field())
    }

    /// The label set for one event on `endpoints`, owned by `workload`.
    pub fn labels(&self, endpoints: &Endpoints, workload: &Workload) -> AggregateLabels {
        self.labels
            .iter()
            .map(|&label| {
                let value = match label {
                    AggregateLabel::Netns => endpoints.netns.to_string(),
                    AggregateLabel::PodUid => text(workload.pod_uid()),
                    AggregateLabel::ContainerId => text(workload.container_id()),
                    AggregateLabel::Cgroup => text(workload.cgroup_path()),
                    AggregateLabel::RemotePort => endpoints.remote.port().to_string(),
                    AggregateLabel::LocalPort => endpoints.local.port().to_string(),
                };
                (label.as_str(), value)
            })
            .collect()
    }
}

/// The per-connection workload labels, in this order: `cgroup_id`, `cgroup`, `pod_uid`,
/// `container_id`, `pid`, `comm`. Every label is always present; an unknown value is the empty
/// string (which Prometheus treats like an absent label).
pub(crate) fn connection_labels(workload: &Workload) -> [(&'static str, String); 6] {
    [
        (
            "cgroup_id",
            if workload.cgroup_id == 0 {
                String::new()
            } else {
                workload.cgroup_id.to_string()
            },
        ),
        ("cgroup", text(workload.cgroup_path())),
        ("pod_uid", text(workload.pod_uid())),
        ("container_id", text(workload.container_id())),
        (
            "pid",
            workload.pid.map(|pid| pid.to_string()).unwrap_or_default(),
        ),
        ("comm", text(workload.comm.as_deref())),
    ]
}

/// A label value: the empty string when unknown.
fn text(value: Option<&str>) -> String {
    value.unwrap_or_default().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attribution::test_support::UID;

    #[test]
    fn aggregate_by_always_keeps_netns_and_rejects_unknown_labels() {
        assert_eq!(AggregateBy::default().to_string(), "netns");
        assert_eq!("".parse::<AggregateBy>().unwrap().to_string(), "netns");
        let by: AggregateBy = "remote_port, pod_uid,pod_uid".parse().unwrap();
        assert_eq!(by.to_string(), "netns,pod_uid,remote_port");
        assert!(by.needs_workload());
        assert!(
            !"netns,local_port"
                .parse::<AggregateBy>()
                .unwrap()
                .needs_workload()
        );
        let err = "netns,pod".parse::<AggregateBy>().unwrap_err().to_string();
        assert!(err.contains("--aggregate-by"), "{err}");
        assert!(err.contains("\"pod\""), "{err}");
        assert!(
            err.contains("netns,pod_uid,container_id,cgroup,remote_port,local_port"),
            "{err}"
        );
    }

    #[test]
    fn aggregate_labels_use_empty_values_for_unknown_workload_fields() {
        let endpoints = Endpoints {
            netns: 7,
            netns_cookie: 0,
            local: "127.0.0.1:40000".parse().unwrap(),
            remote: "127.0.0.1:80".parse().unwrap(),
        };
        let workload = Workload {
            cgroup: crate::attribution::names(None, Some(UID), None),
            ..Workload::default()
        };
        let by: AggregateBy = "local_port,cgroup,container_id,pod_uid,remote_port"
            .parse()
            .unwrap();
        let owned = |pairs: &[(&'static str, &str)]| -> Vec<(&'static str, String)> {
            pairs.iter().map(|(k, v)| (*k, (*v).to_owned())).collect()
        };
        assert_eq!(
            by.labels(&endpoints, &workload),
            owned(&[
                ("netns", "7"),
                ("pod_uid", UID),
                ("container_id", ""),
                ("cgroup", ""),
                ("remote_port", "80"),
                ("local_port", "40000"),
            ])
        );
        assert_eq!(
            AggregateBy::default().labels(&endpoints, &workload),
            owned(&[("netns", "7")])
        );
    }

    #[test]
    fn connection_labels_are_always_present_and_empty_when_unknown() {
        let labels = connection_labels(&Workload::default());
        assert!(labels.iter().all(|(_, v)| v.is_empty()));
        let labels = connection_labels(&Workload {
            cgroup_id: 12,
            pid: Some(34),
            ..Workload::default()
        });
        assert_eq!(labels[0], ("cgroup_id", "12".to_owned()));
        assert_eq!(labels[4], ("pid", "34".to_owned()));
    }
}
