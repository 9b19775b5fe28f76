//! The supervised child process: its pipes, a reader task that turns stdout lines into
//! contract events, a bounded tail of stderr for diagnostics, and a kill that takes the whole
//! process tree (process group on Unix, `taskkill /T /F` on Windows).

use std::ffi::OsString;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{ChildStdin, Command};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::contract::{Response, decode_response};

/// How much of the child's stderr is kept for error messages.
const STDERR_TAIL: usize = 2048;
/// How long a killed child may take to be reaped.
const REAP_TIMEOUT: Duration = Duration::from_secs(5);

/// What the child's stdout said.
#[derive(Debug)]
pub(crate) enum Event {
    Message(Response),
    /// A line that is not the contract (or stdout that broke off mid-line).
    Garbage(String),
    /// Stdout closed.
    Eof,
}

/// What the child was started with.
#[derive(Debug)]
pub(crate) struct Launch<'a> {
    pub program: &'a Path,
    pub args: Vec<OsString>,
    /// Set in the child's environment.
    pub env: Vec<(&'static str, OsString)>,
    /// Removed from the child's environment (inherited values that must not leak through).
    pub env_remove: Vec<&'static str>,
    pub max_line: usize,
}

#[derive(Debug)]
pub(crate) struct ChildProc {
    process: tokio::process::Child,
    pid: Option<u32>,
    stdin: Option<ChildStdin>,
    events: mpsc::Receiver<Event>,
    stderr_tail: Arc<Mutex<Vec<u8>>>,
    tasks: Vec<JoinHandle<()>>,
    reaped: bool,
}

impl ChildProc {
    pub(crate) fn spawn(launch: Launch<'_>) -> std::io::Result<Self> {
        let mut cmd = Command::new(launch.program);
        cmd.args(&launch.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for name in &launch.env_remove {
            cmd.env_remove(name);
        }
        for (name, value) in &launch.env {
            cmd.env(name, value);
        }
        #[cfg(unix)]
        cmd.process_group(0);
        #[cfg(windows)]
        {
            const CREATE_NO_WINDOW: u32 = 0x0800_0000;
            cmd.creation_flags(CREATE_NO_WINDOW);
        }
        let mut process = cmd.spawn()?;
        let missing = |what: &str| std::io::Error::other(format!("child has no {what} pipe"));
        let stdin = process.stdin.take().ok_or_else(|| missing("stdin"))?;
        let stdout = process.stdout.take().ok_or_else(|| missing("stdout"))?;
        let stderr = process.stderr.take().ok_or_else(|| missing("stderr"))?;
        let (tx, events) = mpsc::channel(64);
        let stderr_tail = Arc::new(Mutex::new(Vec::new()));
        let tasks = vec![
            tokio::spawn(read_stdout(stdout, launch.max_line, tx)),
            tokio::spawn(keep_tail(stderr, stderr_tail.clone())),
        ];
        Ok(ChildProc {
            pid: process.id(),
            process,
            stdin: Some(stdin),
            events,
            stderr_tail,
            tasks,
            reaped: false,
        })
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        self.pid
    }

    pub(crate) async fn write_line(&mut self, line: &str) -> std::io::Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::BrokenPipe))?;
        stdin.write_all(line.as_bytes()).await?;
        stdin.flush().await
    }

    /// Closes stdin: the session host closes its session and exits. True if it did so within
    /// `limit` (it is killed otherwise).
    pub(crate) async fn close(&mut self, limit: Duration) -> bool {
        self.stdin = None;
        let exited = matches!(
            tokio::time::timeout(limit, self.process.wait()).await,
            Ok(Ok(_))
        );
        if exited {
            self.reaped = true;
        }
        self.kill().await;
        exited
    }

    /// The next event; `Eof` once stdout has closed.
    pub(crate) async fn next_event(&mut self) -> Event {
        self.events.recv().await.unwrap_or(Event::Eof)
    }

    /// An event already waiting, if any.
    pub(crate) fn pending_event(&mut self) -> Option<Event> {
        match self.events.try_recv() {
            Ok(e) => Some(e),
            Err(mpsc::error::TryRecvError::Empty) => None,
            Err(mpsc::error::TryRecvError::Disconnected) => Some(Event::Eof),
        }
    }

    /// The exit status if the child has already exited.
    pub(crate) fn exited(&mut self) -> Option<ExitStatus> {
        self.process.try_wait().ok().flatten()
    }

    /// The last bytes the child wrote to stderr, as text.
    pub(crate) fn stderr_tail(&self) -> String {
        self.stderr_tail
            .lock()
            .map(|t| String::from_utf8_lossy(&t).trim().to_string())
            .unwrap_or_default()
    }

    /// A sentence about how the child ended (waits briefly for it to exit by itself), with
    /// the tail of its stderr.
    pub(crate) async fn describe_exit(&mut self) -> String {
        let status = match tokio::time::timeout(Duration::from_secs(2), self.process.wait()).await {
            Ok(Ok(s)) => {
                self.reaped = true;
                describe_status(s)
            }
            Ok(Err(e)) => format!("cannot be waited for ({e})"),
            Err(_) => "closed its output but is still running".to_string(),
        };
        // The reader tasks end with the pipes; give stderr a moment to be drained.
        let tail = self.stderr_tail();
        if tail.is_empty() {
            status
        } else {
            format!("{status}; its stderr ends with: {tail}")
        }
    }

    /// Kills the child and everything it started, then reaps it.
    pub(crate) async fn kill(&mut self) {
        // Even a child that has exited may have left its group behind (a step's processes).
        if let Some(pid) = self.pid {
            kill_tree(pid).await;
        }
        if !self.reaped {
            let _ = self.process.start_kill();
            if let Ok(Ok(_)) = tokio::time::timeout(REAP_TIMEOUT, self.process.wait()).await {
                self.reaped = true;
            }
        }
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        if !self.reaped
            && let Some(pid) = self.pid
        {
            kill_tree_now(pid);
        }
        for t in &self.tasks {
            t.abort();
        }
        // `kill_on_drop` takes the child itself if the tree kill could not.
    }
}

