//! socket inode → the process holding it, from the `socket:[INO]` links in `/proc/PID/fd`.

use std::{
    collections::HashMap,
    ffi::CStr,
    fs,
    os::{fd::AsRawFd, unix::ffi::OsStringExt},
    path::PathBuf,
    time::{Duration, Instant},
};

use prometheus_client::metrics::counter::Counter;

use super::MIN_RESCAN_INTERVAL;

/// More cached socket owners than this and the process cache starts over, and a rescan keeps
/// no more (a node with that many sockets re-reads `/proc` anyway on the next miss).
const MAX_CACHED_SOCKETS: usize = 1 << 20;

/// Descriptor tables read on a miss may take this share of one core on average...
const READ_SHARE: f64 = 0.05;
/// ...with bursts up to this. A process holding 100 000 sockets takes a good part of a second to
/// read, and each new connection of it that misses the cache would read it whole again (the
/// candidates are not rate limited, and a busy node's whole-host rescan can take longer than
/// [`MIN_RESCAN_INTERVAL`]).
const READ_BURST: Duration = Duration::from_millis(100);

/// The process holding a socket open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Process {
    pub pid: u32,
    pub comm: Option<String>,
}

/// socket inode → process, from the `socket:[INO]` links in `/proc/PID/fd`.
#[derive(Debug)]
pub(super) struct ProcessResolver {
    proc_root: PathBuf,
    /// socket inode → pid (the lowest pid when several processes share the socket); a whole-host
    /// rescan fills it with every socket on the node, so foldhash rather than SipHash.
    owners: HashMap<u64, u32, foldhash::quality::RandomState>,
    last_scan: Option<Instant>,
    /// With a read budget ([`Self::with_read_budget`]), the time left for reading descriptor
    /// tables.
    budget: Option<ReadBudget>,
}

/// A token bucket of CPU time for reading descriptor tables.
#[derive(Debug)]
struct ReadBudget {
    share: f64,
    burst: f64,
    /// Seconds of reading allowed now; below 0 after a read that took more than was left.
    balance: f64,
    refilled: Option<Instant>,
    /// Misses that read nothing because the budget was spent.
    deferred: Counter,
}

impl ReadBudget {
    /// Whether a read may start `now`.
    fn allows(&mut self, now: Instant) -> bool {
        if let Some(last) = self.refilled {
            let earned = now.saturating_duration_since(last).as_secs_f64() * self.share;
            self.balance = (self.balance + earned).min(self.burst);
        }
        self.refilled = Some(now);
        self.balance >= 0.0
    }
}

impl ProcessResolver {
    pub(super) fn new(proc_root: PathBuf) -> Self {
        Self {
            proc_root,
            owners: HashMap::default(),
            last_scan: None,
            budget: None,
        }
    }

    /// Bounds the time spent reading descriptor tables to [`READ_SHARE`] of a core, with bursts
    /// up to [`READ_BURST`]: for the daemon; a one-off listing reads what it needs. Misses that
    /// find the budget spent are counted in `deferred`, and their owner stays unknown (the
    /// pipeline asks again at the connection's next unanswered probe, or its keepalive drop).
    pub(super) fn with_read_budget(self, deferred: Counter) -> Self {
        self.with_budget(READ_SHARE, READ_BURST, deferred)
    }

    fn with_budget(mut self, share: f64, burst: Duration, deferred: Counter) -> Self {
        self.budget = Some(ReadBudget {
            share,
            burst: burst.as_secs_f64(),
            balance: burst.as_secs_f64(),
            refilled: None,
            deferred,
        });
        self
    }

