//! The checkpoint-storage part of the conformance suite.

use super::MAX_PARALLELISM;
use crate::format::{encode_snapshot, read_key_groups, verify_snapshot_file};
use crate::metadata::StateFileHandle;
use crate::{
    key_group_for_key, CheckpointId, CheckpointStorage, CheckpointStorageExt, Error, FileListing,
    KeyGroupRange, MapSnapshot,
};
use bytes::Bytes;
use std::collections::BTreeMap;

/// A snapshot file of every key group (from a [`MapSnapshot`]) written to
/// the storage and read back by key-group range with range reads, as
/// subtasks of parallelism 1, 3 and 4 restore it: each range gets exactly
/// its entries, and together they get all of them.
pub async fn storage_restore_by_key_group_range(storage: &dyn CheckpointStorage) {
    let id = CheckpointId(1070);
    let mut snapshot = MapSnapshot::new(
        KeyGroupRange::all(MAX_PARALLELISM),
        vec!["sum".into(), "names".into()],
    );
    let mut expected: BTreeMap<(String, u32, Vec<u8>), Vec<u8>> = BTreeMap::new();
    for i in 0..2000u64 {
        let key = i.to_be_bytes();
        let kg = key_group_for_key(&key, MAX_PARALLELISM);
        snapshot.insert(kg, 0, key.to_vec(), (i * 3).to_le_bytes().to_vec());
        expected.insert(("sum".into(), kg, key.to_vec()), (i * 3).to_le_bytes().to_vec());
        if i % 5 == 0 {
            snapshot.insert(kg, 1, key.to_vec(), format!("n{i}").into_bytes());
            expected.insert(("names".into(), kg, key.to_vec()), format!("n{i}").into_bytes());
        }
    }
    let enc = encode_snapshot(&snapshot).unwrap();
    let path = format!("{}/suite-0.kst", id.dir());
    storage
        .write_file(&path, enc.bytes.clone())
        .await
        .expect("write state file");
    let file = enc.handle(path.clone());
    for parallelism in [1u32, 3, 4] {
        let mut restored: BTreeMap<(String, u32, Vec<u8>), Vec<u8>> = BTreeMap::new();
        for subtask in 0..parallelism {
            let range = KeyGroupRange::for_subtask(MAX_PARALLELISM, parallelism, subtask);
            read_key_groups(storage, &file, range, &mut |name, kg, k, v| {
                assert!(
                    range.contains(kg),
                    "restore visited key group {kg} outside {range}"
                );
                let fresh = restored
                    .insert((name.to_string(), kg, k.to_vec()), v.to_vec())
                    .is_none();
                assert!(fresh, "an entry was visited twice");
                Ok(())
            })
            .await
            .expect("read_key_groups");
        }
        assert_eq!(
            restored, expected,
            "parallelism {parallelism}: restored entries differ"
        );
    }
    storage.discard(id).await.unwrap();
}

async fn listing(storage: &dyn CheckpointStorage, ids: std::ops::Range<u64>) -> Vec<(u64, bool)> {
    storage
        .list()
        .await
        .expect("list")
        .into_iter()
        .filter(|c| ids.contains(&c.id.0))
        .map(|c| (c.id.0, c.committed))
        .collect()
}

/// Writes, whole reads, range reads; no overwrite; missing files.
pub async fn storage_write_read_range(storage: &dyn CheckpointStorage) {
    let id = CheckpointId(1001);
    let path = format!("{}/op-0.kst", id.dir());
    let data = Bytes::from((0..1000u32).map(|i| i as u8).collect::<Vec<u8>>());
    storage.write_file(&path, data.clone()).await.expect("write_file");
    assert_eq!(storage.read_file(&path).await.expect("read_file"), data);
    assert_eq!(
        storage.read_range(&path, 10..20).await.unwrap(),
        data.slice(10..20)
    );
    assert_eq!(
        storage.read_range(&path, 990..1000).await.unwrap(),
        data.slice(990..1000)
    );
    assert!(
        storage.read_range(&path, 5..5).await.unwrap().is_empty(),
        "empty range"
    );
    assert!(
        storage.read_range(&path, 990..1001).await.is_err(),
        "a range past the end is an error"
    );
    match storage.write_file(&path, Bytes::from_static(b"other")).await {
        Err(Error::AlreadyExists { .. }) => {}
        other => panic!("writing an existing file must be AlreadyExists, got {other:?}"),
    }
    assert_eq!(
        storage.read_file(&path).await.unwrap(),
        data,
        "a refused write must not change the file"
    );
    match storage.read_file(&format!("{}/missing", id.dir())).await {
        Err(Error::NotFound { .. }) => {}
        other => panic!("reading a missing file must be NotFound, got {other:?}"),
    }
    assert!(
        storage.write_file("../escape", Bytes::new()).await.is_err(),
        "paths must stay inside the storage"
    );
    storage.discard(id).await.unwrap();
}

