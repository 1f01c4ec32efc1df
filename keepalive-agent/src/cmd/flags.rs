//! Start-up validation of the command-line flags: every value is checked against bounds that
//! make sense for a node agent before anything is read, allocated or attached, and a bad one
//! stops the agent with one line that names the flag, the value and what is accepted.
//!
//! The bounds exist because the flags size up-front allocations (the connection table reserves
//! its hash table, the kernel reserves the ring buffer) and set how often work repeats; a
//! typo must not turn into gigabytes of memory or a busy core.

use crate::files::io_reason;
use std::{net::SocketAddr, num::NonZeroUsize, path::Path, str::FromStr, time::Duration};

/// The smallest ring buffer the kernel accepts (one page); it also wants a power of two.
use crate::kernel::programs::MIN_RING_BUFFER_BYTES;
/// Beyond this the buffer only hides a reader that has stopped (it is kernel memory, pinned).
pub(crate) const MAX_RING_BUFFER_BYTES: u32 = 256 << 20;
/// `--connections.max-tracked`: the table's hash table is reserved at start.
pub(crate) const MAX_TRACKED: usize = 1 << 20;
/// `--connections.max-dropped`: every entry keeps a connection's series alive.
pub(crate) const MAX_DROPPED: usize = 1_000_000;
/// `--connections.max-series`: each series is a line of every scrape.
pub(crate) const MAX_SERIES: usize = 100_000;
/// Retentions: a second is the shortest that still lets a scrape see the series; a month the
/// longest that is not a leak by another name.
pub(crate) const MIN_RETENTION: Duration = Duration::from_secs(1);
pub(crate) const MAX_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);
/// `--audit.interval`: a walk reads every socket on the host; more often than every second is a
/// busy core, less often than daily is no audit.
pub(crate) const MIN_AUDIT_INTERVAL: Duration = Duration::from_secs(1);
pub(crate) const MAX_AUDIT_INTERVAL: Duration = Duration::from_secs(24 * 3600);
/// `--idle-timeout-threshold`: each is a series per aggregate label set.
pub(crate) const MAX_IDLE_THRESHOLDS: usize = 32;
/// A threshold name is a label value; ten years is beyond any middlebox timeout.
pub(crate) const MAX_THRESHOLD_NAME: usize = 64;
pub(crate) const MAX_THRESHOLD_SECONDS: f64 = 315_360_000.0;
/// Longest `--web.telemetry-path`.
const MAX_TELEMETRY_PATH: usize = 256;

/// `--ring-buffer.bytes`: a number of bytes, or with a `KiB`/`MiB` suffix.
pub(crate) fn parse_ring_buffer_bytes(s: &str) -> Result<u32, String> {
    let usage = "a power of two from 4096 (4KiB) to 268435456 (256MiB), e.g. 4194304 or 4MiB";
    let trimmed = s.trim();
    let (digits, unit) = match trimmed {
        t if t.ends_with("KiB") => (&t[..t.len() - 3], 1u64 << 10),
        t if t.ends_with("MiB") => (&t[..t.len() - 3], 1u64 << 20),
        t => (t, 1),
    };
    let bytes = digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit))
        .ok_or_else(|| format!("{s:?} is not a size: {usage}"))?;
    let page = page_size();
    if !bytes.is_power_of_two()
        || bytes < u64::from(MIN_RING_BUFFER_BYTES)
        || bytes > u64::from(MAX_RING_BUFFER_BYTES)
        || bytes % page != 0
    {
        return Err(format!(
            "{bytes} bytes: must be {usage}, and a multiple of the page size ({page})"
        ));
    }
    u32::try_from(bytes).map_err(|_| format!("{bytes} bytes: {usage}"))
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no memory preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(page).unwrap_or(4096).max(1)
}

/// A whole number within `min..=max`, with the flag's own example in the message.
fn count_within(s: &str, min: usize, max: usize) -> Result<usize, String> {
    let n: usize = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a whole number from {min} to {max}"))?;
    if !(min..=max).contains(&n) {
        return Err(format!("{n} is out of range: from {min} to {max}"));
    }
    Ok(n)
}

