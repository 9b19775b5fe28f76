//! What a run is made from: its specification and the knobs it takes from the configuration.

use crate::config::{Authorization, CoordinatorConfig, Inventory, Operations, RetryPolicy};
use crate::plan::Intent;
use crate::policy::PolicyConfig;

/// The knobs a run needs, taken from `coordinator.toml` and the token key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSettings {
    /// Policy configuration (token classes, freshness window).
    pub policy: PolicyConfig,
    /// Retry backoff.
    pub retry: RetryPolicy,
    /// Hosts working at once within a phase (at least 1).
    pub max_parallel_hosts: usize,
    /// Time limit per probe.
    pub probe_timeout_ms: u64,
    /// Authorization table (approver roles are checked against it).
    pub authorization: Authorization,
    /// The coordinator's Ed25519 public key (tokens are verified with it).
    pub token_public_key: Vec<u8>,
    /// Seed for retry jitter.
    pub jitter_seed: u64,
}

impl RunSettings {
    /// Settings from the coordinator configuration.
    pub fn from_config(
        config: &CoordinatorConfig,
        token_public_key: Vec<u8>,
        jitter_seed: u64,
    ) -> Self {
        RunSettings {
            policy: PolicyConfig::from_config(config),
            retry: config.retry,
            max_parallel_hosts: config.concurrency.per_phase as usize,
            probe_timeout_ms: config.probe.timeout_ms,
            authorization: config.authorization.clone(),
            token_public_key,
            jitter_seed,
        }
    }
}

/// Everything a run is made from.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// What was asked.
    pub intent: Intent,
    /// Who asked (certificate identity).
    pub requestor: String,
    /// The inventory at submission.
    pub inventory: Inventory,
    /// The operations at submission.
    pub operations: Operations,
    /// Settings.
    pub settings: RunSettings,
}