/// A checkpoint exists if and only if its metadata is committed; a second
/// commit is refused and does not overwrite the first.
pub async fn storage_atomic_commit(storage: &dyn CheckpointStorage) {
    let id = CheckpointId(1002);
    storage
        .write_file(&format!("{}/a-0.kst", id.dir()), Bytes::from_static(b"state"))
        .await
        .unwrap();
    assert_eq!(
        listing(storage, 1002..1003).await,
        vec![(1002, false)],
        "files alone are an uncommitted checkpoint"
    );
    assert!(
        matches!(storage.read_metadata(id).await, Err(Error::NotFound { .. })),
        "no metadata before the commit"
    );
    assert_eq!(
        crate::storage::latest_completed(storage)
            .await
            .unwrap()
            .filter(|c| c.0 == 1002),
        None
    );
    storage
        .commit_metadata(id, Bytes::from_static(b"{\"first\":1}"))
        .await
        .expect("commit");
    assert_eq!(listing(storage, 1002..1003).await, vec![(1002, true)]);
    match storage
        .commit_metadata(id, Bytes::from_static(b"{\"second\":2}"))
        .await
    {
        Err(Error::AlreadyExists { .. }) => {}
        other => panic!("a second commit must be AlreadyExists, got {other:?}"),
    }
    assert_eq!(
        storage.read_metadata(id).await.unwrap(),
        Bytes::from_static(b"{\"first\":1}")
    );
    storage.discard(id).await.unwrap();
}

/// Listing is ascending and reports committed flags.
pub async fn storage_list(storage: &dyn CheckpointStorage) {
    for id in [1013u64, 1010, 1012] {
        let id = CheckpointId(id);
        storage
            .write_file(&format!("{}/x-0.kst", id.dir()), Bytes::from_static(b"x"))
            .await
            .unwrap();
        if id.0 != 1012 {
            storage
                .commit_metadata(id, Bytes::from_static(b"{}"))
                .await
                .unwrap();
        }
    }
    storage
        .commit_metadata(CheckpointId(1011), Bytes::from_static(b"{}"))
        .await
        .unwrap();
    assert_eq!(
        listing(storage, 1010..1014).await,
        vec![(1010, true), (1011, true), (1012, false), (1013, true)]
    );
    for id in 1010..1014 {
        storage.discard(CheckpointId(id)).await.unwrap();
    }
    assert!(listing(storage, 1010..1014).await.is_empty());
}

/// Discard removes metadata and files of one checkpoint only; absent ids
/// are fine; uncommitted attempts are removed too.
pub async fn storage_discard(storage: &dyn CheckpointStorage) {
    let (a, b, c) = (CheckpointId(1020), CheckpointId(1021), CheckpointId(1022));
    for id in [a, b, c] {
        for f in 0..3 {
            storage
                .write_file(&format!("{}/op-{f}.kst", id.dir()), Bytes::from_static(b"data"))
                .await
                .unwrap();
        }
    }
    storage
        .commit_metadata(a, Bytes::from_static(b"{}"))
        .await
        .unwrap();
    storage
        .commit_metadata(b, Bytes::from_static(b"{}"))
        .await
        .unwrap();
    storage.discard(a).await.expect("discard");
    storage
        .discard(c)
        .await
        .expect("discard of an uncommitted attempt");
    storage
        .discard(CheckpointId(1029))
        .await
        .expect("discarding an absent checkpoint is fine");
    assert_eq!(listing(storage, 1020..1030).await, vec![(1021, true)]);
    assert!(
        storage.read_file(&format!("{}/op-0.kst", a.dir())).await.is_err(),
        "files of a discarded checkpoint are gone"
    );
    assert!(storage.read_metadata(a).await.is_err());
    assert_eq!(
        storage.read_file(&format!("{}/op-2.kst", b.dir())).await.unwrap(),
        Bytes::from_static(b"data")
    );
    // One file at a time: the metadata, then a state file; a missing file
    // is fine; a path outside the storage is refused.
    storage
        .delete_file(&format!("{}/_metadata", b.dir()))
        .await
        .expect("delete_file of the metadata");
    assert_eq!(
        listing(storage, 1020..1030).await,
        vec![(1021, false)],
        "no metadata: not committed"
    );
    storage
        .delete_file(&format!("{}/op-1.kst", b.dir()))
        .await
        .expect("delete_file");
    storage
        .delete_file(&format!("{}/op-1.kst", b.dir()))
        .await
        .expect("deleting a missing file is fine");
    let left: Vec<String> = storage
        .list_files(&b.dir())
        .await
        .unwrap()
        .into_iter()
        .map(|f| f.path)
        .collect();
    assert_eq!(
        left,
        vec![format!("{}/op-0.kst", b.dir()), format!("{}/op-2.kst", b.dir())]
    );
    assert!(
        storage.delete_file("../x").await.is_err(),
        "paths must stay inside the storage"
    );
    storage.discard(b).await.unwrap();
}

