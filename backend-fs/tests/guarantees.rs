//! What the directory storage adds to the conformance suite: temporary
//! files stay invisible, paths stay inside the root, read-only opens create
//! and change nothing, and the layout is plain files that can be copied.

use sluice_backend_fs::{FsCheckpointStorage, STALE_TEMP_AGE, TEMP_PREFIX};
use sluice_core::{Bytes, CheckpointId, CheckpointStorage, CheckpointStorageExt, Error};
use std::path::Path;
use std::time::SystemTime;

fn names_under(dir: &Path) -> Vec<String> {
    let mut names = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().map(Result::unwrap) {
        if e.file_type().unwrap().is_dir() {
            names.extend(names_under(&e.path()));
        }
        names.push(e.file_name().to_string_lossy().into_owned());
    }
    names
}

fn temp_file(dir: &Path, name: &str, bytes: &[u8], age: std::time::Duration) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join(format!("{TEMP_PREFIX}{name}"));
    let f = std::fs::File::create(&path).unwrap();
    std::io::Write::write_all(&mut &f, bytes).unwrap();
    f.set_modified(SystemTime::now() - age).unwrap();
    path
}

#[tokio::test]
async fn files_are_plain_files_under_the_root_and_no_temporary_file_is_left_behind() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("chk");
    let storage = FsCheckpointStorage::open(&root).unwrap();
    storage
        .write_file("chk-7/running-sum-0.kst", Bytes::from_static(b"state"))
        .await
        .unwrap();
    storage
        .commit_file(
            "savepoints/savepoint-9-1a2b3c/_metadata",
            Bytes::from_static(b"{}"),
        )
        .await
        .unwrap();
    assert!(matches!(
        storage
            .write_file("chk-7/running-sum-0.kst", Bytes::from_static(b"other"))
            .await,
        Err(Error::AlreadyExists { .. })
    ));
    assert_eq!(
        std::fs::read(root.join("chk-7/running-sum-0.kst")).unwrap(),
        b"state"
    );
    assert_eq!(
        std::fs::read(root.join("savepoints/savepoint-9-1a2b3c/_metadata")).unwrap(),
        b"{}"
    );
    let temps: Vec<_> = names_under(&root)
        .into_iter()
        .filter(|n| n.starts_with(TEMP_PREFIX))
        .collect();
    assert!(temps.is_empty(), "temporary files left: {temps:?}");
    assert_eq!(storage.describe(), format!("file:{}", root.display()));
    assert_eq!(
        storage.locate("savepoints/savepoint-9-1a2b3c"),
        format!("file:{}/savepoints/savepoint-9-1a2b3c", root.display())
    );
}

#[tokio::test]
async fn temporary_files_are_never_listed_read_or_accepted_as_paths() {
    let dir = tempfile::tempdir().unwrap();
    let storage = FsCheckpointStorage::open(dir.path()).unwrap();
    storage
        .write_file("chk-5/op-0.kst", Bytes::from_static(b"whole"))
        .await
        .unwrap();
    // What a writer killed half way leaves: a partial temporary file, in a
    // checkpoint directory and alone in a directory of its own.
    let age = std::time::Duration::ZERO;
    temp_file(&dir.path().join("chk-5"), "1-0-0", b"par", age);
    temp_file(&dir.path().join("chk-6"), "1-0-1", b"tial", age);
    let files = storage.list_files("").await.unwrap();
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(files[0].path, "chk-5/op-0.kst");
    let listing = storage.list().await.unwrap();
    assert_eq!(
        listing.len(),
        1,
        "a temporary file alone is no checkpoint: {listing:?}"
    );
    for path in [
        format!("chk-5/{TEMP_PREFIX}1-0-0"),
        format!("{TEMP_PREFIX}x/op-0.kst"),
    ] {
        assert!(
            matches!(storage.read_file(&path).await, Err(Error::InvalidArgument { .. })),
            "{path}"
        );
        assert!(
            matches!(
                storage.write_file(&path, Bytes::new()).await,
                Err(Error::InvalidArgument { .. })
            ),
            "{path}"
        );
    }
    // Deleting the directory removes its temporary files too.
    storage.discard(CheckpointId(5)).await.unwrap();
    assert!(!dir.path().join("chk-5").exists());
}

#[tokio::test]
async fn open_removes_stale_temporary_files_and_keeps_fresh_ones() {
    let dir = tempfile::tempdir().unwrap();
    let stale = temp_file(&dir.path().join("chk-1"), "1-0-0", b"old", STALE_TEMP_AGE * 2);
    let fresh = temp_file(
        &dir.path().join("chk-1"),
        "1-0-1",
        b"new",
        std::time::Duration::ZERO,
    );
    drop(FsCheckpointStorage::open_existing(dir.path()).unwrap());
    assert!(stale.exists(), "a read-only open removes nothing");
    drop(FsCheckpointStorage::open(dir.path()).unwrap());
    assert!(!stale.exists(), "a stale temporary file is removed at open");
    assert!(fresh.exists(), "a fresh one may belong to a live writer");
}

