//! Finding the host's network namespaces, for the fallback audit walk (kernels without
//! `bpf_sock_from_file`; newer ones walk every namespace from one `iter/task_file` iterator).
//!
//! A BPF `iter/tcp` iterator only returns the sockets of one network namespace: the one the
//! process was in when it created the iterator (`bpf_iter_init_seq_net` takes
//! `current->nsproxy->net_ns`). To audit every namespace the agent enters each in turn, so it
//! must first find them: Linux 6.18 has no call that lists namespaces, so they are collected
//! from what keeps them alive and is visible from the host:
//! - every thread's `PROC/PID/task/TID/ns/net` under `--proc.root` (containers, pods' pause
//!   processes, and threads that entered a namespace);
//! - the bind mounts of `ip netns` (`/run/netns`) and Docker (`/run/docker/netns`).
//!
//! A namespace kept alive only by something else (an open namespace file descriptor, or sockets
//! whose process left it) is not found; the agent must see the host's processes (`hostPID` in
//! Kubernetes, or the host's /proc mounted and given as `--proc.root`) to find containers'
//! namespaces.

use std::{
    collections::HashSet,
    fs::{self, File},
    io,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

/// `PROC_PID_INIT_INO` (include/linux/proc_ns.h): the inode of the initial PID namespace.
const INITIAL_PID_NAMESPACE_INODE: u64 = 0xEFFF_FFFC;

/// The agent's PID namespace inode when it is not the host's (initial) one, `None` when it is
/// or cannot be told. BPF task iterators (`iter/task_file`, the audit walk on 5.11+) walk only
/// the tasks of their creator's PID namespace (`task_active_pid_ns(current)` in
/// kernel/bpf/task_iter.c): outside the host's, the audit sees only this namespace's processes.
pub(crate) fn private_pid_namespace() -> Option<u64> {
    let inode = fs::metadata("/proc/self/ns/pid").ok()?.ino();
    (inode != INITIAL_PID_NAMESPACE_INODE).then_some(inode)
}

/// Directories where tools bind-mount named network namespaces.
const NETNS_MOUNT_DIRS: [&str; 3] = ["/run/netns", "/var/run/netns", "/run/docker/netns"];

/// An open network namespace: holding the file keeps it alive until it is entered.
#[derive(Debug)]
pub(crate) struct NetworkNamespace {
    /// Namespace inode: the `netns` label value.
    pub inode: u64,
    /// Where it was found (for messages).
    pub path: PathBuf,
    pub file: File,
}

impl NetworkNamespace {
    /// Moves the calling thread into this namespace. Only the calling thread changes: call it
    /// on a thread that exits afterwards (or that nothing else uses).
    pub(crate) fn enter(&self) -> io::Result<()> {
        // SAFETY: plain syscall on a descriptor we own; it changes only this thread's netns.
        if unsafe { libc::setns(self.file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Every network namespace that can be found (see the module comment), each once, the agent's
/// own first; processes are listed under `proc_root`. Paths that vanish while listing (exiting
/// threads) are skipped.
pub(crate) fn all(proc_root: &Path) -> Vec<NetworkNamespace> {
    let candidates = candidates(proc_root);
    let mut seen = HashSet::new();
    candidates
        .into_iter()
        .filter_map(|path| {
            // stat follows the magic link to the namespace: (device, inode) identifies it.
            let meta = fs::metadata(&path).ok()?;
            if !seen.insert((meta.dev(), meta.ino())) {
                return None;
            }
            let file = File::open(&path).ok()?;
            Some(NetworkNamespace {
                inode: meta.ino(),
                path,
                file,
            })
        })
        .collect()
}

/// Where namespaces may be found, the agent's own first.
fn candidates(proc_root: &Path) -> Vec<PathBuf> {
    let mut candidates = vec![PathBuf::from("/proc/thread-self/ns/net")];
    for dir in NETNS_MOUNT_DIRS {
        candidates.extend(entries(Path::new(dir)));
    }
    for process in entries(proc_root).filter(|p| is_number(p)) {
        candidates.extend(
            entries(&process.join("task"))
                .filter(|p| is_number(p))
                .map(|task| task.join("ns/net")),
        );
    }
    candidates
}

fn entries(dir: &Path) -> impl Iterator<Item = PathBuf> {
    fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok().map(|e| e.path()))
}

fn is_number(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_own_namespace_once_and_first() {
        let own = fs::metadata("/proc/self/ns/net").expect("own netns").ino();
        let found = all(Path::new("/proc"));
        assert_eq!(found.first().map(|ns| ns.inode), Some(own));
        assert_eq!(found.iter().filter(|ns| ns.inode == own).count(), 1);
    }

    #[test]
    fn lists_threads_under_the_proc_root_it_is_given() {
        // A proc root with one process of two threads, and a directory that is not a process.
        let root = std::env::temp_dir().join(format!("netns-proc-root-{}", std::process::id()));
        for dir in ["4242/task/4242/ns", "4242/task/4243/ns", "sys/task/1/ns"] {
            fs::create_dir_all(root.join(dir)).expect("temp dir");
        }
        let found = candidates(&root);
        fs::remove_dir_all(&root).expect("temp dir");
        let mut threads: Vec<&PathBuf> = found.iter().filter(|p| p.starts_with(&root)).collect();
        threads.sort();
        assert_eq!(
            threads,
            [
                &root.join("4242/task/4242/ns/net"),
                &root.join("4242/task/4243/ns/net")
            ]
        );
        // Nothing from the agent's own /proc but its own thread.
        assert!(
            found.iter().all(|p| p.starts_with(&root)
                || !p.starts_with("/proc")
                || p.starts_with("/proc/thread-self")),
            "{found:?}"
        );
    }
}
