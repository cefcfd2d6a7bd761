//! State time-to-live (Flink's `StateTtlConfig`): value, list and map
//! states whose values expire a set time after they were last written (or
//! read and written). A list's elements and a map's entries expire one by
//! one, as in Flink.
//!
//! Processing time, as Flink's TTL: each value carries the time of its
//! last write (or access, with [`TtlUpdate::OnReadAndWrite`]) from the
//! config's [`TtlClock`] — the system clock, or one a test sets — in
//! milliseconds since the Unix epoch; it is part of the value, so it
//! survives checkpoints, savepoints and restores, and a restored value
//! expires at the same wall-clock time it would have without the restart.
//!
//! An expired value is never returned (Flink's `NeverReturnExpired`), and
//! it is removed: when it is read; a key group at a time while records are
//! processed, at most about four entries visited per record processed
//! (Flink's incremental cleanup, bounded the same way); and from every
//! snapshot — each checkpoint and savepoint first removes the subtask's
//! expired entries (a scan of the state's entries — on the memory backend
//! that encodes each value —; the removals are changes, so incremental
//! checkpoints and chain folding drop them too).
//!
//! Adding or removing a time-to-live on a state that was restored is
//! refused (its stored values change shape); changing the duration is
//! fine.

use crate::error::Result;
use crate::state::{ListState, MapState, OpenContext, ValueState};
use crate::KeyedContext;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sluice_core::heap::HeapValue;
use sluice_core::{KeyGroupRange, KeyedStateStore, StateId};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Where a time-to-live's time comes from.
pub trait TtlClock: Send + Sync + std::fmt::Debug {
    /// Now, in milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl TtlClock for SystemClock {
    fn now_ms(&self) -> u64 {
        crate::master::now_ms()
    }
}

/// A clock that moves only when told (tests).
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    /// A clock at `ms`.
    pub fn at(ms: u64) -> Arc<Self> {
        Arc::new(ManualClock(AtomicU64::new(ms)))
    }

    /// Moves the clock forward by `d`.
    pub fn advance(&self, d: Duration) {
        self.0.fetch_add(d.as_millis() as u64, Ordering::SeqCst);
    }
}

impl TtlClock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// When a value's time is renewed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TtlUpdate {
    /// On create and write (Flink's `OnCreateAndWrite`, the default).
    #[default]
    OnCreateAndWrite,
    /// On reads too (Flink's `OnReadAndWrite`).
    OnReadAndWrite,
}

/// A state's time-to-live.
#[derive(Debug, Clone)]
pub struct StateTtlConfig {
    /// How long a value lives after its last renewal.
    pub ttl: Duration,
    /// What renews it.
    pub update: TtlUpdate,
    /// The clock.
    pub clock: Arc<dyn TtlClock>,
}

impl StateTtlConfig {
    /// Values expire `ttl` after their last write, by the system clock.
    pub fn new(ttl: Duration) -> Self {
        StateTtlConfig {
            ttl,
            update: TtlUpdate::OnCreateAndWrite,
            clock: Arc::new(SystemClock),
        }
    }

    /// Reads renew a value's time too.
    pub fn update_on_read_and_write(mut self) -> Self {
        self.update = TtlUpdate::OnReadAndWrite;
        self
    }

    /// Time from `clock` (tests).
    pub fn with_clock(mut self, clock: Arc<dyn TtlClock>) -> Self {
        self.clock = clock;
        self
    }

    fn ttl_ms(&self) -> u64 {
        u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX)
    }
}

/// A value with the time it was last renewed. Stored as the renewal time
/// first (a postcard varint), so that cleanup reads only that.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TtlValue<T> {
    /// Last renewal, milliseconds since the Unix epoch.
    pub renewed_ms: u64,
    /// The value.
    pub value: T,
}

fn expired(renewed_ms: u64, ttl_ms: u64, now_ms: u64) -> bool {
    now_ms.saturating_sub(renewed_ms) >= ttl_ms
}

/// What a cleanup does with one stored value.
pub(crate) enum Verdict {
    Keep,
    Delete,
    Replace(Vec<u8>),
}

