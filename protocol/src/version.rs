//! Protocol version negotiation. Pure functions; the first exchange on every connection
//! (`Hello` / `HelloAck`) calls [`negotiate`].

use serde::{Deserialize, Serialize};

use crate::FrameError;

/// The version this build writes. 2: `ExecuteRequest` carries `errors` (a step's error
/// semantics); a version-1 agent would ignore it, so version 1 is no longer spoken.
pub const PROTOCOL_VERSION: u16 = 2;

/// The versions this build can read and write.
pub const SUPPORTED: VersionRange = VersionRange { min: 2, max: 2 };

/// An inclusive range of protocol versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRange {
    pub min: u16,
    pub max: u16,
}

impl VersionRange {
    pub fn contains(&self, v: u16) -> bool {
        self.min <= v && v <= self.max
    }
}

/// Picks the highest version both sides speak, or says why there is none.
pub fn negotiate(ours: VersionRange, theirs: VersionRange) -> Result<u16, FrameError> {
    let lo = ours.min.max(theirs.min);
    let hi = ours.max.min(theirs.max);
    if theirs.min > theirs.max || lo > hi {
        return Err(FrameError::NoCommonVersion {
            ours_min: ours.min,
            ours_max: ours.max,
            theirs_min: theirs.min,
            theirs_max: theirs.max,
        });
    }
    Ok(hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(min: u16, max: u16) -> VersionRange {
        VersionRange { min, max }
    }

    #[test]
    fn picks_highest_common_version() {
        assert_eq!(negotiate(r(1, 3), r(2, 5)).unwrap(), 3);
        assert_eq!(negotiate(r(1, 1), r(1, 1)).unwrap(), 1);
    }

    #[test]
    fn disjoint_or_inverted_ranges_fail_typed() {
        assert!(matches!(
            negotiate(r(1, 1), r(2, 3)),
            Err(FrameError::NoCommonVersion { .. })
        ));
        assert!(matches!(
            negotiate(r(1, 5), r(3, 2)),
            Err(FrameError::NoCommonVersion { .. })
        ));
    }
}
