//! The end-to-end benchmark's report: a Markdown table and SVG charts.

use crate::e2e::{Config, RunResult};
use plotters::prelude::*;
use std::fmt::Write;
use std::path::Path;

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

/// The key of the row a recovery run belongs to.
fn same_row(a: &Config, b: &Config) -> bool {
    Config {
        fail: false,
        network: false,
        ..a.clone()
    } == Config {
        fail: false,
        network: false,
        ..b.clone()
    }
}

/// The matrix as a Markdown table: one row per configuration, its
/// throughput run and (if any) its recovery run merged.
pub fn matrix_table(results: &[RunResult]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| state | storage | checkpoints | mode | p | events/s | vs no checkpoints | checkpoint p50 / p99 | \
         alignment p50 / p99 | checkpoint size | recovery | peak memory |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in results.iter().filter(|r| !r.config.fail) {
        let c = &r.config;
        let recovery = results
            .iter()
            .find(|x| x.config.fail && same_row(&x.config, c))
            .map(|x| match &x.outcome {
                Ok(m) => match (m.recovery_ms, m.restored_from) {
                    (Some(ms), Some(id)) => format!("{ms:.0} ms (chk {id})"),
                    (Some(ms), None) => format!("{ms:.0} ms (scratch)"),
                    _ => "?".into(),
                },
                Err(e) => format!("error: {e}"),
            })
            .unwrap_or_else(|| "-".into());
        match &r.outcome {
            Ok(m) => {
                // The run without checkpoints of the same state backend
                // and parallelism.
                let base = results.iter().find(|x| {
                    !x.config.fail
                        && x.config.interval_ms.is_none()
                        && x.config.state == c.state
                        && x.config.parallelism == c.parallelism
                        && x.config.events == c.events
                });
                let vs = match base.map(|b| &b.outcome) {
                    Some(Ok(b)) if c.interval_ms.is_some() => {
                        format!("{:+.1} %", (m.events_per_s / b.events_per_s - 1.0) * 100.0)
                    }
                    _ => "-".into(),
                };
                let ckpt = if m.checkpoints == 0 {
                    "-".into()
                } else {
                    format!("{:.1} / {:.1} ms", m.checkpoint_p50_ms, m.checkpoint_p99_ms)
                };
                let align = if m.checkpoints == 0 {
                    "-".into()
                } else {
                    format!("{:.1} / {:.1} ms", m.alignment_p50_ms, m.alignment_p99_ms)
                };
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {} | {:.2} M | {vs} | {ckpt} | {align} | {} | {recovery} | {} |",
                    c.state,
                    c.storage,
                    c.interval_label(),
                    c.mode,
                    c.parallelism,
                    m.events_per_s / 1e6,
                    mb(m.checkpoint_bytes),
                    mb(m.peak_rss_bytes)
                );
            }
            Err(e) => {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {} | error: {} | | | | | {recovery} | |",
                    c.state,
                    c.storage,
                    c.interval_label(),
                    c.mode,
                    c.parallelism,
                    e.replace('|', "/")
                );
            }
        }
    }
    out
}

/// The state-size sweep as a Markdown table.
pub fn sweep_table(results: &[RunResult]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| storage | keys | checkpoint size | checkpoint p50 / p99 | recovery | events/s |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    for r in results {
        let c = &r.config;
        match &r.outcome {
            Ok(m) => {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {:.1} / {:.1} ms | {} | {:.2} M |",
                    c.storage,
                    c.keys,
                    mb(m.checkpoint_bytes),
                    m.checkpoint_p50_ms,
                    m.checkpoint_p99_ms,
                    m.recovery_ms
                        .map(|ms| format!("{ms:.0} ms"))
                        .unwrap_or_else(|| "?".into()),
                    m.events_per_s / 1e6
                );
            }
            Err(e) => {
                let _ = writeln!(
                    out,
                    "| {} | {} | error: {} | | | |",
                    c.storage,
                    c.keys,
                    e.replace('|', "/")
                );
            }
        }
    }
    out
}

/// What drawing a chart returns.
pub type ChartResult = Result<(), Box<dyn std::error::Error>>;

