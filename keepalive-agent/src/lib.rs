//! keepalive-agent: per-connection TCP keepalive visibility from eBPF.
//!
//! The data path, one module per stage: [`programs`] (kernel hooks) → [`ring_reader`] →
//! [`decoder`] → [`connection_table`] → [`classifier`] → [`metrics`], glued by [`pipeline`]
//! and started by [`agent`]. [`kernel_layout`] and [`kallsyms`] resolve what the kernel
//! programs need to know about the running kernel.

pub mod agent;
pub mod attribution;
pub mod audit;
pub mod audit_summary;
pub mod audit_task;
pub mod check;
pub mod classifier;
pub mod connection_table;
pub mod decoder;
pub mod events;
pub mod exposition;
pub mod http;
pub mod hz;
pub mod kallsyms;
pub mod kernel_layout;
pub mod metrics;
pub mod netns;
pub mod pipeline;
pub mod programs;
pub mod ring_reader;
pub mod sockets_cli;
pub mod watch;
