//! `tollgate-pwsh-standin`: stands in for `pwsh` running Tollgate's session-host script.
//!
//! It takes exactly the command line the coordinator gives `pwsh`
//! (`-NoLogo -NoProfile -NonInteractive -File <script> -Mode ... [-StateDir DIR] ...`), checks the
//! script is the session host (contract v1), and speaks the same JSON-lines contract, written
//! here by hand against the documented shapes (not with the coordinator's types). Idempotency
//! markers live under `DIR/keys/` like the real script's, so exactly-once is real.
//!
//! Steps are not PowerShell but a line language, one command per line:
//! `out TEXT`, `warn TEXT`, `err TEXT` (a non-terminating error record), `progress N TEXT`,
//! `append PATH TEXT`, `env NAME`, `sleep MS` (cancel and timeout are served meanwhile),
//! `exit N`, `throw CATEGORY MESSAGE` (a terminating error). Other lines are error records.
//! Under a step's `errors = "stop"` (the default) the first error record (`err`, or a line it
//! does not know) ends the step with exit 1, its record as the result's error, as
//! `$ErrorActionPreference = 'Stop'` makes PowerShell do; under `"continue"` it is shown and
//! the script goes on. Probes always go on.
//!
//! Faults come from `DIR/standin-faults`, one directive a line. Each fires once and is removed
//! from the file, except `auth-fail`, which holds until the file changes:
//! `auth-fail`, `unreachable`, `crash-on=OP`, `crash-during=invoke`, `hang-on=OP`,
//! `hang-during=invoke`, `garbage-on=OP`, `lose-session-after=N` (N requests after hello are served first),
//! `lose-session-on=OP`.
//! Each launch appends its argv and the credential *user* it resolved to
//! `DIR/standin-launches.jsonl`.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const CONTRACT_MARK: &str = "tollgate-session-host contract v1";

#[derive(Debug, Default)]
struct Args {
    mode: String,
    state_dir: Option<PathBuf>,
    named: BTreeMap<String, String>,
    use_ssl: bool,
}

fn fatal(code: i32, msg: &str) -> ! {
    eprintln!("tollgate-pwsh-standin: {msg}");
    std::process::exit(code)
}

fn parse_args(argv: &[String]) -> Args {
    let prefix = ["-NoLogo", "-NoProfile", "-NonInteractive", "-File"];
    if argv.len() < 5 || argv[..4] != prefix {
        fatal(
            64,
            &format!("expected `{} <script> ...`, got {argv:?}", prefix.join(" ")),
        );
    }
    match std::fs::read_to_string(&argv[4]) {
        Ok(s) if s.contains(CONTRACT_MARK) => {}
        Ok(_) => fatal(65, &format!("{} is not the session host script", argv[4])),
        Err(e) => fatal(65, &format!("cannot read {}: {e}", argv[4])),
    }
    let known = [
        "Mode",
        "ComputerName",
        "HostName",
        "Port",
        "Authentication",
        "ConfigurationName",
        "UserName",
        "KeyFilePath",
        "StateDir",
    ];
    let mut args = Args {
        mode: "none".into(),
        ..Args::default()
    };
    let mut rest = argv[5..].iter();
    while let Some(a) = rest.next() {
        let Some(name) = a.strip_prefix('-') else {
            fatal(64, &format!("unexpected argument {a:?}"));
        };
        if name == "UseSsl" {
            args.use_ssl = true;
            continue;
        }
        if !known.contains(&name) {
            fatal(64, &format!("unknown parameter -{name}"));
        }
        let Some(value) = rest.next() else {
            fatal(64, &format!("-{name} needs a value"));
        };
        if value.is_empty() || value.starts_with('-') {
            fatal(64, &format!("-{name} has a bad value {value:?}"));
        }
        args.named.insert(name.to_string(), value.clone());
    }
    if let Some(m) = args.named.get("Mode") {
        if !["none", "winrm", "ssh"].contains(&m.as_str()) {
            fatal(64, &format!("-Mode {m} is not none, winrm or ssh"));
        }
        args.mode = m.clone();
    }
    args.state_dir = args.named.get("StateDir").map(PathBuf::from);
    args
}

