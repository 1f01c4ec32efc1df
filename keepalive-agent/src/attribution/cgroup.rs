//! cgroup id → cgroup path: by file handle where the kernel allows it, else from the directory
//! inodes of the cgroup v2 mount.

use std::{
    collections::HashMap,
    fs,
    num::NonZeroUsize,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::fs::DirEntryExt as _,
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    time::Instant,
};

use log::{debug, warn};
use lru::LruCache;

use super::MIN_RESCAN_INTERVAL;

/// Where cgroup v2 is mounted, from a `/proc/mounts`-style text: the first `cgroup2` mount
/// (`/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` on hybrid ones).
pub(crate) fn cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_device, mount_point, fs_type) = (fields.next()?, fields.next()?, fields.next()?);
        // /proc/mounts escapes spaces and other separators as octal (`\040`).
        (fs_type == "cgroup2").then(|| PathBuf::from(mount_point.replace("\\040", " ")))
    })
}

/// The cgroup v2 mount of this system, if any (`None` on a pure cgroup v1 host).
pub fn system_cgroup2_mount() -> Option<PathBuf> {
    crate::files::read_string_bounded(Path::new("/proc/self/mounts"), crate::files::cap::MOUNTS)
        .ok()
        .and_then(|mounts| cgroup2_mount(&mounts))
}

/// More cgroups than this in the cache and the least recently used are forgotten (a node runs a
/// few thousand; a forgotten one is looked up again on its next socket).
const MAX_CACHED_CGROUPS: usize = 65_536;

/// `CGROUP2_SUPER_MAGIC` (include/uapi/linux/magic.h): handles are only tried on a real cgroup2
/// mount (on another filesystem a kernfs handle means nothing).
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// `FILEID_KERNFS` (include/linux/exportfs.h): the handle type `kernfs_encode_fh` gives a cgroup
/// directory, whose 8 handle bytes are the kernfs node id, which is the cgroup id.
const FILEID_KERNFS: i32 = 0xfe;

/// What a cgroup's path says: the path and the Kubernetes ids in it, parsed once when the
/// cgroup enters the cache and shared (one `Arc` for the three, so a workload's clone or drop is
/// one reference count) by every workload of that cgroup.
#[derive(Debug, Default, PartialEq, Eq, Hash)]
pub(crate) struct CgroupNames {
    /// Below the mount (`/` for the root).
    pub(crate) path: Option<Box<str>>,
    pub(crate) pod_uid: Option<Box<str>>,
    pub(crate) container_id: Option<Box<str>>,
}

impl CgroupNames {
    fn of(path: String) -> Arc<Self> {
        let ids = super::kubernetes::parse_kubernetes(&path);
        Arc::new(Self {
            path: Some(path.into()),
            pod_uid: ids.pod_uid.map(Box::from),
            container_id: ids.container_id.map(Box::from),
        })
    }
}

/// What a lookup found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Lookup {
    /// The cgroup's names.
    Found(Arc<CgroupNames>),
    /// The cgroup is gone, or not below this mount: ids are never reused, so this is final.
    Absent,
    /// Not known yet: the fallback walk ran less than [`MIN_RESCAN_INTERVAL`] ago.
    NotYet,
}

/// cgroup id → path. Lookups go through the kernel by file handle where it allows it (one
/// `open_by_handle_at` per new cgroup), else walk the mount at most once per second. Two locks:
/// the cache's is held for a map access only, so the event path can read it while a lookup
/// reads the filesystem under the other.
#[derive(Debug)]
pub(super) struct CgroupResolver {
    /// `None`: no cgroup v2 mount, paths cannot be known.
    root: Option<PathBuf>,
    /// Positive and negative results (`None`: the cgroup is gone).
    cache: Mutex<LruCache<u64, Option<Arc<CgroupNames>>>>,
    lookups: Mutex<Lookups>,
}

#[derive(Debug)]
struct Lookups {
    /// `None` until first used; `Some(None)` when handles do not work here.
    handles: Option<Option<HandleLookup>>,
    last_scan: Option<Instant>,
}

impl CgroupResolver {
    pub(super) fn new(root: Option<PathBuf>) -> Self {
        Self {
            root,
            cache: Mutex::new(LruCache::new(
                NonZeroUsize::new(MAX_CACHED_CGROUPS).expect("non-zero"),
            )),
            lookups: Mutex::new(Lookups {
                handles: None,
                last_scan: None,
            }),
        }
    }

