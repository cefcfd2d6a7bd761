//! A writer killed with SIGKILL at random moments: every checkpoint it
//! reported committed is there, intact, and no partially written file is
//! ever visible.
//!
//! The child (this test binary again, with `SLUICE_FS_KILL_ROOT` set) does
//! what a job master does: at start it discards uncommitted left-overs and
//! continues after the highest id; then it writes three state files per
//! checkpoint in parallel, commits the metadata, prints the id, and
//! discards the checkpoint three back (printing that first). The parent
//! reads every visible file while the child runs (a reader must never see
//! a partial file), kills it `SLUICE_FS_KILLS` times (default 8) after a
//! random delay (seed `SLUICE_FS_KILL_SEED`, printed), and at the end
//! reopens the storage and checks what it holds.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sluice_backend_fs::{FsCheckpointStorage, TEMP_PREFIX};
use sluice_core::{Bytes, CheckpointId, CheckpointStorage, CheckpointStorageExt};
use std::collections::{BTreeSet, HashMap};
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CHILD_ROOT: &str = "SLUICE_FS_KILL_ROOT";
const MARK: &str = "sluice-fs-kill:";

/// The bytes the child writes at `path`: 64 KiB to 8 MiB, derived from
/// the path, so that the parent knows what every file must hold.
fn content(path: &str) -> Vec<u8> {
    let mut x = path.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let words = 8192 * (1 + (x % 128) as usize);
    let mut out = Vec::with_capacity(words * 8);
    for _ in 0..words {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

fn state_files(id: u64) -> Vec<String> {
    (0..3).map(|k| format!("chk-{id}/op-{k}.kst")).collect()
}

fn metadata(id: u64) -> Vec<u8> {
    format!("{{\"id\":{id},\"files\":{:?}}}", state_files(id)).into_bytes()
}

/// What the file at storage path `path` must hold, if it may exist at all.
fn expected(path: &str) -> Option<Vec<u8>> {
    let (dir, file) = path.split_once('/')?;
    let id: u64 = dir.strip_prefix("chk-")?.parse().ok()?;
    match file {
        "_metadata" => Some(metadata(id)),
        _ if state_files(id).iter().any(|p| p == path) => Some(content(path)),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the child process of a_writer_killed_at_random_moments_loses_no_commit_and_shows_no_partial_file"]
async fn kill9_child() {
    let Some(root) = std::env::var_os(CHILD_ROOT) else {
        return;
    };
    let storage = FsCheckpointStorage::open(&root).unwrap();
    let listing = storage.list().await.unwrap();
    for c in listing.iter().filter(|c| !c.committed) {
        storage.discard(c.id).await.unwrap();
    }
    let mut id = listing.iter().map(|c| c.id.0).max().unwrap_or(0) + 1;
    let mut out = std::io::stdout();
    // A parent that died cannot kill us: stop on our own.
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let writers: Vec<_> = state_files(id)
            .into_iter()
            .map(|path| {
                let storage = storage.clone();
                tokio::spawn(async move { storage.write_file(&path, Bytes::from(content(&path))).await })
            })
            .collect();
        for w in writers {
            w.await.unwrap().unwrap();
        }
        storage
            .commit_metadata(CheckpointId(id), Bytes::from(metadata(id)))
            .await
            .unwrap();
        writeln!(out, "\n{MARK} committed {id}").unwrap();
        out.flush().unwrap();
        if id > 3 {
            writeln!(out, "\n{MARK} discarding {}", id - 3).unwrap();
            out.flush().unwrap();
            storage.discard(CheckpointId(id - 3)).await.unwrap();
        }
        id += 1;
    }
}

#[test]
fn a_writer_killed_at_random_moments_loses_no_commit_and_shows_no_partial_file() {
    let seed = std::env::var("SLUICE_FS_KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    let kills: usize = std::env::var("SLUICE_FS_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    println!("seed {seed} (SLUICE_FS_KILL_SEED), {kills} kills");
    let mut rng = StdRng::seed_from_u64(seed);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut cache = HashMap::new();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("checkpoints");
    let (mut committed, mut discarding) = (BTreeSet::new(), BTreeSet::new());
    for round in 0..kills {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "kill9_child", "--nocapture", "--include-ignored"])
            .env(CHILD_ROOT, &root)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stdout.read_to_string(&mut text);
            text
        });
        let kill_at = Instant::now() + Duration::from_millis(rng.random_range(30..600));
        let mut seen = 0;
        while Instant::now() < kill_at {
            seen += rt.block_on(every_visible_file_is_whole(&root, &mut cache));
        }
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap();
        let text = reader.join().unwrap();
        assert!(
            status.code().is_none(),
            "round {round}: the child ended on its own ({status}):\n{text}"
        );
        // Only whole lines: the last one may have been cut by the kill.
        let mut reported = 0;
        for line in text.split_inclusive('\n').filter(|l| l.ends_with('\n')) {
            let Some(rest) = line.trim().strip_prefix(MARK) else {
                continue;
            };
            match rest.split_whitespace().collect::<Vec<_>>()[..] {
                ["committed", id] => {
                    committed.insert(id.parse::<u64>().unwrap());
                    reported += 1;
                }
                ["discarding", id] => {
                    discarding.insert(id.parse::<u64>().unwrap());
                }
                _ => panic!("unexpected line {line:?}"),
            }
        }
        println!(
            "round {round}: {reported} commits reported before the kill; {seen} files read while it ran"
        );
    }
    assert!(
        !committed.is_empty(),
        "no round committed anything: the test proved nothing"
    );

    rt.block_on(async {
        let storage = FsCheckpointStorage::open(&root).unwrap();
        let listed = storage.list().await.unwrap();
        let listed_committed: BTreeSet<u64> = listed.iter().filter(|c| c.committed).map(|c| c.id.0).collect();
        for id in committed.difference(&discarding) {
            assert!(listed_committed.contains(id), "checkpoint {id} was reported committed and is lost");
        }
        // Every visible file holds exactly what was written: a committed
        // checkpoint (even one whose discard was cut short) has all its
        // files; an uncommitted one may miss some, never hold a partial one.
        let files = storage.list_files("").await.unwrap();
        for f in &files {
            let want = expected(&f.path).unwrap_or_else(|| panic!("unexpected file {}", f.path));
            let got = storage.read_file(&f.path).await.unwrap();
            assert!(got == want, "{} holds {} bytes that differ from the {} written", f.path, got.len(), want.len());
        }
        for id in &listed_committed {
            assert_eq!(storage.read_metadata(CheckpointId(*id)).await.unwrap(), metadata(*id));
            for path in state_files(*id) {
                assert_eq!(storage.read_file(&path).await.unwrap(), content(&path), "{path}");
            }
        }
        let temps = walk_names(&root).into_iter().filter(|n| n.starts_with(TEMP_PREFIX)).count();
        println!(
            "{} committed checkpoints reported, {} listed committed now, {} files, {temps} temporary files left by kills",
            committed.len(),
            listed_committed.len(),
            files.len()
        );
    });
}

