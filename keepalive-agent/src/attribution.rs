//! Who owns a connection. The kernel records give two facts captured from the socket itself
//! (never from `current`, which is meaningless in the timer softirq): the socket's cgroup v2 id
//! and the inode of its file. This module turns them into a [`Workload`]:
//!
//! - cgroup id → cgroup path, by walking the cgroup v2 mount (a directory's inode number *is*
//!   the cgroup id on 64-bit kernels: `kernfs_node.id`);
//! - cgroup path → Kubernetes `pod_uid` and `container_id` (pure parsing, no API access);
//! - socket inode → owning process, by finding `socket:[INO]` among `/proc/*/fd`.
//!
//! Both lookups are cached and a miss rebuilds the cache at most once per second, so a busy
//! node (thousands of cgroups, hundreds of thousands of descriptors) bounds the work.

use std::{
    collections::HashMap,
    fmt, fs,
    os::unix::fs::DirEntryExt as _,
    path::{Path, PathBuf},
    str::FromStr,
    sync::Mutex,
    time::{Duration, Instant},
};

use log::warn;

use crate::decoder::{Endpoints, SocketOwner};

/// Shortest time between two full rebuilds of a cache after a miss.
pub const MIN_RESCAN_INTERVAL: Duration = Duration::from_secs(1);

/// More cached socket owners than this and the process cache starts over (a node with that
/// many sockets re-reads `/proc` anyway on the next miss).
const MAX_CACHED_SOCKETS: usize = 1 << 20;

/// The workload behind one socket. Every field but the cgroup id can be unknown: the cgroup may
/// be gone, the path may not be a container's, the process may have closed the socket.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default, serde::Serialize)]
pub struct Workload {
    /// cgroup v2 id of the socket (0 when the kernel record had none).
    pub cgroup_id: u64,
    /// Path relative to the cgroup v2 mount, starting with `/` (as in `/proc/PID/cgroup`).
    pub cgroup_path: Option<String>,
    /// Kubernetes pod UID, with dashes (`kube_pod_info{uid}`).
    pub pod_uid: Option<String>,
    /// Container runtime id (64 hex digits), without the runtime prefix.
    pub container_id: Option<String>,
    pub pid: Option<u32>,
    /// `/proc/PID/comm` of that process.
    pub comm: Option<String>,
}

impl Workload {
    /// Takes from `newer` what this one does not know yet; known fields stay (the process may
    /// be gone by the time a connection closes, its cgroup deleted).
    pub fn fill_unknown_from(&mut self, newer: Workload) {
        if self.cgroup_id == 0 {
            self.cgroup_id = newer.cgroup_id;
        }
        fill(&mut self.cgroup_path, newer.cgroup_path);
        fill(&mut self.pod_uid, newer.pod_uid);
        fill(&mut self.container_id, newer.container_id);
        if self.pid.is_none() {
            self.pid = newer.pid;
            self.comm = newer.comm;
        }
    }
}

fn fill(slot: &mut Option<String>, newer: Option<String>) {
    if slot.is_none() {
        *slot = newer;
    }
}

/// What a cgroup path says about a Kubernetes workload.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct KubernetesIds {
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
pub fn parse_kubernetes(path: &str) -> KubernetesIds {
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

/// Where cgroup v2 is mounted, from a `/proc/mounts`-style text: the first `cgroup2` mount
/// (`/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` on hybrid ones).
pub fn cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_device, mount_point, fs_type) = (fields.next()?, fields.next()?, fields.next()?);
        // /proc/mounts escapes spaces and other separators as octal (`\040`).
        (fs_type == "cgroup2").then(|| PathBuf::from(mount_point.replace("\\040", " ")))
    })
}

/// The cgroup v2 mount of this system, if any (`None` on a pure cgroup v1 host).
pub fn system_cgroup2_mount() -> Option<PathBuf> {
    fs::read_to_string("/proc/self/mounts")
        .ok()
        .and_then(|mounts| cgroup2_mount(&mounts))
}

/// cgroup id → path, from the directory inodes of the cgroup v2 mount.
#[derive(Debug)]
pub struct CgroupResolver {
    /// `None`: no cgroup v2 mount, paths cannot be known.
    root: Option<PathBuf>,
    paths: HashMap<u64, String>,
    last_scan: Option<Instant>,
}

