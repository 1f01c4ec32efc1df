//! Kubernetes workload ids from a cgroup path, as the kubelet lays them out: no API access.

/// What a cgroup path says about a Kubernetes workload.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub(crate) struct KubernetesIds {
    pub pod_uid: Option<String>,
    pub container_id: Option<String>,
}

/// Parses the pod UID and container id out of a cgroup path laid out by the kubelet, for both
/// cgroup drivers:
///
/// - systemd: `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<UID with _>.slice/cri-containerd-<ID>.scope`
///   (`kubepods-pod<UID>.slice` for Guaranteed pods; `crio-<ID>.scope`, `docker-<ID>.scope`);
/// - cgroupfs: `/kubepods/burstable/pod<UID>/<ID>` or `/kubepods/pod<UID>/<ID>` (CRI-O:
///   `crio-<ID>`).
///
/// Ancestors above the kubepods hierarchy are ignored (kind and nested kubelets add some).
/// Cgroups nested inside the container's own keep the container's ids.
pub(crate) fn parse_kubernetes(path: &str) -> KubernetesIds {
    let mut ids = KubernetesIds::default();
    let mut under_kubepods = false;
    for segment in path.split('/').filter(|s| !s.is_empty()) {
        if ids.pod_uid.is_none() {
            if segment == "kubepods" || segment.ends_with("kubepods.slice") {
                under_kubepods = true;
            }
            ids.pod_uid = systemd_pod_uid(segment).or_else(|| {
                under_kubepods
                    .then(|| segment.strip_prefix("pod").and_then(normalise_pod_uid))
                    .flatten()
            });
            continue;
        }
        // The first cgroup below the pod's is the container's (or the sandbox's).
        ids.container_id = container_id(segment);
        break;
    }
    ids
}

/// `…kubepods[-burstable|-besteffort]-pod<uid>.slice` → uid.
fn systemd_pod_uid(segment: &str) -> Option<String> {
    let name = segment.strip_suffix(".slice")?;
    let (qos, uid) = name.rsplit_once("-pod")?;
    let qos_known = ["kubepods", "kubepods-burstable", "kubepods-besteffort"]
        .iter()
        .any(|q| qos.ends_with(q));
    if !qos_known {
        return None;
    }
    normalise_pod_uid(uid)
}

/// A pod UID is hex digits and dashes (a static pod's is a bare hex hash); the systemd driver
/// writes `_` for `-` because `-` separates slice levels.
fn normalise_pod_uid(uid: &str) -> Option<String> {
    let valid = uid.len() >= 8
        && uid
            .bytes()
            .all(|b| b.is_ascii_hexdigit() || b == b'-' || b == b'_');
    valid.then(|| uid.replace('_', "-").to_ascii_lowercase())
}

/// Runtime prefixes kubelet's container runtimes put before the container id.
const RUNTIME_PREFIXES: [&str; 4] = ["cri-containerd-", "crio-", "docker-", "libpod-"];

