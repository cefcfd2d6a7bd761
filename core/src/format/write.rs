//! Writing the format: full snapshots and changes files, in parts.

use super::*;

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

impl EncodedSnapshot {
    /// The metadata's handle of this file, stored at `path`.
    pub fn handle(&self, path: impl Into<String>) -> StateFileHandle {
        StateFileHandle {
            path: path.into(),
            size: self.bytes.len() as u64,
            crc32: self.crc32,
            key_groups: self.key_groups,
            entries: self.entries,
        }
    }
}

/// Encodes a snapshot in the canonical format (version 1: every entry).
pub fn encode_snapshot(snapshot: &dyn StateSnapshot) -> Result<EncodedSnapshot> {
    collect(|emit| encode_snapshot_in_parts(snapshot, usize::MAX, emit))
}

/// Encodes the changes since an earlier snapshot (version 2: upserts and
/// deletions) for an incremental checkpoint.
pub fn encode_changes(changes: &dyn ChangeSnapshot) -> Result<EncodedSnapshot> {
    collect(|emit| encode_changes_in_parts(changes, usize::MAX, emit))
}

/// What an encoding in parts wrote: everything of [`EncodedSnapshot`] but
/// the bytes, which went to the `emit` callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncodedParts {
    /// Bytes of the whole file.
    pub size: u64,
    /// CRC-32 of the whole file.
    pub crc32: u32,
    /// Number of entries.
    pub entries: u64,
    /// Key groups covered.
    pub key_groups: KeyGroupRange,
}

impl EncodedParts {
    /// The metadata's handle of this file, stored at `path`.
    pub fn handle(&self, path: impl Into<String>) -> StateFileHandle {
        StateFileHandle {
            path: path.into(),
            size: self.size,
            crc32: self.crc32,
            key_groups: self.key_groups,
            entries: self.entries,
        }
    }
}

/// Encodes a full snapshot like [`encode_snapshot`], handing the file to
/// `emit` in parts of about `part_bytes` (cut between key groups; a part
/// holds at least one key group's section), in order: a state larger than
/// memory is written without being held whole.
pub fn encode_snapshot_in_parts(
    snapshot: &dyn StateSnapshot,
    part_bytes: usize,
    emit: &mut dyn FnMut(Bytes) -> Result<()>,
) -> Result<EncodedParts> {
    encode(
        snapshot.key_groups(),
        &snapshot.state_names(),
        SNAPSHOT_FORMAT_VERSION,
        &mut |kg, out| snapshot.append_key_group(kg, out),
        part_bytes,
        emit,
    )
}

/// Encodes changes like [`encode_changes`], in parts as
/// [`encode_snapshot_in_parts`].
pub fn encode_changes_in_parts(
    changes: &dyn ChangeSnapshot,
    part_bytes: usize,
    emit: &mut dyn FnMut(Bytes) -> Result<()>,
) -> Result<EncodedParts> {
    encode(
        changes.key_groups(),
        &changes.state_names(),
        CHANGES_FORMAT_VERSION,
        &mut |kg, out| {
            let mut entries = 0u64;
            changes.visit_key_group(kg, &mut |state, key, value| {
                entries += 1;
                append_change(out, state, key, value);
                Ok(())
            })?;
            Ok(entries)
        },
        part_bytes,
        emit,
    )
}

/// Runs an encoding in parts and keeps the file whole.
pub(super) fn collect(
    run: impl FnOnce(&mut dyn FnMut(Bytes) -> Result<()>) -> Result<EncodedParts>,
) -> Result<EncodedSnapshot> {
    let mut parts: Vec<Bytes> = Vec::new();
    let done = run(&mut |b| {
        parts.push(b);
        Ok(())
    })?;
    let bytes = match parts.len() {
        1 => parts.pop().unwrap_or_default(),
        _ => Bytes::from(parts.concat()),
    };
    Ok(EncodedSnapshot {
        bytes,
        crc32: done.crc32,
        entries: done.entries,
        key_groups: done.key_groups,
    })
}

/// The file being written: the part not emitted yet, what was emitted, and
/// the whole file's CRC so far.
pub(super) struct PartWriter<'e> {
    out: Vec<u8>,
    emitted: u64,
    crc: crc32fast::Hasher,
    part_bytes: usize,
    emit: &'e mut dyn FnMut(Bytes) -> Result<()>,
}

impl PartWriter<'_> {
    /// The file offset of the next byte.
    fn offset(&self) -> u64 {
        self.emitted + self.out.len() as u64
    }

    /// Hands the buffered bytes on, if there are `part_bytes` of them (or
    /// any, when `last`).
    fn maybe_emit(&mut self, last: bool) -> Result<()> {
        if self.out.len() >= self.part_bytes || (last && !self.out.is_empty()) {
            let part = std::mem::take(&mut self.out);
            self.crc.update(&part);
            self.emitted += part.len() as u64;
            if !last {
                self.out = Vec::with_capacity(self.part_bytes.min(part.len()));
            }
            (self.emit)(Bytes::from(part))?;
        }
        Ok(())
    }
}