impl CgroupResolver {
    pub fn new(root: Option<PathBuf>) -> Self {
        Self {
            root,
            paths: HashMap::new(),
            last_scan: None,
        }
    }

    /// The cgroup's path below the mount (`/` for the root), rescanning on a miss unless the
    /// last scan was less than [`MIN_RESCAN_INTERVAL`] before `now`.
    pub fn path(&mut self, cgroup_id: u64, now: Instant) -> Option<String> {
        if cgroup_id == 0 {
            return None;
        }
        if let Some(path) = self.paths.get(&cgroup_id) {
            return Some(path.clone());
        }
        if self
            .last_scan
            .is_some_and(|last| now.duration_since(last) < MIN_RESCAN_INTERVAL)
        {
            return None;
        }
        self.last_scan = Some(now);
        self.paths = self.scan();
        self.paths.get(&cgroup_id).cloned()
    }

    /// Absolute directory of a cgroup path returned by [`Self::path`].
    pub fn directory(&self, path: &str) -> Option<PathBuf> {
        Some(self.root.as_ref()?.join(path.trim_start_matches('/')))
    }

    fn scan(&self) -> HashMap<u64, String> {
        let mut paths = HashMap::new();
        let Some(root) = &self.root else {
            return paths;
        };
        match fs::metadata(root) {
            Ok(meta) => {
                paths.insert(std::os::unix::fs::MetadataExt::ino(&meta), "/".to_owned());
            }
            Err(err) => {
                warn!("cannot read the cgroup v2 mount {}: {err}", root.display());
                return paths;
            }
        }
        // Iterative walk: a cgroup tree can be deep, and readdir's d_ino is the kernfs id
        // already, so no stat per directory.
        let mut pending = vec![(root.clone(), String::new())];
        while let Some((dir, relative)) = pending.pop() {
            // A cgroup removed mid-walk is simply not there any more.
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                    continue;
                };
                let path = format!("{relative}/{name}");
                paths.insert(entry.ino(), path.clone());
                pending.push((entry.path(), path));
            }
        }
        paths
    }
}

/// The process holding a socket open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Process {
    pub pid: u32,
    pub comm: Option<String>,
}

/// socket inode → process, from the `socket:[INO]` links in `/proc/PID/fd`.
#[derive(Debug)]
pub struct ProcessResolver {
    proc_root: PathBuf,
    /// socket inode → pid (the lowest pid when several processes share the socket).
    owners: HashMap<u64, u32>,
    last_scan: Option<Instant>,
}

impl ProcessResolver {
    pub fn new(proc_root: PathBuf) -> Self {
        Self {
            proc_root,
            owners: HashMap::new(),
            last_scan: None,
        }
    }

    /// The process that has the socket open. On a miss, looks first among `candidates` (the
    /// processes of the socket's cgroup: cheap and not rate limited), then rebuilds the
    /// whole-host cache unless it was rebuilt less than [`MIN_RESCAN_INTERVAL`] before `now`.
    pub fn owner(&mut self, socket_ino: u64, candidates: &[u32], now: Instant) -> Option<Process> {
        if socket_ino == 0 {
            return None;
        }
        let pid = match self.owners.get(&socket_ino) {
            Some(&pid) => Some(pid),
            None => self
                .search(socket_ino, candidates)
                .or_else(|| self.rescan(socket_ino, now)),
        }?;
        let comm = fs::read_to_string(self.proc_root.join(pid.to_string()).join("comm"))
            .ok()
            .map(|comm| comm.trim_end_matches('\n').to_owned());
        Some(Process { pid, comm })
    }

    fn search(&mut self, socket_ino: u64, candidates: &[u32]) -> Option<u32> {
        let mut sorted = candidates.to_vec();
        sorted.sort_unstable();
        let pid = sorted
            .into_iter()
            .find(|&pid| self.sockets_of(pid).any(|ino| ino == socket_ino))?;
        if self.owners.len() >= MAX_CACHED_SOCKETS {
            self.owners.clear();
        }
        self.owners.insert(socket_ino, pid);
        Some(pid)
    }

