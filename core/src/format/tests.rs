use super::*;
use crate::StateId;
use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

fn fixed() -> crate::MapSnapshot {
    let mut snap = crate::MapSnapshot::new(KeyGroupRange::new(5, 12).unwrap(), vec!["a".into(), "b".into()]);
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
    let err = encode_snapshot_in_parts(&snap, 1, &mut |_| Err(Error::not_found("the upload"))).unwrap_err();
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
