//! What the real-`pwsh` tests share: a `local` session on the real pwsh, a step, running it with
//! a deadline, its output per stream, and PowerShell quoting.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tollgate_coordinator::transport::pwsh::{PwshMode, PwshSession, PwshSettings};
use tollgate_protocol::agent::{ExecResult, ExecStatus, ExecuteRequest, OutputChunk, Stream};
use tollgate_protocol::{Shell, StepErrors};

/// How long any one call of these tests may take.
pub const LIMIT: Duration = Duration::from_secs(120);

/// A `local` (in-process) session on `pwsh`, its markers under `dir/state`.
pub fn local_session(pwsh: PathBuf, dir: &Path) -> PwshSession {
    let mut s = PwshSettings::new(pwsh, PwshMode::None);
    s.state_dir = Some(dir.join("state").to_string_lossy().into_owned());
    s.connect_timeout = Duration::from_secs(60);
    s.request_timeout = Duration::from_secs(30);
    s.answer_margin = Duration::from_secs(30);
    PwshSession::new("local".into(), s)
}

/// A step under `key`, with `TOLLGATE_STEP=deploy.1` in its environment.
pub fn step(key: &str, shell: Shell, script: &str, timeout_ms: u64) -> ExecuteRequest {
    ExecuteRequest {
        idempotency_key: key.to_string(),
        shell,
        script: script.to_string(),
        env: BTreeMap::from([("TOLLGATE_STEP".to_string(), "deploy.1".to_string())]),
        working_dir: None,
        timeout_ms,
        errors: tollgate_protocol::StepErrors::Stop,
    }
}

/// Runs `req` on `s` within [`LIMIT`]; panics (failing the calling test) if it does not finish
/// or fails untyped.
#[allow(clippy::panic)]
pub async fn execute(s: &mut PwshSession, req: ExecuteRequest) -> (ExecResult, Vec<OutputChunk>) {
    let mut chunks = Vec::new();
    let r = tokio::time::timeout(LIMIT, s.execute(req, |c| chunks.push(c)))
        .await
        .unwrap_or_else(|_| panic!("no answer within {LIMIT:?}"))
        .unwrap_or_else(|e| panic!("not executed: {e}"));
    (r, chunks)
}

/// The text of `stream` in `chunks`, in order.
pub fn stream_text(chunks: &[OutputChunk], stream: Stream) -> String {
    chunks
        .iter()
        .filter(|c| c.stream == stream)
        .map(|c| String::from_utf8_lossy(&c.data).into_owned())
        .collect()
}

/// `s` as a single-quoted PowerShell literal.
pub fn ps_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A path as a single-quoted PowerShell literal.
pub fn ps_path(p: &Path) -> String {
    ps_quote(&p.display().to_string())
}

/// One case of a step's error semantics: a pwsh script and the exit code it must end with
/// under `errors = "stop"` (the default) and under `errors = "continue"`. The same table runs
/// on every PowerShell path: the local transport, an SSH remoting session, an agent's pwsh.
#[derive(Debug)]
pub struct ErrorCase {
    /// What it shows.
    pub name: &'static str,
    /// The step.
    pub script: &'static str,
    /// Exit code under `stop`.
    pub stop: i32,
    /// Exit code under `continue`.
    pub continue_: i32,
    /// Text stdout must contain under `continue` (and must not under `stop`, when the first
    /// error stops the script before it), if any.
    pub after: Option<&'static str>,
}

/// The table (needs `sh` on the target for the native-command cases).
pub const ERROR_CASES: &[ErrorCase] = &[
    ErrorCase {
        name: "Write-Error then exit 0",
        script: "Write-Error 'tg-bad'\nWrite-Output 'tg-after'\nexit 0",
        stop: 1,
        continue_: 0,
        after: Some("tg-after"),
    },
    ErrorCase {
        name: "Write-Error -ErrorAction Continue then exit 0",
        script: "Write-Error 'tg-bad' -ErrorAction Continue\nexit 0",
        stop: 1,
        continue_: 0,
        after: None,
    },
    ErrorCase {
        name: "the script sets Continue itself, then Write-Error",
        script: "$ErrorActionPreference = 'Continue'\nWrite-Error 'tg-bad'\nWrite-Output 'tg-ran-on'",
        stop: 1,
        continue_: 0,
        after: None,
    },
    ErrorCase {
        name: "a cmdlet's non-terminating error",
        script: "Get-Item -LiteralPath '/tollgate-no-such-path'\nWrite-Output 'tg-after'",
        stop: 1,
        continue_: 0,
        after: Some("tg-after"),
    },
    ErrorCase {
        name: "throw",
        script: "throw 'tg-boom'",
        stop: 1,
        continue_: 1,
        after: None,
    },
    ErrorCase {
        name: "an error handled by try/catch",
        script: "try { Get-Item -LiteralPath '/tollgate-no-such-path' -ErrorAction Stop } catch { Write-Output 'handled' }\nexit 0",
        stop: 0,
        continue_: 0,
        after: None,
    },
    ErrorCase {
        name: "an error silenced with SilentlyContinue",
        script: "Get-Item -LiteralPath '/tollgate-no-such-path' -ErrorAction SilentlyContinue\nexit 0",
        stop: 0,
        continue_: 0,
        after: None,
    },
    ErrorCase {
        name: "a native command's stderr, then success",
        script: "sh -c 'echo tg-native-warning >&2'\nWrite-Output 'tg-after'",
        stop: 0,
        continue_: 0,
        after: None,
    },
    ErrorCase {
        name: "the last native command's exit code",
        script: "sh -c 'exit 4'",
        stop: 4,
        continue_: 4,
        after: None,
    },
    ErrorCase {
        name: "exit n wins",
        script: "Write-Output 'x'\nexit 7",
        stop: 7,
        continue_: 7,
        after: None,
    },
];

impl ErrorCase {
    /// The exit code wanted under `errors`.
    pub fn want(&self, errors: StepErrors) -> i32 {
        match errors {
            StepErrors::Stop => self.stop,
            StepErrors::Continue => self.continue_,
        }
    }

    /// Panics, naming the case, the mode and what came out, unless `status` and `chunks` are
    /// what the case wants under `errors`.
    #[allow(clippy::panic)]
    pub fn assert(&self, errors: StepErrors, status: &ExecStatus, chunks: &[OutputChunk]) {
        let out = stream_text(chunks, Stream::Stdout);
        let err = stream_text(chunks, Stream::Stderr);
        let want = ExecStatus::Exited {
            code: self.want(errors),
        };
        assert_eq!(
            status, &want,
            "{} (errors = {errors}): stdout {out:?}, stderr {err:?}",
            self.name
        );
        if let Some(after) = self.after {
            match errors {
                StepErrors::Continue => {
                    assert!(out.contains(after), "{} (continue): {out:?}", self.name)
                }
                StepErrors::Stop => assert!(
                    !out.contains(after),
                    "{} (stop) ran on after its first error: {out:?}",
                    self.name
                ),
            }
        }
    }
}
