//! The reference workload: **keyed running sum** (see DESIGN.md §6).
//!
//! Event `i` for `i` in `0..N` has key `(i * 0x9E3779B97F4A7C15 mod 2^64)
//! mod K` and value `i`; `key_by(key)`; a keyed process function keeps a
//! `ValueState<u64>` sum and emits `(key, sum)`. Used by the CLI, the
//! benchmarks and the exactly-once tests.

use crate::error::{Result, RuntimeError};
use crate::graph::Job;
use crate::keyed::KeyedProcessFunction;
use crate::operator::Collector;
use crate::sink::{Sink, SinkWriter};
use crate::source::SequenceSource;
use crate::state::{KeyedContext, OpenContext, ValueState};
use rustc_hash::FxHashMap;
use sluice_core::CheckpointId;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// The multiplier of the key function (2^64 / golden ratio).
pub const KEY_MULTIPLIER: u64 = 0x9E37_79B9_7F4A_7C15;

/// The key of event `i` among `keys` keys.
#[inline]
pub fn key_of(i: u64, keys: u64) -> u64 {
    i.wrapping_mul(KEY_MULTIPLIER) % keys
}

/// Every key's expected final sum, computed by a plain loop, and checked
/// against the closed form of the total, `N (N - 1) / 2`.
pub fn expected_sums(events: u64, keys: u64) -> Vec<u64> {
    let mut sums = vec![0u64; keys as usize];
    for i in 0..events {
        sums[key_of(i, keys) as usize] = sums[key_of(i, keys) as usize].wrapping_add(i);
    }
    let total: u128 = sums.iter().map(|s| u128::from(*s)).sum();
    debug_assert_eq!(
        total,
        u128::from(events) * u128::from(events.saturating_sub(1)) / 2
    );
    sums
}

/// A task failure to inject into the running sum: subtask `subtask` fails
/// after processing `after` records, once (with a panic if `panic`).
#[derive(Debug)]
pub struct InjectedFailure {
    /// The subtask that fails.
    pub subtask: u32,
    /// Records processed by that subtask (in the failing attempt) before it fails.
    pub after: u64,
    /// Panic instead of returning an error.
    pub panic: bool,
    fired: AtomicBool,
}

impl InjectedFailure {
    /// A failure of `subtask` after `after` records.
    pub fn new(subtask: u32, after: u64, panic: bool) -> Arc<Self> {
        Arc::new(InjectedFailure {
            subtask,
            after,
            panic,
            fired: AtomicBool::new(false),
        })
    }

    /// Whether it has fired.
    pub fn fired(&self) -> bool {
        self.fired.load(Ordering::Relaxed)
    }

    /// Makes it due again after [`try_fire`](Self::try_fire): a test
    /// holds a failure back until the job has reached a point (a completed
    /// checkpoint or savepoint) and then lets it fire.
    pub fn arm(&self) {
        self.fired.store(false, Ordering::Relaxed);
    }

    /// Marks it fired; true only for the first call.
    pub fn try_fire(&self) -> bool {
        !self.fired.swap(true, Ordering::Relaxed)
    }

    /// Fires the first of `failures` that is due for subtask `subtask` of
    /// operator `who` after `processed` records: a panic, or an
    /// [`RuntimeError::Injected`] error.
    pub fn check(failures: &[Arc<InjectedFailure>], who: &str, subtask: u32, processed: u64) -> Result<()> {
        for f in failures {
            if f.subtask == subtask && processed >= f.after && f.try_fire() {
                if f.panic {
                    panic!("injected panic in {who} subtask {subtask} after {processed} records");
                }
                return Err(RuntimeError::Injected(format!(
                    "{who} subtask {subtask} failed after {processed} records"
                )));
            }
        }
        Ok(())
    }
}

/// The running-sum function.
#[derive(Clone, Default)]
pub struct RunningSum {
    sum: Option<ValueState<u64>>,
    failures: Vec<Arc<InjectedFailure>>,
    subtask: u32,
    processed: u64,
}

