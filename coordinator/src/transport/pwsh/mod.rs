//! The PowerShell transports (`psremoting` and `local`): one supervised `pwsh` child per host.
//!
//! The child runs `session_host.ps1` (shipped inside the binary) as
//! `pwsh -NoLogo -NoProfile -NonInteractive -File <script> -Mode none|winrm|ssh ...`. The script
//! opens one session to the target (WinRM `New-PSSession -ComputerName`, SSH `-HostName`, or a
//! runspace of its own for `none`, the `local` transport) and serves the JSON-lines contract of
//! [`contract`] on stdin/stdout. Steps run on the target; so do their idempotency markers, one
//! per key under the target's state directory: a finished key answers its stored result without
//! running, a key left `started` answers `Uncertain`.
//!
//! [`PwshSession`] supervises the child. It starts it lazily, says `hello` (contract `v: 1`)
//! and waits until the session is open. A child that exits, hangs past a deadline, or writes
//! one line that is not the contract is killed with its whole process tree, the session is
//! marked broken, and the next call starts a new child after an exponential back-off.
//! Work in flight never ends untyped: after a break the session asks the (new) child what the
//! key's marker says, and answers its stored result, or `Uncertain` (never a silent re-run).
//!
//! Credentials: the child gets only the *reference* (`TOLLGATE_CREDENTIAL_REF=env:NAME` or
//! `file:PATH`); the script resolves it, removes it from its own environment, and never prints
//! it. Nothing here logs or returns a secret.
//!
//! How outcomes map (for the `Host` actor):
//!
//! | what happened | answer |
//! |---|---|
//! | `pwsh` not found at `pwsh_path` | `execute`: `ExecStatus::CapabilityMismatch` naming the path; others: [`SessionError::PwshMissing`] |
//! | `pwsh` too old for the mode (SSH needs 7.3) | the same, [`SessionError::PwshTooOld`] naming both versions |
//! | the target refused the credential (or, over SSH, took the connection and then refused the session) | [`SessionError::AuthFailed`] (not transient) |
//! | SSH: the host key is not in the named `known_hosts` | [`SessionError::HostKeyUnknown`] (not transient; nothing connected) |
//! | SSH: the host offers another key than the pinned one | [`SessionError::HostKeyChanged`] (not transient; nothing authenticated) |
//! | the target cannot be reached, nothing sent | [`SessionError::Unreachable`] (transient) |
//! | the session broke during a probe or query | [`SessionError::Lost`] (transient) |
//! | the child wrote garbage | [`SessionError::Protocol`] (the child is restarted) |
//! | no answer in time | [`SessionError::Timeout`] (the child is killed and restarted) |
//! | the script threw | `ExecStatus::Exited { code: 1 }`, the record in [`PwshSession::last_script_error`] and on stderr |
//! | any break while a step was in flight | its marker's stored result, or `ExecStatus::Uncertain`; in `none` mode a key never started is [`SessionError::Unreachable`] |
//!
//! Layout: `session` holds [`PwshSession`] and its public calls; `lifecycle` starts, greets
//! and breaks the child; `wire` sends and receives one line; `probe` and `invoke` are the two
//! kinds of work; `script_file` puts the script on disk; `error` classifies failures;
//! `cancel` reaches a running invocation from outside.

pub mod answers;
mod cancel;
mod child;
pub mod contract;
mod error;
mod invoke;
mod lifecycle;
mod probe;
mod reach;
mod script_file;
mod session;
mod settings;
mod wire;

pub use cancel::Canceller;
pub use contract::ScriptError;
pub use error::{RefusalCode, SessionError};
pub use lifecycle::{CREDENTIAL_REF_ENV, HelloInfo, SessionHealth};
pub use reach::{reach_local, reach_remote};
pub use script_file::SESSION_HOST_SCRIPT;
pub use session::PwshSession;
pub use settings::{
    Backoff, CredentialRef, PwshMode, PwshSettings, SshTarget, WinRmAuth, WinRmTarget,
    resolve_program,
};