/// `cri-containerd-<id>.scope`, `crio-<id>.scope`, `docker-<id>.scope`, `<id>`, `crio-<id>` →
/// id. CRI-O's `crio-conmon-<id>.scope` is the monitor, not the container.
fn container_id(segment: &str) -> Option<String> {
    let name = segment.strip_suffix(".scope").unwrap_or(segment);
    let id = RUNTIME_PREFIXES
        .iter()
        .find_map(|prefix| name.strip_prefix(prefix))
        .unwrap_or(name);
    let valid = id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit());
    valid.then(|| id.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attribution::test_support::{CID, UID};

    fn ids(pod: Option<&str>, container: Option<&str>) -> KubernetesIds {
        KubernetesIds {
            pod_uid: pod.map(str::to_owned),
            container_id: container.map(str::to_owned),
        }
    }

    #[test]
    fn systemd_driver_paths_give_pod_uid_with_dashes_and_container_id() {
        let uid = UID.replace('-', "_");
        for (qos_dir, pod_slice) in [
            (
                "kubepods-burstable.slice/",
                format!("kubepods-burstable-pod{uid}.slice"),
            ),
            (
                "kubepods-besteffort.slice/",
                format!("kubepods-besteffort-pod{uid}.slice"),
            ),
            // Guaranteed pods sit directly under kubepods.slice.
            ("", format!("kubepods-pod{uid}.slice")),
        ] {
            for scope in [
                format!("cri-containerd-{CID}.scope"),
                format!("crio-{CID}.scope"),
                format!("docker-{CID}.scope"),
            ] {
                let path = format!("/kubepods.slice/{qos_dir}{pod_slice}/{scope}");
                assert_eq!(parse_kubernetes(&path), ids(Some(UID), Some(CID)), "{path}");
            }
        }
    }

    #[test]
    fn cgroupfs_driver_paths_give_pod_uid_and_container_id() {
        for path in [
            format!("/kubepods/burstable/pod{UID}/{CID}"),
            format!("/kubepods/besteffort/pod{UID}/{CID}"),
            format!("/kubepods/pod{UID}/{CID}"),
            format!("/kubepods/burstable/pod{UID}/crio-{CID}"),
        ] {
            assert_eq!(parse_kubernetes(&path), ids(Some(UID), Some(CID)), "{path}");
        }
    }

    #[test]
    fn pod_level_cgroups_and_nested_container_cgroups() {
        let uid = UID.replace('-', "_");
        // The pod's own cgroup: no container.
        assert_eq!(
            parse_kubernetes(&format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid}.slice"
            )),
            ids(Some(UID), None)
        );
        // Cgroups a container creates inside its own keep the container's id.
        assert_eq!(
            parse_kubernetes(&format!("/kubepods/pod{UID}/{CID}/init.scope")),
            ids(Some(UID), Some(CID))
        );
        // CRI-O's monitor process is not the container.
        assert_eq!(
            parse_kubernetes(&format!(
                "/kubepods.slice/kubepods-pod{uid}.slice/crio-conmon-{CID}.scope"
            )),
            ids(Some(UID), None)
        );
    }

    #[test]
    fn kubepods_below_other_slices_is_still_recognised() {
        let uid = UID.replace('-', "_");
        // kind / nested kubelets, and the integration test's own parent slice.
        let kind = format!(
            "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{uid}.slice/cri-containerd-{CID}.scope"
        );
        assert_eq!(parse_kubernetes(&kind), ids(Some(UID), Some(CID)));
        let test = format!(
            "/kat-test-1.slice/kubepods-burstable-pod{uid}.slice/cri-containerd-{CID}.scope"
        );
        assert_eq!(parse_kubernetes(&test), ids(Some(UID), Some(CID)));
        // Upper-case hex is normalised.
        let upper = format!("/kubepods/pod{}/{}", UID.to_uppercase(), CID.to_uppercase());
        assert_eq!(parse_kubernetes(&upper), ids(Some(UID), Some(CID)));
    }

    #[test]
    fn non_kubernetes_paths_have_no_pod() {
        for path in [
            "/",
            "/system.slice/sshd.service",
            "/user.slice/user-1000.slice/session-2.scope",
            // `pod…` outside a kubepods hierarchy is not a pod.
            "/pod12345678/abc",
            "/kubepods.slice/kubepods-burstable.slice",
            "/kubepods/burstable/podnot-hex!/x",
        ] {
            assert_eq!(parse_kubernetes(path), KubernetesIds::default(), "{path}");
        }
        // A container-looking segment without a pod above it.
        assert_eq!(
            parse_kubernetes(&format!("/system.slice/docker-{CID}.scope")),
            KubernetesIds::default()
        );
        // Container ids must be 64 hex digits.
        assert_eq!(
            parse_kubernetes(&format!("/kubepods/pod{UID}/cri-containerd-abc.scope")),
            ids(Some(UID), None)
        );
    }
}