#[tokio::test]
async fn paths_cannot_leave_the_root_even_through_a_symbolic_link() {
    let dir = tempfile::tempdir().unwrap();
    let (root, outside) = (dir.path().join("root"), dir.path().join("outside"));
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret"), b"secret").unwrap();
    let storage = FsCheckpointStorage::open(&root).unwrap();
    for path in [
        "../outside/secret",
        "/etc/passwd",
        "a/../../outside/secret",
        "a//b",
        "./a",
    ] {
        assert!(storage.read_file(path).await.is_err(), "read {path}");
        assert!(
            storage.write_file(path, Bytes::new()).await.is_err(),
            "write {path}"
        );
        assert!(storage.delete_dir(path).await.is_err(), "delete {path}");
        assert!(storage.list_files(path).await.is_err(), "list {path}");
    }
    std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
    let refused = |r: Result<(), Error>| matches!(r, Err(Error::InvalidArgument { .. }));
    assert!(matches!(
        storage.read_file("link/secret").await,
        Err(Error::InvalidArgument { .. })
    ));
    assert!(refused(storage.write_file("link/new", Bytes::new()).await));
    assert!(refused(storage.write_file("link/deeper/new", Bytes::new()).await));
    assert!(refused(storage.delete_dir("link").await));
    assert!(matches!(
        storage.list_files("link").await,
        Err(Error::InvalidArgument { .. })
    ));
    assert!(
        storage.list_files("").await.unwrap().is_empty(),
        "links are not followed"
    );
    assert_eq!(
        names_under(&outside),
        vec!["secret".to_string()],
        "nothing was written or deleted outside the root"
    );
}

#[tokio::test]
async fn a_read_only_open_creates_nothing_and_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("typo");
    let e = FsCheckpointStorage::open_existing(&missing).unwrap_err();
    assert!(
        e.is_not_found() && e.to_string().contains(&missing.display().to_string()),
        "{e}"
    );
    assert!(
        !missing.exists(),
        "a read-only open created {}",
        missing.display()
    );

    let root = dir.path().join("chk");
    let writer = FsCheckpointStorage::open(&root).unwrap();
    writer
        .write_file("chk-1/a.kst", Bytes::from_static(b"a"))
        .await
        .unwrap();
    writer
        .commit_metadata(CheckpointId(1), Bytes::from_static(b"{}"))
        .await
        .unwrap();
    let reader = FsCheckpointStorage::open_existing(&root).unwrap();
    assert!(reader.is_read_only());
    assert_eq!(
        reader.read_metadata(CheckpointId(1)).await.unwrap(),
        Bytes::from_static(b"{}")
    );
    for r in [
        reader.write_file("chk-2/a.kst", Bytes::new()).await,
        reader.commit_file("chk-2/_metadata", Bytes::new()).await,
        reader.delete_dir("chk-1").await,
    ] {
        let e = r.unwrap_err();
        assert!(e.to_string().contains("read-only"), "{e}");
    }
    assert_eq!(reader.list_files("").await.unwrap().len(), 2, "nothing changed");
    assert!(!root.join("chk-2").exists());

    let file = dir.path().join("notes.txt");
    std::fs::write(&file, b"notes").unwrap();
    for r in [
        FsCheckpointStorage::open(&file),
        FsCheckpointStorage::open_existing(&file),
    ] {
        assert!(matches!(r, Err(Error::Incompatible { .. })), "{r:?}");
    }
    assert_eq!(std::fs::read(&file).unwrap(), b"notes");
}

#[tokio::test]
async fn a_directory_copied_with_plain_file_tools_reads_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let storage = FsCheckpointStorage::open(&a).unwrap();
    let state = Bytes::from((0..100_000u32).map(|i| i as u8).collect::<Vec<_>>());
    storage.write_file("sp/x/op-0.kst", state.clone()).await.unwrap();
    storage
        .commit_file("sp/x/_metadata", Bytes::from_static(b"{}"))
        .await
        .unwrap();
    let status = std::process::Command::new("cp")
        .arg("-r")
        .arg(&a)
        .arg(&b)
        .status()
        .unwrap();
    assert!(status.success());
    let copy = FsCheckpointStorage::open_existing(&b).unwrap();
    assert_eq!(
        copy.list_files("sp").await.unwrap(),
        storage.list_files("sp").await.unwrap()
    );
    assert_eq!(
        copy.read_range("sp/x/op-0.kst", 70_000..70_010).await.unwrap(),
        state.slice(70_000..70_010)
    );
}
