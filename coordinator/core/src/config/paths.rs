//! Paths written in the files: relative to the file's own directory, `~` expanded by Tollgate
//! (no shell ever sees them). Pure: the caller passes the directory and the home directory in.

use std::path::{Path, PathBuf};

use super::ConfigError;

/// Resolves `path` as written in a file that lives in `dir`:
///
/// * `~`, `~/rest` or `~\rest`: `home` joined with `rest` (refused if `home` is `None`);
/// * `~user/...`: refused (the coordinator does not look users up);
/// * an absolute path: unchanged;
/// * any other relative path: `dir` joined with it.
///
/// The error is the reason only; [`resolve_at`] names the file and key.
pub(crate) fn resolve_path(
    path: &Path,
    dir: &Path,
    home: Option<&Path>,
) -> Result<PathBuf, String> {
    match path.to_str().and_then(|text| text.strip_prefix('~')) {
        Some(rest) => expand_home(rest, home).map_err(|why| format!("{:?}: {why}", path)),
        None if path.is_absolute() => Ok(path.to_path_buf()),
        None => Ok(dir.join(path)),
    }
}

/// [`resolve_path`] in place, its refusal naming `file` and `key`.
pub(crate) fn resolve_at(
    file: &str,
    key: &str,
    path: &mut PathBuf,
    dir: &Path,
    home: Option<&Path>,
) -> Result<(), ConfigError> {
    *path = resolve_path(path, dir, home).map_err(|why| ConfigError::invalid(file, key, why))?;
    Ok(())
}

/// `rest` is what follows the `~`.
fn expand_home(rest: &str, home: Option<&Path>) -> Result<PathBuf, String> {
    let below = if rest.is_empty() {
        ""
    } else {
        rest.strip_prefix(['/', '\\'])
            .ok_or("~user is not expanded; write the full path")?
    };
    let home = home.ok_or("no home directory is known to expand `~`; write the full path")?;
    // `~//x` is `~/x`: a leading separator left on `below` would make the join absolute.
    let below = below.trim_start_matches(['/', '\\']);
    Ok(if below.is_empty() {
        home.to_path_buf()
    } else {
        home.join(below)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(path: &str, home: Option<&str>) -> Result<PathBuf, String> {
        resolve_path(
            Path::new(path),
            Path::new("/etc/tollgate"),
            home.map(Path::new),
        )
    }

    #[test]
    fn relative_paths_are_relative_to_the_file() {
        assert_eq!(resolve("keys/id", None), Ok("/etc/tollgate/keys/id".into()));
        assert_eq!(resolve("../x", None), Ok("/etc/tollgate/../x".into()));
        assert_eq!(
            resolve_path(Path::new("k"), Path::new(""), None),
            Ok("k".into()),
            "a file given as a bare name lives in the working directory"
        );
    }

    #[test]
    fn absolute_paths_are_kept() {
        assert_eq!(resolve("/srv/id", Some("/home/op")), Ok("/srv/id".into()));
    }

    #[test]
    fn a_tilde_is_the_home_directory() {
        let home = Some("/home/op");
        assert_eq!(resolve("~", home), Ok("/home/op".into()));
        assert_eq!(resolve("~/", home), Ok("/home/op".into()));
        assert_eq!(resolve("~/.ssh/id", home), Ok("/home/op/.ssh/id".into()));
        assert_eq!(resolve("~//.ssh/id", home), Ok("/home/op/.ssh/id".into()));
        assert_eq!(resolve("~\\keys", home), Ok("/home/op/keys".into()));
        assert_eq!(
            resolve("a/~/b", home),
            Ok("/etc/tollgate/a/~/b".into()),
            "only a leading ~ is expanded"
        );
    }

    #[test]
    fn tilde_user_is_refused() {
        assert_eq!(
            resolve("~deploy/.ssh/id", Some("/home/op")),
            Err("\"~deploy/.ssh/id\": ~user is not expanded; write the full path".into())
        );
    }

    #[test]
    fn a_tilde_without_a_home_is_refused() {
        assert_eq!(
            resolve("~/.ssh/id", None),
            Err(
                "\"~/.ssh/id\": no home directory is known to expand `~`; write the full path"
                    .into()
            )
        );
    }

    #[test]
    fn resolve_at_names_file_and_key() {
        let mut p = PathBuf::from("~x");
        let err = resolve_at("f.toml", "a.b", &mut p, Path::new("/d"), None).unwrap_err();
        assert_eq!((err.file(), err.key()), ("f.toml", "a.b"));
        assert_eq!(p, PathBuf::from("~x"), "left as written when refused");
    }
}
