//! Typed keyed state on the heap: values kept as their Rust type and
//! encoded only when a snapshot is written (Flink's heap backend keeps
//! objects, not bytes).
//!
//! A state backend that keeps state in memory offers typed tables through
//! [`KeyedStateStore::register_typed`](crate::KeyedStateStore::register_typed);
//! the runtime then reaches a state's [`HeapTable`] through
//! [`KeyedStateStore::typed`](crate::KeyedStateStore::typed) and updates a
//! value with one hash probe ([`HeapTable::update`]), using the key's
//! stable hash ([`KeyRef`]) computed once per record. Snapshots, changes
//! files and savepoints hold the canonical bytes (the postcard encoding of
//! the value, the same as the byte-level path writes), so they move between
//! backends unchanged.
//!
//! ```
//! use sluice_core::heap::{HeapTable, KeyRef, TypedTable};
//! use sluice_core::KeyGroupRange;
//!
//! let mut sums: HeapTable<u64> = HeapTable::new(KeyGroupRange::all(128), "sum".into());
//! let key = KeyRef::new(b"k", 128);
//! for v in [1u64, 2, 3] {
//!     sums.update(&key, None, |sum| *sum.get_or_insert(0) += v).unwrap();
//! }
//! assert_eq!(sums.get(&key).unwrap(), Some(&6));
//! let mut encoded = Vec::new();
//! assert!(sums.view().get_encoded(key.key_group, b"k", &mut encoded).unwrap());
//! assert_eq!(encoded, postcard::to_allocvec(&6u64).unwrap());
//! ```

use crate::keygroup::{stable_key_hash, KeyGroupRange};
use crate::state::{KeyValueVisitor, StateId};
use crate::{Error, Result};
use hashbrown::hash_table::{Entry as TableEntry, HashTable};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::any::Any;
use std::num::NonZeroU64;
use std::sync::Arc;

/// What a typed state's values must be: encodable in the canonical format,
/// and cloneable for the copy-on-write snapshot.
pub trait HeapValue: Serialize + DeserializeOwned + Clone + Send + Sync + 'static {}

impl<T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static> HeapValue for T {}

/// A key of up to 23 bytes, inline: its length in the last byte. Hashing
/// and comparing it are three word operations (no `memcmp` call).
#[derive(Clone, Copy)]
#[repr(C, align(8))]
pub struct ShortKey([u8; 24]);

impl ShortKey {
    /// The longest key kept inline.
    pub const MAX: usize = 23;

    /// `key` inline; `key` must be at most [`Self::MAX`] bytes long.
    #[inline]
    pub fn new(key: &[u8]) -> Self {
        let mut b = [0u8; 24];
        b[..key.len()].copy_from_slice(key);
        b[23] = key.len() as u8;
        ShortKey(b)
    }

    /// The key as three words (for comparison and hashing).
    #[inline]
    pub fn words(&self) -> [u64; 3] {
        let w = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&self.0[i..i + 8]);
            u64::from_ne_bytes(b)
        };
        [w(0), w(8), w(16)]
    }

    /// The key's bytes.
    #[inline]
    pub fn as_slice(&self) -> &[u8] {
        &self.0[..usize::from(self.0[23])]
    }

    /// Three integers that order keys as their bytes do (the padding is
    /// zeros and the length comes last, so a key sorts before the longer
    /// keys it is a prefix of): sorting by them needs no `memcmp`.
    #[inline]
    pub fn ordered_words(&self) -> [u64; 3] {
        let w = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&self.0[i..i + 8]);
            u64::from_be_bytes(b)
        };
        [w(0), w(8), w(16)]
    }
}

impl PartialEq for ShortKey {
    #[inline]
    fn eq(&self, other: &Self) -> bool {
        self.words() == other.words()
    }
}

impl Eq for ShortKey {}

impl std::hash::Hash for ShortKey {
    /// A folded multiply per word, chained, so that every key bit
    /// reaches the low bits a hash table indexes by. (Fx's multiply only
    /// carries upwards: keys differing in their high bytes alone, such as
    /// big-endian integers, collided, and a million of them took a second
    /// to insert.)
    #[inline]
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        #[inline]
        fn fold(x: u64, y: u64) -> u64 {
            let p = u128::from(x) * u128::from(y);
            (p as u64) ^ ((p >> 64) as u64)
        }
        let [a, b, c] = self.words();
        let h = fold(a ^ 0x243F_6A88_85A3_08D3, 0x1319_8A2E_0370_7344);
        let h = fold(h ^ b, 0xA409_3822_299F_31D0);
        state.write_u64(fold(h ^ c, 0x082E_FA98_EC4E_6C89));
    }
}

/// The keys written or deleted in one epoch of change tracking (between two
/// snapshots), by key group and state: a key once per first write of the
/// epoch (and again after a deletion; duplicates are removed when the
/// changes are read).
///
/// A log may be given a limit ([`ChangeLog::with_limit`]): past it, keys are
/// no longer recorded and the log is [`overflowed`](ChangeLog::overflowed),
/// which means "too much changed: take a full snapshot". A store whose
/// incremental snapshots fall back to full ones beyond some share of
/// changed keys saves the recording (most of the cost of tracking when
/// every key changes in every interval).
pub struct ChangeLog {
    /// Keys of up to [`ShortKey::MAX`] bytes.
    pub short: Vec<(u32, StateId, ShortKey)>,
    /// Longer keys.
    pub long: Vec<(u32, StateId, Box<[u8]>)>,
    limit: usize,
    overflowed: bool,
}

impl Default for ChangeLog {
    fn default() -> Self {
        ChangeLog::with_limit(usize::MAX)
    }
}

impl ChangeLog {
    /// An empty log that records up to `limit` keys.
    pub fn with_limit(limit: usize) -> Self {
        ChangeLog {
            short: Vec::new(),
            long: Vec::new(),
            limit,
            overflowed: false,
        }
    }

    /// Whether more keys changed than the limit: the log is incomplete.
    pub fn overflowed(&self) -> bool {
        self.overflowed
    }

