//! The session-host contract, version 1: one JSON object per line, requests on the child's
//! stdin, responses on its stdout. Sans-IO: lines in, messages out; [`super::child`] owns the pipes.
//!
//! Every request carries an `id` the coordinator picks; every response carries the `id` of the
//! request it answers (`0` when the request could not be read at all). `hello` comes first and
//! names the contract version (`"v": 1`); the session host answers `hello` only once its session
//! to the target is open, or `fail` (and exits) when it cannot open it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tollgate_protocol::agent::{ExecResult, ExecStatus, IdempotencyStatus};
use tollgate_protocol::{Shell, StepErrors};

/// The contract version this coordinator speaks.
pub const CONTRACT_VERSION: u32 = 1;

/// Largest line accepted from a session host by default; longer is a contract violation.
pub const DEFAULT_MAX_LINE: usize = 1 << 20;

/// A request line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// `{"op":"hello","id":1,"v":1,"software":"tollgate 0.1.0"}`
    Hello { id: u64, v: u32, software: String },
    /// `{"op":"probe","id":2,"shell":"pwsh","script":"@{role='web'} | ConvertTo-Json","timeout_ms":5000}`
    Probe {
        id: u64,
        shell: Option<Shell>,
        script: Option<String>,
        timeout_ms: u64,
    },
    /// `{"op":"invoke","id":3,"key":"run-1/web1/deploy.1","request_sha":"…","shell":"pwsh",
    /// "script":"Write-Output hi","env":{"TOLLGATE_STEP":"deploy.1"},"working_dir":null,
    /// "timeout_ms":60000,"errors":"stop"}`
    Invoke {
        id: u64,
        key: String,
        /// SHA-256 of the request's shell, script, environment, working directory and errors: a key
        /// reused for a different request is refused, never replayed.
        request_sha: String,
        shell: Shell,
        script: String,
        env: BTreeMap<String, String>,
        working_dir: Option<String>,
        timeout_ms: u64,
        /// `stop` or `continue`: what the script's error records mean.
        errors: StepErrors,
    },
    /// `{"op":"cancel","id":4,"key":"run-1/web1/deploy.1"}`
    Cancel { id: u64, key: String },
    /// `{"op":"query","id":5,"key":"run-1/web1/deploy.1"}`
    Query { id: u64, key: String },
}

impl Request {
    pub fn id(&self) -> u64 {
        match self {
            Request::Hello { id, .. }
            | Request::Probe { id, .. }
            | Request::Invoke { id, .. }
            | Request::Cancel { id, .. }
            | Request::Query { id, .. } => *id,
        }
    }

    pub fn op(&self) -> &'static str {
        match self {
            Request::Hello { .. } => "hello",
            Request::Probe { .. } => "probe",
            Request::Invoke { .. } => "invoke",
            Request::Cancel { .. } => "cancel",
            Request::Query { .. } => "query",
        }
    }
}

/// Which stream a text chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TextStream {
    Stdout,
    Stderr,
}

/// A PowerShell error record that ended a script (a terminating error).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScriptError {
    /// `$_.Exception.Message`.
    pub message: String,
    /// `$_.CategoryInfo.Category`, e.g. `OperationStopped`, `ObjectNotFound`.
    pub category: String,
    /// `$_.FullyQualifiedErrorId`.
    #[serde(default)]
    pub fqid: Option<String>,
}

/// How an invocation ended, as the session host says it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WireStatus {
    /// The script ended by itself; `code` is `exit N`, the last native exit code, or 1 for a
    /// terminating error (then the result's `error` says which).
    Exited {
        code: i32,
    },
    TimedOut,
    Cancelled,
    /// The shell is not available on the target; nothing ran.
    CapabilityMismatch {
        shell: Shell,
        detail: String,
    },
    /// The step could not be started (its wrapper failed before the marker); nothing ran.
    SpawnFailed {
        detail: String,
    },
    /// The key was left `started` with no result: whether the script ran is unknown.
    Uncertain {
        detail: String,
    },
}

