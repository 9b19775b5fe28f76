//! Wire contracts of Tollgate.
//!
//! Two links share one framing:
//!
//! * **ctl** (`tollgate-ctl/1`): the `tollgate` CLI talks to the coordinator service
//!   ([`ctl::CtlRequest`] / [`ctl::CtlResponse`]).
//! * **agent** (`tollgate-agent/1`): the coordinator talks to a `tollgate-agent`
//!   ([`agent::AgentRequest`] / [`agent::AgentResponse`]).
//!
//! Every frame is a `u32` big-endian length followed by a MessagePack body (rmp-serde, named
//! fields). The body is always an [`Envelope`] whose `v` is the protocol version it is written in.
//! The length is checked against a configured maximum *before* any buffer is allocated and the
//! decoder caps nesting depth, so a hostile peer can neither make us allocate nor recurse.
//!
//! [`frame`] is sans-IO (byte buffers in, messages out); [`io`] puts async read/write helpers on
//! top for any tokio stream, quinn streams included. Nothing in this crate decides policy.

pub mod agent;
pub mod config_error;
pub mod ctl;
pub mod error;
pub mod error_chain;
pub mod frame;
#[cfg(feature = "io")]
pub mod io;
pub mod outcome;
pub mod version;

pub use config_error::ConfigError;
pub use error::FrameError;
pub use frame::{Envelope, FrameDecoder, FrameLimits, decode_body, encode_frame};
pub use version::{PROTOCOL_VERSION, SUPPORTED, VersionRange, negotiate};

/// ALPN of the coordinator <-> agent link.
pub const AGENT_ALPN: &[u8] = b"tollgate-agent/1";
/// ALPN of the CLI <-> coordinator link.
pub const CTL_ALPN: &[u8] = b"tollgate-ctl/1";

use serde::{Deserialize, Serialize};

/// What an intent asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Deploy,
    Teardown,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Deploy => "deploy",
            Action::Teardown => "teardown",
        }
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Requested or effective mode. `Quick` never destroys anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Quick,
    Full,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Quick => "quick",
            Mode::Full => "full",
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which interpreter runs a script.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Shell {
    Pwsh,
    Sh,
}

impl Shell {
    pub fn as_str(self) -> &'static str {
        match self {
            Shell::Pwsh => "pwsh",
            Shell::Sh => "sh",
        }
    }
}

impl std::fmt::Display for Shell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a PowerShell step's errors mean (`errors` of a step in `operations.toml`). The same on
/// every PowerShell path (a remoting session, the local transport, an agent's `pwsh`).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum StepErrors {
    /// The default. The step runs under `$ErrorActionPreference = 'Stop'`, so its first error
    /// stops it, and it fails (exit code 1) if it throws or writes any error record to the error
    /// stream, even one written with `-ErrorAction Continue` and followed by `exit 0`. A native
    /// command's stderr is not an error record: its exit code speaks for it.
    #[default]
    Stop,
    /// Opt-out: the step runs under `$ErrorActionPreference = 'Continue'`; error records are
    /// shown but decide nothing; the exit code alone does (a terminating error still fails it).
    Continue,
}

impl StepErrors {
    /// The word in the files: `stop` or `continue`.
    pub fn as_str(self) -> &'static str {
        match self {
            StepErrors::Stop => "stop",
            StepErrors::Continue => "continue",
        }
    }

    /// Whether this is the default (`stop`).
    pub fn is_stop(&self) -> bool {
        *self == StepErrors::Stop
    }
}

impl std::fmt::Display for StepErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
