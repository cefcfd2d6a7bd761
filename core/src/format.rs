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
        &mut |kg, put| snapshot.visit_key_group(kg, &mut |state, key, value| put(state, key, Some(value))),
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
        &mut |kg, put| changes.visit_key_group(kg, &mut |state, key, value| put(state, key, value)),
        part_bytes,
        emit,
    )
}

/// Runs an encoding in parts and keeps the file whole.
fn collect(
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

/// Emits one entry of a key group: `(state, key, value or deleted)`.
type Emit<'a> = dyn FnMut(StateId, &[u8], Option<&[u8]>) -> Result<()> + 'a;

/// The file being written: the part not emitted yet, what was emitted, and
/// the whole file's CRC so far.
struct PartWriter<'e> {
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
fn append_bytes(out: &mut Vec<u8>, b: &[u8]) {
    append_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// Appends an entry of a full snapshot: the postcard encoding of a
/// [`RawEntry`], written directly (serde encodes a `&[u8]` byte by byte,
/// which was most of a heap snapshot's encoding time). The bytes are the
/// same (tested against postcard).
#[inline]
fn append_entry(out: &mut Vec<u8>, state: StateId, key: &[u8], value: &[u8]) {
    append_varint(out, u64::from(state));
    append_bytes(out, key);
    append_bytes(out, value);
}

/// Appends an entry of a changes file: the postcard encoding of a
/// [`RawChange`] (`None`: a deletion), written directly as
/// [`append_entry`].
#[inline]
fn append_change(out: &mut Vec<u8>, state: StateId, key: &[u8], value: Option<&[u8]>) {
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
/// `visit_kg(kg, emit)` emits, handing it to `emit` in parts.
fn encode(
    range: KeyGroupRange,
    names: &[String],
    version: u16,
    visit_kg: &mut dyn FnMut(u32, &mut Emit<'_>) -> Result<()>,
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
        let mut entries = 0u64;
        visit_kg(kg, &mut |state, key, value| {
            entries += 1;
            match (version, value) {
                (SNAPSHOT_FORMAT_VERSION, Some(v)) => append_entry(&mut w.out, state, key, v),
                (SNAPSHOT_FORMAT_VERSION, None) => {
                    return Err(Error::InvalidArgument {
                        what: format!("a deletion in key group {kg}"),
                        reason: "a full snapshot holds no deletions".into(),
                    })
                }
                (_, value) => append_change(&mut w.out, state, key, value),
            }
            Ok(())
        })?;
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

/// Checks a whole file against the CRC-32 recorded in its metadata.
pub fn verify_snapshot_file(path: &str, bytes: &[u8], expected_crc32: u32) -> Result<()> {
    let actual = crc32fast::hash(bytes);
    if actual != expected_crc32 {
        return Err(Error::corrupt(
            path,
            format!("file checksum {actual:08x} does not match the recorded {expected_crc32:08x}"),
        ));
    }
    Ok(())
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Footer fields.
struct Footer {
    header_len: u64,
    index_offset: u64,
    index_len: u64,
}

fn parse_footer(path: &str, b: &[u8], size: u64) -> Result<Footer> {
    if b.len() as u64 != FOOTER_LEN || &b[20..24] != END_MAGIC {
        return Err(Error::corrupt(
            path,
            "missing end marker: the file is truncated or not a Sluice snapshot",
        ));
    }
    let f = Footer {
        header_len: u64::from(u32_at(b, 0)),
        index_offset: u64_at(b, 4),
        index_len: u64_at(b, 12),
    };
    let body = size - FOOTER_LEN;
    if f.header_len < 24
        || f.header_len > f.index_offset
        || f.index_offset > body
        || f.index_len != body - f.index_offset
    {
        return Err(Error::corrupt(path, "footer offsets do not fit the file"));
    }
    Ok(f)
}

/// The parsed header.
struct Header {
    version: u16,
    range: KeyGroupRange,
    names: Vec<String>,
}

fn parse_header(path: &str, b: &[u8]) -> Result<Header> {
    let body = &b[..b.len() - 4];
    if crc32fast::hash(body) != u32_at(b, b.len() - 4) {
        return Err(Error::corrupt(path, "header checksum mismatch"));
    }
    if &body[0..4] != MAGIC {
        return Err(Error::corrupt(
            path,
            "not a Sluice keyed-state snapshot (bad magic)",
        ));
    }
    let version = u16::from_le_bytes([body[4], body[5]]);
    if version != SNAPSHOT_FORMAT_VERSION && version != CHANGES_FORMAT_VERSION {
        return Err(Error::Incompatible {
            what: format!("snapshot file {path}"),
            reason: format!(
                "format version {version}; this build reads versions {SNAPSHOT_FORMAT_VERSION} and \
                 {CHANGES_FORMAT_VERSION}"
            ),
        });
    }
    let (start, end) = (u32_at(body, 8), u32_at(body, 12));
    let range =
        KeyGroupRange::new(start, end).map_err(|_| Error::corrupt(path, "bad key group range in header"))?;
    let count = u32_at(body, 16) as usize;
    let mut at = 20;
    let mut names = Vec::new();
    for _ in 0..count {
        if at + 2 > body.len() {
            return Err(Error::corrupt(path, "header ends inside the state names"));
        }
        let len = u16::from_le_bytes([body[at], body[at + 1]]) as usize;
        at += 2;
        let name = body
            .get(at..at + len)
            .ok_or_else(|| Error::corrupt(path, "header ends inside a state name"))?;
        names.push(
            String::from_utf8(name.to_vec()).map_err(|_| Error::corrupt(path, "state name is not UTF-8"))?,
        );
        at += len;
    }
    if at != body.len() {
        return Err(Error::corrupt(path, "header length does not match its content"));
    }
    Ok(Header {
        version,
        range,
        names,
    })
}

/// One index row.
#[derive(Debug, Clone, Copy)]
struct Row {
    kg: u32,
    offset: u64,
    len: u64,
    entries: u64,
    crc: u32,
}

fn parse_index(path: &str, b: &[u8], range: KeyGroupRange, footer: &Footer) -> Result<Vec<Row>> {
    if b.len() < 8 || crc32fast::hash(&b[..b.len() - 4]) != u32_at(b, b.len() - 4) {
        return Err(Error::corrupt(path, "index checksum mismatch"));
    }
    let count = u32_at(b, 0) as usize;
    if count != range.len() || b.len() != 4 + count * INDEX_ROW + 4 {
        return Err(Error::corrupt(
            path,
            "index size does not match the header's key group range",
        ));
    }
    let mut rows = Vec::with_capacity(count);
    let mut expect_offset = footer.header_len;
    for (i, kg) in range.iter().enumerate() {
        let at = 4 + i * INDEX_ROW;
        let row = Row {
            kg: u32_at(b, at),
            offset: u64_at(b, at + 4),
            len: u64_at(b, at + 12),
            entries: u64_at(b, at + 20),
            crc: u32_at(b, at + 28),
        };
        if row.kg != kg || row.offset != expect_offset || row.len > footer.index_offset - row.offset {
            return Err(Error::corrupt(
                path,
                format!("index row of key group {kg} is inconsistent"),
            ));
        }
        expect_offset = row.offset + row.len;
        rows.push(row);
    }
    if expect_offset != footer.index_offset {
        return Err(Error::corrupt(path, "sections do not end where the index starts"));
    }
    Ok(rows)
}

fn decode_section(
    path: &str,
    row: &Row,
    header: &Header,
    mut bytes: &[u8],
    visit: &mut ChangeVisitor<'_>,
) -> Result<u64> {
    if crc32fast::hash(bytes) != row.crc {
        return Err(Error::corrupt(
            path,
            format!("checksum mismatch in the section of key group {}", row.kg),
        ));
    }
    let bad = |e: postcard::Error| Error::corrupt(path, format!("bad entry in key group {}: {e}", row.kg));
    let mut n = 0u64;
    while !bytes.is_empty() {
        let ((state, key, value), rest): (RawChange<'_>, &[u8]) = if header.version == SNAPSHOT_FORMAT_VERSION
        {
            let ((state, key, value), rest): (RawEntry<'_>, &[u8]) =
                postcard::take_from_bytes(bytes).map_err(bad)?;
            ((state, key, Some(value)), rest)
        } else {
            postcard::take_from_bytes(bytes).map_err(bad)?
        };
        let name = header
            .names
            .get(state as usize)
            .ok_or_else(|| Error::corrupt(path, format!("entry names unknown state {state}")))?;
        visit(name, row.kg, key, value)?;
        n += 1;
        bytes = rest;
    }
    if n != row.entries {
        return Err(Error::corrupt(
            path,
            format!(
                "key group {} holds {n} entries, the index says {}",
                row.kg, row.entries
            ),
        ));
    }
    Ok(n)
}

/// Decodes the entries of the key groups in `range` from a whole file held
/// in memory: `visit(state name, key group, key, value)`. A changes file
/// (with deletions) is refused: decode it with [`decode_changes`].
pub fn decode_snapshot(
    path: &str,
    bytes: &[u8],
    range: KeyGroupRange,
    visit: &mut EntryVisitor<'_>,
) -> Result<u64> {
    decode_changes(path, bytes, range, &mut full_only(path, visit))
}

/// Decodes the entries of the key groups in `range` from a whole file held
/// in memory, full or changes: `visit(state name, key group, key, value or
/// deleted)`.
pub fn decode_changes(
    path: &str,
    bytes: &[u8],
    range: KeyGroupRange,
    visit: &mut ChangeVisitor<'_>,
) -> Result<u64> {
    let size = bytes.len() as u64;
    if size < FOOTER_LEN + 24 {
        return Err(Error::corrupt(
            path,
            format!("{size} bytes is too short for a snapshot file"),
        ));
    }
    let footer = parse_footer(path, &bytes[(size - FOOTER_LEN) as usize..], size)?;
    let header = parse_header(path, &bytes[..footer.header_len as usize])?;
    let index_end = (footer.index_offset + footer.index_len) as usize;
    let rows = parse_index(
        path,
        &bytes[footer.index_offset as usize..index_end],
        header.range,
        &footer,
    )?;
    let mut n = 0;
    for row in rows.iter().filter(|r| range.contains(r.kg)) {
        let s = &bytes[row.offset as usize..(row.offset + row.len) as usize];
        n += decode_section(path, row, &header, s, visit)?;
    }
    Ok(n)
}

/// A change visitor for full files: a deletion means the file is a changes
/// file, which the caller did not expect.
fn full_only<'a, 'v: 'a>(
    path: &'a str,
    visit: &'a mut EntryVisitor<'v>,
) -> impl FnMut(&str, u32, &[u8], Option<&[u8]>) -> Result<()> + Send + use<'a, 'v> {
    move |name, kg, key, value| match value {
        Some(v) => visit(name, kg, key, v),
        None => Err(Error::corrupt(
            path,
            "holds deletions: it is the changes file of an incremental checkpoint, not a full snapshot",
        )),
    }
}

/// Reads the entries of the key groups in `range ∩ file.key_groups` from a
/// full state file in storage (see [`read_changes`]). A changes file is
/// refused as corrupt when it turns out to hold a deletion.
pub async fn read_key_groups(
    storage: &dyn CheckpointStorage,
    file: &StateFileHandle,
    range: KeyGroupRange,
    visit: &mut EntryVisitor<'_>,
) -> Result<u64> {
    let path = file.path.clone();
    let mut full = full_only(&path, visit);
    read_changes(storage, file, range, &mut full).await
}

/// Reads the entries of the key groups in `range ∩ file.key_groups` from a
/// state file in storage — a full snapshot, or the changes of an
/// incremental checkpoint (a value of `None` deletes the key) — reading only
/// the footer, header, index and the needed sections (range reads).
/// Returns the number of entries visited.
pub async fn read_changes(
    storage: &dyn CheckpointStorage,
    file: &StateFileHandle,
    range: KeyGroupRange,
    visit: &mut ChangeVisitor<'_>,
) -> Result<u64> {
    let path = file.path.as_str();
    let Some(range) = range.intersect(&file.key_groups) else {
        return Ok(0);
    };
    let size = file.size;
    // The index's length follows from the key group range, so the index
    // and the footer come in one read from the end.
    let index_len = (4 + file.key_groups.len() * INDEX_ROW + 4) as u64;
    if size < FOOTER_LEN + index_len + 24 {
        return Err(Error::corrupt(
            path,
            format!(
                "{size} bytes is too short for a snapshot file of {} key groups",
                file.key_groups.len()
            ),
        ));
    }
    let tail = storage
        .read_range(path, size - FOOTER_LEN - index_len..size)
        .await?;
    let split = tail.len() - FOOTER_LEN as usize;
    let footer = parse_footer(path, &tail[split..], size)?;
    if footer.index_len != index_len || footer.index_offset != size - FOOTER_LEN - index_len {
        return Err(Error::corrupt(
            path,
            "the index is not where the key group range puts it",
        ));
    }
    let rows = parse_index(path, &tail[..split], file.key_groups, &footer)?;
    let wanted: Vec<Row> = rows.into_iter().filter(|r| range.contains(r.kg)).collect();
    let (Some(first), Some(last)) = (wanted.first(), wanted.last()) else {
        return Ok(0);
    };
    // The header, then the wanted sections (which are contiguous) in
    // chunks of about READ_CHUNK bytes, READS_IN_FLIGHT at a time: memory
    // stays bounded for large files, and the reads overlap the decoding.
    // A small file whose sections follow the header (a subtask restoring
    // its own file) comes in one read with its header.
    let sections_end = last.offset + last.len;
    let (header, first_chunk) = if first.offset == footer.header_len && sections_end <= READ_CHUNK {
        let all = storage.read_range(path, 0..sections_end).await?;
        (parse_header(path, &all[..footer.header_len as usize])?, Some(all))
    } else {
        let head = storage.read_range(path, 0..footer.header_len).await?;
        (parse_header(path, &head)?, None)
    };
    if header.range != file.key_groups {
        return Err(Error::corrupt(
            path,
            "key group range differs from the metadata's",
        ));
    }
    let mut n = 0;
    if let Some(all) = first_chunk {
        for row in &wanted {
            n += decode_section(path, row, &header, section(path, row, &all, 0)?, visit)?;
        }
        return Ok(n);
    }
    let reads = chunk_rows(&wanted, READ_CHUNK).into_iter().map(|rows| {
        let start = wanted[rows.start].offset;
        let end = wanted[rows.end - 1].offset + wanted[rows.end - 1].len;
        async move {
            storage
                .read_range(path, start..end)
                .await
                .map(|b| (rows, start, b))
        }
    });
    let mut reads = futures::stream::iter(reads).buffered(READS_IN_FLIGHT);
    while let Some(read) = reads.next().await {
        let (rows, start, bytes) = read?;
        for row in &wanted[rows] {
            n += decode_section(path, row, &header, section(path, row, &bytes, start)?, visit)?;
        }
    }
    Ok(n)
}

/// Bytes per range read of a state file's sections (a key group larger
/// than this is read alone).
const READ_CHUNK: u64 = 8 << 20;

/// Range reads of one state file in flight at a time.
const READS_IN_FLIGHT: usize = 4;

/// Consecutive rows grouped into chunks of about `max` bytes (ranges of
/// row indices).
fn chunk_rows(rows: &[Row], max: u64) -> Vec<std::ops::Range<usize>> {
    let mut chunks = Vec::new();
    let (mut from, mut bytes) = (0, 0u64);
    for (i, row) in rows.iter().enumerate() {
        if i > from && bytes + row.len > max {
            chunks.push(from..i);
            (from, bytes) = (i, 0);
        }
        bytes += row.len;
    }
    if from < rows.len() {
        chunks.push(from..rows.len());
    }
    chunks
}

/// The section of `row` in `bytes`, which start at file offset `start`.
fn section<'b>(path: &str, row: &Row, bytes: &'b [u8], start: u64) -> Result<&'b [u8]> {
    let from = (row.offset - start) as usize;
    bytes.get(from..from + row.len as usize).ok_or_else(|| {
        Error::corrupt(
            path,
            format!("section of key group {} is past the bytes read", row.kg),
        )
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::StateId;
    use std::collections::BTreeMap;
    use std::ops::Range;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Mutex;

    fn fixed() -> crate::MapSnapshot {
        let mut snap =
            crate::MapSnapshot::new(KeyGroupRange::new(5, 12).unwrap(), vec!["a".into(), "b".into()]);
        for i in 0..300u32 {
            let kg = 5 + i % 7;
            // Key group 11 stays empty.
            if kg != 11 {
                snap.insert(
                    kg,
                    (i % 2) as StateId,
                    i.to_be_bytes().to_vec(),
                    vec![i as u8; (i % 13) as usize],
                );
            }
        }
        snap
    }

    #[test]
    fn entries_are_written_exactly_as_postcard_writes_them() {
        let states: [StateId; 6] = [0, 1, 127, 128, 300, StateId::MAX];
        let lens = [0usize, 1, 15, 127, 128, 200, 16_383, 16_384];
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        for &state in &states {
            for &kl in &lens {
                for &vl in &lens {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let key: Vec<u8> = (0..kl).map(|i| (x >> (i % 56)) as u8).collect();
                    let value: Vec<u8> = (0..vl).map(|i| (x >> (i % 48)) as u8 ^ 0x5a).collect();
                    let mut fast = vec![7u8];
                    append_entry(&mut fast, state, &key, &value);
                    let expected = postcard::to_extend(&(state, &key[..], &value[..]), vec![7u8]).unwrap();
                    assert_eq!(
                        fast, expected,
                        "entry: state {state}, key {kl} bytes, value {vl} bytes"
                    );
                    for v in [Some(&value[..]), None] {
                        let mut fast = vec![7u8];
                        append_change(&mut fast, state, &key, v);
                        let expected = postcard::to_extend(&(state, &key[..], v), vec![7u8]).unwrap();
                        assert_eq!(fast, expected, "change: state {state}, key {kl} bytes, {v:?}");
                        let (decoded, rest): (RawChange<'_>, &[u8]) =
                            postcard::take_from_bytes(&fast[1..]).unwrap();
                        assert_eq!(decoded, (state, &key[..], v));
                        assert!(rest.is_empty());
                    }
                }
            }
        }
    }

    /// A storage that holds one file and counts the bytes read.
    #[derive(Debug, Default)]
    pub(crate) struct Counting {
        file: Mutex<Bytes>,
        read: AtomicU64,
        requests: AtomicU64,
    }

    #[async_trait::async_trait]
    impl CheckpointStorage for Counting {
        fn describe(&self) -> String {
            "counting".into()
        }
        async fn write_file(&self, _path: &str, data: Bytes) -> Result<()> {
            *self.file.lock().unwrap() = data;
            Ok(())
        }
        async fn read(&self, path: &str, r: Option<Range<u64>>) -> Result<Bytes> {
            let f = self.file.lock().unwrap().clone();
            let Some(r) = r else {
                self.read.fetch_add(f.len() as u64, Ordering::Relaxed);
                return Ok(f);
            };
            if r.end > f.len() as u64 || r.start > r.end {
                return Err(Error::corrupt(path, "range past the end"));
            }
            self.read.fetch_add(r.end - r.start, Ordering::Relaxed);
            self.requests.fetch_add(1, Ordering::Relaxed);
            Ok(f.slice(r.start as usize..r.end as usize))
        }
        async fn commit_file(&self, path: &str, data: Bytes) -> Result<()> {
            self.write_file(path, data).await
        }
        async fn list_files(&self, _dir: &str) -> Result<Vec<crate::FileListing>> {
            Ok(vec![])
        }
        async fn delete_file(&self, _path: &str) -> Result<()> {
            Ok(())
        }
        async fn delete_dir(&self, _dir: &str) -> Result<()> {
            Ok(())
        }
    }

    type Decoded = BTreeMap<(u32, String, Vec<u8>), Vec<u8>>;

    fn decode_all(bytes: &[u8], range: KeyGroupRange) -> Result<Decoded> {
        let mut m = BTreeMap::new();
        decode_snapshot("t", bytes, range, &mut |n, kg, k, v| {
            m.insert((kg, n.to_string(), k.to_vec()), v.to_vec());
            Ok(())
        })?;
        Ok(m)
    }

    fn handle(enc: &EncodedSnapshot) -> StateFileHandle {
        enc.handle("chk-1/t.kst")
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        futures::executor::block_on(f)
    }

    #[test]
    fn round_trip_keeps_every_entry_and_an_empty_key_group() {
        let snap = fixed();
        let enc = encode_snapshot(&snap).unwrap();
        assert_eq!(enc.entries as usize, snap.len());
        let got = decode_all(&enc.bytes, snap.key_groups()).unwrap();
        let names = snap.state_names();
        let want: BTreeMap<_, _> = snap
            .iter()
            .map(|(g, s, k, v)| ((g, names[s as usize].clone(), k.to_vec()), v.to_vec()))
            .collect();
        assert_eq!(got, want);
        verify_snapshot_file("t", &enc.bytes, enc.crc32).unwrap();
    }

    #[test]
    fn a_file_encoded_in_parts_is_the_file_encoded_whole() {
        let snap = fixed();
        let whole = encode_snapshot(&snap).unwrap();
        for part_bytes in [1, 7, 64, 1 << 20] {
            let mut parts: Vec<Bytes> = Vec::new();
            let done = encode_snapshot_in_parts(&snap, part_bytes, &mut |b| {
                parts.push(b);
                Ok(())
            })
            .unwrap();
            assert_eq!(parts.concat(), whole.bytes.to_vec(), "parts of {part_bytes}");
            assert!(parts.iter().all(|p| !p.is_empty()));
            if part_bytes == 1 {
                // Cut between key groups: at most one part per key group
                // (the first with the header; none for an empty one emitted
                // with the previous), plus the index and footer.
                assert!(
                    parts.len() > 2 && parts.len() <= snap.key_groups().len() + 1,
                    "{}",
                    parts.len()
                );
            }
            assert_eq!(done.handle("p"), whole.handle("p"));
        }
        // A failing consumer stops the encoding with its error.
        let err =
            encode_snapshot_in_parts(&snap, 1, &mut |_| Err(Error::not_found("the upload"))).unwrap_err();
        assert!(matches!(err, Error::NotFound { .. }), "{err}");
    }

    #[test]
    fn reading_a_sub_range_reads_only_its_sections() {
        let snap = fixed();
        let enc = encode_snapshot(&snap).unwrap();
        let storage = Counting::default();
        block_on(storage.write_file("chk-1/t.kst", enc.bytes.clone())).unwrap();
        let file = handle(&enc);
        let mut seen = Vec::new();
        let n = block_on(read_key_groups(
            &storage,
            &file,
            KeyGroupRange::new(7, 7).unwrap(),
            &mut |_, kg, _, _| {
                seen.push(kg);
                Ok(())
            },
        ))
        .unwrap();
        assert_eq!(n as usize, snap.iter().filter(|(g, _, _, _)| *g == 7).count());
        assert!(seen.iter().all(|g| *g == 7));
        let read = storage.read.load(Ordering::Relaxed);
        assert!(
            read < enc.bytes.len() as u64 / 3,
            "read {read} of {} bytes for one key group of eight",
            enc.bytes.len()
        );
        // A range outside the file reads nothing.
        let n = block_on(read_key_groups(
            &storage,
            &file,
            KeyGroupRange::new(20, 30).unwrap(),
            &mut |_, _, _, _| Ok(()),
        ));
        assert_eq!(n.unwrap(), 0);
    }

    #[test]
    fn a_large_file_is_read_in_bounded_chunks_and_decoded_whole() {
        // Three key groups of ~6 MiB each: the tail, the header, then one
        // read per chunk of at most READ_CHUNK bytes (one section each, as
        // two would not fit), never the whole file at once.
        let mut snap = crate::MapSnapshot::new(KeyGroupRange::new(0, 2).unwrap(), vec!["s".into()]);
        for i in 0..300u32 {
            snap.insert(i % 3, 0, i.to_be_bytes().to_vec(), vec![i as u8; 64 << 10]);
        }
        let enc = encode_snapshot(&snap).unwrap();
        assert!(enc.bytes.len() as u64 > 2 * READ_CHUNK);
        let storage = Counting::default();
        block_on(storage.write_file("chk-1/t.kst", enc.bytes.clone())).unwrap();
        let mut got = BTreeMap::new();
        let n = block_on(read_key_groups(
            &storage,
            &handle(&enc),
            KeyGroupRange::all(3),
            &mut |_, kg, k, v| {
                got.insert((kg, k.to_vec()), v.to_vec());
                Ok(())
            },
        ))
        .unwrap();
        assert_eq!(n, 300);
        let want: BTreeMap<_, _> = snap
            .iter()
            .map(|(g, _, k, v)| ((g, k.to_vec()), v.to_vec()))
            .collect();
        assert_eq!(got, want);
        assert_eq!(storage.requests.load(Ordering::Relaxed), 2 + 3);
    }

    #[test]
    fn rows_are_chunked_in_order_up_to_the_limit() {
        let rows: Vec<Row> = [3u64, 3, 3, 10, 0, 1]
            .iter()
            .enumerate()
            .map(|(i, len)| Row {
                kg: i as u32,
                offset: 0,
                len: *len,
                entries: 0,
                crc: 0,
            })
            .collect();
        let chunks: Vec<Vec<u32>> = chunk_rows(&rows, 6)
            .into_iter()
            .map(|c| rows[c].iter().map(|r| r.kg).collect())
            .collect();
        assert_eq!(chunks, vec![vec![0, 1], vec![2], vec![3], vec![4, 5]]);
        assert!(chunk_rows(&[], 6).is_empty());
    }

    #[test]
    fn a_subtask_restoring_its_own_file_reads_it_in_two_requests() {
        // Latency matters on object stores: the tail (index and footer) in
        // one request, the header and the sections in another.
        let enc = encode_snapshot(&fixed()).unwrap();
        let storage = Counting::default();
        block_on(storage.write_file("chk-1/t.kst", enc.bytes.clone())).unwrap();
        let n = block_on(read_key_groups(
            &storage,
            &handle(&enc),
            enc.key_groups,
            &mut |_, _, _, _| Ok(()),
        ))
        .unwrap();
        assert_eq!(n, enc.entries);
        assert_eq!(storage.requests.load(Ordering::Relaxed), 2);
        assert_eq!(
            storage.read.load(Ordering::Relaxed),
            enc.bytes.len() as u64,
            "each byte once"
        );
        // A file whose metadata names another key group range is corrupt.
        let mut wrong = handle(&enc);
        wrong.key_groups = KeyGroupRange::new(5, 11).unwrap();
        let r = block_on(read_key_groups(
            &storage,
            &wrong,
            wrong.key_groups,
            &mut |_, _, _, _| Ok(()),
        ));
        assert!(matches!(r, Err(Error::Corrupt { .. })), "{r:?}");
    }

    #[test]
    fn every_flipped_byte_and_every_truncation_is_detected_as_corrupt() {
        let enc = encode_snapshot(&fixed()).unwrap();
        let all = enc.key_groups;
        for at in 0..enc.bytes.len() {
            let mut bad = enc.bytes.to_vec();
            bad[at] ^= 0x01;
            assert!(
                verify_snapshot_file("t", &bad, enc.crc32).is_err(),
                "flip at {at} passed the file checksum"
            );
            match decode_all(&bad, all) {
                Err(Error::Corrupt { .. }) | Err(Error::Incompatible { .. }) => {}
                other => panic!("flip at {at}: expected Corrupt, got {other:?}"),
            }
        }
        for len in 0..enc.bytes.len() {
            assert!(
                matches!(decode_all(&enc.bytes[..len], all), Err(Error::Corrupt { .. })),
                "truncation to {len} bytes not detected"
            );
        }
    }

    #[test]
    fn range_reads_detect_damage_in_what_they_read() {
        let enc = encode_snapshot(&fixed()).unwrap();
        let file = handle(&enc);
        let storage = Counting::default();
        for at in (0..enc.bytes.len()).step_by(7) {
            let mut bad = enc.bytes.to_vec();
            bad[at] ^= 0x80;
            block_on(storage.write_file("chk-1/t.kst", Bytes::from(bad))).unwrap();
            let r = block_on(read_key_groups(
                &storage,
                &file,
                enc.key_groups,
                &mut |_, _, _, _| Ok(()),
            ));
            assert!(
                matches!(r, Err(Error::Corrupt { .. }) | Err(Error::Incompatible { .. })),
                "flip at {at}: {r:?}"
            );
        }
    }

    #[test]
    fn a_newer_format_version_is_incompatible_not_corrupt() {
        let enc = encode_snapshot(&fixed()).unwrap();
        let mut bytes = enc.bytes.to_vec();
        bytes[4] = 9;
        let hlen = u32_at(&bytes, bytes.len() - 24) as usize;
        let crc = crc32fast::hash(&bytes[..hlen - 4]);
        bytes[hlen - 4..hlen].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            decode_all(&bytes, enc.key_groups),
            Err(Error::Incompatible { .. })
        ));
    }

    /// Changes of key groups 5..=7: upserts and a deletion per key group.
    struct Changed(BTreeMap<(u32, StateId, Vec<u8>), Option<Vec<u8>>>);

    impl crate::ChangeSnapshot for Changed {
        fn key_groups(&self) -> KeyGroupRange {
            KeyGroupRange::new(5, 7).unwrap()
        }
        fn state_names(&self) -> Vec<String> {
            vec!["a".into()]
        }
        fn visit_key_group(&self, kg: u32, visit: &mut crate::state::ChangeSetVisitor<'_>) -> Result<()> {
            for ((g, s, k), v) in &self.0 {
                if *g == kg {
                    visit(*s, k, v.as_deref())?;
                }
            }
            Ok(())
        }
    }

    #[test]
    fn a_changes_file_round_trips_upserts_and_deletions_and_is_refused_as_a_full_snapshot() {
        let mut m = BTreeMap::new();
        for kg in 5..=7u32 {
            m.insert((kg, 0, vec![kg as u8, 1]), Some(vec![1, 2, 3]));
            m.insert((kg, 0, vec![kg as u8, 2]), None);
        }
        let changes = Changed(m.clone());
        let enc = encode_changes(&changes).unwrap();
        assert_eq!(enc.entries, 6);
        let mut got = BTreeMap::new();
        decode_changes(
            "c",
            &enc.bytes,
            KeyGroupRange::new(5, 7).unwrap(),
            &mut |_, kg, k, v| {
                got.insert((kg, 0, k.to_vec()), v.map(<[u8]>::to_vec));
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(got, m);
        let storage = Counting::default();
        block_on(storage.write_file("chk-2/c.kst", enc.bytes.clone())).unwrap();
        let mut n = 0;
        block_on(read_changes(
            &storage,
            &handle(&enc),
            KeyGroupRange::new(6, 6).unwrap(),
            &mut |_, kg, _, _| {
                assert_eq!(kg, 6);
                n += 1;
                Ok(())
            },
        ))
        .unwrap();
        assert_eq!(n, 2, "a range read of a changes file");
        let e = block_on(read_key_groups(
            &storage,
            &handle(&enc),
            KeyGroupRange::new(5, 7).unwrap(),
            &mut |_, _, _, _| Ok(()),
        ))
        .unwrap_err();
        assert!(e.is_corrupt() && e.to_string().contains("deletions"), "{e}");
        // A full file reads the same through read_changes.
        let full = encode_snapshot(&fixed()).unwrap();
        let mut ups = 0;
        decode_changes(
            "f",
            &full.bytes,
            KeyGroupRange::new(5, 12).unwrap(),
            &mut |_, _, _, v| {
                assert!(v.is_some());
                ups += 1;
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(ups as u64, full.entries);
        // Every flipped byte of a changes file is detected.
        for at in 0..enc.bytes.len() {
            let mut bad = enc.bytes.to_vec();
            bad[at] ^= 0x20;
            assert!(
                verify_snapshot_file("c", &bad, enc.crc32).is_err(),
                "flip at {at} not caught by the file checksum"
            );
        }
    }
}
