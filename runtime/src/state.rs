//! Typed keyed state on top of the byte-level [`KeyedStateStore`]:
//! [`ValueState`], [`ListState`], [`MapState`], with postcard codecs.
//!
//! State handles are registered in a function's `open` through an
//! [`OpenContext`] and used in `process` through the [`KeyedContext`], which
//! scopes every access to the current key (as Flink's keyed state does).

use crate::error::{Result, RuntimeError};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sluice_core::heap::{HeapTable, HeapValue, KeyRef, Tracking, TypedAccess, TypedTable};
use sluice_core::{KeyGroupRange, KeyedStateStore, StateDescriptor, StateId};
use std::marker::PhantomData;
use std::sync::Arc;

/// Registers state in a keyed function's `open`.
pub struct OpenContext<'a> {
    pub(crate) store: &'a mut dyn KeyedStateStore,
    pub(crate) operator: &'a str,
    pub(crate) subtask: u32,
    pub(crate) states: &'a mut Vec<StateDescriptor>,
    /// The states of the restored checkpoint, and its description: a state
    /// registered with another kind or type is refused before its restored
    /// values are read as the new type.
    pub(crate) restored: Option<(&'a str, &'a [StateDescriptor])>,
    /// This subtask's key groups.
    pub(crate) range: KeyGroupRange,
    /// The states with a time-to-live, for their cleanup.
    pub(crate) ttl: &'a mut Vec<crate::ttl::TtlCleanup>,
}

impl OpenContext<'_> {
    /// This subtask's index.
    pub fn subtask(&self) -> u32 {
        self.subtask
    }

    /// Checks `desc` against this operator's other registrations and (but
    /// for evolvable states, which [`crate::schema`] checks) the restored
    /// checkpoint's.
    pub(crate) fn check(&mut self, desc: &StateDescriptor) -> Result<()> {
        match self.states.iter().find(|d| d.name == desc.name) {
            Some(d) if d != desc => {
                return Err(RuntimeError::InvalidJob(format!(
                    "operator {}: state {:?} is registered both as {} and as {}",
                    self.operator,
                    desc.name,
                    describe_state(d),
                    describe_state(desc)
                )))
            }
            Some(_) => {}
            None => self.states.push(desc.clone()),
        }
        if let Some((restore, written)) = self.restored.filter(|_| desc.schema.is_none()) {
            if let Some(w) = written
                .iter()
                .find(|w| w.name == desc.name && !restorable(w, desc))
            {
                return Err(changed_state(self.operator, restore, w, desc));
            }
        }
        Ok(())
    }

    pub(crate) fn descriptor(
        name: &str,
        kind: &str,
        value_type: &str,
        map_key_type: Option<&str>,
    ) -> StateDescriptor {
        StateDescriptor {
            name: name.to_string(),
            kind: kind.to_string(),
            value_type: value_type.to_string(),
            map_key_type: map_key_type.map(str::to_string),
            schema: None,
            ttl_ms: None,
        }
    }

    /// Registers the byte-level state `desc` describes (map state).
    pub(crate) fn register_bytes(&mut self, desc: StateDescriptor) -> Result<(StateId, Arc<str>)> {
        self.check(&desc)?;
        let id = self.store.register_state(&desc.name)?;
        Ok((id, Arc::from(format!("{}/{}", self.operator, desc.name))))
    }

    /// Registers a state whose values are `V` (a value state's `T`, a list
    /// state's `Vec<T>`): typed when the store keeps typed state.
    fn register_typed<V: HeapValue>(&mut self, name: &str, kind: &str, value_type: &str) -> Result<Handle> {
        self.register_descriptor::<V>(Self::descriptor(name, kind, value_type, None))
    }

    /// Registers the state `desc` describes, whose values are `V`.
    pub(crate) fn register_descriptor<V: HeapValue>(&mut self, desc: StateDescriptor) -> Result<Handle> {
        self.check(&desc)?;
        let name = desc.name.as_str();
        let what: Arc<str> = Arc::from(format!("{}/{name}", self.operator));
        let label = what.clone();
        let make = move |range: KeyGroupRange| -> Box<dyn TypedTable> {
            Box::new(HeapTable::<V>::new(range, label.clone()))
        };
        match self.store.register_typed(name, &make)? {
            Some(id) => Ok(Handle {
                id,
                what,
                typed: true,
            }),
            None => Ok(Handle {
                id: self.store.register_state(name)?,
                what,
                typed: false,
            }),
        }
    }

    /// A single value per key.
    pub fn value_state<T: HeapValue>(&mut self, name: &str) -> Result<ValueState<T>> {
        let h = self.register_typed::<T>(name, "value", std::any::type_name::<T>())?;
        Ok(ValueState { h, _t: PhantomData })
    }

    /// A list of values per key.
    pub fn list_state<T: HeapValue>(&mut self, name: &str) -> Result<ListState<T>> {
        let h = self.register_typed::<Vec<T>>(name, "list", std::any::type_name::<T>())?;
        Ok(ListState { h, _t: PhantomData })
    }

    /// A map per key.
    pub fn map_state<K: Serialize + DeserializeOwned, V: Serialize + DeserializeOwned>(
        &mut self,
        name: &str,
    ) -> Result<MapState<K, V>> {
        let (id, what) = self.register_bytes(Self::descriptor(
            name,
            "map",
            std::any::type_name::<V>(),
            Some(std::any::type_name::<K>()),
        ))?;
        Ok(MapState::from_parts(id, what))
    }
}

