//! `runs/index.jsonl`: an append-only, signed, hash-chained list of every run id this state
//! directory ever created (SPEC §7). A run directory that is deleted or renamed is then
//! reported as missing, not as an unknown run, and a directory that no index line names (planted,
//! or renamed from another id) is not adopted.
//!
//! Each line is `{"seq","run_id","at_ms","prev","signature"}`: `prev` is the SHA-256 of the
//! previous line's bytes (the first line's is a fixed genesis value), and `signature` is the
//! coordinator's Ed25519 signature over `seq`, `run_id`, `at_ms` and `prev`. Lines are fsynced
//! before the run's first timeline line is written.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use ring::signature::{ED25519, Ed25519KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::JournalError;

/// The index's file name, under `runs/`.
pub const FILE: &str = "index.jsonl";

/// One index line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexLine {
    pub seq: u64,
    pub run_id: Uuid,
    pub at_ms: u64,
    pub prev: String,
    pub signature: String,
}

fn genesis() -> String {
    hex::encode(Sha256::digest(b"tollgate-run-index-v1"))
}

fn message(seq: u64, run_id: Uuid, at_ms: u64, prev: &str) -> Vec<u8> {
    format!("tollgate-run-index-v1\n{seq}\n{run_id}\n{at_ms}\n{prev}").into_bytes()
}

/// Checks index bytes with the public key: the run ids in order, or the 1-based line and the
/// problem. A torn last line (no newline) is ignored: it was never fsynced.
pub fn verify(bytes: &[u8], public_key: &[u8]) -> Result<(Vec<Uuid>, String), (u64, String)> {
    let end = bytes
        .iter()
        .rposition(|b| *b == b'\n')
        .map(|i| i + 1)
        .unwrap_or(0);
    let mut prev = genesis();
    let mut ids = Vec::new();
    for (i, raw) in bytes[..end]
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .enumerate()
    {
        let n = i as u64 + 1;
        let line: IndexLine =
            serde_json::from_slice(raw).map_err(|e| (n, format!("not an index line: {e}")))?;
        if serde_json::to_vec(&line).ok().as_deref() != Some(raw) {
            return Err((n, "not in canonical form (the bytes were edited)".into()));
        }
        if line.seq != n {
            return Err((
                n,
                format!(
                    "sequence {} where {n} was expected (lines deleted or reordered)",
                    line.seq
                ),
            ));
        }
        if line.prev != prev {
            return Err((
                n,
                "prev does not match the previous line (lines deleted, inserted or edited)".into(),
            ));
        }
        let signed = hex::decode(&line.signature).ok().is_some_and(|sig| {
            UnparsedPublicKey::new(&ED25519, public_key)
                .verify(
                    &message(line.seq, line.run_id, line.at_ms, &line.prev),
                    &sig,
                )
                .is_ok()
        });
        if !signed {
            return Err((
                n,
                "the signature does not verify with the coordinator's key".into(),
            ));
        }
        prev = hex::encode(Sha256::digest(raw));
        ids.push(line.run_id);
    }
    Ok((ids, prev))
}

/// The open index: its ids and the position to append at.
#[derive(Debug)]
pub struct RunIndex {
    path: PathBuf,
    file: File,
    seq: u64,
    prev: String,
    ids: BTreeSet<Uuid>,
}

impl RunIndex {
    /// Opens (or creates) `runs_dir/index.jsonl` and verifies every line with `public_key`. A
    /// line that does not verify is an error naming it: the coordinator does not start on an
    /// index it cannot trust.
    pub fn open(runs_dir: &Path, public_key: &[u8]) -> Result<RunIndex, JournalError> {
        let path = runs_dir.join(FILE);
        let io = |source| JournalError::Io {
            path: path.clone(),
            source,
        };
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io(e)),
        };
        let (ids, prev) =
            verify(&bytes, public_key).map_err(|(line, problem)| JournalError::Corrupt {
                path: path.clone(),
                line,
                problem,
            })?;
        let keep = bytes
            .iter()
            .rposition(|b| *b == b'\n')
            .map(|i| i + 1)
            .unwrap_or(0);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io)?;
        if keep != bytes.len() {
            file.set_len(keep as u64).map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        drop(file);
        let file = OpenOptions::new().append(true).open(&path).map_err(io)?;
        Ok(RunIndex {
            path,
            file,
            seq: ids.len() as u64,
            prev,
            ids: ids.into_iter().collect(),
        })
    }

    /// Whether the index names `run_id`.
    pub fn contains(&self, run_id: Uuid) -> bool {
        self.ids.contains(&run_id)
    }

    /// Every run id the index names.
    pub fn ids(&self) -> &BTreeSet<Uuid> {
        &self.ids
    }

    /// Appends `run_id`, signed with `key`, and fsyncs.
    pub fn append(
        &mut self,
        run_id: Uuid,
        at_ms: u64,
        key: &Ed25519KeyPair,
    ) -> Result<(), JournalError> {
        let seq = self.seq + 1;
        let signature = hex::encode(key.sign(&message(seq, run_id, at_ms, &self.prev)).as_ref());
        let line = IndexLine {
            seq,
            run_id,
            at_ms,
            prev: self.prev.clone(),
            signature,
        };
        let bytes = serde_json::to_vec(&line).map_err(|e| JournalError::Encode {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        let io = |source| JournalError::Io {
            path: self.path.clone(),
            source,
        };
        let mut buf = bytes.clone();
        buf.push(b'\n');
        self.file.write_all(&buf).map_err(io)?;
        self.file.sync_data().map_err(io)?;
        self.seq = seq;
        self.prev = hex::encode(Sha256::digest(&bytes));
        self.ids.insert(run_id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use ring::signature::KeyPair;

    use super::*;

    #[test]
    fn appended_ids_verify_and_every_edit_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let key = Ed25519KeyPair::from_seed_unchecked(&[9; 32]).unwrap();
        let public = key.public_key().as_ref().to_vec();
        let mut ix = RunIndex::open(dir.path(), &public).unwrap();
        for n in 1..=3 {
            ix.append(Uuid::from_u128(n), 100 + n as u64, &key).unwrap();
        }
        drop(ix);
        let ix = RunIndex::open(dir.path(), &public).unwrap();
        assert_eq!(ix.ids().len(), 3);
        assert!(ix.contains(Uuid::from_u128(2)));
        let bytes = std::fs::read(dir.path().join(FILE)).unwrap();
        let lines: Vec<&[u8]> = bytes
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .collect();
        let join = |ls: &[&[u8]]| -> Vec<u8> {
            ls.iter()
                .flat_map(|l| l.iter().copied().chain([b'\n']))
                .collect()
        };
        // A deleted line (the run's trace removed): named at the line after the gap.
        assert_eq!(
            verify(&join(&[lines[0], lines[2]]), &public).unwrap_err().0,
            2
        );
        // A line re-signed by another key.
        let other = Ed25519KeyPair::from_seed_unchecked(&[1; 32]).unwrap();
        let d2 = tempfile::tempdir().unwrap();
        let mut forged = RunIndex::open(d2.path(), other.public_key().as_ref()).unwrap();
        forged.append(Uuid::from_u128(1), 101, &other).unwrap();
        let forged_bytes = std::fs::read(d2.path().join(FILE)).unwrap();
        assert_eq!(verify(&forged_bytes, &public).unwrap_err().0, 1);
        // Every single-byte edit is caught.
        for pos in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[pos] ^= 0x01;
            if bad[pos] == b'\n' || bytes[pos] == b'\n' {
                continue;
            }
            assert!(verify(&bad, &public).is_err(), "edit at byte {pos}");
        }
    }
}
