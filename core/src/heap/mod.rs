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
use std::sync::Arc;

mod changes;
mod keys;
#[cfg(test)]
mod tests;

pub use changes::ChangeLog;
pub use keys::ShortKey;
use keys::{Key, Probe};

/// What a typed state's values must be: encodable in the canonical format,
/// and cloneable for the copy-on-write snapshot.
pub trait HeapValue: Serialize + DeserializeOwned + Clone + Send + Sync + 'static {}

impl<T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static> HeapValue for T {}

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
        if let Slot::Shared(g) = self {
            // The owned table is made before the slot changes: a clone
            // that panics leaves the group as it was.
            let owned = match Arc::get_mut(g) {
                Some(only) => std::mem::take(only),
                None => (**g).clone(),
            };
            *self = Slot::Owned(owned);
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
    if let Some(v) = varint_of(value) {
        crate::format::append_varint(out, v);
        return Ok(());
    }
    *out = postcard::to_extend(value, std::mem::take(out))?;
    Ok(())
}

/// The integer postcard writes as a varint for `value` (zigzagged when
/// signed), if `value` is an integer of 16 to 64 bits.
#[inline]
fn varint_of<T: 'static>(value: &T) -> Option<u64> {
    let any = value as &dyn Any;
    any.downcast_ref::<u64>()
        .copied()
        .or_else(|| any.downcast_ref::<u32>().map(|v| u64::from(*v)))
        .or_else(|| any.downcast_ref::<u16>().map(|v| u64::from(*v)))
        .or_else(|| any.downcast_ref::<i64>().map(|v| ((*v << 1) ^ (*v >> 63)) as u64))
        .or_else(|| {
            any.downcast_ref::<i32>()
                .map(|v| u64::from(((*v << 1) ^ (*v >> 31)) as u32))
        })
}

/// Writes `v` as a varint into `buf` at `at`; returns where it ends
/// (`buf` has room: at most 10 bytes).
#[inline]
fn put_varint(buf: &mut [u8; 48], mut at: usize, mut v: u64) -> usize {
    while v >= 0x80 {
        buf[at] = (v as u8) | 0x80;
        v >>= 7;
        at += 1;
    }
    buf[at] = v as u8;
    at + 1
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
    /// changed at its first write of the epoch. If `f` panics, the key's
    /// entry is gone (its value dropped once) and that is not tracked: a
    /// task whose function panics fails, and its state is restored from a
    /// checkpoint.
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
                // `f` sees the entry's value as an `Option`, moved out of
                // its slot and back by hashbrown (`replace_entry_with`: no
                // second probe). Lending it in place with `ptr::read` and
                // `ptr::write` saved ~5 % of the instructions but moved an
                // entry holding stale bits when `f` cleared the value or
                // unwound: undefined behaviour for a value holding a `Box`.
                let mut r = None;
                let mut changed = None;
                let _ = o.replace_entry_with(|Entry { key: k, epoch, value }| {
                    let mut value = Some(value);
                    r = Some(f(&mut value));
                    // The first write of an epoch (or a removal) is a change.
                    changed = tracking.filter(|t| value.is_none() || epoch != t.epoch);
                    let epoch = changed.as_ref().map_or(epoch, |t| t.epoch);
                    value.map(|value| Entry { key: k, epoch, value })
                });
                if let Some(t) = changed {
                    t.log.mark(key.key_group, t.state, key.bytes);
                }
                r.ok_or_else(|| Error::InvalidArgument {
                    what: format!("an update of state {}", self.what),
                    reason: "hashbrown did not call the update function".into(),
                })
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
            // An inline key and an integer value (the common case): the
            // whole entry is assembled on the stack and appended at once
            // (at most 5 + 1 + 15 + 1 + 10 bytes).
            if let (Key::Short(k), Some(v)) = (&e.key, varint_of(&e.value)) {
                let mut buf = [0u8; 48];
                let at = put_varint(&mut buf, 0, u64::from(state));
                let (bytes, len) = k.bytes();
                buf[at] = len as u8;
                buf[at + 1..at + 17].copy_from_slice(&bytes);
                let value_at = at + 1 + len;
                let end = put_varint(&mut buf, value_at + 1, v);
                buf[value_at] = (end - value_at - 1) as u8;
                out.extend_from_slice(&buf[..end]);
                continue;
            }
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
