//! S3 checkpoint storage against a real S3 server (the test script's Garage
//! on 127.0.0.1, or any endpoint in `AWS_ENDPOINT_URL`):
//!
//! 1. upload and download MB/s of a 100 MB and a 1 GB state file through
//!    `S3CheckpointStorage` (parallel multipart upload, one GET), side by side
//!    with a plain `aws-sdk-s3` `PutObject` / `GetObject` of the same bytes,
//!    interleaved round by round in one run;
//! 2. checkpoint duration of the reference workload's state with 100 K and
//!    1 M keys, checkpointed to S3 every 200 ms (memory state backend,
//!    parallelism 2).
//!
//! ```text
//! scripts/s3-server.sh start && eval "$(scripts/s3-server.sh env)"
//! cargo run --release -p sluice-bench --bin s3_storage -- [--sizes-mb 100,1024] [--rounds 3]
//! ```

use aws_sdk_s3::primitives::ByteStream;
use clap::Parser;
use sluice_backend_memory::MemoryStateBackend;
use sluice_backend_s3::{S3CheckpointStorage, S3Config};
use sluice_core::CheckpointStorageExt;
use sluice_core::{Bytes, CheckpointId, CheckpointStorage};
use sluice_runtime::workload::{self, RunningSum};
use sluice_runtime::{CheckpointConfig, CheckpointStatus, DiscardSink, Job};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    /// The bucket (default: `SLUICE_S3_BUCKET`).
    #[arg(long)]
    bucket: Option<String>,
    /// File sizes in MB (10^6 bytes).
    #[arg(long, value_delimiter = ',', default_values_t = [100u64, 1000])]
    sizes_mb: Vec<u64>,
    /// Rounds per size (plain and Sluice interleaved; the best is reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Key counts of the checkpoint-duration runs.
    #[arg(long, value_delimiter = ',', default_values_t = [100_000u64, 1_000_000])]
    keys: Vec<u64>,
    /// Multipart part size in MiB.
    #[arg(long, default_value_t = 16)]
    part_mib: usize,
    /// Parts in flight.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

async fn plain_round(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    data: &Bytes,
) -> (Duration, Duration) {
    let t = Instant::now();
    client
        .put_object()
        .bucket(bucket)
        .key(key)
        .body(ByteStream::from(data.clone()))
        .send()
        .await
        .expect("plain PutObject");
    let up = t.elapsed();
    let t = Instant::now();
    let back = client
        .get_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .expect("plain GetObject")
        .body
        .collect()
        .await
        .expect("plain GetObject body")
        .into_bytes();
    let down = t.elapsed();
    assert_eq!(back.len(), data.len(), "plain GET returned the whole object");
    client
        .delete_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .expect("plain DeleteObject");
    (up, down)
}

async fn sluice_round(storage: &S3CheckpointStorage, id: u64, data: &Bytes) -> (Duration, Duration) {
    let path = format!("chk-{id}/bench-0.kst");
    let t = Instant::now();
    storage
        .write_file(&path, data.clone())
        .await
        .expect("Sluice write_file");
    let up = t.elapsed();
    let t = Instant::now();
    let back = storage.read_file(&path).await.expect("Sluice read_file");
    let down = t.elapsed();
    assert!(back == *data, "the file read back equals the file written");
    storage.discard(CheckpointId(id)).await.expect("discard");
    (up, down)
}

