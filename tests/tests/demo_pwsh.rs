//! `tollgate demo` with a real `pwsh` on PATH includes a host reached through PowerShell, says
//! which `pwsh` it used, and deploys it with a PowerShell step. Runs where pwsh is present.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

#[test]
fn demo_includes_a_powershell_host_and_names_its_pwsh() {
    let Some(pwsh) = tollgate_tests::real::pwsh("the demo's PowerShell host test") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(tollgate_tests::bins::path("tollgate").unwrap())
        .args(["demo", "--dir"])
        .arg(dir.path().join("demo"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = format!(
        "ops1  standard   reached through PowerShell: transport `local` (a supervised session host on {})",
        pwsh.display()
    );
    assert!(text.contains(&said), "{text}");
    assert!(
        text.contains("ops1 install-app-ps | installed 1.0 with PowerShell 7."),
        "{text}"
    );
    assert!(
        text.contains("ops1         Ready             Completed AllStepsSucceeded"),
        "{text}"
    );
    let version = std::fs::read_to_string(dir.path().join("demo/hosts/ops1/app/version")).unwrap();
    assert_eq!(version.trim(), "1.0");
}