impl WireStatus {
    pub fn into_exec_status(self) -> ExecStatus {
        match self {
            WireStatus::Exited { code } => ExecStatus::Exited { code },
            WireStatus::TimedOut => ExecStatus::TimedOut,
            WireStatus::Cancelled => ExecStatus::Cancelled,
            WireStatus::CapabilityMismatch { shell, detail } => {
                ExecStatus::CapabilityMismatch { shell, detail }
            }
            WireStatus::SpawnFailed { detail } => ExecStatus::SpawnFailed { detail },
            WireStatus::Uncertain { detail } => ExecStatus::Uncertain { detail },
        }
    }
}

/// A result as stored in a key's marker (and so answered by `query`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredResult {
    pub status: WireStatus,
    #[serde(default)]
    pub error: Option<ScriptError>,
    #[serde(default)]
    pub duration_ms: u64,
}

/// What the target's marker says about a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyState {
    NotFound,
    Running,
    Uncertain,
    Finished,
}

/// Why the session host refused or could not serve a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailCode {
    /// The request was not a contract request.
    BadRequest,
    UnsupportedVersion,
    /// The target refused the credential (not transient).
    AuthFailed,
    /// The target could not be reached (transient; nothing ran).
    Unreachable,
    /// SSH: the target's host key is not in the named known_hosts file (not transient; no
    /// connection was made).
    HostKeyUnknown,
    /// SSH: the target offers a host key other than the pinned one (not transient).
    HostKeyChanged,
    /// This `pwsh` lacks what the mode needs (SSH: `New-PSSession -Options`, 7.3+).
    PwshTooOld,
    /// The credential reference could not be resolved (not transient).
    CredentialUnavailable,
    /// The session to the target broke; the session host exits after saying so.
    SessionLost,
    /// Another request is running (only `cancel` is served meanwhile).
    Busy,
    /// The key was used before for a different request.
    IdempotencyConflict,
    /// The probe script failed or printed no facts.
    ProbeFailed,
    /// The probe did not finish within its `timeout_ms`.
    TimedOut,
    Internal,
    /// A code this coordinator does not know (a newer session host).
    #[serde(other)]
    Other,
}

impl FailCode {
    pub fn as_str(self) -> &'static str {
        match self {
            FailCode::BadRequest => "bad_request",
            FailCode::UnsupportedVersion => "unsupported_version",
            FailCode::AuthFailed => "auth_failed",
            FailCode::Unreachable => "unreachable",
            FailCode::HostKeyUnknown => "host_key_unknown",
            FailCode::HostKeyChanged => "host_key_changed",
            FailCode::PwshTooOld => "pwsh_too_old",
            FailCode::CredentialUnavailable => "credential_unavailable",
            FailCode::SessionLost => "session_lost",
            FailCode::Busy => "busy",
            FailCode::IdempotencyConflict => "idempotency_conflict",
            FailCode::ProbeFailed => "probe_failed",
            FailCode::TimedOut => "timed_out",
            FailCode::Internal => "internal",
            FailCode::Other => "other",
        }
    }
}

