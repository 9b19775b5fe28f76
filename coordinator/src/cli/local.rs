//! The commands that run in this process: `serve`, `certs`, `demo` and the offline
//! `runs verify --dir`.

use std::path::{Path, PathBuf};

use tollgate_certs::pki::RevokeTarget;
use tollgate_coordinator::{exit, journal, pki};
use tollgate_protocol::ctl::CtlResponse;
use uuid::Uuid;

use super::args::CertsCommand;
use super::{demo, serve, show};

/// A command run here, with no coordinator.
#[derive(Debug)]
pub enum Local {
    /// `tollgate serve --config FILE`.
    Serve { config: PathBuf },
    /// `tollgate certs ...`.
    Certs(CertsCommand),
    /// `tollgate demo [--dir DIR]`.
    Demo { dir: Option<PathBuf> },
    /// `tollgate runs verify [RUN] --dir RUN_DIR --key PUB`.
    VerifyOffline {
        run: Option<Uuid>,
        dir: PathBuf,
        key: PathBuf,
    },
}

/// Runs a local command; returns the exit status.
pub fn run(cmd: Local, json: bool) -> u8 {
    match cmd {
        Local::Serve { config } => match serve::run(&config) {
            Ok(()) => exit::OK,
            Err(e) => {
                eprintln!("tollgate serve: {e:#}");
                exit::USAGE
            }
        },
        Local::Certs(cmd) => match certs(cmd) {
            Ok(lines) => {
                for l in lines {
                    println!("{l}");
                }
                exit::OK
            }
            Err(e) => {
                eprintln!("tollgate: {e:#}");
                exit::USAGE
            }
        },
        Local::Demo { dir } => match demo::run(dir) {
            Ok(()) => exit::OK,
            Err(e) => {
                eprintln!("tollgate demo: {e:#}");
                1
            }
        },
        Local::VerifyOffline { run, dir, key } => verify_offline(run, &dir, &key, json),
    }
}

fn certs(cmd: CertsCommand) -> anyhow::Result<Vec<String>> {
    Ok(match cmd {
        CertsCommand::Init { fleet, out } => pki::init(&out, &fleet)?,
        CertsCommand::Issue {
            dir,
            role,
            name,
            days,
            force,
        } => pki::issue(&dir, role.into(), name.as_deref(), days, force)?,
        CertsCommand::Revoke {
            dir,
            role,
            name,
            serial,
        } => {
            let target = match (role, serial) {
                (_, Some(serial)) => RevokeTarget::Serial(serial),
                (Some(role), None) => {
                    RevokeTarget::Identity(pki::identity(&dir, role.into(), name.as_deref())?)
                }
                (None, None) => anyhow::bail!("say what to revoke: --role [--name] or --serial"),
            };
            pki::revoke(&dir, target)?
        }
        CertsCommand::Crl { dir } => pki::refresh_crl(&dir)?,
    })
}

/// `tollgate runs verify --dir RUN_DIR --key PUB`: no coordinator, only files.
fn verify_offline(run: Option<Uuid>, dir: &Path, key: &Path, json: bool) -> u8 {
    let public_key = match std::fs::read_to_string(key)
        .map_err(|e| e.to_string())
        .and_then(|t| hex::decode(t.trim()).map_err(|e| format!("not a hex key: {e}")))
    {
        Ok(k) if k.len() == 32 => k,
        Ok(k) => {
            eprintln!(
                "tollgate: {}: an Ed25519 public key is 32 bytes, this is {}",
                key.display(),
                k.len()
            );
            return exit::USAGE;
        }
        Err(e) => {
            eprintln!("tollgate: {}: {e}", key.display());
            return exit::USAGE;
        }
    };
    let from_dir = dir
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse::<Uuid>().ok());
    let Some(run_id) = run.or(from_dir) else {
        eprintln!(
            "tollgate: {}: the directory is not named after a run id; pass the run id too",
            dir.display()
        );
        return exit::USAGE;
    };
    let r = journal::verify_run_dir(dir, run_id, &public_key);
    show::show(CtlResponse::Verified(r.to_wire(run_id)), json)
}
