//! Inventory `transport.psremoting` and `transport.local` entries read into a [`Reach`], with
//! `[psremoting]` of `coordinator.toml`: its session timings, and its SSH defaults under each
//! SSH host's own values.

use std::time::Duration;

use crate::config::{PsRemoting, PsRemotingSettings, PsTarget};
use crate::transport::{Reach, ReachContext};

use super::{Backoff, PwshMode, PwshSettings, SshTarget, WinRmTarget};

/// A PowerShell Remoting host: over WinRM (`computer_name`) or SSH (`host_name`).
pub fn reach_remote(p: &PsRemoting, at: &ReachContext<'_>) -> Reach {
    let mode = match &p.target {
        PsTarget::ComputerName(name) => PwshMode::WinRm(WinRmTarget {
            port: p.port,
            configuration_name: p.configuration_name.clone(),
            ..WinRmTarget::new(name.clone())
        }),
        PsTarget::HostName(name) => {
            let ssh = at.psremoting.ssh_for(p);
            PwshMode::Ssh(SshTarget {
                port: p.port,
                user: p.user.clone(),
                key_file: p.key_file.clone(),
                known_hosts: ssh.known_hosts,
                subsystem: ssh.subsystem,
                options: ssh.ssh_options,
                connect_timeout_secs: ssh.connect_timeout_ms.map(|ms| ms / 1000),
                keepalive_secs: ssh.keepalive_ms.map(|ms| ms / 1000),
                ..SshTarget::new(name.clone())
            })
        }
    };
    let mut settings = timed(PwshSettings::new(at.pwsh, mode), at.psremoting);
    settings.credential_ref = p.credential_ref.clone();
    settings.state_dir = p.state_dir.clone();
    Reach::Pwsh(Box::new(settings))
}

/// The coordinator's own machine, through a local runspace.
pub fn reach_local(at: &ReachContext<'_>) -> Reach {
    Reach::Pwsh(Box::new(timed(
        PwshSettings::new(at.pwsh, PwshMode::None),
        at.psremoting,
    )))
}

/// The session timings of `[psremoting]`.
fn timed(mut s: PwshSettings, t: &PsRemotingSettings) -> PwshSettings {
    s.connect_timeout = Duration::from_millis(t.open_timeout_ms);
    s.request_timeout = Duration::from_millis(t.request_timeout_ms);
    s.backoff = Backoff {
        start: Duration::from_millis(t.restart_backoff_ms),
        max: Duration::from_millis(t.restart_backoff_max_ms),
    };
    s
}