// ---------------------------------------------------------------------------------------------

struct Faults {
    path: Option<PathBuf>,
}

impl Faults {
    fn lines(&self) -> Vec<String> {
        let Some(p) = &self.path else {
            return Vec::new();
        };
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_string)
            .collect()
    }

    fn has(&self, directive: &str) -> bool {
        self.lines().iter().any(|l| l == directive)
    }

    /// Fires a one-shot directive: true (and removed from the file) if it was there.
    fn take(&self, directive: &str) -> bool {
        let lines = self.lines();
        if !lines.iter().any(|l| l == directive) {
            return false;
        }
        if let Some(p) = &self.path {
            let kept: Vec<&String> = lines.iter().filter(|l| *l != directive).collect();
            let text: String = kept.iter().map(|l| format!("{l}\n")).collect();
            if std::fs::write(p, text).is_err() {
                fatal(70, "cannot update the fault file");
            }
        }
        true
    }

    /// The value of a one-shot `name=VALUE` directive, if present (not removed).
    fn value(&self, name: &str) -> Option<String> {
        let prefix = format!("{name}=");
        self.lines()
            .iter()
            .find_map(|l| l.strip_prefix(&prefix).map(str::to_string))
    }
}

// ---------------------------------------------------------------------------------------------

struct Io {
    lines: mpsc::Receiver<Option<String>>,
}

impl Io {
    fn start() -> Io {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let stdin = std::io::stdin();
            for line in stdin.lock().lines() {
                match line {
                    Ok(l) => {
                        if tx.send(Some(l)).is_err() {
                            return;
                        }
                    }
                    Err(_) => break,
                }
            }
            let _ = tx.send(None);
        });
        Io { lines: rx }
    }

    /// The next request; `None` when `wait` passed without one. Exits at end of input.
    fn next(&self, wait: Option<Duration>) -> Option<Value> {
        let line = match wait {
            None => self.lines.recv().ok().flatten(),
            Some(d) => match self.lines.recv_timeout(d) {
                Ok(l) => l,
                Err(mpsc::RecvTimeoutError::Timeout) => return None,
                Err(mpsc::RecvTimeoutError::Disconnected) => None,
            },
        };
        let Some(line) = line else {
            std::process::exit(0);
        };
        match serde_json::from_str::<Value>(&line) {
            Ok(v) if v.get("id").is_some() && v.get("op").is_some() => Some(v),
            _ => {
                send(
                    &json!({"id": 0, "type": "fail", "code": "bad_request", "message": "not a request"}),
                );
                None
            }
        }
    }
}

fn send(v: &Value) {
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{v}").and_then(|_| out.flush()).is_err() {
        std::process::exit(0);
    }
}

fn send_raw(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|_| out.flush());
}

fn hang() -> ! {
    loop {
        std::thread::park();
    }
}

