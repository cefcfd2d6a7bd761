//! The completed checkpoints of a job (Flink's `CompletedCheckpointStore`):
//! the retained ones, the newest completion delivered to the tasks, a
//! committed stop-with-savepoint, and the commits whose outcome is still
//! unknown. The coordinator adds to it; recovery chooses its restore point
//! from it.

use super::commit::{self, CommitOutcome, CommitTarget};
use crate::handle::CompletedStats;
use crate::savepoint::{RestoreSource, SavepointLocation};
use bytes::Bytes;
use sluice_core::{CheckpointId, CheckpointStorage, CheckpointStorageExt};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use tracing::warn;

/// A commit whose outcome is unknown, kept until a read-back decides.
pub(crate) struct Undecided {
    /// What was committed, where.
    pub target: CommitTarget,
    pub json: Bytes,
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
}

impl CompletedCheckpoints {
    /// Nothing completed yet; `retained` are kept in `storage`.
    pub fn new(storage: Arc<dyn CheckpointStorage>, retained: usize) -> Self {
        CompletedCheckpoints {
            storage,
            retained,
            ids: VecDeque::new(),
            notified: None,
            stop_restore: None,
            count: 0,
            undecided: BTreeMap::new(),
        }
    }

    /// After a resume: the committed checkpoints an earlier run left
    /// (ascending). Older ones than `retained` are discarded now; the
    /// earlier run may have delivered the completion of the newest.
    pub async fn resume(&mut self, committed: &[CheckpointId]) {
        let keep = committed.len().saturating_sub(self.retained);
        for old in &committed[..keep] {
            if let Err(e) = self.storage.discard(*old).await {
                warn!("could not discard old checkpoint {old}: {e}");
            }
        }
        self.ids.extend(committed[keep..].iter().copied());
        self.notified = self.ids.back().copied();
    }

    /// Adds a completed checkpoint (in id order).
    pub fn add(&mut self, id: CheckpointId) {
        let at = self.ids.partition_point(|c| *c < id);
        self.ids.insert(at, id);
        self.count += 1;
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

    /// Discards the oldest completed checkpoints beyond `retained`.
    pub async fn retain(&mut self) {
        while self.ids.len() > self.retained {
            if let Some(old) = self.ids.pop_front() {
                if let Err(e) = self.storage.discard(old).await {
                    warn!("could not discard old checkpoint {old}: {e}");
                }
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
                        self.add(id);
                    }
                    Ok(())
                }
                Err((reason, discard)) => {
                    if discard {
                        let removed = match &u.savepoint {
                            Some(loc) => loc.storage.delete_dir(&loc.dir).await,
                            None => self.storage.discard(id).await,
                        };
                        if let Err(e) = removed {
                            warn!("could not remove the files of checkpoint {id}: {e}");
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