/// Reads every file a reader sees in the storage at `root` (read-only, as
/// a concurrent reader) and checks that it holds exactly what was written;
/// returns how many it read. Files deleted in the meantime are skipped.
async fn every_visible_file_is_whole(root: &std::path::Path, cache: &mut HashMap<String, Vec<u8>>) -> usize {
    let Ok(storage) = FsCheckpointStorage::open_existing(root) else {
        return 0;
    };
    let mut read = 0;
    for f in storage.list_files("").await.unwrap() {
        let want = cache
            .entry(f.path.clone())
            .or_insert_with(|| expected(&f.path).unwrap_or_else(|| panic!("unexpected file {}", f.path)));
        match storage.read_file(&f.path).await {
            Ok(got) => assert!(
                got == *want,
                "a reader saw {} holding {} bytes that differ from the {} written",
                f.path,
                got.len(),
                want.len()
            ),
            Err(e) if e.is_not_found() => continue,
            Err(e) => panic!("reading {}: {e}", f.path),
        }
        read += 1;
    }
    read
}

fn walk_names(dir: &std::path::Path) -> Vec<String> {
    let mut names = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().map(Result::unwrap) {
        if e.file_type().unwrap().is_dir() {
            names.extend(walk_names(&e.path()));
        } else {
            names.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    names
}
