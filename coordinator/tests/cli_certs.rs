//! `tollgate certs init|issue|revoke|crl` through the real binary, checked with openssl.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;

fn tollgate(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .output()
        .expect("run tollgate")
}

fn openssl(args: &[&str]) -> String {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl must be installed (.ci/run installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn p(dir: &Path, f: &str) -> String {
    dir.join(f).to_string_lossy().into_owned()
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn init_and_issue_produce_files_standard_tools_read() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pki");
    let d = dir.to_str().unwrap();
    ok(&tollgate(&["certs", "init", "--fleet", "prod", "--out", d]));
    ok(&tollgate(&[
        "certs",
        "issue",
        "--dir",
        d,
        "--role",
        "coordinator",
    ]));
    ok(&tollgate(&[
        "certs", "issue", "--dir", d, "--role", "agent", "--name", "web1",
    ]));
    ok(&tollgate(&[
        "certs", "issue", "--dir", d, "--role", "operator", "--name", "alice",
    ]));

    let ca = openssl(&[
        "x509",
        "-in",
        &p(&dir, "ca.crt"),
        "-noout",
        "-subject",
        "-ext",
        "basicConstraints",
    ]);
    assert!(
        ca.contains("Tollgate fleet CA prod") && ca.contains("CA:TRUE"),
        "{ca}"
    );
    for (file, spiffe) in [
        ("coordinator.crt", "spiffe://prod/coordinator"),
        ("agent-web1.crt", "spiffe://prod/agent/web1"),
        ("operator-alice.crt", "spiffe://prod/operator/alice"),
    ] {
        let san = openssl(&[
            "x509",
            "-in",
            &p(&dir, file),
            "-noout",
            "-ext",
            "subjectAltName",
        ]);
        assert!(san.contains(&format!("URI:{spiffe}")), "{file}: {san}");
        let verify = openssl(&["verify", "-CAfile", &p(&dir, "ca.crt"), &p(&dir, file)]);
        assert!(verify.contains(": OK"), "{verify}");
        let key = file.replace(".crt", ".key");
        openssl(&["pkey", "-in", &p(&dir, &key), "-noout"]);
        #[cfg(unix)]
        assert_eq!(mode(&dir.join(&key)), 0o600, "{key}");
    }
    #[cfg(unix)]
    assert_eq!(mode(&dir.join("ca.key")), 0o600);
    let crl = openssl(&[
        "crl",
        "-in",
        &p(&dir, "crl.pem"),
        "-noout",
        "-CAfile",
        &p(&dir, "ca.crt"),
    ]);
    let _ = crl; // openssl exits non-zero if the CRL's signature does not verify
}

#[test]
fn existing_files_are_never_overwritten_silently() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("pki");
    let d = d.to_str().unwrap();
    ok(&tollgate(&["certs", "init", "--fleet", "prod", "--out", d]));
    let again = tollgate(&["certs", "init", "--fleet", "prod", "--out", d]);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already exists"),
        "{again:?}"
    );

    ok(&tollgate(&[
        "certs", "issue", "--dir", d, "--role", "agent", "--name", "web1",
    ]));
    let before = std::fs::read(tmp.path().join("pki/agent-web1.crt")).unwrap();
    let again = tollgate(&[
        "certs", "issue", "--dir", d, "--role", "agent", "--name", "web1",
    ]);
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        err.contains("agent-web1") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(tmp.path().join("pki/agent-web1.crt")).unwrap(),
        before
    );
    ok(&tollgate(&[
        "certs", "issue", "--dir", d, "--role", "agent", "--name", "web1", "--force",
    ]));
    assert_ne!(
        std::fs::read(tmp.path().join("pki/agent-web1.crt")).unwrap(),
        before
    );
}

#[test]
fn revoke_puts_the_serial_in_a_fresh_crl() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pki");
    let d = dir.to_str().unwrap();
    ok(&tollgate(&["certs", "init", "--fleet", "prod", "--out", d]));
    ok(&tollgate(&[
        "certs", "issue", "--dir", d, "--role", "operator", "--name", "mallory",
    ]));
    let serial = openssl(&[
        "x509",
        "-in",
        &p(&dir, "operator-mallory.crt"),
        "-noout",
        "-serial",
    ]);
    let serial = serial
        .trim()
        .trim_start_matches("serial=")
        .to_ascii_uppercase();
    let out = ok(&tollgate(&[
        "certs", "revoke", "--dir", d, "--role", "operator", "--name", "mallory",
    ]));
    assert!(out.to_ascii_uppercase().contains(&serial), "{out}");
    let crl = openssl(&["crl", "-in", &p(&dir, "crl.pem"), "-noout", "-text"]);
    assert!(crl.to_ascii_uppercase().contains(&serial), "{crl}");
    ok(&tollgate(&["certs", "crl", "--dir", d]));
    let crl = openssl(&["crl", "-in", &p(&dir, "crl.pem"), "-noout", "-text"]);
    assert!(
        crl.to_ascii_uppercase().contains(&serial),
        "refresh keeps revocations: {crl}"
    );
}

#[test]
fn bad_names_and_missing_dirs_fail_with_reasons() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("pki");
    let d = d.to_str().unwrap();
    let out = tollgate(&["certs", "init", "--fleet", "Prod!", "--out", d]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("fleet name"),
        "{out:?}"
    );
    let out = tollgate(&[
        "certs", "issue", "--dir", d, "--role", "agent", "--name", "web1",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("fleet.json"),
        "{out:?}"
    );
    ok(&tollgate(&["certs", "init", "--fleet", "prod", "--out", d]));
    let out = tollgate(&["certs", "issue", "--dir", d, "--role", "agent"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("need a name"),
        "{out:?}"
    );
    // A certificate is never born expired, nor made to outlive ten years.
    for days in ["-1", "0", "3651"] {
        let days = format!("--days={days}");
        let out = tollgate(&[
            "certs", "issue", "--dir", d, "--role", "agent", "--name", "web1", &days,
        ]);
        assert_eq!(out.status.code(), Some(2), "--days {days}: {out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("--days"),
            "{out:?}"
        );
        assert!(!tmp.path().join("pki").join("agent-web1.crt").exists());
    }
}
