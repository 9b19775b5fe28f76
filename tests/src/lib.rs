//! The fleet test harness: a throwaway PKI, real `tollgate-agent` processes on 127.0.0.x, and
//! the coordinator's own agent client to drive them. Tests wait on events (a line printed, a
//! chunk streamed, a process exiting) with timeouts, never on sleeps.

pub mod bins;
pub mod evidence;
pub mod fleet;
pub mod invariants;
pub mod lab;
pub mod netns;
pub mod operations;
pub mod proc;
pub mod pwsh;
pub mod real;
pub mod results;
pub mod seeds;
#[cfg(target_os = "linux")]
pub mod sshd;