fn crash(why: &str) -> ! {
    eprintln!("tollgate-pwsh-standin: crashing {why}");
    std::process::exit(101)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------

struct Host {
    args: Args,
    faults: Faults,
    io: Io,
    instance: String,
    served: u64,
}

impl Host {
    fn key_dir(&self) -> PathBuf {
        let base = self
            .args
            .state_dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join("tollgate-pwsh-standin"));
        let dir = base.join("keys");
        if std::fs::create_dir_all(&dir).is_err() {
            fatal(70, "cannot create the key directory");
        }
        dir
    }

    fn marker_path(&self, key: &str) -> PathBuf {
        let hex: String = key.bytes().map(|b| format!("{b:02x}")).collect();
        self.key_dir().join(format!("{hex}.json"))
    }

    fn read_marker(&self, key: &str) -> Option<Value> {
        let text = std::fs::read_to_string(self.marker_path(key)).ok()?;
        Some(serde_json::from_str(&text).unwrap_or_else(|_| json!({"state": "started"})))
    }

    fn write_marker(&self, key: &str, marker: &Value) {
        let path = self.marker_path(key);
        let tmp = path.with_extension("tmp");
        if std::fs::write(&tmp, marker.to_string()).is_err()
            || std::fs::rename(&tmp, &path).is_err()
        {
            fatal(70, "cannot write a marker");
        }
    }

    fn hello(&mut self) {
        let hello = loop {
            if let Some(r) = self.io.next(None) {
                break r;
            }
        };
        let id = hello["id"].clone();
        if hello["op"] != "hello" {
            send(
                &json!({"id": id, "type": "fail", "code": "bad_request", "message": "the first request must be hello"}),
            );
            std::process::exit(2);
        }
        if hello["v"] != 1 {
            send(
                &json!({"id": id, "type": "fail", "code": "unsupported_version", "message": format!("v{} is not v1", hello["v"])}),
            );
            std::process::exit(2);
        }
        if self.faults.has("auth-fail") {
            send(
                &json!({"id": id, "type": "fail", "code": "auth_failed", "message": "Access is denied."}),
            );
            std::process::exit(2);
        }
        if self.faults.take("unreachable") {
            send(
                &json!({"id": id, "type": "fail", "code": "unreachable", "message": "WinRM cannot complete the operation: the host is not reachable."}),
            );
            std::process::exit(2);
        }
        if let Err(e) = self.credential() {
            send(
                &json!({"id": id, "type": "fail", "code": "credential_unavailable", "message": e}),
            );
            std::process::exit(2);
        }
        // A session host of another release: it answers hello in its own contract version.
        let v = if self.faults.has("hello-version=2") {
            2
        } else {
            1
        };
        send(&json!({
            "id": id, "type": "hello", "v": v, "software": "tollgate-pwsh-standin/1",
            "ps_version": "7.4.6-standin", "mode": self.args.mode, "instance": self.instance,
        }));
    }

    /// The credential's user, resolved like the real script does (the password is dropped).
    fn credential(&self) -> Result<Option<String>, String> {
        let Ok(r) = std::env::var("TOLLGATE_CREDENTIAL_REF") else {
            return Ok(None);
        };
        let pair = if let Some(name) = r.strip_prefix("env:") {
            let v = std::env::var(name).map_err(|_| {
                format!("environment variable {name} named by credential_ref is not set")
            })?;
            if Path::new(&v).is_file() {
                std::fs::read_to_string(&v).map_err(|e| e.to_string())?
            } else {
                v
            }
        } else if let Some(p) = r.strip_prefix("file:") {
            std::fs::read_to_string(p).map_err(|e| format!("credential file {p}: {e}"))?
        } else {
            return Err("credential_ref must be env:NAME or file:PATH".into());
        };
        let first = pair.lines().next().unwrap_or("");
        match first.split_once(':') {
            Some((user, _secret)) if !user.is_empty() => Ok(Some(user.to_string())),
            _ => Err("the credential holds no user:password".into()),
        }
    }

    fn record_launch(&self, argv: &[String]) {
        let Some(dir) = &self.args.state_dir else {
            return;
        };
        let _ = std::fs::create_dir_all(dir);
        let line = json!({
            "argv": argv,
            "mode": self.args.mode,
            "named": self.args.named,
            "use_ssl": self.args.use_ssl,
            "credential_ref": std::env::var("TOLLGATE_CREDENTIAL_REF").ok(),
            "credential_user": self.credential().ok().flatten(),
            "pid": std::process::id(),
        });
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("standin-launches.jsonl"));
        if let Ok(mut f) = file {
            let _ = writeln!(f, "{line}");
        }
    }

    fn serve(&mut self) -> ! {
        loop {
            let Some(req) = self.io.next(None) else {
                continue;
            };
            let op = req["op"].as_str().unwrap_or("").to_string();
            let id = req["id"].clone();
            if self.faults.take(&format!("crash-on={op}")) {
                crash(&format!("on {op}"));
            }
            if self.faults.take(&format!("hang-on={op}")) {
                hang();
            }
            if self.faults.take(&format!("garbage-on={op}")) {
                send_raw("this is not the contract\n");
                continue;
            }
            let lose_after = self
                .faults
                .value("lose-session-after")
                .filter(|n| n.parse::<u64>().ok() == Some(self.served))
                .is_some_and(|n| self.faults.take(&format!("lose-session-after={n}")));
            if lose_after || self.faults.take(&format!("lose-session-on={op}")) {
                if op == "invoke" {
                    self.start_marker(&req);
                }
                send(
                    &json!({"id": id, "type": "fail", "code": "session_lost", "message": "The session state is Broken: the network connection to the target was lost."}),
                );
                std::process::exit(3);
            }
            self.served += 1;
            match op.as_str() {
                "probe" => self.probe(&req),
                "invoke" => self.invoke(&req),
                "query" => self.query(&req),
                "cancel" => send(&json!({"id": id, "type": "cancel", "found": false})),
                "hello" => send(
                    &json!({"id": id, "type": "fail", "code": "bad_request", "message": "hello was already said"}),
                ),
                other => send(
                    &json!({"id": id, "type": "fail", "code": "bad_request", "message": format!("unknown op {other}")}),
                ),
            }
        }
    }

    fn probe(&mut self, req: &Value) {
        let id = req["id"].clone();
        let mut facts = BTreeMap::new();
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "standin".into());
        facts.insert("host.name", host);
        facts.insert("os.family", std::env::consts::OS.to_string());
        facts.insert("os.arch", std::env::consts::ARCH.to_string());
        facts.insert("pwsh.present", "true".into());
        facts.insert("pwsh.version", "7.4.6".into());
        facts.insert("pwsh.edition", "Core".into());
        if let Ok(b) = std::fs::read_to_string("/proc/sys/kernel/random/boot_id") {
            facts.insert("boot.id", b.trim().to_string());
        }
        let mut script_output = Value::Null;
        if let Some(script) = req["script"].as_str() {
            let timeout = Duration::from_millis(req["timeout_ms"].as_u64().unwrap_or(1000));
            let mut lines = Vec::new();
            let run = self.run(
                script,
                &BTreeMap::new(),
                timeout,
                None,
                false,
                &id,
                &mut |kind, data| {
                    if kind == "stdout" {
                        lines.push(data.trim_end_matches('\n').to_string());
                    }
                },
            );
            match run {
                Ending::Exited(0, None) => script_output = json!(lines.join("\n")),
                Ending::Exited(code, err) => {
                    let msg = match err {
                        Some(e) => {
                            format!("probe script exited with code {code}: {}", e["message"])
                        }
                        None => format!("probe script exited with code {code}"),
                    };
                    send(
                        &json!({"id": id, "type": "fail", "code": "probe_failed", "message": msg}),
                    );
                    return;
                }
                Ending::TimedOut | Ending::Cancelled => {
                    send(
                        &json!({"id": id, "type": "fail", "code": "timed_out", "message": "the probe did not finish in time"}),
                    );
                    return;
                }
            }
        }
        send(&json!({
            "id": id, "type": "probe", "facts": facts,
            "volatile": {"time.unix_ms": now_ms().to_string()},
            "script_output": script_output,
        }));
    }

    fn start_marker(&self, req: &Value) -> bool {
        let key = req["key"].as_str().unwrap_or("");
        let path = self.marker_path(key);
        let created = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path);
        let Ok(mut f) = created else {
            return false;
        };
        let marker = json!({"v": 1, "key": key, "request_sha": req["request_sha"], "state": "started", "owner": self.instance});
        if f.write_all(marker.to_string().as_bytes()).is_err() {
            fatal(70, "cannot write a marker");
        }
        true
    }

    fn invoke(&mut self, req: &Value) {
        let id = req["id"].clone();
        let key = req["key"].as_str().unwrap_or("").to_string();
        if key.is_empty() {
            send(
                &json!({"id": id, "type": "fail", "code": "bad_request", "message": "invoke needs a key"}),
            );
            return;
        }
        // Like the real script: `errors` is required; `stop` makes the first error record end
        // the step (exit 1), as `$ErrorActionPreference = 'Stop'` does.
        let stop = match req["errors"].as_str() {
            Some("stop") => true,
            Some("continue") => false,
            other => {
                send(
                    &json!({"id": id, "type": "fail", "code": "bad_request", "message": format!("invoke needs errors = 'stop' or 'continue', got {other:?}")}),
                );
                return;
            }
        };
        if !self.start_marker(req) {
            let old = self
                .read_marker(&key)
                .unwrap_or(json!({"state": "started"}));
            if old["state"] == "finished" {
                if old["request_sha"] != req["request_sha"] {
                    send(
                        &json!({"id": id, "type": "fail", "code": "idempotency_conflict", "message": format!("key {key} was used before for a different request")}),
                    );
                    return;
                }
                let r = &old["result"];
                send(
                    &json!({"id": id, "type": "result", "key": key, "status": r["status"], "error": r["error"], "duration_ms": r["duration_ms"], "replayed": true}),
                );
                return;
            }
            send(
                &json!({"id": id, "type": "result", "key": key, "status": {"kind": "uncertain", "detail": format!("key {key} was left started by session host {} and has no result", old["owner"])}, "error": null, "duration_ms": 0, "replayed": false}),
            );
            return;
        }
        if self.faults.take("crash-during=invoke") {
            send(&json!({"id": id, "type": "output", "stream": "stdout", "data": "partial\n"}));
            crash("during invoke");
        }
        if self.faults.take("hang-during=invoke") {
            send(&json!({"id": id, "type": "output", "stream": "stdout", "data": "partial\n"}));
            hang();
        }
        let env: BTreeMap<String, String> = req["env"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                    .collect()
            })
            .unwrap_or_default();
        let timeout = Duration::from_millis(req["timeout_ms"].as_u64().unwrap_or(0));
        let started = Instant::now();
        let ending = self.run(
            req["script"].as_str().unwrap_or(""),
            &env,
            timeout,
            Some(&key),
            stop,
            &id,
            &mut |kind, data| match kind {
                "stdout" | "stderr" => send(&json!({"id": id, "type": "output", "stream": kind, "data": data})),
                "error" => send(&json!({"id": id, "type": "error", "data": data, "category": "NotSpecified"})),
                _ => {
                    let (pct, activity) = data.split_once(' ').unwrap_or((data, ""));
                    let percent: Option<i64> = pct.parse().ok();
                    send(&json!({"id": id, "type": "progress", "activity": activity, "status": "", "percent": percent}));
                }
            },
        );
        let (status, error) = match ending {
            Ending::Exited(code, err) => (
                json!({"kind": "exited", "code": code}),
                err.unwrap_or(Value::Null),
            ),
            Ending::TimedOut => (json!({"kind": "timed_out"}), Value::Null),
            Ending::Cancelled => (json!({"kind": "cancelled"}), Value::Null),
        };
        let result = json!({"status": status, "error": error, "duration_ms": started.elapsed().as_millis() as u64});
        self.write_marker(
            &key,
            &json!({"v": 1, "key": key, "request_sha": req["request_sha"], "state": "finished", "owner": self.instance, "result": result}),
        );
        send(
            &json!({"id": id, "type": "result", "key": key, "status": status, "error": error, "duration_ms": result["duration_ms"], "replayed": false}),
        );
    }

    fn query(&mut self, req: &Value) {
        let id = req["id"].clone();
        let key = req["key"].as_str().unwrap_or("").to_string();
        let answer = match self.read_marker(&key) {
            None => {
                json!({"id": id, "type": "query", "key": key, "state": "not_found", "result": null})
            }
            Some(m) if m["state"] == "finished" => {
                json!({"id": id, "type": "query", "key": key, "state": "finished", "result": m["result"]})
            }
            Some(_) => {
                json!({"id": id, "type": "query", "key": key, "state": "uncertain", "result": null})
            }
        };
        send(&answer);
    }

    /// Runs a line-language script; `emit(kind, data)` gets `stdout`, `stderr`, `error` and
    /// `progress` items. While it sleeps, `cancel` for `key` is served and others are `busy`.
    /// With `stop` (a step's `errors = "stop"`), the first error record ends it with exit 1.
    #[allow(clippy::too_many_arguments)]
    fn run(
        &mut self,
        script: &str,
        env: &BTreeMap<String, String>,
        timeout: Duration,
        key: Option<&str>,
        stop: bool,
        running: &Value,
        emit: &mut dyn FnMut(&str, &str),
    ) -> Ending {
        let deadline = Instant::now() + timeout;
        for line in script.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if Instant::now() >= deadline {
                return Ending::TimedOut;
            }
            let (cmd, rest) = line.split_once(' ').unwrap_or((line, ""));
            match cmd {
                "out" => emit("stdout", &format!("{rest}\n")),
                "warn" => emit("stderr", &format!("WARNING: {rest}\n")),
                "err" if stop => {
                    return Ending::Exited(
                        1,
                        Some(
                            json!({"message": rest, "category": "NotSpecified", "fqid": "Microsoft.PowerShell.Commands.WriteErrorException"}),
                        ),
                    );
                }
                "err" => emit("error", &format!("{rest}\n")),
                "progress" => emit("progress", rest),
                "env" => emit(
                    "stdout",
                    &format!("{}\n", env.get(rest).map(String::as_str).unwrap_or("")),
                ),
                "append" => {
                    let (path, text) = rest.split_once(' ').unwrap_or((rest, ""));
                    let file = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(path);
                    match file.and_then(|mut f| writeln!(f, "{text}")) {
                        Ok(()) => {}
                        Err(e) => emit("error", &format!("append {path}: {e}\n")),
                    }
                }
                "sleep" => {
                    let ms = rest.parse::<u64>().unwrap_or(0);
                    let until = Instant::now() + Duration::from_millis(ms);
                    loop {
                        let now = Instant::now();
                        if now >= deadline {
                            return Ending::TimedOut;
                        }
                        if now >= until {
                            break;
                        }
                        let wait = until.min(deadline) - now;
                        let Some(other) = self.io.next(Some(wait)) else {
                            continue;
                        };
                        let oid = other["id"].clone();
                        if other["op"] == "cancel" {
                            let found = key.is_some() && other["key"].as_str() == key;
                            send(&json!({"id": oid, "type": "cancel", "found": found}));
                            if found {
                                return Ending::Cancelled;
                            }
                        } else {
                            send(
                                &json!({"id": oid, "type": "fail", "code": "busy", "message": format!("request {running} is still running")}),
                            );
                        }
                    }
                }
                "exit" => return Ending::Exited(rest.parse().unwrap_or(1), None),
                "throw" => {
                    let (category, message) =
                        rest.split_once(' ').unwrap_or(("NotSpecified", rest));
                    return Ending::Exited(
                        1,
                        Some(json!({"message": message, "category": category, "fqid": message})),
                    );
                }
                other if stop => {
                    return Ending::Exited(
                        1,
                        Some(
                            json!({"message": format!("The term '{other}' is not recognized as a name of a cmdlet, function, script file, or executable program."), "category": "ObjectNotFound", "fqid": "CommandNotFoundException"}),
                        ),
                    );
                }
                other => emit(
                    "error",
                    &format!(
                        "The term '{other}' is not recognized as a name of a cmdlet, function, script file, or executable program.\n"
                    ),
                ),
            }
        }
        Ending::Exited(0, None)
    }
}

enum Ending {
    Exited(i32, Option<Value>),
    TimedOut,
    Cancelled,
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let args = parse_args(&argv);
    let faults = Faults {
        path: args.state_dir.as_ref().map(|d| d.join("standin-faults")),
    };
    let mut host = Host {
        args,
        faults,
        io: Io::start(),
        instance: format!("standin-{}-{}", std::process::id(), now_ms()),
        served: 0,
    };
    host.record_launch(&argv);
    host.hello();
    host.serve()
}
