//! Runs one script: its own process group, streamed output in arrival order, a timeout, and
//! cancellation. Timeout, cancel and shutdown kill the whole process tree.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::process::Command;
use tokio::sync::{mpsc, watch};
use tollgate_protocol::agent::{ExecStatus, OutputChunk, Stream};
use tollgate_protocol::{Shell, StepErrors};

use crate::shells::Shells;

/// After the script exits, how long its pipes may stay open (held by a background child)
/// before the agent stops reading them.
const PIPE_GRACE: Duration = Duration::from_secs(2);
const CHUNK: usize = 16 * 1024;

/// What to run.
#[derive(Debug, Clone)]
pub struct ExecSpec {
    pub shell: Shell,
    pub program: PathBuf,
    pub script: String,
    pub env: BTreeMap<String, String>,
    pub working_dir: Option<PathBuf>,
    pub timeout: Duration,
    /// Output kept and forwarded per stream; the rest is dropped and flagged truncated.
    pub retention: usize,
    /// What a `pwsh` script's error records mean.
    pub errors: StepErrors,
}

/// How it went.
#[derive(Debug, Clone)]
pub struct ExecOutcome {
    pub status: ExecStatus,
    pub duration: Duration,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
}

/// Resolves when the flag becomes true; never if its sender is gone while false.
pub async fn until_true(rx: &mut watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

static SCRIPT_SEQ: AtomicU64 = AtomicU64::new(0);

fn write_script(dir: &Path, spec: &ExecSpec) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let n = SCRIPT_SEQ.fetch_add(1, Ordering::Relaxed);
    let path = dir.join(format!(
        "{}-{n}.{}",
        std::process::id(),
        Shells::extension(spec.shell)
    ));
    std::fs::write(&path, spec.script.as_bytes())?;
    Ok(path)
}

