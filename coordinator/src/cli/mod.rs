//! The `tollgate` command line. Everything under `cli/` belongs to the binary only: the library
//! (`lib.rs`) never sees it.
//!
//! * [`args`]: the clap types; a command is local or remote by the enum it is declared in.
//! * [`local`]: the commands that run in this process (`serve`, `certs`, `demo`, the offline
//!   `runs verify --dir`), with [`demo`] and [`serve`].
//! * [`remote`]: the commands sent to the coordinator, one `CtlRequest` each, with their
//!   [`progress`] on stderr.
//! * [`show`]: how an answer is printed and the exit status it gives.

pub mod args;
pub mod demo;
pub mod local;
pub mod progress;
pub mod remote;
pub mod serve;
pub mod show;

use args::{Cli, Command, RemoteCommand, RunsCommand};
use local::Local;

/// Where a command line runs.
#[derive(Debug)]
pub enum Dispatch {
    /// In this process.
    Local(Local),
    /// At the coordinator, as one request.
    Remote(RemoteCommand),
}

impl Command {
    /// Local or remote: the one place that says so for each command (a new variant of
    /// [`Command`] needs its arm here, a new [`RemoteCommand`] its request in
    /// [`remote::request_for`]).
    pub fn dispatch(self) -> Dispatch {
        match self {
            Command::Serve { config } => Dispatch::Local(Local::Serve { config }),
            Command::Certs(cmd) => Dispatch::Local(Local::Certs(cmd)),
            Command::Demo { dir } => Dispatch::Local(Local::Demo { dir }),
            Command::Remote(RemoteCommand::Runs(RunsCommand::Verify {
                run,
                dir: Some(dir),
                key: Some(key),
            })) => Dispatch::Local(Local::VerifyOffline { run, dir, key }),
            Command::Remote(cmd) => Dispatch::Remote(cmd),
        }
    }
}

/// Runs a parsed command line; returns the exit status.
pub fn run(cli: Cli) -> u8 {
    match cli.command.dispatch() {
        Dispatch::Local(cmd) => local::run(cmd, cli.json),
        Dispatch::Remote(cmd) => remote::run(cli.client, cli.json, cmd),
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};
    use tollgate_protocol::ctl::CtlRequest;
    use tollgate_protocol::{Action, Mode};
    use uuid::Uuid;

    use super::*;

    const RUN: &str = "00000000-0000-0000-0000-000000000001";

    fn dispatch(line: &[&str]) -> Dispatch {
        let args = std::iter::once("tollgate").chain(line.iter().copied());
        Cli::try_parse_from(args).unwrap().command.dispatch()
    }

    fn request(line: &[&str]) -> CtlRequest {
        match dispatch(line) {
            Dispatch::Remote(cmd) => remote::request_for(cmd),
            Dispatch::Local(cmd) => panic!("{line:?} runs here: {cmd:?}"),
        }
    }

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn serve_certs_demo_and_offline_verify_run_here() {
        assert!(matches!(
            dispatch(&["serve", "--config", "c.toml"]),
            Dispatch::Local(Local::Serve { .. })
        ));
        assert!(matches!(
            dispatch(&["certs", "crl", "--dir", "pki"]),
            Dispatch::Local(Local::Certs(_))
        ));
        assert!(matches!(
            dispatch(&["demo"]),
            Dispatch::Local(Local::Demo { dir: None })
        ));
        assert!(matches!(
            dispatch(&["runs", "verify", "--dir", "d", "--key", "k"]),
            Dispatch::Local(Local::VerifyOffline { run: None, .. })
        ));
    }

    #[test]
    fn verify_without_dir_asks_the_coordinator() {
        let run: Uuid = RUN.parse().unwrap();
        assert_eq!(
            request(&["runs", "verify", RUN]),
            CtlRequest::RunsVerify { run_id: run }
        );
        // --key alone does not make it offline.
        assert_eq!(
            request(&["runs", "verify", RUN, "--key", "k"]),
            CtlRequest::RunsVerify { run_id: run }
        );
    }

    #[test]
    fn deploy_submits_the_intent() {
        let CtlRequest::Submit(intent) = request(&[
            "deploy", "--mode", "full", "--hosts", "a,b", "--run", RUN, "--shadow",
        ]) else {
            panic!("not a submit");
        };
        assert_eq!(intent.action, Action::Deploy);
        assert_eq!(intent.requested_mode, Mode::Full);
        assert_eq!(intent.target_hosts, ["a", "b"]);
        assert_eq!(intent.run_id.to_string(), RUN);
        assert!(intent.shadow);
        assert!(intent.requestor.is_empty());
        let CtlRequest::Submit(fresh) = request(&["teardown"]) else {
            panic!("not a submit");
        };
        assert_eq!(fresh.action, Action::Teardown);
        assert_eq!(fresh.requested_mode, Mode::Quick);
        assert!(fresh.target_hosts.is_empty() && !fresh.shadow);
    }

    #[test]
    fn queries_name_their_run() {
        let run: Uuid = RUN.parse().unwrap();
        assert_eq!(
            request(&["plan", "show", RUN]),
            CtlRequest::PlanShow { run_id: run }
        );
        assert_eq!(
            request(&["approve", RUN, "--operation-hash", "h"]),
            CtlRequest::Approve {
                run_id: run,
                operation_hash: "h".into()
            }
        );
        assert_eq!(
            request(&["execute", RUN, "--token", "t"]),
            CtlRequest::Execute {
                run_id: run,
                token: "t".into()
            }
        );
        assert_eq!(
            request(&["cancel", RUN]),
            CtlRequest::Cancel { run_id: run }
        );
        assert_eq!(request(&["status", "--json"]), CtlRequest::Status);
        assert_eq!(request(&["runs", "list"]), CtlRequest::RunsList);
        assert_eq!(
            request(&["runs", "show", RUN]),
            CtlRequest::RunsShow { run_id: run }
        );
        assert_eq!(
            request(&["runs", "diff", RUN, RUN]),
            CtlRequest::RunsDiff { a: run, b: run }
        );
        assert_eq!(
            request(&["explain", RUN]),
            CtlRequest::Explain { run_id: run }
        );
    }
}
