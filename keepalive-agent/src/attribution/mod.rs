//! Who owns a connection. The kernel records give two facts captured from the socket itself
//! (never from `current`, which is meaningless in the timer softirq): the socket's cgroup v2 id
//! and the inode of its file. This module turns them into a [`Workload`]:
//!
//! - cgroup id → cgroup path, by opening the cgroup with the id as a kernfs file handle, else by
//!   walking the cgroup v2 mount (a directory's inode number *is* the cgroup id on 64-bit
//!   kernels: `kernfs_node.id`);
//! - cgroup path → Kubernetes `pod_uid` and `container_id` (pure parsing, no API access);
//! - socket inode → owning process, by finding `socket:[INO]` among `/proc/*/fd`.
//!
//! Both lookups are cached in bounded maps; a miss walks the cgroup tree or rescans `/proc` at
//! most once per second, so a busy node (thousands of cgroups, hundreds of thousands of
//! descriptors) bounds the work. Lookups read files: the pipeline runs them on its attribution
//! worker, and reads only [`Attributor::cached_cgroup`] on the event path.
//!
//! [`cgroup`] resolves ids to paths, [`kubernetes`] parses the kubelet's naming out of a path,
//! [`process`] finds the process holding a socket; [`Attributor`] combines the three.

pub(crate) mod cgroup;
pub(crate) mod kubernetes;
pub(crate) mod process;

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use prometheus_client::metrics::counter::Counter;

pub use cgroup::system_cgroup2_mount;
use cgroup::{CgroupNames, CgroupResolver};
use process::ProcessResolver;

use crate::record::decoder::SocketOwner;

/// Shortest time between two full rebuilds of a cache after a miss.
pub(crate) const MIN_RESCAN_INTERVAL: Duration = Duration::from_secs(1);

/// The workload behind one socket. Every field but the cgroup id can be unknown: the cgroup may
/// be gone, the path may not be a container's, the process may have closed the socket.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct Workload {
    /// cgroup v2 id of the socket (0 when the kernel record had none).
    pub cgroup_id: u64,
    /// The cgroup's path and the Kubernetes ids in it ([`Self::cgroup_path`], [`Self::pod_uid`],
    /// [`Self::container_id`]), shared with the cgroup cache and with every connection of that
    /// cgroup: 100 000 connections of one pod hold one copy, not 100 000.
    pub(crate) cgroup: Option<Arc<CgroupNames>>,
    pub pid: Option<u32>,
    /// `/proc/PID/comm` of that process.
    pub comm: Option<String>,
}

impl Workload {
    /// Path relative to the cgroup v2 mount, starting with `/` (as in `/proc/PID/cgroup`).
    pub fn cgroup_path(&self) -> Option<&str> {
        self.cgroup.as_ref()?.path.as_deref()
    }

    /// Kubernetes pod UID, with dashes (`kube_pod_info{uid}`).
    pub fn pod_uid(&self) -> Option<&str> {
        self.cgroup.as_ref()?.pod_uid.as_deref()
    }

    /// Container runtime id (64 hex digits), without the runtime prefix.
    pub fn container_id(&self) -> Option<&str> {
        self.cgroup.as_ref()?.container_id.as_deref()
    }

    /// Takes from `newer` what this one does not know yet; known fields stay (the process may
    /// be gone by the time a connection closes, its cgroup deleted). The cgroup's names come
    /// together, from one lookup.
    pub fn fill_unknown_from(&mut self, newer: Workload) {
        if self.cgroup_id == 0 {
            self.cgroup_id = newer.cgroup_id;
        }
        if self.cgroup.is_none() {
            self.cgroup = newer.cgroup;
        }
        if self.pid.is_none() {
            self.pid = newer.pid;
            self.comm = newer.comm;
        }
    }
}

/// The event stream's `workload` object: the cgroup's names as fields of their own, as before
/// they were shared.
impl serde::Serialize for Workload {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        let mut s = serializer.serialize_struct("Workload", 6)?;
        s.serialize_field("cgroup_id", &self.cgroup_id)?;
        s.serialize_field("cgroup_path", &self.cgroup_path())?;
        s.serialize_field("pod_uid", &self.pod_uid())?;
        s.serialize_field("container_id", &self.container_id())?;
        s.serialize_field("pid", &self.pid)?;
        s.serialize_field("comm", &self.comm)?;
        s.end()
    }
}

/// The cgroup's names of a workload built by hand (tests).
#[cfg(test)]
pub(crate) fn names(
    path: Option<&str>,
    pod_uid: Option<&str>,
    container_id: Option<&str>,
) -> Option<Arc<CgroupNames>> {
    Some(Arc::new(CgroupNames {
        path: path.map(Box::from),
        pod_uid: pod_uid.map(Box::from),
        container_id: container_id.map(Box::from),
    }))
}

#[derive(Debug)]
pub(crate) struct Attributor {
    cgroups: CgroupResolver,
    processes: Mutex<ProcessResolver>,
}