/// Horizontal bars: events/s per configuration.
pub fn throughput_chart(results: &[RunResult], path: &Path) -> ChartResult {
    let rows: Vec<(String, f64)> = results
        .iter()
        .filter(|r| !r.config.fail)
        .filter_map(|r| {
            r.outcome
                .as_ref()
                .ok()
                .map(|m| (r.config.label(), m.events_per_s / 1e6))
        })
        .collect();
    if rows.is_empty() {
        return Ok(());
    }
    let max = rows.iter().map(|r| r.1).fold(0.0, f64::max) * 1.1;
    let height = 80 + 24 * rows.len() as u32;
    let root = SVGBackend::new(path, (1000, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Reference workload: events/s per configuration (M)",
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(330)
        .build_cartesian_2d(0.0..max.max(0.1), (0..rows.len()).into_segmented())?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(rows.len())
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => rows.get(*i).map(|r| r.0.clone()).unwrap_or_default(),
            _ => String::new(),
        })
        .x_desc("million events per second")
        .draw()?;
    chart.draw_series(rows.iter().enumerate().map(|(i, (_, v))| {
        let mut bar = Rectangle::new(
            [(0.0, SegmentValue::Exact(i)), (*v, SegmentValue::Exact(i + 1))],
            BLUE.mix(0.6).filled(),
        );
        bar.set_margin(3, 3, 0, 0);
        bar
    }))?;
    root.present()?;
    Ok(())
}

/// Lines per storage: `metric` (ms) against the number of keys.
pub fn sweep_chart(
    results: &[RunResult],
    path: &Path,
    title: &str,
    metric: &dyn Fn(&crate::e2e::Measured) -> Option<f64>,
) -> ChartResult {
    let mut storages: Vec<String> = results.iter().map(|r| r.config.storage.clone()).collect();
    storages.dedup();
    let points = |s: &str| -> Vec<(f64, f64)> {
        results
            .iter()
            .filter(|r| r.config.storage == s)
            .filter_map(|r| {
                let m = r.outcome.as_ref().ok()?;
                Some((r.config.keys as f64, metric(m)?))
            })
            .collect()
    };
    let all: Vec<(f64, f64)> = storages.iter().flat_map(|s| points(s)).collect();
    if all.is_empty() {
        return Ok(());
    }
    let (xmin, xmax) = all
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), (x, _)| (a.min(*x), b.max(*x)));
    let ymax = all.iter().map(|p| p.1).fold(0.0, f64::max) * 1.15;
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((xmin / 2.0..xmax * 2.0).log_scale(), 0.0..ymax.max(1.0))?;
    chart
        .configure_mesh()
        .x_desc("keys (log scale)")
        .y_desc("ms")
        .x_labels(4)
        .light_line_style(WHITE)
        .x_label_formatter(&|x| match *x {
            x if x >= 1e6 => format!("{:.0}M", x / 1e6),
            x if x >= 1e3 => format!("{:.0}k", x / 1e3),
            x => format!("{x:.0}"),
        })
        .draw()?;
    let colors = [BLUE, RED, GREEN, MAGENTA];
    for (i, s) in storages.iter().enumerate() {
        let color = colors[i % colors.len()];
        let pts = points(s);
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(s.clone())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::e2e::Measured;

    fn result(interval: Option<u64>, fail: bool, rate: f64) -> RunResult {
        RunResult {
            config: Config {
                state: "memory".into(),
                storage: "memory".into(),
                interval_ms: interval,
                mode: "exactly-once".into(),
                parallelism: 2,
                events: 100,
                keys: 10,
                fail,
                network: false,
            },
            outcome: Ok(Measured {
                events_per_s: rate,
                checkpoints: 3,
                checkpoint_p50_ms: 4.0,
                checkpoint_p99_ms: 9.0,
                recovery_ms: fail.then_some(120.0),
                restored_from: fail.then_some(2),
                checkpoint_bytes: 2_000_000,
                peak_rss_bytes: 50_000_000,
                ..Default::default()
            }),
        }
    }

    #[test]
    fn the_table_merges_recovery_runs_and_compares_with_no_checkpoints() {
        let t = matrix_table(&[
            result(None, false, 10e6),
            result(Some(100), false, 9.5e6),
            result(Some(100), true, 1e6),
        ]);
        let rows: Vec<&str> = t.lines().skip(2).collect();
        assert_eq!(rows.len(), 2, "{t}");
        assert!(rows[1].contains("100 ms") && rows[1].contains("9.50 M"), "{t}");
        assert!(rows[1].contains("-5.0 %"), "{t}");
        assert!(rows[1].contains("120 ms (chk 2)"), "{t}");
        assert!(rows[1].contains("2.0 MB") && rows[1].contains("50.0 MB"), "{t}");
    }

    #[test]
    fn charts_are_written_as_svg() {
        let dir = tempfile::tempdir().unwrap();
        let rs = vec![result(None, false, 10e6), result(Some(100), false, 9.5e6)];
        let p = dir.path().join("t.svg");
        throughput_chart(&rs, &p).unwrap();
        let svg = std::fs::read_to_string(&p).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("<rect"),
            "{}",
            &svg[..200.min(svg.len())]
        );
    }
}
