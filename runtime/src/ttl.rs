//! State time-to-live (Flink's `StateTtlConfig`): a value state whose
//! values expire a set time after they were last written (or read and
//! written).
//!
//! Processing time, as Flink's TTL: each value carries the time of its
//! last write (or access, with [`TtlUpdate::OnReadAndWrite`]) from the
//! config's [`TtlClock`] — the system clock, or one a test sets — in
//! milliseconds since the Unix epoch; it is part of the value, so it
//! survives checkpoints, savepoints and restores, and a restored value
//! expires at the same wall-clock time it would have without the restart.
//!
//! An expired value is never returned (Flink's `NeverReturnExpired`), and
//! it is removed: when it is read, a key group at a time while records are
//! processed (one key group per batch), and from every snapshot — each
//! checkpoint and savepoint first removes the subtask's expired entries
//! (a scan of the state's entries; the removals are changes, so
//! incremental checkpoints and chain folding drop them too).
//!
//! Adding or removing a time-to-live on a state that was restored is
//! refused (its stored values change shape); changing the duration is
//! fine.

use crate::error::Result;
use crate::state::{OpenContext, ValueState};
use crate::KeyedContext;
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

/// A state's cleanup: which state, how long its values live, the clock.
#[derive(Debug, Clone)]
pub(crate) struct TtlCleanup {
    id: StateId,
    ttl_ms: u64,
    clock: Arc<dyn TtlClock>,
}

impl TtlCleanup {
    /// Removes the expired entries of key group `kg`; returns how many.
    pub fn clean_key_group(&self, store: &mut dyn KeyedStateStore, kg: u32) -> sluice_core::Result<u64> {
        let now = self.clock.now_ms();
        let mut dead: Vec<Vec<u8>> = Vec::new();
        store.scan_prefix(self.id, kg, &[], &mut |k, v| {
            // The renewal time leads the value; an unreadable one is left
            // for the read that reports it.
            if let Ok((renewed, _)) = postcard::take_from_bytes::<u64>(v) {
                if expired(renewed, self.ttl_ms, now) {
                    dead.push(k.to_vec());
                }
            }
            Ok(())
        })?;
        for k in &dead {
            store.delete(self.id, kg, k)?;
        }
        Ok(dead.len() as u64)
    }

    /// Removes every expired entry of `range`.
    pub fn clean(&self, store: &mut dyn KeyedStateStore, range: KeyGroupRange) -> sluice_core::Result<u64> {
        let mut n = 0;
        for kg in range.iter() {
            n += self.clean_key_group(store, kg)?;
        }
        Ok(n)
    }
}

impl OpenContext<'_> {
    /// A single value per key that expires `config.ttl` after its last
    /// renewal (see [`crate::ttl`]).
    pub fn value_state_with_ttl<T: HeapValue>(
        &mut self,
        name: &str,
        config: StateTtlConfig,
    ) -> Result<TtlValueState<T>> {
        let mut desc = Self::descriptor(name, "value", std::any::type_name::<T>(), None);
        desc.ttl_ms = Some(config.ttl_ms());
        let h = self.register_descriptor::<TtlValue<T>>(desc)?;
        let inner = ValueState::from_handle(h);
        self.ttl.push(TtlCleanup {
            id: inner.id(),
            ttl_ms: config.ttl_ms(),
            clock: config.clock.clone(),
        });
        Ok(TtlValueState { inner, config })
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
        };
        assert_eq!(cleanup.clean_key_group(store.as_mut(), 1).unwrap(), 2);
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