/// How a state's stored values expire, given now and the time-to-live.
type Judge = Arc<dyn Fn(&[u8], u64, u64) -> Verdict + Send + Sync>;

/// A value or map entry: the renewal time leads it; an unreadable one is
/// left for the read that reports it.
fn judge_single(v: &[u8], ttl_ms: u64, now: u64) -> Verdict {
    match postcard::take_from_bytes::<u64>(v) {
        Ok((renewed, _)) if expired(renewed, ttl_ms, now) => Verdict::Delete,
        _ => Verdict::Keep,
    }
}

/// A list: its expired elements leave it; an emptied list is removed.
fn judge_list<T: HeapValue>(v: &[u8], ttl_ms: u64, now: u64) -> Verdict {
    let Ok(list) = postcard::from_bytes::<Vec<TtlValue<T>>>(v) else {
        return Verdict::Keep;
    };
    let before = list.len();
    let live: Vec<TtlValue<T>> = list
        .into_iter()
        .filter(|e| !expired(e.renewed_ms, ttl_ms, now))
        .collect();
    match live.len() {
        0 => Verdict::Delete,
        n if n == before => Verdict::Keep,
        _ => postcard::to_allocvec(&live).map_or(Verdict::Keep, Verdict::Replace),
    }
}

/// A state's cleanup: which state, how long its values live, the clock,
/// and how its values expire.
pub(crate) struct TtlCleanup {
    id: StateId,
    ttl_ms: u64,
    clock: Arc<dyn TtlClock>,
    judge: Judge,
}

impl std::fmt::Debug for TtlCleanup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TtlCleanup")
            .field("id", &self.id)
            .field("ttl_ms", &self.ttl_ms)
            .finish()
    }
}

impl TtlCleanup {
    /// Removes the expired entries (and list elements) of key group `kg`;
    /// returns how many entries it visited, and how many it changed or
    /// removed.
    pub fn clean_key_group(
        &self,
        store: &mut dyn KeyedStateStore,
        kg: u32,
    ) -> sluice_core::Result<(u64, u64)> {
        let now = self.clock.now_ms();
        let mut changed: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new();
        let mut visited = 0u64;
        store.scan_prefix(self.id, kg, &[], &mut |k, v| {
            visited += 1;
            match (self.judge)(v, self.ttl_ms, now) {
                Verdict::Keep => {}
                Verdict::Delete => changed.push((k.to_vec(), None)),
                Verdict::Replace(new) => changed.push((k.to_vec(), Some(new))),
            }
            Ok(())
        })?;
        for (k, v) in &changed {
            match v {
                Some(v) => store.put(self.id, kg, k, v)?,
                None => store.delete(self.id, kg, k)?,
            }
        }
        Ok((visited, changed.len() as u64))
    }

    /// Removes every expired entry of `range`.
    pub fn clean(&self, store: &mut dyn KeyedStateStore, range: KeyGroupRange) -> sluice_core::Result<u64> {
        let mut n = 0;
        for kg in range.iter() {
            n += self.clean_key_group(store, kg)?.1;
        }
        Ok(n)
    }
}