/// `--connections.max-tracked`.
pub(crate) fn parse_max_tracked(s: &str) -> Result<NonZeroUsize, String> {
    count_within(s, 1, MAX_TRACKED).map(|n| NonZeroUsize::new(n).unwrap_or(NonZeroUsize::MIN))
}

/// `--connections.max-dropped`; 0 keeps no dropped connection.
pub(crate) fn parse_max_dropped(s: &str) -> Result<usize, String> {
    count_within(s, 0, MAX_DROPPED)
}

/// `--connections.max-series`; 0 exports no per-connection series.
pub(crate) fn parse_max_series(s: &str) -> Result<usize, String> {
    count_within(s, 0, MAX_SERIES)
}

/// A duration within `min..=max`.
pub(crate) fn duration_within(s: &str, min: Duration, max: Duration) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?} is not a duration ({e}; e.g. 15m, 1h)"))?;
    check_duration(d, min, max)
}

pub(crate) fn check_duration(
    d: Duration,
    min: Duration,
    max: Duration,
) -> Result<Duration, String> {
    if d < min || d > max {
        return Err(format!(
            "{} is out of range: from {} to {}",
            humantime::format_duration(d),
            humantime::format_duration(min),
            humantime::format_duration(max)
        ));
    }
    Ok(d)
}

/// `--connections.dropped-retention` and `--netns.retention`.
pub(crate) fn parse_retention(s: &str) -> Result<Duration, String> {
    duration_within(s, MIN_RETENTION, MAX_RETENTION)
}

/// `--connections.marks-interval`: at least a second, so a renewal (one pass over the table)
/// never runs back to back; at most an hour, so a connection the table let go stops costing
/// its close within three hours.
pub(crate) fn parse_marks_interval(s: &str) -> Result<Duration, String> {
    duration_within(s, Duration::from_secs(1), Duration::from_secs(3600))
}

/// `--netns.counter-sweep-interval`: how often the counter sweep runs, or `None` (`off`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SweepInterval(pub Option<Duration>);

/// `--netns.counter-sweep-interval`: `off`, or at least 10ms (each sweep interrupts every CPU
/// once), at most a minute, so a namespace that goes away soon after a burst of unrun expiries
/// still has their probes counted.
pub(crate) fn parse_counter_sweep_interval(s: &str) -> Result<SweepInterval, String> {
    if s.trim() == "off" {
        return Ok(SweepInterval(None));
    }
    duration_within(s, Duration::from_millis(10), Duration::from_secs(60))
        .map(|d| SweepInterval(Some(d)))
        .map_err(|e| format!("{e}; or off"))
}

/// `--web.telemetry-path`: a plain absolute path that is not one of the other endpoints. The
/// router takes `{` and `*` as patterns and panics on a duplicate route, so only literal
/// characters get through.
pub(crate) fn parse_telemetry_path(s: &str) -> Result<String, String> {
    let usage = "an absolute path of letters, digits and - _ . ~ /, e.g. /metrics";
    if !s.starts_with('/') || s.len() < 2 || s.len() > MAX_TELEMETRY_PATH {
        return Err(format!("{s:?}: must be {usage}"));
    }
    if let Some(bad) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '~' | '/')))
    {
        return Err(format!("{s:?}: {bad:?} is not allowed; must be {usage}"));
    }
    if s.contains("//") || s.ends_with('/') || s.split('/').any(|seg| seg == "." || seg == "..") {
        return Err(format!(
            "{s:?}: no empty, `.` or `..` segments and no trailing '/'; must be {usage}"
        ));
    }
    if ["/healthz", "/readyz"].contains(&s) {
        return Err(format!(
            "{s:?} is the agent's own health endpoint; choose another path"
        ));
    }
    Ok(s.to_owned())
}

