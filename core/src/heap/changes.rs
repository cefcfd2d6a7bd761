//! Change tracking of the heap tables: the keys each epoch wrote.

use super::ShortKey;
use crate::StateId;

/// The keys written or deleted in one epoch of change tracking (between two
/// snapshots), by key group and state: a key once per first write of the
/// epoch (and again after a deletion; duplicates are removed when the
/// changes are read).
///
/// A log may be given a limit ([`ChangeLog::with_limit`]): past it, keys are
/// no longer recorded and the log is [`overflowed`](ChangeLog::overflowed),
/// which means "too much changed: take a full snapshot". A store whose
/// incremental snapshots fall back to full ones beyond some share of
/// changed keys saves the recording (most of the cost of tracking when
/// every key changes in every interval).
pub struct ChangeLog {
    /// Keys of up to [`ShortKey::MAX`] bytes.
    pub short: Vec<(u32, StateId, ShortKey)>,
    /// Longer keys.
    pub long: Vec<(u32, StateId, Box<[u8]>)>,
    limit: usize,
    overflowed: bool,
}

impl Default for ChangeLog {
    fn default() -> Self {
        ChangeLog::with_limit(usize::MAX)
    }
}

impl ChangeLog {
    /// An empty log that records up to `limit` keys.
    pub fn with_limit(limit: usize) -> Self {
        ChangeLog {
            short: Vec::new(),
            long: Vec::new(),
            limit,
            overflowed: false,
        }
    }

    /// Whether more keys changed than the limit: the log is incomplete.
    pub fn overflowed(&self) -> bool {
        self.overflowed
    }

    /// Records that `key` of `state` in `key_group` changed.
    #[inline]
    pub fn mark(&mut self, key_group: u32, state: StateId, key: &[u8]) {
        if self.len() >= self.limit {
            self.overflowed = true;
            return;
        }
        if key.len() <= ShortKey::MAX {
            self.short.push((key_group, state, ShortKey::new(key)));
        } else {
            self.long.push((key_group, state, key.into()));
        }
    }

    /// Keys recorded (with duplicates).
    pub fn len(&self) -> usize {
        self.short.len() + self.long.len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