    /// Records that `key` of `state` in `key_group` changed.
    #[inline]
    pub fn mark(&mut self, key_group: u32, state: StateId, key: &[u8]) {
        if self.len() >= self.limit {
            self.overflowed = true;
            return;
        }
        if key.len() <= ShortKey::MAX {
            self.short.push((key_group, state, ShortKey::new(key)));
        } else {
            self.long.push((key_group, state, key.into()));
        }
    }

    /// Keys recorded (with duplicates).
    pub fn len(&self) -> usize {
        self.short.len() + self.long.len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A record's key as the state sees it: its bytes (the postcard encoding
/// of the key), their stable hash and the key group, computed once per
/// record.
#[derive(Debug, Clone, Copy)]
pub struct KeyRef<'a> {
    /// The key's bytes.
    pub bytes: &'a [u8],
    /// [`stable_key_hash`] of the bytes.
    pub hash: u64,
    /// The key's group: `hash % max_parallelism`.
    pub key_group: u32,
}

impl<'a> KeyRef<'a> {
    /// Hashes `bytes` and finds their key group.
    #[inline]
    pub fn new(bytes: &'a [u8], max_parallelism: u32) -> Self {
        let hash = stable_key_hash(bytes);
        KeyRef {
            bytes,
            hash,
            key_group: crate::keygroup::key_group_for_hash(hash, max_parallelism),
        }
    }
}

/// Change tracking for one write: the open epoch, the state written, and
/// the log of the epoch's changed keys.
pub struct Tracking<'a> {
    /// The open epoch (never 0, the stamp of untracked writes).
    pub epoch: u64,
    /// The state's id in its store.
    pub state: StateId,
    /// Where changed keys are recorded.
    pub log: &'a mut ChangeLog,
}

/// A store's access to one typed state, handed out by
/// [`KeyedStateStore::typed`](crate::KeyedStateStore::typed).
pub struct TypedAccess<'a> {
    /// The state's table (a [`HeapTable`] of the state's value type).
    pub table: &'a mut dyn TypedTable,
    /// Change tracking, when the store tracks changes.
    pub tracking: Option<Tracking<'a>>,
}

/// A typed state table with its type erased, as a store holds it. The
/// byte-level methods speak the canonical encoding, so a store can restore
/// into it, answer byte-level reads, and snapshot it without knowing the
/// type.
pub trait TypedTable: Send {
    /// For the runtime's downcast to the [`HeapTable`] of its type.
    fn as_any_mut(&mut self) -> &mut dyn Any;
    /// The Rust type of the values (for error messages).
    fn value_type(&self) -> &'static str;
    /// Number of entries.
    fn len(&self) -> usize;
    /// Whether there are no entries.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Encodes the value of `key` into `out` (cleared first); false if absent.
    fn get_encoded(&self, key_group: u32, key: &[u8], out: &mut Vec<u8>) -> Result<bool>;
    /// Decodes `value` and stores it under `key`, stamped with `epoch`;
    /// true if the key was not stamped with `epoch` before.
    fn put_encoded(&mut self, key_group: u32, key: &[u8], value: &[u8], epoch: u64) -> Result<bool>;
    /// Removes `key`; true if it existed.
    fn remove(&mut self, key_group: u32, key: &[u8]) -> Result<bool>;
    /// Visits the entries of `key_group` whose key starts with `prefix`,
    /// values encoded.
    fn visit_prefix(&self, key_group: u32, prefix: &[u8], visit: &mut KeyValueVisitor<'_>) -> Result<()>;
    /// Starts loading the cache lines an access to `key` will touch, so
    /// that the accesses of a batch overlap their cache misses. Only a
    /// hint: it changes nothing and may do nothing.
    fn prefetch(&self, _key: &KeyRef<'_>) {}
    /// A copy-on-write view of the table as it is now (cheap: the table's
    /// key groups are shared until written; a group written while the
    /// view still holds it is copied).
    fn view(&mut self) -> Arc<dyn TableView>;
}

/// An immutable view of a [`TypedTable`], read by the asynchronous part
/// of a snapshot.
pub trait TableView: Send + Sync {
    /// Visits every entry of `key_group`, values encoded.
    fn visit_key_group(&self, key_group: u32, visit: &mut KeyValueVisitor<'_>) -> Result<()>;
    /// Encodes the value of `key` into `out` (cleared first); false if absent.
    fn get_encoded(&self, key_group: u32, key: &[u8], out: &mut Vec<u8>) -> Result<bool>;

    /// Appends every entry of `key_group` to `out` as entries of `state`
    /// in a snapshot file ([`crate::format::append_entry`] each); returns
    /// how many. The default visits them.
    fn append_key_group(&self, key_group: u32, state: StateId, out: &mut Vec<u8>) -> Result<u64> {
        let mut entries = 0u64;
        self.visit_key_group(key_group, &mut |key, value| {
            entries += 1;
            crate::format::append_entry(out, state, key, value);
            Ok(())
        })?;
        Ok(entries)
    }
}

/// A key of up to 15 bytes inline, as two words: the bytes, zero-padded,
/// with the length plus one in the last byte. That byte is never zero, so
/// neither is the second word, and its zero is the niche [`Key`] uses for
/// its discriminant: a `Key` is two words, an entry of a `u64` state 32
/// bytes (half a cache line; how many entries stay in cache decides the
/// hot path's speed). Comparing is two word compares.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(C)]
struct Inline {
    lo: u64,
    hi: NonZeroU64,
}

impl Inline {
    const MAX: usize = 15;

    /// `key` inline; `key` must be at most [`Self::MAX`] bytes long.
    /// The words are read from `key` directly: copying it into a zeroed
    /// buffer and reading that back as words stalled on store-to-load
    /// forwarding (a tenth of the keyed operator's time).
    #[inline]
    fn new(key: &[u8]) -> Self {
        let (lo, hi) = key.split_at(key.len().min(8));
        let len = (key.len() as u64 + 1) << 56;
        Inline {
            lo: le_word(lo),
            // Never zero: its last byte is not.
            hi: NonZeroU64::new(le_word(hi) | len).unwrap_or(NonZeroU64::MAX),
        }
    }

    /// The key's bytes (the first `len` of the array).
    #[inline]
    fn bytes(&self) -> ([u8; 16], usize) {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.lo.to_le_bytes());
        b[8..].copy_from_slice(&self.hi.get().to_le_bytes());
        let len = usize::from(b[15].saturating_sub(1)).min(Self::MAX);
        (b, len)
    }
}

/// Up to 8 bytes as a little-endian word, zero-padded: two overlapping
/// loads (or three byte loads), no loop and no buffer.
#[inline]
fn le_word(b: &[u8]) -> u64 {
    let n = b.len();
    let word4 = |i: usize| {
        let mut w = [0u8; 4];
        w.copy_from_slice(&b[i..i + 4]);
        u64::from(u32::from_le_bytes(w))
    };
    if n >= 4 {
        // The two 4-byte halves overlap when n < 8; the overlap's bytes
        // are the same in both, so OR-ing them is exact.
        word4(0) | (word4(n - 4) << (8 * (n - 4)))
    } else if n > 0 {
        u64::from(b[0]) | (u64::from(b[n / 2]) << (8 * (n / 2))) | (u64::from(b[n - 1]) << (8 * (n - 1)))
    } else {
        0
    }
}

/// An entry's key: inline up to 15 bytes, else boxed twice (a thin
/// pointer, so that `Key` stays two words; longer keys pay a second
/// indirection when compared).
#[derive(Clone)]
enum Key {
    Short(Inline),
    Long(Box<Box<[u8]>>),
}

/// A key's bytes, borrowed or (for an inline key) copied out.
enum KeyBytes<'a> {
    Inline([u8; 16], usize),
    Long(&'a [u8]),
}

impl std::ops::Deref for KeyBytes<'_> {
    type Target = [u8];

    #[inline]
    fn deref(&self) -> &[u8] {
        match self {
            KeyBytes::Inline(b, len) => &b[..*len],
            KeyBytes::Long(b) => b,
        }
    }
}

impl Key {
    #[inline]
    fn bytes(&self) -> KeyBytes<'_> {
        match self {
            Key::Short(k) => {
                let (b, len) = k.bytes();
                KeyBytes::Inline(b, len)
            }
            Key::Long(k) => KeyBytes::Long(k),
        }
    }
}

