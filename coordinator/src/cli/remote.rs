//! The commands sent to the coordinator: each [`RemoteCommand`] becomes one [`CtlRequest`]
//! ([`request_for`]), sent over the ctl link with its progress shown, and the answer printed.

use std::path::PathBuf;

use tollgate_coordinator::client::{Client, ClientConfig, ClientError};
use tollgate_coordinator::exit;
use tollgate_protocol::Action;
use tollgate_protocol::ctl::{CtlRequest, OperationIntent};
use uuid::Uuid;

use super::args::{IntentArgs, PlanCommand, RemoteCommand, RunsCommand};
use super::progress::Progress;
use super::show;

/// The request a remote command sends.
pub fn request_for(cmd: RemoteCommand) -> CtlRequest {
    match cmd {
        RemoteCommand::Deploy(a) => submit(Action::Deploy, a),
        RemoteCommand::Teardown(a) => submit(Action::Teardown, a),
        RemoteCommand::Plan(PlanCommand::Show { run }) => CtlRequest::PlanShow { run_id: run },
        RemoteCommand::Approve {
            run,
            operation_hash,
        } => CtlRequest::Approve {
            run_id: run,
            operation_hash,
        },
        RemoteCommand::Execute { run, token } => CtlRequest::Execute { run_id: run, token },
        RemoteCommand::Cancel { run } => CtlRequest::Cancel { run_id: run },
        RemoteCommand::Status => CtlRequest::Status,
        RemoteCommand::Runs(RunsCommand::List) => CtlRequest::RunsList,
        RemoteCommand::Runs(RunsCommand::Show { run }) => CtlRequest::RunsShow { run_id: run },
        // With --dir (and so --key) the verification runs here (`Command::dispatch`); without
        // it clap requires the run id.
        RemoteCommand::Runs(RunsCommand::Verify { run, .. }) => CtlRequest::RunsVerify {
            run_id: run.unwrap_or_default(),
        },
        RemoteCommand::Runs(RunsCommand::Diff { a, b }) => CtlRequest::RunsDiff { a, b },
        RemoteCommand::Explain { run } => CtlRequest::Explain { run_id: run },
    }
}

fn submit(action: Action, a: IntentArgs) -> CtlRequest {
    CtlRequest::Submit(OperationIntent {
        action,
        requested_mode: a.mode.into(),
        target_hosts: a.hosts,
        run_id: a.run.unwrap_or_else(Uuid::new_v4),
        requestor: String::new(),
        shadow: a.shadow,
    })
}

fn client_config(path: Option<PathBuf>) -> Result<ClientConfig, (u8, String)> {
    let path = path.ok_or((
        exit::USAGE,
        "no client config: pass --client FILE or set TOLLGATE_CLIENT".to_string(),
    ))?;
    ClientConfig::load(&path).map_err(|e| (exit::USAGE, e.to_string()))
}

/// Sends a remote command to the coordinator named by `client` (a client.toml) and prints its
/// answer; returns the exit status.
pub fn run(client: Option<PathBuf>, json: bool, cmd: RemoteCommand) -> u8 {
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
                    ClientError::Config(_) | ClientError::Certs(_) => exit::USAGE,
                    _ => exit::UNREACHABLE,
                };
            }
        };
        let mut progress = Progress::new(json);
        let answer = client.stream(req, |p| progress.on(p)).await;
        progress.finish();
        client.close();
        match answer {
            Ok(resp) => show::show(resp, json),
            Err(e) => {
                eprintln!("tollgate: {e}");
                exit::UNREACHABLE
            }
        }
    })
}
