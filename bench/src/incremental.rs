//! Incremental against full checkpoints, per state store: the cost of one
//! checkpoint (synchronous snapshot, encoding, the write to a checkpoint
//! storage) and its bytes, for a state of N keys of which a fraction
//! changed since the previous checkpoint. Used by the `incremental_vs_full` binary.

use plotters::prelude::*;
use sluice_core::format::{encode_changes, encode_snapshot};
use sluice_core::{
    key_group_for_key, CheckpointId, CheckpointStorage, KeyGroupRange, OperatorUid, StateBackend, StoreScope,
};
use std::fmt::Write;
use std::path::Path;
use std::time::{Duration, Instant};

const MAX_PARALLELISM: u32 = 128;

/// Full or incremental.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The whole state.
    Full,
    /// The changes since the previous checkpoint.
    Incremental,
}

/// One measured checkpoint.
#[derive(Debug, Clone)]
pub struct Point {
    /// State backend.
    pub backend: String,
    /// Checkpoint storage.
    pub storage: String,
    /// Keys in the state.
    pub keys: u64,
    /// Fraction of the keys changed since the previous checkpoint.
    pub fraction: f64,
    /// Full or incremental.
    pub kind: Kind,
    /// Synchronous snapshot + encoding + write, best of the runs.
    pub duration: Duration,
    /// Bytes written.
    pub bytes: u64,
}

fn scope() -> StoreScope {
    StoreScope {
        job: "incremental-bench".into(),
        operator: OperatorUid::new("sum").expect("uid"),
        subtask: 0,
        parallelism: 1,
        max_parallelism: MAX_PARALLELISM,
        key_groups: KeyGroupRange::all(MAX_PARALLELISM),
        track_changes: true,
    }
}

/// Measures full and incremental checkpoints of a store of `keys` keys on
/// `backend` into `storage` (each with its name), for every fraction in `fractions`; each
/// configuration `runs` times (the best counts). Checkpoint ids start at
/// `first_id` (the storage's `chk-<id>` directories are removed after).
pub async fn measure(
    (backend_name, backend): (&str, &dyn StateBackend),
    (storage_name, storage): (&str, &dyn CheckpointStorage),
    keys: u64,
    fractions: &[f64],
    runs: usize,
    first_id: u64,
) -> Vec<Point> {
    let mut store = backend.open_store(&scope()).expect("open store");
    let s = store.register_state("sum").expect("register");
    for i in 0..keys {
        let (k, g) = key(i);
        store.put(s, g, &k, &i.to_le_bytes()).expect("put");
    }
    let mut id = first_id;
    // The base.
    let base = store.snapshot(CheckpointId(id)).expect("snapshot");
    drop(base);
    store.checkpoint_complete(CheckpointId(id));
    let mut points = Vec::new();
    let mut round = 0u64;
    for &fraction in fractions {
        let changed = ((keys as f64 * fraction) as u64).max(1);
        let stride = (keys / changed).max(1);
        let (mut full, mut inc) = (Duration::MAX, Duration::MAX);
        let (mut full_bytes, mut inc_bytes) = (0, 0);
        for _ in 0..runs {
            round += 1;
            for i in (round % stride..keys).step_by(stride as usize) {
                let (k, g) = key(i);
                store.put(s, g, &k, &(i + round).to_le_bytes()).expect("put");
            }
            // Incremental, relative to the previous checkpoint (or full
            // when the store says a changes file is not worth it, as a task
            // does).
            let t = Instant::now();
            let enc = match store
                .snapshot_changes(CheckpointId(id + 1), CheckpointId(id))
                .expect("changes")
            {
                Some(changes) => encode_changes(changes.as_ref()).expect("encode"),
                None => encode_snapshot(store.snapshot(CheckpointId(id + 1)).expect("snapshot").as_ref())
                    .expect("encode"),
            };
            inc_bytes = enc.bytes.len() as u64;
            write(storage, id + 1, enc.bytes).await;
            inc = inc.min(t.elapsed());
            // Full, of the same state.
            let t = Instant::now();
            let snap = store.snapshot(CheckpointId(id + 2)).expect("snapshot");
            let enc = encode_snapshot(snap.as_ref()).expect("encode");
            full_bytes = enc.bytes.len() as u64;
            write(storage, id + 2, enc.bytes).await;
            full = full.min(t.elapsed());
            drop(snap);
            store.checkpoint_complete(CheckpointId(id + 2));
            id += 2;
        }
        for (kind, duration, bytes) in [
            (Kind::Full, full, full_bytes),
            (Kind::Incremental, inc, inc_bytes),
        ] {
            points.push(Point {
                backend: backend_name.into(),
                storage: storage_name.into(),
                keys,
                fraction,
                kind,
                duration,
                bytes,
            });
        }
    }
    points
}