impl RunningSum {
    /// A running sum that injects `failures`.
    pub fn with_failures(failures: Vec<Arc<InjectedFailure>>) -> Self {
        RunningSum {
            failures,
            ..Default::default()
        }
    }
}

impl KeyedProcessFunction<u64, (u64, u64), (u64, u64)> for RunningSum {
    fn open(&mut self, ctx: &mut OpenContext<'_>) -> Result<()> {
        self.sum = Some(ctx.value_state("sum")?);
        self.subtask = ctx.subtask();
        self.processed = 0;
        Ok(())
    }

    #[inline]
    fn process(
        &mut self,
        key: &u64,
        (_, value): (u64, u64),
        ctx: &mut KeyedContext<'_>,
        out: &mut Collector<'_, (u64, u64)>,
    ) -> Result<()> {
        if !self.failures.is_empty() {
            self.processed += 1;
            InjectedFailure::check(&self.failures, "running-sum", self.subtask, self.processed)?;
        }
        let state = self
            .sum
            .as_ref()
            .ok_or_else(|| RuntimeError::InvalidJob("running sum not opened".into()))?;
        let sum = state.update(ctx, |sum| {
            let next = sum.unwrap_or(0).wrapping_add(value);
            *sum = Some(next);
            next
        })?;
        out.collect((*key, sum))
    }
}

/// A two-input running sum (for two-input tests): records of the first
/// input add their value, records of the second input twice their value;
/// emits `(key, sum)`. Injects `failures` as [`RunningSum`] does.
#[derive(Clone, Default)]
pub struct TwoInputSum {
    sum: Option<ValueState<u64>>,
    failures: Vec<Arc<InjectedFailure>>,
    subtask: u32,
    seen: u64,
}

impl TwoInputSum {
    /// A two-input sum that injects `failures`.
    pub fn with_failures(failures: Vec<Arc<InjectedFailure>>) -> Self {
        TwoInputSum {
            failures,
            ..Default::default()
        }
    }

    fn add(
        &mut self,
        key: u64,
        v: u64,
        ctx: &mut KeyedContext<'_>,
        out: &mut Collector<'_, (u64, u64)>,
    ) -> Result<()> {
        self.seen += 1;
        InjectedFailure::check(&self.failures, "two-input", self.subtask, self.seen)?;
        let s = self
            .sum
            .as_ref()
            .ok_or_else(|| RuntimeError::InvalidJob("two-input sum used before open".into()))?;
        let sum = s.update(ctx, |sum| {
            let next = sum.unwrap_or(0) + v;
            *sum = Some(next);
            next
        })?;
        out.collect((key, sum))
    }
}

impl crate::keyed::KeyedCoProcessFunction<u64, (u64, u64), (u64, u64), (u64, u64)> for TwoInputSum {
    fn open(&mut self, ctx: &mut OpenContext<'_>) -> Result<()> {
        self.sum = Some(ctx.value_state("sum")?);
        self.subtask = ctx.subtask();
        self.seen = 0;
        Ok(())
    }
    fn process1(
        &mut self,
        key: &u64,
        (_, v): (u64, u64),
        ctx: &mut KeyedContext<'_>,
        out: &mut Collector<'_, (u64, u64)>,
    ) -> Result<()> {
        self.add(*key, v, ctx, out)
    }
    fn process2(
        &mut self,
        key: &u64,
        (_, v): (u64, u64),
        ctx: &mut KeyedContext<'_>,
        out: &mut Collector<'_, (u64, u64)>,
    ) -> Result<()> {
        self.add(*key, 2 * v, ctx, out)
    }
}

