//! The Tollgate coordinator.
//!
//! * [`pki`]: the `tollgate certs` commands over `tollgate-certs`.
//! * [`transport`]: how hosts are reached (the agent link over QUIC + mTLS).

pub mod pki;
pub mod transport;