impl OpenContext<'_> {
    fn ttl_descriptor(
        name: &str,
        kind: &str,
        value_type: &str,
        map_key_type: Option<&str>,
        config: &StateTtlConfig,
    ) -> sluice_core::StateDescriptor {
        let mut desc = Self::descriptor(name, kind, value_type, map_key_type);
        desc.ttl_ms = Some(config.ttl_ms());
        desc
    }

    fn clean_with(&mut self, id: StateId, config: &StateTtlConfig, judge: Judge) {
        self.ttl.push(TtlCleanup {
            id,
            ttl_ms: config.ttl_ms(),
            clock: config.clock.clone(),
            judge,
        });
    }

    /// A single value per key that expires `config.ttl` after its last
    /// renewal (see [`crate::ttl`]).
    pub fn value_state_with_ttl<T: HeapValue>(
        &mut self,
        name: &str,
        config: StateTtlConfig,
    ) -> Result<TtlValueState<T>> {
        let desc = Self::ttl_descriptor(name, "value", std::any::type_name::<T>(), None, &config);
        let h = self.register_descriptor::<TtlValue<T>>(desc)?;
        let inner = ValueState::from_handle(h);
        self.clean_with(inner.id(), &config, Arc::new(judge_single));
        Ok(TtlValueState { inner, config })
    }

    /// A list per key whose elements each expire `config.ttl` after they
    /// were added (Flink's per-element list TTL; see [`crate::ttl`]).
    pub fn list_state_with_ttl<T: HeapValue>(
        &mut self,
        name: &str,
        config: StateTtlConfig,
    ) -> Result<TtlListState<T>> {
        let desc = Self::ttl_descriptor(name, "list", std::any::type_name::<T>(), None, &config);
        let h = self.register_descriptor::<Vec<TtlValue<T>>>(desc)?;
        let inner = ListState::from_handle(h);
        self.clean_with(inner.id(), &config, Arc::new(judge_list::<T>));
        Ok(TtlListState { inner, config })
    }

    /// A map per key whose entries each expire `config.ttl` after their
    /// last renewal (see [`crate::ttl`]).
    pub fn map_state_with_ttl<K: Serialize + DeserializeOwned, V: Serialize + DeserializeOwned>(
        &mut self,
        name: &str,
        config: StateTtlConfig,
    ) -> Result<TtlMapState<K, V>> {
        let desc = Self::ttl_descriptor(
            name,
            "map",
            std::any::type_name::<V>(),
            Some(std::any::type_name::<K>()),
            &config,
        );
        let (id, what) = self.register_bytes(desc)?;
        self.clean_with(id, &config, Arc::new(judge_single));
        Ok(TtlMapState {
            inner: MapState::from_parts(id, what),
            config,
        })
    }
}

/// One value per key with a time-to-live: [`ValueState`]'s access, where
/// an expired value reads as none.
pub struct TtlValueState<T> {
    inner: ValueState<TtlValue<T>>,
    config: StateTtlConfig,
}

impl<T> Clone for TtlValueState<T> {
    fn clone(&self) -> Self {
        TtlValueState {
            inner: self.inner.clone(),
            config: self.config.clone(),
        }
    }
}

impl<T: HeapValue> TtlValueState<T> {
    /// The current key's value, if it has not expired (with
    /// [`TtlUpdate::OnReadAndWrite`], reading renews it).
    pub fn get(&self, ctx: &mut KeyedContext<'_>) -> Result<Option<T>> {
        let (now, ttl) = (self.config.clock.now_ms(), self.config.ttl_ms());
        let renew = self.config.update == TtlUpdate::OnReadAndWrite;
        let current = self.inner.get(ctx)?;
        match current {
            None => Ok(None),
            Some(v) if expired(v.renewed_ms, ttl, now) => {
                self.inner.clear(ctx)?;
                Ok(None)
            }
            Some(v) if renew => {
                let out = v.value.clone();
                self.inner.update(ctx, |slot| {
                    *slot = Some(TtlValue {
                        renewed_ms: now,
                        value: v.value,
                    })
                })?;
                Ok(Some(out))
            }
            Some(v) => Ok(Some(v.value)),
        }
    }

    /// Sets the current key's value (renewing it).
    pub fn set(&self, ctx: &mut KeyedContext<'_>, value: T) -> Result<()> {
        let now = self.config.clock.now_ms();
        self.inner.update(ctx, |slot| {
            *slot = Some(TtlValue {
                renewed_ms: now,
                value,
            })
        })
    }

    /// Reads and changes the current key's value in one access: `f` sees
    /// `None` for an expired value; the value left is renewed (`None`
    /// removes it).
    pub fn update<R>(&self, ctx: &mut KeyedContext<'_>, f: impl FnOnce(&mut Option<T>) -> R) -> Result<R> {
        let (now, ttl) = (self.config.clock.now_ms(), self.config.ttl_ms());
        self.inner.update(ctx, |slot| {
            let mut v = slot
                .take()
                .filter(|t| !expired(t.renewed_ms, ttl, now))
                .map(|t| t.value);
            let r = f(&mut v);
            *slot = v.map(|value| TtlValue {
                renewed_ms: now,
                value,
            });
            r
        })
    }

