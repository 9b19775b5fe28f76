//! PowerShell Remoting over SSH when the coordinator's environment tempts it: an ssh agent that
//! holds a key the target accepts, and PowerShell profiles that print. One test in its own
//! binary, because it sets the process environment (`SSH_AUTH_SOCK`, `XDG_CONFIG_HOME`) before
//! any thread starts. Runs where `pwsh` and `sshd` are present (see `pwsh_ssh.rs`).
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::Duration;

use tollgate_coordinator::transport::pwsh::{
    PwshMode, PwshSession, PwshSettings, SessionError, SshTarget,
};
use tollgate_protocol::Shell;
use tollgate_protocol::agent::{ExecStatus, ExecuteRequest};
use tollgate_tests::sshd::{KeyPair, Sshd, SshdSpec, current_user, write_known_hosts};

const LIMIT: Duration = Duration::from_secs(120);

const CHILD: &str = "TOLLGATE_SSH_ENV_TEST_DIR";

/// The parent half: keys, an agent holding the accepted key, printing profiles; then this same
/// test again in a child process whose environment names them (no `set_var` in a threaded
/// process).
#[test]
fn ssh_agent_keys_and_printing_profiles_change_nothing() {
    if let Some(dir) = std::env::var_os(CHILD) {
        return child(std::path::Path::new(&dir));
    }
    if tollgate_tests::real::pwsh_and_sshd("real SSH-remoting environment test").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let good = KeyPair::generate(&dir.path().join("good_ed25519")).unwrap();
    KeyPair::generate(&dir.path().join("stranger_ed25519")).unwrap();
    let xdg = dir.path().join("xdg");
    std::fs::create_dir_all(xdg.join("powershell")).unwrap();
    std::fs::write(
        xdg.join("powershell/profile.ps1"),
        "Write-Output 'PROFILE-OUTPUT'\n[Console]::WriteLine('PROFILE-CONSOLE')\n$global:FromProfile = 'yes'\n",
    )
    .unwrap();
    // `ssh-agent -a` binds its socket before it forks and this call returns.
    let sock = dir.path().join("agent.sock");
    let started = Command::new("ssh-agent")
        .args(["-s", "-a"])
        .arg(&sock)
        .output()
        .expect("ssh-agent");
    assert!(started.status.success(), "ssh-agent: {started:?}");
    let agent_pid: Option<u32> = String::from_utf8_lossy(&started.stdout)
        .split(';')
        .find_map(|part| part.trim().strip_prefix("SSH_AGENT_PID=")?.parse().ok());
    let added = Command::new("ssh-add")
        .arg(&good.private)
        .env("SSH_AUTH_SOCK", &sock)
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(added.success(), "ssh-add to the test agent");

    let exe = std::env::current_exe().unwrap();
    let out = Command::new(exe)
        .args([
            "--exact",
            "ssh_agent_keys_and_printing_profiles_change_nothing",
            "--nocapture",
        ])
        .env(CHILD, dir.path())
        .env("SSH_AUTH_SOCK", &sock)
        .env("XDG_CONFIG_HOME", &xdg)
        .output()
        .unwrap();
    if let Some(pid) = agent_pid {
        tollgate_tests::sshd::kill_all(&[pid]);
    }
    assert!(
        out.status.success(),
        "the child half failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The child half: the environment already names the agent and the profiles.
fn child(dir: &std::path::Path) {
    let (pwsh, sshd_program) = tollgate_tests::real::pwsh_and_sshd("child").unwrap();
    let good = KeyPair {
        private: dir.join("good_ed25519"),
        public: std::fs::read_to_string(dir.join("good_ed25519.pub"))
            .unwrap()
            .trim()
            .to_owned(),
    };
    let stranger = KeyPair {
        private: dir.join("stranger_ed25519"),
        public: String::new(),
    };
    let xdg = dir.join("xdg");
    let spec = SshdSpec {
        addr: Ipv4Addr::new(127, 0, 0, 38),
        authorized: vec![good.public.clone()],
        pwsh: pwsh.clone(),
        subsystem: "powershell".into(),
        extra: vec![format!("SetEnv XDG_CONFIG_HOME={}", xdg.display())],
    };
    let sshd = Sshd::start(&sshd_program, &dir.join("sshd"), &spec).unwrap();
    let known_hosts = dir.join("known_hosts");
    write_known_hosts(&known_hosts, &[sshd.known_hosts_line()]).unwrap();
    let settings = |key: &KeyPair| {
        let mut t = SshTarget::new(sshd.addr.to_string());
        t.port = Some(sshd.port);
        t.user = Some(current_user());
        t.key_file = Some(key.private.clone());
        t.known_hosts = Some(known_hosts.clone());
        let mut s = PwshSettings::new(pwsh.clone(), PwshMode::Ssh(t));
        s.state_dir = Some(dir.join("state").display().to_string());
        s.connect_timeout = Duration::from_secs(60);
        s
    };
    let step = ExecuteRequest {
        idempotency_key: "env/1".into(),
        shell: Shell::Pwsh,
        script: "Write-Output \"profile=[$global:FromProfile]\"".into(),
        env: BTreeMap::new(),
        working_dir: None,
        timeout_ms: 60_000,
        errors: tollgate_protocol::StepErrors::Stop,
    };

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // The named key is the only one offered: the agent's good key must not rescue it.
        let mut wrong = PwshSession::new("env-wrong".into(), settings(&stranger));
        let e = tokio::time::timeout(LIMIT, wrong.execute(step.clone(), |_| {}))
            .await
            .unwrap()
            .expect_err("a wrong key_file fails even with a valid key in the agent");
        assert!(matches!(e, SessionError::AuthFailed(_)), "{e}");
        assert!(
            !sshd.log().contains("Accepted publickey"),
            "no key was accepted:\n{}",
            sshd.log()
        );

        // The right key: printing profiles neither break the contract nor run.
        let mut right = PwshSession::new("env-right".into(), settings(&good));
        let mut out = String::new();
        let r = tokio::time::timeout(
            LIMIT,
            right.execute(step.clone(), |c| {
                out.push_str(&String::from_utf8_lossy(&c.data))
            }),
        )
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}\n{}", sshd.log()));
        assert_eq!(r.status, ExecStatus::Exited { code: 0 }, "{out}");
        assert!(
            out.contains("profile=[]"),
            "no profile ran on the target: {out}"
        );
        assert!(!out.contains("PROFILE"), "{out}");
    });
}
