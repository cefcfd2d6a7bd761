//! State time-to-live in a running job, with a clock the test controls:
//! expired values are never returned (on create-and-write and on
//! read-and-write), expired entries are left out of checkpoints, and the
//! renewal times survive a restore, and expired entries never read again
//! are cleaned while the job processes other records. The commands run in order (one split,
//! parallelism 1); the function moves the clock when told.

use serde::{Deserialize, Serialize};
use sluice_backend_memory::{MemoryCheckpointStorage, MemoryStateBackend};
use sluice_backend_redb::RedbStateBackend;
use sluice_core::{
    state::KeyValueVisitor, CheckpointId, CheckpointStorage, KeyGroupRange, KeyedStateStore, StateBackend,
    StateId, StateSnapshot, StoreScope,
};
use sluice_runtime::prelude::*;
use sluice_runtime::ttl::{ManualClock, StateTtlConfig, TtlValue, TtlValueState};
use sluice_runtime::{read_keyed_entries, JobResult, RestoreSource, SavepointLocation};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, Serialize, Deserialize)]
enum Cmd {
    Set(u64, u64),
    Get(u64),
    Advance(u64),
}

impl Cmd {
    fn key(&self) -> u64 {
        match self {
            Cmd::Set(k, _) | Cmd::Get(k) => *k,
            Cmd::Advance(_) => 0,
        }
    }
}

#[derive(Clone)]
struct Ttl {
    clock: Arc<ManualClock>,
    config: StateTtlConfig,
    state: Option<TtlValueState<u64>>,
}

impl KeyedProcessFunction<u64, Cmd, (u64, Option<u64>)> for Ttl {
    fn open(&mut self, ctx: &mut OpenContext<'_>) -> Result<()> {
        self.state = Some(ctx.value_state_with_ttl("v", self.config.clone())?);
        Ok(())
    }
    fn process(
        &mut self,
        key: &u64,
        cmd: Cmd,
        ctx: &mut KeyedContext<'_>,
        out: &mut Collector<'_, (u64, Option<u64>)>,
    ) -> Result<()> {
        let s = self.state.as_ref().unwrap();
        match cmd {
            Cmd::Set(_, v) => s.set(ctx, v),
            Cmd::Get(_) => out.collect((*key, s.get(ctx)?)),
            Cmd::Advance(ms) => {
                self.clock.advance(Duration::from_millis(ms));
                Ok(())
            }
        }
    }
}

/// Runs `cmds` in order; returns what the gets saw.
async fn run(
    cmds: Vec<Cmd>,
    f: Ttl,
    backend: Arc<dyn StateBackend>,
    storage: Arc<dyn CheckpointStorage>,
    from: Option<SavepointLocation>,
) -> (Vec<(u64, Option<u64>)>, JobResult) {
    let job = Job::new("ttl-test")
        .with_parallelism(1)
        .with_state_backend(backend)
        .with_checkpoint_storage(storage)
        .with_checkpointing(CheckpointConfig::every(Duration::from_secs(3600)));
    // A restored job reads new commands: a new source (the old one's
    // positions are not restored).
    let (job, source) = match from {
        Some(l) => (job.from_savepoint(l).allow_non_restored_state(true), "more-cmds"),
        None => (job, "cmds"),
    };
    let sink = CollectSink::new();
    job.source(source, VecSource::new(cmds, 1), 1)
        .key_by(|c: &Cmd| c.key())
        .process("ttl", f)
        .sink(sink.clone())
        .unwrap();
    let result = job.start().unwrap().wait().await.unwrap();
    (sink.items(), result)
}

fn ttl(clock: &Arc<ManualClock>, ms: u64) -> Ttl {
    Ttl {
        clock: clock.clone(),
        config: StateTtlConfig::new(Duration::from_millis(ms)).with_clock(clock.clone()),
        state: None,
    }
}

