//! The keepalive configuration audit: [`iter`] walks every TCP socket through the `iter/tcp`
//! program, [`summary`] turns a walk into per-namespace figures and their metrics, [`task`]
//! repeats the walk every `--audit.interval`.

pub(crate) mod iter;
pub(crate) mod summary;
pub(crate) mod task;
