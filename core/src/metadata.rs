//! Checkpoint metadata: small, JSON, readable by a person.

use crate::ids::{CheckpointId, CheckpointKind, OperatorUid};
use crate::keygroup::KeyGroupRange;
use crate::storage::CheckpointStorageExt;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// The version of the metadata format written by this build.
pub const METADATA_FORMAT_VERSION: u32 = 1;

/// A state file written by one subtask.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateFileHandle {
    /// Path relative to the storage root (`chk-<id>/<uid>-<subtask>.kst`).
    pub path: String,
    /// File size in bytes.
    pub size: u64,
    /// CRC-32 (IEEE) of the whole file.
    pub crc32: u32,
    /// The key groups the file holds.
    pub key_groups: KeyGroupRange,
    /// Number of entries in the file.
    pub entries: u64,
}

/// The read position of one source split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitPosition {
    /// The split's index within the source.
    pub split: u32,
    /// The offset to resume from (next record index, byte offset, …).
    pub offset: u64,
}

/// The snapshot of one subtask of one operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubtaskSnapshot {
    /// The subtask index.
    pub subtask: u32,
    /// Keyed state, if the operator is keyed and holds any: a full snapshot
    /// (the base of an incremental chain).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyed_state: Option<StateFileHandle>,
    /// Incremental checkpoints: the changes files to apply on top of
    /// `keyed_state`, oldest first (each holds the upserts and deletions
    /// since the one before). The files may belong to earlier checkpoints'
    /// directories: they are shared, and deleted only when no retained
    /// checkpoint references them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keyed_changes: Vec<StateFileHandle>,
    /// Source split positions, if the operator is a source.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub splits: Vec<SplitPosition>,
    /// Small non-keyed operator state, e.g. a two-phase-commit sink's
    /// pre-committed transactions (JSON, readable in the metadata).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator_state: Option<serde_json::Value>,
}

/// In-flight records of one task subtask, stored by an unaligned
/// checkpoint: the records its barrier overtook, on its inputs and in its
/// output queue. Replayed before new input on restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelStateHandle {
    /// The task's stable id: the uid of its head operator (a source's or a
    /// keyed operator's uid), or one derived from the tasks feeding it and
    /// the exchange that starts it (`running-sum/rebalance`). Restore
    /// matches channel state to tasks by this id and the subtask index.
    /// Empty in metadata written before Sluice 0.2 (such channel state is
    /// refused: restore from an aligned checkpoint or a savepoint).
    #[serde(default)]
    pub task_uid: String,
    /// The task's name, for people.
    pub task_name: String,
    /// The subtask index.
    pub subtask: u32,
    /// The task's parallelism when the checkpoint was taken.
    pub parallelism: u32,
    /// Path relative to the storage root (`chk-<id>/channel-<task>-<subtask>.cst`).
    pub path: String,
    /// File size in bytes.
    pub size: u64,
    /// CRC-32 (IEEE) of the whole file.
    pub crc32: u32,
    /// Records that were on the task's input channels before the barrier
    /// (processed first on restore).
    pub input_records: u64,
    /// Records the task had queued for its outputs when the barrier
    /// overtook them (sent first on restore).
    pub output_records: u64,
}

/// A registered keyed state of an operator: its name, kind and types, so
/// that a restore can refuse state written with another type, and tools can
/// decode it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateDescriptor {
    /// The state's name.
    pub name: String,
    /// `value`, `list` or `map`.
    pub kind: String,
    /// The Rust type of the values (of the list elements, of the map values),
    /// as `std::any::type_name` spells it.
    pub value_type: String,
    /// The Rust type of the map keys (map state only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub map_key_type: Option<String>,
    /// An evolvable state: its values' declared schema, which a restore
    /// compares instead of the Rust type (`None`: a fixed postcard type,
    /// compared by `value_type`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<SchemaId>,
    /// A state with a time-to-live: its values carry their last-write (or
    /// last-access) time, and expired ones are never read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
}