/// A probe for `bytes`: a long key is compared in place, not copied.
enum Probe<'a> {
    Short(Inline),
    Long(&'a [u8]),
}

impl<'a> Probe<'a> {
    #[inline]
    fn new(bytes: &'a [u8]) -> Self {
        if bytes.len() <= Inline::MAX {
            Probe::Short(Inline::new(bytes))
        } else {
            Probe::Long(bytes)
        }
    }

    #[inline]
    fn matches(&self, key: &Key) -> bool {
        match (key, self) {
            (Key::Short(a), Probe::Short(b)) => a == b,
            (Key::Long(a), Probe::Long(b)) => a[..] == **b,
            _ => false,
        }
    }

    #[inline]
    fn to_key(&self) -> Key {
        match self {
            Probe::Short(k) => Key::Short(*k),
            Probe::Long(b) => Key::Long(Box::new((*b).into())),
        }
    }
}

#[derive(Clone)]
struct Entry<T> {
    key: Key,
    /// The epoch of change tracking that last wrote the entry (0: untracked).
    epoch: u64,
    value: T,
}

/// The hash the tables index by: the key's stable hash with its halves
/// swapped, so that the bits that chose the key group (the low ones, for a
/// power-of-two max parallelism) do not also choose the bucket.
#[inline]
fn table_hash(stable: u64) -> u64 {
    stable.rotate_left(32)
}

#[inline]
fn rehash<T>(e: &Entry<T>) -> u64 {
    table_hash(stable_key_hash(&e.key.bytes()))
}

type Group<T> = HashTable<Entry<T>>;

/// A key group's table: owned, or shared with the views of snapshots
/// since the last one. An owned group is written with no atomic
/// operation (`Arc::make_mut` on every update, a compare-and-swap, was
/// a tenth of the keyed operator's time).
enum Slot<T> {
    Owned(Group<T>),
    Shared(Arc<Group<T>>),
}

impl<T: Clone> Slot<T> {
    #[inline]
    fn get(&self) -> &Group<T> {
        match self {
            Slot::Owned(g) => g,
            Slot::Shared(g) => g,
        }
    }

    /// The group to write: a shared one is taken back (no copy) once no
    /// view holds it any more, else copied (copy-on-write).
    #[inline]
    fn get_mut(&mut self) -> &mut Group<T> {
        if matches!(self, Slot::Shared(_)) {
            self.own();
        }
        match self {
            Slot::Owned(g) => g,
            Slot::Shared(g) => Arc::make_mut(g),
        }
    }

    #[cold]
    fn own(&mut self) {
        if let Slot::Shared(g) = std::mem::replace(self, Slot::Owned(HashTable::new())) {
            *self = Slot::Owned(Arc::try_unwrap(g).unwrap_or_else(|g| (*g).clone()));
        }
    }

    /// The group, shared from now on.
    fn share(&mut self) -> Arc<Group<T>> {
        if let Slot::Owned(g) = self {
            *self = Slot::Shared(Arc::new(std::mem::replace(g, HashTable::new())));
        }
        match self {
            Slot::Shared(g) => g.clone(),
            Slot::Owned(g) => Arc::new(g.clone()),
        }
    }
}

/// The values of one typed state of one subtask: a hash table per key
/// group, shared copy-on-write with snapshots (the first write into a key
/// group a snapshot still holds copies that key group).
pub struct HeapTable<T> {
    range: KeyGroupRange,
    groups: Vec<Slot<T>>,
    what: Arc<str>,
}

impl<T> std::fmt::Debug for HeapTable<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeapTable")
            .field("what", &self.what)
            .field("range", &self.range)
            .field("value_type", &std::any::type_name::<T>())
            .finish()
    }
}

fn out_of_range(key_group: u32, range: KeyGroupRange) -> Error {
    Error::InvalidArgument {
        what: format!("key group {key_group}"),
        reason: format!("outside this store's range {range}"),
    }
}