    fn rescan(&mut self, socket_ino: u64, now: Instant) -> Option<u32> {
        if self
            .last_scan
            .is_some_and(|last| now.duration_since(last) < MIN_RESCAN_INTERVAL)
        {
            return None;
        }
        self.last_scan = Some(now);
        let mut owners = HashMap::new();
        let mut pids: Vec<u32> = fs::read_dir(&self.proc_root)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
            .collect();
        // Lowest pid first, so a socket shared after fork() maps to the parent.
        pids.sort_unstable();
        for pid in pids {
            for ino in self.sockets_of(pid) {
                owners.entry(ino).or_insert(pid);
            }
        }
        self.owners = owners;
        self.owners.get(&socket_ino).copied()
    }

    /// Socket inodes among the process's descriptors (none if it is gone or not readable).
    fn sockets_of(&self, pid: u32) -> impl Iterator<Item = u64> {
        let fd_dir = self.proc_root.join(pid.to_string()).join("fd");
        fs::read_dir(fd_dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| parse_socket_link(&fs::read_link(entry.path()).ok()?))
    }
}

/// `socket:[12345]` → 12345.
fn parse_socket_link(target: &Path) -> Option<u64> {
    target
        .to_str()?
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// Both resolvers, shared by whoever reports connections.
#[derive(Debug)]
pub struct Attributor {
    cgroups: Mutex<CgroupResolver>,
    processes: Mutex<ProcessResolver>,
}

impl Attributor {
    /// `cgroup_root`: the cgroup v2 mount (`None`: paths stay unknown); `proc_root`: `/proc`.
    pub fn new(cgroup_root: Option<PathBuf>, proc_root: PathBuf) -> Self {
        Self {
            cgroups: Mutex::new(CgroupResolver::new(cgroup_root)),
            processes: Mutex::new(ProcessResolver::new(proc_root)),
        }
    }

    /// The cgroup side only (path, pod, container): cheap, a map lookup when cached. What
    /// aggregate labels need.
    pub fn attribute_cgroup(&self, owner: &SocketOwner) -> Workload {
        self.cgroup_workload(owner, Instant::now())
    }

    /// Everything known about the socket's owner, including its process. The process lookup
    /// reads `/proc`: call it for connections the agent reports, not for every event.
    pub fn attribute(&self, owner: &SocketOwner) -> Workload {
        let now = Instant::now();
        let mut workload = self.cgroup_workload(owner, now);
        let candidates = workload
            .cgroup_path
            .as_deref()
            // Every process is a candidate in the root cgroup: leave that to the rate-limited
            // whole-host scan.
            .filter(|path| *path != "/")
            .map(|path| self.cgroup_processes(path))
            .unwrap_or_default();
        let process = self
            .processes
            .lock()
            .expect("process resolver lock poisoned")
            .owner(owner.socket_ino, &candidates, now);
        if let Some(process) = process {
            workload.pid = Some(process.pid);
            workload.comm = process.comm;
        }
        workload
    }

    fn cgroup_workload(&self, owner: &SocketOwner, now: Instant) -> Workload {
        let cgroup_path = self
            .cgroups
            .lock()
            .expect("cgroup resolver lock poisoned")
            .path(owner.cgroup_id, now);
        let ids = cgroup_path
            .as_deref()
            .map(parse_kubernetes)
            .unwrap_or_default();
        Workload {
            cgroup_id: owner.cgroup_id,
            cgroup_path,
            pod_uid: ids.pod_uid,
            container_id: ids.container_id,
            pid: None,
            comm: None,
        }
    }

    /// `cgroup.procs` of a cgroup (empty if it is gone).
    fn cgroup_processes(&self, path: &str) -> Vec<u32> {
        let Some(dir) = self
            .cgroups
            .lock()
            .expect("cgroup resolver lock poisoned")
            .directory(path)
        else {
            return Vec::new();
        };
        fs::read_to_string(dir.join("cgroup.procs"))
            .map(|procs| {
                procs
                    .lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// A label the aggregate counters can be split by (`--aggregate-by`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AggregateLabel {
    Netns,
    PodUid,
    ContainerId,
    Cgroup,
    RemotePort,
    LocalPort,
}

impl AggregateLabel {
    pub const ALL: [AggregateLabel; 6] = [
        Self::Netns,
        Self::PodUid,
        Self::ContainerId,
        Self::Cgroup,
        Self::RemotePort,
        Self::LocalPort,
    ];

    pub fn as_str(self) -> &'static str {
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
    pub fn labels(
        &self,
        endpoints: &Endpoints,
        workload: &Workload,
    ) -> Vec<(&'static str, String)> {
        let text = |value: &Option<String>| value.clone().unwrap_or_default();
        self.labels
            .iter()
            .map(|&label| {
                let value = match label {
                    AggregateLabel::Netns => endpoints.netns.to_string(),
                    AggregateLabel::PodUid => text(&workload.pod_uid),
                    AggregateLabel::ContainerId => text(&workload.container_id),
                    AggregateLabel::Cgroup => text(&workload.cgroup_path),
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
pub fn connection_labels(workload: &Workload) -> [(&'static str, String); 6] {
    let text = |value: &Option<String>| value.clone().unwrap_or_default();
    [
        (
            "cgroup_id",
            if workload.cgroup_id == 0 {
                String::new()
            } else {
                workload.cgroup_id.to_string()
            },
        ),
        ("cgroup", text(&workload.cgroup_path)),
        ("pod_uid", text(&workload.pod_uid)),
        ("container_id", text(&workload.container_id)),
        (
            "pid",
            workload.pid.map(|pid| pid.to_string()).unwrap_or_default(),
        ),
        ("comm", text(&workload.comm)),
    ]
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt as _, symlink};

    use super::*;

    const UID: &str = "1f6c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b";
    const CID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

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

    #[test]
    fn finds_the_cgroup2_mount_on_unified_and_hybrid_hosts() {
        let unified = "sysfs /sys sysfs rw 0 0\ncgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n";
        assert_eq!(
            cgroup2_mount(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        let hybrid = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            cgroup2_mount("cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n"),
            None
        );
    }

    /// A scratch directory removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Self {
            static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!(
                "keepalive-attribution-{tag}-{}-{n}",
                std::process::id()
            ));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).expect("create scratch dir");
            Self(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn ino(path: &Path) -> u64 {
        fs::metadata(path).expect("stat").ino()
    }

    #[test]
    fn cgroup_ids_resolve_to_paths_and_misses_rescan_at_most_once_per_second() {
        let scratch = Scratch::new("cgroup");
        let root = &scratch.0;
        let pod = format!("kubepods.slice/kubepods-pod{}.slice", UID.replace('-', "_"));
        let container = format!("{pod}/cri-containerd-{CID}.scope");
        fs::create_dir_all(root.join(&container)).expect("mkdir");
        // Files in cgroup directories (cgroup.procs, …) are not cgroups.
        fs::write(root.join(&pod).join("cgroup.procs"), "").expect("write");

        let mut resolver = CgroupResolver::new(Some(root.clone()));
        let t0 = Instant::now();
        let container_id = ino(&root.join(&container));
        assert_eq!(
            resolver.path(container_id, t0),
            Some(format!("/{container}"))
        );
        assert_eq!(resolver.path(ino(root), t0), Some("/".to_owned()));
        assert_eq!(resolver.path(0, t0), None);

        // A cgroup created after the scan: not found within the second, found after it.
        let late = root.join("late.slice");
        fs::create_dir(&late).expect("mkdir");
        let late_id = ino(&late);
        assert_eq!(
            resolver.path(late_id, t0 + Duration::from_millis(999)),
            None
        );
        assert_eq!(
            resolver.path(late_id, t0 + MIN_RESCAN_INTERVAL),
            Some("/late.slice".to_owned())
        );

        // Without a cgroup v2 mount nothing resolves.
        assert_eq!(CgroupResolver::new(None).path(container_id, t0), None);
    }

    /// `<proc>/<pid>/{comm,fd/*}` with the given socket inodes open.
    fn fake_process(proc_root: &Path, pid: u32, comm: &str, sockets: &[u64]) {
        let dir = proc_root.join(pid.to_string());
        fs::create_dir_all(dir.join("fd")).expect("mkdir");
        fs::write(dir.join("comm"), format!("{comm}\n")).expect("write comm");
        symlink("/dev/null", dir.join("fd/0")).expect("symlink");
        for (n, ino) in sockets.iter().enumerate() {
            symlink(format!("socket:[{ino}]"), dir.join(format!("fd/{}", n + 3))).expect("symlink");
        }
    }

    #[test]
    fn socket_inodes_resolve_to_the_lowest_pid_holding_them_and_its_comm() {
        let scratch = Scratch::new("proc");
        let proc_root = &scratch.0;
        fake_process(proc_root, 300, "worker", &[1001, 1002]);
        fake_process(proc_root, 20, "server", &[1002]);
        fs::create_dir_all(proc_root.join("self")).expect("mkdir");

        let mut resolver = ProcessResolver::new(proc_root.clone());
        let t0 = Instant::now();
        let owner = |pid, comm: &str| {
            Some(Process {
                pid,
                comm: Some(comm.to_owned()),
            })
        };
        assert_eq!(resolver.owner(1001, &[], t0), owner(300, "worker"));
        // Shared after fork(): the parent (lowest pid) owns it.
        assert_eq!(resolver.owner(1002, &[], t0), owner(20, "server"));
        assert_eq!(resolver.owner(0, &[], t0), None);

        // A socket opened after the scan: the whole-host rescan waits a second...
        fake_process(proc_root, 400, "late", &[1003]);
        let soon = t0 + Duration::from_millis(500);
        assert_eq!(resolver.owner(1003, &[], soon), None);
        // ...but a look among the socket's cgroup's processes does not.
        assert_eq!(resolver.owner(1003, &[20, 400], soon), owner(400, "late"));
        fake_process(proc_root, 500, "later", &[1004]);
        assert_eq!(
            resolver.owner(1004, &[], t0 + MIN_RESCAN_INTERVAL),
            owner(500, "later")
        );

        // The process exited after the lookup was cached: the pid stays, its comm is unknown.
        fs::remove_dir_all(proc_root.join("500")).expect("rm");
        assert_eq!(
            resolver.owner(1004, &[], t0 + MIN_RESCAN_INTERVAL),
            Some(Process {
                pid: 500,
                comm: None
            })
        );
    }

    #[test]
    fn attributor_combines_cgroup_path_pod_container_and_process() {
        let cgroups = Scratch::new("attr-cgroup");
        let procs = Scratch::new("attr-proc");
        let container = format!(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/crio-{CID}.scope",
            UID.replace('-', "_")
        );
        let dir = cgroups.0.join(&container);
        fs::create_dir_all(&dir).expect("mkdir");
        fs::write(dir.join("cgroup.procs"), "77\n").expect("write");
        fake_process(&procs.0, 77, "app", &[4242]);

        let attributor = Attributor::new(Some(cgroups.0.clone()), procs.0.clone());
        let owner = SocketOwner {
            cgroup_id: ino(&dir),
            socket_ino: 4242,
        };
        let expected = Workload {
            cgroup_id: owner.cgroup_id,
            cgroup_path: Some(format!("/{container}")),
            pod_uid: Some(UID.to_owned()),
            container_id: Some(CID.to_owned()),
            pid: Some(77),
            comm: Some("app".to_owned()),
        };
        assert_eq!(attributor.attribute(&owner), expected);
        assert_eq!(
            attributor.attribute_cgroup(&owner),
            Workload {
                pid: None,
                comm: None,
                ..expected.clone()
            }
        );

        // Orphan sockets (no file) and unknown cgroups keep what can be known.
        let orphan = SocketOwner {
            cgroup_id: 999_999_999,
            socket_ino: 0,
        };
        assert_eq!(
            attributor.attribute(&orphan),
            Workload {
                cgroup_id: 999_999_999,
                ..Workload::default()
            }
        );
    }

    #[test]
    fn filling_keeps_what_was_known() {
        let mut known = Workload {
            cgroup_id: 5,
            cgroup_path: Some("/a".to_owned()),
            ..Workload::default()
        };
        known.fill_unknown_from(Workload {
            cgroup_id: 5,
            cgroup_path: None,
            pid: Some(9),
            comm: Some("x".to_owned()),
            ..Workload::default()
        });
        assert_eq!(known.cgroup_path.as_deref(), Some("/a"));
        assert_eq!((known.pid, known.comm.as_deref()), (Some(9), Some("x")));
    }

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
            local: "127.0.0.1:40000".parse().unwrap(),
            remote: "127.0.0.1:80".parse().unwrap(),
        };
        let workload = Workload {
            pod_uid: Some(UID.to_owned()),
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