/// The declared schema of an evolvable state's values: a name that stays
/// when the Rust type is renamed or moved, and a version raised with each
/// change.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SchemaId {
    /// The schema's name.
    pub name: String,
    /// Its version.
    pub version: u32,
}

impl std::fmt::Display for SchemaId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "schema {} v{}", self.name, self.version)
    }
}

impl SubtaskSnapshot {
    /// Its keyed state files: the base, then its changes files in order.
    pub fn state_files(&self) -> impl Iterator<Item = &StateFileHandle> {
        self.keyed_state.iter().chain(&self.keyed_changes)
    }
}

/// The snapshot of one operator (all its subtasks).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorSnapshot {
    /// The operator's uid.
    pub uid: OperatorUid,
    /// The operator's parallelism when the snapshot was taken.
    pub parallelism: u32,
    /// Keyed operators: the Rust type of the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_type: Option<String>,
    /// Keyed operators: the states the function registered.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub states: Vec<StateDescriptor>,
    /// Sources: the number of splits of the source (fixed for a source; a
    /// restore into a source with another number is refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_splits: Option<u32>,
    /// One entry per subtask that had something to store.
    pub subtasks: Vec<SubtaskSnapshot>,
}

/// The metadata of a completed checkpoint or savepoint. Committing it is what
/// makes the checkpoint exist.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointMetadata {
    /// Metadata format version ([`METADATA_FORMAT_VERSION`]).
    pub format_version: u32,
    /// The Sluice version that wrote it ([`crate::SLUICE_VERSION`]).
    #[serde(default)]
    pub sluice_version: String,
    /// The version of the snapshot format of its state files
    /// ([`crate::format::SNAPSHOT_FORMAT_VERSION`]).
    #[serde(default = "default_snapshot_version")]
    pub snapshot_format_version: u16,
    /// The job's name.
    pub job_name: String,
    /// The checkpoint id.
    pub checkpoint_id: CheckpointId,
    /// Checkpoint or savepoint.
    pub kind: CheckpointKind,
    /// Trigger time, milliseconds since the Unix epoch.
    pub trigger_time_ms: u64,
    /// Time from trigger to the last acknowledgement, in milliseconds.
    pub duration_ms: u64,
    /// The job's max parallelism.
    pub max_parallelism: u32,
    /// Per operator uid, its snapshot.
    pub operators: Vec<OperatorSnapshot>,
    /// Unaligned checkpoints: the in-flight records of each task subtask
    /// that had any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub channel_state: Vec<ChannelStateHandle>,
}

fn describe_ranges(ranges: &[KeyGroupRange]) -> String {
    let v: Vec<String> = ranges.iter().map(|r| r.to_string()).collect();
    v.join(", ")
}

fn default_snapshot_version() -> u16 {
    1
}

/// The name of a savepoint's metadata file inside its directory.
pub const SAVEPOINT_METADATA_FILE: &str = crate::storage::METADATA_FILE;

impl CheckpointMetadata {
    /// Serializes to pretty JSON.
    pub fn to_json(&self) -> Result<Vec<u8>> {
        serde_json::to_vec_pretty(self).map_err(|e| Error::Serialization {
            what: format!("metadata of checkpoint {}", self.checkpoint_id),
            reason: e.to_string(),
        })
    }

    /// Parses and validates metadata read from `path`: JSON shape, format
    /// version, and that every file path is relative and stays inside the
    /// storage (no `..`, no absolute paths).
    pub fn from_json(path: &str, bytes: &[u8]) -> Result<Self> {
        let meta: CheckpointMetadata = serde_json::from_slice(bytes)
            .map_err(|e| Error::corrupt(path, format!("metadata is not valid JSON: {e}")))?;
        if meta.format_version != METADATA_FORMAT_VERSION {
            return Err(Error::Incompatible {
                what: format!("metadata {path}"),
                reason: format!(
                    "format version {} (this build reads version {METADATA_FORMAT_VERSION})",
                    meta.format_version
                ),
            });
        }
        meta.validate(path)?;
        Ok(meta)
    }