/// Appends `value`'s canonical bytes (its postcard encoding) to `out`.
/// Unsigned and signed integers of 16 to 64 bits take a fast path that
/// writes postcard's varint (LEB128, zigzag for signed) directly, without
/// serde: for the reference workload's `u64` keys, serde's encoding was
/// 18 % of all instructions, and for `u64` values most of a heap
/// snapshot's encoding. The bytes are the same (tested against postcard).
/// On an error (a `Serialize` implementation that fails) `out`'s earlier
/// contents are lost.
///
/// ```
/// let mut out = vec![1];
/// sluice_core::heap::append_canonical(&300u64, &mut out).unwrap();
/// assert_eq!(out[1..], postcard::to_allocvec(&300u64).unwrap()[..]);
/// ```
#[inline]
pub fn append_canonical<T: Serialize + 'static>(
    value: &T,
    out: &mut Vec<u8>,
) -> std::result::Result<(), postcard::Error> {
    let any = value as &dyn Any;
    let unsigned = any
        .downcast_ref::<u64>()
        .copied()
        .or_else(|| any.downcast_ref::<u32>().map(|v| u64::from(*v)))
        .or_else(|| any.downcast_ref::<u16>().map(|v| u64::from(*v)))
        .or_else(|| any.downcast_ref::<i64>().map(|v| ((*v << 1) ^ (*v >> 63)) as u64))
        .or_else(|| {
            any.downcast_ref::<i32>()
                .map(|v| u64::from(((*v << 1) ^ (*v >> 31)) as u32))
        });
    if let Some(v) = unsigned {
        crate::format::append_varint(out, v);
        return Ok(());
    }
    *out = postcard::to_extend(value, std::mem::take(out))?;
    Ok(())
}

fn encode<T: HeapValue>(what: &str, value: &T, out: &mut Vec<u8>) -> Result<()> {
    out.clear();
    append_canonical(value, out).map_err(|e| Error::Serialization {
        what: format!("a value of state {what}"),
        reason: e.to_string(),
    })
}

fn find<'g, T>(group: &'g Group<T>, key_bytes: &[u8]) -> Option<&'g Entry<T>> {
    let probe = Probe::new(key_bytes);
    group.find(table_hash(stable_key_hash(key_bytes)), |e| probe.matches(&e.key))
}

impl<T: HeapValue> HeapTable<T> {
    /// An empty table of the key groups `range`; `what` names the state in
    /// errors (e.g. `operator/state`).
    pub fn new(range: KeyGroupRange, what: Arc<str>) -> Self {
        HeapTable {
            range,
            groups: (0..range.len()).map(|_| Slot::Owned(HashTable::new())).collect(),
            what,
        }
    }

    #[inline]
    fn index(&self, key_group: u32) -> Result<usize> {
        if self.range.contains(key_group) {
            Ok((key_group - self.range.start) as usize)
        } else {
            Err(out_of_range(key_group, self.range))
        }
    }

    /// The value of `key`.
    #[inline]
    pub fn get(&self, key: &KeyRef<'_>) -> Result<Option<&T>> {
        let g = self.index(key.key_group)?;
        let probe = Probe::new(key.bytes);
        Ok(self.groups[g]
            .get()
            .find(table_hash(key.hash), |e| probe.matches(&e.key))
            .map(|e| &e.value))
    }

    /// Updates the value of `key` in place with one hash probe: `f` sees
    /// the value (`None` when absent) and may change, set or clear it.
    /// Returns what `f` returns. With `tracking`, the key is recorded as
    /// changed at its first write of the epoch.
    #[inline]
    pub fn update<R>(
        &mut self,
        key: &KeyRef<'_>,
        tracking: Option<Tracking<'_>>,
        f: impl FnOnce(&mut Option<T>) -> R,
    ) -> Result<R> {
        let g = self.index(key.key_group)?;
        let group = self.groups[g].get_mut();
        let probe = Probe::new(key.bytes);
        match group.entry(table_hash(key.hash), |e| probe.matches(&e.key), rehash) {
            TableEntry::Occupied(o) => {
                // `f` sees the entry's value as an `Option` in place: the
                // value is moved out, and moved back (or the entry removed)
                // afterwards. A second probe, or taking the entry out of its
                // slot and back, cost 13 % of the hot path's instructions.
                let mut guard = Lent(Some(o));
                let Some(o) = guard.0.as_mut() else {
                    unreachable!("the guard was just made with the entry")
                };
                // SAFETY: the bits left in the entry are not used or dropped
                // again until a value is written back: the table cannot be
                // reached while `self` is borrowed mutably here, and if `f`
                // unwinds, `guard` removes the entry without dropping them.
                let mut value = Some(unsafe { std::ptr::read(&o.get().value) });
                let r = f(&mut value);
                let Some(mut o) = guard.0.take() else {
                    unreachable!("only the guard's drop takes the entry")
                };
                // The first write of an epoch (or a removal) is a change.
                let changed = tracking.filter(|t| value.is_none() || o.get().epoch != t.epoch);
                match value {
                    Some(v) => {
                        let e = o.get_mut();
                        // SAFETY: the slot holds the bits moved out above,
                        // which must not be dropped: overwrite them.
                        unsafe { std::ptr::write(&mut e.value, v) };
                        if let Some(t) = &changed {
                            e.epoch = t.epoch;
                        }
                    }
                    None => forget_value(o.remove().0),
                }
                // Only now, with the table whole again, anything that may
                // fail or unwind.
                if let Some(t) = changed {
                    t.log.mark(key.key_group, t.state, key.bytes);
                }
                Ok(r)
            }
            TableEntry::Vacant(v) => {
                let mut value = None;
                let r = f(&mut value);
                if let Some(value) = value {
                    let epoch = match tracking {
                        Some(t) => {
                            t.log.mark(key.key_group, t.state, key.bytes);
                            t.epoch
                        }
                        None => 0,
                    };
                    v.insert(Entry {
                        key: probe.to_key(),
                        epoch,
                        value,
                    });
                }
                Ok(r)
            }
        }
    }
}

/// An entry whose value is lent out by [`HeapTable::update`]: if it is
/// still here when dropped (the update's function unwound), the entry is
/// removed and its value's stale bits are not dropped.
struct Lent<'a, T>(Option<hashbrown::hash_table::OccupiedEntry<'a, Entry<T>>>);

impl<T> Drop for Lent<'_, T> {
    fn drop(&mut self) {
        if let Some(o) = self.0.take() {
            forget_value(o.remove().0);
        }
    }
}