/// `--web.listen-address`: a fixed port, since Prometheus must know where to scrape.
pub(crate) fn parse_listen_address(s: &str) -> Result<SocketAddr, String> {
    let addr = SocketAddr::from_str(s.trim()).map_err(|_| {
        format!("{s:?} is not IP:PORT (e.g. 0.0.0.0:9879, 127.0.0.1:9879 or [::]:9879)")
    })?;
    if addr.port() == 0 {
        return Err(format!(
            "{s:?}: port 0 picks a random port Prometheus cannot know; give one (e.g. 9879)"
        ));
    }
    Ok(addr)
}

/// A directory the agent reads (`--proc.root`, `--cgroup.root`), checked at start so a typo does
/// not leave attribution silently empty. `magic` is the filesystem it must be on.
pub(crate) fn check_directory(
    flag: &str,
    path: &Path,
    magic: i64,
    filesystem: &str,
) -> Result<(), String> {
    let meta = std::fs::metadata(path)
        .map_err(|e| format!("{flag} {}: {}", path.display(), io_reason(&e)))?;
    if !meta.is_dir() {
        return Err(format!("{flag} {}: not a directory", path.display()));
    }
    match filesystem_magic(path) {
        Ok(found) if found == magic => Ok(()),
        Ok(found) => Err(format!(
            "{flag} {}: not a {filesystem} mount (filesystem magic {found:#x}); \
             point it at where {filesystem} is mounted",
            path.display()
        )),
        Err(e) => Err(format!("{flag} {}: {}", path.display(), io_reason(&e))),
    }
}

/// `--proc.root`: an existing directory on a procfs.
pub(crate) fn parse_proc_root(s: &str) -> Result<std::path::PathBuf, String> {
    let path = std::path::PathBuf::from(s);
    check_directory("--proc.root", &path, PROC_SUPER_MAGIC, "procfs")?;
    Ok(path)
}

/// A file the agent reads (`--kernel.timer-list`): it must exist and not be a directory.
pub(crate) fn check_readable_file(flag: &str, path: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(path)
        .map_err(|e| format!("{flag} {}: {}", path.display(), io_reason(&e)))?;
    if meta.is_dir() {
        return Err(format!(
            "{flag} {}: is a directory, not a file",
            path.display()
        ));
    }
    Ok(())
}

/// `PROC_SUPER_MAGIC` (include/uapi/linux/magic.h).
pub(crate) const PROC_SUPER_MAGIC: i64 = 0x9fa0;
/// `CGROUP2_SUPER_MAGIC` (include/uapi/linux/magic.h).
pub(crate) const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

