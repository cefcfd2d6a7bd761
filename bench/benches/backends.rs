//! Backend benchmarks, one group per concern, each on every backend:
//! - `state_get_put`: get, update (get + put) and scan throughput of the
//!   memory and redb state backends;
//! - `snapshot_restore`: the synchronous snapshot step, the asynchronous
//!   step (encode + write to each checkpoint storage) and the restore
//!   (read + put into a fresh store) versus state size (10^4 … 10^6 keys,
//!   10^7 with `SLUICE_BENCH_HUGE=1`);
//! - `storage_throughput`: write and read MB/s of each checkpoint storage;
//! - `incremental_vs_full`: one checkpoint of 10^5 keys (10^6 with
//!   `SLUICE_BENCH_HUGE=1`) after 1 % or 10 % of them changed, full against
//!   incremental, on each state backend into each storage.
//!
//! The S3 storage joins when `AWS_ENDPOINT_URL` and `SLUICE_S3_BUCKET` are
//! set (`eval "$(scripts/s3-server.sh env)"`).
//!
//! ```text
//! cargo bench -p sluice-bench --bench backends
//! SLUICE_BENCH_HUGE=1 cargo bench -p sluice-bench --bench backends   # adds 10^7 keys
//! ```

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sluice_backend_memory::{MemoryCheckpointStorage, MemoryStateBackend};
use sluice_backend_redb::{RedbCheckpointStorage, RedbStateBackend};
use sluice_backend_s3::{S3CheckpointStorage, S3Config};
use sluice_core::format::{encode_snapshot, read_key_groups};
use sluice_core::CheckpointStorageExt;
use sluice_core::{
    Bytes, CheckpointId, CheckpointStorage, KeyGroupRange, KeyedStateStore, OperatorUid, StateBackend,
    StoreScope,
};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

const MAX_PARALLELISM: u32 = 128;

fn scope() -> StoreScope {
    StoreScope {
        job: "bench".into(),
        operator: OperatorUid("bench".into()),
        subtask: 0,
        parallelism: 1,
        max_parallelism: MAX_PARALLELISM,
        key_groups: KeyGroupRange::all(MAX_PARALLELISM),
        track_changes: true,
    }
}

fn backends(dir: &std::path::Path) -> Vec<(&'static str, Arc<dyn StateBackend>)> {
    vec![
        ("memory", Arc::new(MemoryStateBackend::new())),
        (
            "redb",
            Arc::new(RedbStateBackend::new(dir.join("state")).expect("redb backend")),
        ),
    ]
}

fn storages(
    dir: &std::path::Path,
    rt: &tokio::runtime::Runtime,
) -> Vec<(&'static str, Arc<dyn CheckpointStorage>)> {
    let mut v: Vec<(&'static str, Arc<dyn CheckpointStorage>)> = vec![
        ("memory", Arc::new(MemoryCheckpointStorage::new())),
        (
            "redb",
            Arc::new(RedbCheckpointStorage::open(dir.join("checkpoints.redb")).expect("redb storage")),
        ),
    ];
    if let (Some(_), Ok(bucket)) = (
        std::env::var_os("AWS_ENDPOINT_URL"),
        std::env::var("SLUICE_S3_BUCKET"),
    ) {
        let prefix = format!("bench/criterion-{}", std::process::id());
        let s3 = rt
            .block_on(S3CheckpointStorage::open(S3Config::new(bucket, prefix)))
            .expect("S3 storage (AWS_ENDPOINT_URL is set)");
        v.push(("s3", Arc::new(s3)));
    }
    v
}

/// Key bytes and key group of key `i`, as the runtime computes them.
fn key(i: u64) -> (Vec<u8>, u32) {
    let k = postcard::to_allocvec(&i).expect("encode");
    let g = sluice_core::key_group_for_key(&k, MAX_PARALLELISM);
    (k, g)
}

fn fill(store: &mut dyn KeyedStateStore, n: u64) -> u16 {
    let s = store.register_state("sum").expect("register");
    for i in 0..n {
        let (k, g) = key(i);
        store.put(s, g, &k, &i.to_le_bytes()).expect("put");
    }
    s
}

