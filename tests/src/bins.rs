//! Where the workspace's binaries are. `cargo test --workspace` builds every binary before it
//! runs any test; a test binary lives in `target/<profile>/deps/`, the binaries one level up.

use std::path::PathBuf;

/// Path of a workspace binary, or an error that says how to build it.
pub fn path(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).ok_or_else(|| {
        anyhow::anyhow!("cannot locate the target directory from {}", exe.display())
    })?;
    let file = if cfg!(windows) {
        format!("{name}.exe")
    } else {
        name.to_string()
    };
    let p = profile_dir.join(file);
    anyhow::ensure!(
        p.is_file(),
        "{} not found: run the tests with `cargo test --workspace` (or `cargo build --bins` first)",
        p.display()
    );
    Ok(p)
}