fn filesystem_magic(path: &Path) -> std::io::Result<i64> {
    use std::os::unix::ffi::OsStrExt as _;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: an all-zero statfs is a valid value; statfs fills it.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is NUL-terminated and stat is a live statfs.
    if unsafe { libc::statfs(c_path.as_ptr(), &raw mut stat) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // `as`: f_type is a signed word on glibc, unsigned on musl.
    Ok(stat.f_type as i64)
}

/// Names given twice would make two series with one label value.
pub(crate) fn check_unique_names<'a>(
    flag: &str,
    names: impl IntoIterator<Item = &'a str>,
) -> Result<(), String> {
    let mut seen = std::collections::HashSet::new();
    for name in names {
        if !seen.insert(name) {
            return Err(format!("{flag}: the name {name:?} is given twice"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_buffer_is_a_power_of_two_between_a_page_and_256_mib() {
        assert_eq!(parse_ring_buffer_bytes("4194304"), Ok(4 << 20));
        assert_eq!(parse_ring_buffer_bytes("4MiB"), Ok(4 << 20));
        assert_eq!(parse_ring_buffer_bytes("256MiB"), Ok(256 << 20));
        for bad in [
            "",
            "0",
            "-4096",
            "4095",
            "5000",
            "512MiB",
            "1GiB",
            "4e6",
            "99999999999999999999MiB",
        ] {
            assert!(parse_ring_buffer_bytes(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn table_sizes_have_upper_caps() {
        assert!(parse_max_tracked("0").is_err());
        assert!(parse_max_tracked("18446744073709551615").is_err());
        assert!(parse_max_tracked("1e8").is_err());
        assert_eq!(
            parse_max_tracked("65536").map(NonZeroUsize::get),
            Ok(65_536)
        );
        assert_eq!(parse_max_dropped("0"), Ok(0));
        assert!(parse_max_dropped("-1").is_err());
        assert!(parse_max_series("100001").is_err());
    }

    #[test]
    fn durations_are_within_bounds() {
        assert_eq!(parse_retention("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_marks_interval("1m"), Ok(Duration::from_secs(60)));
        assert!(
            parse_marks_interval("500ms")
                .unwrap_err()
                .contains("out of range")
        );
        assert!(
            parse_marks_interval("2h")
                .unwrap_err()
                .contains("out of range")
        );
        assert!(parse_retention("1ns").unwrap_err().contains("out of range"));
        assert_eq!(
            parse_counter_sweep_interval("1s"),
            Ok(SweepInterval(Some(Duration::from_secs(1))))
        );
        assert_eq!(parse_counter_sweep_interval("off"), Ok(SweepInterval(None)));
        assert!(
            parse_counter_sweep_interval("0s")
                .unwrap_err()
                .ends_with("; or off")
        );
        assert!(
            parse_counter_sweep_interval("1ms")
                .unwrap_err()
                .contains("out of range")
        );
        assert!(
            parse_counter_sweep_interval("2m")
                .unwrap_err()
                .contains("out of range")
        );
        assert!(parse_retention("100y").is_err());
        assert!(parse_retention("soon").unwrap_err().contains("\"soon\""));
    }

    #[test]
    fn telemetry_path_is_a_literal_path_apart_from_the_health_endpoints() {
        assert_eq!(parse_telemetry_path("/metrics").as_deref(), Ok("/metrics"));
        assert!(parse_telemetry_path("/v1/keepalive.metrics").is_ok());
        for bad in [
            "", "/", "metrics", "/{", "/:x", "/*rest", "/healthz", "/readyz", "//m", "/m/",
            "/a/../b", "/m?x", "/m x",
        ] {
            assert!(parse_telemetry_path(bad).is_err(), "{bad:?} accepted");
        }
        assert!(parse_telemetry_path(&format!("/{}", "a".repeat(300))).is_err());
    }

    #[test]
    fn listen_address_needs_a_fixed_port() {
        assert!(parse_listen_address("127.0.0.1:9879").is_ok());
        assert!(parse_listen_address("127.0.0.1:0").is_err());
        assert!(parse_listen_address("localhost:9879").is_err());
        assert!(parse_listen_address("127.0.0.1:65536").is_err());
    }

    #[test]
    fn directories_must_exist_and_be_the_right_filesystem() {
        let err = check_directory(
            "--proc.root",
            Path::new("/nonexistent"),
            PROC_SUPER_MAGIC,
            "procfs",
        );
        assert!(err.unwrap_err().contains("does not exist"));
        let err = check_directory(
            "--proc.root",
            Path::new("/proc/self/status"),
            PROC_SUPER_MAGIC,
            "procfs",
        );
        assert!(err.unwrap_err().contains("not a directory"));
        assert!(
            check_directory(
                "--proc.root",
                Path::new("/proc"),
                PROC_SUPER_MAGIC,
                "procfs"
            )
            .is_ok()
        );
        let err = check_directory("--proc.root", Path::new("/"), PROC_SUPER_MAGIC, "procfs");
        assert!(err.unwrap_err().contains("not a procfs mount"));
    }

    #[test]
    fn duplicate_names_are_refused() {
        assert!(check_unique_names("--x", ["a", "b"]).is_ok());
        assert!(
            check_unique_names("--x", ["a", "b", "a"])
                .unwrap_err()
                .contains("\"a\"")
        );
    }

    #[test]
    fn paths_for_files_exist_and_are_not_directories() {
        assert!(check_readable_file("--kernel.timer-list", Path::new("/proc/self/status")).is_ok());
        assert!(
            check_readable_file("--kernel.timer-list", Path::new("/proc"))
                .unwrap_err()
                .contains("directory")
        );
        assert!(
            check_readable_file("--kernel.timer-list", Path::new("/nope"))
                .unwrap_err()
                .contains("does not exist")
        );
    }
}
