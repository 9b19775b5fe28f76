//! The PowerShell pitfalls of `STYLE.md`, one test each, against the coordinator's session host
//! (`session_host.ps1`) running in the real `pwsh` in `none` mode (the `local` transport):
//! `ConvertTo-Json`'s default depth, `$LASTEXITCODE` as a step's last act,
//! `$ErrorActionPreference = 'Stop'` inside a step (and that it does not leak), and that the code
//! sent to targets keeps to the Windows PowerShell 5.1 language. Runs only where `pwsh` is on
//! PATH; elsewhere each test says it did not run, and why, and passes, unless
//! `TOLLGATE_REQUIRE_PWSH=1`: then a missing pwsh fails.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use tollgate_coordinator::transport::pwsh::{PwshSession, SESSION_HOST_SCRIPT, SessionError};
use tollgate_protocol::agent::{
    ExecStatus, ExecuteRequest, ProbeReport, ProbeRequest, Script, Stream,
};
use tollgate_protocol::{Shell, StepErrors};
use tollgate_tests::pwsh::{LIMIT, execute, local_session, ps_path, stream_text};

/// A PowerShell step with the usual minute.
fn step(key: &str, script: &str) -> ExecuteRequest {
    tollgate_tests::pwsh::step(key, Shell::Pwsh, script, 60_000)
}

async fn probe(s: &mut PwshSession, body: &str) -> Result<ProbeReport, SessionError> {
    let req = ProbeRequest {
        script: Some(Script {
            shell: Shell::Pwsh,
            body: body.to_string(),
        }),
        timeout_ms: 60_000,
    };
    tokio::time::timeout(LIMIT, s.probe(req, Duration::from_secs(90)))
        .await
        .expect("in time")
}

