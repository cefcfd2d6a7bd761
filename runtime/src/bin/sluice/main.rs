//! The `sluice` command line: runs the reference workload with
//! checkpointing and failure injection and checks the result; controls a
//! running job through its REST API (status, checkpoint, savepoint, stop,
//! cancel); lists checkpoints; inspects and copies savepoints.

mod args;
mod cluster;
mod common;
mod run;
mod tools;

use args::{CheckpointsCommand, Cli, Command, RunJob};
use clap::Parser as _;
use common::finish;
use run::run_keyed_sum;
use std::process::ExitCode;
use tools::{
    client_cancel, client_checkpoint, client_savepoint, client_status, copy, inspect, list_checkpoints,
    rewrite,
};

/// The log filter when `RUST_LOG` is not set: Sluice's progress at `info`;
/// the AWS SDK's own logs (every attempt of the credential chain and of
/// instance metadata, retries, connection errors) off — their failures
/// reach the user as one short error, and `RUST_LOG=debug` shows them all.
const DEFAULT_LOG_FILTER: &str =
    "info,aws_config=off,aws_smithy=off,aws_runtime=off,aws_sdk=off,aws_credential_types=off,aws_sigv4=off";

fn main() -> ExitCode {
    sluice_runtime::limit_allocator_retention();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| DEFAULT_LOG_FILTER.into()),
        )
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Run {
            job: RunJob::KeyedSum(args),
        } => finish(run_keyed_sum(*args)),
        Command::Checkpoints {
            command: CheckpointsCommand::List { storage, s3_endpoint },
        } => finish(list_checkpoints(&storage, s3_endpoint.as_deref())),
        Command::Savepoint { job, stop, target } => finish(client_savepoint(&job, stop, &target)),
        Command::Checkpoint { job } => finish(client_checkpoint(&job)),
        Command::Status { job, json } => finish(client_status(&job, json)),
        Command::Cancel { job } => finish(client_cancel(&job)),
        Command::Inspect {
            path,
            json,
            operator,
            dump,
            s3_endpoint,
        } => finish(inspect(
            &path,
            json,
            operator.as_deref(),
            dump,
            s3_endpoint.as_deref(),
        )),
        Command::Copy {
            src,
            dst,
            s3_endpoint,
        } => finish(copy(&src, &dst, s3_endpoint.as_deref())),
        Command::Rewrite {
            src,
            dst,
            rename,
            drop,
            s3_endpoint,
        } => finish(rewrite(&src, &dst, &rename, &drop, s3_endpoint.as_deref())),
    }
}