fn backends() -> Vec<(&'static str, Arc<dyn StateBackend>)> {
    let dir = tempfile::tempdir().unwrap().keep();
    vec![
        ("memory", Arc::new(MemoryStateBackend::new())),
        ("redb", Arc::new(RedbStateBackend::new(dir).unwrap())),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_values_are_never_returned() {
    use Cmd::*;
    for (name, backend) in backends() {
        let clock = ManualClock::at(1_000_000);
        let cmds = vec![
            Set(1, 10),
            Set(2, 20),
            Advance(500),
            Get(1),
            Set(2, 21), // renewed at +500
            Advance(499),
            Get(1), // +999: alive
            Advance(1),
            Get(1), // +1000: expired
            Get(2), // renewed 500 ago: alive
            Advance(500),
            Get(2), // expired
        ];
        let storage: Arc<dyn CheckpointStorage> = Arc::new(MemoryCheckpointStorage::new());
        let (seen, _) = run(cmds, ttl(&clock, 1000), backend, storage, None).await;
        assert_eq!(
            seen,
            vec![(1, Some(10)), (1, Some(10)), (1, None), (2, Some(21)), (2, None)],
            "{name}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_renew_values_on_read_and_write() {
    use Cmd::*;
    let clock = ManualClock::at(0);
    let mut f = ttl(&clock, 1000);
    f.config = f.config.update_on_read_and_write();
    let cmds = vec![
        Set(1, 10),
        Advance(800),
        Get(1),
        Advance(800),
        Get(1),
        Advance(1000),
        Get(1),
    ];
    let storage: Arc<dyn CheckpointStorage> = Arc::new(MemoryCheckpointStorage::new());
    let (seen, _) = run(cmds, f, Arc::new(MemoryStateBackend::new()), storage, None).await;
    // Read at 800 renews it: alive at 1600, expired at 2600.
    assert_eq!(seen, vec![(1, Some(10)), (1, Some(10)), (1, None)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_entries_are_left_out_of_checkpoints_and_renewal_times_survive_a_restore() {
    use Cmd::*;
    for (name, backend) in backends() {
        let clock = ManualClock::at(0);
        let storage: Arc<dyn CheckpointStorage> = Arc::new(MemoryCheckpointStorage::new());
        // Keys 1..=100 written at 0, keys 101..=110 at 900; at 1000 the
        // first hundred are expired, never read.
        let mut cmds: Vec<Cmd> = (1..=100).map(|k| Set(k, k)).collect();
        cmds.push(Advance(900));
        cmds.extend((101..=110).map(|k| Set(k, k)));
        cmds.push(Advance(100));
        let (_, result) = run(cmds, ttl(&clock, 1000), backend.clone(), storage.clone(), None).await;
        let last = result.final_checkpoint.expect("a final checkpoint");
        let source = RestoreSource::checkpoint(storage.clone(), last).await.unwrap();
        let op = source
            .metadata
            .operators
            .iter()
            .find(|o| o.uid.as_str() == "ttl")
            .unwrap();
        let entries = read_keyed_entries(storage.as_ref(), "", op).await.unwrap();
        let mut keys: Vec<u64> = entries
            .iter()
            .map(|((_, _, k), v)| {
                let t: TtlValue<u64> = postcard::from_bytes(v).unwrap();
                assert_eq!(
                    t.renewed_ms, 900,
                    "{name}: the renewal time is stored with the value"
                );
                postcard::from_bytes::<u64>(k).unwrap()
            })
            .collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            (101..=110).collect::<Vec<_>>(),
            "{name}: only live entries are checkpointed"
        );

        // Restored at 1000: the values renewed at 900 live until 1900.
        let location = SavepointLocation::new(storage.clone(), last.dir()).unwrap();
        let cmds = vec![Get(101), Advance(899), Get(102), Advance(1), Get(103), Get(1)];
        let (seen, _) = run(cmds, ttl(&clock, 1000), backend, storage, Some(location)).await;
        assert_eq!(
            seen,
            vec![(101, Some(101)), (102, Some(102)), (103, None), (1, None)],
            "{name}"
        );
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
enum Op {
    Add(u64, u64),
    Put(u64, u64, u64),
    Read(u64),
    Advance(u64),
}

/// A list and a map with a time-to-live; `Read` emits the live list and
/// the live map entries (sorted).
#[derive(Clone)]
struct Kinds {
    clock: Arc<ManualClock>,
    list: Option<sluice_runtime::ttl::TtlListState<u64>>,
    map: Option<sluice_runtime::ttl::TtlMapState<u64, u64>>,
}

type Seen = (u64, Vec<u64>, Vec<(u64, u64)>);

impl KeyedProcessFunction<u64, Op, Seen> for Kinds {
    fn open(&mut self, ctx: &mut OpenContext<'_>) -> Result<()> {
        let config = StateTtlConfig::new(Duration::from_millis(1000)).with_clock(self.clock.clone());
        self.list = Some(ctx.list_state_with_ttl("list", config.clone())?);
        self.map = Some(ctx.map_state_with_ttl("map", config)?);
        Ok(())
    }
    fn process(
        &mut self,
        key: &u64,
        op: Op,
        ctx: &mut KeyedContext<'_>,
        out: &mut Collector<'_, Seen>,
    ) -> Result<()> {
        let (list, map) = (self.list.as_ref().unwrap(), self.map.as_ref().unwrap());
        match op {
            Op::Add(_, v) => list.add(ctx, v),
            Op::Put(_, k, v) => map.put(ctx, &k, v),
            Op::Advance(ms) => {
                self.clock.advance(Duration::from_millis(ms));
                Ok(())
            }
            Op::Read(_) => {
                let mut entries = map.entries(ctx)?;
                entries.sort_unstable();
                out.collect((*key, list.get(ctx)?, entries))
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_elements_and_map_entries_expire_one_by_one_and_leave_checkpoints() {
    use Op::*;
    for (name, backend) in backends() {
        let clock = ManualClock::at(0);
        let ops = vec![
            Add(1, 10),
            Put(1, 7, 70),
            Put(1, 8, 80),
            Advance(600),
            Add(1, 11),
            Put(1, 8, 81), // renewed at 600
            Read(1),       // all alive
            Advance(400),  // 1000: the first element and entry 7 expire
            Read(1),
            Add(2, 20), // at 1000: alive at the end
            Advance(600),
            // 1600: element 11 and entry 8 (renewed at 600) expire.
            Read(1),
        ];
        let storage: Arc<dyn CheckpointStorage> = Arc::new(MemoryCheckpointStorage::new());
        let job = Job::new("ttl-kinds")
            .with_parallelism(1)
            .with_state_backend(backend)
            .with_checkpoint_storage(storage.clone())
            .with_checkpointing(CheckpointConfig::every(Duration::from_secs(3600)));
        let sink = CollectSink::new();
        job.source("ops", VecSource::new(ops, 1), 1)
            .key_by(|o: &Op| match o {
                Add(k, _) | Put(k, _, _) | Read(k) => *k,
                Advance(_) => 0,
            })
            .process(
                "kinds",
                Kinds {
                    clock: clock.clone(),
                    list: None,
                    map: None,
                },
            )
            .sink(sink.clone())
            .unwrap();
        let result = job.start().unwrap().wait().await.unwrap();
        assert_eq!(
            sink.items(),
            vec![
                (1, vec![10, 11], vec![(7, 70), (8, 81)]),
                (1, vec![11], vec![(8, 81)]),
                (1, vec![], vec![]),
            ],
            "{name}"
        );
        // The final checkpoint (at 1600) holds only key 2's list.
        let last = result.final_checkpoint.unwrap();
        let source = RestoreSource::checkpoint(storage.clone(), last).await.unwrap();
        let op = source
            .metadata
            .operators
            .iter()
            .find(|o| o.uid.as_str() == "kinds")
            .unwrap();
        let entries = read_keyed_entries(storage.as_ref(), "", op).await.unwrap();
        let states: Vec<(String, u64)> = entries
            .keys()
            .map(|(s, _, k)| (s.clone(), postcard::from_bytes::<u64>(k).unwrap()))
            .collect();
        assert_eq!(states, vec![("list".to_string(), 2)], "{name}");
    }
}

/// The memory backend, counting the deletions its stores receive while
/// records are processed: those followed by a later write (not the final
/// checkpoint's full cleanup, which comes after the last record).
#[derive(Debug, Default)]
struct CountingBackend {
    inner: MemoryStateBackend,
    deleted_while_processing: Arc<std::sync::atomic::AtomicU64>,
}

struct CountingStore {
    inner: Box<dyn KeyedStateStore>,
    deleted: Arc<std::sync::atomic::AtomicU64>,
    /// Deletions since the last write.
    pending: u64,
}

impl CountingStore {
    fn written(&mut self) {
        self.deleted.fetch_add(
            std::mem::take(&mut self.pending),
            std::sync::atomic::Ordering::Relaxed,
        );
    }
}

impl StateBackend for CountingBackend {
    fn name(&self) -> &str {
        "counting-memory"
    }
    fn open_store(&self, scope: &StoreScope) -> sluice_core::Result<Box<dyn KeyedStateStore>> {
        Ok(Box::new(CountingStore {
            inner: self.inner.open_store(scope)?,
            deleted: self.deleted_while_processing.clone(),
            pending: 0,
        }))
    }
}

impl KeyedStateStore for CountingStore {
    fn register_state(&mut self, name: &str) -> sluice_core::Result<StateId> {
        self.inner.register_state(name)
    }
    fn register_typed(
        &mut self,
        name: &str,
        make: &dyn Fn(KeyGroupRange) -> Box<dyn sluice_core::heap::TypedTable>,
    ) -> sluice_core::Result<Option<StateId>> {
        self.inner.register_typed(name, make)
    }
    fn typed(&mut self, state: StateId) -> Option<sluice_core::heap::TypedAccess<'_>> {
        self.written();
        self.inner.typed(state)
    }
    fn get(&mut self, state: StateId, kg: u32, key: &[u8], out: &mut Vec<u8>) -> sluice_core::Result<bool> {
        self.inner.get(state, kg, key, out)
    }
    fn put(&mut self, state: StateId, kg: u32, key: &[u8], value: &[u8]) -> sluice_core::Result<()> {
        self.written();
        self.inner.put(state, kg, key, value)
    }
    fn delete(&mut self, state: StateId, kg: u32, key: &[u8]) -> sluice_core::Result<()> {
        self.pending += 1;
        self.inner.delete(state, kg, key)
    }
    fn scan_prefix(
        &mut self,
        state: StateId,
        kg: u32,
        prefix: &[u8],
        visit: &mut KeyValueVisitor<'_>,
    ) -> sluice_core::Result<()> {
        self.inner.scan_prefix(state, kg, prefix, visit)
    }
    fn snapshot(&mut self, checkpoint: CheckpointId) -> sluice_core::Result<Box<dyn StateSnapshot>> {
        self.inner.snapshot(checkpoint)
    }
}

/// Expired entries that are never read again leave the store while the job
/// processes other records (the incremental cleanup, a key group per input
/// batch), before any snapshot's full cleanup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_entries_never_read_are_cleaned_while_processing() {
    use Cmd::*;
    let clock = ManualClock::at(0);
    // 300 keys written at 0, expired at 1000 and never read; then other
    // records (all on key 0) flow.
    let mut cmds: Vec<Cmd> = (1..=300).map(|k| Set(k, k)).collect();
    cmds.push(Advance(1000));
    cmds.extend((0..50_000).map(|i| Set(0, i)));
    let backend = Arc::new(CountingBackend::default());
    let job = Job::new("ttl-cleanup")
        .with_parallelism(1)
        .with_max_parallelism(8)
        .with_state_backend(backend.clone())
        .with_checkpoint_storage(Arc::new(MemoryCheckpointStorage::new()))
        .with_checkpointing(CheckpointConfig::every(Duration::from_secs(3600)));
    job.source("cmds", VecSource::new(cmds, 1), 1)
        .key_by(|c: &Cmd| c.key())
        .process("ttl", ttl(&clock, 1000))
        .sink(DiscardSink::new())
        .unwrap();
    job.start().unwrap().wait().await.unwrap();
    assert_eq!(
        backend
            .deleted_while_processing
            .load(std::sync::atomic::Ordering::Relaxed),
        300,
        "every expired entry was removed while records were processed"
    );
}
