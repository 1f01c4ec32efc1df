//! cgroup id → cgroup path, from the directory inodes of the cgroup v2 mount.

use std::{collections::HashMap, fs, os::unix::fs::DirEntryExt as _, path::PathBuf, time::Instant};

use log::warn;

use super::MIN_RESCAN_INTERVAL;

/// Where cgroup v2 is mounted, from a `/proc/mounts`-style text: the first `cgroup2` mount
/// (`/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` on hybrid ones).
pub(super) fn cgroup2_mount(mounts: &str) -> Option<PathBuf> {
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
pub(super) struct CgroupResolver {
    /// `None`: no cgroup v2 mount, paths cannot be known.
    root: Option<PathBuf>,
    paths: HashMap<u64, String>,
    last_scan: Option<Instant>,
}

impl CgroupResolver {
    pub(super) fn new(root: Option<PathBuf>) -> Self {
        Self {
            root,
            paths: HashMap::new(),
            last_scan: None,
        }
    }

    /// The cgroup's path below the mount (`/` for the root), rescanning on a miss unless the
    /// last scan was less than [`MIN_RESCAN_INTERVAL`] before `now`.
    pub(super) fn path(&mut self, cgroup_id: u64, now: Instant) -> Option<String> {
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
    pub(super) fn directory(&self, path: &str) -> Option<PathBuf> {
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::attribution::test_support::{CID, Scratch, UID, ino};

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
}
