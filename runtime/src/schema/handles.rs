//! The handles of evolvable states: [`ValueState`], [`ListState`] and
//! [`MapState`]'s access, with the values stored as [`Evolving`] (CBOR).

use super::{Evolvable, Evolving};
use crate::error::Result;
use crate::state::{ListState, MapState, ValueState};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// One evolvable value per key (see [`crate::schema`]): the same access as
/// [`ValueState`], with `T` stored in CBOR.
pub struct EvolvableValueState<T> {
    pub(super) inner: ValueState<Evolving<T>>,
}

impl<T> Clone for EvolvableValueState<T> {
    fn clone(&self) -> Self {
        EvolvableValueState {
            inner: self.inner.clone(),
        }
    }
}

impl<T: Evolvable> EvolvableValueState<T> {
    /// The current key's value.
    pub fn get(&self, ctx: &mut crate::KeyedContext<'_>) -> Result<Option<T>> {
        Ok(self.inner.get(ctx)?.map(|e| e.0))
    }

    /// Sets the current key's value.
    pub fn set(&self, ctx: &mut crate::KeyedContext<'_>, value: T) -> Result<()> {
        self.inner.update(ctx, |slot| *slot = Some(Evolving(value)))
    }

    /// Reads and changes the current key's value in one access (`None`:
    /// no value; leaving `None` removes it).
    pub fn update<R>(
        &self,
        ctx: &mut crate::KeyedContext<'_>,
        f: impl FnOnce(&mut Option<T>) -> R,
    ) -> Result<R> {
        self.inner.update(ctx, |slot| {
            let mut v = slot.take().map(|e| e.0);
            let r = f(&mut v);
            *slot = v.map(Evolving);
            r
        })
    }

    /// Removes the current key's value.
    pub fn clear(&self, ctx: &mut crate::KeyedContext<'_>) -> Result<()> {
        self.inner.clear(ctx)
    }
}

/// A list of evolvable values per key: [`ListState`]'s access, with each
/// `T` stored in CBOR.
pub struct EvolvableListState<T> {
    pub(super) inner: ListState<Evolving<T>>,
}

impl<T> Clone for EvolvableListState<T> {
    fn clone(&self) -> Self {
        EvolvableListState {
            inner: self.inner.clone(),
        }
    }
}

impl<T: Evolvable> EvolvableListState<T> {
    /// The current key's list (empty if none).
    pub fn get(&self, ctx: &mut crate::KeyedContext<'_>) -> Result<Vec<T>> {
        Ok(self.inner.get(ctx)?.into_iter().map(|e| e.0).collect())
    }

    /// Appends a value to the current key's list.
    pub fn add(&self, ctx: &mut crate::KeyedContext<'_>, value: T) -> Result<()> {
        self.inner.add(ctx, Evolving(value))
    }

    /// Replaces the current key's list.
    pub fn update(&self, ctx: &mut crate::KeyedContext<'_>, values: Vec<T>) -> Result<()> {
        let values: Vec<Evolving<T>> = values.into_iter().map(Evolving).collect();
        self.inner.update(ctx, &values)
    }

    /// Removes the current key's list.
    pub fn clear(&self, ctx: &mut crate::KeyedContext<'_>) -> Result<()> {
        self.inner.clear(ctx)
    }
}

/// A map per key with evolvable values: [`MapState`]'s access, with each
/// value stored in CBOR.
pub struct EvolvableMapState<K, V> {
    pub(super) inner: MapState<K, Evolving<V>>,
}

impl<K, V> Clone for EvolvableMapState<K, V> {
    fn clone(&self) -> Self {
        EvolvableMapState {
            inner: self.inner.clone(),
        }
    }
}

impl<K: Serialize + DeserializeOwned, V: Evolvable> EvolvableMapState<K, V> {
    /// The value under `map_key` for the current key.
    pub fn get(&self, ctx: &mut crate::KeyedContext<'_>, map_key: &K) -> Result<Option<V>> {
        Ok(self.inner.get(ctx, map_key)?.map(|e| e.0))
    }

    /// Inserts or replaces `map_key -> value` for the current key.
    pub fn put(&self, ctx: &mut crate::KeyedContext<'_>, map_key: &K, value: V) -> Result<()> {
        self.inner.put(ctx, map_key, &Evolving(value))
    }

    /// Removes `map_key` for the current key.
    pub fn remove(&self, ctx: &mut crate::KeyedContext<'_>, map_key: &K) -> Result<()> {
        self.inner.remove(ctx, map_key)
    }

    /// All entries of the current key, in unspecified order.
    pub fn entries(&self, ctx: &mut crate::KeyedContext<'_>) -> Result<Vec<(K, V)>> {
        Ok(self
            .inner
            .entries(ctx)?
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect())
    }
}