/// A response line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    /// `{"type":"hello","id":1,"v":1,"software":"tollgate-session-host/1","ps_version":"7.4.6",
    /// "mode":"winrm","instance":"5f0c…"}`
    Hello {
        id: u64,
        v: u32,
        software: String,
        ps_version: String,
        mode: String,
        instance: String,
    },
    /// `{"type":"output","id":3,"stream":"stdout","data":"hi\n"}`
    Output {
        id: u64,
        stream: TextStream,
        data: String,
    },
    /// A non-terminating error record: `{"type":"error","id":3,"data":"…\n","category":"NotSpecified"}`
    Error {
        id: u64,
        data: String,
        #[serde(default)]
        category: Option<String>,
    },
    /// `{"type":"progress","id":3,"activity":"Copying","status":"3 of 10","percent":30}`
    Progress {
        id: u64,
        #[serde(default)]
        activity: String,
        #[serde(default)]
        status: String,
        #[serde(default)]
        percent: Option<i64>,
    },
    /// The terminal answer to `invoke`: `{"type":"result","id":3,"key":"…","status":{"kind":
    /// "exited","code":0},"error":null,"duration_ms":41,"replayed":false}`
    Result {
        id: u64,
        key: String,
        status: WireStatus,
        #[serde(default)]
        error: Option<ScriptError>,
        duration_ms: u64,
        replayed: bool,
    },
    /// `{"type":"probe","id":2,"facts":{"host.name":"web1",…},"volatile":{"time.unix_ms":"…"},
    /// "script_output":"{\"role\":\"web\"}"}`
    Probe {
        id: u64,
        facts: BTreeMap<String, String>,
        #[serde(default)]
        volatile: BTreeMap<String, String>,
        #[serde(default)]
        script_output: Option<String>,
    },
    /// `{"type":"cancel","id":4,"found":true}`
    Cancel { id: u64, found: bool },
    /// `{"type":"query","id":5,"key":"…","state":"finished","result":{"status":{…},…}}`
    Query {
        id: u64,
        key: String,
        state: KeyState,
        #[serde(default)]
        result: Option<StoredResult>,
    },
    /// A terminal refusal of any request: `{"type":"fail","id":1,"code":"auth_failed",
    /// "message":"Access is denied."}`
    Fail {
        id: u64,
        code: FailCode,
        message: String,
    },
}

impl Response {
    pub fn id(&self) -> u64 {
        match self {
            Response::Hello { id, .. }
            | Response::Output { id, .. }
            | Response::Error { id, .. }
            | Response::Progress { id, .. }
            | Response::Result { id, .. }
            | Response::Probe { id, .. }
            | Response::Cancel { id, .. }
            | Response::Query { id, .. }
            | Response::Fail { id, .. } => *id,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Response::Hello { .. } => "hello",
            Response::Output { .. } => "output",
            Response::Error { .. } => "error",
            Response::Progress { .. } => "progress",
            Response::Result { .. } => "result",
            Response::Probe { .. } => "probe",
            Response::Cancel { .. } => "cancel",
            Response::Query { .. } => "query",
            Response::Fail { .. } => "fail",
        }
    }
}

/// A line that is not the contract.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContractError {
    #[error("line of {len} bytes exceeds the {max}-byte limit")]
    TooLong { len: usize, max: usize },
    #[error("line is not UTF-8")]
    NotUtf8,
    #[error("not a contract response ({reason}): {excerpt:?}")]
    NotContract { reason: String, excerpt: String },
    #[error("cannot encode request: {0}")]
    Encode(String),
}

/// The first characters of a bad line, for error messages.
fn excerpt(line: &str) -> String {
    const MAX: usize = 120;
    let mut out: String = line.chars().take(MAX).collect();
    if line.chars().count() > MAX {
        out.push('…');
    }
    out
}

/// One request as a line, newline included.
pub fn encode_request(req: &Request) -> Result<String, ContractError> {
    let mut line = serde_json::to_string(req).map_err(|e| ContractError::Encode(e.to_string()))?;
    line.push('\n');
    Ok(line)
}

/// One response line (without its newline; a trailing `\r` is tolerated).
pub fn decode_response(line: &[u8], max: usize) -> Result<Response, ContractError> {
    if line.len() > max {
        return Err(ContractError::TooLong {
            len: line.len(),
            max,
        });
    }
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let text = std::str::from_utf8(line).map_err(|_| ContractError::NotUtf8)?;
    serde_json::from_str(text).map_err(|e| ContractError::NotContract {
        reason: e.to_string(),
        excerpt: excerpt(text),
    })
}

/// A stored result as the protocol's [`ExecResult`]; `replayed` says it came from a marker.
pub fn exec_result(key: &str, stored: StoredResult, replayed: bool) -> ExecResult {
    ExecResult {
        idempotency_key: key.to_string(),
        status: stored.status.into_exec_status(),
        duration_ms: stored.duration_ms,
        stdout_truncated: false,
        stderr_truncated: false,
        replayed,
    }
}

