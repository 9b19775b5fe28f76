//! The PowerShell path (SPEC §9): per-step cost of Tollgate over a real PSSession on SSH
//! (`PwshSession::execute` through the supervised session host, markers and all) side by side
//! with the transport's floor, a bare `Invoke-Command -Session` on an already-open PSSession,
//! and with one `Invoke-Command -HostName` per step (a new ssh connection and remote pwsh each
//! time). One real sshd on 127.0.0.60 with the `powershell` subsystem; the real `pwsh`.
//! Medians; asserts nothing. Lines starting `RESULT ` are for `bench/run.sh`. Without pwsh or
//! sshd it prints `RESULT pwsh_ssh_skipped=...` and exits 0.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[cfg(target_os = "linux")]
fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    if let Err(e) = rt.block_on(linux::run()) {
        eprintln!("pwsh_ssh: FAILED: {e:#}");
        std::process::exit(1);
    }
}

#[cfg(not(target_os = "linux"))]
fn main() {
    println!("RESULT pwsh_ssh_skipped=not-linux");
}

#[cfg(target_os = "linux")]
mod linux {
    use std::collections::BTreeMap;
    use std::net::Ipv4Addr;
    use std::path::Path;
    use std::time::{Duration, Instant};

    use anyhow::Context as _;
    use tollgate_coordinator::transport::pwsh::{
        PwshMode, PwshSession, PwshSettings, SshTarget, resolve_program,
    };
    use tollgate_protocol::Shell;
    use tollgate_protocol::agent::{ExecStatus, ExecuteRequest};
    use tollgate_tests::sshd::{KeyPair, Sshd, SshdSpec, current_user, write_known_hosts};

    fn median(mut v: Vec<f64>) -> f64 {
        v.sort_by(f64::total_cmp);
        if v.is_empty() { 0.0 } else { v[v.len() / 2] }
    }