/// Adds the two-input job to `job`: source `a` (3 splits, event `i` is
/// `(key_of(i), i)`) and source `b` (2 splits, `(key_of(7i + 1), i)`), each
/// paced to about 200,000 events a second per split, keyed and connected
/// into a [`TwoInputSum`] (uid `two-input-sum`, which adds `b`'s values
/// twice), then a discarding sink. [`two_input_expected`] gives the sums.
pub fn two_input_sum(job: &Job, events: u64, keys: u64) -> Result<()> {
    let pace = (1000, std::time::Duration::from_millis(5));
    let a = job
        .source(
            "a",
            SequenceSource::new(events, 3, move |i| (key_of(i, keys), i)).paced(pace.0, pace.1),
            3,
        )
        .key_by(|(k, _)| *k);
    let b = job
        .source(
            "b",
            SequenceSource::new(events, 2, move |i| (key_of(i * 7 + 1, keys), i)).paced(pace.0, pace.1),
            2,
        )
        .key_by(|(k, _)| *k);
    a.connect(b)
        .process("two-input-sum", TwoInputSum::default())
        .sink(crate::sink::DiscardSink::new())
}

/// The final sums of [`two_input_sum`].
pub fn two_input_expected(events: u64, keys: u64) -> FxHashMap<u64, u64> {
    let mut expected = FxHashMap::default();
    for i in 0..events {
        *expected.entry(key_of(i, keys)).or_default() += i;
        *expected.entry(key_of(i * 7 + 1, keys)).or_default() += 2 * i;
    }
    expected
}

/// Adds the keyed running sum to `job`: a sequence source of `events`
/// events over `keys` keys with `parallelism` splits and subtasks (uid
/// `events`), the running sum (uid `running-sum`), and `sink`.
pub fn keyed_sum(
    job: &Job,
    events: u64,
    keys: u64,
    parallelism: u32,
    function: RunningSum,
    sink: impl Sink<(u64, u64)>,
) -> Result<()> {
    keyed_sum_with_splits(job, events, keys, parallelism, parallelism, None, function, sink)
}

/// [`keyed_sum`] with a source of `splits` splits, fixed whatever the
/// parallelism, so that a savepoint restores at another parallelism, and
/// optionally paced to about `rate` events per second in all.
#[allow(clippy::too_many_arguments)]
pub fn keyed_sum_with_splits(
    job: &Job,
    events: u64,
    keys: u64,
    splits: u32,
    parallelism: u32,
    rate: Option<u64>,
    function: RunningSum,
    sink: impl Sink<(u64, u64)>,
) -> Result<()> {
    keyed_sum_stream(job, events, keys, splits, parallelism, rate, function)?.sink(sink)
}

/// The stream of `(key, running sum)` of [`keyed_sum_with_splits`], for
/// the caller to end with any sink (a transactional one, say).
#[allow(clippy::too_many_arguments)]
pub fn keyed_sum_stream(
    job: &Job,
    events: u64,
    keys: u64,
    splits: u32,
    parallelism: u32,
    rate: Option<u64>,
    function: RunningSum,
) -> Result<crate::graph::DataStream<(u64, u64)>> {
    if keys == 0 {
        return Err(RuntimeError::InvalidJob(
            "the keyed sum needs at least one key".into(),
        ));
    }
    let mut source = SequenceSource::new(events, splits, move |i| (key_of(i, keys), i));
    if let Some(rate) = rate.filter(|r| *r > 0) {
        // Every subtask emits batches of 1000 with a pause after each.
        let pause = std::time::Duration::from_secs_f64(1000.0 * f64::from(parallelism) / rate as f64);
        source = source.paced(1000, pause);
    }
    Ok(job
        .source("events", source, parallelism)
        .key_by(|(k, _)| *k)
        .process("running-sum", function)
        .set_parallelism(parallelism))
}

/// A sink that keeps the largest sum seen per key: for the running sum
/// (sums only grow), that is the key's final state. Each subtask keeps a
/// local map and merges it into the shared one at every barrier and at the
/// end, so nothing emitted before a checkpoint is lost in a failure, and
/// replays after a failure merge idempotently.
#[derive(Debug, Clone, Default)]
pub struct FinalSumSink {
    sums: Arc<Mutex<FxHashMap<u64, u64>>>,
}

impl FinalSumSink {
    /// A new, empty sink.
    pub fn new() -> Self {
        Self::default()
    }

