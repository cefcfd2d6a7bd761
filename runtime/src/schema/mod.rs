//! Evolvable state: values with a declared, versioned schema, so a job's
//! next version can read the state its previous version left — value,
//! list and map states ([`OpenContext::evolvable_value_state_with`],
//! [`OpenContext::evolvable_list_state_with`],
//! [`OpenContext::evolvable_map_state_with`]; a map's keys stay fixed).
//!
//! A type opts in with [`Evolvable`] (a schema name that stays when the
//! Rust type is renamed or moved, and a version). Its values are stored in
//! CBOR (RFC 8949, via `ciborium`), which is self-describing — structs are
//! maps from field names to values — so serde's own attributes carry the
//! compatible changes with no code: a field added with `#[serde(default)]`,
//! a field removed (unknown fields are skipped), a field renamed with
//! `#[serde(alias = "old")]`. Anything else takes a [`Migration`]: a
//! function from the previous type (`Old -> Option<New>`; `None` drops the
//! entry), run over the restored state when the job opens it, before any
//! record is processed.
//!
//! At restore the state's recorded schema decides (see
//! [`OpenContext::evolvable_value_state_with`]): the same schema and
//! version restores as is; a migration from the recorded schema and version
//! runs; another version of the same schema without a migration is read
//! back value by value as the new type and written again in the new version
//! (so that a later version may drop what only this one still reads, such
//! as an alias), and the job is refused if one does not read (naming the
//! operator, the state, both versions and the key);
//! another schema without a migration is refused.

use crate::error::{Result, RuntimeError};
use crate::state::{ListState, MapState, OpenContext, ValueState};

mod handles;
pub use handles::{EvolvableListState, EvolvableMapState, EvolvableValueState};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sluice_core::{KeyGroupRange, KeyedStateStore, SchemaId, StateDescriptor, StateId};
use std::marker::PhantomData;
use std::sync::Arc;

/// A state value type with a declared, versioned schema (see the module).
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use sluice_runtime::schema::Evolvable;
///
/// #[derive(Clone, Serialize, Deserialize)]
/// struct Account {
///     balance: i64,
///     // Added in version 2: version-1 values read with the default.
///     #[serde(default)]
///     currency: String,
/// }
///
/// impl Evolvable for Account {
///     const SCHEMA: &'static str = "bank.Account";
///     const VERSION: u32 = 2;
/// }
/// ```
pub trait Evolvable: Serialize + DeserializeOwned + Clone + Send + Sync + 'static {
    /// The schema's name: the state's identity across versions of the job.
    const SCHEMA: &'static str;
    /// The schema's version: raise it with every change of the type.
    const VERSION: u32;

    /// The schema as recorded in checkpoint metadata.
    fn schema_id() -> SchemaId {
        SchemaId {
            name: Self::SCHEMA.to_string(),
            version: Self::VERSION,
        }
    }
}

/// An evolvable value as stored: its CBOR encoding, as one byte string of
/// the surrounding format (postcard in the state stores and snapshots).
#[derive(Clone, Debug, PartialEq)]
pub struct Evolving<T>(pub T);

/// `value` in CBOR.
pub fn to_cbor<T: Serialize>(value: &T) -> std::result::Result<Vec<u8>, String> {
    let mut out = Vec::new();
    ciborium::into_writer(value, &mut out).map_err(|e| e.to_string())?;
    Ok(out)
}

/// A `T` from CBOR.
pub fn from_cbor<T: DeserializeOwned>(bytes: &[u8]) -> std::result::Result<T, String> {
    ciborium::from_reader(bytes).map_err(|e| e.to_string())
}

impl<T: Serialize> Serialize for Evolving<T> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let bytes = to_cbor(&self.0).map_err(serde::ser::Error::custom)?;
        s.serialize_bytes(&bytes)
    }
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for Evolving<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<T: DeserializeOwned> serde::de::Visitor<'_> for V<T> {
            type Value = Evolving<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a CBOR-encoded value")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> std::result::Result<Self::Value, E> {
                from_cbor(v).map(Evolving).map_err(E::custom)
            }
        }
        d.deserialize_bytes(V(PhantomData))
    }
}

