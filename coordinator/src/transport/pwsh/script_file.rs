//! The session-host script on disk: written where the child can run it, checked before every
//! start, and the private directory made for it removed with the session.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{PwshSession, SessionError};

/// The session-host script, as shipped.
pub const SESSION_HOST_SCRIPT: &str = include_str!("session_host.ps1");

/// The session-host script on disk.
#[derive(Debug)]
pub(super) struct ScriptFile {
    path: PathBuf,
    /// A directory this session made for it, removed with the session.
    private_dir: Option<PathBuf>,
}

impl Drop for ScriptFile {
    fn drop(&mut self) {
        if let Some(d) = &self.private_dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

impl PwshSession {
    /// Writes the script where the child can run it (once; checked before every start).
    pub(super) fn script_path(&mut self) -> Result<PathBuf, SessionError> {
        if let Some(s) = &self.script
            && std::fs::read(&s.path).is_ok_and(|b| b == SESSION_HOST_SCRIPT.as_bytes())
        {
            return Ok(s.path.clone());
        }
        let setup = |what: &str, p: &Path, e: std::io::Error| {
            SessionError::Setup(format!("cannot {what} {}: {e}", p.display()))
        };
        let (dir, private) = match &self.settings.script_dir {
            Some(d) => {
                std::fs::create_dir_all(d).map_err(|e| setup("create", d, e))?;
                (d.clone(), false)
            }
            None => match &self.script {
                Some(ScriptFile {
                    private_dir: Some(d),
                    ..
                }) => {
                    if !d.is_dir() {
                        make_private_dir(d).map_err(|e| setup("create", d, e))?;
                    }
                    (d.clone(), false)
                }
                _ => {
                    let d = std::env::temp_dir()
                        .join(format!("tollgate-pwsh-{}", uuid::Uuid::new_v4().simple()));
                    make_private_dir(&d).map_err(|e| setup("create", &d, e))?;
                    (d, true)
                }
            },
        };
        let sha = hex::encode(Sha256::digest(SESSION_HOST_SCRIPT.as_bytes()));
        let path = dir.join(format!("tollgate-session-host-{}.ps1", &sha[..12]));
        let tmp = dir.join(format!(".{}.tmp", uuid::Uuid::new_v4().simple()));
        std::fs::write(&tmp, SESSION_HOST_SCRIPT).map_err(|e| setup("write", &tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            setup("write", &path, e)
        })?;
        let private_dir = if private {
            Some(dir)
        } else {
            self.script.take().and_then(|mut s| s.private_dir.take())
        };
        self.script = Some(ScriptFile {
            path: path.clone(),
            private_dir,
        });
        Ok(path)
    }
}

#[cfg(unix)]
fn make_private_dir(d: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().mode(0o700).create(d)
}

#[cfg(not(unix))]
fn make_private_dir(d: &Path) -> std::io::Result<()> {
    std::fs::create_dir(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::pwsh::contract::CONTRACT_VERSION;

    #[test]
    fn the_shipped_script_names_its_contract_version() {
        assert!(SESSION_HOST_SCRIPT.contains(&format!(
            "tollgate-session-host contract v{CONTRACT_VERSION}"
        )));
        assert!(SESSION_HOST_SCRIPT.contains("$ContractVersion = 1"));
    }
}
