//! Consumed token nonces: an append-only, fsynced file, so a token used once is refused
//! forever, across restarts.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug)]
pub struct NonceStore {
    path: PathBuf,
    file: File,
    consumed: BTreeSet<String>,
}

impl NonceStore {
    pub const FILE: &'static str = "consumed-tokens.log";

    pub fn open(state_dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(state_dir)?;
        let path = state_dir.join(Self::FILE);
        let consumed = match std::fs::read_to_string(&path) {
            Ok(text) => text
                .lines()
                .map(str::trim)
                .filter(|l| l.len() == 32 && l.bytes().all(|b| b.is_ascii_hexdigit()))
                .map(str::to_string)
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeSet::new(),
            Err(e) => return Err(e),
        };
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        Ok(NonceStore {
            path,
            file,
            consumed,
        })
    }

    pub fn consumed(&self) -> &BTreeSet<String> {
        &self.consumed
    }

    /// Records `nonce` durably. Returns once it is on disk.
    pub fn consume(&mut self, nonce: &str) -> std::io::Result<()> {
        if self.consumed.contains(nonce) {
            return Ok(());
        }
        self.file.write_all(format!("{nonce}\n").as_bytes())?;
        self.file.sync_data()?;
        self.consumed.insert(nonce.to_string());
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumed_nonces_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = NonceStore::open(dir.path()).unwrap();
        s.consume("00112233445566778899aabbccddeeff").unwrap();
        drop(s);
        let s = NonceStore::open(dir.path()).unwrap();
        assert!(s.consumed().contains("00112233445566778899aabbccddeeff"));
    }
}
