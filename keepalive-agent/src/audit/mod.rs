//! The keepalive configuration audit: [`walk`] reads every TCP socket from the kernel's TCP
//! hash tables, [`summary`] turns a walk into per-namespace figures and their metrics, [`task`]
//! repeats the walk every `--audit.interval`.

pub(crate) mod summary;
pub(crate) mod task;
pub(crate) mod walk;
