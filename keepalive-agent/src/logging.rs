//! The agent's log: node_exporter's `--log.level` and `--log.format=logfmt|json`, one line per
//! message on stderr, and a bound on repeated warnings.
//!
//! A warning or error logged from the same place in the code is written at most once per
//! [`REPEAT_WINDOW`]; the ones in between are dropped and counted in
//! `keepalive_agent_log_messages_suppressed_total{level}`, and the next line written from that
//! place carries how many were (`suppressed=N`). A broken cgroup tree or a full disk then
//! costs a few lines a minute instead of one per event, without hiding that it goes on.
//! Limiting by call site, not by text, keeps the state bounded by the number of `warn!` and
//! `error!` in the agent, whatever the messages contain.

use std::{
    collections::HashMap,
    io::Write as _,
    sync::{LazyLock, Mutex},
    time::{Duration, Instant, SystemTime},
};

use log::{Level, LevelFilter, Log, Metadata, Record};
use prometheus_client::{
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

/// How often one call site may write a warning or an error.
pub const REPEAT_WINDOW: Duration = Duration::from_secs(10);

/// `--log.level`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogLevel {
    Debug,
    Info,
    Warn,
    Error,
}

impl From<LogLevel> for LevelFilter {
    fn from(level: LogLevel) -> Self {
        match level {
            LogLevel::Debug => LevelFilter::Debug,
            LogLevel::Info => LevelFilter::Info,
            LogLevel::Warn => LevelFilter::Warn,
            LogLevel::Error => LevelFilter::Error,
        }
    }
}

/// `--log.format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// `ts=... level=info target=... msg="..."`, what node_exporter writes by default.
    Logfmt,
    /// One JSON object per line, for log pipelines that parse JSON.
    Json,
}

/// The logging flags every command takes.
#[derive(Debug, Clone, clap::Args)]
pub struct LogConfig {
    /// Only log messages at or above this level. RUST_LOG, when set, wins (it also takes
    /// per-module levels, e.g. `keepalive_agent=debug`).
    #[arg(long = "log.level", value_enum, default_value = "info", global = true)]
    pub level: LogLevel,
    /// Log line format.
    #[arg(
        long = "log.format",
        value_enum,
        default_value = "logfmt",
        global = true
    )]
    pub format: LogFormat,
}

/// Warnings and errors not written because their call site had written one within
/// [`REPEAT_WINDOW`].
static SUPPRESSED: LazyLock<Family<[(&'static str, &'static str); 1], Counter>> =
    LazyLock::new(|| {
        let family = Family::default();
        // Both exist at 0 from the first scrape, so increase() and alerts work at once.
        for level in ["warn", "error"] {
            let _ = family.get_or_create(&[("level", level)]);
        }
        family
    });

/// Adds the suppressed-messages counter to `registry`.
pub fn register_metrics(registry: &mut Registry) {
    registry.register(
        "keepalive_agent_log_messages_suppressed",
        "Warnings and errors not logged because the same call site had logged one within the last 10 s (the next line from there says how many)",
        SUPPRESSED.clone(),
    );
}

/// Installs the logger for the whole process. RUST_LOG, when set and not empty, replaces
/// `--log.level`, as with every Rust program operators know.
pub fn init(config: &LogConfig) -> Result<(), log::SetLoggerError> {
    let mut filter = env_filter::Builder::new();
    match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => filter.parse(&spec),
        _ => filter.filter_level(config.level.into()),
    };
    let filter = filter.build();
    log::set_max_level(filter.filter());
    log::set_boxed_logger(Box::new(Logger {
        filter,
        format: config.format,
        sites: Mutex::default(),
    }))
}

struct Logger {
    filter: env_filter::Filter,
    format: LogFormat,
    /// Per call site (file, line) of a warning or error: when its window started and how many
    /// lines it has had suppressed since.
    sites: Mutex<HashMap<(&'static str, u32), Site>>,
}

struct Site {
    window_start: Instant,
    suppressed: u64,
}

impl Logger {
    /// Whether to write `record` now and, if so, how many lines from its call site were
    /// suppressed before it.
    fn admit(&self, record: &Record<'_>, now: Instant) -> Option<u64> {
        if record.level() > Level::Warn {
            return Some(0);
        }
        let (Some(file), Some(line)) = (record.file_static(), record.line()) else {
            return Some(0);
        };
        let Ok(mut sites) = self.sites.lock() else {
            return Some(0);
        };
        match sites.get_mut(&(file, line)) {
            Some(site) if now.duration_since(site.window_start) < REPEAT_WINDOW => {
                site.suppressed += 1;
                let level = if record.level() == Level::Error {
                    "error"
                } else {
                    "warn"
                };
                SUPPRESSED.get_or_create(&[("level", level)]).inc();
                None
            }
            Some(site) => {
                site.window_start = now;
                Some(std::mem::take(&mut site.suppressed))
            }
            None => {
                sites.insert(
                    (file, line),
                    Site {
                        window_start: now,
                        suppressed: 0,
                    },
                );
                Some(0)
            }
        }
    }
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        self.filter.enabled(metadata)
    }

    fn log(&self, record: &Record<'_>) {
        if !self.filter.matches(record) {
            return;
        }
        let Some(suppressed) = self.admit(record, Instant::now()) else {
            return;
        };
        let line = format_line(self.format, SystemTime::now(), record, suppressed);
        // One write per line, so lines from different threads do not interleave.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {
        let _ = std::io::stderr().flush();
    }
}

