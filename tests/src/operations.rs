//! The operations (`operations.toml`) the labs run, from one generator: the steps of [`STEPS`] on
//! roles `web` and `db`, each appending a line to `markers/STEP` in its host's home when it
//! finishes, so a test can count what ran where, and `web` and `db` probes that print the host's
//! `facts.json`. [`story`] is the story lab's ([`crate::lab::Lab::start`]); [`gated`] is the
//! fault lab's.

/// The steps of the operations, in order: `prepare` and `install` deploy, `drain` and `remove`
/// tear down.
pub const STEPS: &[&str] = &["prepare", "install", "drain", "remove"];
/// The destructive step.
pub const DESTRUCTIVE: &str = "remove";

/// The story lab's operations. `H` is the host's home; a file `slow-STEP` there makes `prepare`,
/// `drain` or `remove` write `started-STEP` and wait 60 s, so a test can act while it runs.
pub fn story() -> String {
    generate(false, |name| {
        (!matches!(name, "install" | "probe")).then(|| {
            format!(
                r#"if [ -f \"$H/slow-{name}\" ]; then echo started > \"$H/started-{name}\"; sleep 60; fi"#
            )
        })
    })
}

/// The fault lab's operations. Like [`story`], each step appends to `markers/STEP` when it
/// finishes, and also to `markers/STEP.begun` when it starts, so an execution that was cut short
/// still counts. A file `gate-STEP` in the host's home holds the step after it began (it writes
/// `started-STEP` and waits, at most 80 s, until the gate is removed), so a test can inject a
/// fault at a known point. `gate-probe` does the same for the probe (the barrier re-probe, when
/// armed after approval).
pub fn gated() -> String {
    generate(true, |name| {
        Some(format!(
            r#"if [ -f \"$H/gate-{name}\" ]; then echo started > \"$H/started-{name}\"; i=0; while [ -f \"$H/gate-{name}\" ] && [ $i -lt 1600 ]; do sleep 0.05; i=$((i+1)); done; fi"#
        ))
    })
}

/// The one generator. With `begun`, every step also appends to `markers/STEP.begun` when it
/// starts. `hold(STEP)` (or `hold("probe")`), if any, is shell the step (or probe) runs after it
/// started and before its work, with `H` set to the host's home: a switch a test flips to hold it.
fn generate(begun: bool, hold: impl Fn(&str) -> Option<String>) -> String {
    let h = r#"H=\"$TOLLGATE_AGENT_STATE/..\"; mkdir -p \"$H/markers\""#;
    let step = |id: &str| {
        let begun = if begun {
            format!(r#"echo x >> \"$H/markers/{id}.begun\"; "#)
        } else {
            String::new()
        };
        let hold = hold(id).map(|s| format!("{s}; ")).unwrap_or_default();
        format!(
            r#"[[{action}.phases]]
name = "{id}"
[[{action}.phases.steps]]
id = "{id}"
roles = ["web", "db"]
shell = "sh"
run = "{h}; {begun}{hold}echo x >> \"$H/markers/{id}\""
destructive = {destructive}
timeout = "90s"
"#,
            action = if matches!(id, "prepare" | "install") {
                "deploy"
            } else {
                "teardown"
            },
            destructive = id == DESTRUCTIVE,
        )
    };
    let probe = match hold("probe") {
        Some(hold) => format!(
            r#"shell = "sh"
run = "H=\"$TOLLGATE_AGENT_STATE/..\"; {hold}; cat \"$H/facts.json\"""#
        ),
        None => r#"shell = "sh"
run = "cat \"$TOLLGATE_AGENT_STATE/../facts.json\"""#
            .to_string(),
    };
    let steps: Vec<String> = STEPS.iter().map(|id| step(id)).collect();
    format!(
        "{}\n[probes.web]\n{probe}\n\n[probes.db]\n{probe}\n",
        steps.join("\n")
    )
}