/// A rewrite of one stored value: a new value, or `None` to drop it.
type Step = Arc<dyn Fn(&[u8]) -> std::result::Result<Option<Vec<u8>>, String> + Send + Sync>;

/// One step of a [`Migration`], as it applies to each kind of state: a
/// value state's value and a map state's entry are one `Old`; a list
/// state's value is a list of them (elements the function drops leave the
/// list; an emptied list is removed).
#[derive(Clone)]
struct Steps {
    single: Step,
    list: Step,
}

impl Steps {
    fn for_kind(&self, kind: &str) -> Step {
        match kind {
            "list" => self.list.clone(),
            _ => self.single.clone(),
        }
    }

    /// The steps of `f` over values decoded by `decode` (the written form
    /// of one `Old`).
    fn of<Old: 'static, New: Serialize + 'static>(
        decode_one: fn(&[u8]) -> std::result::Result<Old, String>,
        decode_list: fn(&[u8]) -> std::result::Result<Vec<Old>, String>,
        f: Arc<dyn Fn(Old) -> Option<New> + Send + Sync>,
    ) -> Steps {
        let g = f.clone();
        let single: Step = Arc::new(move |bytes: &[u8]| encode_new(f(decode_one(bytes)?)));
        let list: Step = Arc::new(move |bytes: &[u8]| {
            let new: Vec<Evolving<New>> = decode_list(bytes)?
                .into_iter()
                .filter_map(|o| g(o).map(Evolving))
                .collect();
            match new.is_empty() {
                true => Ok(None),
                false => postcard::to_allocvec(&new).map(Some).map_err(|e| e.to_string()),
            }
        });
        Steps { single, list }
    }
}

/// How values written as an earlier type become `New` (see the module).
pub struct Migration<New> {
    steps: Vec<(Written, Steps)>,
    _t: PhantomData<fn() -> New>,
}

impl<New> Clone for Migration<New> {
    fn clone(&self) -> Self {
        Migration {
            steps: self.steps.clone(),
            _t: PhantomData,
        }
    }
}

/// What a migration step reads: an evolvable schema and version, or a
/// fixed (postcard) type by its Rust name.
#[derive(Clone, Debug, PartialEq)]
enum Written {
    Schema(SchemaId),
    Fixed(String),
}

impl Written {
    fn of(d: &StateDescriptor) -> Written {
        match &d.schema {
            Some(s) => Written::Schema(s.clone()),
            None => Written::Fixed(d.value_type.clone()),
        }
    }
}

impl std::fmt::Display for Written {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Written::Schema(s) => s.fmt(f),
            Written::Fixed(t) => write!(f, "the fixed type {t}"),
        }
    }
}

impl<New: Evolvable> Default for Migration<New> {
    fn default() -> Self {
        Self::new()
    }
}

impl<New: Evolvable> Migration<New> {
    /// No steps: only compatible changes of `New`'s own schema restore.
    pub fn new() -> Self {
        Migration {
            steps: Vec::new(),
            _t: PhantomData,
        }
    }

    /// Values written as `Old` (its schema and version) become `f(old)`;
    /// `None` drops the entry.
    pub fn from<Old: Evolvable>(mut self, f: impl Fn(Old) -> Option<New> + Send + Sync + 'static) -> Self {
        let steps = Steps::of::<Old, New>(
            |b| {
                postcard::from_bytes::<Evolving<Old>>(b)
                    .map(|e| e.0)
                    .map_err(|e| e.to_string())
            },
            |b| {
                postcard::from_bytes::<Vec<Evolving<Old>>>(b)
                    .map(|v| v.into_iter().map(|e| e.0).collect())
                    .map_err(|e| e.to_string())
            },
            Arc::new(f),
        );
        self.steps.push((Written::Schema(Old::schema_id()), steps));
        self
    }

