//! Process helpers for tests: is a pid alive, wait for a condition with a deadline.

use std::time::Duration;

/// True if `pid` names a live process (a zombie counts as dead).
#[cfg(target_os = "linux")]
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => {
            // "pid (comm) S ..." — the state follows the last ')'.
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next());
            !matches!(state, Some('Z') | Some('X') | None)
        }
    }
}

#[cfg(all(unix, not(target_os = "linux")))]
pub fn alive(pid: u32) -> bool {
    use nix::sys::signal::kill;
    use nix::unistd::Pid;
    i32::try_from(pid)
        .map(|p| kill(Pid::from_raw(p), None).is_ok())
        .unwrap_or(false)
}

/// Polls `cond` until it holds or `limit` passes. For conditions the OS offers no event for
/// (a reparented grandchild's death); never a substitute for waiting on a real event.
pub async fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
