//! An inventory `transport.agent` entry read into a [`Reach`]: its address resolved now, its
//! identity parsed and required to be in the coordinator's fleet.

use std::net::ToSocketAddrs;

use tollgate_certs::SpiffeId;

use crate::config::{AgentTransport, ConfigError};
use crate::transport::{Reach, ReachContext};

/// How the agent of entry `a` is reached.
pub fn reach(a: &AgentTransport, at: &ReachContext<'_>) -> Result<Reach, ConfigError> {
    let bad = |key: &str, reason: String| at.invalid(&format!("agent.{key}"), reason);
    let addr = a
        .address
        .to_socket_addrs()
        .map_err(|e| bad("address", format!("{:?} does not resolve: {e}", a.address)))?
        .next()
        .ok_or_else(|| bad("address", format!("{:?} resolves to nothing", a.address)))?;
    let id: SpiffeId = a
        .identity
        .parse()
        .map_err(|e| bad("identity", format!("{e}")))?;
    if id.fleet() != at.fleet {
        return Err(bad(
            "identity",
            format!("{id} is not in this coordinator's fleet {}", at.fleet),
        ));
    }
    Ok(Reach::Agent { addr, id })
}