    /// Checks every value a restore relies on, so that a damaged or hostile
    /// metadata file is refused as a whole instead of being half used: file
    /// paths stay inside the storage; parallelisms fit the max parallelism;
    /// subtask indexes are in range and unique; every keyed operator's
    /// files hold valid, disjoint key-group ranges that together cover every
    /// key group (a gap would silently drop state); split indexes are in
    /// range and unique; channel state names its task and a subtask in
    /// range, once. What is wrong is an [`Error::Corrupt`] naming `path`
    /// (where the metadata was read from).
    pub fn validate(&self, path: &str) -> Result<()> {
        self.check().map_err(|reason| Error::corrupt(path, reason))
    }

    fn check(&self) -> std::result::Result<(), String> {
        let max = self.max_parallelism;
        if max == 0 || max > crate::keygroup::UPPER_MAX_PARALLELISM {
            return Err(format!(
                "max parallelism {max} is out of range (1..={})",
                crate::keygroup::UPPER_MAX_PARALLELISM
            ));
        }
        let files = self
            .state_files()
            .map(|f| &f.path)
            .chain(self.channel_state.iter().map(|c| &c.path));
        for f in files {
            crate::storage::validate_path(f).map_err(|_| format!("unsafe state file path {f:?}"))?;
        }
        let mut uids = std::collections::BTreeSet::new();
        for op in &self.operators {
            let uid = &op.uid;
            if !uids.insert(uid.as_str()) {
                return Err(format!("operator {uid} appears twice"));
            }
            if op.parallelism == 0 || op.parallelism > max {
                return Err(format!(
                    "operator {uid} has parallelism {}, outside 1..={max} (the max parallelism)",
                    op.parallelism
                ));
            }
            let mut subtasks = std::collections::BTreeSet::new();
            let mut ranges: Vec<KeyGroupRange> = Vec::new();
            let mut splits = std::collections::BTreeSet::new();
            for st in &op.subtasks {
                if st.subtask >= op.parallelism {
                    return Err(format!(
                        "operator {uid} lists subtask {} at parallelism {}",
                        st.subtask, op.parallelism
                    ));
                }
                if !subtasks.insert(st.subtask) {
                    return Err(format!("operator {uid} lists subtask {} twice", st.subtask));
                }
                if let Some(f) = &st.keyed_state {
                    let r = f.key_groups;
                    if r.start > r.end || r.end >= max {
                        return Err(format!(
                            "state file {} of operator {uid} holds key groups [{}, {}], not a range inside \
                             [0, {}]",
                            f.path,
                            r.start,
                            r.end,
                            max - 1
                        ));
                    }
                    ranges.push(r);
                }
                match &st.keyed_state {
                    None if !st.keyed_changes.is_empty() => {
                        return Err(format!(
                            "operator {uid} subtask {} has changes files but no base state file",
                            st.subtask
                        ))
                    }
                    Some(base) => {
                        if let Some(c) = st.keyed_changes.iter().find(|c| c.key_groups != base.key_groups) {
                            return Err(format!(
                                "changes file {} of operator {uid} subtask {} covers key groups {}, its base {} \
                                 covers {}",
                                c.path, st.subtask, c.key_groups, base.path, base.key_groups
                            ));
                        }
                    }
                    None => {}
                }
                for p in &st.splits {
                    if let Some(n) = op.source_splits.filter(|n| p.split >= *n) {
                        return Err(format!(
                            "source {uid} stores a position for split {}, but it has {n} splits",
                            p.split
                        ));
                    }
                    if !splits.insert(p.split) {
                        return Err(format!("source {uid} stores split {} twice", p.split));
                    }
                }
            }
            if !ranges.is_empty() {
                ranges.sort_by_key(|r| r.start);
                let mut next = 0u32;
                for r in &ranges {
                    if r.start != next {
                        return Err(format!(
                            "the state files of operator {uid} {} key groups at {} (files hold {})",
                            if r.start < next {
                                "overlap in their"
                            } else {
                                "leave out"
                            },
                            r.start.min(next),
                            describe_ranges(&ranges)
                        ));
                    }
                    next = r.end + 1;
                }
                if next != max {
                    return Err(format!(
                        "the state files of operator {uid} leave out key groups {next} to {} (files hold {})",
                        max - 1,
                        describe_ranges(&ranges)
                    ));
                }
            }
        }
        let mut channels = std::collections::BTreeSet::new();
        for c in &self.channel_state {
            if c.parallelism == 0 || c.parallelism > max || c.subtask >= c.parallelism {
                return Err(format!(
                    "channel state {} names subtask {} of parallelism {} (max parallelism {max})",
                    c.path, c.subtask, c.parallelism
                ));
            }
            if !c.task_uid.is_empty() && !channels.insert((c.task_uid.as_str(), c.subtask)) {
                return Err(format!(
                    "channel state of task {} subtask {} appears twice",
                    c.task_uid, c.subtask
                ));
            }
        }
        Ok(())
    }

