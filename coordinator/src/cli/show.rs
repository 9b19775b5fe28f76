//! How an answer is printed, and the exit status it gives. Every answer becomes one [`Shown`],
//! which holds both its forms; [`Shown::print`] is the one place that picks `--json` or the
//! human text.

use serde::Serialize;
use tollgate_coordinator::{exit, render};
use tollgate_protocol::ctl::CtlResponse;

/// Where the human form of an answer goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// One answer in both its forms, and its exit status.
#[derive(Debug)]
pub struct Shown {
    /// The answer as pretty JSON for `--json` (stdout), or why it cannot be encoded; `None`
    /// when the answer has no JSON form and its human text is printed either way.
    json: Option<serde_json::Result<String>>,
    /// The text for people, every line ending in `\n`.
    human: String,
    to: Stream,
    status: u8,
}

impl Shown {
    /// `value` as JSON, or `human` on stdout.
    fn answer<T: Serialize + ?Sized>(value: &T, human: String, status: u8) -> Self {
        Shown {
            json: Some(serde_json::to_string_pretty(value)),
            human,
            to: Stream::Stdout,
            status,
        }
    }

    /// The same text with or without `--json`.
    fn text(human: String, to: Stream, status: u8) -> Self {
        Shown {
            json: None,
            human,
            to,
            status,
        }
    }

    /// Sends the human text to stderr instead.
    fn on_stderr(self) -> Self {
        Shown {
            to: Stream::Stderr,
            ..self
        }
    }

    /// Prints the answer, as JSON if `json`; returns its exit status.
    pub fn print(self, json: bool) -> u8 {
        match self.json.filter(|_| json) {
            Some(Ok(doc)) => println!("{doc}"),
            Some(Err(e)) => eprintln!("tollgate: cannot encode the answer: {e}"),
            None => match self.to {
                Stream::Stdout => print!("{}", self.human),
                Stream::Stderr => eprint!("{}", self.human),
            },
        }
        self.status
    }
}

impl From<CtlResponse> for Shown {
    fn from(resp: CtlResponse) -> Shown {
        match resp {
            CtlResponse::Run(r) => {
                Shown::answer(&r, render::report(&r), exit::for_outcome(r.outcome.kind()))
            }
            CtlResponse::Plan(p) => Shown::answer(&p, render::plan(&p), exit::OK),
            CtlResponse::Approved(a) => Shown::answer(&a, render::approval(&a), exit::OK),
            CtlResponse::ApprovalRecorded {
                run_id,
                approvers,
                required,
            } => {
                let value = serde_json::json!({"run_id": run_id, "approvers": approvers, "required": required});
                let human = format!(
                    "approval recorded for run {run_id} ({} of {required}: {}); another approver must run the same `tollgate approve` command\n",
                    approvers.len(),
                    approvers.join(", ")
                );
                Shown::answer(&value, human, exit::APPROVAL_PENDING)
            }
            CtlResponse::Status { hosts } => {
                Shown::answer(&hosts, render::status(&hosts), exit::OK)
            }
            CtlResponse::Runs { runs } => Shown::answer(&runs, render::runs(&runs), exit::OK),
            // Already a JSON document (summary.json), printed as it is either way.
            CtlResponse::Summary { json: doc } => {
                Shown::text(format!("{doc}\n"), Stream::Stdout, exit::OK)
            }
            CtlResponse::Verified(v) => Shown::answer(
                &v,
                render::verify(&v),
                if v.ok { exit::OK } else { exit::TAMPERED },
            ),
            CtlResponse::Diff(d) => {
                let status = match (&d.problem, d.parity) {
                    (Some(_), _) => exit::TAMPERED,
                    (None, true) => exit::OK,
                    (None, false) => exit::DIFFERENT,
                };
                Shown::answer(&d, render::diff(&d), status)
            }
            CtlResponse::Explanation { lines } => {
                let human = lines.iter().map(|l| format!("{l}\n")).collect();
                Shown::answer(&lines, human, exit::OK)
            }
            CtlResponse::Error(e) => Shown::answer(
                &e,
                format!("tollgate: refused ({:?}): {}\n", e.code, e.message),
                exit::for_error(e.code),
            )
            .on_stderr(),
            CtlResponse::HelloAck(_) | CtlResponse::Progress(_) => Shown::text(
                "tollgate: unexpected answer\n".to_string(),
                Stream::Stderr,
                exit::REFUSED,
            ),
        }
    }
}

/// Prints an answer; returns the exit status.
pub fn show(resp: CtlResponse, json: bool) -> u8 {
    Shown::from(resp).print(json)
}