    /// Removes the current key's value.
    pub fn clear(&self, ctx: &mut KeyedContext<'_>) -> Result<()> {
        self.inner.clear(ctx)
    }
}

#[cfg(all(test, feature = "memory"))]
mod tests {
    use super::*;
    use sluice_backend_memory::MemoryStateBackend;
    use sluice_core::{OperatorUid, StateBackend, StoreScope};

    #[test]
    fn a_cleanup_step_removes_the_expired_entries_of_one_key_group_only() {
        let range = KeyGroupRange { start: 0, end: 4 };
        let mut store = MemoryStateBackend::new()
            .open_store(&StoreScope {
                job: "j".into(),
                operator: OperatorUid::new("op").unwrap(),
                subtask: 0,
                parallelism: 1,
                max_parallelism: 8,
                key_groups: range,
                track_changes: false,
            })
            .unwrap();
        let id = store.register_state("s").unwrap();
        let put = |store: &mut Box<dyn KeyedStateStore>, kg: u32, key: &[u8], renewed_ms: u64| {
            let v = postcard::to_allocvec(&TtlValue {
                renewed_ms,
                value: String::from("v"),
            })
            .unwrap();
            store.put(id, kg, key, &v).unwrap();
        };
        // At 1000 with a time-to-live of 100: renewed at 899 is expired, 901 not.
        put(&mut store, 1, b"old", 899);
        put(&mut store, 1, b"edge", 900);
        put(&mut store, 1, b"new", 901);
        put(&mut store, 2, b"old-elsewhere", 0);
        let clock = ManualClock::at(1000);
        let cleanup = TtlCleanup {
            id,
            ttl_ms: 100,
            clock: clock.clone(),
            judge: Arc::new(judge_single),
        };
        assert_eq!(cleanup.clean_key_group(store.as_mut(), 1).unwrap(), (3, 2));
        let mut left = Vec::new();
        store
            .scan_prefix(id, 1, &[], &mut |k, _| {
                left.push(k.to_vec());
                Ok(())
            })
            .unwrap();
        assert_eq!(left, vec![b"new".to_vec()]);
        // Key group 2 is another step's; a full clean takes it.
        let mut buf = Vec::new();
        assert!(store.get(id, 2, b"old-elsewhere", &mut buf).unwrap());
        assert_eq!(cleanup.clean(store.as_mut(), range).unwrap(), 1);
        assert!(!store.get(id, 2, b"old-elsewhere", &mut buf).unwrap());
        clock.advance(Duration::from_millis(1));
        assert_eq!(
            cleanup.clean(store.as_mut(), range).unwrap(),
            1,
            "new expires at 1001"
        );
    }
}

/// A list per key whose elements expire one by one: [`ListState`]'s
/// access, where expired elements are not returned.
pub struct TtlListState<T> {
    inner: ListState<TtlValue<T>>,
    config: StateTtlConfig,
}

impl<T> Clone for TtlListState<T> {
    fn clone(&self) -> Self {
        TtlListState {
            inner: self.inner.clone(),
            config: self.config.clone(),
        }
    }
}

impl<T: HeapValue> TtlListState<T> {
    /// The current key's live elements, oldest first (with
    /// [`TtlUpdate::OnReadAndWrite`], reading renews them).
    pub fn get(&self, ctx: &mut KeyedContext<'_>) -> Result<Vec<T>> {
        let (now, ttl) = (self.config.clock.now_ms(), self.config.ttl_ms());
        let list = self.inner.get(ctx)?;
        let before = list.len();
        let mut live: Vec<TtlValue<T>> = list
            .into_iter()
            .filter(|e| !expired(e.renewed_ms, ttl, now))
            .collect();
        let out: Vec<T> = live.iter().map(|e| e.value.clone()).collect();
        if self.config.update == TtlUpdate::OnReadAndWrite && !live.is_empty() {
            live.iter_mut().for_each(|e| e.renewed_ms = now);
            self.inner.update(ctx, &live)?;
        } else if live.is_empty() && before > 0 {
            self.inner.clear(ctx)?;
        } else if live.len() < before {
            self.inner.update(ctx, &live)?;
        }
        Ok(out)
    }