fn state_get_put(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut group = c.benchmark_group("state_get_put");
    let keys = 100_000u64;
    let batch = 10_000u64;
    group.throughput(Throughput::Elements(batch));
    for (name, backend) in backends(dir.path()) {
        let mut store = backend.open_store(&scope()).expect("open");
        let s = fill(store.as_mut(), keys);
        let prepared: Vec<(Vec<u8>, u32)> = (0..batch)
            .map(|i| key(i.wrapping_mul(0x9E37_79B9_7F4A_7C15) % keys))
            .collect();
        let mut buf = Vec::new();
        group.bench_function(BenchmarkId::new("update", name), |b| {
            b.iter(|| {
                for (k, g) in &prepared {
                    let found = store.get(s, *g, k, &mut buf).expect("get");
                    let v = if found {
                        u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"))
                    } else {
                        0
                    };
                    store.put(s, *g, k, &(v + 1).to_le_bytes()).expect("put");
                }
            })
        });
        group.bench_function(BenchmarkId::new("get", name), |b| {
            b.iter(|| {
                for (k, g) in &prepared {
                    black_box(store.get(s, *g, k, &mut buf).expect("get"));
                }
            })
        });
    }
    group.finish();
    // Scans: every entry of every key group.
    let mut group = c.benchmark_group("state_scan");
    group.throughput(Throughput::Elements(keys)).sample_size(10);
    for (name, backend) in backends(dir.path()) {
        let mut store = backend.open_store(&scope()).expect("open");
        let s = fill(store.as_mut(), keys);
        group.bench_function(BenchmarkId::new("scan", name), |b| {
            b.iter(|| {
                let mut n = 0u64;
                for g in 0..MAX_PARALLELISM {
                    store
                        .scan_prefix(s, g, &[], &mut |_, v| {
                            n += v.len() as u64;
                            Ok(())
                        })
                        .expect("scan");
                }
                black_box(n)
            })
        });
    }
    group.finish();
}

fn sizes() -> Vec<u64> {
    let mut v = vec![10_000, 100_000, 1_000_000];
    if std::env::var_os("SLUICE_BENCH_HUGE").is_some() {
        v.push(10_000_000);
    }
    v
}

/// Snapshot — the synchronous step alone, then the asynchronous step
/// (encode + write) — and restore (read + put into a fresh store) of `n`
/// keys.
fn snapshot_restore(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Runtime::new().expect("tokio");
    let storages = storages(dir.path(), &rt);
    let mut group = c.benchmark_group("snapshot_restore");
    group.sample_size(10).measurement_time(Duration::from_secs(10));
    for n in sizes() {
        group.throughput(Throughput::Elements(n));
        for (bname, backend) in backends(dir.path()) {
            let mut store = backend.open_store(&scope()).expect("open");
            let s = fill(store.as_mut(), n);
            let sync_counter = std::cell::Cell::new(1u64 + n * 100);
            group.bench_function(BenchmarkId::new(format!("snapshot_sync/{bname}"), n), |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for i in 0..iters {
                        // A write since the last snapshot, as while running.
                        let (k, g) = key(i % n);
                        store.put(s, g, &k, &i.to_le_bytes()).expect("put");
                        let id = CheckpointId(sync_counter.get());
                        sync_counter.set(id.0 + 1);
                        let t = Instant::now();
                        let snap = store.snapshot(id).expect("snapshot");
                        total += t.elapsed();
                        drop(snap);
                    }
                    total
                })
            });
            for (sname, storage) in &storages {
                // The file the restore benchmark reads (written once, untimed).
                let file = {
                    let id = CheckpointId(n);
                    let enc =
                        encode_snapshot(store.snapshot(id).expect("snapshot").as_ref()).expect("encode");
                    let path = format!("{}/restore-0.kst", id.dir());
                    let handle = enc.handle(path.clone());
                    rt.block_on(storage.discard(id)).expect("discard");
                    rt.block_on(storage.write_file(&path, enc.bytes)).expect("write");
                    handle
                };
                let id_counter = std::cell::Cell::new(1u64 + n * 10);
                group.bench_function(
                    BenchmarkId::new(format!("snapshot_async/{bname}->{sname}"), n),
                    |b| {
                        b.iter_custom(|iters| {
                            let mut total = Duration::ZERO;
                            for _ in 0..iters {
                                let id = CheckpointId(id_counter.get());
                                id_counter.set(id.0 + 1);
                                let snap = store.snapshot(id).expect("snapshot");
                                let t = Instant::now();
                                let enc = encode_snapshot(snap.as_ref()).expect("encode");
                                let path = format!("{}/bench-0.kst", id.dir());
                                rt.block_on(storage.write_file(&path, enc.bytes)).expect("write");
                                total += t.elapsed();
                                drop(snap);
                                rt.block_on(storage.discard(id)).expect("discard");
                            }
                            total
                        })
                    },
                );
                group.bench_function(BenchmarkId::new(format!("restore/{sname}->{bname}"), n), |b| {
                    b.iter_custom(|iters| {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            let mut target = backend.open_store(&scope()).expect("open");
                            let t = Instant::now();
                            let s = target.register_state("sum").expect("register");
                            rt.block_on(read_key_groups(
                                storage.as_ref(),
                                &file,
                                KeyGroupRange::all(MAX_PARALLELISM),
                                &mut |_, g, k, v| target.put(s, g, k, v),
                            ))
                            .expect("restore");
                            total += t.elapsed();
                        }
                        total
                    })
                });
            }
        }
    }
    group.finish();
}

