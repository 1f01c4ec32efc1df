//! What leaves the agent: label sets, the Prometheus registry and its collectors, the HTTP
//! server (`/metrics`, `/healthz`, `/readyz`), and the JSON event stream.

pub(crate) mod events;
pub(crate) mod exposition;
pub(crate) mod http;
pub(crate) mod labels;
pub(crate) mod metrics;
pub(crate) mod web_config;