/// Appends `v` as postcard's varint (LEB128); also the heap tables'
/// integer fast path (`heap::append_canonical`).
#[inline]
pub(crate) fn append_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Appends a byte string as postcard does: its length, then the bytes.
#[inline]
pub(crate) fn append_bytes(out: &mut Vec<u8>, b: &[u8]) {
    append_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// Appends an entry of a full snapshot: the postcard encoding of a
/// `RawEntry` (state, key, value), written directly (serde encodes a `&[u8]` byte by byte,
/// which was most of a heap snapshot's encoding time). The bytes are the
/// same (tested against postcard). A backend writes a key group's
/// entries with it in [`StateSnapshot::append_key_group`](crate::StateSnapshot::append_key_group).
///
/// ```
/// let mut out = Vec::new();
/// sluice_core::format::append_entry(&mut out, 1, b"key", &[7]);
/// assert_eq!(out, [1, 3, b'k', b'e', b'y', 1, 7]);
/// ```
#[inline]
pub fn append_entry(out: &mut Vec<u8>, state: StateId, key: &[u8], value: &[u8]) {
    append_varint(out, u64::from(state));
    append_bytes(out, key);
    append_bytes(out, value);
}

/// Appends an entry of a changes file: the postcard encoding of a
/// [`RawChange`] (`None`: a deletion), written directly as
/// [`append_entry`].
#[inline]
pub(super) fn append_change(out: &mut Vec<u8>, state: StateId, key: &[u8], value: Option<&[u8]>) {
    append_varint(out, u64::from(state));
    append_bytes(out, key);
    match value {
        Some(v) => {
            out.push(1);
            append_bytes(out, v);
        }
        None => out.push(0),
    }
}

/// Writes a file of `version` whose key group `kg`'s entries
/// `write_kg(kg, out)` appends (returning how many), handing it to `emit`
/// in parts.
pub(super) fn encode(
    range: KeyGroupRange,
    names: &[String],
    version: u16,
    write_kg: &mut dyn FnMut(u32, &mut Vec<u8>) -> Result<u64>,
    part_bytes: usize,
    emit: &mut dyn FnMut(Bytes) -> Result<()>,
) -> Result<EncodedParts> {
    let mut w = PartWriter {
        out: Vec::with_capacity(4096),
        emitted: 0,
        crc: crc32fast::Hasher::new(),
        part_bytes: part_bytes.max(1),
        emit,
    };
    let out = &mut w.out;
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&range.start.to_le_bytes());
    out.extend_from_slice(&range.end.to_le_bytes());
    out.extend_from_slice(&(names.len() as u32).to_le_bytes());
    for n in names {
        let len = u16::try_from(n.len()).map_err(|_| Error::InvalidArgument {
            what: format!("state name {n:?}"),
            reason: "longer than 65535 bytes".into(),
        })?;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(n.as_bytes());
    }
    let crc = crc32fast::hash(out);
    out.extend_from_slice(&crc.to_le_bytes());
    let header_len = out.len() as u32;

    let mut index: Vec<u8> = Vec::with_capacity(4 + range.len() * INDEX_ROW + 4);
    index.extend_from_slice(&(range.len() as u32).to_le_bytes());
    let mut total = 0u64;
    for kg in range.iter() {
        let start = w.out.len();
        let offset = w.offset();
        let entries = write_kg(kg, &mut w.out)?;
        total += entries;
        let section = &w.out[start..];
        index.extend_from_slice(&kg.to_le_bytes());
        index.extend_from_slice(&offset.to_le_bytes());
        index.extend_from_slice(&(section.len() as u64).to_le_bytes());
        index.extend_from_slice(&entries.to_le_bytes());
        index.extend_from_slice(&crc32fast::hash(section).to_le_bytes());
        w.maybe_emit(false)?;
    }
    let icrc = crc32fast::hash(&index);
    index.extend_from_slice(&icrc.to_le_bytes());
    let index_offset = w.offset();
    w.out.extend_from_slice(&index);
    w.out.extend_from_slice(&header_len.to_le_bytes());
    w.out.extend_from_slice(&index_offset.to_le_bytes());
    w.out.extend_from_slice(&(index.len() as u64).to_le_bytes());
    w.out.extend_from_slice(END_MAGIC);
    w.maybe_emit(true)?;
    Ok(EncodedParts {
        size: w.emitted,
        crc32: w.crc.finalize(),
        entries: total,
        key_groups: range,
    })
}
