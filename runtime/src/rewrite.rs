//! Rewriting a savepoint offline (the common uses of Flink's State
//! Processor API): rename an operator's uid, drop an operator's state,
//! migrate a state's values with a [`Migration`], and write the result as
//! a new self-contained savepoint. The source is only read, never changed.
//!
//! Every operator's keyed state is rebuilt: each source subtask's files
//! (a retained incremental checkpoint's chain too) are loaded into an
//! in-memory store covering that subtask's key groups, migrated there, and
//! written as one full file — so the new savepoint restores alone, at any
//! parallelism, into any state backend. Memory holds one subtask's state at
//! a time. Source positions and operator state are copied as they are.
//!
//! ```no_run
//! # async fn run(src: sluice_runtime::SavepointLocation, dst: sluice_runtime::SavepointLocation)
//! # -> sluice_runtime::Result<()> {
//! use sluice_runtime::rewrite::{rewrite_savepoint, SavepointRewrite};
//! let plan = SavepointRewrite::new()
//!     .rename_operator("running-sum", "totals")
//!     .drop_operator("dedup");
//! let meta = rewrite_savepoint(&src, &dst, &plan).await?;
//! println!("{} operators", meta.operators.len());
//! # Ok(()) }
//! ```

use crate::error::{Result, RuntimeError};
use crate::savepoint::{RestoreSource, SavepointLocation};
use crate::schema::{rewrite_values, ErasedMigration, Evolvable, Migration, ValueError};
use sluice_backend_memory::MemoryStateBackend;
use sluice_core::metadata::{OperatorSnapshot, SubtaskSnapshot, SAVEPOINT_METADATA_FILE};
use sluice_core::{CheckpointKind, CheckpointMetadata, OperatorUid, StateBackend, StateId, StoreScope};
use std::collections::HashMap;

/// What to change (operators and states are named as in the source).
#[derive(Default)]
pub struct SavepointRewrite {
    renames: Vec<(String, String)>,
    drops: Vec<String>,
    migrations: Vec<(String, String, ErasedMigration)>,
}

impl SavepointRewrite {
    /// No changes (a rewrite then folds and relocates the state).
    pub fn new() -> Self {
        Self::default()
    }

    /// The operator `from` is called `to` in the new savepoint.
    pub fn rename_operator(mut self, from: &str, to: &str) -> Self {
        self.renames.push((from.to_string(), to.to_string()));
        self
    }

    /// The new savepoint has no state of operator `uid`.
    pub fn drop_operator(mut self, uid: &str) -> Self {
        self.drops.push(uid.to_string());
        self
    }

    /// The values of `state` of operator `uid` go through `migration` (it
    /// must have a step from what they were written as).
    pub fn migrate_state<New: Evolvable>(
        mut self,
        uid: &str,
        state: &str,
        migration: Migration<New>,
    ) -> Self {
        self.migrations
            .push((uid.to_string(), state.to_string(), migration.erase()));
        self
    }

    /// Refuses changes that name what the savepoint does not have, or that
    /// contradict each other.
    fn validate(&self, meta: &CheckpointMetadata, source: &str) -> Result<()> {
        let present: Vec<&str> = meta.operators.iter().map(|o| o.uid.as_str()).collect();
        let bad = |reason: String| RuntimeError::InvalidJob(format!("rewriting {source}: {reason}"));
        let known = |uid: &str| {
            if present.contains(&uid) {
                Ok(())
            } else {
                Err(bad(format!(
                    "it has no operator {uid:?} (it has: {})",
                    present.join(", ")
                )))
            }
        };
        for (from, to) in &self.renames {
            known(from)?;
            OperatorUid::new(to.clone())
                .map_err(|e| bad(format!("cannot rename {from:?} to {to:?}: {e}")))?;
            if self.drops.contains(from) {
                return Err(bad(format!("operator {from:?} is both renamed and dropped")));
            }
            if self.renames.iter().filter(|(f, _)| f == from).count() > 1 {
                return Err(bad(format!("operator {from:?} is renamed twice")));
            }
        }
        for d in &self.drops {
            known(d)?;
        }
        let mut finals: Vec<String> = meta
            .operators
            .iter()
            .filter(|o| !self.drops.iter().any(|d| d == o.uid.as_str()))
            .map(|o| self.new_uid(o.uid.as_str()))
            .collect();
        finals.sort();
        if let Some(w) = finals.windows(2).find(|w| w[0] == w[1]) {
            return Err(bad(format!("two operators would both be called {:?}", w[0])));
        }
        for (i, (uid, state, m)) in self.migrations.iter().enumerate() {
            known(uid)?;
            if self.migrations[..i]
                .iter()
                .any(|(u, s, _)| u == uid && s == state)
            {
                return Err(bad(format!(
                    "state {state:?} of operator {uid:?} is migrated twice"
                )));
            }
            if self.drops.contains(uid) {
                return Err(bad(format!("operator {uid:?} is dropped and its state migrated")));
            }
            let op = meta.operators.iter().find(|o| o.uid.as_str() == uid);
            let Some(desc) = op.and_then(|o| o.states.iter().find(|s| &s.name == state)) else {
                return Err(bad(format!("operator {uid:?} has no state {state:?}")));
            };
            m.step_for(desc)
                .map_err(|e| bad(format!("cannot migrate state {state:?} of operator {uid:?}: {e}")))?;
        }
        if !meta.channel_state.is_empty() {
            return Err(bad(
                "it holds records in flight (an unaligned checkpoint); rewrite a savepoint, or a checkpoint \
                 taken aligned"
                    .into(),
            ));
        }
        Ok(())
    }