    /// The process that has the socket open. On a miss, looks first among `candidates` (the
    /// processes of the socket's cgroup: cheap and not rate limited), then rebuilds the
    /// whole-host cache unless it was rebuilt less than [`MIN_RESCAN_INTERVAL`] before `now`.
    pub(super) fn owner(
        &mut self,
        socket_ino: u64,
        candidates: &[u32],
        now: Instant,
    ) -> Option<Process> {
        if socket_ino == 0 {
            return None;
        }
        let pid = match self.owners.get(&socket_ino) {
            Some(&pid) => Some(pid),
            None => {
                // A miss that would read nothing anyway (no candidates, and the whole-host rescan
                // not due) neither waits for the budget nor counts as deferred.
                let reads = !candidates.is_empty() || self.rescan_due(now);
                if reads
                    && let Some(budget) = &mut self.budget
                    && !budget.allows(now)
                {
                    budget.deferred.inc();
                    return None;
                }
                let started = Instant::now();
                let found = self
                    .search(socket_ino, candidates)
                    .or_else(|| self.rescan(socket_ino, now));
                if let Some(budget) = &mut self.budget {
                    budget.balance -= started.elapsed().as_secs_f64();
                }
                found
            }
        }?;
        let comm = crate::files::read_string_bounded(
            &self.proc_root.join(pid.to_string()).join("comm"),
            crate::files::cap::SMALL,
        )
        .ok()
        .map(|comm| comm.trim_end_matches('\n').to_owned());
        Some(Process { pid, comm })
    }

    /// Every socket of each candidate read on the way is cached: connections of one busy
    /// process enter the table together, and reading its whole descriptor table once per
    /// connection made the lookups quadratic (reading `/proc/PID/fd` is not cheap per
    /// descriptor: the kernel builds a dentry and an inode for each).
    fn search(&mut self, socket_ino: u64, candidates: &[u32]) -> Option<u32> {
        let mut sorted = candidates.to_vec();
        sorted.sort_unstable();
        for pid in sorted {
            let sockets: Vec<u64> = self.sockets_of(pid).collect();
            if self.owners.len() + sockets.len() > MAX_CACHED_SOCKETS {
                self.owners.clear();
            }
            for &ino in &sockets {
                // Candidates go lowest pid first, so a socket shared after fork() keeps the
                // parent.
                self.owners.entry(ino).or_insert(pid);
            }
            // A miss brought us here, so the loop above cached it with this pid.
            if sockets.contains(&socket_ino) {
                return Some(pid);
            }
        }
        None
    }

    /// Whether a whole-host rescan may run `now`: at most one per [`MIN_RESCAN_INTERVAL`].
    fn rescan_due(&self, now: Instant) -> bool {
        self.last_scan
            .is_none_or(|last| now.duration_since(last) >= MIN_RESCAN_INTERVAL)
    }

    fn rescan(&mut self, socket_ino: u64, now: Instant) -> Option<u32> {
        if !self.rescan_due(now) {
            return None;
        }
        self.last_scan = Some(now);
        let mut owners = HashMap::default();
        let mut pids: Vec<u32> = fs::read_dir(&self.proc_root)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
            .collect();
        // Lowest pid first, so a socket shared after fork() maps to the parent.
        pids.sort_unstable();
        let mut wanted = None;
        for pid in pids {
            for ino in self.sockets_of(pid) {
                if ino == socket_ino {
                    wanted.get_or_insert(pid);
                }
                // The cache stays bounded on a node with more sockets than that; the one asked
                // for is found all the same.
                if owners.len() < MAX_CACHED_SOCKETS {
                    owners.entry(ino).or_insert(pid);
                }
            }
        }
        if let Some(pid) = wanted {
            owners.entry(socket_ino).or_insert(pid);
        }
        self.owners = owners;
        wanted
    }