/// Asks the CPU to load the cache line holding `value` (a hint).
#[inline(always)]
fn prefetch_line<V>(value: &V) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch has no effect on memory and never faults; SSE is
    // part of every x86-64 CPU.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
            (value as *const V).cast::<i8>(),
        );
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}

/// Drops an entry's key but not its value, whose bits were moved out.
fn forget_value<T>(e: Entry<T>) {
    let Entry { key, value, .. } = e;
    std::mem::forget(value);
    drop(key);
}

impl<T: HeapValue> TypedTable for HeapTable<T> {
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }

    fn value_type(&self) -> &'static str {
        std::any::type_name::<T>()
    }

    fn len(&self) -> usize {
        self.groups.iter().map(|g| g.get().len()).sum()
    }

    fn get_encoded(&self, key_group: u32, key: &[u8], out: &mut Vec<u8>) -> Result<bool> {
        let g = self.index(key_group)?;
        get_encoded(self.groups[g].get(), &self.what, key, out)
    }

    fn put_encoded(&mut self, key_group: u32, key: &[u8], value: &[u8], epoch: u64) -> Result<bool> {
        let decoded: T = postcard::from_bytes(value).map_err(|e| Error::Serialization {
            what: format!(
                "a value of state {} (as {})",
                self.what,
                std::any::type_name::<T>()
            ),
            reason: format!("{e}; was the state written with another type?"),
        })?;
        let g = self.index(key_group)?;
        let group = self.groups[g].get_mut();
        let probe = Probe::new(key);
        match group.entry(
            table_hash(stable_key_hash(key)),
            |e| probe.matches(&e.key),
            rehash,
        ) {
            TableEntry::Occupied(mut o) => {
                let e = o.get_mut();
                e.value = decoded;
                Ok(std::mem::replace(&mut e.epoch, epoch) != epoch)
            }
            TableEntry::Vacant(v) => {
                v.insert(Entry {
                    key: probe.to_key(),
                    epoch,
                    value: decoded,
                });
                Ok(true)
            }
        }
    }

    fn remove(&mut self, key_group: u32, key: &[u8]) -> Result<bool> {
        let g = self.index(key_group)?;
        let probe = Probe::new(key);
        let hash = table_hash(stable_key_hash(key));
        if self.groups[g]
            .get()
            .find(hash, |e| probe.matches(&e.key))
            .is_none()
        {
            return Ok(false);
        }
        if let Ok(o) = self.groups[g]
            .get_mut()
            .find_entry(hash, |e| probe.matches(&e.key))
        {
            o.remove();
        }
        Ok(true)
    }

    fn visit_prefix(&self, key_group: u32, prefix: &[u8], visit: &mut KeyValueVisitor<'_>) -> Result<()> {
        let g = self.index(key_group)?;
        visit_group(self.groups[g].get(), &self.what, Some(prefix), visit)
    }

    #[inline]
    fn prefetch(&self, key: &KeyRef<'_>) {
        let Some(group) = self
            .groups
            .get(key.key_group.wrapping_sub(self.range.start) as usize)
        else {
            return;
        };
        let group = group.get();
        let buckets = group.num_buckets();
        if buckets == 0 {
            return;
        }
        // Where hashbrown starts probing for the hash (its `h1` is the
        // hash itself, masked): reading that control byte is a load no one
        // waits for, and the entry found there is loaded ahead. Should
        // hashbrown change where it starts, this prefetches the wrong
        // line: slower, never wrong.
        let start = (table_hash(key.hash) as usize) & (buckets - 1);
        if let Some(e) = group.get_bucket(start) {
            prefetch_line(e);
        }
    }

    fn view(&mut self) -> Arc<dyn TableView> {
        Arc::new(HeapView {
            range: self.range,
            groups: self.groups.iter_mut().map(Slot::share).collect(),
            what: self.what.clone(),
        })
    }
}

fn get_encoded<T: HeapValue>(group: &Group<T>, what: &str, key: &[u8], out: &mut Vec<u8>) -> Result<bool> {
    out.clear();
    match find(group, key).map(|e| &e.value) {
        Some(v) => encode(what, v, out).map(|()| true),
        None => Ok(false),
    }
}

fn visit_group<T: HeapValue>(
    group: &Group<T>,
    what: &str,
    prefix: Option<&[u8]>,
    visit: &mut KeyValueVisitor<'_>,
) -> Result<()> {
    let mut buf = Vec::new();
    for e in group.iter() {
        let bytes = e.key.bytes();
        let key: &[u8] = &bytes;
        if prefix.is_some_and(|p| !key.starts_with(p)) {
            continue;
        }
        encode(what, &e.value, &mut buf)?;
        visit(key, &buf)?;
    }
    Ok(())
}

/// A copy-on-write view of a [`HeapTable`].
struct HeapView<T> {
    range: KeyGroupRange,
    groups: Vec<Arc<Group<T>>>,
    what: Arc<str>,
}

impl<T: HeapValue> HeapView<T> {
    fn index(&self, key_group: u32) -> Result<usize> {
        if self.range.contains(key_group) {
            Ok((key_group - self.range.start) as usize)
        } else {
            Err(out_of_range(key_group, self.range))
        }
    }
}

impl<T: HeapValue> TableView for HeapView<T> {
    fn visit_key_group(&self, key_group: u32, visit: &mut KeyValueVisitor<'_>) -> Result<()> {
        let g = self.index(key_group)?;
        visit_group(&self.groups[g], &self.what, None, visit)
    }

    fn get_encoded(&self, key_group: u32, key: &[u8], out: &mut Vec<u8>) -> Result<bool> {
        let g = self.index(key_group)?;
        get_encoded(&self.groups[g], &self.what, key, out)
    }

