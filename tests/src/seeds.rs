//! Seeds and randomized timing: every random choice of a fault or abuse scenario comes from a
//! printed seed, and `TOLLGATE_FAULT_SEED` replays it.

use std::time::Duration;

/// SplitMix64: small, fast, and the same sequence for the same seed on every machine.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Uniform in `lo..=hi` milliseconds.
    pub fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi.saturating_sub(lo) + 1))
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        let i = usize::try_from(self.below(items.len() as u64)).unwrap_or(0);
        &items[i.min(items.len().saturating_sub(1))]
    }

    /// A seed for one repetition, derived so repetitions do not share a sequence.
    pub fn fork(&mut self) -> u64 {
        self.next_u64()
    }
}

/// The seed of a scenario: `TOLLGATE_FAULT_SEED` if set, else fresh. Printed either way, with the
/// command that replays it.
pub fn scenario_seed(scenario: &str) -> u64 {
    seed_for("--test faults_netns --test faults_abuse", scenario)
}

/// The seed of `scenario` in the test binaries `tests` (as cargo names them, e.g. `--test
/// ledger_seams`): `TOLLGATE_FAULT_SEED` if set, else fresh. Printed either way, with the
/// command that replays it.
pub fn seed_for(tests: &str, scenario: &str) -> u64 {
    let seed = std::env::var("TOLLGATE_FAULT_SEED")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or_else(|| {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            Rng::new(t ^ u64::from(std::process::id()).rotate_left(32)).next_u64()
        });
    eprintln!(
        "fault seed = {seed} (scenario {scenario}; replay with TOLLGATE_FAULT_SEED={seed} cargo test -p tollgate-tests {tests} {scenario})"
    );
    seed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_replays_from_its_seed() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        let xs: Vec<u64> = (0..5).map(|_| a.below(1000)).collect();
        let ys: Vec<u64> = (0..5).map(|_| b.below(1000)).collect();
        assert_eq!(xs, ys);
        assert!(Rng::new(1).millis(10, 20) >= Duration::from_millis(10));
    }
}
