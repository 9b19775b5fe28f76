//! The operations (`operations.toml`) the labs run: every step appends to marker files in its
//! host's home, so a test can count what ran where.

/// The fault lab's operations. Like [`crate::lab::operations`], each step appends to
/// `markers/STEP` when it finishes, and also to `markers/STEP.begun` when it starts, so an
/// execution that was cut short still counts. A file `gate-STEP` in the host's home holds the step
/// after it began (it writes `started-STEP` and waits, at most 80 s, until the gate is removed),
/// so a test can inject a fault at a known point. `gate-probe` does the same for the probe (the
/// barrier re-probe, when armed after approval).
pub fn operations() -> String {
    let h = r#"H=\"$TOLLGATE_AGENT_STATE/..\"; mkdir -p \"$H/markers\""#;
    let gate = |name: &str| {
        format!(
            r#"if [ -f \"$H/gate-{name}\" ]; then echo started > \"$H/started-{name}\"; i=0; while [ -f \"$H/gate-{name}\" ] && [ $i -lt 1600 ]; do sleep 0.05; i=$((i+1)); done; fi"#
        )
    };
    let step = |id: &str, destructive: bool| {
        format!(
            r#"[[{action}.phases]]
name = "{id}"
[[{action}.phases.steps]]
id = "{id}"
roles = ["web", "db"]
shell = "sh"
run = "{h}; echo x >> \"$H/markers/{id}.begun\"; {gate}; echo x >> \"$H/markers/{id}\""
destructive = {destructive}
timeout = "90s"
"#,
            action = if matches!(id, "prepare" | "install") {
                "deploy"
            } else {
                "teardown"
            },
            gate = gate(id),
        )
    };
    let probe = format!(
        r#"shell = "sh"
run = "H=\"$TOLLGATE_AGENT_STATE/..\"; {gate}; cat \"$H/facts.json\"""#,
        gate = gate("probe")
    );
    format!(
        "{}\n{}\n{}\n{}\n[probes.web]\n{probe}\n\n[probes.db]\n{probe}\n",
        step("prepare", false),
        step("install", false),
        step("drain", false),
        step("remove", true),
    )
}

/// The steps of [`operations`], in order.
pub const STEPS: &[&str] = &["prepare", "install", "drain", "remove"];
/// The destructive step.
pub const DESTRUCTIVE: &str = "remove";
