//! Reading the format: footer, header, index and the sections of a key-group
//! range, verified by their CRCs, from bytes or by ranged reads of a storage.

use super::*;

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

pub(super) fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

pub(super) fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Footer fields.
pub(super) struct Footer {
    header_len: u64,
    index_offset: u64,
    index_len: u64,
}

pub(super) fn parse_footer(path: &str, b: &[u8], size: u64) -> Result<Footer> {
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
pub(super) struct Header {
    version: u16,
    range: KeyGroupRange,
    names: Vec<String>,
}

pub(super) fn parse_header(path: &str, b: &[u8]) -> Result<Header> {
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
pub(super) struct Row {
    pub(super) kg: u32,
    pub(super) offset: u64,
    pub(super) len: u64,
    pub(super) entries: u64,
    pub(super) crc: u32,
}

pub(super) fn parse_index(path: &str, b: &[u8], range: KeyGroupRange, footer: &Footer) -> Result<Vec<Row>> {
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

pub(super) fn decode_section(
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
pub(super) fn full_only<'a, 'v: 'a>(
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
pub(super) const READ_CHUNK: u64 = 8 << 20;

/// Range reads of one state file in flight at a time.
pub(super) const READS_IN_FLIGHT: usize = 4;

/// Consecutive rows grouped into chunks of about `max` bytes (ranges of
/// row indices).
pub(super) fn chunk_rows(rows: &[Row], max: u64) -> Vec<std::ops::Range<usize>> {
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
pub(super) fn section<'b>(path: &str, row: &Row, bytes: &'b [u8], start: u64) -> Result<&'b [u8]> {
    let from = (row.offset - start) as usize;
    bytes.get(from..from + row.len as usize).ok_or_else(|| {
        Error::corrupt(
            path,
            format!("section of key group {} is past the bytes read", row.kg),
        )
    })
}
