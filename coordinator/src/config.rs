//! The config files, read from disk. Parsing and validation are the pure core's
//! ([`tollgate_core::config`], re-exported here whole); this module only reads the files.

use std::path::{Path, PathBuf};

pub use tollgate_core::config::*;

/// Reads a whole file; returns its text and the label errors use (the path as given).
fn read_file(path: &Path) -> Result<(String, String), ConfigError> {
    let label = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => Ok((text, label)),
        Err(e) => Err(ConfigError::Read {
            file: label,
            reason: e.to_string(),
        }),
    }
}

/// The directory relative paths in the file at `path` start from.
fn dir_of(path: &Path) -> &Path {
    path.parent().unwrap_or_else(|| Path::new("."))
}

/// The home directory `~` expands to in the files (`HOME`; `USERPROFILE` on Windows), if known.
fn home() -> Option<PathBuf> {
    std::env::home_dir().filter(|h| !h.as_os_str().is_empty())
}

/// Reads and parses `coordinator.toml`, then resolves its paths against the file's directory
/// and the home directory.
pub fn load_coordinator(path: &Path) -> Result<CoordinatorConfig, ConfigError> {
    let (text, label) = read_file(path)?;
    parse_coordinator(&text, &label)?.resolve_relative_to(dir_of(path), home().as_deref())
}

/// Reads and parses an inventory file, then resolves its coordinator-side paths (`key_file`,
/// `known_hosts`) against the file's directory and the home directory.
pub fn load_inventory(path: &Path) -> Result<Inventory, ConfigError> {
    let (text, label) = read_file(path)?;
    parse_inventory(&text, &label)?.resolve_paths(dir_of(path), home().as_deref())
}

/// Reads the inventory `config` names and lays its fleet-wide SSH defaults (`[psremoting]`)
/// under every SSH host's own settings: the inventory runs plan from, so that the operation
/// hash binds the settings each host is really reached with.
pub fn load_inventory_of(config: &CoordinatorConfig) -> Result<Inventory, ConfigError> {
    Ok(load_inventory(&config.inventory)?.with_ssh_defaults(&config.psremoting.ssh))
}

/// Reads, parses and validates an operations file, then reads every `run_file` relative to the
/// operations file's directory.
pub fn load_operations(path: &Path) -> Result<Operations, ConfigError> {
    let (text, label) = read_file(path)?;
    let mut ops = parse_operations(&text, &label)?;
    let base = dir_of(path);
    ops.resolve_run_files(|rel| {
        std::fs::read_to_string(base.join(rel)).map_err(|e| e.to_string())
    })?;
    Ok(ops)
}
