//! The durable idempotency store: key -> started | finished(result).
//!
//! Each transition of a key is one JSON line appended to `idempotency/idempotency.log` and synced
//! to disk *before* the script starts (`started`) and again when it ends (`finished`); the last
//! line of a key wins (see [`crate::store_log`]). After a restart, a key still `started` is
//! reported `Uncertain` and never run again: the agent cannot know whether the script ran. A key
//! reused for a different request is a conflict, never a replay.
//!
//! Earlier agents kept one file per key (`<sha256(key)>.json`); such files are still read at
//! start, before the log, and never written. At start, a log holding more than
//! [`COMPACT_AFTER`] lines and over 1.5 lines per key is rewritten with one line
//! per key (atomically), so it does not grow without bound across restarts.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};
use tollgate_protocol::agent::{ExecResult, IdempotencyStatus, OutputChunk};

use crate::AgentError;
use crate::store_log::Log;

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

/// Lines a log may hold before it is worth compacting at start.
pub const COMPACT_AFTER: usize = 4096;

/// Held (an exclusive OS file lock) for as long as the store is open: one agent per store.
pub const LOCK_FILE: &str = "idempotency.lock";

/// A `*.json` file that is deliberately not a record: an older agent (which read only per-key
/// `*.json` files and would miss every key in the log) refuses to start on it instead of
/// answering `NotFound` for keys that ran.
pub const FORMAT_MARKER: &str = "FORMAT-idempotency-log.json";
const FORMAT_MARKER_TEXT: &[u8] =
    b"{\"format\": \"idempotency.log, one JSON record per line; read by tollgate-agent 0.1 and later\"}\n";

#[derive(Debug)]
pub struct Store {
    log: Mutex<Log>,
    slots: Mutex<HashMap<String, Slot>>,
    /// Keeps the exclusive lock.
    _lock: std::fs::File,
}

