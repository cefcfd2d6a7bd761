//! The redb store's write buffer: the entries written (and tombstones of
//! those deleted) since the last flush into redb, one copy-on-write map
//! per (state, key group), as the heap backend keeps its state.
//!
//! A snapshot's synchronous step clones the `Arc` of every map (cheap);
//! the first write into a key group while a snapshot still holds it copies
//! just that key group. So a read is one probe, not one per snapshot
//! still running, and the snapshot reads one map per key group.

use sluice_core::bytemap::ByteMap;
use sluice_core::{KeyGroupRange, StateId};
use std::sync::Arc;

/// Values up to 16 bytes are kept inline in the map.
type Bytes16 = smallvec::SmallVec<[u8; 16]>;

/// Heap bytes an entry costs beyond its key and value bytes (the hash
/// table's slot and control byte at its load factor, and the allocations
/// of keys and values too long to be inline): counted so that the
/// configured bound is the memory really used.
pub(crate) const ENTRY_OVERHEAD: usize = 96;

/// A buffered write: the value (`None`: deleted) and the epoch of change
/// tracking that wrote it.
#[derive(Clone, Default)]
pub(crate) struct Dirty {
    pub value: Option<Bytes16>,
    pub epoch: u64,
}

/// One (state, key group)'s buffered writes.
pub(crate) type Group = ByteMap<Dirty>;

/// Every state's key groups: `[state][key_group - range.start]`.
pub(crate) type Groups = Vec<Vec<Arc<Group>>>;

/// The write buffer of one store.
pub(crate) struct WriteBuffer {
    range: KeyGroupRange,
    states: Groups,
    /// Approximate heap bytes of the entries.
    bytes: usize,
    /// Entries held.
    len: usize,
}

impl WriteBuffer {
    /// An empty buffer for the key groups `range`.
    pub fn new(range: KeyGroupRange) -> Self {
        WriteBuffer {
            range,
            states: Vec::new(),
            bytes: 0,
            len: 0,
        }
    }

    fn empty_groups(&self) -> Vec<Arc<Group>> {
        (0..self.range.len())
            .map(|_| Arc::new(Group::default()))
            .collect()
    }

    /// Adds a state (the next state id).
    pub fn add_state(&mut self) {
        let groups = self.empty_groups();
        self.states.push(groups);
    }

    /// The buffered writes of a (checked) state and key group.
    #[inline]
    pub fn group(&self, state: StateId, key_group: u32) -> &Group {
        &self.states[state as usize][(key_group - self.range.start) as usize]
    }

    /// The buffered write of `key` (a checked state and key group).
    #[inline]
    pub fn get(&self, state: StateId, key_group: u32, key: &[u8]) -> Option<&Dirty> {
        self.group(state, key_group).get(key)
    }

    /// Buffers `value` (`None`: a deletion) of `key`, stamped with `epoch`;
    /// true if the key was not written in `epoch` before.
    #[inline]
    pub fn write(
        &mut self,
        state: StateId,
        key_group: u32,
        key: &[u8],
        value: Option<&[u8]>,
        epoch: u64,
    ) -> bool {
        let g = (key_group - self.range.start) as usize;
        let map = Arc::make_mut(&mut self.states[state as usize][g]);
        let mut added = false;
        let slot = map.get_or_insert_with(key, || {
            added = true;
            Dirty::default()
        });
        let old = heap_bytes(&slot.value);
        match (&mut slot.value, value) {
            // Reused in place, unless that would keep a much larger
            // allocation than the new value needs.
            (Some(old), Some(v)) if !old.spilled() || old.capacity() <= 2 * v.len() => {
                old.clear();
                old.extend_from_slice(v);
            }
            (slot, v) => *slot = v.map(Bytes16::from_slice),
        }
        let new = heap_bytes(&slot.value);
        if added {
            self.len += 1;
            self.bytes += key.len() + new + ENTRY_OVERHEAD;
        } else {
            self.bytes = (self.bytes + new).saturating_sub(old);
        }
        std::mem::replace(&mut slot.epoch, epoch) != epoch
    }