#[cfg(unix)]
fn kill_tree(pid: u32) {
    use nix::sys::signal::{Signal, killpg};
    use nix::unistd::Pid;
    if let Ok(pid) = i32::try_from(pid) {
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

#[cfg(windows)]
fn kill_tree(pid: u32) {
    let _ = std::process::Command::new("taskkill")
        .args(["/PID", &pid.to_string(), "/T", "/F"])
        .output();
}

#[cfg(unix)]
fn status_of(s: std::process::ExitStatus) -> ExecStatus {
    use std::os::unix::process::ExitStatusExt;
    match (s.code(), s.signal()) {
        (Some(code), _) => ExecStatus::Exited { code },
        (None, Some(signal)) => ExecStatus::Killed { signal },
        (None, None) => ExecStatus::Killed { signal: 0 },
    }
}

#[cfg(not(unix))]
fn status_of(s: std::process::ExitStatus) -> ExecStatus {
    ExecStatus::Exited {
        code: s.code().unwrap_or(-1),
    }
}

async fn pump<R: tokio::io::AsyncRead + Unpin>(
    mut r: R,
    stream: Stream,
    tx: mpsc::Sender<(Stream, Vec<u8>)>,
) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if tx.send((stream, buf[..n].to_vec())).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Keeps up to `retention` bytes per stream, forwards what it keeps, numbers chunks in order.
struct Collector {
    retention: usize,
    seq: u64,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    stdout_truncated: bool,
    stderr_truncated: bool,
}

impl Collector {
    fn take(&mut self, stream: Stream, data: Vec<u8>) -> Option<OutputChunk> {
        let (kept, truncated) = match stream {
            Stream::Stdout => (&mut self.stdout, &mut self.stdout_truncated),
            Stream::Stderr => (&mut self.stderr, &mut self.stderr_truncated),
        };
        let room = self.retention.saturating_sub(kept.len());
        if room < data.len() {
            *truncated = true;
        }
        let data = &data[..room.min(data.len())];
        if data.is_empty() {
            return None;
        }
        kept.extend_from_slice(data);
        let chunk = OutputChunk {
            seq: self.seq,
            stream,
            data: data.to_vec(),
        };
        self.seq += 1;
        Some(chunk)
    }
}

enum Ended {
    Exited(std::io::Result<std::process::ExitStatus>),
    TimedOut,
    Cancelled,
    Interrupted,
}

/// Runs `spec`. Output chunks go to `out` in arrival order (a closed `out` is ignored: the
/// script keeps running and its result is still recorded). `cancel` and `shutdown` stop it.
pub async fn run(
    spec: ExecSpec,
    scripts_dir: &Path,
    out: mpsc::Sender<OutputChunk>,
    mut cancel: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
) -> ExecOutcome {
    let started = Instant::now();
    let failed = |status| ExecOutcome {
        status,
        duration: started.elapsed(),
        stdout: vec![],
        stderr: vec![],
        stdout_truncated: false,
        stderr_truncated: false,
    };
    let script_path = match write_script(scripts_dir, &spec) {
        Ok(p) => p,
        Err(e) => {
            return failed(ExecStatus::SpawnFailed {
                detail: format!("cannot write script file: {e}"),
            });
        }
    };
    let args = match Shells::args(spec.shell, &script_path, spec.errors) {
        Ok(a) => a,
        Err(detail) => {
            let _ = std::fs::remove_file(&script_path);
            return failed(ExecStatus::SpawnFailed { detail });
        }
    };
    let mut cmd = Command::new(&spec.program);
    cmd.args(args)
        .envs(&spec.env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(wd) = &spec.working_dir {
        cmd.current_dir(wd);
    }
    #[cfg(unix)]
    cmd.process_group(0);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let _ = std::fs::remove_file(&script_path);
            return failed(ExecStatus::SpawnFailed {
                detail: format!("{}: {e}", spec.program.display()),
            });
        }
    };
    let pid = child.id();
    let (tx, mut rx) = mpsc::channel::<(Stream, Vec<u8>)>(64);
    let mut pumps = Vec::new();
    if let Some(o) = child.stdout.take() {
        pumps.push(tokio::spawn(pump(o, Stream::Stdout, tx.clone())));
    }
    if let Some(e) = child.stderr.take() {
        pumps.push(tokio::spawn(pump(e, Stream::Stderr, tx.clone())));
    }
    drop(tx);
    let mut collector = Collector {
        retention: spec.retention,
        seq: 0,
        stdout: vec![],
        stderr: vec![],
        stdout_truncated: false,
        stderr_truncated: false,
    };
    let mut out_open = true;
    let ended = {
        let wait = child.wait();
        tokio::pin!(wait);
        let deadline = tokio::time::sleep(spec.timeout);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                biased;
                Some((stream, data)) = rx.recv() => {
                    if let Some(chunk) = collector.take(stream, data)
                        && out_open
                        && out.send(chunk).await.is_err()
                    {
                        out_open = false;
                    }
                }
                status = &mut wait => break Ended::Exited(status),
                _ = &mut deadline => break Ended::TimedOut,
                _ = until_true(&mut cancel) => break Ended::Cancelled,
                _ = until_true(&mut shutdown) => break Ended::Interrupted,
            }
        }
    };
    let status = match ended {
        Ended::Exited(Ok(s)) => status_of(s),
        Ended::Exited(Err(e)) => ExecStatus::SpawnFailed {
            detail: format!("waiting for the process failed: {e}"),
        },
        stop => {
            if let Some(pid) = pid {
                kill_tree(pid);
            }
            let _ = child.wait().await;
            match stop {
                Ended::TimedOut => ExecStatus::TimedOut,
                Ended::Cancelled => ExecStatus::Cancelled,
                _ => ExecStatus::Interrupted {
                    detail: "the agent shut down while the script ran".into(),
                },
            }
        }
    };
    // Drain what the pipes still hold, bounded: a background grandchild may keep them open.
    let drain = async {
        while let Some((stream, data)) = rx.recv().await {
            if let Some(chunk) = collector.take(stream, data)
                && out_open
                && out.send(chunk).await.is_err()
            {
                out_open = false;
            }
        }
    };
    if tokio::time::timeout(PIPE_GRACE, drain).await.is_err() {
        for p in &pumps {
            p.abort();
        }
    }
    let _ = std::fs::remove_file(&script_path);
    ExecOutcome {
        status,
        duration: started.elapsed(),
        stdout: collector.stdout,
        stderr: collector.stderr,
        stdout_truncated: collector.stdout_truncated,
        stderr_truncated: collector.stderr_truncated,
    }
}