fn storage_throughput(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Runtime::new().expect("tokio");
    let storages = storages(dir.path(), &rt);
    let size = 16usize << 20;
    let data = Bytes::from((0..size).map(|i| (i * 31 % 251) as u8).collect::<Vec<u8>>());
    let mut group = c.benchmark_group("storage_throughput");
    group.throughput(Throughput::Bytes(size as u64)).sample_size(10);
    for (name, storage) in &storages {
        let name = *name;
        let mut id = 1u64;
        group.bench_function(BenchmarkId::new("write", name), |b| {
            b.iter(|| {
                rt.block_on(storage.write_file(&format!("chk-{id}/f"), data.clone()))
                    .expect("write");
                rt.block_on(storage.discard(CheckpointId(id))).expect("discard");
                id += 1;
            })
        });
        rt.block_on(storage.write_file("chk-999999/f", data.clone()))
            .expect("write");
        group.bench_function(BenchmarkId::new("read", name), |b| {
            b.iter(|| black_box(rt.block_on(storage.read_file("chk-999999/f")).expect("read")))
        });
    }
    group.finish();
}

/// One checkpoint after `fraction` of `n` keys changed: `full` (snapshot,
/// encode, write the whole state) against `incremental` (the changes since
/// the previous checkpoint, encoded and written), on each state backend
/// into each storage. The updates themselves are not timed.
fn incremental_vs_full(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Runtime::new().expect("tokio");
    let storages = storages(dir.path(), &rt);
    let mut group = c.benchmark_group("incremental_vs_full");
    group.sample_size(10).measurement_time(Duration::from_secs(5));
    let n = if std::env::var_os("SLUICE_BENCH_HUGE").is_some() {
        1_000_000
    } else {
        100_000u64
    };
    for (bname, backend) in backends(dir.path()) {
        let mut store = backend.open_store(&scope()).expect("open");
        let s = fill(store.as_mut(), n);
        let next = std::cell::Cell::new(1u64);
        let base = store.snapshot(CheckpointId(0)).expect("snapshot");
        drop(base);
        store.checkpoint_complete(CheckpointId(0));
        for (sname, storage) in &storages {
            for fraction in [0.01, 0.1] {
                let stride = (1.0 / fraction) as u64;
                for incremental in [false, true] {
                    let kind = if incremental { "incremental" } else { "full" };
                    group.bench_function(
                        BenchmarkId::new(format!("{kind}/{bname}->{sname}/{}%", fraction * 100.0), n),
                        |b| {
                            b.iter_custom(|iters| {
                                let mut total = Duration::ZERO;
                                for _ in 0..iters {
                                    let id = CheckpointId(next.get());
                                    next.set(id.0 + 1);
                                    for i in (id.0 % stride..n).step_by(stride as usize) {
                                        let (k, g) = key(i);
                                        store.put(s, g, &k, &id.0.to_le_bytes()).expect("put");
                                    }
                                    let t = Instant::now();
                                    let prev = CheckpointId(id.0 - 1);
                                    let changes = match incremental {
                                        true => store.snapshot_changes(id, prev).expect("changes"),
                                        false => None,
                                    };
                                    let enc = match changes {
                                        Some(ch) => sluice_core::format::encode_changes(ch.as_ref()),
                                        None => {
                                            encode_snapshot(store.snapshot(id).expect("snapshot").as_ref())
                                        }
                                    }
                                    .expect("encode");
                                    let path = format!("{}/bench-0.kst", id.dir());
                                    rt.block_on(storage.write_file(&path, enc.bytes)).expect("write");
                                    total += t.elapsed();
                                    store.checkpoint_complete(id);
                                    rt.block_on(storage.discard(id)).expect("discard");
                                }
                                total
                            })
                        },
                    );
                }
            }
        }
    }
    group.finish();
}

criterion_group!(
    benches,
    state_get_put,
    snapshot_restore,
    storage_throughput,
    incremental_vs_full
);
criterion_main!(benches);
