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
