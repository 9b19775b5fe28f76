//! `tollgate`: the operator's CLI and the coordinator service.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tollgate_certs::Role;
use tollgate_certs::pki::RevokeTarget;
use tollgate_coordinator::pki;

mod demo;

#[derive(Parser, Debug)]
#[command(
    name = "tollgate",
    version,
    about = "Safety-first deploy and teardown for small fleets"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Mint and revoke the fleet PKI.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Run the built-in demonstration on this machine (throwaway PKI, loopback only).
    Demo {
        /// Where to leave the demo's artifacts (default: a new directory under the system temp dir).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum RoleArg {
    Coordinator,
    Agent,
    Operator,
}

impl From<RoleArg> for Role {
    fn from(r: RoleArg) -> Role {
        match r {
            RoleArg::Coordinator => Role::Coordinator,
            RoleArg::Agent => Role::Agent,
            RoleArg::Operator => Role::Operator,
        }
    }
}

#[derive(Subcommand, Debug)]
enum CertsCommand {
    /// Create a fleet CA and an empty CRL in DIR.
    Init {
        #[arg(long)]
        fleet: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Issue a leaf certificate whose URI SAN is spiffe://FLEET/ROLE[/NAME].
    Issue {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, value_enum)]
        role: RoleArg,
        /// Host name for agents, person or robot name for operators; none for the coordinator.
        #[arg(long)]
        name: Option<String>,
        /// Lifetime in days (default 365).
        #[arg(long)]
        days: Option<i64>,
        /// Replace an existing certificate and key of the same identity.
        #[arg(long)]
        force: bool,
    },
    /// Revoke a certificate (by identity or serial) and re-sign the CRL.
    Revoke {
        #[arg(long)]
        dir: PathBuf,
        #[arg(
            long,
            value_enum,
            required_unless_present = "serial",
            conflicts_with = "serial"
        )]
        role: Option<RoleArg>,
        #[arg(long, requires = "role")]
        name: Option<String>,
        #[arg(long)]
        serial: Option<String>,
    },
    /// Re-sign the CRL with a fresh validity window.
    Crl {
        #[arg(long)]
        dir: PathBuf,
    },
}

fn run_certs(cmd: CertsCommand) -> anyhow::Result<Vec<String>> {
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

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TOLLGATE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Certs(cmd) => run_certs(cmd).map(|lines| {
            for l in lines {
                println!("{l}");
            }
        }),
        Command::Demo { dir } => demo::run(dir),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tollgate: {e:#}");
            ExitCode::from(2)
        }
    }
}
