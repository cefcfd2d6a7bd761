//! Key groups: the unit in which keyed state is partitioned and rescaled.
//!
//! Every job has a `max_parallelism` (default [`DEFAULT_MAX_PARALLELISM`]).
//! A key's group is `xxh3_64(key bytes, seed 0) % max_parallelism`, where the
//! key bytes are the key's postcard encoding. XXH3 is specified and stable
//! across processes, builds, platforms and versions, so state persisted by key
//! group is found again after a restart or an upgrade. Subtask `i` of `p`
//! owns a contiguous range of key groups, assigned as in Apache Flink.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The default maximum parallelism (Flink's default for small jobs).
pub const DEFAULT_MAX_PARALLELISM: u32 = 128;

/// The largest supported maximum parallelism (Flink's limit).
pub const UPPER_MAX_PARALLELISM: u32 = 32_768;

/// Hashes key bytes with the stable, documented key hash (XXH3-64, seed 0).
#[inline]
pub fn stable_key_hash(key: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(key)
}

/// The key group of a key (given as its bytes).
#[inline]
pub fn key_group_for_key(key: &[u8], max_parallelism: u32) -> u32 {
    key_group_for_hash(stable_key_hash(key), max_parallelism)
}

/// The key group of a key's [`stable_key_hash`]: `hash % max_parallelism`
/// (a mask when the max parallelism is a power of two, as the default is:
/// no division per record). `max_parallelism` 0 is treated as 1.
///
/// ```
/// use sluice_core::keygroup::key_group_for_hash;
/// assert_eq!(key_group_for_hash(1000, 128), 1000 % 128);
/// assert_eq!(key_group_for_hash(1000, 100), 1000 % 100);
/// ```
#[inline]
pub fn key_group_for_hash(hash: u64, max_parallelism: u32) -> u32 {
    let m = u64::from(max_parallelism.max(1));
    if m.is_power_of_two() {
        (hash & (m - 1)) as u32
    } else {
        (hash % m) as u32
    }
}

/// The subtask index that owns `key_group` when the operator runs with
/// `parallelism` subtasks (Flink: `key_group * parallelism / max_parallelism`).
#[inline]
pub fn operator_index_for_key_group(max_parallelism: u32, parallelism: u32, key_group: u32) -> u32 {
    (u64::from(key_group) * u64::from(parallelism) / u64::from(max_parallelism)) as u32
}

/// Checks that a parallelism fits under a max parallelism.
pub fn check_parallelism(max_parallelism: u32, parallelism: u32) -> crate::Result<()> {
    if max_parallelism == 0 || max_parallelism > UPPER_MAX_PARALLELISM {
        return Err(crate::Error::InvalidArgument {
            what: format!("max parallelism {max_parallelism}"),
            reason: format!("must be between 1 and {UPPER_MAX_PARALLELISM}"),
        });
    }
    if parallelism == 0 || parallelism > max_parallelism {
        return Err(crate::Error::InvalidArgument {
            what: format!("parallelism {parallelism}"),
            reason: format!("must be between 1 and the max parallelism {max_parallelism}"),
        });
    }
    Ok(())
}

/// An inclusive, non-empty range of key groups `[start, end]`. Deserializing
/// an inverted range (`start > end`) fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "RawKeyGroupRange")]
pub struct KeyGroupRange {
    /// First key group of the range.
    pub start: u32,
    /// Last key group of the range (inclusive).
    pub end: u32,
}

/// The serialized shape of a [`KeyGroupRange`], checked on the way in.
#[derive(Deserialize)]
struct RawKeyGroupRange {
    start: u32,
    end: u32,
}

impl TryFrom<RawKeyGroupRange> for KeyGroupRange {
    type Error = String;

    fn try_from(r: RawKeyGroupRange) -> std::result::Result<Self, String> {
        KeyGroupRange::new(r.start, r.end).map_err(|e| e.to_string())
    }
}

impl KeyGroupRange {
    /// Creates `[start, end]`; `start <= end` is required.
    pub fn new(start: u32, end: u32) -> crate::Result<Self> {
        if start > end {
            return Err(crate::Error::InvalidArgument {
                what: format!("key group range [{start}, {end}]"),
                reason: "start must not exceed end".into(),
            });
        }
        Ok(KeyGroupRange { start, end })
    }

    /// All key groups of a job with this max parallelism.
    pub fn all(max_parallelism: u32) -> Self {
        KeyGroupRange {
            start: 0,
            end: max_parallelism.saturating_sub(1),
        }
    }

    /// The range owned by subtask `index` of `parallelism` (Flink's
    /// `computeKeyGroupRangeForOperatorIndex`). Callers check the arguments
    /// with [`check_parallelism`]; `index < parallelism <= max_parallelism`.
    pub fn for_subtask(max_parallelism: u32, parallelism: u32, index: u32) -> Self {
        let (m, p, i) = (
            u64::from(max_parallelism),
            u64::from(parallelism),
            u64::from(index),
        );
        let start = (i * m).div_ceil(p);
        let end = ((i + 1) * m - 1) / p;
        KeyGroupRange {
            start: start as u32,
            end: end as u32,
        }
    }

    /// Whether `key_group` lies in the range.
    #[inline]
    pub fn contains(&self, key_group: u32) -> bool {
        key_group >= self.start && key_group <= self.end
    }

    /// Number of key groups in the range.
    pub fn len(&self) -> usize {
        (self.end - self.start) as usize + 1
    }

    /// Always false: a range holds at least one key group.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The key groups in order.
    pub fn iter(&self) -> impl Iterator<Item = u32> {
        self.start..=self.end
    }

    /// The overlap of two ranges, if any.
    pub fn intersect(&self, other: &KeyGroupRange) -> Option<KeyGroupRange> {
        let start = self.start.max(other.start);
        let end = self.end.min(other.end);
        (start <= end).then_some(KeyGroupRange { start, end })
    }
}

impl fmt::Display for KeyGroupRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}, {}]", self.start, self.end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subtask_ranges_partition_all_key_groups_and_match_the_owner_function() {
        for max in [1u32, 7, 128, 1000] {
            for p in 1..=max.min(40) {
                let mut next = 0;
                for i in 0..p {
                    let r = KeyGroupRange::for_subtask(max, p, i);
                    assert_eq!(r.start, next, "max {max} p {p} i {i}");
                    for g in r.iter() {
                        assert_eq!(operator_index_for_key_group(max, p, g), i);
                    }
                    next = r.end + 1;
                }
                assert_eq!(next, max);
            }
        }
    }

    #[test]
    fn key_hash_is_the_documented_xxh3_and_stable() {
        // Fixed values: if these change, persisted state can no longer be found.
        assert_eq!(stable_key_hash(b""), 0x2d06800538d394c2);
        assert_eq!(key_group_for_key(b"", 128), (0x2d06800538d394c2u64 % 128) as u32);
    }

    #[test]
    fn bad_parallelism_is_refused() {
        assert!(check_parallelism(128, 0).is_err());
        assert!(check_parallelism(128, 129).is_err());
        assert!(check_parallelism(0, 1).is_err());
        assert!(check_parallelism(128, 128).is_ok());
    }
}