async fn checkpoint_durations(bucket: &str, keys: u64) -> (usize, f64, f64, u64) {
    let prefix = format!("bench/ckpt-{keys}-{}", std::process::id());
    let storage = Arc::new(
        S3CheckpointStorage::open(S3Config::new(bucket, prefix))
            .await
            .expect("open S3 storage"),
    );
    let events = (keys * 20).max(20_000_000);
    let job = Job::new("keyed-sum-s3")
        .with_parallelism(2)
        .with_state_backend(Arc::new(MemoryStateBackend::new()))
        .with_checkpoint_storage(storage.clone())
        .with_checkpointing(CheckpointConfig {
            retained: 1,
            ..CheckpointConfig::every(Duration::from_millis(200))
        });
    workload::keyed_sum(&job, events, keys, 2, RunningSum::default(), DiscardSink::new())
        .expect("job builds");
    let handle = job.start().expect("job starts");
    let monitor = handle.monitor();
    let result = handle.wait().await.expect("job completes");
    let stats = monitor.checkpoint_stats();
    let mut ms: Vec<f64> = stats
        .iter()
        .filter(|s| s.status == CheckpointStatus::Completed)
        .map(|s| s.duration.as_secs_f64() * 1e3)
        .collect();
    let size = stats
        .iter()
        .rev()
        .find(|s| s.status == CheckpointStatus::Completed)
        .map(|s| s.state_size)
        .unwrap_or(0);
    ms.sort_by(f64::total_cmp);
    let p50 = ms.get(ms.len() / 2).copied().unwrap_or(f64::NAN);
    let max = ms.last().copied().unwrap_or(f64::NAN);
    if let Some(last) = result.last_checkpoint {
        let _ = storage.discard(last).await;
    }
    (ms.len(), p50, max, size)
}

fn main() {
    sluice_runtime::limit_allocator_retention();
    let a = Args::parse();
    let Some(bucket) = a
        .bucket
        .clone()
        .or_else(|| std::env::var("SLUICE_S3_BUCKET").ok())
    else {
        eprintln!(
            "s3_storage: no bucket: pass --bucket or set SLUICE_S3_BUCKET (scripts/s3-server.sh env does)"
        );
        std::process::exit(2);
    };
    if std::env::var_os("AWS_ENDPOINT_URL").is_none() {
        eprintln!("s3_storage: AWS_ENDPOINT_URL is not set; this measures against AWS itself");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        let mut config = S3Config::new(&bucket, format!("bench/storage-{}", std::process::id()));
        config.part_size = a.part_mib << 20;
        config.upload_concurrency = a.concurrency;
        let storage = S3CheckpointStorage::open(config).await.expect("open S3 storage");
        let client = storage.client().clone();
        println!(
            "S3 storage vs plain aws-sdk-s3 on {} (bucket {bucket}), {} MiB parts x {} in flight, best of {} rounds",
            storage.describe(),
            a.part_mib,
            a.concurrency,
            a.rounds
        );
        println!("| size | plain PUT MB/s | Sluice write MB/s | ratio | plain GET MB/s | Sluice read MB/s | ratio |");
        println!("|---|---|---|---|---|---|---|");
        let mut id = 1u64;
        for &mb in &a.sizes_mb {
            let len = (mb * 1_000_000) as usize;
            let data: Bytes = (0..len)
                .map(|i| ((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8)
                .collect::<Vec<u8>>()
                .into();
            let (mut pu, mut pd, mut su, mut sd) = (Duration::MAX, Duration::MAX, Duration::MAX, Duration::MAX);
            for _ in 0..a.rounds {
                let key = storage.key(&format!("plain/{id}"));
                let (u, d) = plain_round(&client, &bucket, &key, &data).await;
                pu = pu.min(u);
                pd = pd.min(d);
                let (u, d) = sluice_round(&storage, id, &data).await;
                su = su.min(u);
                sd = sd.min(d);
                id += 1;
            }
            let b = len as u64;
            println!(
                "| {mb} MB | {:.0} | {:.0} | {:.2} | {:.0} | {:.0} | {:.2} |",
                mbps(b, pu),
                mbps(b, su),
                mbps(b, su) / mbps(b, pu),
                mbps(b, pd),
                mbps(b, sd),
                mbps(b, sd) / mbps(b, pd),
            );
        }
        println!();
        println!("reference workload checkpointed to S3 every 200 ms (memory state, parallelism 2):");
        println!("| keys | checkpoints | duration p50 | duration max | state size |");
        println!("|---|---|---|---|---|");
        for &k in &a.keys {
            let (n, p50, max, size) = checkpoint_durations(&bucket, k).await;
            println!(
                "| {k} | {n} | {p50:.0} ms | {max:.0} ms | {:.1} MB |",
                size as f64 / 1e6
            );
        }
    });
}
