//! Typed keyed state on top of the byte-level [`KeyedStateStore`]:
//! [`ValueState`], [`ListState`], [`MapState`], with postcard codecs.
//!
//! State handles are registered in a function's `open` through an
//! [`OpenContext`] and used in `process` through the [`KeyedContext`], which
//! scopes every access to the current key (as Flink's keyed state does).

use crate::error::{Result, RuntimeError};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sluice_core::{KeyedStateStore, StateDescriptor, StateId};
use std::marker::PhantomData;
use std::sync::Arc;

/// Registers state in a keyed function's `open`.
pub struct OpenContext<'a> {
    pub(crate) store: &'a mut dyn KeyedStateStore,
    pub(crate) operator: &'a str,
    pub(crate) subtask: u32,
    pub(crate) states: &'a mut Vec<StateDescriptor>,
}

impl OpenContext<'_> {
    /// This subtask's index.
    pub fn subtask(&self) -> u32 {
        self.subtask
    }

    fn register(
        &mut self,
        name: &str,
        kind: &str,
        value_type: &str,
        map_key_type: Option<&str>,
    ) -> Result<(StateId, Arc<str>)> {
        let desc = StateDescriptor {
            name: name.to_string(),
            kind: kind.to_string(),
            value_type: value_type.to_string(),
            map_key_type: map_key_type.map(str::to_string),
        };
        match self.states.iter().find(|d| d.name == name) {
            Some(d) if *d != desc => {
                return Err(RuntimeError::InvalidJob(format!(
                    "operator {}: state {name:?} is registered both as {} and as {}",
                    self.operator,
                    describe_state(d),
                    describe_state(&desc)
                )))
            }
            Some(_) => {}
            None => self.states.push(desc),
        }
        let id = self.store.register_state(name)?;
        Ok((id, Arc::from(format!("{}/{name}", self.operator))))
    }

    /// A single value per key.
    pub fn value_state<T: Serialize + DeserializeOwned>(&mut self, name: &str) -> Result<ValueState<T>> {
        let (id, what) = self.register(name, "value", std::any::type_name::<T>(), None)?;
        Ok(ValueState {
            id,
            what,
            _t: PhantomData,
        })
    }

    /// A list of values per key.
    pub fn list_state<T: Serialize + DeserializeOwned>(&mut self, name: &str) -> Result<ListState<T>> {
        let (id, what) = self.register(name, "list", std::any::type_name::<T>(), None)?;
        Ok(ListState {
            id,
            what,
            _t: PhantomData,
        })
    }

    /// A map per key.
    pub fn map_state<K: Serialize + DeserializeOwned, V: Serialize + DeserializeOwned>(
        &mut self,
        name: &str,
    ) -> Result<MapState<K, V>> {
        let (id, what) = self.register(
            name,
            "map",
            std::any::type_name::<V>(),
            Some(std::any::type_name::<K>()),
        )?;
        Ok(MapState {
            id,
            what,
            _t: PhantomData,
        })
    }
}

/// `value state of u64`, `map state of String -> u64`.
pub(crate) fn describe_state(d: &StateDescriptor) -> String {
    match &d.map_key_type {
        Some(k) => format!("{} state of {k} -> {}", d.kind, d.value_type),
        None => format!("{} state of {}", d.kind, d.value_type),
    }
}

/// Access to keyed state scoped to the record being processed.
pub struct KeyedContext<'a> {
    pub(crate) store: &'a mut dyn KeyedStateStore,
    pub(crate) key_group: u32,
    pub(crate) key: &'a [u8],
    pub(crate) buf: &'a mut Vec<u8>,
    pub(crate) scratch: &'a mut Vec<u8>,
}

impl KeyedContext<'_> {
    /// The key group of the current key.
    pub fn key_group(&self) -> u32 {
        self.key_group
    }
}

fn decode<T: DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T> {
    postcard::from_bytes(bytes).map_err(|e| RuntimeError::Codec {
        what: what.to_string(),
        reason: format!("{e} (was the state written with another type?)"),
    })
}

fn encode_into<T: Serialize + ?Sized>(what: &str, value: &T, buf: &mut Vec<u8>) -> Result<()> {
    buf.clear();
    let v = postcard::to_extend(value, std::mem::take(buf)).map_err(|e| RuntimeError::Codec {
        what: what.to_string(),
        reason: e.to_string(),
    })?;
    *buf = v;
    Ok(())
}

/// One value per key (Flink's `ValueState`).
pub struct ValueState<T> {
    id: StateId,
    what: Arc<str>,
    _t: PhantomData<fn() -> T>,
}

impl<T> Clone for ValueState<T> {
    fn clone(&self) -> Self {
        ValueState {
            id: self.id,
            what: self.what.clone(),
            _t: PhantomData,
        }
    }
}

