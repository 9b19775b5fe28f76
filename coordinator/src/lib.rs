//! The Tollgate coordinator.
//!
//! * [`config`]: `inventory.toml`, `operations.toml`, `coordinator.toml`, validated on load.
//! * [`core`]: the pure safety core (lifecycle, policy, plan, token, barrier). No I/O, no
//!   clock reads, no actors: every safety rule lives here so every path goes through it.
//! * [`pki`]: the `tollgate certs` commands over `tollgate-certs`.
//! * [`transport`]: how hosts are reached (the agent link over QUIC + mTLS).

pub mod client;
pub mod config;
pub mod core;
pub mod diff;
pub mod explain;
pub mod journal;
pub mod lab;
pub mod pki;
pub mod render;
pub mod runtime;
pub mod service;
pub mod transport;
