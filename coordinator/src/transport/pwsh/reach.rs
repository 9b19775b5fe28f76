//! Inventory `transport.psremoting` and `transport.local` entries read into a [`Reach`].

use crate::config::{PsRemoting, PsTarget};
use crate::transport::{Reach, ReachContext};

use super::{PwshMode, PwshSettings, SshTarget, WinRmTarget};

/// A PowerShell Remoting host: over WinRM (`computer_name`) or SSH (`host_name`).
pub fn reach_remote(p: &PsRemoting, at: &ReachContext<'_>) -> Reach {
    let mode = match &p.target {
        PsTarget::ComputerName(name) => PwshMode::WinRm(WinRmTarget {
            port: p.port,
            configuration_name: p.configuration_name.clone(),
            ..WinRmTarget::new(name.clone())
        }),
        PsTarget::HostName(name) => PwshMode::Ssh(SshTarget {
            port: p.port,
            user: p.user.clone(),
            key_file: p.key_file.as_ref().map(|k| k.display().to_string()),
            ..SshTarget::new(name.clone())
        }),
    };
    let mut settings = PwshSettings::new(at.pwsh, mode);
    settings.credential_ref = p.credential_ref.clone();
    settings.state_dir = p.state_dir.clone();
    Reach::Pwsh(Box::new(settings))
}

/// The coordinator's own machine, through a local runspace.
pub fn reach_local(at: &ReachContext<'_>) -> Reach {
    Reach::Pwsh(Box::new(PwshSettings::new(at.pwsh, PwshMode::None)))
}
