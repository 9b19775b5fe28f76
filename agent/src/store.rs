//! The durable idempotency store: key -> started | finished(result).
//!
//! Each key is one JSON file `idempotency/<sha256(key)>.json`, written atomically and fsynced
//! *before* the script starts (`started`) and again when it ends (`finished`). After a restart, a
//! key still `started` is reported `Uncertain` and never run again: the agent cannot know whether
//! the script ran. A key reused for a different request is a conflict, never a replay.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{broadcast, watch};
use tollgate_certs::files::{Overwrite, Visibility, write_atomic};
use tollgate_protocol::agent::{ExecResult, IdempotencyStatus, OutputChunk};

use crate::AgentError;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    key: String,
    request_hash: String,
    state: RecordState,
}

#[derive(Debug, Serialize, Deserialize)]
enum RecordState {
    Started { at_ms: u64 },
    Finished { result: ExecResult },
}

/// An execution in progress that others can attach to or cancel.
#[derive(Debug)]
pub struct Running {
    pub request_hash: String,
    result: watch::Receiver<Option<ExecResult>>,
    output: broadcast::Sender<OutputChunk>,
    cancel: watch::Sender<bool>,
}

impl Running {
    /// Output from now on, and the final result.
    pub fn attach(
        &self,
    ) -> (
        broadcast::Receiver<OutputChunk>,
        watch::Receiver<Option<ExecResult>>,
    ) {
        (self.output.subscribe(), self.result.clone())
    }

    pub fn cancel(&self) {
        let _ = self.cancel.send(true);
    }
}

#[derive(Debug)]
enum Slot {
    Running(Arc<Running>),
    Finished {
        request_hash: String,
        result: ExecResult,
    },
    Uncertain {
        request_hash: String,
    },
}

/// The right to run a key, held by exactly one execution.
#[derive(Debug)]
pub struct Ticket {
    pub key: String,
    request_hash: String,
    result: watch::Sender<Option<ExecResult>>,
    pub output: broadcast::Sender<OutputChunk>,
    pub cancel: watch::Receiver<bool>,
}

/// What `begin` found.
#[derive(Debug)]
pub enum Begin {
    /// Never seen: the `started` record is durable; run it.
    Fresh(Ticket),
    /// Running now: attach to it.
    Attach(Arc<Running>),
    /// Finished before: here is the stored result; nothing runs.
    Done(ExecResult),
    /// Left `started` by an earlier agent process: never re-run.
    Uncertain,
    /// The key was used for a different request.
    Conflict,
}

#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    slots: Mutex<HashMap<String, Slot>>,
}

