//! The canonical keyed-state snapshot format.
//!
//! One file per (operator, subtask), independent of the backend that wrote
//! it, so a snapshot restores on any backend and at any parallelism. All
//! integers are little-endian.
//!
//! ```text
//! file    = header sections index footer
//! header  = "SLKS" version:u16 reserved:u16 kg_start:u32 kg_end:u32
//!           state_count:u32 { name_len:u16 name:utf8 }* header_crc:u32
//! section = { entry }*                                                  -- one per key group, in order
//! entry   = postcard((state_id:u16, key:&[u8], value:&[u8]))           -- version 1: a full snapshot
//!         | postcard((state_id:u16, key:&[u8], value:Option<&[u8]>))   -- version 2: changes (None: deleted)
//! index   = count:u32 { kg:u32 offset:u64 len:u64 entries:u64 crc:u32 }* index_crc:u32
//! footer  = header_len:u32 index_offset:u64 index_len:u64 "SLKE"       -- 24 bytes
//! ```
//!
//! CRCs are CRC-32 (IEEE) of the bytes they follow (the header, the index)
//! or of the section. A key group without entries has an index row of
//! length 0. A reader of a key-group range reads the footer, the header,
//! the index, and only the sections it needs, verifying each CRC it
//! touches; the whole-file CRC-32 in the metadata ([`verify_snapshot_file`])
//! covers full reads.
//!
//! Version 1 files hold a whole state ([`encode_snapshot`]); version 2
//! files hold the changes since an earlier snapshot, upserts and deletions
//! (tombstones), for incremental checkpoints ([`encode_changes`]). Both are
//! read by [`read_changes`]; [`read_key_groups`] reads full files only.

use crate::metadata::StateFileHandle;
use crate::state::{ChangeSnapshot, StateId, StateSnapshot};
use crate::storage::{CheckpointStorage, CheckpointStorageExt};
use crate::{Error, KeyGroupRange, Result};
use bytes::Bytes;
use futures::StreamExt;

/// Visits restored entries: `(state name, key group, key, value)`.
pub type EntryVisitor<'a> = dyn FnMut(&str, u32, &[u8], &[u8]) -> Result<()> + Send + 'a;

/// Visits restored changes: `(state name, key group, key, value)`, where a
/// value of `None` deletes the key.
pub type ChangeVisitor<'a> = dyn FnMut(&str, u32, &[u8], Option<&[u8]>) -> Result<()> + Send + 'a;

/// One decoded entry of a full file: `(state id, key, value)`.
type RawEntry<'a> = (u16, &'a [u8], &'a [u8]);

/// One decoded entry of a changes file: `(state id, key, value or deleted)`.
type RawChange<'a> = (u16, &'a [u8], Option<&'a [u8]>);

/// The format version of full snapshot files written by this build.
pub const SNAPSHOT_FORMAT_VERSION: u16 = 1;

/// The format version of changes files (incremental checkpoints).
pub const CHANGES_FORMAT_VERSION: u16 = 2;
const MAGIC: &[u8; 4] = b"SLKS";
const END_MAGIC: &[u8; 4] = b"SLKE";
const FOOTER_LEN: u64 = 24;
const INDEX_ROW: usize = 4 + 8 + 8 + 8 + 4;

mod read;
mod write;

pub use read::*;
pub use write::*;

#[cfg(test)]
pub(crate) mod tests;