    /// Writes the entries straight into `out`: no call per entry, the
    /// value encoded in place behind a one-byte length (moved when it
    /// needs more; tested against the visiting path byte for byte).
    fn append_key_group(&self, key_group: u32, state: StateId, out: &mut Vec<u8>) -> Result<u64> {
        let g = self.index(key_group)?;
        let group = &self.groups[g];
        out.reserve(group.len() * 8);
        for e in group.iter() {
            crate::format::append_varint(out, u64::from(state));
            crate::format::append_bytes(out, &e.key.bytes());
            let len_at = out.len();
            out.push(0);
            append_canonical(&e.value, out).map_err(|err| Error::Serialization {
                what: format!("a value of state {}", self.what),
                reason: err.to_string(),
            })?;
            let len = out.len() - len_at - 1;
            if len < 0x80 {
                out[len_at] = len as u8;
            } else {
                let mut prefix = Vec::with_capacity(10);
                crate::format::append_varint(&mut prefix, len as u64);
                out.splice(len_at..=len_at, prefix);
            }
        }
        Ok(group.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> HeapTable<u64> {
        HeapTable::new(KeyGroupRange::new(0, 127).unwrap(), "op/sum".into())
    }

    #[test]
    fn short_keys_order_by_their_words_as_by_their_bytes() {
        // Every key of up to 3 bytes over {0, 1, 255}, and long keys that
        // differ only in their last bytes or in length (prefixes, zeros).
        let mut keys: Vec<Vec<u8>> = vec![vec![]];
        for len in 1..=3 {
            let mut next = Vec::new();
            for k in keys.iter().filter(|k| k.len() == len - 1) {
                for b in [0u8, 1, 255] {
                    let mut k = k.clone();
                    k.push(b);
                    next.push(k);
                }
            }
            keys.extend(next);
        }
        for len in [7, 8, 9, 15, 16, 17, 22, 23] {
            for last in [0u8, 1, 255] {
                let mut k = vec![9u8; len];
                k[len - 1] = last;
                keys.push(k.clone());
                keys.push(k[..len - 1].to_vec());
            }
        }
        for a in &keys {
            for b in &keys {
                let (x, y) = (ShortKey::new(a), ShortKey::new(b));
                assert_eq!(
                    x.ordered_words().cmp(&y.ordered_words()),
                    a.as_slice().cmp(b.as_slice()),
                    "{a:?} against {b:?}"
                );
            }
        }
    }

    #[test]
    fn update_inserts_changes_and_removes_with_one_probe() {
        let mut t = table();
        let k = KeyRef::new(b"alpha", 128);
        assert_eq!(t.update(&k, None, |v| v.replace(5)).unwrap(), None);
        assert_eq!(t.update(&k, None, |v| v.replace(7)).unwrap(), Some(5));
        assert_eq!(t.get(&k).unwrap(), Some(&7));
        assert_eq!(t.update(&k, None, |v| v.take()).unwrap(), Some(7));
        assert_eq!(t.get(&k).unwrap(), None);
        assert_eq!(TypedTable::len(&t), 0);
        // An update that leaves an absent key absent stores nothing.
        t.update(&k, None, |_| ()).unwrap();
        assert_eq!(TypedTable::len(&t), 0);
    }

    #[test]
    fn an_entry_of_a_u64_state_is_four_words() {
        // Half a cache line: how many entries stay in cache decides the
        // hot path's speed (the entry load is its hottest instruction).
        assert_eq!(std::mem::size_of::<Key>(), 16);
        assert_eq!(std::mem::size_of::<Entry<u64>>(), 32);
    }

    #[test]
    fn inline_keys_read_back_their_bytes() {
        let mut seen = Vec::new();
        for n in 0..=Inline::MAX {
            for fill in [0u8, 1, 0x80, 0xFF] {
                let key: Vec<u8> = (0..n as u8).map(|i| i.wrapping_mul(37) ^ fill).collect();
                let inline = Inline::new(&key);
                let (b, len) = inline.bytes();
                assert_eq!(&b[..len], &key[..], "{n} bytes");
                let words = (inline.lo, inline.hi.get());
                assert!(
                    seen.iter().all(|(k, w)| k == &key || *w != words),
                    "{key:?} collides"
                );
                seen.push((key, words));
            }
        }
    }

    #[test]
    fn keys_of_every_length_are_kept_apart_and_read_back() {
        let mut t = table();
        // Lengths around the inline limit, and keys that are prefixes of
        // each other or differ only in their last byte.
        let keys: Vec<Vec<u8>> = (0..=40usize)
            .flat_map(|n| [vec![7u8; n], (0..n as u8).collect::<Vec<u8>>()])
            .chain([vec![7u8; 15].into_iter().chain([8]).collect()])
            .collect();
        let mut distinct = keys.clone();
        distinct.sort();
        distinct.dedup();
        for (i, k) in distinct.iter().enumerate() {
            let r = KeyRef::new(k, 128);
            t.update(&r, None, |v| *v = Some(i as u64)).unwrap();
        }
        assert_eq!(TypedTable::len(&t), distinct.len());
        let mut seen = Vec::new();
        for (i, k) in distinct.iter().enumerate() {
            let r = KeyRef::new(k, 128);
            assert_eq!(t.get(&r).unwrap(), Some(&(i as u64)), "key {k:?}");
            let mut out = Vec::new();
            assert!(TypedTable::get_encoded(&t, r.key_group, k, &mut out).unwrap());
            assert_eq!(out, postcard::to_allocvec(&(i as u64)).unwrap());
            if !seen.contains(&r.key_group) {
                seen.push(r.key_group);
                t.visit_prefix(r.key_group, &[], &mut |key, value| {
                    let j = distinct
                        .iter()
                        .position(|d| d == key)
                        .expect("a key that was written");
                    assert_eq!(value, postcard::to_allocvec(&(j as u64)).unwrap());
                    Ok(())
                })
                .unwrap();
            }
        }
    }

    /// Values whose drops are counted (only the test below makes them).
    #[derive(Serialize, serde::Deserialize)]
    struct Counted(u64);

    static COUNTED_DROPS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    impl Clone for Counted {
        fn clone(&self) -> Self {
            Counted(self.0)
        }
    }

    impl Drop for Counted {
        fn drop(&mut self) {
            COUNTED_DROPS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn an_update_that_unwinds_drops_each_value_once() {
        let drops = || COUNTED_DROPS.load(std::sync::atomic::Ordering::SeqCst);
        let mut t: HeapTable<Counted> =
            HeapTable::new(KeyGroupRange::new(0, 127).unwrap(), "op/counted".into());
        let (a, b) = (KeyRef::new(b"a", 128), KeyRef::new(b"b", 128));
        t.update(&a, None, |v| *v = Some(Counted(1))).unwrap();
        t.update(&b, None, |v| *v = Some(Counted(2))).unwrap();
        assert_eq!(drops(), 0);
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            t.update(&a, None, |v| {
                assert_eq!(v.as_ref().map(|c| c.0), Some(1));
                panic!("a user function fails mid-update")
            })
        }));
        assert!(unwound.is_err());
        // The entry whose update unwound is gone, its value dropped once;
        // the other entry is intact.
        assert_eq!(drops(), 1);
        assert!(t.get(&a).unwrap().is_none());
        assert_eq!(t.get(&b).unwrap().map(|c| c.0), Some(2));
        assert_eq!(TypedTable::len(&t), 1);
        // A value replaced or removed by an update is dropped once.
        t.update(&b, None, |v| *v = Some(Counted(3))).unwrap();
        assert_eq!(drops(), 2);
        t.update(&b, None, |v| v.as_mut().unwrap().0 += 1).unwrap();
        assert_eq!(t.get(&b).unwrap().map(|c| c.0), Some(4));
        assert_eq!(drops(), 2);
        t.update(&b, None, |v| *v = None).unwrap();
        assert_eq!(drops(), 3);
        assert_eq!(TypedTable::len(&t), 0);
        t.update(&a, None, |v| *v = Some(Counted(5))).unwrap();
        drop(t);
        assert_eq!(drops(), 4);
    }

    #[test]
    fn prefetch_is_only_a_hint() {
        // An empty table, present and absent keys, and key groups outside
        // the range: nothing fails, nothing changes.
        let mut t = HeapTable::<u64>::new(KeyGroupRange::new(0, 63).unwrap(), "op/sum".into());
        let key = |i: u64| i.to_le_bytes();
        let inside: Vec<u64> = (0..1000)
            .filter(|i| KeyRef::new(&key(*i), 128).key_group < 64)
            .collect();
        let outside = (0..1000)
            .find(|i| KeyRef::new(&key(*i), 128).key_group >= 64)
            .unwrap();
        t.prefetch(&KeyRef::new(&key(inside[0]), 128));
        for i in &inside[..inside.len() / 2] {
            t.update(&KeyRef::new(&key(*i), 128), None, |v| *v = Some(*i))
                .unwrap();
        }
        for i in inside.iter().chain([&outside]) {
            t.prefetch(&KeyRef::new(&key(*i), 128));
        }
        assert_eq!(TypedTable::len(&t), inside.len() / 2);
        for (n, i) in inside.iter().enumerate() {
            let expected = (n < inside.len() / 2).then_some(i);
            assert_eq!(t.get(&KeyRef::new(&key(*i), 128)).unwrap(), expected);
        }
    }

    /// A view that writes through the visiting default of
    /// `append_key_group`.
    struct Visiting(Arc<dyn TableView>);

    impl TableView for Visiting {
        fn visit_key_group(&self, key_group: u32, visit: &mut KeyValueVisitor<'_>) -> Result<()> {
            self.0.visit_key_group(key_group, visit)
        }

        fn get_encoded(&self, key_group: u32, key: &[u8], out: &mut Vec<u8>) -> Result<bool> {
            self.0.get_encoded(key_group, key, out)
        }
    }

    #[test]
    fn entries_written_directly_are_the_visited_ones_byte_for_byte() {
        // Values whose encodings take a 1-, 2- and 3-byte length, short
        // and long keys, several key groups.
        let mut t = HeapTable::<String>::new(KeyGroupRange::new(0, 127).unwrap(), "op/text".into());
        for (i, len) in [0usize, 5, 126, 127, 128, 300, 16_383, 16_384, 20_000]
            .into_iter()
            .enumerate()
        {
            for key in [format!("k{i}"), format!("a key longer than fifteen bytes {i}")] {
                let value = "x".repeat(len);
                t.update(&KeyRef::new(key.as_bytes(), 128), None, |v| *v = Some(value))
                    .unwrap();
            }
        }
        let direct = t.view();
        let visiting = Visiting(direct.clone());
        let mut groups = 0;
        for kg in 0..128 {
            let (mut a, mut b) = (vec![9u8], vec![9u8]);
            let n = direct.append_key_group(kg, 300, &mut a).unwrap();
            let m = visiting.append_key_group(kg, 300, &mut b).unwrap();
            assert_eq!((n, &a), (m, &b), "key group {kg}");
            groups += usize::from(n > 0);
        }
        assert!(groups > 1, "the keys fell into one key group only");
    }

    #[test]
    fn updates_and_removals_match_a_model() {
        use std::collections::BTreeMap;
        let mut t = table();
        let mut model: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for step in 0..20_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Short and long keys, few enough that most updates hit one.
            let n = (x % 300) as usize;
            let key: Vec<u8> = if n % 3 == 0 {
                format!("a long key number {n:04}").into_bytes()
            } else {
                (n as u64).to_le_bytes().to_vec()
            };
            let r = KeyRef::new(&key, 128);
            let expected = model.get(&key).copied();
            let remove = (x >> 20) % 4 == 0;
            let before = t
                .update(&r, None, |v| {
                    let before = *v;
                    *v = if remove { None } else { Some(v.unwrap_or(0) + step) };
                    before
                })
                .unwrap();
            assert_eq!(before, expected, "step {step}");
            if remove {
                model.remove(&key);
            } else {
                *model.entry(key).or_insert(0) += step;
            }
        }
        assert_eq!(TypedTable::len(&t), model.len());
        for (k, v) in &model {
            assert_eq!(t.get(&KeyRef::new(k, 128)).unwrap(), Some(v));
        }
    }

