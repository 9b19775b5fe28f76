//! The `Recorder` actor: the single writer of every run's journal and summary.
//!
//! It lives on its own arbiter (thread), so an fsync never stalls the actors that decide.
//! A message is answered only once its lines are durable; the `Run` actor waits for that answer
//! before it performs the actions the lines record.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use actix::prelude::*;
use ring::signature::Ed25519KeyPair;
use uuid::Uuid;

use crate::core::timeline::TimelineEvent;
use crate::journal::index::RunIndex;
use crate::journal::{Journal, JournalError, Line};
use tollgate_certs::files::{Overwrite, Visibility, write_atomic};

pub struct Recorder {
    runs_dir: PathBuf,
    open: HashMap<Uuid, Journal>,
    /// Signs the checkpoint that ends every batch.
    key: Arc<Ed25519KeyPair>,
    /// Every run id ever created here; a new run is indexed before its first line.
    index: RunIndex,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("runs_dir", &self.runs_dir)
            .field("open", &self.open.len())
            .finish()
    }
}

impl Recorder {
    pub fn new(runs_dir: PathBuf, key: Arc<Ed25519KeyPair>, index: RunIndex) -> Self {
        Recorder {
            runs_dir,
            open: HashMap::new(),
            key,
            index,
        }
    }

    fn journal(&mut self, run_id: Uuid, at_ms: u64) -> Result<&mut Journal, JournalError> {
        if !self.open.contains_key(&run_id) {
            let dir = self.runs_dir.join(run_id.to_string());
            let j = if dir.join(Journal::FILE).exists() {
                Journal::recover(&dir, run_id)?.0
            } else if self.index.contains(run_id) {
                // Its directory was deleted or renamed: never a fresh journal under its id.
                return Err(JournalError::Corrupt {
                    path: dir.join(Journal::FILE),
                    line: 0,
                    problem: "the run index lists this run but its timeline is missing".into(),
                });
            } else {
                self.index.append(run_id, at_ms, &self.key)?;
                Journal::create(&dir, run_id)?
            };
            self.open.insert(run_id, j);
        }
        self.open
            .get_mut(&run_id)
            .ok_or_else(|| JournalError::Corrupt {
                path: PathBuf::from(run_id.to_string()),
                line: 0,
                problem: "journal vanished".into(),
            })
    }
}

impl Actor for Recorder {
    type Context = Context<Self>;
}

/// What an append wrote.
#[derive(Debug, Clone)]
pub struct Appended {
    pub lines: Vec<Line>,
    /// Event count and last hash after the append.
    pub events: u64,
    pub last_hash: String,
}

/// Append events to a run's timeline; answered once they are fsynced.
#[derive(Debug, Message)]
#[rtype(result = "Result<Appended, JournalError>")]
pub struct Append {
    pub run_id: Uuid,
    pub events: Vec<TimelineEvent>,
}

impl Handler<Append> for Recorder {
    type Result = Result<Appended, JournalError>;

    fn handle(&mut self, msg: Append, _: &mut Context<Self>) -> Self::Result {
        let key = self.key.clone();
        let at_ms = msg.events.first().map(|e| e.at_ms).unwrap_or(0);
        let j = self.journal(msg.run_id, at_ms)?;
        let lines = j.append(&msg.events, &key)?;
        let (events, h) = j.head();
        Ok(Appended {
            lines,
            events,
            last_hash: h.to_string(),
        })
    }
}

/// Write `summary.json` atomically and close the run's journal.
#[derive(Debug, Message)]
#[rtype(result = "Result<PathBuf, JournalError>")]
pub struct WriteSummary {
    pub run_id: Uuid,
    pub json: Vec<u8>,
}

impl Handler<WriteSummary> for Recorder {
    type Result = Result<PathBuf, JournalError>;

    fn handle(&mut self, msg: WriteSummary, _: &mut Context<Self>) -> Self::Result {
        let path = self
            .runs_dir
            .join(msg.run_id.to_string())
            .join("summary.json");
        write_atomic(&path, &msg.json, Visibility::Public, Overwrite::Replace).map_err(|e| {
            JournalError::Io {
                path: path.clone(),
                source: std::io::Error::other(e.to_string()),
            }
        })?;
        self.open.remove(&msg.run_id);
        Ok(path)
    }
}

/// The head (event count, last hash) of a run whose journal this recorder holds open: the
/// anchor of a run that has no signed summary yet.
#[derive(Debug, Message)]
#[rtype(result = "Option<(u64, String)>")]
pub struct Head {
    pub run_id: Uuid,
}

impl Handler<Head> for Recorder {
    type Result = Option<(u64, String)>;

    fn handle(&mut self, msg: Head, _: &mut Context<Self>) -> Self::Result {
        self.open.get(&msg.run_id).map(|j| {
            let (n, h) = j.head();
            (n, h.to_string())
        })
    }
}

/// Whether the run index names a run (created here at some time).
#[derive(Debug, Message)]
#[rtype(result = "bool")]
pub struct Indexed {
    pub run_id: Uuid,
}

impl Handler<Indexed> for Recorder {
    type Result = bool;

    fn handle(&mut self, msg: Indexed, _: &mut Context<Self>) -> Self::Result {
        self.index.contains(msg.run_id)
    }
}
