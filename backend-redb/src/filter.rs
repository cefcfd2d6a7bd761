//! Which keys redb may hold: Bloom filters over every key written into
//! the store's table, so that a read of a key never stored skips redb's
//! B-tree descent (on a state spread over many keys, first writes are a
//! large share of reads, and each descent costs several page lookups).
//!
//! The filters only ever answer "maybe" for a key in the table: every
//! key is added before the transaction that writes it commits, and a
//! deleted key stays in them (a false positive, which costs the lookup
//! the filter would have saved, never a wrong answer). They grow as a
//! stack: when the newest holds as many keys as it was sized for, a new
//! one twice its size takes the next keys, so the false-positive rate
//! stays near 1 % (10 bits per key) without knowing the state's size
//! ahead, at 1.25 to 2.5 bytes per stored key.
//!
//! Each filter is a split block Bloom filter (Parquet's, `sbbf-rs-safe`):
//! a key's 8 bits all lie in one 32-byte block, so adding or looking up a
//! key costs one cache miss, where a classic filter's 5 hashes cost 5
//! (25 M keys: 43 against 81 ns a key added; 1.26 % false positives
//! against 0.95 % at the same size).

use sbbf_rs_safe::Filter;
use std::hash::Hasher;

/// Bits per key each filter is sized for (about 1.3 % false positives).
const BITS_PER_KEY: usize = 10;
/// Keys the first filter is sized for (1.25 MB).
const FIRST: usize = 1 << 20;

/// A stack of Bloom filters over the keys written into a table.
pub(crate) struct KeyFilter {
    /// Oldest first; the last takes new keys.
    filters: Vec<Filter>,
    /// Keys added to the last filter.
    in_last: usize,
    /// Keys the last filter is sized for.
    capacity: usize,
}

impl KeyFilter {
    /// An empty filter (nothing is in the table).
    pub fn new() -> Self {
        KeyFilter {
            filters: vec![filter(FIRST)],
            in_last: 0,
            capacity: FIRST,
        }
    }

    /// One hash for every filter: Fx over the bytes (fast on short keys),
    /// then MurmurHash3's finalizer, so that a filter's choice of block
    /// (the high bits) and of bits in it (the low bits) sees well-mixed
    /// bits (SipHash cost a restore ~20 ns more per key).
    fn hash(key: &[u8]) -> u64 {
        let mut h = rustc_hash::FxHasher::default();
        h.write(key);
        let mut x = h.finish();
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        x ^ (x >> 33)
    }

    /// Whether `key` may be in the table (false: it is not).
    #[inline]
    pub fn may_contain(&self, key: &[u8]) -> bool {
        let h = Self::hash(key);
        self.filters.iter().rev().any(|f| f.contains_hash(h))
    }

    /// Records that `key`, not in the table, is (about to be) written into
    /// it. (A key already in the table needs no record: the store learns
    /// which keys are new from redb's insert, so the filters cost nothing
    /// on a flush of keys already stored.)
    #[inline]
    pub fn add_new(&mut self, key: &[u8]) {
        let h = Self::hash(key);
        if self.in_last >= self.capacity {
            self.capacity = self.capacity.saturating_mul(2);
            self.filters.push(filter(self.capacity));
            self.in_last = 0;
        }
        if let Some(last) = self.filters.last_mut() {
            // A key that collides with one already in (a false positive)
            // takes no capacity.
            if !last.insert_hash(h) {
                self.in_last += 1;
            }
        }
    }
}

fn filter(keys: usize) -> Filter {
    Filter::new(BITS_PER_KEY, keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_added_key_may_be_contained_across_growth() {
        let mut f = KeyFilter::new();
        let n = FIRST * 3 + 17;
        for i in 0..n as u64 {
            f.add_new(&i.to_be_bytes());
        }
        assert!(f.filters.len() >= 2, "the stack grew: {}", f.filters.len());
        for i in 0..n as u64 {
            assert!(f.may_contain(&i.to_be_bytes()), "key {i} added, not found");
        }
        // Keys never added are mostly reported absent (about 1 % per
        // filter may be false positives).
        let absent = (n as u64..n as u64 + 100_000)
            .filter(|i| !f.may_contain(&i.to_be_bytes()))
            .count();
        assert!(absent > 95_000, "only {absent} of 100000 absent keys rejected");
    }

    #[test]
    fn the_stack_grows_by_distinct_keys() {
        let mut f = KeyFilter::new();
        for i in 0..1000u64 {
            f.add_new(&i.to_be_bytes());
        }
        assert!(f.in_last <= 1000, "{} keys counted for 1000 distinct", f.in_last);
        assert!(f.in_last >= 980, "{} keys counted for 1000 distinct", f.in_last);
        assert_eq!(f.filters.len(), 1);
        // A second filter once the first holds its capacity of distinct
        // keys (false positives among them take none).
        let grew = (1000..2 * FIRST as u64)
            .find(|i| {
                f.add_new(&i.to_be_bytes());
                f.filters.len() == 2
            })
            .expect("the stack grew");
        assert!(grew as usize > FIRST, "grew after {grew} keys");
        assert_eq!(f.capacity, 2 * FIRST);
    }
}