    fn same_as_postcard<K: Serialize + 'static>(k: K) {
        let mut fast = vec![9u8];
        append_canonical(&k, &mut fast).unwrap();
        let mut expected = vec![9u8];
        expected.extend(postcard::to_allocvec(&k).unwrap());
        assert_eq!(fast, expected, "{}", std::any::type_name::<K>());
    }

    #[test]
    fn integers_are_encoded_exactly_as_postcard_does() {
        let mut edges: Vec<u64> = vec![0, 1, 127, 128, 255, 256, 16_383, 16_384, u64::MAX, u64::MAX - 1];
        edges.extend((0..64).map(|b| 1u64 << b));
        edges.extend((0..64).map(|b| (1u64 << b) - 1));
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            edges.push(x >> (x % 64));
        }
        for v in edges {
            same_as_postcard(v);
            same_as_postcard(v as u32);
            same_as_postcard(v as u16);
            same_as_postcard(v as i64);
            same_as_postcard(v as i32);
        }
        for v in [i64::MIN, -1, i64::MAX] {
            same_as_postcard(v);
        }
        for v in [i32::MIN, -1, i32::MAX] {
            same_as_postcard(v);
        }
        // Other types go through postcard itself.
        same_as_postcard(("key".to_string(), 7u8));
        same_as_postcard(vec![1u64, 300]);
    }

    #[test]
    fn keys_of_15_and_16_bytes_are_both_found() {
        let mut t = table();
        let a = [7u8; 15];
        let b = [7u8; 16];
        t.update(&KeyRef::new(&a, 128), None, |v| *v = Some(15)).unwrap();
        t.update(&KeyRef::new(&b, 128), None, |v| *v = Some(16)).unwrap();
        assert_eq!(t.get(&KeyRef::new(&a, 128)).unwrap(), Some(&15));
        assert_eq!(t.get(&KeyRef::new(&b, 128)).unwrap(), Some(&16));
        assert_eq!(TypedTable::len(&t), 2);
    }

    #[test]
    fn long_keys_are_kept_and_compared_whole() {
        let mut t = table();
        let a = vec![1u8; 40];
        let mut b = a.clone();
        b[39] = 2;
        t.update(&KeyRef::new(&a, 128), None, |v| *v = Some(1)).unwrap();
        t.update(&KeyRef::new(&b, 128), None, |v| *v = Some(2)).unwrap();
        assert_eq!(t.get(&KeyRef::new(&a, 128)).unwrap(), Some(&1));
        assert_eq!(t.get(&KeyRef::new(&b, 128)).unwrap(), Some(&2));
        let mut out = Vec::new();
        let kg = KeyRef::new(&b, 128).key_group;
        assert!(t.get_encoded(kg, &b, &mut out).unwrap());
        assert_eq!(out, postcard::to_allocvec(&2u64).unwrap());
    }

    #[test]
    fn views_are_unchanged_by_later_writes() {
        let mut t = table();
        let k = KeyRef::new(b"k", 128);
        t.update(&k, None, |v| *v = Some(1)).unwrap();
        let view = t.view();
        t.update(&k, None, |v| *v = Some(2)).unwrap();
        t.update(&KeyRef::new(b"other", 128), None, |v| *v = Some(3))
            .unwrap();
        let mut out = Vec::new();
        assert!(view.get_encoded(k.key_group, b"k", &mut out).unwrap());
        assert_eq!(out, postcard::to_allocvec(&1u64).unwrap());
        let mut seen = Vec::new();
        for g in 0..128 {
            view.visit_key_group(g, &mut |k, v| {
                seen.push((k.to_vec(), v.to_vec()));
                Ok(())
            })
            .unwrap();
        }
        assert_eq!(seen, vec![(b"k".to_vec(), postcard::to_allocvec(&1u64).unwrap())]);
    }

    #[test]
    fn tracking_records_a_key_once_per_epoch_and_every_deletion() {
        let mut t = table();
        let mut log = ChangeLog::default();
        let k = KeyRef::new(b"k", 128);
        for epoch in [1, 1, 1, 2] {
            t.update(
                &k,
                Some(Tracking {
                    epoch,
                    state: 3,
                    log: &mut log,
                }),
                |v| *v.get_or_insert(0) += 1,
            )
            .unwrap();
        }
        assert_eq!(log.len(), 2, "first write of epoch 1 and of epoch 2");
        t.update(
            &k,
            Some(Tracking {
                epoch: 2,
                state: 3,
                log: &mut log,
            }),
            |v| *v = None,
        )
        .unwrap();
        assert_eq!(log.len(), 3, "a deletion is always recorded");
        assert!(log
            .short
            .iter()
            .all(|(g, s, key)| *g == k.key_group && *s == 3 && key.as_slice() == b"k"));
    }

    #[test]
    fn a_log_past_its_limit_stops_recording_and_says_so() {
        let mut log = ChangeLog::with_limit(2);
        log.mark(0, 0, b"a");
        log.mark(0, 0, b"b");
        assert!(!log.overflowed());
        log.mark(0, 0, b"c");
        assert!(log.overflowed());
        assert_eq!(log.len(), 2);
    }

    #[test]
    fn undecodable_bytes_are_refused_with_the_state_named() {
        let mut t = table();
        // A u64 varint that never ends.
        let err = t.put_encoded(0, b"k", &[0xff; 11], 0).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("op/sum") && msg.contains("u64"), "{msg}");
        assert_eq!(TypedTable::len(&t), 0);
    }

    #[test]
    fn out_of_range_key_groups_are_errors() {
        let mut t: HeapTable<u64> = HeapTable::new(KeyGroupRange::new(10, 19).unwrap(), "op/s".into());
        let k = KeyRef {
            bytes: b"k",
            hash: 3,
            key_group: 3,
        };
        assert!(t.update(&k, None, |v| *v = Some(1)).is_err());
        assert!(t.get(&k).is_err());
        assert!(t.view().visit_key_group(25, &mut |_, _| Ok(())).is_err());
    }

    #[test]
    fn many_keys_of_one_key_group_spread_over_buckets() {
        // Keys of one key group share their hash's low bits; the table must
        // still find each of them (and quickly: this inserts 20 000).
        let mut t: HeapTable<u64> = HeapTable::new(KeyGroupRange::all(128), "op/s".into());
        let mut inserted = Vec::new();
        let mut i = 0u64;
        while inserted.len() < 20_000 {
            let bytes = i.to_be_bytes();
            let k = KeyRef::new(&bytes, 128);
            if k.key_group == 5 {
                t.update(&k, None, |v| *v = Some(i)).unwrap();
                inserted.push(i);
            }
            i += 1;
        }
        assert_eq!(TypedTable::len(&t), 20_000);
        for i in inserted {
            let bytes = i.to_be_bytes();
            assert_eq!(t.get(&KeyRef::new(&bytes, 128)).unwrap(), Some(&i));
        }
    }
}