#[cfg(test)]
mod tests {
    use tollgate_protocol::ctl::{
        CtlError, CtlErrorCode, DiffReport, ProgressEvent, ProgressKind, VerifyReport,
    };
    use uuid::Uuid;

    use super::*;

    fn run_id() -> Uuid {
        Uuid::from_u128(1)
    }

    #[test]
    fn json_keeps_the_field_order_of_the_answer() {
        let shown = Shown::from(CtlResponse::Verified(VerifyReport {
            run_id: run_id(),
            ok: false,
            events: 3,
            first_bad_line: Some(2),
            problem: Some("bad link".into()),
        }));
        let json = shown.json.as_ref().unwrap().as_ref().unwrap();
        assert_eq!(
            json,
            "{\n  \"run_id\": \"00000000-0000-0000-0000-000000000001\",\n  \"ok\": false,\n  \"events\": 3,\n  \"first_bad_line\": 2,\n  \"problem\": \"bad link\"\n}"
        );
        assert_eq!(
            shown.human,
            "run 00000000-0000-0000-0000-000000000001: TAMPERED or damaged at line 2: bad link\n"
        );
        assert_eq!((shown.to, shown.status), (Stream::Stdout, exit::TAMPERED));
    }

    #[test]
    fn approval_recorded_says_who_is_missing() {
        let shown = Shown::from(CtlResponse::ApprovalRecorded {
            run_id: run_id(),
            approvers: vec!["alice".into()],
            required: 2,
        });
        assert_eq!(
            shown.human,
            "approval recorded for run 00000000-0000-0000-0000-000000000001 (1 of 2: alice); another approver must run the same `tollgate approve` command\n"
        );
        let value: serde_json::Value =
            serde_json::from_str(shown.json.as_ref().unwrap().as_ref().unwrap()).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"run_id": run_id(), "approvers": ["alice"], "required": 2})
        );
        assert_eq!(shown.status, exit::APPROVAL_PENDING);
    }

    #[test]
    fn explanation_is_one_line_each() {
        let shown = Shown::from(CtlResponse::Explanation {
            lines: vec!["a".into(), "b".into()],
        });
        assert_eq!(shown.human, "a\nb\n");
        assert_eq!(
            shown.json.as_ref().unwrap().as_ref().unwrap(),
            "[\n  \"a\",\n  \"b\"\n]"
        );
        assert_eq!(shown.status, exit::OK);
    }

    #[test]
    fn a_summary_is_printed_as_it_is_either_way() {
        let shown = Shown::from(CtlResponse::Summary {
            json: "{\"x\":1}".into(),
        });
        assert!(shown.json.is_none());
        assert_eq!(shown.human, "{\"x\":1}\n");
        assert_eq!((shown.to, shown.status), (Stream::Stdout, exit::OK));
    }

    #[test]
    fn a_refusal_goes_to_stderr_unless_json() {
        let shown = Shown::from(CtlResponse::Error(CtlError {
            code: CtlErrorCode::NotAuthorized,
            message: "no".into(),
        }));
        assert_eq!(shown.human, "tollgate: refused (NotAuthorized): no\n");
        assert!(shown.json.as_ref().unwrap().is_ok());
        assert_eq!((shown.to, shown.status), (Stream::Stderr, exit::REFUSED));
        let missing = Shown::from(CtlResponse::Error(CtlError {
            code: CtlErrorCode::RunMissing,
            message: "gone".into(),
        }));
        assert_eq!(missing.status, exit::TAMPERED);
    }

    #[test]
    fn diff_status_is_parity_difference_or_damage() {
        let diff = |parity, problem: Option<&str>| {
            Shown::from(CtlResponse::Diff(DiffReport {
                a: run_id(),
                b: Uuid::from_u128(2),
                parity,
                decisions_a: 1,
                decisions_b: 1,
                differences: Vec::new(),
                problem: problem.map(String::from),
            }))
            .status
        };
        assert_eq!(diff(true, None), exit::OK);
        assert_eq!(diff(false, None), exit::DIFFERENT);
        assert_eq!(diff(false, Some("torn")), exit::TAMPERED);
    }

    #[test]
    fn a_stray_progress_event_is_unexpected() {
        let shown = Shown::from(CtlResponse::Progress(ProgressEvent {
            run_id: run_id(),
            kind: ProgressKind::RunAccepted,
            host: None,
            phase: None,
            step: None,
            ok: None,
            done: 0,
            total: 0,
            message: String::new(),
        }));
        assert!(shown.json.is_none());
        assert_eq!(shown.human, "tollgate: unexpected answer\n");
        assert_eq!((shown.to, shown.status), (Stream::Stderr, exit::REFUSED));
    }
}
