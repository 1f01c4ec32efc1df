//! The kernel's tick rate (CONFIG_HZ): keepalive settings and receive stamps are in jiffies.

use std::{fs, io, time::Duration};

/// Tick rates Linux is configured with in practice.
const KNOWN_HZ: [u32; 5] = [100, 250, 300, 1000, 1024];

#[derive(Debug, thiserror::Error)]
pub enum HzError {
    #[error("cannot read /proc/timer_list (needs root): {0}")]
    Read(#[source] io::Error),
    #[error("/proc/timer_list has no `now at` / `jiffies:` lines")]
    Format,
}

/// Jiffies and CLOCK_MONOTONIC nanoseconds, as /proc/timer_list prints them together.
fn sample() -> Result<(u64, u64), HzError> {
    let text = fs::read_to_string("/proc/timer_list").map_err(HzError::Read)?;
    parse_sample(&text).ok_or(HzError::Format)
}

fn parse_sample(text: &str) -> Option<(u64, u64)> {
    let now_ns = text.lines().find_map(|l| {
        l.strip_prefix("now at ")?
            .strip_suffix(" nsecs")?
            .parse()
            .ok()
    })?;
    let jiffies = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("jiffies: ")?.parse().ok())?;
    Some((jiffies, now_ns))
}

/// Measures HZ from two samples a second apart and snaps it to the nearest known rate.
pub fn kernel_hz() -> Result<u32, HzError> {
    let (j0, t0) = sample()?;
    std::thread::sleep(Duration::from_secs(1));
    let (j1, t1) = sample()?;
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
pub fn jiffies_to_seconds(jiffies: u64, hz: u32) -> f64 {
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
