//! `tollgate-agent`: the small host agent. It does exactly what an authenticated coordinator
//! asks, once, and remembers what it did.
//!
//! * [`config`]: `agent.toml`, validated with errors that name file, key and reason.
//! * [`store`]: the durable idempotency store (key -> started | finished(result)), fsynced.
//! * [`exec`]: runs one script in its own process group with streaming output, timeout and cancel.
//! * [`probe`]: built-in facts, probe-script facts, and the fingerprint.
//! * [`shells`]: which interpreters are allowed and where they are.
//! * [`server`]: the QUIC + mTLS endpoint that accepts only the configured coordinator.

pub mod config;
pub mod error;
pub mod exec;
pub mod probe;
pub mod server;
pub mod shells;
pub mod store;
pub mod store_log;

pub use error::AgentError;