/// The error for a state registered with another kind or type than the
/// restored checkpoint's.
pub(crate) fn changed_state(
    operator: &str,
    restore: &str,
    written: &StateDescriptor,
    now: &StateDescriptor,
) -> RuntimeError {
    RuntimeError::Storage(sluice_core::Error::Incompatible {
        what: format!("state {:?} of operator {operator} in {restore}", written.name),
        reason: format!(
            "it was written as {}, the job now registers it as {}; keep the type, or register \
             the new state under a new name (or give the operator a new uid)",
            describe_state(written),
            describe_state(now)
        ),
    })
}

/// Whether a state written as `w` restores into the registration `d`
/// (the same everything; a time-to-live may change its duration, not be
/// added or removed, as in Flink).
fn restorable(w: &StateDescriptor, d: &StateDescriptor) -> bool {
    w.name == d.name
        && w.kind == d.kind
        && w.value_type == d.value_type
        && w.map_key_type == d.map_key_type
        && w.schema == d.schema
        && w.ttl_ms.is_some() == d.ttl_ms.is_some()
}

/// `value state of u64`, `map state of String -> u64`, `value state of
/// schema bank.Account v2`, `… with a time-to-live`.
pub(crate) fn describe_state(d: &StateDescriptor) -> String {
    let values = match &d.schema {
        Some(s) => s.to_string(),
        None => d.value_type.clone(),
    };
    let ttl = if d.ttl_ms.is_some() {
        " with a time-to-live"
    } else {
        ""
    };
    match &d.map_key_type {
        Some(k) => format!("{} state of {k} -> {values}{ttl}", d.kind),
        None => format!("{} state of {values}{ttl}", d.kind),
    }
}

/// Access to keyed state scoped to the record being processed.
pub struct KeyedContext<'a> {
    pub(crate) store: &'a mut dyn KeyedStateStore,
    pub(crate) key_group: u32,
    /// The key's stable hash (its key group's source), computed once per record.
    pub(crate) hash: u64,
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

/// A registered state: its id, its name for errors, and whether the store
/// keeps it typed.
#[derive(Clone)]
pub(crate) struct Handle {
    id: StateId,
    what: Arc<str>,
    typed: bool,
}

