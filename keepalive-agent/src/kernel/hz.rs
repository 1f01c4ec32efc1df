//! The kernel's tick rate (CONFIG_HZ): keepalive settings and receive stamps are in jiffies.

use std::{
    io,
    path::{Path, PathBuf},
    time::Duration,
};

/// Tick rates Linux is configured with in practice.
const KNOWN_HZ: [u32; 5] = [100, 250, 300, 1000, 1024];

#[derive(Debug, thiserror::Error)]
pub(crate) enum HzError {
    #[error(
        "cannot read {path}: {}{}",
        crate::files::io_reason(source),
        read_hint(source)
    )]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    // Container runtimes mask /proc/timer_list (bind-mount /dev/null over it), so inside a
    // container it reads empty; the host's procfs mounted elsewhere is not masked.
    #[error(
        "{0} has no `now at` / `jiffies:` lines (empty when a container runtime masks it): \
         mount the host's /proc (e.g. at /host/proc) and pass --kernel.timer-list /host/proc/timer_list"
    )]
    Format(PathBuf),
}

/// Where the kernel prints its timers; a host procfs mounted elsewhere has it too.
pub(crate) const DEFAULT_TIMER_LIST: &str = "/proc/timer_list";

/// What to do about a read error, by errno.
fn read_hint(source: &io::Error) -> &'static str {
    match source.raw_os_error() {
        Some(libc::EACCES | libc::EPERM) => " (/proc/timer_list is mode 0400: run as uid 0)",
        Some(libc::ENOENT) => {
            " (in a container, mount the host's /proc and pass --kernel.timer-list \
             /host/proc/timer_list)"
        }
        _ => "",
    }
}

/// Jiffies and CLOCK_MONOTONIC nanoseconds, as /proc/timer_list prints them together. Reads
/// only until both are found, and at most [`crate::files::cap::TIMER_LIST`] bytes.
fn sample(timer_list: &Path) -> Result<(u64, u64), HzError> {
    let mut sampler = Sampler::default();
    crate::files::find_line(timer_list, crate::files::cap::TIMER_LIST, |line| {
        sampler.line(line)
    })
    .map_err(|source| HzError::Read {
        path: timer_list.to_owned(),
        source,
    })?
    .ok_or_else(|| HzError::Format(timer_list.to_owned()))
}

/// The two lines of a timer_list sample, in the order the kernel prints them.
#[derive(Default)]
struct Sampler {
    now_ns: Option<u64>,
}

impl Sampler {
    /// `Some((jiffies, now_ns))` once the `jiffies:` line after the `now at` line is seen.
    fn line(&mut self, line: &str) -> Option<(u64, u64)> {
        match self.now_ns {
            None => {
                self.now_ns = line
                    .strip_prefix("now at ")?
                    .strip_suffix(" nsecs")?
                    .parse()
                    .ok();
                None
            }
            Some(now_ns) => {
                let jiffies = line.trim().strip_prefix("jiffies: ")?.parse().ok()?;
                Some((jiffies, now_ns))
            }
        }
    }
}

#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn parse_sample(text: &str) -> Option<(u64, u64)> {
    let mut sampler = Sampler::default();
    text.lines().find_map(|l| sampler.line(l))
}

/// Measures HZ from [`DEFAULT_TIMER_LIST`]; see [`kernel_hz_from`].
pub(crate) fn kernel_hz() -> Result<u32, HzError> {
    kernel_hz_from(Path::new(DEFAULT_TIMER_LIST))
}

/// Measures HZ from two samples of `timer_list` a second apart and snaps it to the nearest
/// known rate.
pub(crate) fn kernel_hz_from(timer_list: &Path) -> Result<u32, HzError> {
    let (j0, t0) = sample(timer_list)?;
    std::thread::sleep(Duration::from_secs(1));
    let (j1, t1) = sample(timer_list)?;
    Ok(snap(
        j1.wrapping_sub(j0) as f64 * 1e9 / (t1 - t0).max(1) as f64,
    ))
}

fn snap(measured: f64) -> u32 {
    KNOWN_HZ
        .into_iter()
        .min_by(|a, b| {
            (f64::from(*a) - measured)
                .abs()
                .total_cmp(&(f64::from(*b) - measured).abs())
        })
        .unwrap_or(250)
}

/// Converts a jiffies count to seconds.
pub(crate) fn jiffies_to_seconds(jiffies: u64, hz: u32) -> f64 {
    jiffies as f64 / f64::from(hz)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_timer_list_header_and_first_tick_device() {
        let text = "Timer List Version: v0.10\nHRTIMER_MAX_CLOCK_BASES: 8\nnow at 3564612367764 nsecs\n\ncpu: 0\n jiffies: 4295783415\n";
        assert_eq!(parse_sample(text), Some((4295783415, 3564612367764)));
        assert_eq!(parse_sample("nothing"), None);
    }

    #[test]
    fn measured_rate_snaps_to_a_configured_one() {
        assert_eq!(snap(249.2), 250);
        assert_eq!(snap(1001.0), 1000);
        assert_eq!(snap(99.0), 100);
        assert_eq!(snap(290.0), 300);
    }

    #[test]
    fn running_kernel_rate_is_a_known_one() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            assert!(
                std::env::var("KEEPALIVE_REQUIRE_KERNEL").as_deref() != Ok("1"),
                "KEEPALIVE_REQUIRE_KERNEL=1 needs root to read /proc/timer_list"
            );
            eprintln!("SKIPPED running_kernel_rate_is_a_known_one: not root");
            return;
        }
        let hz = kernel_hz().expect("HZ of the running kernel");
        assert!(KNOWN_HZ.contains(&hz), "{hz}");
    }
}
