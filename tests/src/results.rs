//! Results, for the table in tests/README.md.

use std::path::PathBuf;

/// One row of the scenario table. Written to `$TOLLGATE_FAULT_REPORT_DIR/NAME.row` when that is
/// set (`tests/scenarios.sh` sets it and splices the rows into `tests/README.md`).
#[derive(Debug, Clone)]
pub struct Row {
    pub scenario: String,
    pub repetitions: usize,
    pub faults: String,
    pub result: String,
    pub seed: u64,
}

impl Row {
    pub fn write(&self) -> anyhow::Result<()> {
        let Some(dir) = std::env::var_os("TOLLGATE_FAULT_REPORT_DIR") else {
            return Ok(());
        };
        let dir = PathBuf::from(dir);
        std::fs::create_dir_all(&dir)?;
        let cell = |s: &str| s.replace('|', "\\|").replace('\n', " ");
        std::fs::write(
            dir.join(format!("{}.row", self.scenario)),
            format!(
                "| `{}` | {} | {} | {} | {} |\n",
                self.scenario,
                self.repetitions,
                cell(&self.faults),
                cell(&self.result),
                self.seed
            ),
        )?;
        Ok(())
    }
}
