//! What the real-`pwsh` tests share: a `local` session on the real pwsh, a step, running it with
//! a deadline, its output per stream, and PowerShell quoting.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tollgate_coordinator::transport::pwsh::{PwshMode, PwshSession, PwshSettings};
use tollgate_protocol::Shell;
use tollgate_protocol::agent::{ExecResult, ExecuteRequest, OutputChunk, Stream};

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