    fn cache(&self) -> MutexGuard<'_, LruCache<u64, Option<Arc<CgroupNames>>>> {
        self.cache.lock().expect("cgroup cache lock poisoned")
    }

    /// From the cache only, never touching the filesystem: `None` when the id was not looked
    /// up yet, `Some(None)` when it cannot be resolved.
    pub(super) fn cached(&self, cgroup_id: u64) -> Option<Option<Arc<CgroupNames>>> {
        if cgroup_id == 0 || self.root.is_none() {
            return Some(None);
        }
        self.cache().get(&cgroup_id).cloned()
    }

    /// The cgroup's names (its path below the mount, `/` for the root), looked up on a miss.
    pub(super) fn names(&self, cgroup_id: u64, now: Instant) -> Option<Arc<CgroupNames>> {
        match self.lookup(cgroup_id, now) {
            Lookup::Found(names) => Some(names),
            Lookup::Absent | Lookup::NotYet => None,
        }
    }

    /// The cgroup's path below the mount, looked up on a miss.
    #[cfg(test)]
    pub(super) fn path(&self, cgroup_id: u64, now: Instant) -> Option<String> {
        self.names(cgroup_id, now)?
            .path
            .as_deref()
            .map(str::to_owned)
    }

    /// [`Self::names`], saying why they are unknown.
    pub(super) fn lookup(&self, cgroup_id: u64, now: Instant) -> Lookup {
        let Some(root) = &self.root else {
            return Lookup::Absent;
        };
        if cgroup_id == 0 {
            return Lookup::Absent;
        }
        if let Some(known) = self.cached(cgroup_id) {
            return known.map_or(Lookup::Absent, Lookup::Found);
        }
        let mut lookups = self.lookups.lock().expect("cgroup lookup lock poisoned");
        // Another thread may have looked it up while this one waited for the lock.
        if let Some(known) = self.cached(cgroup_id) {
            return known.map_or(Lookup::Absent, Lookup::Found);
        }
        let handles = lookups
            .handles
            .get_or_insert_with(|| HandleLookup::open(root));
        if let Some(handle) = handles {
            match handle.path(cgroup_id) {
                Ok(path) => {
                    let names = path.map(CgroupNames::of);
                    self.cache().put(cgroup_id, names.clone());
                    return names.map_or(Lookup::Absent, Lookup::Found);
                }
                Err(err) if err.is_permanent() => {
                    warn!(
                        "cannot look cgroups up by file handle under {} ({err}): walking the tree instead, at most once per second",
                        root.display()
                    );
                    *handles = None;
                }
                // Out of descriptors or memory: this lookup walks, the next tries again.
                Err(err) => debug!("cgroup {cgroup_id} by file handle: {err}"),
            }
        }
        if lookups
            .last_scan
            .is_some_and(|last| now.duration_since(last) < MIN_RESCAN_INTERVAL)
        {
            return Lookup::NotYet;
        }
        lookups.last_scan = Some(now);
        let mut found = None;
        let mut cache = self.cache();
        for (id, path) in scan(root) {
            let names = CgroupNames::of(path);
            if id == cgroup_id {
                found = Some(names.clone());
            }
            cache.put(id, Some(names));
        }
        // The socket's cgroup existed before the walk started: not found means deleted.
        cache.put(cgroup_id, found.clone());
        found.map_or(Lookup::Absent, Lookup::Found)
    }

    /// Absolute directory of a cgroup path returned by [`Self::path`].
    pub(super) fn directory(&self, path: &str) -> Option<PathBuf> {
        Some(self.root.as_ref()?.join(path.trim_start_matches('/')))
    }
}