impl Attributor {
    /// `cgroup_root`: the cgroup v2 mount (`None`: paths stay unknown); `proc_root`: `/proc`.
    pub(crate) fn new(cgroup_root: Option<PathBuf>, proc_root: PathBuf) -> Self {
        Self {
            cgroups: CgroupResolver::new(cgroup_root),
            processes: Mutex::new(ProcessResolver::new(proc_root)),
        }
    }

    /// Bounds the CPU that process lookups spend reading `/proc/PID/fd` (the daemon's; a
    /// one-off listing reads what it needs): misses that found the budget spent leave the
    /// process unknown and count in `deferred`.
    pub(crate) fn with_process_read_budget(self, deferred: Counter) -> Self {
        let processes = self
            .processes
            .into_inner()
            .expect("process resolver lock poisoned")
            .with_read_budget(deferred);
        Self {
            processes: Mutex::new(processes),
            ..self
        }
    }

    /// The cgroup side only (path, pod, container): a map lookup when cached, else one
    /// lookup (by file handle, or the rate-limited walk). What aggregate labels need.
    pub(crate) fn attribute_cgroup(&self, owner: &SocketOwner) -> Workload {
        self.cgroup_workload(owner, Instant::now())
    }

    /// The cgroup side from the cache alone, never touching the filesystem (the event path's
    /// view): `None` when the socket's cgroup was not looked up yet.
    pub(crate) fn cached_cgroup(&self, owner: &SocketOwner) -> Option<Workload> {
        let names = self.cgroups.cached(owner.cgroup_id)?;
        Some(cgroup_workload(owner, names))
    }

    /// Everything known about the socket's owner, including its process. The process lookup
    /// reads `/proc`: call it for connections the agent reports, not for every event.
    pub(crate) fn attribute(&self, owner: &SocketOwner) -> Workload {
        let now = Instant::now();
        let mut workload = self.cgroup_workload(owner, now);
        let candidates = workload
            .cgroup_path()
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
        cgroup_workload(owner, self.cgroups.names(owner.cgroup_id, now))
    }

    /// `cgroup.procs` of a cgroup (empty if it is gone).
    fn cgroup_processes(&self, path: &str) -> Vec<u32> {
        let Some(dir) = self.cgroups.directory(path) else {
            return Vec::new();
        };
        crate::files::read_string_bounded(
            &dir.join("cgroup.procs"),
            crate::files::cap::CGROUP_PROCS,
        )
        .map(|procs| {
            procs
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect()
        })
        .unwrap_or_default()
    }
}

/// The cgroup side of a workload: the cached names, shared.
fn cgroup_workload(owner: &SocketOwner, names: Option<Arc<CgroupNames>>) -> Workload {
    Workload {
        cgroup_id: owner.cgroup_id,
        cgroup: names,
        pid: None,
        comm: None,
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use std::{
        fs,
        os::unix::fs::{MetadataExt as _, symlink},
        path::{Path, PathBuf},
    };

    pub(crate) fn ino(path: &Path) -> u64 {
        fs::metadata(path).expect("stat").ino()
    }

    pub(crate) const UID: &str = "1f6c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b";
    pub(crate) const CID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    /// A scratch directory removed on drop.
    pub(crate) struct Scratch(pub(crate) PathBuf);

    impl Scratch {
        pub(crate) fn new(tag: &str) -> Self {
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

    /// `<proc>/<pid>/{comm,fd/*}` with the given socket inodes open.
    pub(crate) fn fake_process(proc_root: &Path, pid: u32, comm: &str, sockets: &[u64]) {
        let dir = proc_root.join(pid.to_string());
        fs::create_dir_all(dir.join("fd")).expect("mkdir");
        fs::write(dir.join("comm"), format!("{comm}\n")).expect("write comm");
        symlink("/dev/null", dir.join("fd/0")).expect("symlink");
        for (n, ino) in sockets.iter().enumerate() {
            symlink(format!("socket:[{ino}]"), dir.join(format!("fd/{}", n + 3))).expect("symlink");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::test_support::{CID, Scratch, UID, fake_process, ino};
    use super::*;

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
            cgroup: names(Some(&format!("/{container}")), Some(UID), Some(CID)),
            pid: Some(77),
            comm: Some("app".to_owned()),
        };
        // Not looked up yet: the cache alone does not know.
        assert_eq!(attributor.cached_cgroup(&owner), None);
        assert_eq!(attributor.attribute(&owner), expected);
        assert_eq!(
            attributor.attribute_cgroup(&owner),
            Workload {
                pid: None,
                comm: None,
                ..expected.clone()
            }
        );

        assert_eq!(
            attributor.cached_cgroup(&owner),
            Some(attributor.attribute_cgroup(&owner))
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
            cgroup: names(Some("/a"), None, None),
            ..Workload::default()
        };
        known.fill_unknown_from(Workload {
            cgroup_id: 5,
            cgroup: names(Some("/b"), Some("pod"), None),
            pid: Some(9),
            comm: Some("x".to_owned()),
        });
        assert_eq!(known.cgroup_path(), Some("/a"));
        assert_eq!(
            known.pod_uid(),
            None,
            "a cgroup's names come from one lookup"
        );
        assert_eq!((known.pid, known.comm.as_deref()), (Some(9), Some("x")));
    }
}
