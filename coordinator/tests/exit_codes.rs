//! The README's "Exit codes" table and the CLI's exit statuses (`tollgate_coordinator::exit`)
//! are the same list: no code documented that the CLI never returns, none returned that is not
//! documented, and every outcome's row names that outcome.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;

use tollgate_coordinator::exit;

/// The rows of the README's exit-code table: code -> meaning.
fn readme_table() -> BTreeMap<u8, String> {
    let readme = include_str!("../../README.md");
    let section = readme
        .split("### Exit codes")
        .nth(1)
        .unwrap_or_else(|| panic!("README has no \"### Exit codes\" section"));
    let mut rows = BTreeMap::new();
    for line in section.lines().skip_while(|l| !l.starts_with('|')) {
        if !line.starts_with('|') {
            break;
        }
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        if let [code, meaning] = cells.as_slice()
            && let Ok(code) = code.parse::<u8>()
        {
            let previous = rows.insert(code, meaning.to_string());
            assert!(previous.is_none(), "exit {code} is listed twice");
        }
    }
    rows
}

#[test]
fn the_readme_lists_exactly_the_exit_statuses_the_cli_returns() {
    let table = readme_table();
    let documented: Vec<u8> = table.keys().copied().collect();
    assert_eq!(
        documented,
        exit::all(),
        "README \"Exit codes\" and tollgate_coordinator::exit disagree"
    );
    for kind in exit::OUTCOMES {
        let code = exit::for_outcome(kind);
        let row = &table[&code];
        assert!(
            row.contains(&format!("`{}`", kind.as_str())),
            "exit {code} is {kind:?}, but the README says: {row}"
        );
    }
}
