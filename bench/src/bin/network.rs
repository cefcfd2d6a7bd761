//! The reference workload with every channel in process vs over TCP on
//! 127.0.0.1 (`LoopbackNetwork`: the wire format, credit-based flow control
//! and fencing of multi-process jobs), interleaved rounds in one process:
//! throughput ratio, bytes on the wire per event, checkpoint and alignment
//! times.
//!
//! ```text
//! cargo run --release -p sluice-bench --bin network -- [--events 20000000] [--keys 100000] [--rounds 3]
//! ```

use clap::Parser;
use sluice_bench::e2e::{median, run, Config, Measured};

#[derive(Parser)]
struct Args {
    /// Events per run.
    #[arg(long, default_value_t = 20_000_000)]
    events: u64,
    /// Distinct keys.
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// Parallelism.
    #[arg(long, default_value_t = 2)]
    parallelism: u32,
    /// Checkpoint interval in ms.
    #[arg(long, default_value_t = 1000)]
    interval_ms: u64,
    /// Rounds (each runs both configurations, in process first).
    #[arg(long, default_value_t = 3)]
    rounds: u32,
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let a = Args::parse();
    let config = |network: bool| Config {
        state: "memory".into(),
        storage: "memory".into(),
        interval_ms: Some(a.interval_ms),
        mode: "exactly-once".into(),
        parallelism: a.parallelism,
        events: a.events,
        keys: a.keys,
        fail: false,
        network,
    };
    let mut runs: [Vec<Measured>; 2] = [Vec::new(), Vec::new()];
    for round in 1..=a.rounds {
        for (i, network) in [false, true].into_iter().enumerate() {
            match run(&config(network)).await {
                Ok(m) => {
                    eprintln!(
                        "round {round}, {}: {:.2} M ev/s, checkpoint p50 {:.1} ms, alignment p50 {:.1} ms{}",
                        if network { "TCP" } else { "in process" },
                        m.events_per_s / 1e6,
                        m.checkpoint_p50_ms,
                        m.alignment_p50_ms,
                        m.wire_bytes_per_event
                            .map(|b| format!(", {b:.2} bytes/event on the wire"))
                            .unwrap_or_default()
                    );
                    runs[i].push(m);
                }
                Err(e) => {
                    eprintln!("round {round}: run failed: {e}");
                    std::process::exit(1);
                }
            }
        }
    }
    let med = |i: usize, f: &dyn Fn(&Measured) -> f64| median(runs[i].iter().map(f).collect());
    let (local, tcp) = (med(0, &|m| m.events_per_s), med(1, &|m| m.events_per_s));
    println!(
        "reference workload, memory state, checkpoints every {} ms, exactly-once, p={}, {} events, {} keys, \
         medians of {} interleaved rounds",
        a.interval_ms, a.parallelism, a.events, a.keys, a.rounds
    );
    println!();
    println!("| channels | throughput | checkpoint p50 | alignment p50 | bytes on the wire per event |");
    println!("| --- | --- | --- | --- | --- |");
    println!(
        "| in process | {:.2} M ev/s | {:.1} ms | {:.1} ms | - |",
        local / 1e6,
        med(0, &|m| m.checkpoint_p50_ms),
        med(0, &|m| m.alignment_p50_ms)
    );
    println!(
        "| TCP on 127.0.0.1 | {:.2} M ev/s | {:.1} ms | {:.1} ms | {:.2} |",
        tcp / 1e6,
        med(1, &|m| m.checkpoint_p50_ms),
        med(1, &|m| m.alignment_p50_ms),
        med(1, &|m| m.wire_bytes_per_event.unwrap_or(f64::NAN))
    );
    println!();
    println!("TCP / in process throughput: {:.2}", tcp / local);
}
