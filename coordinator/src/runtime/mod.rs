//! The actix runtime: actors that carry messages and do I/O around the pure safety core.
//!
//! * [`coordinator::Coordinator`]: intake of intents, the runs registry, the token authority.
//! * [`run::RunActor`]: one per run; drives a [`crate::core::run::RunMachine`].
//! * [`host::HostActor`]: one per host; owns its transport session, serializes work on it.
//! * [`recorder::Recorder`]: the single writer of journals, on its own thread.

pub mod clock;
pub mod coordinator;
pub mod host;
pub mod nonces;
pub mod recorder;
pub mod run;