fn file_for(dir: &Path, key: &str) -> PathBuf {
    dir.join(format!(
        "{}.json",
        hex::encode(Sha256::digest(key.as_bytes()))
    ))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Store {
    /// Opens (creating) the store and loads every record.
    pub fn open(dir: &Path) -> Result<Store, AgentError> {
        std::fs::create_dir_all(dir).map_err(|e| AgentError::io(dir, e))?;
        let mut slots = HashMap::new();
        for entry in std::fs::read_dir(dir).map_err(|e| AgentError::io(dir, e))? {
            let path = entry.map_err(|e| AgentError::io(dir, e))?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue; // temporary files of an interrupted write
            }
            let bytes = std::fs::read(&path).map_err(|e| AgentError::io(&path, e))?;
            let record: Record = serde_json::from_slice(&bytes).map_err(|e| AgentError::Store {
                path: path.clone(),
                reason: format!("unreadable record: {e}"),
            })?;
            let slot = match record.state {
                RecordState::Started { .. } => {
                    tracing::warn!(key = %record.key, "execution was in progress when the agent stopped: uncertain");
                    Slot::Uncertain {
                        request_hash: record.request_hash,
                    }
                }
                RecordState::Finished { result } => Slot::Finished {
                    request_hash: record.request_hash,
                    result,
                },
            };
            slots.insert(record.key, slot);
        }
        Ok(Store {
            dir: dir.to_path_buf(),
            slots: Mutex::new(slots),
        })
    }

    fn write(&self, record: &Record) -> Result<(), AgentError> {
        let path = file_for(&self.dir, &record.key);
        let bytes = serde_json::to_vec(record).map_err(|e| AgentError::Store {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        write_atomic(&path, &bytes, Visibility::Private, Overwrite::Replace).map_err(|e| {
            AgentError::Store {
                path,
                reason: e.to_string(),
            }
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Claims `key` for a request whose canonical hash is `request_hash`. Blocking (fsync).
    pub fn begin(&self, key: &str, request_hash: &str) -> Result<Begin, AgentError> {
        let mut slots = self.lock();
        let same = |h: &str| h == request_hash;
        match slots.get(key) {
            Some(Slot::Running(r)) if same(&r.request_hash) => return Ok(Begin::Attach(r.clone())),
            Some(Slot::Finished {
                request_hash: h,
                result,
            }) if same(h) => {
                let mut result = result.clone();
                result.replayed = true;
                return Ok(Begin::Done(result));
            }
            Some(Slot::Uncertain { request_hash: h }) if same(h) => return Ok(Begin::Uncertain),
            Some(_) => return Ok(Begin::Conflict),
            None => {}
        }
        // Durable before anything runs.
        self.write(&Record {
            key: key.to_string(),
            request_hash: request_hash.to_string(),
            state: RecordState::Started { at_ms: now_ms() },
        })?;
        let (result_tx, result_rx) = watch::channel(None);
        let (output, _) = broadcast::channel(256);
        let (cancel_tx, cancel_rx) = watch::channel(false);
        let running = Arc::new(Running {
            request_hash: request_hash.to_string(),
            result: result_rx,
            output: output.clone(),
            cancel: cancel_tx,
        });
        slots.insert(key.to_string(), Slot::Running(running));
        Ok(Begin::Fresh(Ticket {
            key: key.to_string(),
            request_hash: request_hash.to_string(),
            result: result_tx,
            output,
            cancel: cancel_rx,
        }))
    }

    /// Records the result durably, then tells every attached waiter. Blocking (fsync).
    /// If the write fails, the key stays `started` on disk and reads `Uncertain` after a restart.
    pub fn finish(&self, ticket: Ticket, result: ExecResult) -> Result<(), AgentError> {
        let written = self.write(&Record {
            key: ticket.key.clone(),
            request_hash: ticket.request_hash.clone(),
            state: RecordState::Finished {
                result: result.clone(),
            },
        });
        let mut slots = self.lock();
        match &written {
            Ok(()) => {
                slots.insert(
                    ticket.key.clone(),
                    Slot::Finished {
                        request_hash: ticket.request_hash.clone(),
                        result: result.clone(),
                    },
                );
            }
            Err(_) => {
                slots.insert(
                    ticket.key.clone(),
                    Slot::Uncertain {
                        request_hash: ticket.request_hash.clone(),
                    },
                );
            }
        }
        let _ = ticket.result.send(Some(result));
        written
    }

    /// What the store knows about `key`.
    pub fn query(&self, key: &str) -> IdempotencyStatus {
        match self.lock().get(key) {
            None => IdempotencyStatus::NotFound,
            Some(Slot::Running(_)) => IdempotencyStatus::Running,
            Some(Slot::Finished { result, .. }) => {
                let mut r = result.clone();
                r.replayed = true;
                IdempotencyStatus::Finished(r)
            }
            Some(Slot::Uncertain { .. }) => IdempotencyStatus::Uncertain,
        }
    }

    /// Asks a running execution to stop. Returns whether one was running.
    pub fn cancel(&self, key: &str) -> bool {
        match self.lock().get(key) {
            Some(Slot::Running(r)) => {
                r.cancel();
                true
            }
            _ => false,
        }
    }

    /// Every execution in progress.
    pub fn running(&self) -> Vec<Arc<Running>> {
        self.lock()
            .values()
            .filter_map(|s| match s {
                Slot::Running(r) => Some(r.clone()),
                _ => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_protocol::agent::ExecStatus;

    fn result(key: &str) -> ExecResult {
        ExecResult {
            idempotency_key: key.into(),
            status: ExecStatus::Exited { code: 0 },
            duration_ms: 1,
            stdout_truncated: false,
            stderr_truncated: false,
            replayed: false,
        }
    }

    #[test]
    fn lifecycle_of_a_key_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let Begin::Fresh(t) = store.begin("k1", "h").unwrap() else {
            panic!("fresh")
        };
        assert!(matches!(store.begin("k1", "h").unwrap(), Begin::Attach(_)));
        assert!(matches!(
            store.begin("k1", "other").unwrap(),
            Begin::Conflict
        ));
        store.finish(t, result("k1")).unwrap();
        let Begin::Done(r) = store.begin("k1", "h").unwrap() else {
            panic!("done")
        };
        assert!(r.replayed);
        let Begin::Fresh(_left_started) = store.begin("k2", "h").unwrap() else {
            panic!("fresh")
        };
        drop(store);

        let store = Store::open(dir.path()).unwrap();
        assert!(matches!(store.query("k1"), IdempotencyStatus::Finished(_)));
        assert_eq!(store.query("k2"), IdempotencyStatus::Uncertain);
        assert!(matches!(store.begin("k2", "h").unwrap(), Begin::Uncertain));
        assert_eq!(store.query("k3"), IdempotencyStatus::NotFound);
    }

    #[test]
    fn corrupt_record_is_a_named_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x.json"), b"{not json").unwrap();
        let e = Store::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("x.json") && e.contains("unreadable"), "{e}");
    }
}