    fn new_uid(&self, uid: &str) -> String {
        self.renames
            .iter()
            .find(|(f, _)| f == uid)
            .map(|(_, t)| t.clone())
            .unwrap_or_else(|| uid.to_string())
    }
}

/// Writes the savepoint (or retained checkpoint) at `src`, changed by
/// `plan`, as a new savepoint in the empty directory `dst`; returns its
/// metadata. `src` is only read.
pub async fn rewrite_savepoint(
    src: &SavepointLocation,
    dst: &SavepointLocation,
    plan: &SavepointRewrite,
) -> Result<CheckpointMetadata> {
    let source = RestoreSource::open(src).await?;
    plan.validate(&source.metadata, &source.describe())?;
    if dst.dir.is_empty() {
        return Err(RuntimeError::InvalidJob(format!(
            "rewrite destination {}: name a directory for the new savepoint",
            dst.describe()
        )));
    }
    if !dst.storage.list_files(&dst.dir).await?.is_empty() {
        return Err(sluice_core::Error::AlreadyExists {
            what: format!("files in {} (rewrite into an empty directory)", dst.describe()),
        }
        .into());
    }
    let meta = &source.metadata;
    let backend = MemoryStateBackend::new();
    let mut operators = Vec::new();
    for op in &meta.operators {
        if plan.drops.iter().any(|d| d == op.uid.as_str()) {
            continue;
        }
        let uid = OperatorUid::new(plan.new_uid(op.uid.as_str()))?;
        let migrations: Vec<&(String, String, ErasedMigration)> = plan
            .migrations
            .iter()
            .filter(|(u, _, _)| u == op.uid.as_str())
            .collect();
        let mut subtasks = Vec::new();
        for st in &op.subtasks {
            let Some(base) = &st.keyed_state else {
                subtasks.push(st.clone());
                continue;
            };
            let range = base.key_groups;
            let mut store = backend.open_store(&StoreScope {
                job: meta.job_name.clone(),
                operator: uid.clone(),
                subtask: st.subtask,
                parallelism: op.parallelism,
                max_parallelism: meta.max_parallelism,
                key_groups: range,
                track_changes: false,
            })?;
            let chain: Vec<_> = std::iter::once(base)
                .chain(&st.keyed_changes)
                .map(|f| source.resolve(f))
                .collect();
            let mut ids: HashMap<String, StateId> = HashMap::new();
            sluice_core::load::load_chain(source.storage.as_ref(), &chain, range, store.as_mut(), &mut ids)
                .await?;
            for (_, state, m) in &migrations {
                let Some(id) = ids.get(state.as_str()) else {
                    continue;
                };
                let desc = op.states.iter().find(|s| &s.name == state);
                let step = desc
                    .map(|d| m.step_for(d))
                    .transpose()
                    .map_err(RuntimeError::InvalidJob)?
                    .ok_or_else(|| {
                        RuntimeError::InvalidJob(format!("operator {} has no state {state:?}", op.uid))
                    })?;
                rewrite_values(store.as_mut(), *id, range, &|v| step(v)).map_err(|e| match e {
                    ValueError::Store(e) => RuntimeError::Storage(e),
                    ValueError::Value { key, reason } => {
                        RuntimeError::Storage(sluice_core::Error::Incompatible {
                            what: format!("state {state:?} of operator {} in {}", op.uid, source.describe()),
                            reason: format!(
                                "the migration failed on the value of key {}: {reason}",
                                crate::schema::hex(&key)
                            ),
                        })
                    }
                })?;
            }
            let snapshot = store.snapshot(meta.checkpoint_id)?;
            let encoded =
                tokio::task::spawn_blocking(move || sluice_core::format::encode_snapshot(snapshot.as_ref()))
                    .await
                    .map_err(|e| RuntimeError::Internal(format!("snapshot encoder: {e}")))??;
            let name = format!("{uid}-{}.kst", st.subtask);
            let handle = encoded.handle(name.clone());
            dst.storage.write_file(&dst.join(&name), encoded.bytes).await?;
            subtasks.push(SubtaskSnapshot {
                subtask: st.subtask,
                keyed_state: Some(handle),
                keyed_changes: Vec::new(),
                splits: st.splits.clone(),
                operator_state: st.operator_state.clone(),
            });
        }
        let mut states = op.states.clone();
        for (_, state, m) in &migrations {
            if let Some(d) = states.iter_mut().find(|s| &s.name == state) {
                d.schema = Some(m.schema.clone());
                d.value_type = m.value_type.clone();
            }
        }
        operators.push(OperatorSnapshot {
            uid,
            parallelism: op.parallelism,
            key_type: op.key_type.clone(),
            states,
            source_splits: op.source_splits,
            subtasks,
        });
    }
    let mut out = (**meta).clone();
    out.kind = CheckpointKind::Savepoint;
    out.operators = operators;
    let json = out.to_json()?;
    dst.storage
        .commit_file(&dst.join(SAVEPOINT_METADATA_FILE), bytes::Bytes::from(json))
        .await?;
    Ok(out)
}