    pub async fn run() -> anyhow::Result<()> {
        let steps: usize = std::env::var("PWSH_BENCH_STEPS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20);
        let (Ok(pwsh), Some(sshd_program)) = (
            resolve_program(Path::new("pwsh")),
            tollgate_tests::sshd::sshd_program(),
        ) else {
            println!("RESULT pwsh_ssh_skipped=no-pwsh-or-sshd");
            return Ok(());
        };
        let dir = tempfile::tempdir()?;
        let client = KeyPair::generate(&dir.path().join("client_ed25519"))?;
        let spec = SshdSpec {
            addr: Ipv4Addr::new(127, 0, 0, 60),
            authorized: vec![client.public.clone()],
            pwsh: pwsh.clone(),
            subsystem: "powershell".into(),
            extra: Vec::new(),
        };
        let sshd = Sshd::start(&sshd_program, &dir.path().join("sshd"), &spec)?;
        let known_hosts = dir.path().join("known_hosts");
        write_known_hosts(&known_hosts, &[sshd.known_hosts_line()])?;
        let user = current_user();

        // Tollgate: one session host, one PSSession, `steps` steps with markers.
        let mut t = SshTarget::new(sshd.addr.to_string());
        t.port = Some(sshd.port);
        t.user = Some(user.clone());
        t.key_file = Some(client.private.clone());
        t.known_hosts = Some(known_hosts.clone());
        let mut settings = PwshSettings::new(pwsh.clone(), PwshMode::Ssh(t));
        settings.state_dir = Some(dir.path().join("state").display().to_string());
        let mut session = PwshSession::new("bench".into(), settings);
        let warm = ExecuteRequest {
            idempotency_key: "bench/warm".into(),
            shell: Shell::Pwsh,
            script: "Write-Output x".into(),
            env: BTreeMap::new(),
            working_dir: None,
            timeout_ms: 60_000,
            errors: tollgate_protocol::StepErrors::Stop,
        };
        let opened = Instant::now();
        session.execute(warm.clone(), |_| {}).await?;
        let open_ms = opened.elapsed().as_secs_f64() * 1000.0;
        let mut tollgate = Vec::with_capacity(steps);
        for i in 0..steps {
            let req = ExecuteRequest {
                idempotency_key: format!("bench/{i}"),
                ..warm.clone()
            };
            let started = Instant::now();
            let r = session.execute(req, |_| {}).await?;
            tollgate.push(started.elapsed().as_secs_f64() * 1000.0);
            anyhow::ensure!(
                r.status == ExecStatus::Exited { code: 0 },
                "step {i}: {r:?}"
            );
        }
        session.close(Duration::from_secs(10)).await;

        // The floor and the per-step connection, timed inside one pwsh.
        let ssh_options = format!(
            "@{{ BatchMode = 'yes'; StrictHostKeyChecking = 'yes'; LogLevel = 'QUIET'; UserKnownHostsFile = '{kh}'; IdentitiesOnly = 'yes' }}",
            kh = known_hosts.display()
        );
        let target = format!(
            "-HostName {addr} -Port {port} -UserName {user} -KeyFilePath '{key}' -Options {ssh_options}",
            addr = sshd.addr,
            port = sshd.port,
            key = client.private.display()
        );
        let per_connection_steps = steps.min(10);
        let script = format!(
            "$ErrorActionPreference = 'Stop'\n\
             $s = New-PSSession {target}\n\
             $null = Invoke-Command -Session $s {{ 'x' }}\n\
             $floor = foreach ($i in 1..{steps}) {{ $w = [Diagnostics.Stopwatch]::StartNew(); $null = Invoke-Command -Session $s {{ Write-Output x }}; $w.Elapsed.TotalMilliseconds }}\n\
             Remove-PSSession $s\n\
             $each = foreach ($i in 1..{per_connection_steps}) {{ $w = [Diagnostics.Stopwatch]::StartNew(); $null = Invoke-Command {target} -ScriptBlock {{ Write-Output x }}; $w.Elapsed.TotalMilliseconds }}\n\
             [Console]::Out.WriteLine((@{{ floor = @($floor); each = @($each) }} | ConvertTo-Json -Compress))\n"
        );
        let out = tokio::process::Command::new(&pwsh)
            .args([
                "-NoLogo",
                "-NoProfile",
                "-NonInteractive",
                "-Command",
                &script,
            ])
            .output()
            .await
            .context("running the pwsh baselines")?;
        anyhow::ensure!(
            out.status.success(),
            "pwsh baselines failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .context("baseline JSON")?;
        let v: serde_json::Value = serde_json::from_str(line)?;
        let list = |k: &str| -> Vec<f64> {
            v[k].as_array()
                .map(|a| a.iter().filter_map(serde_json::Value::as_f64).collect())
                .unwrap_or_default()
        };
        let (t, floor, each) = (
            median(tollgate),
            median(list("floor")),
            median(list("each")),
        );
        println!(
            "pwsh over SSH, {steps} steps: Tollgate {t:.1} ms per step (session opened in {open_ms:.0} ms); bare Invoke-Command on an open PSSession {floor:.1} ms; Invoke-Command -HostName per step {each:.1} ms ({per_connection_steps} runs)"
        );
        println!("RESULT pwsh_ssh_steps={steps}");
        println!("RESULT pwsh_ssh_open_ms={open_ms:.0}");
        println!("RESULT pwsh_ssh_tollgate_ms={t:.1}");
        println!("RESULT pwsh_ssh_floor_ms={floor:.1}");
        println!("RESULT pwsh_ssh_per_connection_ms={each:.1}");
        println!("RESULT pwsh_ssh_overhead_ms={:.1}", t - floor);
        if floor > 0.0 && t > 0.0 {
            println!("RESULT pwsh_ssh_tollgate_over_floor={:.1}", t / floor);
            println!(
                "RESULT pwsh_ssh_per_connection_over_tollgate={:.1}",
                each / t
            );
        }
        drop(sshd);
        Ok(())
    }
}