/// Every cgroup below `root`: id → path.
fn scan(root: &Path) -> HashMap<u64, String> {
    let mut paths = HashMap::new();
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
    let mut pending = vec![(root.to_path_buf(), String::new())];
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

/// Why a lookup by file handle cannot work here (then the walk is used).
#[derive(Debug, thiserror::Error)]
pub(super) enum HandleError {
    #[error("open_by_handle_at: {0}")]
    Open(std::io::Error),
    #[error("reading the opened cgroup's path: {0}")]
    Readlink(std::io::Error),
}

impl HandleError {
    /// Whether handles cannot work here at all (no `CAP_DAC_READ_SEARCH`, a seccomp filter, a
    /// kernel without kernfs handles), rather than this one call failing.
    fn is_permanent(&self) -> bool {
        match self {
            Self::Open(err) => matches!(
                err.raw_os_error(),
                Some(libc::EPERM | libc::EACCES | libc::EOPNOTSUPP | libc::EINVAL | libc::ENOSYS)
            ),
            // No /proc/self/fd to name the opened cgroup by.
            Self::Readlink(_) => true,
        }
    }
}

/// cgroup id → path through the kernel: `open_by_handle_at(2)` on the mount with the id as a
/// kernfs file handle (what `name_to_handle_at` returns for a cgroup directory), then the path
/// of the opened directory from `/proc/self/fd`. Needs `CAP_DAC_READ_SEARCH`.
#[derive(Debug)]
struct HandleLookup {
    mount: OwnedFd,
    /// The mount as `/proc/self/fd` names it: what the opened cgroups' paths start with.
    mount_path: String,
}

/// `struct file_handle` with its 8 bytes of kernfs handle.
#[repr(C)]
struct KernfsHandle {
    handle_bytes: u32,
    handle_type: i32,
    id: [u8; 8],
}

impl KernfsHandle {
    fn new(cgroup_id: u64) -> Self {
        Self {
            handle_bytes: 8,
            handle_type: FILEID_KERNFS,
            // kernfs_encode_fh stores the id as a native u64.
            id: cgroup_id.to_ne_bytes(),
        }
    }
}

impl HandleLookup {
    /// `None` when `root` is not a cgroup2 mount this process can open.
    fn open(root: &Path) -> Option<Self> {
        let dir = fs::File::open(root).ok()?;
        // SAFETY: statfs is plain old data; all-zero is a valid value.
        let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: the descriptor is open and `stat` is a live statfs.
        let rc = unsafe { libc::fstatfs(dir.as_raw_fd(), &raw mut stat) };
        // `as`: f_type is a signed word on glibc, unsigned on musl.
        if rc != 0 || stat.f_type as i64 != CGROUP2_SUPER_MAGIC {
            return None;
        }
        let mount: OwnedFd = dir.into();
        let mount_path = fd_path(&mount).ok()?;
        Some(Self { mount, mount_path })
    }

    /// `Ok(None)`: no such cgroup (deleted), or one outside this mount.
    fn path(&self, cgroup_id: u64) -> Result<Option<String>, HandleError> {
        let mut handle = KernfsHandle::new(cgroup_id);
        // SAFETY: `handle` is a `struct file_handle` followed by its `handle_bytes` bytes; the
        // kernel only reads it. The returned descriptor is owned below.
        let fd = unsafe {
            libc::open_by_handle_at(
                self.mount.as_raw_fd(),
                (&raw mut handle).cast::<libc::file_handle>(),
                libc::O_PATH | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            let err = std::io::Error::last_os_error();
            // kernfs_fh_to_dentry: no node with this id any more.
            if err.raw_os_error() == Some(libc::ESTALE) {
                return Ok(None);
            }
            return Err(HandleError::Open(err));
        }
        // SAFETY: open_by_handle_at returned a new descriptor nobody else owns.
        let cgroup = unsafe { OwnedFd::from_raw_fd(fd) };
        let link = fd_path(&cgroup).map_err(HandleError::Readlink)?;
        Ok(path_below_mount(&link, &self.mount_path))
    }
}

fn fd_path(fd: &OwnedFd) -> std::io::Result<String> {
    let link = fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
    Ok(link.to_string_lossy().into_owned())
}

/// The cgroup path (`/` for the root) of an opened cgroup directory that `/proc/self/fd` names
/// `link`; `None` for one that was removed meanwhile (`d_path` appends ` (deleted)`) or lies
/// outside the mount (a bind of a subtree cannot name it).
fn path_below_mount(link: &str, mount_path: &str) -> Option<String> {
    if link.ends_with(" (deleted)") {
        return None;
    }
    let rest = link.strip_prefix(mount_path.trim_end_matches('/'))?;
    match rest {
        "" => Some("/".to_owned()),
        rest if rest.starts_with('/') => Some(rest.to_owned()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::attribution::system_cgroup2_mount;
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

        let resolver = CgroupResolver::new(Some(root.clone()));
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

    #[test]
    fn the_cache_answers_without_a_lookup_and_remembers_deleted_cgroups() {
        let scratch = Scratch::new("cgroup-cache");
        let root = &scratch.0;
        fs::create_dir(root.join("a.slice")).expect("mkdir");
        let a = ino(&root.join("a.slice"));
        let resolver = CgroupResolver::new(Some(root.clone()));
        // Nothing looked up yet: the event path learns that it must ask the worker.
        assert_eq!(resolver.cached(a), None);
        // Socket records without a cgroup, or no mount: known unknowable, nothing to ask.
        assert_eq!(resolver.cached(0), Some(None));
        assert_eq!(CgroupResolver::new(None).cached(a), Some(None));

        let t0 = Instant::now();
        assert_eq!(
            resolver.lookup(a, t0),
            Lookup::Found(CgroupNames::of("/a.slice".to_owned()))
        );
        assert_eq!(
            resolver.cached(a),
            Some(Some(CgroupNames::of("/a.slice".to_owned())))
        );
        // An id the walk did not find is gone for good (cgroup ids are never reused): cached
        // as such, so its later records need no lookup either.
        let gone = u64::MAX - 1;
        assert_eq!(
            resolver.lookup(gone, t0 + MIN_RESCAN_INTERVAL),
            Lookup::Absent
        );
        assert_eq!(resolver.cached(gone), Some(None));
        // Within the second after a walk, a new id is not yet known, and not cached as gone.
        let other = u64::MAX - 2;
        assert_eq!(
            resolver.lookup(other, t0 + MIN_RESCAN_INTERVAL),
            Lookup::NotYet
        );
        assert_eq!(resolver.cached(other), None);
    }

    #[test]
    fn kernfs_handle_is_a_file_handle_with_the_id_as_its_eight_bytes() {
        let handle = KernfsHandle::new(0x0102_0304_0506_0708);
        assert_eq!(std::mem::size_of::<KernfsHandle>(), 16);
        assert_eq!(
            std::mem::offset_of!(KernfsHandle, id),
            std::mem::size_of::<libc::file_handle>()
        );
        assert_eq!(handle.handle_bytes as usize, handle.id.len());
        assert_eq!(u64::from_ne_bytes(handle.id), 0x0102_0304_0506_0708);
    }

    #[test]
    fn opened_cgroup_paths_are_made_relative_to_the_mount() {
        let mount = "/host/sys/fs/cgroup";
        assert_eq!(path_below_mount(mount, mount), Some("/".to_owned()));
        assert_eq!(
            path_below_mount("/host/sys/fs/cgroup/kubepods.slice/x.scope", mount),
            Some("/kubepods.slice/x.scope".to_owned())
        );
        assert_eq!(
            path_below_mount("/host/sys/fs/cgroup/x.scope (deleted)", mount),
            None
        );
        // A sibling whose name starts like the mount, and a path outside it.
        assert_eq!(path_below_mount("/host/sys/fs/cgroup2/x", mount), None);
        assert_eq!(path_below_mount("/x.scope", mount), None);
        assert_eq!(
            path_below_mount("/sys/fs/cgroup/a", "/sys/fs/cgroup/"),
            Some("/a".to_owned())
        );
    }

    /// The real thing: a cgroup created under this host's cgroup2 mount resolves by handle, and
    /// once removed its handle no longer opens.
    #[test]
    fn cgroup_ids_resolve_by_file_handle_on_a_cgroup2_mount() {
        let require = std::env::var("KEEPALIVE_REQUIRE_KERNEL").as_deref() == Ok("1");
        let Some(mount) = system_cgroup2_mount() else {
            assert!(!require, "KEEPALIVE_REQUIRE_KERNEL=1 but no cgroup2 mount");
            eprintln!("skipped: no cgroup2 mount");
            return;
        };
        let Some(handles) = HandleLookup::open(&mount) else {
            assert!(
                !require,
                "KEEPALIVE_REQUIRE_KERNEL=1 but {} cannot be opened",
                mount.display()
            );
            eprintln!(
                "skipped: {} is not an openable cgroup2 mount",
                mount.display()
            );
            return;
        };
        let name = format!("keepalive-unit-{}.slice", std::process::id());
        let dir = mount.join(&name);
        if let Err(err) = fs::create_dir(&dir) {
            assert!(
                !require,
                "KEEPALIVE_REQUIRE_KERNEL=1 but mkdir {}: {err}",
                dir.display()
            );
            eprintln!("skipped: cannot create a cgroup ({err})");
            return;
        }
        let id = ino(&dir);
        let by_handle = handles.path(id);
        let resolver = CgroupResolver::new(Some(mount.clone()));
        let t0 = Instant::now();
        let root_id = ino(&mount);
        let through_resolver = resolver.lookup(id, t0);
        let _ = fs::remove_dir(&dir);
        match by_handle {
            Ok(path) => {
                assert_eq!(path, Some(format!("/{name}")));
                assert_eq!(
                    through_resolver,
                    Lookup::Found(CgroupNames::of(format!("/{name}")))
                );
                assert_eq!(
                    resolver.lookup(root_id, t0),
                    Lookup::Found(CgroupNames::of("/".to_owned()))
                );
                // Removed: the handle no longer opens (ESTALE), final.
                assert_eq!(handles.path(id).ok(), Some(None));
            }
            // Without CAP_DAC_READ_SEARCH the resolver walks instead.
            Err(HandleError::Open(err)) if err.raw_os_error() == Some(libc::EPERM) && !require => {
                eprintln!("skipped the handle half: {err}");
                assert_eq!(
                    through_resolver,
                    Lookup::Found(CgroupNames::of(format!("/{name}")))
                );
            }
            Err(err) => panic!("lookup by handle failed: {err}"),
        }
    }
}