fn key(i: u64) -> ([u8; 8], u32) {
    // Spread over the key space like hashed keys.
    let k = i.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_be_bytes();
    (k, key_group_for_key(&k, MAX_PARALLELISM))
}

async fn write(storage: &dyn CheckpointStorage, id: u64, bytes: sluice_core::Bytes) {
    let id = CheckpointId(id);
    storage
        .write_file(&format!("{}/sum-0.kst", id.dir()), bytes)
        .await
        .expect("write");
    storage.delete_dir(&id.dir()).await.expect("delete");
}

/// The Markdown table of `points`: full and incremental side by side.
pub fn table(points: &[Point]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| state backend | storage | keys | changed | full | incremental | incremental/full time | full bytes | incremental bytes | incremental/full bytes |"
    );
    let _ = writeln!(
        out,
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for f in points.iter().filter(|p| p.kind == Kind::Full) {
        let Some(i) = points.iter().find(|p| {
            p.kind == Kind::Incremental
                && p.backend == f.backend
                && p.storage == f.storage
                && p.keys == f.keys
                && p.fraction == f.fraction
        }) else {
            continue;
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} % | {:.1} ms | {:.1} ms | {:.1} % | {:.2} MB | {:.2} MB | {:.1} % |",
            f.backend,
            f.storage,
            f.keys,
            f.fraction * 100.0,
            f.duration.as_secs_f64() * 1e3,
            i.duration.as_secs_f64() * 1e3,
            100.0 * i.duration.as_secs_f64() / f.duration.as_secs_f64(),
            f.bytes as f64 / 1e6,
            i.bytes as f64 / 1e6,
            100.0 * i.bytes as f64 / f.bytes as f64
        );
    }
    out
}

/// A chart of `metric` against the changed fraction, one line per state
/// backend and kind, for `keys` keys on `storage`.
pub fn chart(
    points: &[Point],
    keys: u64,
    storage: &str,
    path: &Path,
    title: &str,
    y_desc: &str,
    metric: &dyn Fn(&Point) -> f64,
) -> crate::report::ChartResult {
    let selected: Vec<&Point> = points
        .iter()
        .filter(|p| p.keys == keys && p.storage == storage)
        .collect();
    if selected.is_empty() {
        return Ok(());
    }
    let ys: Vec<f64> = selected.iter().map(|p| metric(p)).collect();
    let (ymin, ymax) = ys
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), y| (a.min(*y), b.max(*y)));
    let (xmin, xmax) = selected.iter().fold((f64::MAX, f64::MIN), |(a, b), p| {
        (a.min(p.fraction), b.max(p.fraction))
    });
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(
            (xmin * 100.0 / 1.5..xmax * 100.0 * 1.5).log_scale(),
            (ymin.max(1e-3) / 2.0..ymax * 2.0).log_scale(),
        )?;
    chart
        .configure_mesh()
        .x_desc("keys changed since the previous checkpoint, % (log scale)")
        .y_desc(y_desc)
        .light_line_style(WHITE)
        .draw()?;
    let colors = [BLUE, RED, GREEN, MAGENTA];
    let mut lines: Vec<(String, Kind)> = Vec::new();
    for p in &selected {
        if !lines.contains(&(p.backend.clone(), p.kind)) {
            lines.push((p.backend.clone(), p.kind));
        }
    }
    for (n, (backend, kind)) in lines.iter().enumerate() {
        let color = colors[n % colors.len()];
        let pts: Vec<(f64, f64)> = selected
            .iter()
            .filter(|p| &p.backend == backend && p.kind == *kind)
            .map(|p| (p.fraction * 100.0, metric(p)))
            .collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(format!("{backend}, {kind:?}").to_lowercase())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 4, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