    /// Values written as the fixed (postcard) type `Old` — a state that was
    /// not evolvable — become `f(old)`; `None` drops the entry. The step
    /// applies to a state recorded under `Old`'s Rust type name
    /// (`std::any::type_name`); when the old type has moved or been renamed
    /// since, use [`from_fixed_named`](Self::from_fixed_named).
    pub fn from_fixed<Old: Serialize + DeserializeOwned + 'static>(
        self,
        f: impl Fn(Old) -> Option<New> + Send + Sync + 'static,
    ) -> Self {
        self.from_fixed_named::<Old>(std::any::type_name::<Old>(), f)
    }

    /// [`from_fixed`](Self::from_fixed) for a state recorded under the
    /// type name `recorded` (as a refusal names it, or `sluice inspect`
    /// shows it), read as `Old`: for an old type that has moved to another
    /// module or been renamed (`Balance` kept as `BalanceV1`). `Old` must
    /// have the recorded type's shape — postcard is positional, so the
    /// fields in the same order with the same types.
    ///
    /// ```
    /// use serde::{Deserialize, Serialize};
    /// use sluice_runtime::schema::{Evolvable, Migration};
    ///
    /// /// What version 1 stored as `bank::Balance`, now kept under another name.
    /// #[derive(Serialize, Deserialize)]
    /// struct BalanceV1 { cents: i64 }
    ///
    /// #[derive(Clone, Serialize, Deserialize)]
    /// struct Balance { cents: i64, currency: String }
    /// impl Evolvable for Balance {
    ///     const SCHEMA: &'static str = "bank.Balance";
    ///     const VERSION: u32 = 1;
    /// }
    ///
    /// let migration = Migration::<Balance>::new().from_fixed_named::<BalanceV1>(
    ///     "bank::Balance",
    ///     |old| Some(Balance { cents: old.cents, currency: "EUR".into() }),
    /// );
    /// # let _ = migration;
    /// ```
    pub fn from_fixed_named<Old: Serialize + DeserializeOwned + 'static>(
        mut self,
        recorded: &str,
        f: impl Fn(Old) -> Option<New> + Send + Sync + 'static,
    ) -> Self {
        let steps = Steps::of::<Old, New>(
            |b| postcard::from_bytes::<Old>(b).map_err(|e| e.to_string()),
            |b| postcard::from_bytes::<Vec<Old>>(b).map_err(|e| e.to_string()),
            Arc::new(f),
        );
        self.steps.push((Written::Fixed(recorded.to_string()), steps));
        self
    }

    fn step(&self, written: &Written, kind: &str) -> Option<Step> {
        self.steps
            .iter()
            .find(|(w, _)| w == written)
            .map(|(_, s)| s.for_kind(kind))
    }
}

fn encode_new<New: Serialize>(new: Option<New>) -> std::result::Result<Option<Vec<u8>>, String> {
    new.map(|n| postcard::to_allocvec(&Evolving(n)).map_err(|e| e.to_string()))
        .transpose()
}

/// What a restore does with an evolvable state's recorded values.
enum Plan {
    /// Nothing to do: the same schema and version, or nothing restored.
    Keep,
    /// Rewrite every value with a migration step.
    Migrate(Written, Step),
    /// Another version of the same schema: read every value as the new
    /// type and write it back in the new version.
    Reencode(SchemaId),
}

