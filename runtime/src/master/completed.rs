//! The completed checkpoints of a job (Flink's `CompletedCheckpointStore`):
//! the retained ones, the newest completion delivered to the tasks, a
//! committed stop-with-savepoint, and the commits whose outcome is still
//! unknown. The coordinator adds to it; recovery chooses its restore point
//! from it.

use super::commit::{self, CommitOutcome, CommitTarget};
use crate::handle::CompletedStats;
use crate::savepoint::{RestoreSource, SavepointLocation};
use bytes::Bytes;
use sluice_core::storage::metadata_path;
use sluice_core::{CheckpointId, CheckpointMetadata, CheckpointStorage, CheckpointStorageExt};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use tracing::warn;

/// A commit whose outcome is unknown, kept until a read-back decides.
pub(crate) struct Undecided {
    /// What was committed, where.
    pub target: CommitTarget,
    pub json: Bytes,
    /// The metadata itself (its references keep shared files alive).
    pub meta: Arc<CheckpointMetadata>,
    /// Savepoints: their directory (removed if the commit did not happen).
    pub savepoint: Option<SavepointLocation>,
    /// Its figures, for the statistics once decided.
    pub stats: CompletedStats,
    /// What is known so far.
    pub reason: String,
}

/// How an undecided commit turned out.
pub(crate) struct Decision {
    pub id: CheckpointId,
    pub savepoint: Option<SavepointLocation>,
    pub stats: CompletedStats,
    /// `Ok`: committed (a checkpoint is now completed); `Err`: it was not
    /// (its files are removed if they are ours), with the reason.
    pub outcome: std::result::Result<(), String>,
}

/// The completed checkpoints and what recovery needs to know about them.
pub(crate) struct CompletedCheckpoints {
    storage: Arc<dyn CheckpointStorage>,
    retained: usize,
    /// Completed checkpoints, oldest first (at most `retained` after
    /// [`Self::retain`]).
    ids: VecDeque<CheckpointId>,
    /// Their metadata, where known: the references of incremental chains
    /// (which files each checkpoint needs) and the chains new checkpoints
    /// extend.
    metas: BTreeMap<CheckpointId, Arc<CheckpointMetadata>>,
    /// The newest checkpoint whose completion was delivered to the tasks
    /// (or, after a resume, may have been by the earlier run): a job with
    /// two-phase-commit sinks never restores anything older.
    pub notified: Option<CheckpointId>,
    /// A committed stop-with-savepoint: after a failure the job restores it
    /// and ends at once (its sinks committed its output already).
    pub stop_restore: Option<Arc<RestoreSource>>,
    /// Checkpoints completed in the whole job.
    pub count: u64,
    undecided: BTreeMap<CheckpointId, Undecided>,
    /// Discarded checkpoints whose `_metadata` could not be deleted yet
    /// (with their metadata where known): while it exists the checkpoint is
    /// still valid in storage, so its files stay; the deletion is retried
    /// at every [`Self::retain`].
    discarding: BTreeMap<CheckpointId, Option<Arc<CheckpointMetadata>>>,
}

impl CompletedCheckpoints {
    /// Nothing completed yet; `retained` are kept in `storage`.
    pub fn new(storage: Arc<dyn CheckpointStorage>, retained: usize) -> Self {
        CompletedCheckpoints {
            storage,
            retained,
            ids: VecDeque::new(),
            metas: BTreeMap::new(),
            notified: None,
            stop_restore: None,
            count: 0,
            undecided: BTreeMap::new(),
            discarding: BTreeMap::new(),
        }
    }

    /// After a resume: the committed checkpoints an earlier run left
    /// (ascending, with their metadata where readable). Older ones than
    /// `retained` are discarded now (keeping files newer ones reference);
    /// the earlier run may have delivered the completion of the newest.
    pub async fn resume(&mut self, committed: &[(CheckpointId, Option<Arc<CheckpointMetadata>>)]) {
        for (id, meta) in committed {
            self.ids.push_back(*id);
            if let Some(m) = meta {
                self.metas.insert(*id, m.clone());
            }
        }
        self.notified = self.ids.back().copied();
        self.retain(&BTreeSet::new()).await;
    }