fn level_name(level: Level) -> &'static str {
    match level {
        Level::Error => "error",
        Level::Warn => "warn",
        Level::Info => "info",
        Level::Debug => "debug",
        Level::Trace => "trace",
    }
}

/// One log line, newline included.
fn format_line(format: LogFormat, at: SystemTime, record: &Record<'_>, suppressed: u64) -> String {
    let ts = humantime::format_rfc3339_millis(at).to_string();
    let level = level_name(record.level());
    let msg = record.args().to_string();
    match format {
        LogFormat::Json => {
            // Written by hand rather than through serde_json::Value, whose keys come out
            // sorted: the timestamp and level lead, as in logfmt.
            let string = |value: &str| serde_json::Value::from(value).to_string();
            let mut line = format!(
                "{{\"ts\":{},\"level\":{},\"target\":{},\"msg\":{}",
                string(&ts),
                string(level),
                string(record.target()),
                string(&msg)
            );
            if suppressed > 0 {
                line.push_str(&format!(",\"suppressed\":{suppressed}"));
            }
            line.push_str("}\n");
            line
        }
        LogFormat::Logfmt => {
            let mut line = format!(
                "ts={ts} level={level} target={} msg={}",
                logfmt_value(record.target()),
                logfmt_value(&msg)
            );
            if suppressed > 0 {
                line.push_str(&format!(" suppressed={suppressed}"));
            }
            line.push('\n');
            line
        }
    }
}

/// A logfmt value: bare when it is a plain word, else quoted with `"`, `\` and control
/// characters escaped (what go-logfmt, which node_exporter's logs come from, does).
fn logfmt_value(value: &str) -> String {
    let plain = !value.is_empty()
        && value
            .chars()
            .all(|c| !c.is_control() && !matches!(c, ' ' | '=' | '"' | '\\'));
    if plain {
        return value.to_owned();
    }
    let mut quoted = String::with_capacity(value.len() + 2);
    quoted.push('"');
    for c in value.chars() {
        match c {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            '\n' => quoted.push_str("\\n"),
            '\r' => quoted.push_str("\\r"),
            '\t' => quoted.push_str("\\t"),
            c if c.is_control() => quoted.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    quoted
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logger() -> Logger {
        Logger {
            filter: env_filter::Builder::new()
                .filter_level(LevelFilter::Info)
                .build(),
            format: LogFormat::Logfmt,
            sites: Mutex::default(),
        }
    }

    #[test]
    fn a_call_site_writes_once_per_window_and_then_says_how_many_it_dropped() {
        let logger = logger();
        let suppressed_before = SUPPRESSED.get_or_create(&[("level", "warn")]).get();
        let args = format_args!("disk full");
        let record = |line| {
            Record::builder()
                .level(Level::Warn)
                .file_static(Some("src/x.rs"))
                .line(Some(line))
                .args(args)
                .build()
        };
        let start = Instant::now();
        assert_eq!(logger.admit(&record(7), start), Some(0));
        assert_eq!(logger.admit(&record(7), start), None);
        assert_eq!(
            logger.admit(&record(7), start + Duration::from_secs(1)),
            None
        );
        // Another call site is not held back by this one.
        assert_eq!(logger.admit(&record(8), start), Some(0));
        assert_eq!(logger.admit(&record(7), start + REPEAT_WINDOW), Some(2));
        assert_eq!(logger.admit(&record(7), start + REPEAT_WINDOW), None);
        // Other tests may count too (the counter is process-wide): at least ours.
        assert!(SUPPRESSED.get_or_create(&[("level", "warn")]).get() >= suppressed_before + 3);
        // Info lines are never held back.
        let info = Record::builder()
            .level(Level::Info)
            .file_static(Some("src/x.rs"))
            .line(Some(9))
            .args(args)
            .build();
        for _ in 0..3 {
            assert_eq!(logger.admit(&info, start), Some(0));
        }
    }

    #[test]
    fn logfmt_quotes_what_would_split_the_line() {
        assert_eq!(logfmt_value("ready"), "ready");
        assert_eq!(logfmt_value(""), "\"\"");
        assert_eq!(
            logfmt_value("a \"b\"=c\\d\ne"),
            "\"a \\\"b\\\"=c\\\\d\\ne\""
        );
    }

    #[test]
    fn json_lines_are_objects_with_the_suppressed_count_when_there_is_one() {
        let args = format_args!("line \"one\"\nand two");
        let record = Record::builder()
            .level(Level::Warn)
            .target("keepalive_agent::x")
            .args(args)
            .build();
        let line = format_line(LogFormat::Json, SystemTime::UNIX_EPOCH, &record, 4);
        assert!(line.ends_with('\n') && line.matches('\n').count() == 1);
        assert!(line.starts_with("{\"ts\":"), "{line}");
        let object: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(object["ts"], "1970-01-01T00:00:00.000Z");
        assert_eq!(object["level"], "warn");
        assert_eq!(object["target"], "keepalive_agent::x");
        assert_eq!(object["msg"], "line \"one\"\nand two");
        assert_eq!(object["suppressed"], 4);
        let line = format_line(LogFormat::Logfmt, SystemTime::UNIX_EPOCH, &record, 0);
        assert_eq!(
            line,
            "ts=1970-01-01T00:00:00.000Z level=warn target=keepalive_agent::x \
             msg=\"line \\\"one\\\"\\nand two\"\n"
        );
    }
}
