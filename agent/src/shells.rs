//! Which interpreters may run, where they are, and how they are invoked.

use std::path::{Path, PathBuf};

use tollgate_protocol::{Shell, StepErrors};

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

    /// Arguments that run a script file non-interactively, `errors` saying what a `pwsh`
    /// script's error records mean (ignored for `sh`), or why it cannot be run.
    ///
    /// `pwsh` runs the file through [`pwsh_wrapper`], not `-File`: `pwsh -File` exits 0 when a
    /// script ends without `exit n`, however its last native command exited, so a step whose
    /// last act failed would look like a success, and it would apply no error semantics. A
    /// script path that is not Unicode (so not PowerShell text) is refused, never run otherwise.
    pub fn args(
        shell: Shell,
        script: &Path,
        errors: StepErrors,
    ) -> Result<Vec<std::ffi::OsString>, String> {
        match shell {
            Shell::Pwsh => {
                let path = script.to_str().ok_or_else(|| {
                    format!(
                        "script path {} is not Unicode, so pwsh cannot be told to run it",
                        script.display()
                    )
                })?;
                Ok(["-NoLogo", "-NoProfile", "-NonInteractive", "-Command"]
                    .iter()
                    .map(Into::into)
                    .chain(std::iter::once(pwsh_wrapper(path, errors).into()))
                    .collect())
            }
            Shell::Sh => Ok(vec![script.as_os_str().to_owned()]),
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

/// The `-Command` text that runs the script file at `path` and exits with what it meant, the
/// session host's rule for a step's exit code (`session_host.ps1`, `$TargetInvoke`):
///
/// - `errors = stop` (the default): the script runs under `$ErrorActionPreference = 'Stop'`;
///   if it writes any error record (even one written with `-ErrorAction Continue`) and would
///   exit 0, it exits 1 instead, saying so on stderr;
/// - `errors = continue`: under `'Continue'`; error records are shown and decide nothing;
/// - `exit n` in the script: `n`;
/// - an error that stops the script (a `throw`, an error under `'Stop'`, a statement-terminating
///   error, a script that does not parse): 1, the error on stderr as PowerShell prints it;
/// - otherwise `$LASTEXITCODE`: the exit code of the last native command the script ran, or 0.
///
/// A native command's stderr reaches the wrapper as `NativeCommandError` records: it is written
/// to stderr as text and never counted as an error (its exit code speaks for it). Other records
/// are written to stderr as PowerShell formats them.
///
/// `ConvertTo-Json` defaults to `-Depth 100` (its maximum) instead of 2, below which it cuts
/// values to type names (with a warning on 7, silently on 5.1): a probe's facts or a step's
/// JSON come out whole; an explicit `-Depth` still wins. PowerShell's own rendering is plain
/// text (`$PSStyle` is 7.2+): no ANSI colour codes in the output kept and shown to people.
/// Windows PowerShell 5.1 runs this text too.
pub fn pwsh_wrapper(path: &str, errors: StepErrors) -> String {
    let preference = match errors {
        StepErrors::Stop => "Stop",
        StepErrors::Continue => "Continue",
    };
    format!(
        "$PSDefaultParameterValues['ConvertTo-Json:Depth'] = 100; \
         if ($PSStyle) {{ $PSStyle.OutputRendering = 'PlainText' }}; \
         $PSNativeCommandUseErrorActionPreference = $false; \
         $tgTally = @{{ Count = 0 }}; \
         $ErrorActionPreference = '{preference}'; \
         try {{ & {script} 2>&1 | ForEach-Object {{ \
           if ($_ -is [System.Management.Automation.ErrorRecord]) {{ \
             if ([string]$_.FullyQualifiedErrorId -like 'NativeCommandError*') {{ [Console]::Error.WriteLine([string]$_) }} \
             else {{ $tgTally['Count'] += 1; [Console]::Error.WriteLine(($_ | Out-String).TrimEnd()) }} \
           }} else {{ $_ }} }} }} catch {{ throw }}; \
         $tgCode = $LASTEXITCODE; if ($null -eq $tgCode) {{ $tgCode = 0 }}; \
         if ('{preference}' -eq 'Stop' -and $tgTally['Count'] -gt 0 -and $tgCode -eq 0) {{ \
           [Console]::Error.WriteLine(\"tollgate: the step wrote $($tgTally['Count']) error record(s) (errors = 'stop')\"); exit 1 }}; \
         exit $tgCode",
        script = ps_single_quoted(path)
    )
}

/// `text` as a PowerShell single-quoted string literal (every single-quote character PowerShell
/// accepts, the typographic ones included, doubled).
fn ps_single_quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('\'');
    for c in text.chars() {
        if matches!(c, '\'' | '\u{2018}' | '\u{2019}' | '\u{201A}' | '\u{201B}') {
            out.push(c);
        }
        out.push(c);
    }
    out.push('\'');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pwsh_runs_the_file_through_the_wrapper_with_the_path_quoted() {
        let args = Shells::args(
            Shell::Pwsh,
            Path::new("/state/it's \u{2019}x.ps1"),
            StepErrors::Stop,
        )
        .unwrap();
        let args: Vec<String> = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args[..4],
            ["-NoLogo", "-NoProfile", "-NonInteractive", "-Command"]
        );
        assert!(
            args[4].contains("& '/state/it''s \u{2019}\u{2019}x.ps1'"),
            "{}",
            args[4]
        );
        assert!(args[4].ends_with("exit $tgCode"), "{}", args[4]);
        assert!(
            args[4].contains("$ErrorActionPreference = 'Stop'"),
            "{}",
            args[4]
        );
    }

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
