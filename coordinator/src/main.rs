//! `tollgate`: the operator's CLI and the coordinator service.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tollgate_certs::Role;
use tollgate_certs::pki::RevokeTarget;
use tollgate_coordinator::client::{Client, ClientConfig, ClientError};
use tollgate_coordinator::exit;
use tollgate_coordinator::pki;
use tollgate_coordinator::render;
use tollgate_protocol::ctl::{CtlRequest, CtlResponse, OperationIntent, ProgressEvent};
use tollgate_protocol::{Action, Mode};
use uuid::Uuid;

mod cli;

use cli::{demo, serve};

#[derive(Parser, Debug)]
#[command(
    name = "tollgate",
    version,
    about = "Safety-first deploy and teardown for small fleets"
)]
struct Cli {
    /// client.toml for commands that talk to the coordinator.
    #[arg(long, global = true, env = "TOLLGATE_CLIENT")]
    client: Option<PathBuf>,
    /// Print the answer as JSON on stdout (progress is not printed).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ModeArg {
    Quick,
    Full,
}

#[derive(clap::Args, Debug)]
struct IntentArgs {
    /// quick never destroys anything; full may, after approval.
    #[arg(long, value_enum, default_value = "quick")]
    mode: ModeArg,
    /// Comma-separated host names (default: every host).
    #[arg(long, value_delimiter = ',')]
    hosts: Vec<String>,
    /// Run id (default: a new one). The escalation command reuses the escalated run's id.
    #[arg(long)]
    run: Option<Uuid>,
    /// Decide everything, execute nothing.
    #[arg(long)]
    shadow: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the coordinator service.
    Serve {
        #[arg(long)]
        config: PathBuf,
    },
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

#[derive(Subcommand, Debug)]
enum PlanCommand {
    Show { run: Uuid },
}

#[derive(Subcommand, Debug)]
enum RunsCommand {
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

/// Shows progress events on stderr: bars on a terminal, plain lines otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    plain: bool,
}

impl Progress {
    fn new(quiet: bool) -> Self {
        let tty = std::io::stderr().is_terminal();
        let bar = (tty && !quiet).then(|| {
            let b = indicatif::ProgressBar::new(0);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{spinner} [{bar:30}] {pos}/{len} steps  {msg}",
            ) {
                b.set_style(style.progress_chars("=> "));
            }
            b
        });
        Progress {
            bar,
            plain: !tty && !quiet,
        }
    }