    /// Socket inodes among the process's descriptors (none if it is gone or not readable).
    /// Each link is read relative to the open directory: `readlink` of the whole path would
    /// walk `/proc/PID/fd/N` from the root again for every descriptor, and a process holding
    /// tens of thousands of sockets is read whole.
    fn sockets_of(&self, pid: u32) -> impl Iterator<Item = u64> {
        let fd_dir = self.proc_root.join(pid.to_string()).join("fd");
        let dir = fs::File::open(&fd_dir).ok();
        let entries = dir.as_ref().and_then(|_| fs::read_dir(&fd_dir).ok());
        entries
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(move |entry| {
                let dir = dir.as_ref()?;
                let mut name = entry.file_name().into_vec();
                name.push(0);
                let name = CStr::from_bytes_with_nul(&name).ok()?;
                // `socket:[` and a u64's 20 digits fit; a longer target is no socket.
                let mut target = [0u8; 64];
                // SAFETY: `name` is NUL-terminated and `target` is writable for its length.
                let len = unsafe {
                    libc::readlinkat(
                        dir.as_raw_fd(),
                        name.as_ptr(),
                        target.as_mut_ptr().cast(),
                        target.len(),
                    )
                };
                parse_socket_target(target.get(..usize::try_from(len).ok()?)?)
            })
    }
}

/// A descriptor's link target `socket:[12345]` → 12345.
pub(crate) fn parse_socket_target(target: &[u8]) -> Option<u64> {
    std::str::from_utf8(target.strip_prefix(b"socket:[")?.strip_suffix(b"]")?)
        .ok()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::attribution::test_support::{Scratch, fake_process};

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

        // Looking among candidates caches every socket of the process read: the next
        // connection of the same process is found without reading its descriptors again.
        fake_process(proc_root, 600, "busy", &[1005, 1006]);
        assert_eq!(resolver.owner(1005, &[600], soon), owner(600, "busy"));
        fs::remove_dir_all(proc_root.join("600").join("fd")).expect("rm");
        assert_eq!(resolver.owner(1006, &[], soon), owner(600, "busy"));

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
    fn with_a_read_budget_a_miss_soon_after_a_read_reads_nothing_and_is_counted() {
        let scratch = Scratch::new("proc-budget");
        let proc_root = &scratch.0;
        fake_process(proc_root, 300, "worker", &[1001]);
        let deferred = Counter::default();
        // No burst: any read spends more than there is, until the share earns it back.
        let mut resolver = ProcessResolver::new(proc_root.clone()).with_budget(
            READ_SHARE,
            Duration::ZERO,
            deferred.clone(),
        );
        let t0 = Instant::now();
        assert_eq!(resolver.owner(1001, &[300], t0).map(|p| p.pid), Some(300));

        // The read above took some time: a miss at the same moment waits for the budget...
        fake_process(proc_root, 400, "late", &[1002]);
        assert_eq!(resolver.owner(1002, &[400], t0), None);
        assert_eq!(deferred.get(), 1);
        // ...a cached socket does not...
        assert_eq!(resolver.owner(1001, &[], t0).map(|p| p.pid), Some(300));
        assert_eq!(deferred.get(), 1);
        // ...and once the share has earned the read's time back, the miss reads.
        let later = t0 + Duration::from_secs(60);
        assert_eq!(
            resolver.owner(1002, &[400], later).map(|p| p.pid),
            Some(400)
        );
        assert_eq!(deferred.get(), 1);

        // A miss with no candidates while the whole-host rescan is not due would read nothing:
        // it is not counted as deferred; one with a candidate to read is.
        let t1 = t0 + Duration::from_secs(120);
        assert_eq!(resolver.owner(9999, &[], t1), None);
        assert_eq!(deferred.get(), 1);
        assert_eq!(resolver.owner(9998, &[], t1), None);
        assert_eq!(deferred.get(), 1);
        assert_eq!(resolver.owner(9998, &[400], t1), None);
        assert_eq!(deferred.get(), 2);

        // Without a budget (one-off listings), misses always read.
        let mut unbounded = ProcessResolver::new(proc_root.clone());
        assert_eq!(unbounded.owner(1001, &[300], t0).map(|p| p.pid), Some(300));
        assert_eq!(unbounded.owner(1002, &[400], t0).map(|p| p.pid), Some(400));
    }
}