/// Decides what a restore does with the recorded `written` state for
/// `desc` (the new registration), or refuses.
fn plan<New: Evolvable>(
    operator: &str,
    restore: &str,
    written: &StateDescriptor,
    desc: &StateDescriptor,
    migration: &Migration<New>,
) -> Result<Plan> {
    let refuse = |reason: String| {
        RuntimeError::Storage(sluice_core::Error::Incompatible {
            what: format!("state {:?} of operator {operator} in {restore}", desc.name),
            reason,
        })
    };
    if written.kind != desc.kind {
        return Err(refuse(format!(
            "it was written as a {} state, the job registers a {} state",
            written.kind, desc.kind
        )));
    }
    if written.map_key_type != desc.map_key_type {
        return Err(refuse(format!(
            "its map keys were written as {}, the job's are {}; map keys cannot change (they are part of \
             the stored keys): register the new state under a new name",
            written.map_key_type.as_deref().unwrap_or("none"),
            desc.map_key_type.as_deref().unwrap_or("none")
        )));
    }
    if written.ttl_ms.is_some() {
        return Err(refuse(
            "it was written with a time-to-live, the job registers it without one; a time-to-live cannot \
             be added or removed on restore"
                .into(),
        ));
    }
    let from = Written::of(written);
    if written.schema == desc.schema {
        return Ok(Plan::Keep);
    }
    if let Some(step) = migration.step(&from, &desc.kind) {
        return Ok(Plan::Migrate(from, step));
    }
    let new = New::schema_id();
    match &written.schema {
        Some(s) if s.name == new.name => Ok(Plan::Reencode(s.clone())),
        Some(_) => Err(refuse(format!(
            "it was written as {from}, the job registers {new}, and no migration reads {from}: add one \
             (Migration::from), or register the new state under a new name"
        ))),
        None => Err(refuse(format!(
            "it was written as {from}, the job registers {new}, and no migration reads {from}: add one \
             (Migration::from_fixed, or from_fixed_named({:?}) if that type has moved or been renamed), \
             or register the new state under a new name",
            written.value_type
        ))),
    }
}