    /// Every keyed state file the checkpoint references: bases and changes
    /// files (some may be shared with earlier checkpoints).
    pub fn state_files(&self) -> impl Iterator<Item = &StateFileHandle> {
        self.operators
            .iter()
            .flat_map(|o| &o.subtasks)
            .flat_map(SubtaskSnapshot::state_files)
    }

    /// Total size in bytes of the state the checkpoint references: every
    /// keyed state file (shared ones included: the full size) and the
    /// channel state.
    pub fn state_size(&self) -> u64 {
        self.state_files().map(|f| f.size).sum::<u64>() + self.channel_state_size()
    }

    /// Size in bytes of the files this checkpoint wrote itself (its own
    /// directory, `chk-<id>/`): for an incremental checkpoint, what it cost;
    /// for a full one, its whole size.
    pub fn own_state_size(&self) -> u64 {
        let own = format!("{}/", self.checkpoint_id.dir());
        self.state_files()
            .filter(|f| f.path.starts_with(&own))
            .map(|f| f.size)
            .sum::<u64>()
            + self.channel_state_size()
    }

    /// Size of the channel-state files in bytes.
    pub fn channel_state_size(&self) -> u64 {
        self.channel_state.iter().map(|c| c.size).sum()
    }

    /// The snapshot of the operator with this uid.
    pub fn operator(&self, uid: &OperatorUid) -> Option<&OperatorSnapshot> {
        self.operators.iter().find(|o| &o.uid == uid)
    }
}

/// Reads and parses a savepoint's metadata, `<dir>/_metadata`. Its state file
/// paths are relative to `dir`.
pub async fn read_savepoint_metadata(
    storage: &dyn crate::storage::CheckpointStorage,
    dir: &str,
) -> Result<CheckpointMetadata> {
    let path = if dir.is_empty() {
        SAVEPOINT_METADATA_FILE.to_string()
    } else {
        format!("{dir}/{SAVEPOINT_METADATA_FILE}")
    };
    let bytes = storage.read_file(&path).await.map_err(|e| match e {
        Error::NotFound { .. } => Error::not_found(format!(
            "savepoint metadata {path} in {} (is it a savepoint directory? an unfinished savepoint has none)",
            storage.describe()
        )),
        other => other,
    })?;
    CheckpointMetadata::from_json(&storage.locate(&path), &bytes)
}

