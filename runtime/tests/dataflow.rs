//! The dataflow API: transformations, edges, union, two inputs, typed
//! state, sources with positions, and clear errors for bad jobs.

use sluice_runtime::prelude::*;
use sluice_runtime::workload::{FinalSumSink, InjectedFailure};
use sluice_runtime::FileLinesSource;
use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_filter_flat_map_rebalance_and_forward_deliver_every_record_once() {
    let sink = CollectSink::new();
    let job = Job::new("transform").with_parallelism(3);
    job.source("numbers", VecSource::new((0..10_000u64).collect(), 4), 2)
        .map(|x| x * 2)
        .filter(|x| x % 3 != 0)
        .flat_map(|x| [x, x + 1])
        .rebalance()
        .map(|x| x + 1_000_000)
        .set_parallelism(3)
        .forward()
        .sink(sink.clone())
        .unwrap();
    job.execute().await.unwrap();
    let mut got = sink.items();
    got.sort_unstable();
    let mut want: Vec<u64> = (0..10_000u64)
        .map(|x| x * 2)
        .filter(|x| x % 3 != 0)
        .flat_map(|x| [x, x + 1])
        .map(|x| x + 1_000_000)
        .collect();
    want.sort_unstable();
    assert_eq!(got, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_sends_every_record_to_every_subtask() {
    let sink = CollectSink::new();
    let job = Job::new("broadcast");
    job.source("numbers", VecSource::new((0..100u32).collect(), 1), 1)
        .broadcast()
        .set_parallelism(3)
        .sink(sink.clone())
        .unwrap();
    job.execute().await.unwrap();
    let mut counts = BTreeMap::new();
    for x in sink.items() {
        *counts.entry(x).or_insert(0) += 1;
    }
    assert_eq!(counts.len(), 100);
    assert!(counts.values().all(|c| *c == 3), "{counts:?}");
}

/// A key's list and sorted map entries, as emitted.
type Seen = (Vec<u32>, Vec<(String, u32)>);

#[derive(Clone, Default)]
struct Collect {
    list: Option<ListState<u32>>,
    map: Option<MapState<String, u32>>,
}

impl KeyedProcessFunction<u32, (u32, u32), (u32, Vec<u32>, Vec<(String, u32)>)> for Collect {
    fn open(&mut self, ctx: &mut OpenContext<'_>) -> Result<()> {
        self.list = Some(ctx.list_state("seen")?);
        self.map = Some(ctx.map_state("by-parity")?);
        Ok(())
    }
    fn process(
        &mut self,
        key: &u32,
        (_, v): (u32, u32),
        ctx: &mut KeyedContext<'_>,
        out: &mut Collector<'_, (u32, Vec<u32>, Vec<(String, u32)>)>,
    ) -> Result<()> {
        let list = self.list.as_ref().unwrap();
        let map = self.map.as_ref().unwrap();
        list.add(ctx, v)?;
        let parity = if v % 2 == 0 { "even" } else { "odd" }.to_string();
        let n = map.get(ctx, &parity)?.unwrap_or(0);
        map.put(ctx, &parity, &(n + 1))?;
        if v >= 90 {
            map.remove(ctx, &"odd".to_string())?;
        }
        let mut entries = map.entries(ctx)?;
        entries.sort();
        out.collect((*key, list.get(ctx)?, entries))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_and_map_state_are_scoped_to_the_key() {
    let sink = CollectSink::new();
    let job = Job::new("typed-state").with_parallelism(2);
    job.source(
        "pairs",
        VecSource::new((0..100u32).map(|i| (i % 3, i)).collect(), 1),
        1,
    )
    .key_by(|(k, _)| *k)
    .process("collect", Collect::default())
    .sink(sink.clone())
    .unwrap();
    job.execute().await.unwrap();
    let mut last: BTreeMap<u32, Seen> = BTreeMap::new();
    for (k, list, map) in sink.items() {
        let e = last.entry(k).or_default();
        if list.len() > e.0.len() {
            *e = (list, map);
        }
    }
    for k in 0..3u32 {
        let values: Vec<u32> = (0..100).filter(|i| i % 3 == k).collect();
        let (list, map) = &last[&k];
        assert_eq!(list, &values, "key {k}");
        // The same operations on a plain map.
        let mut model: BTreeMap<String, u32> = BTreeMap::new();
        for v in &values {
            let parity = if v % 2 == 0 { "even" } else { "odd" }.to_string();
            *model.entry(parity).or_insert(0) += 1;
            if *v >= 90 {
                model.remove("odd");
            }
        }
        let want: Vec<(String, u32)> = model.into_iter().collect();
        assert_eq!(map, &want, "key {k}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn union_merges_streams_into_one_keyed_operator() {
    let sink = FinalSumSink::new();
    let job = Job::new("union").with_parallelism(2);
    let a = job.source(
        "a",
        VecSource::new((0..1000u64).map(|i| (i % 7, i)).collect(), 2),
        2,
    );
    let b = job.source(
        "b",
        VecSource::new((0..500u64).map(|i| (i % 7, 10 * i)).collect(), 1),
        1,
    );
    a.union(b)
        .key_by(|(k, _)| *k)
        .process("sum", sluice_runtime::workload::RunningSum::default())
        .sink(sink.clone())
        .unwrap();
    job.execute().await.unwrap();
    let sums = sink.sums();
    for k in 0..7u64 {
        let want: u64 = (0..1000u64).filter(|i| i % 7 == k).sum::<u64>()
            + (0..500u64).filter(|i| i % 7 == k).map(|i| 10 * i).sum::<u64>();
        assert_eq!(sums[&k], want, "key {k}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_lines_source_resumes_at_its_byte_offsets_after_a_failure() {
    let dir = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for f in 0..3 {
        let p = dir.path().join(format!("part-{f}.txt"));
        let mut file = std::fs::File::create(&p).unwrap();
        for i in 0..3000u64 {
            // Lines of varying length, CRLF in one file, no final newline in another.
            let sep = if f == 1 { "\r\n" } else { "\n" };
            if f == 2 && i == 2999 {
                write!(file, "{} {}", i % 11, i * (f + 1)).unwrap();
            } else {
                write!(file, "{} {}{sep}", i % 11, i * (f + 1)).unwrap();
            }
        }
        paths.push(p);
    }
    let sink = FinalSumSink::new();
    let job = Job::new("files")
        .with_parallelism(2)
        .with_restart_strategy(RestartStrategy::FixedDelay {
            attempts: 3,
            delay: Duration::ZERO,
        })
        .with_checkpointing(CheckpointConfig::every(Duration::from_millis(2)));
    let failure = InjectedFailure::new(0, 1500, false);
    job.source("lines", FileLinesSource::new(paths), 2)
        .map(|line: String| {
            let mut it = line.split(' ');
            let k: u64 = it.next().unwrap().parse().unwrap();
            let v: u64 = it.next().unwrap().parse().unwrap();
            (k, v)
        })
        .key_by(|(k, _)| *k)
        .process(
            "sum",
            sluice_runtime::workload::RunningSum::with_failures(vec![failure.clone()]),
        )
        .sink(sink.clone())
        .unwrap();
    let result = job.execute().await.unwrap();
    assert!(failure.fired());
    assert_eq!(result.restarts, 1);
    let sums = sink.sums();
    for k in 0..11u64 {
        let want: u64 = (1..=3u64)
            .map(|m| (0..3000u64).filter(|i| i % 11 == k).map(|i| i * m).sum::<u64>())
            .sum();
        assert_eq!(sums[&k], want, "key {k}");
    }
}

#[tokio::test]
async fn bad_jobs_get_clear_errors() {
    let job = Job::new("dangling");
    let _ = job.source("s", VecSource::new(vec![1u8], 1), 1).map(|x| x + 1);
    let err = job
        .start()
        .err()
        .expect("a stream without sink is refused")
        .to_string();
    assert!(err.contains("end it with a sink"), "{err}");

    let job = Job::new("dup");
    job.source("same", VecSource::new(vec![1u8], 1), 1)
        .sink(DiscardSink::new())
        .unwrap();
    job.source("same", VecSource::new(vec![1u8], 1), 1)
        .sink(DiscardSink::new())
        .unwrap();
    let err = job.start().err().expect("duplicate uids are refused").to_string();
    assert!(err.contains("used twice"), "{err}");

    let job = Job::new("bad-uid");
    job.source("../etc", VecSource::new(vec![1u8], 1), 1)
        .sink(DiscardSink::new())
        .unwrap();
    assert!(job
        .start()
        .err()
        .expect("bad uid refused")
        .to_string()
        .contains("uid"));

    let job = Job::new("too-parallel").with_max_parallelism(4);
    job.source("s", VecSource::new(vec![1u8], 1), 8)
        .sink(DiscardSink::new())
        .unwrap();
    let err = job
        .start()
        .err()
        .expect("parallelism above max refused")
        .to_string();
    assert!(err.contains("max parallelism 4"), "{err}");

    let job = Job::new("forward-mismatch");
    job.source("s", VecSource::new(vec![1u8], 1), 2)
        .forward()
        .set_parallelism(3)
        .sink(DiscardSink::new())
        .unwrap();
    let err = job
        .start()
        .err()
        .expect("forward with different parallelism refused")
        .to_string();
    assert!(err.contains("equal parallelism"), "{err}");

    let job = Job::new("bad-config").with_checkpointing(CheckpointConfig {
        max_concurrent: 0,
        ..Default::default()
    });
    job.source("s", VecSource::new(vec![1u8], 1), 1)
        .sink(DiscardSink::new())
        .unwrap();
    assert!(job.start().is_err());
}

#[allow(dead_code)]
fn assert_send<T: Send>(_: T) {}

#[test]
fn injected_failure_fires_once() {
    let f = InjectedFailure::new(0, 1, false);
    assert!(f.try_fire());
    assert!(!f.try_fire());
    let _ = Arc::clone(&f);
}