    fn on(&mut self, p: &ProgressEvent) {
        let what = render::progress_line(p);
        if let Some(b) = &self.bar {
            b.set_length(u64::from(p.total));
            b.set_position(u64::from(p.done));
            b.println(format!("  {what}"));
            b.set_message(what);
        } else if self.plain {
            eprintln!("  {what}");
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

fn emit_json<T: serde::Serialize>(v: &T) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("tollgate: cannot encode the answer: {e}"),
    }
}

/// Prints an answer; returns the exit status.
fn show(resp: CtlResponse, json: bool) -> u8 {
    match resp {
        CtlResponse::Run(r) => {
            if json {
                emit_json(&r)
            } else {
                print!("{}", render::report(&r))
            }
            exit::for_outcome(r.outcome.kind())
        }
        CtlResponse::Plan(p) => {
            if json {
                emit_json(&p)
            } else {
                print!("{}", render::plan(&p))
            }
            0
        }
        CtlResponse::Approved(a) => {
            if json {
                emit_json(&a)
            } else {
                print!("{}", render::approval(&a))
            }
            0
        }
        CtlResponse::ApprovalRecorded {
            run_id,
            approvers,
            required,
        } => {
            if json {
                emit_json(
                    &serde_json::json!({"run_id": run_id, "approvers": approvers, "required": required}),
                );
            } else {
                println!(
                    "approval recorded for run {run_id} ({} of {required}: {}); another approver must run the same `tollgate approve` command",
                    approvers.len(),
                    approvers.join(", ")
                );
            }
            exit::APPROVAL_PENDING
        }
        CtlResponse::Status { hosts } => {
            if json {
                emit_json(&hosts)
            } else {
                print!("{}", render::status(&hosts))
            }
            0
        }
        CtlResponse::Runs { runs } => {
            if json {
                emit_json(&runs)
            } else {
                print!("{}", render::runs(&runs))
            }
            0
        }
        CtlResponse::Summary { json: doc } => {
            println!("{doc}");
            0
        }
        CtlResponse::Verified(v) => {
            if json {
                emit_json(&v)
            } else {
                print!("{}", render::verify(&v))
            }
            if v.ok { exit::OK } else { exit::TAMPERED }
        }
        CtlResponse::Diff(d) => {
            if json {
                emit_json(&d)
            } else {
                print!("{}", render::diff(&d))
            }
            match (&d.problem, d.parity) {
                (Some(_), _) => exit::TAMPERED,
                (None, true) => 0,
                (None, false) => exit::DIFFERENT,
            }
        }
        CtlResponse::Explanation { lines } => {
            if json {
                emit_json(&lines)
            } else {
                for l in lines {
                    println!("{l}");
                }
            }
            0
        }
        CtlResponse::Error(e) => {
            if json {
                emit_json(&e)
            } else {
                eprintln!("tollgate: refused ({:?}): {}", e.code, e.message);
            }
            exit::for_error(e.code)
        }
        CtlResponse::HelloAck(_) | CtlResponse::Progress(_) => {
            eprintln!("tollgate: unexpected answer");
            exit::REFUSED
        }
    }
}

fn client_config(path: Option<PathBuf>) -> Result<ClientConfig, (u8, String)> {
    let path = path.ok_or((
        exit::USAGE,
        "no client config: pass --client FILE or set TOLLGATE_CLIENT".to_string(),
    ))?;
    ClientConfig::load(&path).map_err(|e| (exit::USAGE, e.to_string()))
}

fn request_for(cmd: Command) -> CtlRequest {
    let intent = |action, a: IntentArgs| {
        CtlRequest::Submit(OperationIntent {
            action,
            requested_mode: match a.mode {
                ModeArg::Quick => Mode::Quick,
                ModeArg::Full => Mode::Full,
            },
            target_hosts: a.hosts,
            run_id: a.run.unwrap_or_else(Uuid::new_v4),
            requestor: String::new(),
            shadow: a.shadow,
        })
    };
    match cmd {
        Command::Deploy(a) => intent(Action::Deploy, a),
        Command::Teardown(a) => intent(Action::Teardown, a),
        Command::Plan(PlanCommand::Show { run }) => CtlRequest::PlanShow { run_id: run },
        Command::Approve {
            run,
            operation_hash,
        } => CtlRequest::Approve {
            run_id: run,
            operation_hash,
        },
        Command::Execute { run, token } => CtlRequest::Execute { run_id: run, token },
        Command::Cancel { run } => CtlRequest::Cancel { run_id: run },
        Command::Status => CtlRequest::Status,
        Command::Runs(RunsCommand::List) => CtlRequest::RunsList,
        Command::Runs(RunsCommand::Show { run }) => CtlRequest::RunsShow { run_id: run },
        Command::Runs(RunsCommand::Verify { run, .. }) => CtlRequest::RunsVerify {
            run_id: run.unwrap_or_default(),
        },
        Command::Runs(RunsCommand::Diff { a, b }) => CtlRequest::RunsDiff { a, b },
        Command::Explain { run } => CtlRequest::Explain { run_id: run },
        Command::Serve { .. } | Command::Certs(_) | Command::Demo { .. } => CtlRequest::Status,
    }
}

fn remote(client: Option<PathBuf>, json: bool, cmd: Command) -> u8 {
    let cfg = match client_config(client) {
        Ok(c) => c,
        Err((code, msg)) => {
            eprintln!("tollgate: {msg}");
            return code;
        }
    };
    let req = request_for(cmd);
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tollgate: {e}");
            return exit::USAGE;
        }
    };
    rt.block_on(async move {
        let client = match Client::connect(&cfg).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("tollgate: {e}");
                return match e {
                    ClientError::Config { .. } | ClientError::Certs(_) => exit::USAGE,
                    _ => exit::UNREACHABLE,
                };
            }
        };
        let mut progress = Progress::new(json);
        let answer = client.stream(req, |p| progress.on(p)).await;
        progress.finish();
        client.close();
        match answer {
            Ok(resp) => show(resp, json),
            Err(e) => {
                eprintln!("tollgate: {e}");
                exit::UNREACHABLE
            }
        }
    })
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TOLLGATE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Colour only on a terminal: logs redirected to a file stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Certs(cmd) => match run_certs(cmd) {
            Ok(lines) => {
                for l in lines {
                    println!("{l}");
                }
                0
            }
            Err(e) => {
                eprintln!("tollgate: {e:#}");
                exit::USAGE
            }
        },
        Command::Demo { dir } => match demo::run(dir) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("tollgate demo: {e:#}");
                1
            }
        },
        Command::Serve { config } => match serve::run(&config) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("tollgate serve: {e:#}");
                exit::USAGE
            }
        },
        Command::Runs(RunsCommand::Verify {
            run,
            dir: Some(dir),
            key: Some(key),
        }) => verify_offline(run, &dir, &key, cli.json),
        other => remote(cli.client, cli.json, other),
    };
    ExitCode::from(code)
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
    let r = tollgate_coordinator::journal::verify_run_dir(dir, run_id, &public_key);
    show(
        CtlResponse::Verified(tollgate_protocol::ctl::VerifyReport {
            run_id,
            ok: r.ok,
            events: r.events,
            first_bad_line: r.first_bad_line,
            problem: r.problem,
        }),
        json,
    )
}