impl OpenContext<'_> {
    /// The descriptor of an evolvable state of `kind` with values `T`.
    fn evolvable_descriptor<T: Evolvable>(
        name: &str,
        kind: &str,
        map_key_type: Option<&str>,
    ) -> StateDescriptor {
        StateDescriptor {
            schema: Some(T::schema_id()),
            ..Self::descriptor(name, kind, std::any::type_name::<T>(), map_key_type)
        }
    }

    /// Decides what the restored state `desc.name` needs and does it:
    /// nothing, a migration of every value, or every value read as `T` and
    /// written back in `T`'s version (see [`crate::schema`]).
    fn prepare_evolvable<T: Evolvable>(
        &mut self,
        desc: &StateDescriptor,
        migration: &Migration<T>,
    ) -> Result<()> {
        // A second registration of the name with another type is refused
        // before anything is migrated; a second one with the same type
        // finds the values migrated already.
        let first = !self.states.iter().any(|d| d.name == desc.name);
        self.check(desc)?;
        if !first {
            return Ok(());
        }
        let name = desc.name.as_str();
        let written = self
            .restored
            .and_then(|(restore, states)| states.iter().find(|w| w.name == name).map(|w| (restore, w)));
        let Some((restore, w)) = written else {
            return Ok(());
        };
        let plan = plan(self.operator, restore, w, desc, migration)?;
        let (operator, restore) = (self.operator.to_string(), restore.to_string());
        let range = self.range;
        let id = self.store.register_state(name)?;
        match plan {
            Plan::Keep => {}
            Plan::Migrate(from, step) => {
                let n = rewrite_values(self.store, id, range, &|v| step(v)).map_err(|e| match e {
                    ValueError::Store(e) => RuntimeError::Storage(e),
                    ValueError::Value { key, reason } => {
                        RuntimeError::Storage(sluice_core::Error::Incompatible {
                            what: format!("state {name:?} of operator {operator} in {restore}"),
                            reason: format!(
                                "the migration from {from} failed on the value of key {}: {reason}",
                                hex(&key)
                            ),
                        })
                    }
                })?;
                tracing::info!(operator = %operator, state = name, "migrated {n} values from {from} to {}", T::schema_id());
            }
            Plan::Reencode(from) => {
                // Every value is read as `T` and written back in `T`'s
                // version: a later version may drop what only this one
                // still reads (an alias, a removed field), and the restored
                // bytes would then be labelled with a version they are not.
                let list = desc.kind == "list";
                let rewrite = |v: &[u8]| {
                    let r = match list {
                        true => postcard::from_bytes::<Vec<Evolving<T>>>(v)
                            .and_then(|x| postcard::to_allocvec(&x)),
                        false => {
                            postcard::from_bytes::<Evolving<T>>(v).and_then(|x| postcard::to_allocvec(&x))
                        }
                    };
                    r.map(Some).map_err(|e| e.to_string())
                };
                let n = rewrite_values(self.store, id, range, &rewrite).map_err(|e| match e {
                    ValueError::Store(e) => RuntimeError::Storage(e),
                    ValueError::Value { key, reason } => {
                        incompatible_value(&operator, &restore, name, &from.to_string(), desc, &key, &reason)
                    }
                })?;
                tracing::info!(operator = %operator, state = name, "rewrote {n} values of {from} as {}", T::schema_id());
            }
        }
        Ok(())
    }

    /// A single evolvable value per key, restored from earlier versions of
    /// its schema that serde reads as `T` (see [`crate::schema`]).
    pub fn evolvable_value_state<T: Evolvable>(&mut self, name: &str) -> Result<EvolvableValueState<T>> {
        self.evolvable_value_state_with(name, Migration::new())
    }

    /// A single evolvable value per key; values restored as another schema
    /// or version go through `migration` when it has a step for them.
    pub fn evolvable_value_state_with<T: Evolvable>(
        &mut self,
        name: &str,
        migration: Migration<T>,
    ) -> Result<EvolvableValueState<T>> {
        let desc = Self::evolvable_descriptor::<T>(name, "value", None);
        self.prepare_evolvable(&desc, &migration)?;
        let h = self.register_descriptor::<Evolving<T>>(desc)?;
        Ok(EvolvableValueState {
            inner: ValueState::from_handle(h),
        })
    }

    /// A list of evolvable values per key; restored elements written as
    /// another schema or version go through `migration` one by one (see
    /// [`crate::schema`]).
    pub fn evolvable_list_state_with<T: Evolvable>(
        &mut self,
        name: &str,
        migration: Migration<T>,
    ) -> Result<EvolvableListState<T>> {
        let desc = Self::evolvable_descriptor::<T>(name, "list", None);
        self.prepare_evolvable(&desc, &migration)?;
        let h = self.register_descriptor::<Vec<Evolving<T>>>(desc)?;
        Ok(EvolvableListState {
            inner: ListState::from_handle(h),
        })
    }

    /// A map per key with evolvable values (the map keys are a fixed
    /// type); restored values written as another schema or version go
    /// through `migration` (see [`crate::schema`]).
    pub fn evolvable_map_state_with<K: Serialize + DeserializeOwned, V: Evolvable>(
        &mut self,
        name: &str,
        migration: Migration<V>,
    ) -> Result<EvolvableMapState<K, V>> {
        let desc = Self::evolvable_descriptor::<V>(name, "map", Some(std::any::type_name::<K>()));
        self.prepare_evolvable(&desc, &migration)?;
        let (id, what) = self.register_bytes(desc)?;
        Ok(EvolvableMapState {
            inner: MapState::from_parts(id, what),
        })
    }
}

fn incompatible_value(
    operator: &str,
    restore: &str,
    state: &str,
    from: &str,
    desc: &StateDescriptor,
    key: &[u8],
    error: &str,
) -> RuntimeError {
    let to = desc.schema.as_ref().map(|s| s.to_string()).unwrap_or_default();
    RuntimeError::Storage(sluice_core::Error::Incompatible {
        what: format!("state {state:?} of operator {operator} in {restore}"),
        reason: format!(
            "a value written as {from} (key {}) does not read as {to}: {error}; add a migration from {from} \
             (Migration::from), or register the new state under a new name",
            hex(key)
        ),
    })
}

