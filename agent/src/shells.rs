//! Which interpreters may run, where they are, and how they are invoked.

use std::path::{Path, PathBuf};

use tollgate_protocol::Shell;

/// The agent's shell policy: allowed interpreters and an optional explicit `pwsh` path.
#[derive(Debug, Clone)]
pub struct Shells {
    allowed: Vec<Shell>,
    pwsh_path: Option<PathBuf>,
}

/// Looks `name` up on `PATH` (with `.exe` on Windows).
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    let candidates: Vec<String> = if cfg!(windows) {
        vec![format!("{name}.exe"), name.to_string()]
    } else {
        vec![name.to_string()]
    };
    std::env::split_paths(&path)
        .flat_map(|dir| candidates.iter().map(move |c| dir.join(c)))
        .find(|p| is_executable(p))
}

#[cfg(unix)]
fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(not(unix))]
fn is_executable(p: &Path) -> bool {
    p.is_file()
}

impl Shells {
    pub fn new(allowed: Vec<Shell>, pwsh_path: Option<PathBuf>) -> Self {
        Shells { allowed, pwsh_path }
    }

    /// The program for `shell`, or a sentence saying why it cannot run (nothing is run then).
    pub fn resolve(&self, shell: Shell) -> Result<PathBuf, String> {
        if !self.allowed.contains(&shell) {
            return Err(format!(
                "shell {shell} is not in this agent's allowed_shells"
            ));
        }
        match (shell, &self.pwsh_path) {
            (Shell::Pwsh, Some(p)) => {
                if is_executable(p) {
                    Ok(p.clone())
                } else {
                    Err(format!(
                        "pwsh not found at {} (pwsh_path in agent.toml)",
                        p.display()
                    ))
                }
            }
            (Shell::Pwsh, None) => {
                find_on_path("pwsh").ok_or_else(|| "pwsh not found on PATH".to_string())
            }
            (Shell::Sh, _) => find_on_path("sh").ok_or_else(|| "sh not found on PATH".to_string()),
        }
    }

    /// Arguments that run a script file non-interactively.
    pub fn args(shell: Shell, script: &Path) -> Vec<std::ffi::OsString> {
        match shell {
            Shell::Pwsh => ["-NoLogo", "-NoProfile", "-NonInteractive", "-File"]
                .iter()
                .map(Into::into)
                .chain(std::iter::once(script.as_os_str().to_owned()))
                .collect(),
            Shell::Sh => vec![script.as_os_str().to_owned()],
        }
    }

    /// File extension a script for `shell` is written with.
    pub fn extension(shell: Shell) -> &'static str {
        match shell {
            Shell::Pwsh => "ps1",
            Shell::Sh => "sh",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disallowed_and_missing_shells_say_why() {
        let s = Shells::new(vec![Shell::Sh], None);
        assert!(
            s.resolve(Shell::Pwsh)
                .unwrap_err()
                .contains("allowed_shells")
        );
        let s = Shells::new(vec![Shell::Pwsh], Some(PathBuf::from("/nonexistent/pwsh")));
        assert!(
            s.resolve(Shell::Pwsh)
                .unwrap_err()
                .contains("/nonexistent/pwsh")
        );
        #[cfg(unix)]
        assert!(
            Shells::new(vec![Shell::Sh], None)
                .resolve(Shell::Sh)
                .is_ok()
        );
    }
}
