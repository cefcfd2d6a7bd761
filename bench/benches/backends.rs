//! Backend benchmarks: state get/put throughput (memory vs redb state
//! backend), snapshot and restore time versus state size on memory and redb
//! storage, and checkpoint storage write/read throughput.
//!
//! ```text
//! cargo bench -p sluice-bench --bench backends
//! SLUICE_BENCH_HUGE=1 cargo bench -p sluice-bench --bench backends   # adds 10^7 keys
//! ```

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sluice_backend_memory::{MemoryCheckpointStorage, MemoryStateBackend};
use sluice_backend_redb::{RedbCheckpointStorage, RedbStateBackend};
use sluice_core::format::{encode_snapshot, read_key_groups};
use sluice_core::{
    Bytes, CheckpointId, CheckpointStorage, KeyGroupRange, KeyedStateStore, OperatorUid, StateBackend,
    StateFileHandle, StoreScope,
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

fn storages(dir: &std::path::Path) -> Vec<(&'static str, Arc<dyn CheckpointStorage>)> {
    vec![
        ("memory", Arc::new(MemoryCheckpointStorage::new())),
        (
            "redb",
            Arc::new(RedbCheckpointStorage::open(dir.join("checkpoints.redb")).expect("redb storage")),
        ),
    ]
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
}

fn sizes() -> Vec<u64> {
    let mut v = vec![10_000, 100_000, 1_000_000];
    if std::env::var_os("SLUICE_BENCH_HUGE").is_some() {
        v.push(10_000_000);
    }
    v
}

/// Snapshot (synchronous step + encode + write) and restore (read + put into
/// a fresh store) of `n` keys.
fn snapshot_restore(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Runtime::new().expect("tokio");
    let mut group = c.benchmark_group("snapshot_restore");
    group.sample_size(10).measurement_time(Duration::from_secs(10));
    for n in sizes() {
        group.throughput(Throughput::Elements(n));
        for (bname, backend) in backends(dir.path()) {
            let mut store = backend.open_store(&scope()).expect("open");
            fill(store.as_mut(), n);
            for (sname, storage) in storages(dir.path()) {
                // The file the restore benchmark reads (written once, untimed).
                let file = {
                    let id = CheckpointId(n);
                    let enc =
                        encode_snapshot(store.snapshot(id).expect("snapshot").as_ref()).expect("encode");
                    let path = format!("{}/restore-0.kst", id.dir());
                    let handle = StateFileHandle {
                        path: path.clone(),
                        size: enc.bytes.len() as u64,
                        crc32: enc.crc32,
                        key_groups: enc.key_groups,
                        entries: enc.entries,
                    };
                    rt.block_on(storage.discard(id)).expect("discard");
                    rt.block_on(storage.write_file(&path, enc.bytes)).expect("write");
                    handle
                };
                let id_counter = std::cell::Cell::new(1u64 + n * 10);
                group.bench_function(BenchmarkId::new(format!("snapshot/{bname}->{sname}"), n), |b| {
                    b.iter_custom(|iters| {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            let id = CheckpointId(id_counter.get());
                            id_counter.set(id.0 + 1);
                            let t = Instant::now();
                            let snap = store.snapshot(id).expect("snapshot");
                            let enc = encode_snapshot(snap.as_ref()).expect("encode");
                            let path = format!("{}/bench-0.kst", id.dir());
                            rt.block_on(storage.write_file(&path, enc.bytes)).expect("write");
                            total += t.elapsed();
                            drop(snap);
                            rt.block_on(storage.discard(id)).expect("discard");
                        }
                        total
                    })
                });
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
    let size = 16usize << 20;
    let data = Bytes::from((0..size).map(|i| (i * 31 % 251) as u8).collect::<Vec<u8>>());
    let mut group = c.benchmark_group("storage_throughput");
    group.throughput(Throughput::Bytes(size as u64)).sample_size(10);
    for (name, storage) in storages(dir.path()) {
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

criterion_group!(benches, state_get_put, snapshot_restore, storage_throughput);
criterion_main!(benches);