fn describe_status(s: ExitStatus) -> String {
    if let Some(code) = s.code() {
        return format!("exited with code {code}");
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = s.signal() {
            return format!("was killed by signal {sig}");
        }
    }
    format!("ended ({s})")
}

/// Reads stdout line by line (each at most `max` bytes) and forwards contract events.
async fn read_stdout(stdout: impl AsyncRead + Unpin, max: usize, tx: mpsc::Sender<Event>) {
    let mut reader = BufReader::new(stdout);
    loop {
        let mut line = Vec::new();
        let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
        let read = (&mut reader).take(limit).read_until(b'\n', &mut line).await;
        let event = match read {
            Ok(0) => {
                let _ = tx.send(Event::Eof).await;
                return;
            }
            Err(e) => Event::Garbage(format!("reading stdout failed: {e}")),
            Ok(_) if line.last() != Some(&b'\n') && line.len() > max => {
                Event::Garbage(format!("a line longer than {max} bytes"))
            }
            Ok(_) if line.last() != Some(&b'\n') => Event::Garbage(format!(
                "output ended in the middle of a line: {:?}",
                String::from_utf8_lossy(&line[..line.len().min(120)])
            )),
            Ok(_) => {
                line.pop();
                match decode_response(&line, max) {
                    Ok(r) => Event::Message(r),
                    Err(e) => Event::Garbage(e.to_string()),
                }
            }
        };
        let stop = matches!(event, Event::Garbage(_));
        if tx.send(event).await.is_err() || stop {
            return;
        }
    }
}

/// Keeps the last [`STDERR_TAIL`] bytes of stderr.
async fn keep_tail(mut stderr: impl AsyncRead + Unpin, tail: Arc<Mutex<Vec<u8>>>) {
    let mut buf = [0u8; 1024];
    loop {
        match stderr.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if let Ok(mut t) = tail.lock() {
                    t.extend_from_slice(&buf[..n]);
                    let excess = t.len().saturating_sub(STDERR_TAIL);
                    t.drain(..excess);
                }
            }
        }
    }
}

#[cfg(unix)]
fn group_kill_args(pid: u32) -> [String; 3] {
    // The child leads its own process group (`process_group(0)`): its id is the group's.
    ["-KILL".into(), "--".into(), format!("-{pid}")]
}

#[cfg(unix)]
async fn kill_tree(pid: u32) {
    let _ = Command::new("kill")
        .args(group_kill_args(pid))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
}

#[cfg(unix)]
fn kill_tree_now(pid: u32) {
    let _ = std::process::Command::new("kill")
        .args(group_kill_args(pid))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

#[cfg(windows)]
fn taskkill_args(pid: u32) -> [String; 4] {
    ["/T".into(), "/F".into(), "/PID".into(), pid.to_string()]
}

#[cfg(windows)]
async fn kill_tree(pid: u32) {
    let _ = Command::new("taskkill")
        .args(taskkill_args(pid))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
}

#[cfg(windows)]
fn kill_tree_now(pid: u32) {
    let _ = std::process::Command::new("taskkill")
        .args(taskkill_args(pid))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

#[cfg(not(any(unix, windows)))]
async fn kill_tree(_pid: u32) {}

#[cfg(not(any(unix, windows)))]
fn kill_tree_now(_pid: u32) {}
