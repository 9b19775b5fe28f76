//! The pure safety core (SPEC §3), the `tollgate-core` crate: no I/O, no clock reads, no
//! randomness, no actors. It depends on no async runtime, network or file API, so the
//! compiler, not habit, keeps it so.
//!
//! Time comes in as unix milliseconds, nonces and seeds are passed in, and every function is
//! plain data in, plain data out, so every rule can be tested exhaustively.
//!
//! | module | what it does |
//! |---|---|
//! | [`config`] | the three config files parsed and validated (text in, typed config out; reading them is the caller's) |
//! | [`lifecycle`] | host states and the explicit transition table |
//! | [`facts`] | probe answers, fingerprints, probe failure classification |
//! | [`policy`] | the rule table and [`policy::evaluate`]; effective mode; policy hash |
//! | [`plan`] | draft -> sealed plan (phases, barriers, operation hash, idempotency keys) |
//! | [`token`] | Ed25519 confirmation tokens: issue and verify |
//! | [`approval`] | collecting one or two distinct approvals |
//! | [`closed`] | runs that are over: judging late tokens, closing runs left open by a restart |
//! | [`barrier`] | containment + fresh matching re-probe + policy before a destructive phase |
//! | [`run`] | [`run::RunMachine`]: one run as a sans-IO state machine |
//! | [`outcome`] | typed outcomes and their wire form |
//! | [`timeline`] | timeline events (decision, rule, inputs) |
//! | [`ledger`] | the run ledger: every run id's life across processes, admission, restart |
//! | [`leases`] | host leases: at most one open run per host |
//! | [`rules`] | every rule id with its sentence |
//! | [`commands`] | the exact CLI commands the core tells operators to run |
//! | [`canon`] | the canonical encoding behind every hash and signature |

pub mod approval;
pub mod authz;
pub mod barrier;
pub mod canon;
pub mod closed;
pub mod commands;
pub mod config;
pub mod facts;
pub mod leases;
pub mod ledger;
pub mod lifecycle;
pub mod outcome;
pub mod plan;
pub mod policy;
pub mod rules;
pub mod run;
pub mod timeline;
pub mod token;