/// Reads and parses a committed checkpoint's metadata.
pub async fn read_checkpoint_metadata(
    storage: &dyn crate::storage::CheckpointStorage,
    id: CheckpointId,
) -> Result<CheckpointMetadata> {
    let bytes = storage.read_metadata(id).await?;
    let path = storage.locate(&format!("{}/_metadata", id.dir()));
    let meta = CheckpointMetadata::from_json(&path, &bytes)?;
    if meta.checkpoint_id != id || meta.kind != CheckpointKind::Checkpoint {
        return Err(Error::corrupt(
            path,
            format!(
                "the metadata of checkpoint {id} describes {} {}",
                meta.kind, meta.checkpoint_id
            ),
        ));
    }
    Ok(meta)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(path: &str) -> CheckpointMetadata {
        CheckpointMetadata {
            format_version: METADATA_FORMAT_VERSION,
            sluice_version: crate::SLUICE_VERSION.into(),
            snapshot_format_version: 1,
            job_name: "j".into(),
            checkpoint_id: CheckpointId(3),
            kind: CheckpointKind::Checkpoint,
            trigger_time_ms: 1,
            duration_ms: 2,
            max_parallelism: 128,
            operators: vec![OperatorSnapshot {
                uid: OperatorUid("sum".into()),
                parallelism: 1,
                key_type: Some("u64".into()),
                states: vec![StateDescriptor {
                    name: "sum".into(),
                    kind: "value".into(),
                    value_type: "u64".into(),
                    map_key_type: None,
                    schema: None,
                    ttl_ms: None,
                }],
                source_splits: None,
                subtasks: vec![SubtaskSnapshot {
                    subtask: 0,
                    keyed_state: Some(StateFileHandle {
                        path: path.into(),
                        size: 10,
                        crc32: 7,
                        key_groups: KeyGroupRange::all(128),
                        entries: 1,
                    }),
                    keyed_changes: Vec::new(),
                    splits: vec![SplitPosition { split: 0, offset: 42 }],
                    operator_state: None,
                }],
            }],
            channel_state: vec![],
        }
    }

    #[test]
    fn metadata_round_trips_through_json() {
        let m = meta("chk-3/sum-0.kst");
        let json = m.to_json().unwrap();
        assert_eq!(CheckpointMetadata::from_json("m", &json).unwrap(), m);
        assert_eq!(m.state_size(), 10);
    }

    #[test]
    fn paths_that_escape_the_storage_are_refused_as_corrupt() {
        for bad in ["../x", "/etc/passwd", "chk-3/../../x", "chk-3//x", ""] {
            let json = meta(bad).to_json().unwrap();
            assert!(
                matches!(
                    CheckpointMetadata::from_json("m", &json),
                    Err(Error::Corrupt { .. })
                ),
                "{bad:?} accepted"
            );
        }
    }

    /// A keyed operator at parallelism 2 (key groups [0, 63] and [64, 127])
    /// and a source with 4 splits.
    fn two_subtasks() -> CheckpointMetadata {
        let mut m = meta("chk-3/sum-0.kst");
        let file = |path: &str, start, end| StateFileHandle {
            path: path.into(),
            size: 10,
            crc32: 7,
            key_groups: KeyGroupRange { start, end },
            entries: 1,
        };
        m.operators[0].parallelism = 2;
        m.operators[0].subtasks = vec![
            SubtaskSnapshot {
                subtask: 0,
                keyed_state: Some(file("chk-3/sum-0.kst", 0, 63)),
                keyed_changes: Vec::new(),
                splits: vec![],
                operator_state: None,
            },
            SubtaskSnapshot {
                subtask: 1,
                keyed_state: Some(file("chk-3/sum-1.kst", 64, 127)),
                keyed_changes: Vec::new(),
                splits: vec![],
                operator_state: None,
            },
        ];
        m.operators.push(OperatorSnapshot {
            uid: OperatorUid("events".into()),
            parallelism: 2,
            key_type: None,
            states: vec![],
            source_splits: Some(4),
            subtasks: vec![SubtaskSnapshot {
                subtask: 1,
                keyed_state: None,
                keyed_changes: Vec::new(),
                splits: vec![
                    SplitPosition { split: 1, offset: 9 },
                    SplitPosition { split: 3, offset: 9 },
                ],
                operator_state: None,
            }],
        });
        m
    }

    fn refused(m: &CheckpointMetadata, needle: &str) {
        let json = m.to_json().unwrap();
        match CheckpointMetadata::from_json("chk-3/_metadata", &json) {
            Err(Error::Corrupt { path, reason }) => {
                assert_eq!(path, "chk-3/_metadata");
                assert!(reason.contains(needle), "{reason:?} does not say {needle:?}");
            }
            other => panic!("accepted or wrong error ({needle}): {other:?}"),
        }
    }

    #[test]
    fn metadata_with_bad_key_groups_subtasks_splits_or_channel_state_is_corrupt_naming_the_file() {
        assert!(CheckpointMetadata::from_json("m", &two_subtasks().to_json().unwrap()).is_ok());
        // An inverted range: refused while parsing (never silently skipped).
        let mut m = two_subtasks();
        m.operators[0].subtasks[1]
            .keyed_state
            .as_mut()
            .unwrap()
            .key_groups = KeyGroupRange { start: 127, end: 64 };
        refused(&m, "start must not exceed end");
        // A range past the max parallelism.
        let mut m = two_subtasks();
        m.operators[0].subtasks[1]
            .keyed_state
            .as_mut()
            .unwrap()
            .key_groups = KeyGroupRange { start: 64, end: 200 };
        refused(&m, "[64, 200]");
        // A gap (key groups 60..=63 would be lost) and an overlap.
        let mut m = two_subtasks();
        m.operators[0].subtasks[0]
            .keyed_state
            .as_mut()
            .unwrap()
            .key_groups = KeyGroupRange { start: 0, end: 59 };
        refused(&m, "leave out key groups at 60");
        let mut m = two_subtasks();
        m.operators[0].subtasks[0]
            .keyed_state
            .as_mut()
            .unwrap()
            .key_groups = KeyGroupRange { start: 0, end: 70 };
        refused(&m, "overlap");
        let mut m = two_subtasks();
        m.operators[0].subtasks.pop();
        refused(&m, "leave out key groups 64 to 127");
        // Subtasks out of range or twice; parallelism past the max.
        let mut m = two_subtasks();
        m.operators[0].subtasks[1].subtask = 2;
        refused(&m, "subtask 2 at parallelism 2");
        let mut m = two_subtasks();
        m.operators[0].subtasks[1].subtask = 0;
        refused(&m, "subtask 0 twice");
        let mut m = two_subtasks();
        m.operators[0].parallelism = 129;
        refused(&m, "parallelism 129");
        // Splits out of range or twice.
        let mut m = two_subtasks();
        m.operators[1].subtasks[0].splits[1].split = 4;
        refused(&m, "split 4, but it has 4 splits");
        let mut m = two_subtasks();
        m.operators[1].subtasks[0].splits[1].split = 1;
        refused(&m, "split 1 twice");
        // Channel state of a subtask out of range, or twice.
        let channel = |subtask| ChannelStateHandle {
            task_uid: "sum".into(),
            task_name: "keyed sum".into(),
            subtask,
            parallelism: 2,
            path: format!("chk-3/channel-1-{subtask}.cst"),
            size: 1,
            crc32: 0,
            input_records: 1,
            output_records: 0,
        };
        let mut m = two_subtasks();
        m.channel_state = vec![channel(0), channel(1)];
        assert!(CheckpointMetadata::from_json("m", &m.to_json().unwrap()).is_ok());
        m.channel_state = vec![channel(2)];
        refused(&m, "subtask 2 of parallelism 2");
        m.channel_state = vec![channel(1), channel(1)];
        refused(&m, "appears twice");
        // The same uid twice.
        let mut m = two_subtasks();
        m.operators[1].uid = OperatorUid("sum".into());
        refused(&m, "appears twice");
    }

    #[test]
    fn garbage_and_other_versions_give_clear_errors() {
        assert!(matches!(
            CheckpointMetadata::from_json("m", b"not json"),
            Err(Error::Corrupt { .. })
        ));
        let mut m = meta("chk-3/a");
        m.format_version = 99;
        let e = CheckpointMetadata::from_json("m", &m.to_json().unwrap()).unwrap_err();
        assert!(matches!(e, Error::Incompatible { .. }), "{e}");
        assert!(e.to_string().contains("99"));
    }
}
