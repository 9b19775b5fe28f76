//! Transports: how the coordinator reaches a host. Each one carries requests and answers; none
//! of them decides anything.

pub mod agent;
pub mod pwsh;