    /// Adds a completed checkpoint (in id order) with its metadata.
    pub fn add(&mut self, id: CheckpointId, meta: Arc<CheckpointMetadata>) {
        let at = self.ids.partition_point(|c| *c < id);
        self.ids.insert(at, id);
        self.metas.insert(id, meta);
        self.count += 1;
    }

    /// The metadata of completed checkpoint `id`, if known.
    pub fn metadata(&self, id: CheckpointId) -> Option<&Arc<CheckpointMetadata>> {
        self.metas.get(&id)
    }

    /// The newest completed checkpoint whose metadata is known: the base of
    /// the next incremental checkpoint.
    pub fn newest_base(&self) -> Option<CheckpointId> {
        self.ids
            .iter()
            .rev()
            .find(|id| self.metas.contains_key(id))
            .copied()
    }

    /// Records that the tasks were told checkpoint (or stop-savepoint) `id`
    /// completed.
    pub fn delivered(&mut self, id: CheckpointId) {
        self.notified = self.notified.max(Some(id));
    }

    /// The newest completed checkpoint.
    pub fn newest(&self) -> Option<CheckpointId> {
        self.ids.back().copied()
    }

    /// The completed checkpoints, newest first.
    pub fn newest_first(&self) -> Vec<CheckpointId> {
        self.ids.iter().rev().copied().collect()
    }

    /// Whether `id` is a completed checkpoint.
    pub fn contains(&self, id: CheckpointId) -> bool {
        self.ids.contains(&id)
    }

    /// Discards the oldest completed checkpoints beyond `retained`, but not
    /// one in `pinned` (the base of an incremental checkpoint in flight: it
    /// goes once that one ends). A discarded checkpoint's metadata goes
    /// first, then every file it wrote or referenced that no retained or
    /// undecided checkpoint references. A metadata deletion that fails is
    /// retried at the next call; until then the checkpoint's files stay.
    pub async fn retain(&mut self, pinned: &BTreeSet<CheckpointId>) {
        let retry: Vec<CheckpointId> = self.discarding.keys().copied().collect();
        for id in retry {
            self.discard(id).await;
        }
        while self.ids.len() > self.retained {
            let Some(&old) = self.ids.front() else { break };
            if pinned.contains(&old) {
                break;
            }
            self.ids.pop_front();
            let meta = self.metas.remove(&old);
            self.discarding.insert(old, meta);
            self.discard(old).await;
        }
    }

    /// Deletes the `_metadata` of discarded checkpoint `id`, then the files
    /// nothing else needs; leaves it in `discarding` if the deletion fails.
    async fn discard(&mut self, id: CheckpointId) {
        if let Err(e) = self.storage.delete_file(&metadata_path(id)).await {
            warn!("could not discard old checkpoint {id} (retried at the next checkpoint): {e}");
            return;
        }
        let meta = self.discarding.remove(&id).flatten();
        let referenced: Vec<String> = meta
            .map(|m| m.state_files().map(|f| f.path.clone()).collect())
            .unwrap_or_default();
        self.collect_garbage(id, referenced).await;
    }

    /// Every file a retained, undecided or not yet discarded checkpoint
    /// references.
    fn references(&self) -> BTreeSet<String> {
        self.metas
            .values()
            .chain(self.discarding.values().flatten())
            .chain(
                self.undecided
                    .values()
                    .filter(|u| u.savepoint.is_none())
                    .map(|u| &u.meta),
            )
            .flat_map(|m| m.state_files().map(|f| f.path.clone()))
            .collect()
    }

