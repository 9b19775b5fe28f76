//! Careful file writes: whole or nothing, private keys 0600 from the first byte, and no
//! silent overwrite.

use std::fs;
use std::io::Write;
use std::path::Path;

use crate::CertError;

/// Whether a write may replace an existing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overwrite {
    Refuse,
    Replace,
}

/// Who may read the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Visibility {
    /// Mode 0644 on Unix.
    Public,
    /// Mode 0600 on Unix (private keys).
    Private,
}

/// Writes `contents` to `path` atomically: a temporary file in the same directory, created with
/// the final permissions, fsynced, then renamed over the target.
pub fn write_atomic(
    path: &Path,
    contents: &[u8],
    vis: Visibility,
    overwrite: Overwrite,
) -> Result<(), CertError> {
    if overwrite == Overwrite::Refuse && path.exists() {
        return Err(CertError::AlreadyExists {
            path: path.to_path_buf(),
        });
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = open_new(&tmp, vis).map_err(|e| CertError::io(&tmp, e))?;
        f.write_all(contents).map_err(|e| CertError::io(&tmp, e))?;
        f.sync_all().map_err(|e| CertError::io(&tmp, e))?;
        if overwrite == Overwrite::Refuse && path.exists() {
            return Err(CertError::AlreadyExists {
                path: path.to_path_buf(),
            });
        }
        fs::rename(&tmp, path).map_err(|e| CertError::io(path, e))?;
        sync_dir(dir);
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(unix)]
fn open_new(path: &Path, vis: Visibility) -> std::io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let mode = match vis {
        Visibility::Public => 0o644,
        Visibility::Private => 0o600,
    };
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
}

#[cfg(not(unix))]
fn open_new(path: &Path, _vis: Visibility) -> std::io::Result<fs::File> {
    // On Windows the file inherits the directory's ACL; keep the PKI directory private.
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
}

#[cfg(unix)]
fn sync_dir(dir: &Path) {
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(not(unix))]
fn sync_dir(_dir: &Path) {}

/// Reads a whole file, naming it in the error.
pub fn read(path: &Path) -> Result<Vec<u8>, CertError> {
    fs::read(path).map_err(|e| CertError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_to_overwrite_and_leaves_original() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.pem");
        write_atomic(&p, b"one", Visibility::Public, Overwrite::Refuse).unwrap();
        let err = write_atomic(&p, b"two", Visibility::Public, Overwrite::Refuse).unwrap_err();
        assert!(matches!(err, CertError::AlreadyExists { .. }));
        assert_eq!(fs::read(&p).unwrap(), b"one");
        write_atomic(&p, b"three", Visibility::Public, Overwrite::Replace).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"three");
        // No temporary files left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[cfg(unix)]
    #[test]
    fn private_files_are_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.key");
        write_atomic(&p, b"secret", Visibility::Private, Overwrite::Refuse).unwrap();
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