impl Handle {
    /// The current key and the state's typed table, with the store's
    /// change tracking.
    #[inline]
    fn table<'c, V: HeapValue>(
        &self,
        ctx: &'c mut KeyedContext<'_>,
    ) -> Result<(KeyRef<'c>, &'c mut HeapTable<V>, Option<Tracking<'c>>)> {
        let key = KeyRef {
            bytes: ctx.key,
            hash: ctx.hash,
            key_group: ctx.key_group,
        };
        let TypedAccess { table, tracking } = ctx.store.typed(self.id).ok_or_else(|| self.lost())?;
        let table = table
            .as_any_mut()
            .downcast_mut::<HeapTable<V>>()
            .ok_or_else(|| self.lost())?;
        Ok((key, table, tracking))
    }

    /// Runs `f` on the current key's value in the state's typed table.
    #[inline]
    fn typed<V: HeapValue, R>(
        &self,
        ctx: &mut KeyedContext<'_>,
        f: impl FnOnce(&mut Option<V>) -> R,
    ) -> Result<R> {
        let (key, table, tracking) = self.table(ctx)?;
        Ok(table.update(&key, tracking, f)?)
    }

    /// Reads the current key's value in the state's typed table.
    #[inline]
    fn typed_get<V: HeapValue, R>(
        &self,
        ctx: &mut KeyedContext<'_>,
        f: impl FnOnce(Option<&V>) -> R,
    ) -> Result<R> {
        let (key, table, _) = self.table(ctx)?;
        Ok(f(table.get(&key)?))
    }

    /// Reads and decodes the current key's value through the byte-level
    /// store.
    fn decode<V: DeserializeOwned>(&self, ctx: &mut KeyedContext<'_>) -> Result<Option<V>> {
        if ctx.store.get(self.id, ctx.key_group, ctx.key, ctx.buf)? {
            decode(&self.what, ctx.buf).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Encodes and writes `value` as the current key's through the
    /// byte-level store.
    fn encode<V: Serialize + ?Sized>(&self, ctx: &mut KeyedContext<'_>, value: &V) -> Result<()> {
        encode_into(&self.what, value, ctx.buf)?;
        ctx.store.put(self.id, ctx.key_group, ctx.key, ctx.buf)?;
        Ok(())
    }

    /// Removes the current key's value (typed or not: the store's
    /// byte-level delete covers both).
    fn clear(&self, ctx: &mut KeyedContext<'_>) -> Result<()> {
        Ok(ctx.store.delete(self.id, ctx.key_group, ctx.key)?)
    }

    fn lost(&self) -> RuntimeError {
        RuntimeError::Codec {
            what: self.what.to_string(),
            reason: "the state store no longer holds this typed state with its registered type".into(),
        }
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

/// One value per key (Flink's `ValueState`). On a store that keeps typed
/// state (the memory backend) the value lives as a `T`; elsewhere it is
/// encoded with postcard on every access.
pub struct ValueState<T> {
    h: Handle,
    _t: PhantomData<fn() -> T>,
}

impl<T> Clone for ValueState<T> {
    fn clone(&self) -> Self {
        ValueState {
            h: self.h.clone(),
            _t: PhantomData,
        }
    }
}

impl<T> ValueState<T> {
    pub(crate) fn from_handle(h: Handle) -> Self {
        ValueState { h, _t: PhantomData }
    }

    pub(crate) fn id(&self) -> StateId {
        self.h.id
    }
}

impl<T: HeapValue> ValueState<T> {
    /// The current key's value.
    #[inline]
    pub fn get(&self, ctx: &mut KeyedContext<'_>) -> Result<Option<T>> {
        if self.h.typed {
            self.h.typed_get(ctx, |v: Option<&T>| v.cloned())
        } else {
            self.h.decode(ctx)
        }
    }

    /// Sets the current key's value.
    #[inline]
    pub fn set(&self, ctx: &mut KeyedContext<'_>, value: &T) -> Result<()> {
        if self.h.typed {
            self.h.typed(ctx, |v| *v = Some(value.clone()))
        } else {
            self.h.encode(ctx, value)
        }
    }

    /// Updates the current key's value in place: `f` sees it (`None` when
    /// absent) and may change, set or clear it; returns what `f` returns.
    /// On typed state this is one hash probe (a `get` then a `set` are two);
    /// the crate-level example counts a running sum with it.
    #[inline]
    pub fn update<R>(&self, ctx: &mut KeyedContext<'_>, f: impl FnOnce(&mut Option<T>) -> R) -> Result<R> {
        if self.h.typed {
            return self.h.typed(ctx, f);
        }
        let mut value = self.h.decode::<T>(ctx)?;
        let existed = value.is_some();
        let r = f(&mut value);
        match value {
            Some(v) => self.h.encode(ctx, &v)?,
            None if existed => self.h.clear(ctx)?,
            None => {}
        }
        Ok(r)
    }

    /// Removes the current key's value.
    pub fn clear(&self, ctx: &mut KeyedContext<'_>) -> Result<()> {
        self.h.clear(ctx)
    }
}

/// A list of values per key (Flink's `ListState`), stored as one value (a
/// `Vec<T>` on a store that keeps typed state: `add` appends in place).
pub struct ListState<T> {
    h: Handle,
    _t: PhantomData<fn() -> T>,
}

impl<T> Clone for ListState<T> {
    fn clone(&self) -> Self {
        ListState {
            h: self.h.clone(),
            _t: PhantomData,
        }
    }
}

impl<T> ListState<T> {
    pub(crate) fn from_handle(h: Handle) -> Self {
        ListState { h, _t: PhantomData }
    }

    pub(crate) fn id(&self) -> StateId {
        self.h.id
    }
}

impl<T: HeapValue> ListState<T> {
    /// The current key's list (empty if none).
    pub fn get(&self, ctx: &mut KeyedContext<'_>) -> Result<Vec<T>> {
        if self.h.typed {
            self.h
                .typed_get(ctx, |l: Option<&Vec<T>>| l.cloned().unwrap_or_default())
        } else {
            Ok(self.h.decode(ctx)?.unwrap_or_default())
        }
    }

    /// Appends a value to the current key's list.
    pub fn add(&self, ctx: &mut KeyedContext<'_>, value: T) -> Result<()> {
        if self.h.typed {
            return self.h.typed(ctx, |l: &mut Option<Vec<T>>| {
                l.get_or_insert_with(Vec::new).push(value)
            });
        }
        let mut list = self.get(ctx)?;
        list.push(value);
        self.update(ctx, &list)
    }

    /// Replaces the current key's list.
    pub fn update(&self, ctx: &mut KeyedContext<'_>, values: &[T]) -> Result<()> {
        if self.h.typed {
            self.h.typed(ctx, |l| *l = Some(values.to_vec()))
        } else {
            self.h.encode(ctx, values)
        }
    }

    /// Removes the current key's list.
    pub fn clear(&self, ctx: &mut KeyedContext<'_>) -> Result<()> {
        self.h.clear(ctx)
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

impl<K, V> MapState<K, V> {
    pub(crate) fn from_parts(id: StateId, what: Arc<str>) -> Self {
        MapState {
            id,
            what,
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