    /// The maps as they are now (shared: the snapshot's view).
    pub fn view(&self) -> Groups {
        self.states.clone()
    }

    /// Takes every entry out (for a flush into redb), leaving the buffer
    /// empty.
    pub fn take(&mut self) -> Groups {
        let empty = (0..self.states.len()).map(|_| self.empty_groups()).collect();
        self.bytes = 0;
        self.len = 0;
        std::mem::replace(&mut self.states, empty)
    }

    /// Approximate heap bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is buffered.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The bytes a value holds: its allocation's capacity when it is not
/// inline, so that the bound counts what the allocator really gave.
fn heap_bytes(value: &Option<Bytes16>) -> usize {
    value
        .as_ref()
        .map_or(0, |v| if v.spilled() { v.capacity() } else { v.len() })
}

/// The entries of `groups` (of the key groups `range`) sorted by
/// (state, key group, key), each with its state and key group.
pub(crate) fn sorted(groups: &Groups, range: KeyGroupRange) -> Vec<(StateId, u32, &[u8], &Dirty)> {
    let mut out = Vec::new();
    for (s, state) in groups.iter().enumerate() {
        for (g, map) in state.iter().enumerate() {
            let from = out.len();
            let key_group = range.start + g as u32;
            out.extend(map.iter().map(|(k, d)| (s as StateId, key_group, k, d)));
            out[from..].sort_unstable_by(|a, b| a.2.cmp(b.2));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_view_keeps_its_values_while_the_buffer_changes_and_bytes_are_counted() {
        let mut b = WriteBuffer::new(KeyGroupRange::new(4, 5).unwrap());
        b.add_state();
        assert!(b.write(0, 4, b"k", Some(b"one"), 1));
        assert!(!b.write(0, 4, b"k", Some(b"two"), 1), "second write of the epoch");
        let view = b.view();
        assert!(b.write(0, 4, b"k", None, 2), "first write of epoch 2");
        assert!(b.write(0, 5, &[1u8; 30], Some(b"long"), 2));
        assert_eq!(
            view[0][0].get(b"k").and_then(|d| d.value.as_deref()),
            Some(&b"two"[..])
        );
        assert!(
            b.get(0, 4, b"k").is_some_and(|d| d.value.is_none()),
            "a tombstone"
        );
        assert_eq!(b.len(), 2);
        assert_eq!(b.bytes(), 1 + 30 + 4 + 2 * ENTRY_OVERHEAD);
        // A large value overwritten by a small one: the count follows the
        // allocation, which is not kept.
        b.write(0, 5, b"big", Some(&[7u8; 4096]), 2);
        let with_big = b.bytes();
        let cap = b
            .get(0, 5, b"big")
            .and_then(|d| d.value.as_ref())
            .map_or(0, |v| v.capacity());
        assert!(cap >= 4096 && with_big >= cap + 3 + 3 * ENTRY_OVERHEAD);
        b.write(0, 5, b"big", Some(b"s"), 2);
        assert_eq!(
            b.bytes(),
            with_big - cap + 1,
            "the 4 KiB allocation is released and uncounted"
        );
        assert!(b
            .get(0, 5, b"big")
            .and_then(|d| d.value.as_ref())
            .is_some_and(|v| !v.spilled()));
        b.write(0, 5, b"big", None, 2);
        let taken = b.take();
        assert!(b.is_empty() && b.bytes() == 0);
        let all = sorted(&taken, KeyGroupRange::new(4, 5).unwrap());
        let keys: Vec<(u32, &[u8])> = all.iter().map(|e| (e.1, e.2)).collect();
        assert_eq!(keys, vec![(4, &b"k"[..]), (5, &[1u8; 30][..]), (5, &b"big"[..])]);
    }
}