/// A `query` answer as the protocol's [`IdempotencyStatus`].
pub fn idempotency_status(
    key: &str,
    state: KeyState,
    result: Option<StoredResult>,
) -> Result<IdempotencyStatus, String> {
    Ok(match (state, result) {
        (KeyState::NotFound, _) => IdempotencyStatus::NotFound,
        (KeyState::Running, _) => IdempotencyStatus::Running,
        (KeyState::Uncertain, _) => IdempotencyStatus::Uncertain,
        (KeyState::Finished, Some(r)) => IdempotencyStatus::Finished(exec_result(key, r, true)),
        (KeyState::Finished, None) => {
            return Err(format!("key {key} is finished but no result was sent"));
        }
    })
}

/// Turns a probe script's output (one JSON object) into `probe.KEY` facts: strings as-is,
/// anything else as compact JSON. The same rule as the agent's.
pub fn script_facts(output: &str) -> Result<BTreeMap<String, String>, String> {
    let value: serde_json::Value = serde_json::from_str(output.trim())
        .map_err(|e| format!("probe output is not JSON: {e}"))?;
    let serde_json::Value::Object(map) = value else {
        return Err("probe output must be one JSON object".into());
    };
    Ok(map
        .into_iter()
        .map(|(k, v)| {
            let text = match v {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            (format!("probe.{k}"), text)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn requests_are_one_line_with_op_and_id() {
        let line = encode_request(&Request::Invoke {
            id: 3,
            key: "k".into(),
            request_sha: "s".into(),
            shell: Shell::Pwsh,
            script: "a\nb".into(),
            env: BTreeMap::new(),
            working_dir: None,
            timeout_ms: 10,
            errors: StepErrors::Continue,
        })
        .unwrap();
        assert!(line.ends_with('\n'));
        assert_eq!(line.matches('\n').count(), 1);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["op"], "invoke");
        assert_eq!(v["id"], 3);
        assert_eq!(v["shell"], "pwsh");
        assert_eq!(v["errors"], "continue");
        let hello = encode_request(&Request::Hello {
            id: 1,
            v: CONTRACT_VERSION,
            software: "t".into(),
        })
        .unwrap();
        assert!(hello.contains(r#""v":1"#));
    }

    #[test]
    fn responses_decode_and_garbage_does_not() {
        let r = decode_response(
            br#"{"type":"result","id":3,"key":"k","status":{"kind":"exited","code":2},"error":{"message":"boom","category":"OperationStopped","fqid":"boom"},"duration_ms":5,"replayed":false}"#,
            DEFAULT_MAX_LINE,
        )
        .unwrap();
        let Response::Result { status, error, .. } = r else {
            panic!("not a result: {r:?}")
        };
        assert_eq!(status, WireStatus::Exited { code: 2 });
        assert_eq!(error.unwrap().category, "OperationStopped");
        let f = decode_response(
            br#"{"type":"fail","id":0,"code":"something_new","message":"m"}"#,
            DEFAULT_MAX_LINE,
        )
        .unwrap();
        assert!(matches!(
            f,
            Response::Fail {
                code: FailCode::Other,
                ..
            }
        ));
        for bad in [
            &b"hello there"[..],
            br#"{"type":"nope","id":1}"#,
            br#"{"id":1}"#,
            b"",
        ] {
            assert!(matches!(
                decode_response(bad, DEFAULT_MAX_LINE),
                Err(ContractError::NotContract { .. })
            ));
        }
        assert!(matches!(
            decode_response(&[b'x'; 20], 10),
            Err(ContractError::TooLong { len: 20, max: 10 })
        ));
        assert_eq!(
            decode_response(&[0xff, 0xfe], 10),
            Err(ContractError::NotUtf8)
        );
    }

    #[test]
    fn probe_output_must_be_one_object() {
        let f = script_facts(r#"{"role":"web","port":443}"#).unwrap();
        assert_eq!(f["probe.role"], "web");
        assert_eq!(f["probe.port"], "443");
        assert!(script_facts("[1]").unwrap_err().contains("object"));
        assert!(script_facts("nope").unwrap_err().contains("not JSON"));
    }
}