/// A flipped byte or a truncation in a stored state file is reported as
/// [`Error::Corrupt`] by the restore path, never as data.
pub async fn storage_corrupt_file_detected(storage: &dyn CheckpointStorage) {
    let id = CheckpointId(1030);
    let range = KeyGroupRange::new(0, 3).unwrap();
    let mut snapshot = MapSnapshot::new(range, vec!["s".into()]);
    for i in 0..200u32 {
        snapshot.insert(i % 4, 0, i.to_le_bytes().to_vec(), vec![7u8; 40]);
    }
    let enc = encode_snapshot(&snapshot).unwrap();
    let len = enc.bytes.len();
    let cases: Vec<(String, Vec<u8>)> = vec![
        ("flip in a section".into(), flip(&enc.bytes, len / 2)),
        ("flip in the header".into(), flip(&enc.bytes, 6)),
        ("flip in the index".into(), flip(&enc.bytes, len - 40)),
        ("flip in the footer".into(), flip(&enc.bytes, len - 3)),
        ("truncated".into(), enc.bytes[..len - 10].to_vec()),
    ];
    for (i, (what, bytes)) in cases.into_iter().enumerate() {
        let path = format!("{}/bad-{i}.kst", id.dir());
        storage
            .write_file(&path, Bytes::from(bytes.clone()))
            .await
            .unwrap();
        let file = StateFileHandle {
            path: path.clone(),
            size: bytes.len() as u64,
            crc32: enc.crc32,
            key_groups: range,
            entries: enc.entries,
        };
        let r = read_key_groups(storage, &file, range, &mut |_, _, _, _| Ok(())).await;
        assert!(
            matches!(r, Err(Error::Corrupt { .. })),
            "{what}: expected Corrupt, got {r:?}"
        );
        let whole = storage.read_file(&path).await.unwrap();
        assert!(
            matches!(
                verify_snapshot_file(&path, &whole, enc.crc32),
                Err(Error::Corrupt { .. })
            ),
            "{what}: the whole-file checksum must catch it"
        );
    }
    storage.discard(id).await.unwrap();
}

fn flip(bytes: &[u8], at: usize) -> Vec<u8> {
    let mut v = bytes.to_vec();
    v[at] ^= 0x40;
    v
}

/// An 8 MiB file round trips; range reads across it return the right bytes.
pub async fn storage_large_file(storage: &dyn CheckpointStorage) {
    let id = CheckpointId(1040);
    let path = format!("{}/large-0.kst", id.dir());
    let data: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let data = Bytes::from(data);
    storage.write_file(&path, data.clone()).await.unwrap();
    assert_eq!(storage.read_file(&path).await.unwrap(), data);
    for (a, b) in [
        (0u64, 1u64),
        (1 << 20, (5 << 20) + 17),
        ((8 << 20) - 100, 8 << 20),
    ] {
        assert_eq!(
            storage.read_range(&path, a..b).await.unwrap(),
            data.slice(a as usize..b as usize)
        );
    }
    storage.discard(id).await.unwrap();
}

