//! The Tollgate coordinator.
//!
//! * [`pki`]: the `tollgate certs` commands over `tollgate-certs`.

pub mod pki;