impl<T: Serialize + DeserializeOwned> ValueState<T> {
    /// The current key's value.
    #[inline]
    pub fn get(&self, ctx: &mut KeyedContext<'_>) -> Result<Option<T>> {
        if ctx.store.get(self.id, ctx.key_group, ctx.key, ctx.buf)? {
            decode(&self.what, ctx.buf).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Sets the current key's value.
    #[inline]
    pub fn set(&self, ctx: &mut KeyedContext<'_>, value: &T) -> Result<()> {
        encode_into(&self.what, value, ctx.buf)?;
        ctx.store.put(self.id, ctx.key_group, ctx.key, ctx.buf)?;
        Ok(())
    }

    /// Removes the current key's value.
    pub fn clear(&self, ctx: &mut KeyedContext<'_>) -> Result<()> {
        Ok(ctx.store.delete(self.id, ctx.key_group, ctx.key)?)
    }
}

/// A list of values per key (Flink's `ListState`), stored as one value.
pub struct ListState<T> {
    id: StateId,
    what: Arc<str>,
    _t: PhantomData<fn() -> T>,
}

impl<T> Clone for ListState<T> {
    fn clone(&self) -> Self {
        ListState {
            id: self.id,
            what: self.what.clone(),
            _t: PhantomData,
        }
    }
}

impl<T: Serialize + DeserializeOwned> ListState<T> {
    /// The current key's list (empty if none).
    pub fn get(&self, ctx: &mut KeyedContext<'_>) -> Result<Vec<T>> {
        if ctx.store.get(self.id, ctx.key_group, ctx.key, ctx.buf)? {
            decode(&self.what, ctx.buf)
        } else {
            Ok(Vec::new())
        }
    }

    /// Appends a value to the current key's list.
    pub fn add(&self, ctx: &mut KeyedContext<'_>, value: T) -> Result<()> {
        let mut list = self.get(ctx)?;
        list.push(value);
        self.update(ctx, &list)
    }

    /// Replaces the current key's list.
    pub fn update(&self, ctx: &mut KeyedContext<'_>, values: &[T]) -> Result<()> {
        encode_into(&self.what, values, ctx.buf)?;
        ctx.store.put(self.id, ctx.key_group, ctx.key, ctx.buf)?;
        Ok(())
    }

    /// Removes the current key's list.
    pub fn clear(&self, ctx: &mut KeyedContext<'_>) -> Result<()> {
        Ok(ctx.store.delete(self.id, ctx.key_group, ctx.key)?)
    }
}

/// A map per key (Flink's `MapState`). Each entry is one store entry whose
/// key is the current key's bytes, length-prefixed, followed by the map key's
/// bytes, so the entries of one key are a prefix scan.
pub struct MapState<K, V> {
    id: StateId,
    what: Arc<str>,
    _t: PhantomData<fn() -> (K, V)>,
}

impl<K, V> Clone for MapState<K, V> {
    fn clone(&self) -> Self {
        MapState {
            id: self.id,
            what: self.what.clone(),
            _t: PhantomData,
        }
    }
}

impl<K: Serialize + DeserializeOwned, V: Serialize + DeserializeOwned> MapState<K, V> {
    fn prefix(ctx: &mut KeyedContext<'_>) {
        ctx.scratch.clear();
        ctx.scratch
            .extend_from_slice(&(ctx.key.len() as u32).to_le_bytes());
        ctx.scratch.extend_from_slice(ctx.key);
    }

    fn entry_key(&self, ctx: &mut KeyedContext<'_>, map_key: &K) -> Result<()> {
        Self::prefix(ctx);
        let k =
            postcard::to_extend(map_key, std::mem::take(ctx.scratch)).map_err(|e| RuntimeError::Codec {
                what: self.what.to_string(),
                reason: e.to_string(),
            })?;
        *ctx.scratch = k;
        Ok(())
    }

    /// The value under `map_key` for the current key.
    pub fn get(&self, ctx: &mut KeyedContext<'_>, map_key: &K) -> Result<Option<V>> {
        self.entry_key(ctx, map_key)?;
        if ctx.store.get(self.id, ctx.key_group, ctx.scratch, ctx.buf)? {
            decode(&self.what, ctx.buf).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Inserts or replaces `map_key -> value` for the current key.
    pub fn put(&self, ctx: &mut KeyedContext<'_>, map_key: &K, value: &V) -> Result<()> {
        self.entry_key(ctx, map_key)?;
        encode_into(&self.what, value, ctx.buf)?;
        ctx.store.put(self.id, ctx.key_group, ctx.scratch, ctx.buf)?;
        Ok(())
    }

    /// Removes `map_key` for the current key.
    pub fn remove(&self, ctx: &mut KeyedContext<'_>, map_key: &K) -> Result<()> {
        self.entry_key(ctx, map_key)?;
        Ok(ctx.store.delete(self.id, ctx.key_group, ctx.scratch)?)
    }

    /// All entries of the current key, in unspecified order.
    pub fn entries(&self, ctx: &mut KeyedContext<'_>) -> Result<Vec<(K, V)>> {
        Self::prefix(ctx);
        let plen = ctx.scratch.len();
        let mut raw: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        ctx.store
            .scan_prefix(self.id, ctx.key_group, ctx.scratch, &mut |k, v| {
                raw.push((k[plen..].to_vec(), v.to_vec()));
                Ok(())
            })?;
        raw.into_iter()
            .map(|(k, v)| Ok((decode(&self.what, &k)?, decode(&self.what, &v)?)))
            .collect()
    }
}
