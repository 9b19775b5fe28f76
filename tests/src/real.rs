//! The real programs some tests need (`pwsh`, `sshd`), found or loudly not found. A test that
//! finds none says so on the process's stderr (past the harness's capture, so it shows in every
//! run) and passes, unless the matching `TOLLGATE_REQUIRE_*=1` is set (CI sets them once it has
//! installed the programs): then a missing program fails the test.

use std::path::{Path, PathBuf};

use tollgate_coordinator::transport::pwsh::resolve_program;

/// `pwsh` from PATH, or `None` after saying that `what` did not run.
pub fn pwsh(what: &str) -> Option<PathBuf> {
    match resolve_program(Path::new("pwsh")) {
        Ok(p) => Some(p),
        Err(e) => missing(
            "TOLLGATE_REQUIRE_PWSH",
            what,
            &format!("pwsh is not usable: {e}"),
        ),
    }
}

/// `pwsh` and `sshd` both, or `None` after saying that `what` did not run.
#[cfg(target_os = "linux")]
pub fn pwsh_and_sshd(what: &str) -> Option<(PathBuf, PathBuf)> {
    let pwsh = pwsh(what)?;
    match crate::sshd::sshd_program() {
        Some(sshd) => Some((pwsh, sshd)),
        None => missing(
            "TOLLGATE_REQUIRE_SSHD",
            what,
            "no sshd (install openssh-server)",
        ),
    }
}

// A test helper: failing the calling test is its job under TOLLGATE_REQUIRE_*.
#[allow(clippy::panic)]
fn missing<T>(require: &str, what: &str, why: &str) -> Option<T> {
    if std::env::var_os(require).is_some_and(|v| v == "1") {
        panic!("{require}=1 but {why}: {what} cannot run");
    }
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "{what} did not run: {why}");
    None
}