/// `bytes` in lower-case hexadecimal (keys in messages and dumps).
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Every `(key, value)` of state `id` in key group `kg`.
fn entries(
    store: &mut dyn KeyedStateStore,
    id: StateId,
    kg: u32,
) -> sluice_core::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut all = Vec::new();
    store.scan_prefix(id, kg, &[], &mut |k, v| {
        all.push((k.to_vec(), v.to_vec()));
        Ok(())
    })?;
    Ok(all)
}

/// What a value rewrite gives: a new value, or `None` to drop the entry.
type Rewrite<'a> = dyn Fn(&[u8]) -> std::result::Result<Option<Vec<u8>>, String> + 'a;

/// Why a pass over a state's values stopped: the store failed (an error
/// of its own kind, perhaps passing), or a value was refused.
pub(crate) enum ValueError {
    Store(sluice_core::Error),
    Value { key: Vec<u8>, reason: String },
}

/// Rewrites every value of state `id` through the byte-level store (a
/// key group at a time); returns how many values it read.
pub(crate) fn rewrite_values(
    store: &mut dyn KeyedStateStore,
    id: StateId,
    range: KeyGroupRange,
    f: &Rewrite<'_>,
) -> std::result::Result<u64, ValueError> {
    let mut n = 0;
    for kg in range.iter() {
        let all = entries(store, id, kg).map_err(ValueError::Store)?;
        for (k, v) in all {
            n += 1;
            let new = f(&v).map_err(|reason| ValueError::Value {
                key: k.clone(),
                reason,
            })?;
            match new {
                Some(new) => store.put(id, kg, &k, &new),
                None => store.delete(id, kg, &k),
            }
            .map_err(ValueError::Store)?;
        }
    }
    Ok(n)
}

/// A type-erased migration of one state, for rewriting savepoints
/// ([`crate::rewrite`]): the new descriptor's schema and type, and the
/// steps.
pub(crate) struct ErasedMigration {
    pub schema: SchemaId,
    pub value_type: String,
    steps: Vec<(Written, Steps)>,
}

impl ErasedMigration {
    /// The step that reads `written`, or the error naming what is missing.
    pub fn step_for(&self, written: &StateDescriptor) -> std::result::Result<Step, String> {
        if written.ttl_ms.is_some() {
            return Err(
                "it has a time-to-live (its values carry their renewal time); migrations do not \
                        apply to such states"
                    .into(),
            );
        }
        let from = Written::of(written);
        if written.schema.as_ref() == Some(&self.schema) {
            return Err(format!("it is already {}", self.schema));
        }
        self.steps
            .iter()
            .find(|(w, _)| *w == from)
            .map(|(_, s)| s.for_kind(&written.kind))
            .ok_or_else(|| format!("it is {from}, and the migration has no step from it"))
    }
}

impl<New: Evolvable> Migration<New> {
    pub(crate) fn erase(self) -> ErasedMigration {
        ErasedMigration {
            schema: New::schema_id(),
            value_type: std::any::type_name::<New>().to_string(),
            steps: self.steps,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Serialize, Deserialize)]
    struct V1 {
        a: u32,
    }
    impl Evolvable for V1 {
        const SCHEMA: &'static str = "t.S";
        const VERSION: u32 = 1;
    }
    #[derive(Clone, Serialize, Deserialize)]
    struct V2 {
        a: u64,
    }
    impl Evolvable for V2 {
        const SCHEMA: &'static str = "t.S";
        const VERSION: u32 = 2;
    }

    fn desc<T: Evolvable>(kind: &str, map_key: Option<&str>) -> StateDescriptor {
        OpenContext::evolvable_descriptor::<T>("s", kind, map_key)
    }

    fn outcome(written: &StateDescriptor, now: &StateDescriptor, m: &Migration<V2>) -> String {
        match plan("op", "savepoint x", written, now, m) {
            Ok(Plan::Keep) => "keep".into(),
            Ok(Plan::Migrate(from, _)) => format!("migrate from {from}"),
            Ok(Plan::Reencode(from)) => format!("re-encode {from}"),
            Err(e) => format!("refused: {e}"),
        }
    }

