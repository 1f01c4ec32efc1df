//! Addresses of the timer callbacks the kernel programs filter on.

use std::{io, path::Path};

#[derive(Debug, thiserror::Error)]
pub enum KallsymsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "{0} is not in /proc/kallsyms: this kernel has no TCP keepalive timer function of that name"
    )]
    Missing(&'static str),
    #[error(
        "/proc/kallsyms shows {0} at address 0: run the agent as root (or with CAP_SYSLOG) and check kernel.kptr_restrict"
    )]
    Hidden(&'static str),
}

/// Callback addresses as `timer_list.function` holds them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimerFunctions {
    pub keepalive: u64,
    pub write: u64,
}

pub(crate) const KEEPALIVE_TIMER: &str = "tcp_keepalive_timer";
pub(crate) const WRITE_TIMER: &str = "tcp_write_timer";

impl TimerFunctions {
    pub fn from_proc() -> Result<Self, KallsymsError> {
        Self::from_file(Path::new("/proc/kallsyms"))
    }

    pub(crate) fn from_file(path: &Path) -> Result<Self, KallsymsError> {
        let text = crate::files::read_string_bounded(path, crate::files::cap::KALLSYMS).map_err(
            |source| KallsymsError::Read {
                path: path.display().to_string(),
                source,
            },
        )?;
        Self::parse(&text)
    }

    pub(crate) fn parse(text: &str) -> Result<Self, KallsymsError> {
        Ok(Self {
            keepalive: find(text, KEEPALIVE_TIMER)?,
            write: find(text, WRITE_TIMER)?,
        })
    }
}

fn find(text: &str, name: &'static str) -> Result<u64, KallsymsError> {
    let address = text
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_ascii_whitespace();
            let address = fields.next()?;
            let kind = fields.next()?;
            let symbol = fields.next()?;
            // Text symbols only; `.cold` parts and `__pfx_` padding have other names.
            (symbol == name && matches!(kind, "t" | "T")).then_some(address)
        })
        .next()
        .ok_or(KallsymsError::Missing(name))?;
    match u64::from_str_radix(address, 16) {
        Ok(0) | Err(_) => Err(KallsymsError::Hidden(name)),
        Ok(address) => Ok(address),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
ffffffff812445d3 t tcp_keepalive_timer.cold
ffffffff8208c300 t __pfx_tcp_keepalive_timer
ffffffff8208c310 t tcp_keepalive_timer
ffffffff8208d780 t tcp_write_timer
ffffffff8208d790 T tcp_write_timer_handler
";

    #[test]
    fn finds_exact_text_symbols() {
        let f = TimerFunctions::parse(SAMPLE).unwrap();
        assert_eq!(f.keepalive, 0xffffffff8208c310);
        assert_eq!(f.write, 0xffffffff8208d780);
    }

    #[test]
    fn restricted_kallsyms_says_what_to_do() {
        let hidden = SAMPLE.replace("ffffffff8208c310", "0000000000000000");
        let err = TimerFunctions::parse(&hidden).unwrap_err();
        assert!(
            matches!(err, KallsymsError::Hidden(KEEPALIVE_TIMER)),
            "{err}"
        );
    }

    #[test]
    fn missing_symbol_is_named() {
        let err = TimerFunctions::parse("ffffffff8208d780 t tcp_write_timer\n").unwrap_err();
        assert!(err.to_string().contains(KEEPALIVE_TIMER));
    }
}