/// Takes the store's exclusive lock, or says who has it.
fn lock_store(dir: &Path) -> Result<std::fs::File, AgentError> {
    let path = dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| AgentError::io(&path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(AgentError::Store {
            path,
            reason:
                "another tollgate-agent is using this state_dir (its idempotency store is locked); \
                     two agents on one store could run a step twice"
                    .into(),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(AgentError::Store {
            path,
            reason: format!("cannot lock the idempotency store: {e}"),
        }),
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Store {
    /// Opens (creating) the store and loads every record: the legacy per-key files, then the log.
    pub fn open(dir: &Path) -> Result<Store, AgentError> {
        std::fs::create_dir_all(dir).map_err(|e| AgentError::io(dir, e))?;
        // Before reading or changing anything: a second agent must not cut or compact the log
        // under a running one.
        let lock = lock_store(dir)?;
        let marker = dir.join(FORMAT_MARKER);
        if !marker.exists() {
            tollgate_certs::files::write_atomic(
                &marker,
                FORMAT_MARKER_TEXT,
                tollgate_certs::files::Visibility::Private,
                tollgate_certs::files::Overwrite::Replace,
            )
            .map_err(|e| AgentError::Store {
                path: marker.clone(),
                reason: e.to_string(),
            })?;
        }
        let mut records: HashMap<String, Record> = HashMap::new();
        for entry in std::fs::read_dir(dir).map_err(|e| AgentError::io(dir, e))? {
            let path = entry.map_err(|e| AgentError::io(dir, e))?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") || path == marker {
                continue; // the log, the lock, the marker, or temporary files of a write
            }
            let bytes = std::fs::read(&path).map_err(|e| AgentError::io(&path, e))?;
            let record: Record = serde_json::from_slice(&bytes).map_err(|e| AgentError::Store {
                path: path.clone(),
                reason: format!("unreadable record: {e}"),
            })?;
            records.insert(record.key.clone(), record);
        }
        let opened = Log::open(dir)?;
        let log = opened.log;
        if opened.torn_bytes > 0 {
            tracing::warn!(
                path = %log.path().display(),
                bytes = opened.torn_bytes,
                "cut off a torn last record (the agent stopped while writing it; it was never durable)"
            );
        }
        let line_count = opened.lines.len();
        for (i, line) in opened.lines.iter().enumerate() {
            let record: Record = serde_json::from_slice(line).map_err(|e| AgentError::Store {
                path: log.path().to_path_buf(),
                reason: format!("line {}: unreadable record: {e}", i + 1),
            })?;
            records.insert(record.key.clone(), record);
        }
        let log = if line_count > COMPACT_AFTER && line_count > records.len() + records.len() / 2 {
            let mut lines = records
                .values()
                .map(serde_json::to_vec)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| AgentError::Store {
                    path: log.path().to_path_buf(),
                    reason: e.to_string(),
                })?;
            lines.sort();
            let log = log.rewrite(dir, &lines)?;
            tracing::info!(
                from = line_count,
                to = lines.len(),
                "compacted the idempotency log"
            );
            log
        } else {
            log
        };
        let slots = records
            .into_values()
            .map(|record| {
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
                (record.key, slot)
            })
            .collect();
        Ok(Store {
            log: Mutex::new(log),
            slots: Mutex::new(slots),
            _lock: lock,
        })
    }

    fn write(&self, record: &Record) -> Result<(), AgentError> {
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        let bytes = serde_json::to_vec(record).map_err(|e| AgentError::Store {
            path: log.path().to_path_buf(),
            reason: e.to_string(),
        })?;
        log.append(&bytes)
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

    fn log_text(dir: &Path) -> String {
        std::fs::read_to_string(dir.join(crate::store_log::FILE)).unwrap()
    }

    #[test]
    fn a_torn_finished_record_leaves_the_key_uncertain() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let Begin::Fresh(t) = store.begin("k1", "h").unwrap() else {
            panic!("fresh")
        };
        store.finish(t, result("k1")).unwrap();
        drop(store);
        // The agent died while writing the `finished` line: only part of it reached the disk.
        let text = log_text(dir.path());
        let cut = text.trim_end().rfind('\n').unwrap() + 1 + 20;
        std::fs::write(dir.path().join(crate::store_log::FILE), &text[..cut]).unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.query("k1"), IdempotencyStatus::Uncertain);
        assert!(matches!(store.begin("k1", "h").unwrap(), Begin::Uncertain));
        assert!(log_text(dir.path()).ends_with('\n'), "torn tail cut off");
    }

    #[test]
    fn a_corrupt_log_line_is_a_named_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let Begin::Fresh(t) = store.begin("k1", "h").unwrap() else {
            panic!("fresh")
        };
        store.finish(t, result("k1")).unwrap();
        drop(store);
        let text = log_text(dir.path()).replacen("k1", "k1\"", 1);
        std::fs::write(dir.path().join(crate::store_log::FILE), text).unwrap();
        let e = Store::open(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("idempotency.log") && e.contains("line 1") && e.contains("unreadable"),
            "{e}"
        );
    }

    #[test]
    fn legacy_per_key_files_are_read_and_the_log_overrides_them() {
        let dir = tempfile::tempdir().unwrap();
        let started = Record {
            key: "old".into(),
            request_hash: "h".into(),
            state: RecordState::Started { at_ms: 1 },
        };
        let finished = Record {
            key: "done".into(),
            request_hash: "h".into(),
            state: RecordState::Finished {
                result: result("done"),
            },
        };
        for (name, r) in [("a.json", &started), ("b.json", &finished)] {
            std::fs::write(dir.path().join(name), serde_json::to_vec(r).unwrap()).unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.query("old"), IdempotencyStatus::Uncertain);
        assert!(matches!(
            store.query("done"),
            IdempotencyStatus::Finished(_)
        ));
        assert!(matches!(
            store.begin("done", "other").unwrap(),
            Begin::Conflict
        ));
    }

    #[test]
    fn a_long_log_is_compacted_at_start_without_changing_any_answer() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let keys = COMPACT_AFTER / 2 + 1;
        for i in 0..keys {
            let k = format!("k{i}");
            let Begin::Fresh(t) = store.begin(&k, "h").unwrap() else {
                panic!("fresh")
            };
            store.finish(t, result(&k)).unwrap();
        }
        let Begin::Fresh(_left) = store.begin("running", "h").unwrap() else {
            panic!("fresh")
        };
        drop(store);
        assert_eq!(log_text(dir.path()).lines().count(), 2 * keys + 1);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(
            log_text(dir.path()).lines().count(),
            keys + 1,
            "one line per key"
        );
        for i in 0..keys {
            assert!(matches!(
                store.query(&format!("k{i}")),
                IdempotencyStatus::Finished(_)
            ));
        }
        assert_eq!(store.query("running"), IdempotencyStatus::Uncertain);
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.query("running"), IdempotencyStatus::Uncertain);
        assert!(matches!(store.query("k0"), IdempotencyStatus::Finished(_)));
    }

    #[test]
    fn a_second_store_on_the_same_directory_is_refused_while_the_first_is_open() {
        let dir = tempfile::tempdir().unwrap();
        let first = Store::open(dir.path()).unwrap();
        let e = Store::open(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("another tollgate-agent") && e.contains(LOCK_FILE),
            "{e}"
        );
        drop(first);
        Store::open(dir.path()).unwrap();
    }

    #[test]
    fn the_format_marker_is_not_a_record_so_older_agents_refuse_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path()).unwrap());
        let text = std::fs::read(dir.path().join(FORMAT_MARKER)).unwrap();
        assert!(serde_json::from_slice::<Record>(&text).is_err());
        // ... and this agent reads past it.
        Store::open(dir.path()).unwrap();
    }

    #[test]
    fn corrupt_record_is_a_named_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x.json"), b"{not json").unwrap();
        let e = Store::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("x.json") && e.contains("unreadable"), "{e}");
    }
}
