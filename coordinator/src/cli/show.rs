//! How an answer is printed, and the exit status it gives.

use tollgate_coordinator::{exit, render};
use tollgate_protocol::ctl::CtlResponse;

fn emit_json<T: serde::Serialize>(v: &T) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("tollgate: cannot encode the answer: {e}"),
    }
}

/// Prints an answer; returns the exit status.
pub fn show(resp: CtlResponse, json: bool) -> u8 {
    match resp {
        CtlResponse::Run(r) => {
            if json {
                emit_json(&r)
            } else {
                print!("{}", render::report(&r))
            }
            exit::for_outcome(r.outcome.kind())
        }
        CtlResponse::Plan(p) => {
            if json {
                emit_json(&p)
            } else {
                print!("{}", render::plan(&p))
            }
            0
        }
        CtlResponse::Approved(a) => {
            if json {
                emit_json(&a)
            } else {
                print!("{}", render::approval(&a))
            }
            0
        }
        CtlResponse::ApprovalRecorded {
            run_id,
            approvers,
            required,
        } => {
            if json {
                emit_json(
                    &serde_json::json!({"run_id": run_id, "approvers": approvers, "required": required}),
                );
            } else {
                println!(
                    "approval recorded for run {run_id} ({} of {required}: {}); another approver must run the same `tollgate approve` command",
                    approvers.len(),
                    approvers.join(", ")
                );
            }
            exit::APPROVAL_PENDING
        }
        CtlResponse::Status { hosts } => {
            if json {
                emit_json(&hosts)
            } else {
                print!("{}", render::status(&hosts))
            }
            0
        }
        CtlResponse::Runs { runs } => {
            if json {
                emit_json(&runs)
            } else {
                print!("{}", render::runs(&runs))
            }
            0
        }
        CtlResponse::Summary { json: doc } => {
            println!("{doc}");
            0
        }
        CtlResponse::Verified(v) => {
            if json {
                emit_json(&v)
            } else {
                print!("{}", render::verify(&v))
            }
            if v.ok { exit::OK } else { exit::TAMPERED }
        }
        CtlResponse::Diff(d) => {
            if json {
                emit_json(&d)
            } else {
                print!("{}", render::diff(&d))
            }
            match (&d.problem, d.parity) {
                (Some(_), _) => exit::TAMPERED,
                (None, true) => 0,
                (None, false) => exit::DIFFERENT,
            }
        }
        CtlResponse::Explanation { lines } => {
            if json {
                emit_json(&lines)
            } else {
                for l in lines {
                    println!("{l}");
                }
            }
            0
        }
        CtlResponse::Error(e) => {
            if json {
                emit_json(&e)
            } else {
                eprintln!("tollgate: refused ({:?}): {}", e.code, e.message);
            }
            exit::for_error(e.code)
        }
        CtlResponse::HelloAck(_) | CtlResponse::Progress(_) => {
            eprintln!("tollgate: unexpected answer");
            exit::REFUSED
        }
    }
}