    /// Appends a value, stamped now.
    pub fn add(&self, ctx: &mut KeyedContext<'_>, value: T) -> Result<()> {
        let now = self.config.clock.now_ms();
        self.inner.add(
            ctx,
            TtlValue {
                renewed_ms: now,
                value,
            },
        )
    }

    /// Replaces the current key's list, every element stamped now.
    pub fn update(&self, ctx: &mut KeyedContext<'_>, values: Vec<T>) -> Result<()> {
        let now = self.config.clock.now_ms();
        let values: Vec<TtlValue<T>> = values
            .into_iter()
            .map(|value| TtlValue {
                renewed_ms: now,
                value,
            })
            .collect();
        self.inner.update(ctx, &values)
    }

    /// Removes the current key's list.
    pub fn clear(&self, ctx: &mut KeyedContext<'_>) -> Result<()> {
        self.inner.clear(ctx)
    }
}

/// A map per key whose entries expire one by one: [`MapState`]'s access,
/// where expired entries are not returned.
pub struct TtlMapState<K, V> {
    inner: MapState<K, TtlValue<V>>,
    config: StateTtlConfig,
}

impl<K, V> Clone for TtlMapState<K, V> {
    fn clone(&self) -> Self {
        TtlMapState {
            inner: self.inner.clone(),
            config: self.config.clone(),
        }
    }
}

impl<K: Serialize + DeserializeOwned, V: Serialize + DeserializeOwned> TtlMapState<K, V> {
    /// The live value under `map_key` (with [`TtlUpdate::OnReadAndWrite`],
    /// reading renews it).
    pub fn get(&self, ctx: &mut KeyedContext<'_>, map_key: &K) -> Result<Option<V>> {
        let (now, ttl) = (self.config.clock.now_ms(), self.config.ttl_ms());
        match self.inner.get(ctx, map_key)? {
            None => Ok(None),
            Some(e) if expired(e.renewed_ms, ttl, now) => {
                self.inner.remove(ctx, map_key)?;
                Ok(None)
            }
            Some(mut e) if self.config.update == TtlUpdate::OnReadAndWrite => {
                e.renewed_ms = now;
                self.inner.put(ctx, map_key, &e)?;
                Ok(Some(e.value))
            }
            Some(e) => Ok(Some(e.value)),
        }
    }

    /// Inserts or replaces `map_key -> value`, stamped now.
    pub fn put(&self, ctx: &mut KeyedContext<'_>, map_key: &K, value: V) -> Result<()> {
        let now = self.config.clock.now_ms();
        self.inner.put(
            ctx,
            map_key,
            &TtlValue {
                renewed_ms: now,
                value,
            },
        )
    }

    /// Removes `map_key`.
    pub fn remove(&self, ctx: &mut KeyedContext<'_>, map_key: &K) -> Result<()> {
        self.inner.remove(ctx, map_key)
    }

    /// The live entries of the current key, in unspecified order; expired
    /// ones are removed (with [`TtlUpdate::OnReadAndWrite`], live ones are
    /// renewed).
    pub fn entries(&self, ctx: &mut KeyedContext<'_>) -> Result<Vec<(K, V)>> {
        let (now, ttl) = (self.config.clock.now_ms(), self.config.ttl_ms());
        let renew = self.config.update == TtlUpdate::OnReadAndWrite;
        let mut live = Vec::new();
        for (k, mut e) in self.inner.entries(ctx)? {
            if expired(e.renewed_ms, ttl, now) {
                self.inner.remove(ctx, &k)?;
                continue;
            }
            if renew {
                e.renewed_ms = now;
                self.inner.put(ctx, &k, &e)?;
            }
            live.push((k, e.value));
        }
        Ok(live)
    }
}