    /// The final sum per key seen so far.
    pub fn sums(&self) -> FxHashMap<u64, u64> {
        self.sums.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

struct FinalSumWriter {
    local: FxHashMap<u64, u64>,
    shared: Arc<Mutex<FxHashMap<u64, u64>>>,
}

impl FinalSumWriter {
    fn merge(&mut self) {
        let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        for (k, v) in self.local.drain() {
            let e = shared.entry(k).or_insert(0);
            *e = (*e).max(v);
        }
    }
}

impl Sink<(u64, u64)> for FinalSumSink {
    fn open(&self, _subtask: u32, _parallelism: u32) -> Result<Box<dyn SinkWriter<(u64, u64)>>> {
        Ok(Box::new(FinalSumWriter {
            local: FxHashMap::default(),
            shared: self.sums.clone(),
        }))
    }
}

impl SinkWriter<(u64, u64)> for FinalSumWriter {
    #[inline]
    fn write(&mut self, (k, sum): (u64, u64)) -> Result<()> {
        let e = self.local.entry(k).or_insert(0);
        *e = (*e).max(sum);
        Ok(())
    }
    fn snapshot(&mut self, _checkpoint: CheckpointId) -> Result<()> {
        self.merge();
        Ok(())
    }
    fn finish(&mut self) -> Result<()> {
        self.merge();
        Ok(())
    }
}

/// Reads every key's sum from the keyed state of the running sum (uid
/// `running-sum`) in checkpoint `id`: the durable state, not what a sink saw.
pub async fn final_sums(
    storage: &dyn sluice_core::CheckpointStorage,
    id: CheckpointId,
) -> Result<FxHashMap<u64, u64>> {
    let meta = sluice_core::metadata::read_checkpoint_metadata(storage, id).await?;
    sums_of(storage, "", &meta, "running-sum").await
}

/// Reads every key's sum (state `sum`) of the running sum with uid `uid`
/// from a checkpoint or savepoint.
pub async fn sums_in(source: &crate::savepoint::RestoreSource, uid: &str) -> Result<FxHashMap<u64, u64>> {
    sums_of(source.storage.as_ref(), &source.base, &source.metadata, uid).await
}

async fn sums_of(
    storage: &dyn sluice_core::CheckpointStorage,
    base: &str,
    meta: &sluice_core::CheckpointMetadata,
    uid: &str,
) -> Result<FxHashMap<u64, u64>> {
    let uid = sluice_core::OperatorUid(uid.into());
    let id = meta.checkpoint_id;
    let op = meta.operator(&uid).ok_or_else(|| {
        RuntimeError::InvalidJob(format!("{} {id} has no state of operator {uid}", meta.kind))
    })?;
    // Streamed into the sums: holding every entry first (as
    // `read_keyed_entries` does) took ~2 GB at 10 M keys.
    let mut sums = FxHashMap::default();
    let what = format!("{} {id} {uid}/sum", meta.kind);
    crate::savepoint::visit_keyed_entries(storage, base, op, &mut |name, _, k, v| {
        if name != "sum" {
            return Ok(());
        }
        let undecodable = || sluice_core::Error::corrupt(&what, "undecodable entry");
        let k = postcard::from_bytes::<u64>(k).map_err(|_| undecodable())?;
        match v {
            Some(v) => {
                sums.insert(k, postcard::from_bytes::<u64>(v).map_err(|_| undecodable())?);
            }
            None => {
                sums.remove(&k);
            }
        }
        Ok(())
    })
    .await?;
    Ok(sums)
}

/// The result of checking final sums against the expected ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    /// Keys checked.
    pub keys: u64,
    /// Keys whose sum is larger than expected (records counted twice).
    pub too_large: u64,
    /// Keys whose sum is smaller than expected, or missing (records lost).
    pub too_small: u64,
    /// The first mismatches: `(key, expected, actual)`.
    pub examples: Vec<(u64, u64, u64)>,
}

impl Verification {
    /// Whether every key's sum is exactly the expected one.
    pub fn exactly_once(&self) -> bool {
        self.too_large == 0 && self.too_small == 0
    }
}

/// Checks `sums` against the expected final sums of `events` over `keys`.
pub fn verify(sums: &FxHashMap<u64, u64>, events: u64, keys: u64) -> Verification {
    let expected = expected_sums(events, keys);
    let mut v = Verification {
        keys,
        too_large: 0,
        too_small: 0,
        examples: Vec::new(),
    };
    for (k, exp) in expected.iter().enumerate() {
        let got = sums.get(&(k as u64)).copied().unwrap_or(0);
        if got != *exp {
            if got > *exp {
                v.too_large += 1;
            } else {
                v.too_small += 1;
            }
            if v.examples.len() < 5 {
                v.examples.push((k as u64, *exp, got));
            }
        }
    }
    v
}

/// The values each key receives from the events `events` (event `i` goes to
/// key [`key_of`]`(i, keys)` with value `i`).
pub fn values_by_key(events: impl IntoIterator<Item = u64>, keys: u64) -> FxHashMap<u64, Vec<u64>> {
    let mut v: FxHashMap<u64, Vec<u64>> = FxHashMap::default();
    for i in events {
        v.entry(key_of(i, keys)).or_default().push(i);
    }
    v
}

/// Checks a sink's committed `key sum` lines (every running sum emitted by
/// the reference workload, one line each) for exactly-once, whatever the
/// order in which a key's records were processed: a key's sums, sorted,
/// must step by exactly the key's values in `values` (each once). A lost
/// record removes a step, a duplicated one adds a step of zero (or of a
/// value twice). Returns the first key that is wrong, described.
pub fn check_sum_lines(
    lines: &[String],
    values: &FxHashMap<u64, Vec<u64>>,
) -> std::result::Result<(), String> {
    let mut sums: FxHashMap<u64, Vec<u64>> = FxHashMap::default();
    for l in lines {
        let parsed = l
            .split_once(' ')
            .and_then(|(k, s)| Some((k.parse::<u64>().ok()?, s.parse::<u64>().ok()?)));
        let Some((k, s)) = parsed else {
            return Err(format!("line {l:?} is not `key sum`"));
        };
        sums.entry(k).or_default().push(s);
    }
    for (k, vals) in values {
        let mut got = sums.remove(k).unwrap_or_default();
        got.sort_unstable();
        let mut prev = 0u64;
        let mut steps = Vec::with_capacity(got.len());
        for s in &got {
            steps.push(s.wrapping_sub(prev));
            prev = *s;
        }
        steps.sort_unstable();
        let mut want = vals.clone();
        want.sort_unstable();
        if steps != want {
            return Err(format!(
                "key {k}: {} lines for {} records (sums {:?}…)",
                got.len(),
                want.len(),
                &got[..got.len().min(5)]
            ));
        }
    }
    match sums.keys().next() {
        Some(k) => Err(format!("key {k} is in the output but received no record")),
        None => Ok(()),
    }
}

/// Formats a `(key, sum)` record as the line [`check_sum_lines`] reads.
pub fn sum_line((k, s): &(u64, u64), out: &mut String) {
    use std::fmt::Write;
    let _ = write!(out, "{k} {s}");
}

/// The events that the [`SequenceSource`] with uid `source` (of `events`
/// events in `splits` splits) had read at the checkpoint or savepoint
/// `meta`: split `j` covers `[events * j / splits, events * (j + 1) / splits)`
/// and its stored position is the next index. The records whose effects a
/// restore of `meta` keeps.
pub fn events_read(
    meta: &sluice_core::CheckpointMetadata,
    source: &str,
    events: u64,
    splits: u32,
) -> Vec<u64> {
    let Some(op) = meta.operators.iter().find(|o| o.uid.as_str() == source) else {
        return Vec::new();
    };
    let (n, s) = (u128::from(events), u128::from(splits.max(1)));
    let mut out = Vec::new();
    for p in op.subtasks.iter().flat_map(|st| &st.splits) {
        let j = u128::from(p.split);
        let (start, end) = ((n * j / s) as u64, (n * (j + 1) / s) as u64);
        let next = if p.offset == 0 { start } else { p.offset.min(end) };
        out.extend(start..next);
    }
    out
}
