//! Reading the files the agent parses from outside (procfs, sysfs, cgroupfs, files named by
//! flags): every read has a size cap, so a flag pointing at `/dev/urandom` or a huge file costs
//! at most the cap, and every error says what the errno means for the operator.

use std::{
    fs::File,
    io::{self, BufRead as _, BufReader, Read as _},
    path::Path,
};

/// Caps, each well above what the file holds on a large host.
pub(crate) mod cap {
    /// `/proc/kallsyms`: ~10 MB on a distribution kernel with every module.
    pub(crate) const KALLSYMS: u64 = 256 << 20;
    /// `/sys/kernel/btf/vmlinux`: ~6 MB.
    pub(crate) const BTF: u64 = 128 << 20;
    /// `/proc/self/mounts`, `/proc/self/mountinfo`: a node with thousands of pods has thousands
    /// of mounts of ~150 bytes.
    pub(crate) const MOUNTS: u64 = 64 << 20;
    /// `/proc/net/ip_vs`: one line per Service and per endpoint of it; 64 MiB is about a
    /// million of them.
    pub(crate) const IPVS: u64 = 64 << 20;
    /// `/proc/timer_list`: a few KB per CPU.
    pub(crate) const TIMER_LIST: u64 = 64 << 20;
    /// `cgroup.procs`: one pid per line.
    pub(crate) const CGROUP_PROCS: u64 = 16 << 20;
    /// `/proc/PID/comm` (TASK_COMM_LEN), `/proc/self/status`.
    pub(crate) const SMALL: u64 = 64 << 10;
    /// One line of a line-oriented file.
    pub(crate) const LINE: u64 = 64 << 10;
}

/// Reads `path` whole, failing with `FileTooLarge` beyond `limit` bytes.
pub(crate) fn read_bounded(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    File::open(path)?
        .take(limit.saturating_add(1))
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(too_large(limit));
    }
    Ok(bytes)
}

/// [`read_bounded`] as UTF-8.
pub(crate) fn read_string_bounded(path: &Path, limit: u64) -> io::Result<String> {
    String::from_utf8(read_bounded(path, limit)?)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8 text"))
}

/// Calls `f` on each line of `path` (without its newline, lossy UTF-8) until it returns
/// `Some`, reading at most `limit` bytes and lines of at most [`cap::LINE`] bytes, so memory is
/// bounded whatever the file is.
pub(crate) fn find_line<T>(
    path: &Path,
    limit: u64,
    mut f: impl FnMut(&str) -> Option<T>,
) -> io::Result<Option<T>> {
    let mut reader = BufReader::new(File::open(path)?.take(limit));
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut reader).take(cap::LINE).read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(None);
        }
        if line.last() != Some(&b'\n') && n as u64 == cap::LINE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a line longer than {} bytes", cap::LINE),
            ));
        }
        let text = String::from_utf8_lossy(&line);
        if let Some(found) = f(text.trim_end_matches('\n')) {
            return Ok(Some(found));
        }
    }
}

fn too_large(limit: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::FileTooLarge,
        format!("larger than {limit} bytes: not the file the agent expects"),
    )
}

/// What an I/O error means for the operator, by errno.
pub(crate) fn io_reason(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ENOENT) => "does not exist".to_owned(),
        Some(libc::ENOTDIR) => "a parent of it is not a directory".to_owned(),
        Some(libc::EACCES | libc::EPERM) => {
            "permission denied (run as root, or give the agent read access)".to_owned()
        }
        Some(libc::ELOOP) => "too many symbolic links".to_owned(),
        Some(libc::ENAMETOOLONG) => "the path is too long".to_owned(),
        Some(libc::EISDIR) => "is a directory, not a file".to_owned(),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endless_files_cost_at_most_the_cap() {
        let err = read_bounded(Path::new("/dev/zero"), 1 << 20).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::FileTooLarge);
        // /dev/zero has no newline: the line cap stops it.
        let err = find_line(Path::new("/dev/zero"), 1 << 30, |_| Some(())).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        // /dev/urandom has newlines now and then: the total cap stops it.
        let found = find_line(Path::new("/dev/urandom"), 1 << 20, |_| None::<()>).unwrap();
        assert_eq!(found, None);
    }

    #[test]
    fn reads_within_the_cap_and_finds_lines() {
        let status = read_string_bounded(Path::new("/proc/self/status"), cap::SMALL).unwrap();
        assert!(status.contains("Pid:"));
        let pid = find_line(Path::new("/proc/self/status"), cap::SMALL, |l| {
            l.strip_prefix("Pid:").map(|v| v.trim().to_owned())
        })
        .unwrap();
        assert_eq!(pid, Some(std::process::id().to_string()));
    }

    #[test]
    fn reasons_follow_the_errno() {
        let missing = File::open("/nonexistent").unwrap_err();
        assert_eq!(io_reason(&missing), "does not exist");
        assert!(io_reason(&io::Error::from_raw_os_error(libc::EACCES)).contains("permission"));
    }
}