    /// Deletes the files of checkpoint `id`'s directory and the files in
    /// `candidates` (those it referenced elsewhere) that nothing retained or
    /// undecided references; the directory goes when nothing in it is.
    async fn collect_garbage(&self, id: CheckpointId, candidates: Vec<String>) {
        let referenced = self.references();
        let (own, listed) = match self.storage.list_files(&id.dir()).await {
            Ok(files) => (files.into_iter().map(|f| f.path).collect(), true),
            Err(e) => {
                warn!("could not list the files of discarded checkpoint {id}: {e}");
                (Vec::new(), false)
            }
        };
        // A directory that could not be listed may hold referenced files.
        let keep_dir = !listed || own.iter().any(|p| referenced.contains(p));
        let doomed: BTreeSet<String> = own
            .into_iter()
            .chain(candidates)
            .filter(|p| !referenced.contains(p))
            .collect();
        for path in &doomed {
            if let Err(e) = self.storage.delete_file(path).await {
                warn!("could not delete {path} (no retained checkpoint needs it): {e}");
            }
        }
        if !keep_dir {
            if let Err(e) = self.storage.discard(id).await {
                warn!("could not remove the directory of discarded checkpoint {id}: {e}");
            }
        }
    }

    /// Keeps a commit whose outcome is unknown until [`Self::decide`].
    pub fn add_undecided(&mut self, id: CheckpointId, u: Undecided) {
        self.undecided.insert(id, u);
    }

    /// Whether commits with an unknown outcome wait for a read-back.
    pub fn has_undecided(&self) -> bool {
        !self.undecided.is_empty()
    }

    /// The newest undecided checkpoint commit (not savepoint), and what is
    /// known about it.
    pub fn newest_undecided_checkpoint(&self) -> Option<(CheckpointId, &str)> {
        self.undecided
            .iter()
            .rev()
            .find(|(_, u)| u.savepoint.is_none())
            .map(|(id, u)| (*id, u.reason.as_str()))
    }

    /// Logs every commit still undecided (when the job ends).
    pub fn warn_undecided(&self) {
        for (id, u) in &self.undecided {
            warn!(
                checkpoint = id.0,
                "the job ends with the commit of {id} still undecided ({}): check whether {} exists",
                u.reason,
                u.target.describe()
            );
        }
    }

    /// Reads every undecided commit back ([`commit::resolve`]). A
    /// checkpoint found committed becomes a completed one; one found
    /// missing has its files removed (a savepoint its directory). Returns
    /// what was decided; the undecided rest stays.
    pub async fn decide(&mut self) -> Vec<Decision> {
        let mut decided = Vec::new();
        let ids: Vec<CheckpointId> = self.undecided.keys().copied().collect();
        for id in ids {
            let Some(u) = self.undecided.get_mut(&id) else {
                continue;
            };
            let outcome = match commit::resolve(&u.target, &u.json).await {
                CommitOutcome::Unknown { reason } => {
                    u.reason = reason;
                    continue;
                }
                CommitOutcome::Committed => Ok(()),
                CommitOutcome::Failed { reason, discard } => Err((reason, discard)),
            };
            let Some(u) = self.undecided.remove(&id) else {
                continue;
            };
            let outcome = match outcome {
                Ok(()) => {
                    if u.savepoint.is_none() {
                        self.add(id, u.meta.clone());
                    }
                    Ok(())
                }
                Err((reason, discard)) => {
                    if discard {
                        match &u.savepoint {
                            Some(loc) => {
                                if let Err(e) = loc.storage.delete_dir(&loc.dir).await {
                                    warn!("could not remove the files of savepoint {id}: {e}");
                                }
                            }
                            // Its own files, and those it referenced that
                            // nothing else does any more.
                            None => {
                                let refs = u.meta.state_files().map(|f| f.path.clone()).collect();
                                self.collect_garbage(id, refs).await;
                            }
                        }
                    }
                    Err(reason)
                }
            };
            decided.push(Decision {
                id,
                savepoint: u.savepoint,
                stats: u.stats,
                outcome,
            });
        }
        decided
    }
}
