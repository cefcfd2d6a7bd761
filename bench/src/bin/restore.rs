//! Restore of keyed state from a checkpoint, as a task does it at recovery:
//! a full file of N keys (8-byte keys, 8-byte values, one subtask owning
//! every key group), alone and followed by changes files (1 % of the keys
//! each), read from a checkpoint storage into a fresh state store. The
//! bulk path (`load_chain`: ranged reads in chunks, `KeyedStateStore::load`
//! in sorted batches) is measured against one `put` per entry, in the same
//! run.
//!
//! ```text
//! cargo run --release -p sluice-bench --bin restore -- [--keys 100000,1000000] [--changes 4] [--runs 3]
//! ```

use clap::Parser;
use sluice_backend_memory::{MemoryCheckpointStorage, MemoryStateBackend};
use sluice_backend_redb::{RedbCheckpointStorage, RedbStateBackend};
use sluice_core::format::{encode_changes, encode_snapshot, read_changes, EncodedSnapshot};
use sluice_core::load::load_chain;
use sluice_core::{
    key_group_for_key, CheckpointId, CheckpointStorage, KeyGroupRange, KeyedStateStore, StateBackend,
    StateFileHandle, StoreScope,
};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

const MAX_PARALLELISM: u32 = 128;

#[derive(Parser)]
struct Args {
    /// State sizes (keys), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "100000,1000000")]
    keys: Vec<u64>,
    /// Changes files after the base (each rewrites 1 % of the keys and
    /// deletes 0.1 %).
    #[arg(long, default_value_t = 4)]
    changes: u64,
    /// Runs per configuration (the best is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

fn scope(track_changes: bool) -> StoreScope {
    StoreScope {
        job: "restore-bench".into(),
        operator: sluice_core::OperatorUid::new("sum").expect("uid"),
        subtask: 0,
        parallelism: 1,
        max_parallelism: MAX_PARALLELISM,
        key_groups: KeyGroupRange::all(MAX_PARALLELISM),
        track_changes,
    }
}

fn key(i: u64) -> ([u8; 8], u32) {
    let k = i.to_be_bytes();
    (k, key_group_for_key(&k, MAX_PARALLELISM))
}

async fn write(storage: &dyn CheckpointStorage, path: String, enc: EncodedSnapshot) -> StateFileHandle {
    let handle = enc.handle(path.clone());
    storage.write_file(&path, enc.bytes).await.expect("write");
    handle
}

/// Writes the base and `changes` changes files of `n` keys into `storage`.
async fn chain(storage: &dyn CheckpointStorage, n: u64, changes: u64) -> Vec<StateFileHandle> {
    let backend = MemoryStateBackend::new();
    let mut store = backend
        .open_store(&scope(std::env::var_os("NOTRACK").is_none()))
        .expect("open");
    let s = store.register_state("sum").expect("register");
    for i in 0..n {
        let (k, g) = key(i);
        store.put(s, g, &k, &i.to_le_bytes()).expect("put");
    }
    let base = store.snapshot(CheckpointId(1)).expect("snapshot");
    let mut files = vec![
        write(
            storage,
            "chk-1/sum-0.kst".into(),
            encode_snapshot(base.as_ref()).expect("encode"),
        )
        .await,
    ];
    for c in 0..changes {
        let step = 100;
        for i in (c..n).step_by(step) {
            let (k, g) = key(i);
            if i % 1000 == c {
                store.delete(s, g, &k).expect("delete");
            } else {
                store.put(s, g, &k, &(i + c).to_le_bytes()).expect("put");
            }
        }
        let id = CheckpointId(c + 2);
        let delta = store
            .snapshot_changes(id, CheckpointId(c + 1))
            .expect("changes")
            .expect("the memory store tracks changes");
        let enc = encode_changes(delta.as_ref()).expect("encode");
        files.push(write(storage, format!("{}/sum-0.kst", id.dir()), enc).await);
        store.checkpoint_complete(id);
    }
    files
}

/// One entry at a time, as restores were before `load`.
async fn restore_by_put(
    storage: &dyn CheckpointStorage,
    files: &[StateFileHandle],
    store: &mut dyn KeyedStateStore,
) {
    let s = store.register_state("sum").expect("register");
    for f in files {
        read_changes(
            storage,
            f,
            KeyGroupRange::all(MAX_PARALLELISM),
            &mut |_, g, k, v| match v {
                Some(v) => store.put(s, g, k, v),
                None => store.delete(s, g, k),
            },
        )
        .await
        .expect("restore");
    }
}

fn best(runs: usize, mut f: impl FnMut() -> Duration) -> Duration {
    (0..runs).map(|_| f()).min().unwrap_or_default()
}

fn main() {
    sluice_runtime::limit_allocator_retention();
    let a = Args::parse();
    let rt = tokio::runtime::Runtime::new().expect("tokio");
    let dir = tempfile::tempdir().expect("tempdir");
    let storages: Vec<(&str, Arc<dyn CheckpointStorage>)> = vec![
        ("memory", Arc::new(MemoryCheckpointStorage::new())),
        (
            "redb",
            Arc::new(RedbCheckpointStorage::open(dir.path().join("chk.redb")).expect("redb storage")),
        ),
    ];
    println!("| keys | files | storage | state backend | one put per entry | bulk load | speed-up |");
    println!("| ---: | ---: | --- | --- | ---: | ---: | ---: |");
    for &n in &a.keys {
        for (sname, storage) in &storages {
            let files = rt.block_on(async {
                let _ = storage.delete_dir("chk-1").await;
                for c in 0..a.changes {
                    let _ = storage.delete_dir(&CheckpointId(c + 2).dir()).await;
                }
                chain(storage.as_ref(), n, a.changes).await
            });
            for chain_len in [1, files.len()] {
                let files = &files[..chain_len];
                let decode = best(a.runs, || {
                    let t = Instant::now();
                    rt.block_on(async {
                        for f in files {
                            read_changes(
                                storage.as_ref(),
                                f,
                                KeyGroupRange::all(MAX_PARALLELISM),
                                &mut |_, _, _, _| Ok(()),
                            )
                            .await
                            .expect("read");
                        }
                    });
                    t.elapsed()
                });
                println!(
                    "| {n} | {chain_len} | {sname} | read and decode only | {:.0} ms | | |",
                    decode.as_secs_f64() * 1e3
                );
                for bname in ["memory", "redb"] {
                    let backend: Box<dyn StateBackend> = match bname {
                        "memory" => Box::new(MemoryStateBackend::new()),
                        _ => Box::new(RedbStateBackend::new(dir.path().join("state")).expect("redb state")),
                    };
                    let by_put = best(a.runs, || {
                        let mut store = backend
                            .open_store(&scope(std::env::var_os("NOTRACK").is_none()))
                            .expect("open");
                        let t = Instant::now();
                        rt.block_on(restore_by_put(storage.as_ref(), files, store.as_mut()));
                        t.elapsed()
                    });
                    let bulk = best(a.runs, || {
                        let mut store = backend
                            .open_store(&scope(std::env::var_os("NOTRACK").is_none()))
                            .expect("open");
                        let t = Instant::now();
                        rt.block_on(load_chain(
                            storage.as_ref(),
                            files,
                            KeyGroupRange::all(MAX_PARALLELISM),
                            store.as_mut(),
                            &mut HashMap::new(),
                        ))
                        .expect("load");
                        t.elapsed()
                    });
                    println!(
                        "| {n} | {chain_len} | {sname} | {bname} | {:.0} ms | {:.0} ms | {:.1}x |",
                        by_put.as_secs_f64() * 1e3,
                        bulk.as_secs_f64() * 1e3,
                        by_put.as_secs_f64() / bulk.as_secs_f64()
                    );
                }
            }
        }
    }
}
