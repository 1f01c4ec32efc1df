//! keepalive-agent: per-connection TCP keepalive visibility from eBPF.
//!
//! The data path, one module per stage: [`programs`] (kernel hooks) → [`ring_reader`] →
//! [`decoder`] → [`connection_table`] → [`classifier`] → [`metrics`], glued by [`pipeline`]
//! and started by [`agent`]. [`kernel_layout`] and [`kallsyms`] resolve what the kernel
//! programs need to know about the running kernel.

pub mod agent;
pub mod audit;
pub mod classifier;
pub mod connection_table;
pub mod decoder;
pub mod http;
pub mod hz;
pub mod kallsyms;
pub mod kernel_layout;
pub mod metrics;
pub mod pipeline;
pub mod programs;
pub mod ring_reader;