const DEEP: &str = "[ordered]@{ role = 'web'; nest = [ordered]@{ a = [ordered]@{ b = [ordered]@{ c = 'deep' } } } }";
const DEEP_JSON: &str = r#"{"a":{"b":{"c":"deep"}}}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_facts_deeper_than_convert_to_json_default_depth_come_out_whole_or_typed() {
    let Some(pwsh) = tollgate_tests::real::pwsh("pwsh_pitfalls ConvertTo-Json depth") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut s = local_session(pwsh, dir.path());

    // The session host hands the script's text through as it printed it; it serialises no
    // script output itself, so depth 4 arrives whole.
    let r = probe(
        &mut s,
        &format!("{DEEP} | ConvertTo-Json -Depth 10 -Compress"),
    )
    .await
    .unwrap();
    assert_eq!(r.facts["probe.role"], "web");
    assert_eq!(r.facts["probe.nest"], DEEP_JSON);

    // The same, indented over several lines (the session host joins the script's lines).
    let r = probe(&mut s, &format!("{DEEP} | ConvertTo-Json -Depth 10"))
        .await
        .unwrap();
    assert_eq!(r.facts["probe.nest"], DEEP_JSON);

    // A script that emits the nested object itself, not JSON: PowerShell formats it as a table;
    // that is typed as malformed facts, never turned into values.
    match probe(&mut s, DEEP).await {
        Err(SessionError::ProbeMalformed(m)) => assert!(m.contains("not JSON"), "{m}"),
        other => panic!("expected ProbeMalformed, got {other:?}"),
    }

    // The built-in facts the session host serialises itself are flat and complete.
    let r = probe(&mut s, "'{}'").await.unwrap();
    for key in [
        "host.name",
        "os.family",
        "os.arch",
        "pwsh.version",
        "pwsh.edition",
    ] {
        let v = &r.facts[key];
        assert!(!v.is_empty() && !v.starts_with("System."), "{key} = {v:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_script_with_default_depth_convert_to_json_is_not_silently_truncated() {
    let Some(pwsh) = tollgate_tests::real::pwsh("pwsh_pitfalls ConvertTo-Json default depth")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut s = local_session(pwsh, dir.path());
    match probe(&mut s, &format!("{DEEP} | ConvertTo-Json -Compress")).await {
        Ok(r) => assert_eq!(r.facts["probe.nest"], DEEP_JSON, "{:?}", r.facts),
        Err(SessionError::ProbeMalformed(_) | SessionError::ProbeFailed(_)) => {}
        Err(other) => panic!("expected facts or a typed probe failure, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_native_exit_code_of_a_step_reaches_the_result() {
    let Some(pwsh) = tollgate_tests::real::pwsh("pwsh_pitfalls LASTEXITCODE") else {
        return;
    };
    // The native command is pwsh itself: there on every platform these tests run.
    let native = |code: i32| {
        format!(
            "& {} -NoLogo -NoProfile -NonInteractive -Command 'exit {code}'",
            ps_path(&pwsh)
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let mut s = local_session(pwsh.clone(), dir.path());

    let script = format!("Write-Output 'start'\n{}", native(7));
    let (r, chunks) = execute(&mut s, step("pit/native7", &script)).await;
    assert_eq!(r.status, ExecStatus::Exited { code: 7 });
    assert!(stream_text(&chunks, Stream::Stdout).contains("start"));

    // The next step on the same session starts from 0: the 7 does not leak into it.
    let (r, _) = execute(&mut s, step("pit/after", "Write-Output 'no native here'")).await;
    assert_eq!(r.status, ExecStatus::Exited { code: 0 });

    // The last native command decides, not the first.
    let script = format!("{}\n{}", native(7), native(0));
    let (r, _) = execute(&mut s, step("pit/native0", &script)).await;
    assert_eq!(r.status, ExecStatus::Exited { code: 0 });
    assert_eq!(s.spawns(), 1, "one session host for all of it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_action_stop_in_a_step_is_honoured_and_does_not_leak_into_the_next() {
    let Some(pwsh) = tollgate_tests::real::pwsh("pwsh_pitfalls ErrorActionPreference") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut s = local_session(pwsh, dir.path());
    let missing = ps_path(&dir.path().join("not-here"));

    for (key, set) in [
        ("pit/stop-script", "$ErrorActionPreference = 'Stop'"),
        ("pit/stop-global", "$global:ErrorActionPreference = 'Stop'"),
    ] {
        let script = format!(
            "{set}\nWrite-Output 'before'\nGet-Item -LiteralPath {missing}\nWrite-Output 'after'"
        );
        let (r, chunks) = execute(&mut s, step(key, &script)).await;
        assert_eq!(r.status, ExecStatus::Exited { code: 1 }, "{key}");
        let out = stream_text(&chunks, Stream::Stdout);
        assert!(
            out.contains("before") && !out.contains("after"),
            "{key}: {out}"
        );
        let e = s.last_script_error().expect("an error record");
        assert_eq!(e.category, "ObjectNotFound", "{key}");
        assert!(e.message.contains("not-here"), "{key}: {}", e.message);

        // The next step on the same session runs with its own `errors`, whatever the last one
        // set: under "continue" the same failure is a non-terminating error and the step goes
        // on; under the default "stop" the preference is Stop again.
        let next = format!(
            "Write-Output \"eap=$ErrorActionPreference\"\nGet-Item -LiteralPath {missing}\nWrite-Output 'after'"
        );
        let mut req = step(&format!("{key}/next"), &next);
        req.errors = StepErrors::Continue;
        let (r, chunks) = execute(&mut s, req).await;
        assert_eq!(r.status, ExecStatus::Exited { code: 0 }, "{key}");
        let out = stream_text(&chunks, Stream::Stdout);
        assert!(
            out.contains("eap=Continue") && out.contains("after"),
            "{key}: {out}"
        );
        assert!(
            stream_text(&chunks, Stream::Stderr).contains("not-here"),
            "{key}: the error was reported"
        );
        let (r, chunks) = execute(&mut s, step(&format!("{key}/stop"), &next)).await;
        assert_eq!(r.status, ExecStatus::Exited { code: 1 }, "{key}");
        let out = stream_text(&chunks, Stream::Stdout);
        assert!(
            out.contains("eap=Stop") && !out.contains("after"),
            "{key}: {out}"
        );
    }

    // A statement-terminating error stops a step as well (the agent's pwsh does the same).
    let (r, chunks) = execute(
        &mut s,
        step(
            "pit/statement",
            "Write-Output 'before'\n[int]::Parse('x')\nWrite-Output 'after'",
        ),
    )
    .await;
    assert_eq!(r.status, ExecStatus::Exited { code: 1 });
    let out = stream_text(&chunks, Stream::Stdout);
    assert!(out.contains("before") && !out.contains("after"), "{out}");
    assert_eq!(s.spawns(), 1, "one session host for all of it");
}

/// Reads PowerShell files (its arguments), finds the assignments to `$Target*` variables, and checks
/// that each one is a scriptblock literal whose text, parsed on its own, uses only the Windows
/// PowerShell 5.1 language. Prints one JSON object: per file, the blocks found and violations
/// (each with the file's line number).
const CHECK_PS51: &str = r#"
param([Parameter(ValueFromRemainingArguments)][string[]]$Paths)
Set-StrictMode -Version 3.0
$ErrorActionPreference = 'Stop'

# Parameters PowerShell 6+ added, by cmdlet; a prefix of two letters or more is that parameter.
$NewParameters = @{
    'ConvertFrom-Json' = @('AsHashtable', 'Depth', 'NoEnumerate', 'DateKind')
    'ConvertTo-Json'   = @('AsArray', 'EscapeHandling')
    'ForEach-Object'   = @('Parallel', 'ThrottleLimit', 'TimeoutSeconds', 'AsJob')
    'Join-Path'        = @('AdditionalChildPath')
    'Get-Content'      = @('AsByteStream')
}

function Find-Violations([System.Management.Automation.Language.Ast]$Root) {
    $found = [System.Collections.Generic.List[object]]::new()
    foreach ($node in $Root.FindAll({ $true }, $true)) {
        $kind = $null
        $type = $node.GetType().Name
        if ($type -eq 'TernaryExpressionAst') { $kind = 'ternary' }
        elseif ($type -eq 'PipelineChainAst') { $kind = 'pipeline_chain' }
        elseif ($type -eq 'BinaryExpressionAst' -and $node.Operator -eq 'QuestionQuestion') { $kind = 'null_coalescing' }
        elseif ($type -eq 'AssignmentStatementAst' -and $node.Operator -eq 'QuestionQuestionEquals') { $kind = 'null_coalescing_assignment' }
        elseif (($type -eq 'MemberExpressionAst' -or $type -eq 'InvokeMemberExpressionAst' -or $type -eq 'IndexExpressionAst') -and $node.NullConditional) { $kind = 'null_conditional' }
        elseif ($type -eq 'PipelineAst' -and $node.Background) { $kind = 'background_operator' }
        elseif ($type -eq 'ScriptBlockAst' -and $null -ne $node.CleanBlock) { $kind = 'clean_block' }
        elseif ($type -eq 'CommandAst') {
            $name = $node.GetCommandName()
            if ($name -and $NewParameters.ContainsKey($name)) {
                foreach ($element in $node.CommandElements) {
                    if ($element.GetType().Name -ne 'CommandParameterAst') { continue }
                    $given = $element.ParameterName
                    foreach ($new in $NewParameters[$name]) {
                        if ($given.Length -ge 2 -and $new.StartsWith($given, [StringComparison]::OrdinalIgnoreCase)) {
                            $kind = "parameter $name -$new"
                        }
                    }
                }
            }
        }
        if ($kind) {
            $found.Add([ordered]@{ kind = $kind; line = $node.Extent.StartLineNumber; text = $node.Extent.Text })
        }
    }
    , $found
}

$report = [ordered]@{}
foreach ($path in $Paths) {
    $tokens = $null
    $errors = $null
    $file = [System.Management.Automation.Language.Parser]::ParseFile($path, [ref]$tokens, [ref]$errors)
    $blocks = [ordered]@{}
    $problems = [System.Collections.Generic.List[object]]::new()
    foreach ($e in @($errors)) {
        if ($e) { $problems.Add([ordered]@{ block = ''; kind = 'parse_error'; line = $e.Extent.StartLineNumber; text = $e.Message }) }
    }
    $assignments = $file.FindAll({
        param($n)
        $n -is [System.Management.Automation.Language.AssignmentStatementAst] -and
            $n.Left -is [System.Management.Automation.Language.VariableExpressionAst] -and
            $n.Left.VariablePath.UserPath -like 'Target*'
    }, $true)
    foreach ($assignment in $assignments) {
        $name = $assignment.Left.VariablePath.UserPath
        $right = $assignment.Right
        if (-not ($right -is [System.Management.Automation.Language.CommandExpressionAst] -and
                  $right.Expression -is [System.Management.Automation.Language.ScriptBlockExpressionAst])) {
            $problems.Add([ordered]@{ block = $name; kind = 'not_a_scriptblock_literal'; line = $assignment.Extent.StartLineNumber; text = $right.Extent.Text })
            continue
        }
        # What is sent is the scriptblock's text: [scriptblock]::ToString(), inside the braces.
        $outer = $right.Expression.Extent.Text
        $inner = $outer.Substring(1, $outer.Length - 2)
        $offset = $right.Expression.Extent.StartLineNumber - 1
        $blocks[$name] = $inner.Length
        $innerTokens = $null
        $innerErrors = $null
        $ast = [System.Management.Automation.Language.Parser]::ParseInput($inner, [ref]$innerTokens, [ref]$innerErrors)
        foreach ($e in @($innerErrors)) {
            if ($e) { $problems.Add([ordered]@{ block = $name; kind = 'parse_error'; line = $offset + $e.Extent.StartLineNumber; text = $e.Message }) }
        }
        foreach ($v in (Find-Violations $ast)) {
            $v['block'] = $name
            $v['line'] = $offset + $v['line']
            $problems.Add($v)
        }
    }
    $report[$path] = [ordered]@{ blocks = $blocks; violations = $problems.ToArray() }
}
[Console]::Out.WriteLine(($report | ConvertTo-Json -Depth 8 -Compress))
exit 0
"#;

/// `{path: {blocks: {name: length}, violations: [{block, kind, line, text}]}}` for each file.
async fn check_ps51(pwsh: &Path, files: &[PathBuf], dir: &Path) -> serde_json::Value {
    let checker = dir.join("check_ps51.ps1");
    std::fs::write(&checker, CHECK_PS51).unwrap();
    let out = tokio::time::timeout(
        LIMIT,
        tokio::process::Command::new(pwsh)
            .args(["-NoLogo", "-NoProfile", "-NonInteractive", "-File"])
            .arg(&checker)
            .args(files)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the checker answered in time")
    .expect("the checker ran");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "checker failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// `SESSION_HOST_SCRIPT` with `line` added to `$TargetInvoke`, after its dot-source of the
/// common code.
fn with_line_in_target_invoke(line: &str) -> String {
    let start = SESSION_HOST_SCRIPT
        .find("$TargetInvoke = {")
        .expect("$TargetInvoke");
    let anchor = "    . ([scriptblock]::Create($Common))\n";
    let at = start
        + SESSION_HOST_SCRIPT[start..]
            .find(anchor)
            .expect("the dot-source in $TargetInvoke")
        + anchor.len();
    format!(
        "{}    {line}\n{}",
        &SESSION_HOST_SCRIPT[..at],
        &SESSION_HOST_SCRIPT[at..]
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn code_sent_to_targets_keeps_to_the_windows_powershell_5_1_language() {
    let Some(pwsh) = tollgate_tests::real::pwsh("pwsh_pitfalls PowerShell 5.1 grammar") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let shipped = dir.path().join("session_host.ps1");
    std::fs::write(&shipped, SESSION_HOST_SCRIPT).unwrap();

    // Each construct the checker must catch, planted in $TargetInvoke; one file per mutant.
    let mutants: Vec<(&str, &str)> = vec![
        ("ternary", "$x = $Key ? 'a' : 'b'"),
        ("null_coalescing", "$x = $Key ?? 'a'"),
        ("null_coalescing_assignment", "$x ??= 'a'"),
        ("null_conditional", "$x = ${Key}?.Length"),
        ("null_conditional", "$x = ${Key}?[0]"),
        ("pipeline_chain", "Get-Item . && Get-Item ."),
        ("pipeline_chain", "Get-Item . || Get-Item ."),
        (
            "parameter ConvertFrom-Json -AsHashtable",
            "$x = '{}' | ConvertFrom-Json -AsHashtable",
        ),
        (
            "parameter ConvertFrom-Json -AsHashtable",
            "$x = '{}' | ConvertFrom-Json -AsHash",
        ),
        ("clean_block", "$f = { process { $_ } clean { $null = 1 } }"),
        (
            "parameter ForEach-Object -Parallel",
            "$x = 1 | ForEach-Object -Parallel { $_ }",
        ),
        ("background_operator", "Get-Item . &"),
    ];
    let mut files = vec![shipped.clone()];
    for (i, (_, line)) in mutants.iter().enumerate() {
        let f = dir.path().join(format!("mutant-{i}.ps1"));
        std::fs::write(&f, with_line_in_target_invoke(line)).unwrap();
        files.push(f);
    }
    let report = check_ps51(&pwsh, &files, dir.path()).await;

    let key = shipped.display().to_string();
    let blocks = report[&key]["blocks"].as_object().expect("blocks");
    for name in [
        "TargetCommon",
        "TargetInvoke",
        "TargetFinish",
        "TargetQuery",
        "TargetProbe",
    ] {
        assert!(
            blocks
                .get(name)
                .and_then(|l| l.as_u64())
                .is_some_and(|l| l > 0),
            "{name} not found by the AST walk: {blocks:?}"
        );
    }
    let violations = report[&key]["violations"].as_array().expect("violations");
    assert!(
        violations.is_empty(),
        "code sent to targets uses PowerShell 7 only syntax (Windows PowerShell 5.1 cannot run it): {violations:#?}"
    );

    for (i, (kind, line)) in mutants.iter().enumerate() {
        let key = files[i + 1].display().to_string();
        let found = report[&key]["violations"].as_array().expect("violations");
        assert!(
            found
                .iter()
                .any(|v| v["block"] == "TargetInvoke" && v["kind"] == *kind),
            "{line:?} in $TargetInvoke was not caught as {kind}: {found:#?}"
        );
    }
}
