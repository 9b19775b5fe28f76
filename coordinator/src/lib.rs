//! The Tollgate coordinator.
//!
//! * [`config`]: `inventory.toml`, `operations.toml`, `coordinator.toml`, read here and parsed
//!   and validated by the core.
//! * [`core`]: the pure safety core, the `tollgate-core` crate (`coordinator/core/`):
//!   lifecycle, policy, plan, token, barrier, run machine, run ledger, config parsing. It
//!   depends on no async runtime, network or file API, so the compiler keeps it pure.
//! * [`pki`]: the `tollgate certs` commands over `tollgate-certs`.
//! * [`transport`]: how hosts are reached (the agent link over QUIC + mTLS).

pub mod client;
pub mod config;
pub use tollgate_core as core;
pub mod diff;
pub mod exit;
pub mod explain;
pub mod journal;
pub mod lab;
pub mod pki;
pub mod render;
pub mod runtime;
pub mod service;
pub mod transport;
