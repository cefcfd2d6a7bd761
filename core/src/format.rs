//! The canonical keyed-state snapshot format (to be written).

use crate::metadata::StateFileHandle;
use crate::state::StateSnapshot;
use crate::storage::CheckpointStorage;
use crate::{KeyGroupRange, Result};
use bytes::Bytes;

/// An encoded snapshot file.
#[derive(Debug, Clone)]
pub struct EncodedSnapshot {
    /// The whole file.
    pub bytes: Bytes,
    /// CRC-32 of the whole file.
    pub crc32: u32,
    /// Number of entries.
    pub entries: u64,
    /// Key groups covered.
    pub key_groups: KeyGroupRange,
}

/// Encodes a snapshot.
pub fn encode_snapshot(_snapshot: &dyn StateSnapshot) -> Result<EncodedSnapshot> {
    unimplemented!()
}

/// Reads the entries of the key groups in `range` from a state file.
pub async fn read_key_groups(
    _storage: &dyn CheckpointStorage,
    _file: &StateFileHandle,
    _range: KeyGroupRange,
    _visit: &mut (dyn FnMut(&str, u32, &[u8], &[u8]) -> Result<()> + Send),
) -> Result<u64> {
    unimplemented!()
}
