//! A namespace fleet for fault injection: every agent in its own network namespace, the
//! coordinator (and the CLI) in another, all joined by veth pairs to a bridge that lives in a
//! namespace of its own. Addresses are `198.18.0.0/24`, inside the `198.18.0.0/15` range set aside
//! for benchmark and test networks (RFC 2544); each fabric has private namespaces, so fabrics
//! running side by side never see each other.
//!
//! ```text
//!   PREFIX-co (coordinator, CLI)        PREFIX-h0 (web1)   PREFIX-h1 (web2)   PREFIX-h2 (db1)
//!   eth0 198.18.0.1                     eth0 .10           eth0 .11           eth0 .12
//!        │                                   │                  │                  │
//!   ─────┴── vc ─────────── br0 (PREFIX-br) ─┴── v0 ────────────┴── v1 ────────────┴── v2
//! ```
//!
//! Faults, per link: **cut** puts the bridge-side veth down (the peer loses carrier: a clean
//! partition, nothing is delivered either way), **heal** brings it back. **Delay** adds
//! `tc netem delay` on the bridge-side veth (traffic towards the host); kernels built without
//! `sch_netem` (the CI VM's is one) get the same delay from a userspace UDP relay in the
//! coordinator's namespace that the inventory dials for that host ([`Relay`]). Every process can be
//! SIGKILLed and restarted; [`NetLab::crash_host`] kills everything in a host's namespace (the
//! agent and the scripts it runs), like a power cut.
//!
//! Making namespaces needs root (`CAP_SYS_ADMIN` and `CAP_NET_ADMIN`) and `ip` (iproute2). When
//! they cannot be made, [`Fabric::new`] fails with a message that says so: the suite fails loudly
//! rather than passing empty. `TOLLGATE_SKIP_NETNS=1` ([`skip_requested`]) is the one explicit way
//! to skip the namespace scenarios on a developer machine without root.
//!
//! Namespaces are named `tgf<pid>n<counter>-*`; [`Fabric`]'s `Drop` kills what runs inside them and
//! deletes them, and every new fabric first sweeps away those left by test processes that died.
#![cfg(target_os = "linux")]

mod fabric;
mod lab;
mod process;
mod relay;

pub use fabric::{AGENT_PORT, COORDINATOR_IP, COORDINATOR_PORT, Fabric, Member, skip_requested};
pub use lab::{NetLab, NetLabOptions, quiesce};
pub use process::{NetAgent, NetServe};
pub use relay::{Relay, RelayMode, UdpBinder};
