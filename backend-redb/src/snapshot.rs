//! A [`RedbStore`](crate::state)'s snapshots: a full one ([`View`]: the
//! buffer's maps, as they were, on a read transaction) and the changes
//! since a base ([`RedbChanges`]: the changed keys read from a view).

use crate::buffer;
use crate::corrupt_or_storage;
use crate::flushed::{Run, RunGroup};
use crate::state::{compose, HEADER};
use redb::ReadOnlyTable;
use sluice_core::bytemap::ChangedKeys;
use sluice_core::heap::ChangeLog;
use sluice_core::state::{ChangeSetVisitor, SnapshotVisitor};
use sluice_core::{ChangeSnapshot, Error, KeyGroupRange, Result, StateId, StateSnapshot};
use std::sync::Arc;

/// A read transaction's view of a redb store with the buffer's maps,
/// as they were at the snapshot, on top.
pub(crate) struct View {
    pub(crate) table: ReadOnlyTable<&'static [u8], &'static [u8]>,
    pub(crate) groups: buffer::Groups,
    pub(crate) names: Vec<String>,
    pub(crate) range: KeyGroupRange,
    pub(crate) name: String,
}

impl View {
    fn check(&self, key_group: u32) -> Result<usize> {
        if !self.range.contains(key_group) {
            return Err(Error::InvalidArgument {
                what: format!("key group {key_group}"),
                reason: format!("outside the snapshot's range {}", self.range),
            });
        }
        Ok((key_group - self.range.start) as usize)
    }
}

impl StateSnapshot for View {
    fn key_groups(&self) -> KeyGroupRange {
        self.range
    }

    fn state_names(&self) -> Vec<String> {
        self.names.clone()
    }

    fn visit_key_group(&self, key_group: u32, visit: &mut SnapshotVisitor<'_>) -> Result<()> {
        let g = self.check(key_group)?;
        for (s, groups) in self.groups.iter().enumerate() {
            let s = s as StateId;
            let map = &groups[g];
            let (mut start, mut end) = (Vec::new(), Vec::new());
            compose(&mut start, s, key_group, &[]);
            compose(&mut end, s, key_group + 1, &[]);
            // A merge of two sorted runs, redb's rows and the map's
            // entries, the map winning (a tombstone hides the row): the
            // snapshot is sorted by key within each key group, so that a
            // restore into redb appends in order (about three times faster
            // than inserts at random).
            let mut entries: Vec<(&[u8], &Option<_>)> = map.iter().map(|(k, d)| (k, &d.value)).collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            let mut entries = entries.into_iter().peekable();
            for row in self
                .table
                .range(start.as_slice()..end.as_slice())
                .map_err(|e| corrupt_or_storage(&self.name, e))?
            {
                let (k, v) = row.map_err(|e| corrupt_or_storage(&self.name, e))?;
                let key = &k.value()[HEADER..];
                while let Some((ek, ev)) = entries.next_if(|(ek, _)| *ek < key) {
                    if let Some(ev) = ev {
                        visit(s, ek, ev)?;
                    }
                }
                match entries.next_if(|(ek, _)| *ek == key) {
                    Some((_, Some(ev))) => visit(s, key, ev)?,
                    Some((_, None)) => {}
                    None => visit(s, key, v.value())?,
                }
            }
            for (ek, ev) in entries {
                if let Some(ev) = ev {
                    visit(s, ek, ev)?;
                }
            }
        }
        Ok(())
    }
}

/// The changes of a redb store since a base: the keys written since,
/// read from the snapshot's view.
pub(crate) struct RedbChanges {
    pub(crate) view: View,
    /// The epochs since the base.
    pub(crate) epochs: Vec<Arc<ChangeLog>>,
    /// What the flushes before the snapshot wrote, newest first (those
    /// still kept).
    pub(crate) runs: Vec<Arc<Run>>,
    /// Their keys, sorted and deduplicated, built at the first visit (in
    /// the asynchronous part).
    pub(crate) index: std::sync::OnceLock<ChangedKeys>,
}

impl ChangeSnapshot for RedbChanges {
    fn key_groups(&self) -> KeyGroupRange {
        self.view.range
    }

    fn state_names(&self) -> Vec<String> {
        self.view.names.clone()
    }

    fn visit_key_group(&self, key_group: u32, visit: &mut ChangeSetVisitor<'_>) -> Result<()> {
        if !self.view.range.contains(key_group) {
            return Ok(());
        }
        let g = self.view.check(key_group)?;
        let keys = self.index.get_or_init(|| ChangedKeys::of(&self.epochs));
        // Per state, each run's entries of this key group, newest run first.
        let mut runs: Vec<Vec<RunGroup<'_>>> = (0..self.view.names.len())
            .map(|s| {
                self.runs
                    .iter()
                    .map(|r| r.group(s as StateId, key_group))
                    .collect()
            })
            .collect();
        let mut full = Vec::new();
        for (s, k) in keys.of_group(key_group) {
            if let Some(d) = self.view.groups[s as usize][g].get(k) {
                visit(s, k, d.value.as_deref())?;
                continue;
            }
            // Flushed since the base: the newest run holding it has its value.
            // The keys come sorted: each run's group is walked once.
            let found = runs
                .get_mut(s as usize)
                .and_then(|groups| groups.iter_mut().find_map(|r| r.seek(k)));
            if let Some(v) = found {
                visit(s, k, v)?;
                continue;
            }
            compose(&mut full, s, key_group, k);
            let row = self
                .view
                .table
                .get(full.as_slice())
                .map_err(|e| corrupt_or_storage(&self.view.name, e))?;
            // In neither the buffer nor redb: deleted since the base.
            visit(s, k, row.as_ref().map(|v| v.value()))?;
        }
        Ok(())
    }
}