/// A file written in parts ([`CheckpointStorage::upload`]) reads back as
/// their concatenation, with range reads across part boundaries; nothing
/// is visible before `complete`; an upload dropped unfinished leaves no
/// file; completing over an existing file is
/// [`Error::AlreadyExists`] and leaves it as it was.
pub async fn storage_upload_in_parts(storage: &dyn CheckpointStorage) {
    let id = CheckpointId(1050);
    let path = format!("{}/parts-0.kst", id.dir());
    let parts: Vec<Bytes> = (0..5u32)
        .map(|p| {
            let len = (p as usize + 1) * 300_000 + 7;
            Bytes::from(
                (0..len)
                    .map(|i| (i as u32 ^ p.wrapping_mul(2_654_435_761)) as u8)
                    .collect::<Vec<u8>>(),
            )
        })
        .collect();
    let whole: Bytes = Bytes::from(parts.concat());
    let mut up = storage.upload(&path).await.unwrap();
    for p in &parts {
        up.put(p.clone()).await.unwrap();
        assert!(
            matches!(storage.read_file(&path).await, Err(Error::NotFound { .. })),
            "no file before complete"
        );
    }
    up.complete().await.unwrap();
    assert_eq!(storage.read_file(&path).await.unwrap(), whole);
    let (a, b) = (299_000u64, 1_500_100u64);
    assert_eq!(
        storage.read_range(&path, a..b).await.unwrap(),
        whole.slice(a as usize..b as usize)
    );
    let mut again = storage.upload(&path).await.unwrap();
    again.put(Bytes::from_static(b"other")).await.unwrap();
    assert!(
        matches!(again.complete().await, Err(Error::AlreadyExists { .. })),
        "create-if-absent"
    );
    assert_eq!(storage.read_file(&path).await.unwrap(), whole, "untouched");
    let dropped = format!("{}/dropped-0.kst", id.dir());
    let mut up = storage.upload(&dropped).await.unwrap();
    up.put(parts[0].clone()).await.unwrap();
    drop(up);
    let files: Vec<String> = storage
        .list_files(&id.dir())
        .await
        .unwrap()
        .into_iter()
        .map(|f| f.path)
        .collect();
    assert_eq!(files, vec![path.clone()], "only the completed file");
    storage.discard(id).await.unwrap();
}

/// Savepoint directories: files at any depth outside `chk-<id>/`, listing
/// by directory (a sibling with a longer name is not inside), a durable
/// create-if-absent `commit_file`, `delete_dir` of one directory only, and
/// checkpoint listing that ignores savepoint directories.
pub async fn storage_directories(storage: &dyn CheckpointStorage) {
    let dir = "savepoints/savepoint-1050-abc";
    let sibling = "savepoints/savepoint-1050-abcd";
    storage
        .write_file(&format!("{dir}/op-0.kst"), Bytes::from_static(b"zero"))
        .await
        .expect("write a file in a savepoint directory");
    storage
        .write_file(&format!("{dir}/nested/op-1.kst"), Bytes::from_static(b"one!!"))
        .await
        .expect("write a nested file");
    storage
        .write_file(&format!("{sibling}/op-0.kst"), Bytes::from_static(b"sib"))
        .await
        .unwrap();
    assert!(
        storage.list_files("").await.unwrap().len() >= 3,
        "the root lists every file"
    );
    storage
        .commit_file(&format!("{dir}/_metadata"), Bytes::from_static(b"{\"m\":1}"))
        .await
        .expect("commit_file");
    match storage
        .commit_file(&format!("{dir}/_metadata"), Bytes::from_static(b"{\"m\":2}"))
        .await
    {
        Err(Error::AlreadyExists { .. }) => {}
        other => panic!("a second commit_file must be AlreadyExists, got {other:?}"),
    }
    assert_eq!(
        storage.read_file(&format!("{dir}/_metadata")).await.unwrap(),
        Bytes::from_static(b"{\"m\":1}"),
        "a refused commit_file must not change the file"
    );
    let listed = storage.list_files(dir).await.expect("list_files");
    assert_eq!(
        listed,
        vec![
            FileListing {
                path: format!("{dir}/_metadata"),
                size: 7
            },
            FileListing {
                path: format!("{dir}/nested/op-1.kst"),
                size: 5
            },
            FileListing {
                path: format!("{dir}/op-0.kst"),
                size: 4
            },
        ],
        "list_files lists the directory's files at every depth, sorted, and nothing of a sibling"
    );
    assert!(
        storage.list().await.unwrap().iter().all(|c| c.id.0 != 1050),
        "savepoint directories are not checkpoints"
    );
    storage.delete_dir(dir).await.expect("delete_dir");
    assert!(
        storage.list_files(dir).await.unwrap().is_empty(),
        "the directory is gone"
    );
    assert!(matches!(
        storage.read_file(&format!("{dir}/op-0.kst")).await,
        Err(Error::NotFound { .. })
    ));
    assert_eq!(
        storage.read_file(&format!("{sibling}/op-0.kst")).await.unwrap(),
        Bytes::from_static(b"sib"),
        "delete_dir leaves other directories alone"
    );
    storage
        .delete_dir(dir)
        .await
        .expect("deleting a missing directory is fine");
    assert!(
        matches!(storage.delete_dir("").await, Err(Error::InvalidArgument { .. })),
        "an empty directory (the whole storage) is refused"
    );
    assert!(
        storage.delete_dir("../x").await.is_err(),
        "paths must stay inside the storage"
    );
    storage.delete_dir(sibling).await.unwrap();
    assert!(storage.list_files("savepoints").await.unwrap().is_empty());
}