    #[test]
    fn a_restore_keeps_migrates_checks_or_refuses() {
        let none = Migration::<V2>::new();
        let step = Migration::<V2>::new().from::<V1>(|o| Some(V2 { a: u64::from(o.a) }));
        let now = desc::<V2>("value", None);
        assert_eq!(outcome(&now, &now, &none), "keep");
        let old = desc::<V1>("value", None);
        assert_eq!(outcome(&old, &now, &step), "migrate from schema t.S v1");
        assert_eq!(outcome(&old, &now, &none), "re-encode schema t.S v1");
        let mut other = old.clone();
        other.schema = Some(SchemaId {
            name: "t.Other".into(),
            version: 1,
        });
        assert!(outcome(&other, &now, &step).contains("no migration reads schema t.Other v1"));
        let list = desc::<V1>("list", None);
        assert!(outcome(&list, &now, &step).contains("written as a list state"));
        // Map keys never change; a time-to-live is not migrated.
        let map_now = desc::<V2>("map", Some("u64"));
        let map_old = desc::<V1>("map", Some("alloc::string::String"));
        assert!(outcome(&map_old, &map_now, &step).contains("map keys were written as alloc::string::String"));
        let mut ttl = old.clone();
        ttl.ttl_ms = Some(1000);
        assert!(outcome(&ttl, &now, &step).contains("time-to-live"));
        let erased = Migration::<V2>::new()
            .from::<V1>(|o| Some(V2 { a: u64::from(o.a) }))
            .erase();
        assert!(erased.step_for(&ttl).is_err());
        assert!(erased.step_for(&old).is_ok());
    }

    /// A fixed (postcard) state recorded under `old::Tally`: `from_fixed`
    /// matches the Rust type name, `from_fixed_named` the recorded one.
    #[test]
    fn a_fixed_type_that_moved_migrates_by_its_recorded_name() {
        #[derive(Serialize, Deserialize)]
        struct TallyV1 {
            a: u32,
        }
        let mut old = desc::<V1>("value", None);
        old.schema = None;
        old.value_type = "old::Tally".into();
        let now = desc::<V2>("value", None);
        let moved = Migration::<V2>::new().from_fixed::<TallyV1>(|o| Some(V2 { a: u64::from(o.a) }));
        let refused = outcome(&old, &now, &moved);
        assert!(
            refused.contains("the fixed type old::Tally")
                && refused.contains("from_fixed_named(\"old::Tally\")"),
            "{refused}"
        );
        let named = Migration::<V2>::new().from_fixed_named::<TallyV1>("old::Tally", |o| {
            Some(V2 {
                a: u64::from(o.a) + 1,
            })
        });
        assert_eq!(
            outcome(&old, &now, &named),
            "migrate from the fixed type old::Tally"
        );
        let step = named.step(&Written::of(&old), "value").unwrap();
        let new = step(&postcard::to_allocvec(&TallyV1 { a: 41 }).unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(postcard::from_bytes::<Evolving<V2>>(&new).unwrap().0.a, 42);
    }

    #[test]
    fn a_list_migrates_element_by_element_and_an_emptied_list_goes() {
        let m = Migration::<V2>::new().from::<V1>(|o| {
            (o.a % 2 == 0).then(|| V2 {
                a: u64::from(o.a) * 10,
            })
        });
        let step = m.step(&Written::Schema(V1::schema_id()), "list").unwrap();
        let old: Vec<Evolving<V1>> = [1, 2, 3, 4].into_iter().map(|a| Evolving(V1 { a })).collect();
        let new = step(&postcard::to_allocvec(&old).unwrap()).unwrap().unwrap();
        let new: Vec<Evolving<V2>> = postcard::from_bytes(&new).unwrap();
        assert_eq!(new.iter().map(|e| e.0.a).collect::<Vec<_>>(), vec![20, 40]);
        let odd: Vec<Evolving<V1>> = vec![Evolving(V1 { a: 1 })];
        assert!(step(&postcard::to_allocvec(&odd).unwrap()).unwrap().is_none());
    }
}
