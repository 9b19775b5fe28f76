//! The command line as clap parses it. Which commands run here and which go to the
//! coordinator is decided by the type: a local command is a variant of [`Command`], a remote
//! one a variant of [`RemoteCommand`] (see [`super::Dispatch`]).
//!
//! Doc comments on these types are clap's help text, word for word, and the README and the
//! tests follow it: notes for developers inside this file are `//` comments.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use tollgate_certs::Role;
use tollgate_protocol::Mode;
use uuid::Uuid;

#[derive(Parser, Debug)]
#[command(
    name = "tollgate",
    version,
    about = "Safety-first deploy and teardown for small fleets"
)]
pub struct Cli {
    /// client.toml for commands that talk to the coordinator.
    #[arg(long, global = true, env = "TOLLGATE_CLIENT")]
    pub client: Option<PathBuf>,
    /// Print the answer as JSON on stdout (progress is not printed).
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

// The local commands, run in this process. The remote ones are flattened in between so that
// `--help` lists every command in its usual order; `runs verify --dir` is parsed there but
// runs here (`Command::dispatch`).
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the coordinator service.
    Serve {
        #[arg(long)]
        config: PathBuf,
    },
    #[command(flatten)]
    Remote(RemoteCommand),
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

// The remote commands: each is sent to the coordinator as one `CtlRequest`
// (`remote::request_for`).
#[derive(Subcommand, Debug)]
pub enum RemoteCommand {
    /// Deploy to the fleet.
    Deploy(IntentArgs),
    /// Tear down on the fleet.
    Teardown(IntentArgs),
    /// Show the sealed plan of a run.
    #[command(subcommand)]
    Plan(PlanCommand),
    /// Approve the exact plan of a run (approver role).
    Approve {
        run: Uuid,
        #[arg(long)]
        operation_hash: String,
    },
    /// Execute an approved run with its token.
    Execute {
        run: Uuid,
        #[arg(long)]
        token: String,
    },
    /// Cancel an open run: nothing new starts, steps already sent finish, the run closes
    /// (PolicyBlocked, Cancelled) and its hosts are free again.
    Cancel { run: Uuid },
    /// The fleet's lifecycle, as the coordinator last saw it.
    Status,
    /// List, show and verify runs.
    #[command(subcommand)]
    Runs(RunsCommand),
    /// Why everything in a run happened, in sentences.
    Explain { run: Uuid },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ModeArg {
    Quick,
    Full,
}

impl From<ModeArg> for Mode {
    fn from(m: ModeArg) -> Mode {
        match m {
            ModeArg::Quick => Mode::Quick,
            ModeArg::Full => Mode::Full,
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct IntentArgs {
    /// quick never destroys anything; full may, after approval.
    #[arg(long, value_enum, default_value = "quick")]
    pub mode: ModeArg,
    /// Comma-separated host names (default: every host).
    #[arg(long, value_delimiter = ',')]
    pub hosts: Vec<String>,
    /// Run id (default: a new one). The escalation command reuses the escalated run's id.
    #[arg(long)]
    pub run: Option<Uuid>,
    /// Decide everything, execute nothing.
    #[arg(long)]
    pub shadow: bool,
}

#[derive(Subcommand, Debug)]
pub enum PlanCommand {
    Show { run: Uuid },
}

#[derive(Subcommand, Debug)]
pub enum RunsCommand {
    List,
    Show {
        run: Uuid,
    },
    /// Verify a run's timeline and summary: through the coordinator (`runs verify RUN`), or
    /// offline by an auditor with nothing but the run's directory and the coordinator's
    /// public key (`runs verify --dir RUN_DIR --key token-signing.pub`).
    Verify {
        #[arg(required_unless_present = "dir")]
        run: Option<Uuid>,
        /// Verify this run directory offline (needs --key).
        #[arg(long, requires = "key")]
        dir: Option<PathBuf>,
        /// The coordinator's public key file (hex, written by `tollgate serve` beside its
        /// signing key as token-signing.pub).
        #[arg(long)]
        key: Option<PathBuf>,
    },
    /// Do two runs take the same decisions (e.g. a shadow run against the real one)? Exit 0 at
    /// parity, 6 when they differ, 5 when a timeline does not verify.
    Diff {
        a: Uuid,
        b: Uuid,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum RoleArg {
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
pub enum CertsCommand {
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
        /// Lifetime in days, 1 to 3650 (default 365); a certificate is never born expired.
        #[arg(long, value_parser = clap::value_parser!(i64).range(1..=3650))]
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