/// Two commits of one path at the same time: exactly one wins, the other
/// gets [`Error::AlreadyExists`], and the file holds the winner's bytes.
/// Twenty rounds, each on a new path. Run only when the storage declares
/// [`crate::Capabilities::atomic_create`]; a storage that checks before it
/// writes is correct with one writer per directory, which is what the job
/// master is, and says so.
pub async fn storage_concurrent_commits_one_wins(storage: &dyn CheckpointStorage) {
    if !storage.capabilities().atomic_create {
        return;
    }
    for round in 0..20 {
        let path = format!("races/r{round}/_metadata");
        let (a, b) = futures::join!(
            storage.commit_file(&path, Bytes::from_static(b"first writer")),
            storage.commit_file(&path, Bytes::from_static(b"second writer")),
        );
        let winner = match (&a, &b) {
            (Ok(()), Err(Error::AlreadyExists { .. })) => Bytes::from_static(b"first writer"),
            (Err(Error::AlreadyExists { .. }), Ok(())) => Bytes::from_static(b"second writer"),
            other => panic!("round {round}: exactly one concurrent commit must win, got {other:?}"),
        };
        assert_eq!(
            storage.read_file(&path).await.unwrap(),
            winner,
            "round {round}: the file holds the winner's bytes"
        );
    }
    storage.delete_dir("races").await.unwrap();
    assert!(storage.list_files("races").await.unwrap().is_empty());
}

/// What was committed survives a reopen: `open` opens the same storage
/// again each time it is called (the same file, directory or bucket). A
/// checkpoint's files and metadata written through one instance are read
/// back, listed and discarded through the next. For durable storages
/// ([`crate::Capabilities::durable`]).
pub async fn storage_survives_reopen<F, Fut>(open: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = std::sync::Arc<dyn CheckpointStorage>>,
{
    let id = CheckpointId(1060);
    let state = Bytes::from_static(b"state of checkpoint 1060");
    {
        let storage = open().await;
        assert!(storage.capabilities().durable, "reopen is for durable storages");
        storage
            .write_file(&format!("{}/op-0.kst", id.dir()), state.clone())
            .await
            .unwrap();
        storage
            .commit_metadata(id, Bytes::from_static(b"{\"reopen\":1}"))
            .await
            .unwrap();
        storage
            .write_file(&format!("{}/op-0.kst", CheckpointId(1061).dir()), state.clone())
            .await
            .unwrap();
    }
    let storage = open().await;
    assert_eq!(
        storage
            .read_metadata(id)
            .await
            .expect("committed metadata after a reopen"),
        Bytes::from_static(b"{\"reopen\":1}")
    );
    assert_eq!(
        storage
            .read_file(&format!("{}/op-0.kst", id.dir()))
            .await
            .unwrap(),
        state,
        "files written before the commit survive with it"
    );
    assert_eq!(
        listing(storage.as_ref(), 1060..1062).await,
        vec![(1060, true), (1061, false)]
    );
    storage.discard(id).await.unwrap();
    storage.discard(CheckpointId(1061)).await.unwrap();
    drop(storage);
    assert!(listing(open().await.as_ref(), 1060..1062).await.is_empty());
}

/// Runs every checkpoint-storage test of one storage instance (see also
/// [`storage_survives_reopen`]).
pub async fn run_checkpoint_storage_suite(storage: &dyn CheckpointStorage) {
    storage_write_read_range(storage).await;
    storage_atomic_commit(storage).await;
    storage_list(storage).await;
    storage_discard(storage).await;
    storage_corrupt_file_detected(storage).await;
    storage_large_file(storage).await;
    storage_upload_in_parts(storage).await;
    storage_directories(storage).await;
    storage_restore_by_key_group_range(storage).await;
    storage_concurrent_commits_one_wins(storage).await;
}
