//! Exponential backoff with deterministic jitter.
//!
//! `delay(n) = min(max, base * 2^(n-1))` for the n-th retry, then "equal jitter": half of it
//! fixed, the other half scaled by a pseudo-random number derived from a seed passed in and the
//! (host, step, n) being retried (SplitMix64 over an FNV-1a hash). Same inputs, same delay.

use crate::config::RetryPolicy;

/// The delay before retry number `retry` (from 1) of whatever `salt` names.
pub fn backoff_ms(policy: &RetryPolicy, retry: u32, seed: u64, salt: &str) -> u64 {
    let shift = retry.saturating_sub(1).min(32);
    let exp = policy
        .base_backoff_ms
        .saturating_mul(1u64 << shift)
        .min(policy.max_backoff_ms)
        .max(1);
    let half = exp / 2;
    let spread = exp - half;
    half + splitmix64(seed ^ fnv1a(salt) ^ u64::from(retry)) % (spread + 1)
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_caps_and_is_deterministic() {
        let p = RetryPolicy {
            max_attempts: 5,
            base_backoff_ms: 100,
            max_backoff_ms: 1_000,
        };
        for retry in 1..=10 {
            let exp = (100u64 << (retry - 1)).min(1_000);
            let d = backoff_ms(&p, retry, 42, "web1/step");
            assert!(
                d >= exp / 2 && d <= exp,
                "retry {retry}: {d} not in [{}, {exp}]",
                exp / 2
            );
            assert_eq!(d, backoff_ms(&p, retry, 42, "web1/step"));
        }
        let spread: std::collections::BTreeSet<u64> =
            (0..50).map(|seed| backoff_ms(&p, 3, seed, "x")).collect();
        assert!(spread.len() > 10, "jitter must vary with the seed");
    }
}
