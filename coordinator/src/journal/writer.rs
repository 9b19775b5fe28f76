//! The journal file: append + fsync, one writer.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use ring::signature::Ed25519KeyPair;
use uuid::Uuid;

use super::chain::{self, Line};
use crate::core::timeline::TimelineEvent;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: cannot encode event: {reason}")]
    Encode { path: PathBuf, reason: String },
    #[error("{path}: line {line}: {problem}")]
    Corrupt {
        path: PathBuf,
        line: u64,
        problem: String,
    },
}

/// An open timeline, positioned after its last line.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
    run_id: Uuid,
    seq: u64,
    prev: String,
}

impl Journal {
    pub const FILE: &'static str = "timeline.jsonl";

    /// Creates `dir/timeline.jsonl` for a new run. Refuses if one exists.
    pub fn create(dir: &Path, run_id: Uuid) -> Result<Journal, JournalError> {
        std::fs::create_dir_all(dir).map_err(|source| JournalError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = dir.join(Self::FILE);
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(|source| JournalError::Io {
                path: path.clone(),
                source,
            })?;
        sync_dir(dir);
        Ok(Journal {
            path,
            file,
            run_id,
            seq: 0,
            prev: chain::genesis(run_id),
        })
    }

    /// Opens an existing timeline after a crash. A torn last line (no newline: the write never
    /// completed, so its action never took effect) is cut off; any other problem is an error.
    /// Returns the journal and the lines read.
    pub fn recover(dir: &Path, run_id: Uuid) -> Result<(Journal, Vec<Line>), JournalError> {
        let path = dir.join(Self::FILE);
        let io = |source| JournalError::Io {
            path: path.clone(),
            source,
        };
        let mut bytes = std::fs::read(&path).map_err(io)?;
        if let Some(last_nl) = bytes.iter().rposition(|b| *b == b'\n') {
            if last_nl + 1 != bytes.len() {
                bytes.truncate(last_nl + 1);
            }
        } else {
            bytes.clear();
        }
        let report = chain::verify(run_id, &bytes, None);
        if !report.ok {
            return Err(JournalError::Corrupt {
                path,
                line: report.first_bad_line.unwrap_or(0),
                problem: report.problem.unwrap_or_default(),
            });
        }
        let file = OpenOptions::new().write(true).open(&path).map_err(io)?;
        file.set_len(bytes.len() as u64).map_err(io)?;
        file.sync_all().map_err(io)?;
        drop(file);
        let file = OpenOptions::new().append(true).open(&path).map_err(io)?;
        let lines: Vec<Line> = bytes
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .filter_map(|l| chain::parse_line(l).ok())
            .collect();
        Ok((
            Journal {
                path,
                file,
                run_id,
                seq: report.events,
                prev: report.last_hash,
            },
            lines,
        ))
    }

    pub fn run_id(&self) -> Uuid {
        self.run_id
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Events written so far, and the hash of the last one.
    pub fn head(&self) -> (u64, &str) {
        (self.seq, &self.prev)
    }

    /// Appends events, then a checkpoint signed with `key` over everything before it, and
    /// fsyncs once for all of them; returns when they are durable. The checkpoint is not among
    /// the returned lines (it decides nothing). An empty batch writes nothing.
    pub fn append(
        &mut self,
        events: &[TimelineEvent],
        key: &Ed25519KeyPair,
    ) -> Result<Vec<Line>, JournalError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let mut buf = Vec::new();
        let mut lines = Vec::with_capacity(events.len());
        let (mut seq, mut prev) = (self.seq, self.prev.clone());
        for ev in events {
            seq += 1;
            let line = chain::seal(seq, &prev, ev).map_err(|e| JournalError::Encode {
                path: self.path.clone(),
                reason: e.to_string(),
            })?;
            buf.extend(chain::encode(&line).map_err(|e| JournalError::Encode {
                path: self.path.clone(),
                reason: e.to_string(),
            })?);
            prev = line.hash.clone();
            lines.push(line);
        }
        seq += 1;
        let at_ms = events.last().map(|e| e.at_ms).unwrap_or(0);
        let checkpoint = chain::seal_checkpoint(seq, &prev, at_ms, self.run_id, key)
            .and_then(|l| chain::encode(&l).map(|b| (l.hash.clone(), b)))
            .map_err(|e| JournalError::Encode {
                path: self.path.clone(),
                reason: e.to_string(),
            })?;
        buf.extend(checkpoint.1);
        prev = checkpoint.0;
        let io = |source| JournalError::Io {
            path: self.path.clone(),
            source,
        };
        self.file.write_all(&buf).map_err(io)?;
        self.file.sync_data().map_err(io)?;
        self.seq = seq;
        self.prev = prev;
        Ok(lines)
    }
}

#[cfg(unix)]
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(not(unix))]
fn sync_dir(_dir: &Path) {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::timeline::EventKind;

    fn key() -> Ed25519KeyPair {
        Ed25519KeyPair::from_seed_unchecked(&[7; 32]).unwrap()
    }

    #[test]
    fn append_recover_and_cut_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let run = Uuid::from_u128(5);
        let key = key();
        let public = ring::signature::KeyPair::public_key(&key).as_ref().to_vec();
        let mut j = Journal::create(dir.path(), run).unwrap();
        let written = j
            .append(
                &[
                    TimelineEvent::new(1, EventKind::RunStarted),
                    TimelineEvent::new(2, EventKind::ProbeRequested),
                ],
                &key,
            )
            .unwrap();
        assert_eq!(written.len(), 2, "the checkpoint is not returned");
        let (n, last) = (j.head().0, j.head().1.to_string());
        assert_eq!(n, 3, "two events and their checkpoint");
        drop(j);
        // A crash mid-write leaves half a line.
        let path = dir.path().join(Journal::FILE);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"seq\":4,\"at_ms\"").unwrap();
        drop(f);
        let (mut j, lines) = Journal::recover(dir.path(), run).unwrap();
        assert_eq!(lines.len(), 3);
        assert_eq!(j.head(), (n, last.as_str()));
        j.append(&[TimelineEvent::new(3, EventKind::RunFinished)], &key)
            .unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let r = chain::verify_signed(run, &bytes, None, &public);
        assert!(r.ok, "{r:?}");
        assert_eq!((r.events, r.signed), (5, 5));
        // Another key's view: the checkpoints do not verify.
        let other = ring::signature::KeyPair::public_key(
            &Ed25519KeyPair::from_seed_unchecked(&[8; 32]).unwrap(),
        )
        .as_ref()
        .to_vec();
        let r = chain::verify_signed(run, &bytes, None, &other);
        assert_eq!(
            (r.ok, r.first_bad_line, r.signed),
            (false, Some(3), 0),
            "{r:?}"
        );
        assert!(
            Journal::create(dir.path(), run).is_err(),
            "never two journals for one run"
        );
    }

    #[test]
    fn a_recomputed_chain_or_an_unsigned_tail_never_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let run = Uuid::from_u128(6);
        let key = key();
        let public = ring::signature::KeyPair::public_key(&key).as_ref().to_vec();
        let mut j = Journal::create(dir.path(), run).unwrap();
        for at in 1..=3 {
            j.append(
                &[
                    TimelineEvent::new(at, EventKind::StepDispatched).host("web1"),
                    TimelineEvent::new(at, EventKind::StepReported).host("web1"),
                ],
                &key,
            )
            .unwrap();
        }
        drop(j);
        let bytes = std::fs::read(dir.path().join(Journal::FILE)).unwrap();
        let mut lines: Vec<Line> = bytes
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| chain::parse_line(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 9);
        // The attacker edits line 5 (a decision of the second batch) and recomputes every
        // hash after it: the chain is consistent, the checkpoint at line 6 is not.
        lines[4].host = Some("db1".into());
        let rechain = |lines: &mut Vec<Line>| {
            let mut prev = chain::genesis(run);
            let mut out = Vec::new();
            for l in lines.iter_mut() {
                l.prev = prev.clone();
                l.hash.clear();
                let body = serde_json::to_vec(&*l).unwrap();
                l.hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&body));
                prev = l.hash.clone();
                out.extend(chain::encode(l).unwrap());
            }
            out
        };
        let forged = rechain(&mut lines);
        assert!(
            chain::verify(run, &forged, None).ok,
            "the chain alone is fooled"
        );
        let r = chain::verify_signed(run, &forged, None, &public);
        assert_eq!(
            (r.ok, r.first_bad_line, r.signed),
            (false, Some(6), 3),
            "{r:?}"
        );
        assert!(r.problem.unwrap().contains("lines 4-5"));
        // A line appended after the last checkpoint, chained correctly: named, not adopted.
        let mut good: Vec<Line> = bytes
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| chain::parse_line(l).unwrap())
            .collect();
        let extra = chain::seal(
            10,
            &good[8].hash,
            &TimelineEvent::new(9, EventKind::RunFinished),
        )
        .unwrap();
        good.push(extra);
        let appended: Vec<u8> = good
            .iter()
            .flat_map(|l| chain::encode(l).unwrap())
            .collect();
        let r = chain::verify_signed(run, &appended, None, &public);
        assert_eq!(
            (r.ok, r.first_bad_line, r.signed),
            (false, Some(10), 9),
            "{r:?}"
        );
    }
}
