//! keepalive-agent: per-connection TCP keepalive visibility from eBPF.
//!
//! Folders are the stages a kernel record moves through, and imports run one way, from the top
//! room down (ARCHITECTURE.md draws the tree):
//!
//! - [`cmd`]: the commands (`run`, `watch`, `check`, `sockets`);
//! - [`pipeline`]: wires the stages below for one record;
//! - [`audit`]: the periodic keepalive configuration walk, and its metrics;
//! - [`export`]: what leaves the agent (labels, metrics, HTTP, the event stream);
//! - [`track`]: connection state and drop classification, without I/O;
//! - [`attribution`]: who owns a socket (cgroup, Kubernetes ids, process);
//! - [`record`]: the ring buffer and the record decoder;
//! - [`logging`]: the log line formats, levels and the bound on repeated warnings;
//! - [`files`]: bounded reads of the files the agent parses, with errno-specific hints;
//! - [`kernel`]: everything about the running kernel (BTF layout, symbols, HZ, programs,
//!   namespaces), opened once as a [`kernel::Session`].

pub(crate) mod attribution;
pub(crate) mod audit;
pub mod cmd;
pub(crate) mod export;
pub(crate) mod files;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod kernel;
pub mod logging;
pub(crate) mod pipeline;
pub(crate) mod record;
pub(crate) mod track;

/// The cgroup v2 mount the agent attributes sockets under by default; the integration tests
/// build their kubelet-shaped cgroups there.
pub use attribution::system_cgroup2_mount;

/// The pipeline's cost per record, for `cargo xtask bench`.
#[doc(hidden)]
pub use pipeline::benchmark::{
    Throughput, pipeline_throughput, probing_throughput, reconcile_cost,
};

/// The counter sweep's metric names, which the integration tests and the matrix's guest read.
pub use export::metrics::sweep_metric;

/// The name of an error TCP reports in `sk_err` (`ETIMEDOUT`, ...), as the event stream and
/// `watch` print it; the integration tests name errors the same way.
pub use export::events::errno_name;
